"""The training loader on a real committed version: equal, disjoint ranks; order a function of (seed,
epoch); exact resume; checksums; a bounded S3 cache; the torch IterableDataset; other readers' interop."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import io
import itertools
import json
import multiprocessing
import os
import posixpath
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dagster as dg
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from aifactory_assets.catalog import Catalog
from aifactory_assets.demo import land_demo_data
from aifactory_assets.factory import asset_key, build_catalog_assets
from aifactory_assets.loader import CachedShard, ChecksumMismatch, ShardCache, ShardReader, hold, resolve_manifest
from aifactory_assets.manifest import latest_manifest
from resources import DaskCluster, ObjectStore
from tests.conftest import local_stores, pipeline_resources, s3_stores

DATASET = "seattle_weather"


def commit_version(catalog: Catalog, stores: dict[str, ObjectStore], dask: DaskCluster) -> str:
    """Materialise seattle_weather with small shards (100 rows) so a split spans many files."""
    dataset = catalog.datasets[DATASET].model_copy(
        update={"shards": catalog.datasets[DATASET].shards.model_copy(update={"target_rows": 100})}
    )
    small = catalog.model_copy(update={"datasets": {DATASET: dataset}})
    land_demo_data(small, stores)
    result = dg.materialize(
        build_catalog_assets(small),
        resources=pipeline_resources(stores, dask),
        instance=dg.DagsterInstance.ephemeral(),
        selection=[asset_key(dataset, s) for s in ("raw", "validated", "shards")],
    )
    assert result.success
    manifest = latest_manifest(stores[dataset.site], dataset)
    return stores[dataset.site].url(f"shards/{DATASET}/v={manifest['version']}/manifest.json")


@pytest.fixture(scope="module")
def manifest_url(catalog: Catalog, tmp_path_factory: pytest.TempPathFactory, dask_address: str) -> str:
    dask = DaskCluster(scheduler_address=dask_address)
    try:
        return commit_version(catalog, local_stores(catalog, tmp_path_factory.mktemp("stores")), dask)
    finally:
        dask.close()


def dates(reader: ShardReader) -> list:
    return [d for batch in reader for d in batch.column("date").to_pylist()]


def rank_batches(manifest_url: str, rank: int, world: int, workers: int = 2, **options) -> list:
    """What one rank sees through `workers` data-loader workers, interleaved as PyTorch does."""
    per_worker = [
        list(
            ShardReader(
                manifest_url,
                "train",
                rank=rank,
                world_size=world,
                worker_id=w,
                num_workers=workers,
                batch_size=7,
                **options,
            )
        )
        for w in range(workers)
    ]
    return [b for round_ in itertools.zip_longest(*per_worker) for b in round_ if b is not None]


def rank_stream(manifest_url: str, rank: int, world: int, workers: int = 2, **options) -> list:
    return [
        d for b in rank_batches(manifest_url, rank, world, workers, **options) for d in b.column("date").to_pylist()
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ranks_are_equal_disjoint_and_complete(manifest_url: str, world: int) -> None:
    everything = dates(ShardReader(manifest_url, "train", shuffle=False))
    streams = [rank_stream(manifest_url, rank, world) for rank in range(world)]
    counts = {len(s) for s in streams}
    assert counts == {len(everything) // world}
    seen = [d for s in streams for d in s]
    assert len(seen) == len(set(seen))  # disjoint
    assert len(everything) - len(seen) == len(everything) % world  # complete up to the dropped tail

    padded = [rank_stream(manifest_url, rank, world, remainder="pad") for rank in range(world)]
    assert {len(s) for s in padded} == {-(-len(everything) // world)}
    assert set(itertools.chain(*padded)) == set(everything)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_training_job_finds_the_latest_version_once(
    manifest_url: str, s3_manifest: tuple[str, dict], tmp_path: Path, where: str
) -> None:
    """`_latest`, or the dataset's folder, resolves to the version's manifest; a reader given the pointer
    itself refuses it: ranks and workers each resolving it could read different versions."""
    url, options = (manifest_url, {}) if where == "local" else s3_manifest
    folder = url.rsplit("/v=", 1)[0]
    for given in (folder, f"{folder}/", f"{folder}/_latest", f"{folder}/_latest/", url):
        assert resolve_manifest(given, options) == url
    with pytest.raises(ValueError, match="resolve_manifest"):
        ShardReader(f"{folder}/_latest", "train", storage_options=options)
    fs, path = fsspec.core.url_to_fs(url, **options)
    fs.cp_file(path, path.replace("manifest.json", "manifest-kept.json"))  # a copy renamed, as a job may keep
    renamed = url.replace("manifest.json", "manifest-kept.json")
    assert resolve_manifest(renamed, options) == renamed
    assert len(ShardReader(renamed, "train", storage_options=options)) == len(
        ShardReader(url, "train", storage_options=options)
    )
    with pytest.raises(FileNotFoundError, match="no committed version"):
        resolve_manifest(str(tmp_path / "shards" / "nothing_yet"))


def test_more_ranks_than_rows_is_an_error_unless_padding(manifest_url: str) -> None:
    rows = ShardReader(manifest_url, "test").total
    with pytest.raises(ValueError, match="every rank with nothing"):
        ShardReader(manifest_url, "test", world_size=rows + 1)
    assert len(ShardReader(manifest_url, "test", world_size=rows + 1, remainder="pad")) == 1


def test_the_manifests_remainder_policy_is_the_default(manifest_url: str, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(Path(manifest_url).parent, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["sampler"]["remainder"] == "drop"
    rows = ShardReader(manifest_url, "train").total
    assert rows % 5 and len(ShardReader(manifest_url, "train", world_size=5)) == rows // 5
    manifest["sampler"]["remainder"] = "pad"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert len(ShardReader(str(copy / "manifest.json"), "train", world_size=5)) == -(-rows // 5)


def test_the_manifests_sampler_reproduces_the_loaders_order(manifest_url: str) -> None:
    """The manifest's `sampler.epoch`, followed without the loader, gives the loader's order."""
    import numpy as np

    manifest = json.loads(Path(manifest_url).read_text())
    seed, epoch = manifest["sampler"]["seed"], 3
    assert "default_rng([seed, epoch]).permutation" in manifest["sampler"]["epoch"]
    shards = manifest["splits"]["train"]["shards"]
    groups = [(i, g) for i, s in enumerate(shards) for g, n in enumerate(s["row_groups"]) if n]
    stream = []
    for k in np.random.default_rng([seed, epoch]).permutation(len(groups)):
        i, g = groups[k]
        rows = pq.ParquetFile(Path(manifest_url).parent / shards[i]["path"]).read_row_group(g).column("date")
        stream += rows.take(np.random.default_rng([seed, epoch, i, g]).permutation(len(rows))).to_pylist()
    assert dates(ShardReader(manifest_url, "train", epoch=epoch)) == stream


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_order_is_a_function_of_seed_and_epoch(manifest_url: str, world: int) -> None:
    rank = world - 1
    first = rank_stream(manifest_url, rank, world, epoch=4)
    assert rank_stream(manifest_url, rank, world, epoch=4) == first
    assert rank_stream(manifest_url, rank, world, workers=1, epoch=4) == first  # nor does the worker count
    assert rank_stream(manifest_url, rank, world, epoch=5) != first
    assert rank_stream(manifest_url, rank, world, epoch=4, seed=99) != first
    assert sorted(rank_stream(manifest_url, 0, 1, epoch=4)) == sorted(rank_stream(manifest_url, 0, 1, epoch=5))


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("consumed", [0, 5, 7, 50, 131])
def test_resume_continues_exactly_where_it_stopped(manifest_url: str, world: int, consumed: int) -> None:
    rank = world - 1
    whole = rank_stream(manifest_url, rank, world, epoch=2)
    assert len(whole) > consumed  # resumes within the epoch, at every world size
    reader = ShardReader(manifest_url, "train", rank=rank, world_size=world, epoch=2)
    state = reader.state_dict(samples_consumed=consumed)
    assert rank_stream(manifest_url, rank, world, state=state) == whole[consumed:]


def test_a_corrupted_shard_is_refused(manifest_url: str, tmp_path: Path) -> None:
    root = Path(manifest_url).parent
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shard = next(copy.glob("train-*.parquet"))
    shard.write_bytes(flip_a_byte(shard.read_bytes()))
    with pytest.raises(ChecksumMismatch, match="differs from the manifest"):
        dates(ShardReader(str(copy / "manifest.json"), "train", shuffle=False))


@pytest.mark.parametrize(
    "option",
    [
        {"remainder": "padding"},
        {"start_sample": -7},
        {"shuffle_block": 0},
        {"batch_size": 0},
        {"verify": "page"},
        {"threads": -1},
        {"threads": True},  # use_threads=True renamed by hand: one thread, not one per core
        {"seed": -1},
        {"epoch": -1},
        {"columns": []},
    ],
)
def test_options_out_of_range_are_refused(manifest_url: str, option: dict) -> None:
    """A typo'd remainder would drop where padding was meant; a negative start sends batches to the wrong
    data-loader workers; a typo'd verify would check nothing; a negative seed or epoch failed later in NumPy,
    unnamed; no column yielded no batch while len() counted them."""
    with pytest.raises(ValueError, match=next(iter(option))):
        ShardReader(manifest_url, "train", **option)


def test_a_text_column_past_2_gib_is_taken_in_pieces() -> None:
    """`take_rows` with a small `limit` stands in for a row group past Arrow's 32-bit offsets (2 GiB)."""
    from aifactory_assets.loader import as_stored
    from aifactory_assets.shard_layout import take_rows

    text = pa.chunked_array([[f"row {i} " * (i % 5) for i in range(n, n + 300)] for n in (0, 300, 600)])
    table = pa.table({"id": pa.chunked_array([range(0, 400), range(400, 900)]), "text": text})
    order = np.random.default_rng(0).permutation(900)
    taken = take_rows(table, order, limit=table.nbytes // 5)
    assert taken.column("text").num_chunks > 1
    assert taken.to_pydict() == table.combine_chunks().take(order).to_pydict()
    # Text read as dictionary indices, written out again past the limit, comes in pieces within it.
    whole = taken.combine_chunks()
    encoded = whole.set_column(1, "text", whole.column("text").dictionary_encode())
    limit = table.column("text").nbytes // 7
    stored = as_stored(encoded, {"text": pa.string()}, limit=limit)
    assert stored.schema == taken.schema and stored.to_pydict() == taken.to_pydict()
    chunks = stored.column("text").chunks
    assert len(chunks) > 1
    assert max(int(pc.sum(pc.binary_length(c)).as_py() or 0) for c in chunks) <= limit


def flip_a_page_byte(shard: Path, column: str = "date") -> None:
    """The last byte of the column's first chunk: inside a page's data, past any header or footer."""
    chunk = pq.ParquetFile(shard).metadata.row_group(0).column(pq.ParquetFile(shard).schema_arrow.names.index(column))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(shard.read_bytes())
    data[start + chunk.total_compressed_size - 1] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_pages_mode_checks_every_page_read_and_each_size(manifest_url: str, tmp_path: Path) -> None:
    """verify="pages" hashes no shard whole (every rank would read the whole split), yet refuses a byte
    changed in a page it reads, or a shard of another size than the manifest's."""
    copy = tmp_path / "copy"
    shutil.copytree(Path(manifest_url).parent, copy)

    def read() -> list:
        return dates(ShardReader(str(copy / "manifest.json"), "train", shuffle=False, verify="pages"))

    assert read() == dates(ShardReader(manifest_url, "train", shuffle=False))
    shard = next(copy.glob("train-*.parquet"))
    pristine = shard.read_bytes()
    flip_a_page_byte(shard)
    with pytest.raises(ChecksumMismatch, match=f"{shard.name} row group 0: .*CRC checksum verification failed"):
        read()
    shard.write_bytes(pristine + b"\0")
    with pytest.raises(ChecksumMismatch, match="bytes where the manifest has"):
        read()
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ValueError, match="before shards carried page checksums"):
        read()


def s3_version(catalog: Catalog, s3_endpoint: str, dask: DaskCluster) -> tuple[str, dict]:
    """A version committed to a fresh bucket: its manifest URL and the storage options to read it."""
    stores = s3_stores(catalog, s3_endpoint)
    return commit_version(catalog, stores, dask), stores["kajaani"].storage_options


@pytest.fixture(scope="module")
def s3_manifest(catalog: Catalog, s3_endpoint: str, dask_address: str) -> tuple[str, dict]:
    """One S3 version for the tests that only read it."""
    dask = DaskCluster(scheduler_address=dask_address)
    try:
        return s3_version(catalog, s3_endpoint, dask)
    finally:
        dask.close()


def open_shards(under: Path) -> set[str]:
    """The files under `under` this process holds open, deleted ones included (their disk is not free)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return {t for t in targets if t.startswith(str(under)) and ".parquet" in t}


def test_remote_shards_are_cached_within_a_size_bound(
    s3_manifest: tuple[str, dict], tmp_path: Path, monkeypatch
) -> None:
    url, options = s3_manifest
    local = dates(ShardReader(url, "train", storage_options=options, cache_dir=tmp_path / "big", shuffle=False))
    cached = list((tmp_path / "big").glob("*.parquet"))
    assert len(cached) == len(ShardReader(url, "train", storage_options=options).checksums)
    shard_size = max(p.stat().st_size for p in cached)
    small = tmp_path / "small"
    on_disk_as_downloads_start = []
    reserve = ShardCache._reserve

    def counted(cache: ShardCache, tmp: Path, size: int) -> None:
        reserve(cache, tmp, size)
        assert tmp.stat().st_size == size  # the copy arriving, claimed whole
        on_disk_as_downloads_start.append(
            sum(p.stat().st_size for p in small.iterdir() if p.suffix == ".parquet" or ".tmp-" in p.name)
        )

    monkeypatch.setattr(ShardCache, "_reserve", counted)
    with pytest.warns(UserWarning, match="more than cache_bytes"):  # the churn below: it says so
        reader = ShardReader(
            url, "train", storage_options=options, cache_dir=small, cache_bytes=2 * shard_size, max_open_files=1
        )
    shuffled = []
    for batch in reader:  # row groups from every shard in turn: the cache churns
        shuffled += batch.column("date").to_pylist()
        held = open_shards(small)
        assert len(held) <= 1 and not [h for h in held if h.endswith("(deleted)")]  # none evicted while in use
        assert sum(p.stat().st_size for p in small.glob("*.parquet")) <= 3 * shard_size  # bound + the one held
    assert sorted(shuffled) == sorted(local)
    assert len(on_disk_as_downloads_start) >= len(cached)
    assert max(on_disk_as_downloads_start) <= 2 * shard_size  # room made first: with the copy arriving, the bound
    assert not open_shards(small)  # the epoch's end released them
    assert sum(p.stat().st_size for p in small.glob("*.parquet")) <= 2 * shard_size


def test_a_cache_of_two_copies_keeps_two(tmp_path: Path) -> None:
    """Hash records and lock files (a few bytes each) count for nothing against the bound."""

    remote, size, sums = tmp_path / "remote", 2**16, []
    remote.mkdir()
    for i in range(3):
        data = np.random.default_rng(i).bytes(size)
        (remote / f"s{i}").write_bytes(data)
        sums.append(hashlib.sha256(data).hexdigest())
    cache = ShardCache(tmp_path / "cache", max_bytes=2 * size)
    for i, checksum in enumerate(sums):
        copy, _ = cache.fetch(fsspec.filesystem("file"), str(remote / f"s{i}"), checksum, True, size)
        hold(str(copy), -1)
    assert sorted(p.stem for p in (tmp_path / "cache").glob("*.parquet")) == sorted(sums[1:])


class Overlapping:
    """A remote (all `ShardCache.fetch` asks of a filesystem: `open`) whose downloads overlap: each begins
    (`begun`) and waits for the others before its bytes come, and once every one has written its bytes,
    before any is renamed into place, `arrived` runs."""

    def __init__(self, downloads: int, arrived: Callable[[], None]):
        self.begun = threading.Semaphore(0)
        self.go = threading.Barrier(downloads, timeout=10)
        self.written = threading.Barrier(downloads, action=arrived, timeout=10)

    def open(self, path: str, mode: str) -> io.BytesIO:
        return OverlappingFile(Path(path).read_bytes(), self)


class OverlappingFile(io.BytesIO):
    def __init__(self, data: bytes, remote: Overlapping):
        super().__init__(data)
        self.remote, self.reads = remote, 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads == 1:
            self.remote.begun.release()
            self.remote.go.wait()
        else:
            self.remote.written.wait()
        return super().read(size)


def test_downloads_at_once_keep_the_cache_within_its_bound(tmp_path: Path) -> None:
    """Each download makes room for its copy and claims it whole before the bytes come: one making room
    while another's copy arrived counted that copy at the bytes it had so far (none), and copies arriving at
    once passed the bound. Threads stand for a node's processes (a ShardCache each; the holds they share
    are only on the copies they fetch), started in turn so that each makes room after the one before."""

    size, downloads = 2**16, 3
    remote, cache_dir, sums = tmp_path / "remote", tmp_path / "cache", []
    remote.mkdir()
    for i in range(2 * downloads):
        data = np.random.default_rng(i).bytes(size)
        (remote / f"s{i}").write_bytes(data)
        sums.append(hashlib.sha256(data).hexdigest())
    bound = downloads * size
    for i in range(downloads):  # the cache at its bound, with copies no reader holds
        copy, _ = ShardCache(cache_dir, bound).fetch(fsspec.filesystem("file"), str(remote / f"s{i}"), sums[i], True)
        hold(str(copy), -1)

    def on_disk() -> int:
        return sum(p.stat().st_size for p in cache_dir.iterdir() if p.suffix == ".parquet" or ".tmp-" in p.name)

    most: list[int] = []
    slow = Overlapping(downloads, arrived=lambda: most.append(on_disk()))
    with ThreadPoolExecutor(downloads) as pool:
        fetched = []
        for i in range(downloads, 2 * downloads):
            cache = ShardCache(cache_dir, bound)
            fetched.append(pool.submit(cache.fetch, slow, str(remote / f"s{i}"), sums[i], True, size))
            assert slow.begun.acquire(timeout=10)  # its room made (and claimed) before the next one's
        copies = [future.result()[0] for future in fetched]
    assert len(most) == 1 and most[0] <= bound
    assert [hashlib.sha256(copy.read_bytes()).hexdigest() for copy in copies] == sums[downloads:]
    assert on_disk() <= bound


def test_a_killed_downloads_claim_stops_counting_once_it_stalls(tmp_path: Path) -> None:
    """A rank killed mid-download leaves its claim (a sparse file of the shard's size): counted whole for
    the hour it stays, it shrank the cache of the restarted job, which then fetched every shard again."""
    from aifactory_assets.loader import STALLED_S, hold

    size, cache_dir = 2**16, tmp_path / "cache"
    remote = tmp_path / "remote"
    remote.write_bytes(np.random.default_rng(0).bytes(size))
    checksum = hashlib.sha256(remote.read_bytes()).hexdigest()
    cache = ShardCache(cache_dir, 2 * size + 8192)  # two copies, and the few bytes a dead claim holds
    copy, _ = cache.fetch(fsspec.filesystem("file"), str(remote), checksum, True)
    hold(str(copy), -1)
    claim = cache_dir / f"{'0' * 64}.tmp-999999-1"
    with claim.open("wb") as f:
        f.write(b"x" * 4096)  # the bytes it wrote before it was killed
        f.truncate(size)
    cache.evict(keep=None, room=size)
    assert not copy.exists()  # an arriving copy (just written to) counts whole: the old copy made room
    copy, _ = cache.fetch(fsspec.filesystem("file"), str(remote), checksum, True)
    hold(str(copy), -1)
    stalled = time.time() - STALLED_S - 1
    os.utime(claim, (stalled, stalled))
    cache.evict(keep=None, room=size)
    assert copy.exists()  # a stalled one counts its 4 KiB: the cache still holds a copy and room for one more


def test_a_fork_never_takes_the_caches_room_with_it(tmp_path: Path) -> None:
    """A DataLoader forks its workers while another reader's thread may be making room: a worker that
    inherited the room's flock held every download on the node until it exited."""
    import threading

    cache = ShardCache(tmp_path / "cache", 2**20)
    inside, leave = threading.Event(), threading.Event()

    def make_room() -> None:
        with cache._room():
            inside.set()
            leave.wait(10)

    maker = threading.Thread(target=make_room)
    maker.start()
    assert inside.wait(10)
    threading.Timer(0.5, leave.set).start()  # the room is let go while the fork waits for it
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(20,))
    worker.start()
    try:
        maker.join(10)
        taken = time.monotonic()
        with ShardCache(tmp_path / "cache", 2**20)._room():
            assert time.monotonic() - taken < 5  # not held by the worker, alive for 20 s
    finally:
        worker.kill()
        worker.join()


def test_a_cached_copy_cut_short_is_fetched_again_even_unverified(
    catalog: Catalog, s3_endpoint: str, tmp_path: Path
) -> None:
    """verify=False trusts a copy in the cache as it is: one cut short (a full disk, a copy by hand) failed
    every reader on the node with ArrowInvalid, naming no file, until someone cleared the cache."""
    url, options, _ = many_row_groups(catalog, s3_endpoint, shards=2, groups=2, rows=1_000)

    def ids(reader: ShardReader) -> list[int]:
        return [i for batch in reader for i in batch.column("id").to_pylist()]

    expected = ids(ShardReader(url, "train", storage_options=options, cache_dir=tmp_path / "cache"))
    copies = sorted((tmp_path / "cache").glob("*.parquet"))
    for copy in copies:
        os.truncate(copy, copy.stat().st_size // 2)
    reader = ShardReader(url, "train", storage_options=options, cache_dir=tmp_path / "cache", verify=False)
    assert ids(reader) == expected
    assert reader.cache.downloads == len(copies) == 2


def test_a_cache_disk_too_small_names_the_cache_and_what_to_change(
    catalog: Catalog, s3_endpoint: str, tmp_path: Path
) -> None:
    """A full disk under the shard cache (smaller than cache_bytes and the copies held open) gave a bare
    ENOSPC, which a training job's author could not trace to the cache."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"a small disk for the cache needs a tmpfs mount, refused here: {mounted.stderr.decode().strip()}")
    try:
        url, options, split_bytes = many_row_groups(catalog, s3_endpoint, shards=2, groups=2, rows=20_000)
        assert split_bytes > 256 * 1024
        reader = ShardReader(url, "train", storage_options=options, cache_dir=disk / "cache", cache_bytes=2**30)
        with pytest.raises(OSError, match=r"\(the shard cache\) has no room left for .*lower either") as raised:
            list(reader)
        assert raised.value.errno == errno.ENOSPC
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_forked_worker_holds_none_of_the_caches_locks(tmp_path: Path) -> None:
    """A DataLoader forks its workers while the rank holds a copy and another of its threads downloads one.
    A flock belongs to the open file, which a forked worker shares: it held the copy against every eviction
    after the rank let it go, and the shard's download for the node, for as long as it lived."""
    import threading

    remotes = {}
    for name in ("held", "downloaded"):
        (tmp_path / name).write_bytes(np.random.default_rng(len(name)).bytes(1 << 16))
        remotes[name] = (str(tmp_path / name), hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    cache = ShardCache(tmp_path / "cache", 2**30)
    copy, _ = cache.fetch(fsspec.filesystem("file"), *remotes["held"], True)
    held = CachedShard(copy)
    hold(str(copy), -1)
    downloading, go = threading.Event(), threading.Event()

    class Waiting:  # a remote store whose shard comes once the worker is forked
        def open(self, path: str, mode: str) -> Any:
            downloading.set()
            go.wait(10)
            return open(path, mode)

    def download() -> None:
        fetched, _ = cache.fetch(Waiting(), *remotes["downloaded"], True)
        hold(str(fetched), -1)

    downloader = threading.Thread(target=download)
    downloader.start()
    assert downloading.wait(10)  # its download lock taken
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(20,))
    worker.start()
    try:
        go.set()
        downloader.join(10)
        held.close()
        ShardCache(tmp_path / "cache", 0).evict(keep=None)
        assert not list((tmp_path / "cache").glob("*.parquet"))  # neither copy held by the worker
        taken = time.monotonic()
        cache.fetch(fsspec.filesystem("file"), *remotes["downloaded"], True)  # the node needs it again
        assert time.monotonic() - taken < 5  # its download lock not held by the worker, alive for 20 s
    finally:
        worker.kill()
        worker.join()


def many_row_groups(catalog: Catalog, s3_endpoint: str, shards: int = 8, groups: int = 10, rows: int = 20_000) -> tuple:
    """A split laid out as a large one is (many row groups per shard), on the S3 server."""
    store = s3_stores(catalog, s3_endpoint)["kajaani"]
    tables = []
    for i in range(shards):
        ids = np.arange(i * groups * rows, (i + 1) * groups * rows)
        tables.append(pa.table({"id": ids, "value": np.random.default_rng(i).random(len(ids))}))
    files = split_files(tables, row_group_rows=rows, seed=3)
    for name, data in files.items():
        store.write_bytes(f"split/{name}", data)
    return (
        store.url("split/manifest.json"),
        store.storage_options,
        json.loads(files["manifest.json"])["splits"]["train"]["bytes"],
    )


def test_row_groups_read_by_range_fetch_only_a_ranks_share(catalog: Catalog, s3_endpoint: str, tmp_path: Path) -> None:
    """Row groups are shuffled across every shard: a rank reading a quarter of them through the cache
    downloads nearly the whole split; read by range (cache=False), only about its quarter, in the same order."""
    url, options, split_bytes = many_row_groups(catalog, s3_endpoint)

    def ids(reader: ShardReader) -> list[int]:
        return [i for batch in reader for i in batch.column("id").to_pylist()]

    for rank in range(4):
        cached = ShardReader(
            url, "train", storage_options=options, rank=rank, world_size=4, cache_dir=tmp_path / str(rank)
        )
        ranged = ShardReader(
            url, "train", storage_options=options, rank=rank, world_size=4, cache=False, verify="pages"
        )
        assert ids(ranged) == ids(cached)
        assert cached.cache.downloaded_bytes > 0.8 * split_bytes
        assert 0.2 * split_bytes < ranged.remote_bytes < 0.45 * split_bytes
    with pytest.raises(ValueError, match="verify=True hashes whole shards, which needs the cache"):
        ShardReader(url, "train", storage_options=options, cache=False)


def test_a_reader_keeps_only_a_few_shards_open(manifest_url: str) -> None:
    """A split of thousands of shards would otherwise run a process out of file descriptors."""
    root = Path(manifest_url).parent
    reader = ShardReader(manifest_url, "train", max_open_files=2, batch_size=7)
    most = 0
    for _ in reader:
        most = max(most, len(open_shards(root)))
    assert most == 2  # reached (the epoch reads row groups of every shard in turn), never passed
    assert not open_shards(root)


def hold_first_shard(url: str, options: dict, cache: str, held: Any, done: Any) -> list:
    """In another process: read one batch (its shard's copy held, and no other: no read-ahead), wait, then
    read the rest."""
    reader = iter(
        ShardReader(
            url,
            "train",
            storage_options=options,
            cache_dir=cache,
            cache_bytes=1,
            shuffle=False,
            batch_size=7,
            threads=0,
        )
    )
    first = next(reader).column("date").to_pylist()
    held.set()
    done.wait(120)
    return first + [d for batch in reader for d in batch.column("date").to_pylist()]


def test_a_copy_in_use_is_not_evicted_by_another_process(s3_manifest: tuple[str, dict], tmp_path: Path) -> None:
    url, options = s3_manifest
    expected = dates(ShardReader(url, "train", storage_options=options, cache_dir=tmp_path / "all", shuffle=False))
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    held, done = context.Manager().Event(), context.Manager().Event()
    with context.Pool(1) as pool:
        holder = pool.apply_async(hold_first_shard, (url, options, str(cache), held, done))
        assert held.wait(120)
        copies = list(cache.glob("*.parquet"))
        assert len(copies) == 1
        with pytest.warns(UserWarning, match="more than cache_bytes"):
            churn = ShardReader(url, "train", storage_options=options, cache_dir=cache, cache_bytes=1, epoch=1)
        assert sorted(dates(churn)) == sorted(expected)  # every shard fetched and evicted but the one held
        assert copies[0].exists()
        done.set()
        assert holder.get(120) == expected
        pool.close()  # its worker ends on the pool's sentinel: `terminate` (the block's exit) signals it, and a
        pool.join()  # test run started under `nohup ... &` ignores the signals, which then waited forever


def read_through_shared_cache(url: str, options: dict, cache: str, cache_bytes: int, rank: int) -> list:
    return dates(
        ShardReader(url, "train", storage_options=options, cache_dir=cache, cache_bytes=cache_bytes, epoch=rank)
    )


def test_processes_share_a_small_cache(s3_manifest: tuple[str, dict], tmp_path: Path) -> None:
    """Four processes, as a node's ranks, fetch, verify, hold and evict in one cache smaller than the split."""
    url, options = s3_manifest
    expected = sorted(dates(ShardReader(url, "train", storage_options=options, cache_dir=tmp_path / "all")))
    shard_size = max(p.stat().st_size for p in (tmp_path / "all").glob("*.parquet"))
    cache = tmp_path / "shared"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        streams = pool.starmap(
            read_through_shared_cache, [(url, options, str(cache), 3 * shard_size, rank) for rank in range(4)]
        )
        pool.close()  # ended without signals, as above
        pool.join()
    assert all(sorted(stream) == expected for stream in streams)
    assert len({tuple(stream) for stream in streams}) == 4  # each its own epoch's order
    assert sum(p.stat().st_size for p in cache.glob("*.parquet")) <= 3 * shard_size
    assert not list(cache.glob("*.tmp-*"))


def read_when_all_start(url: str, options: dict, cache: str, start: Any) -> tuple[list, int, int, int]:
    reader = ShardReader(url, "train", storage_options=options, cache_dir=cache, shuffle=False)
    start.wait()  # every process asks for the same shards at the same moment
    return dates(reader), reader.cache.downloads, reader.cache.downloaded_bytes, reader.cache.rehashed


def test_processes_sharing_a_cache_download_each_shard_once(s3_manifest: tuple[str, dict], tmp_path: Path) -> None:
    """A node's ranks reading the same shards at once: one downloads each while the others wait for it, and
    none hashes again what another hashed on its way in (nor a later process, a data-loader worker of the
    next epoch)."""
    url, options = s3_manifest
    expected = dates(ShardReader(url, "train", storage_options=options, cache_dir=tmp_path / "all", shuffle=False))
    split = ShardReader(url, "train", storage_options=options).manifest["splits"]["train"]
    context, ranks = multiprocessing.get_context("spawn"), 4
    with context.Manager() as manager, context.Pool(ranks) as pool:
        start = manager.Barrier(ranks)
        done = pool.starmap(read_when_all_start, [(url, options, str(tmp_path / "shared"), start)] * ranks)
        again = pool.starmap(read_when_all_start, [(url, options, str(tmp_path / "shared"), manager.Barrier(1))])
        pool.close()  # ended without signals, as above
        pool.join()
    assert all(stream == expected for stream, *_ in done + again)
    assert sum(downloads for _, downloads, _, _ in done) == len(split["shards"])
    assert sum(size for _, _, size, _ in done) == split["bytes"]
    assert [rehashed for *_, rehashed in done + again] == [0] * (ranks + 1)
    assert again[0][1] == 0  # no download either


def test_an_eviction_leaves_the_hash_record_of_a_copy_being_renamed_into_place(tmp_path: Path) -> None:
    """A download records its hash just before it renames the copy into place: another process evicting in
    between removed that record, and the node then hashed the copy again."""
    cache = ShardCache(tmp_path, max_bytes=2**30)
    arriving, gone = tmp_path / f"{'a' * 64}.verified", tmp_path / f"{'b' * 64}.verified"
    arriving.write_text("record")
    gone.write_text("record")
    os.utime(gone, (0, 0))  # its copy evicted long ago
    cache.evict(keep=None)
    assert arriving.exists() and not gone.exists()


def test_the_cache_keeps_only_whole_copies_that_match_the_manifest(
    catalog: Catalog, s3_endpoint: str, dask: DaskCluster, tmp_path: Path
) -> None:
    url, options = s3_version(catalog, s3_endpoint, dask)
    cache = tmp_path / "cache"

    def read(**more) -> list:
        return dates(ShardReader(url, "train", storage_options=options, cache_dir=cache, shuffle=False, **more))

    expected = read()
    copy = sorted(cache.glob("*.parquet"))[0]
    copy.write_bytes(flip_a_byte(copy.read_bytes()))  # a local copy damaged (a bad disk, a stray write)
    abandoned = cache / f"{copy.stem}.tmp-1-1"  # what a copy that died halfway leaves behind
    abandoned.write_bytes(b"half")
    os.utime(abandoned, (0, 0))
    assert read() == expected  # fetched again, not trusted for its name
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == copy.stem
    assert not abandoned.exists()

    path, checksum = next(iter(ShardReader(url, "train", storage_options=options).checksums.items()))
    fs, remote = fsspec.core.url_to_fs(f"{posixpath.dirname(url)}/{path}", **options)
    fs.pipe_file(remote, flip_a_byte(fs.cat_file(remote)))  # the object store serves other bytes
    shutil.rmtree(cache)
    with pytest.raises(ChecksumMismatch, match="differs from the manifest"):
        read(verify=False)  # the cache's names are checksums: unverified bytes never get one
    assert not (cache / f"{checksum}.parquet").exists()
    assert not list(cache.glob("*.tmp-*"))


def flip_a_byte(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0xFF
    return bytes(changed)


def test_rows_move_within_their_row_groups_each_epoch(manifest_url: str) -> None:
    """Whatever the row groups' size (here 100 rows at most): had only the groups moved, or runs of rows,
    rows would keep their neighbours, and a batch would hold much the same rows every epoch."""

    def neighbours(epoch: int) -> set[tuple]:
        stream = dates(ShardReader(manifest_url, "train", epoch=epoch))
        return set(zip(stream, stream[1:], strict=False))

    first, second = neighbours(0), neighbours(1)
    assert len(first & second) < len(first) / 20


def test_epochs_reach_persistent_workers_and_a_resume_point_only_its_epoch(manifest_url: str) -> None:
    torch = pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    from aifactory_assets.loader import ShardIterableDataset

    def wind(epoch: int) -> list[float]:
        batches = rank_batches(manifest_url, 1, 2, epoch=epoch, columns=["wind"])
        return [w for batch in batches for w in batch.column("wind").to_pylist()]

    dataset = ShardIterableDataset(
        manifest_url, "train", rank=1, world_size=2, batch_size=7, columns=["wind"], epoch=3, start_sample=12
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True)
    assert torch.cat([b["wind"] for b in loader]).tolist() == wind(3)[12:]
    dataset.set_epoch(4)
    assert torch.cat([b["wind"] for b in loader]).tolist() == wind(4)  # the same worker processes, all of epoch 4


def test_torch_iterable_dataset_feeds_a_dataloader(manifest_url: str) -> None:
    torch = pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    from aifactory_assets.loader import ShardIterableDataset

    dataset = ShardIterableDataset(
        manifest_url, "train", rank=1, world_size=2, batch_size=7, columns=["precipitation", "wind"]
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    tensors = list(loader)
    assert all(isinstance(b["wind"], torch.Tensor) and b["wind"].dtype == torch.float64 for b in tensors)
    expected = [w for b in rank_batches(manifest_url, 1, 2, columns=["wind"]) for w in b.column("wind").to_pylist()]
    assert torch.cat([b["wind"] for b in tensors]).tolist() == expected


def test_the_iterable_dataset_hashes_once_and_still_checks_pages(manifest_url: str, tmp_path: Path) -> None:
    """Its workers need not hash the shards it hashed, but verify=True still means every page read is checked."""
    pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    from aifactory_assets.loader import ShardIterableDataset

    copy = tmp_path / "copy"
    shutil.copytree(Path(manifest_url).parent, copy)
    dataset = ShardIterableDataset(str(copy / "manifest.json"), "train", columns=["wind"])
    assert dataset.reader().verify == "pages"  # hashed here, so the workers do not hash again
    assert len(list(dataset)) > 0
    flip_a_page_byte(next(copy.glob("train-*.parquet")), "wind")  # after the hash: bit rot, mid-training
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        list(dataset)


def test_tensor_loader_gives_the_dataloaders_batches_in_its_order(manifest_url: str) -> None:
    pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    from aifactory_assets.loader import TensorLoader

    columns = ["precipitation", "wind", "temp_max"]
    options = {"rank": 0, "world_size": 3, "batch_size": 7, "columns": columns, "stack": {"x": columns[:2]}}
    for workers, chunk in ((1, 4), (3, 1), (2, 3)):
        loader = TensorLoader(manifest_url, "train", device="cpu", workers=workers, chunk=chunk, **options)
        loader.set_epoch(2)
        got = list(loader)
        expected = rank_batches(manifest_url, 0, 3, workers=1, epoch=2, columns=columns)
        assert len(got) == len(expected) > workers * chunk
        for tensors, batch in zip(got, expected, strict=True):
            assert tensors["x"].shape == (batch.num_rows, 2)
            assert tensors["x"][:, 1].tolist() == batch.column("wind").to_pylist()
            assert tensors["temp_max"].tolist() == batch.column("temp_max").to_pylist()

    def workers() -> set[int]:
        return {p.pid for p in multiprocessing.active_children() if p.name.startswith("TensorLoader")}

    with TensorLoader(manifest_url, "train", device="cpu", workers=2, **options) as loader:
        for epoch in (3, 4):  # the workers of the first epoch make the next one's batches too
            loader.set_epoch(epoch)
            got = [t["temp_max"].tolist() for t in loader]
            if epoch == 3:
                first = workers()
            expected = rank_batches(manifest_url, 0, 3, workers=1, epoch=epoch, columns=columns)
            assert got == [batch.column("temp_max").to_pylist() for batch in expected]
            assert len(first) == 2 and workers() == first
        stream = iter(loader)
        next(stream)
        stream.close()  # stopping early ends the worker processes instead of leaving them blocked
        assert not workers()
        assert len(list(loader)) == len(expected)  # and the next epoch starts new ones
        abandoned = iter(loader)
        next(abandoned)
        assert len(list(loader)) == len(expected)  # a new epoch replaces one left unfinished (a notebook's)
        with pytest.raises(RuntimeError, match="later epoch started"):
            next(abandoned)
        assert len(workers()) == 2
    assert not workers()
    stream = iter(TensorLoader(manifest_url, "train", device="cpu", workers=2, **options))
    next(stream)
    for process in multiprocessing.active_children():
        if process.name.startswith("TensorLoader"):
            process.kill()  # a worker lost (OOM killer, a node going away): an error, not a hang
    with pytest.raises(RuntimeError, match="exited"):
        list(stream)
    with pytest.raises(ValueError, match="numbers only"):
        next(iter(TensorLoader(manifest_url, "train", device="cpu", workers=1, columns=["date", "wind"])))


def alive(pid: int) -> bool:
    """Running, not a zombie (a container's init may never reap an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_tensor_loader_workers_end_with_a_killed_trainer(manifest_url: str) -> None:
    """A trainer killed outright (scancel, the OOM killer) runs no exit handler: its workers must not stay
    behind holding the ring (and, on a GPU machine, the dead trainer's device memory)."""
    pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    assert_workers_end_with_a_killed_trainer(
        "from aifactory_assets.loader import TensorLoader\n"
        f"stream = iter(TensorLoader({manifest_url!r}, 'train', device='cpu', workers=2, columns=['wind']))\n"
        "next(stream)\n"
    )


def assert_workers_end_with_a_killed_trainer(trainer: str) -> None:
    """Run `trainer` (Python that starts two loader workers) in a process that then kills itself outright,
    and check that its workers end within seconds."""
    script = (
        "import multiprocessing, os, signal\n"
        f"{trainer}"
        "print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1]
    )
    workers = [int(pid) for pid in done.stdout.split()]
    assert done.returncode == -signal.SIGKILL and len(workers) == 2, done.stderr
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)


def split_files(tables: list[pa.Table], row_group_rows: int, seed: int) -> dict[str, bytes]:
    """A train split's shards as the pipeline writes them (zstd, page checksums) and its manifest (each
    shard's checksum, footer's checksum and row groups), by file name."""
    files, entries = {}, []
    for i, table in enumerate(tables):
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=row_group_rows, compression="zstd", write_page_checksum=True)
        name, data = f"train-{i:05d}-of-{len(tables):05d}.parquet", buffer.getvalue()
        meta = pq.read_metadata(io.BytesIO(data))
        groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        files[name] = data
        entries.append(
            {
                "path": name,
                "rows": table.num_rows,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "footer_sha256": hashlib.sha256(footer_of(data)).hexdigest(),
                "row_groups": groups,
            }
        )
    split = {"rows": sum(t.num_rows for t in tables), "bytes": sum(e["bytes"] for e in entries), "shards": entries}
    manifest = {"format_version": 4, "splits": {"train": split}, "sampler": {"seed": seed, "remainder": "drop"}}
    return files | {"manifest.json": json.dumps(manifest).encode()}


def local_split(directory: Path, tables: list[pa.Table], row_group_rows: int) -> str:
    """`split_files` in a local directory; its manifest's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in split_files(tables, row_group_rows, seed=5).items():
        (directory / name).write_bytes(data)
    return str(directory / "manifest.json")


def test_verify_takes_a_boolean_or_pages_and_nothing_that_looks_like_one(tmp_path: Path) -> None:
    """Only `True` hashes whole shards: a 1 from a config file passed the check (it equals True) yet hashed
    nothing; numpy's True, which a script may hand on, is taken as True."""
    url = local_split(tmp_path / "split", [pa.table({"id": np.arange(50)})], row_group_rows=10)
    manifest = json.loads(Path(url).read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    Path(url).write_text(json.dumps(manifest))
    for looks_like_one in (1, 1.0, "yes", "true", None):
        with pytest.raises(ValueError, match="True, False or 'pages'"):
            ShardReader(url, "train", verify=looks_like_one)
    with pytest.raises(ChecksumMismatch, match="sha256"):
        list(ShardReader(url, "train", verify=np.True_))


def test_text_comes_as_stored_whether_read_ahead_or_not(tmp_path: Path) -> None:
    """Text is read as dictionary indices where a shard stores it so, shuffled as such and turned back into
    text per batch; a column whose values hardly repeat (its dictionary overflows into plain pages) is
    read as text again from the next shard on. Either way the batches hold the stored types and values,
    the same with any number of threads reading ahead as without."""
    tables = []
    for i in range(3):
        ids = np.arange(i * 60_000, (i + 1) * 60_000)
        tables.append(
            pa.table(
                {
                    "id": ids,
                    "sector": pa.array([f"sector-{k % 7}" for k in ids]),
                    "note": pa.array([f"{k:08d} " * 12 for k in ids], pa.large_string()),
                    "tag": pa.array([None if k % 5 == 0 else f"t{k % 3}".encode() for k in ids], pa.binary()),
                }
            )
        )
    url = local_split(tmp_path / "text", tables, row_group_rows=20_000)
    stored = pq.read_schema(tmp_path / "text" / "train-00000-of-00003.parquet")
    first = pq.ParquetFile(tmp_path / "text" / "train-00000-of-00003.parquet").metadata.row_group(0)
    assert all(first.column(j).has_dictionary_page for j in (1, 2, 3))  # the note's overflowed into plain pages

    def read(**options: Any) -> tuple[list[pa.RecordBatch], ShardReader]:
        reader = ShardReader(url, "train", batch_size=25_000, epoch=2, **options)
        return list(reader), reader

    ahead, reader = read()
    assert reader._plain_text == {"note"}
    in_turn, _ = read(threads=0)
    more, _ = read(threads=5)  # another thread count: the same batches
    assert [b.schema for b in ahead] == [stored.remove_metadata()] * len(ahead)
    assert [b.to_pydict() for b in ahead] == [b.to_pydict() for b in in_turn] == [b.to_pydict() for b in more]
    rows = pa.Table.from_batches(ahead).to_pydict()
    assert sorted(rows["id"]) == list(range(180_000))
    assert rows["sector"] == [f"sector-{k % 7}" for k in rows["id"]]
    assert rows["note"] == [f"{k:08d} " * 12 for k in rows["id"]]
    assert rows["tag"] == [None if k % 5 == 0 else f"t{k % 3}".encode() for k in rows["id"]]


def small_shards(count: int, rows: int) -> list[pa.Table]:
    return [
        pa.table({"id": np.arange(i * rows, (i + 1) * rows), "kind": pa.array([f"k{k % 5}" for k in range(rows)])})
        for i in range(count)
    ]


def test_each_shard_opens_once_an_epoch_within_the_open_limit(tmp_path: Path, monkeypatch) -> None:
    """40 shards, fewer than `max_open_files`: each is opened (and hashed) once an epoch, reading ahead or
    not, and through `read_group` (the torch path); with a limit of 2, never more are open at once."""
    url = local_split(tmp_path / "s", small_shards(40, 40), row_group_rows=10)
    opened, most = [], [0]
    open_shard = ShardReader._open_shard

    def counted(self: ShardReader, shard: str) -> Any:
        opened.append(shard)
        most[0] = max(most[0], len(self._files | {shard: None}))  # this one may not be entered yet
        return open_shard(self, shard)

    monkeypatch.setattr(ShardReader, "_open_shard", counted)
    for options in ({}, {"threads": 0}):
        opened.clear()
        assert sum(b.num_rows for b in ShardReader(url, "train", batch_size=10, **options)) == 1_600
        assert sorted(opened) == sorted(set(opened)) and len(opened) == 40, options
    opened.clear()
    reader = ShardReader(url, "train", batch_size=10)
    assert sum(reader.read_group(g).num_rows for pieces in reader.plan() for g, _, _ in pieces) == 1_600
    assert len(opened) == 40
    for options in ({}, {"threads": 0}):
        most[0] = 0
        assert sum(b.num_rows for b in ShardReader(url, "train", batch_size=10, max_open_files=2, **options)) == 1_600
        assert most[0] == 2, options


def test_a_reader_stopped_early_releases_everything_and_reads_again(tmp_path: Path) -> None:
    url = local_split(tmp_path / "s", small_shards(12, 500), row_group_rows=50)
    reader = ShardReader(url, "train", batch_size=100, max_open_files=3)
    for _ in range(3):
        batches = iter(reader)
        next(batches)
        batches.close()
        assert not reader._files and not +reader._pending
    again = [b.to_pydict() for b in reader]
    assert again == [b.to_pydict() for b in ShardReader(url, "train", batch_size=100, max_open_files=3)]


def test_threads_of_one_reader_do_not_evict_each_others_copies(tmp_path: Path) -> None:
    """A remote as fast as memory (fsspec's in-memory filesystem; through the S3 server the window is
    rarely hit): one thread's eviction, with the cache full, must not remove the copy another thread has
    just fetched and not yet opened (it would fetch it again, and give up after three tries)."""
    local_split(tmp_path / "s", small_shards(12, 3_000), row_group_rows=500)
    remote = fsspec.filesystem("memory")
    for shard in (tmp_path / "s").iterdir():
        remote.pipe(f"/threads-evict/{shard.name}", shard.read_bytes())
    try:
        for epoch in range(15):
            with pytest.warns(UserWarning, match="more than cache_bytes"):
                reader = ShardReader(
                    "memory://threads-evict/manifest.json",
                    "train",
                    cache_dir=tmp_path / f"c{epoch}",
                    cache_bytes=1,
                    batch_size=500,
                    epoch=epoch,
                )
            assert sum(b.num_rows for b in reader) == 36_000
    finally:
        remote.rm("/threads-evict", recursive=True)


def test_pages_are_checked_where_a_shard_is_not_hashed_again(manifest_url: str, tmp_path: Path) -> None:
    """verify=True hashes a shard when a process first reads it, so those reads skip the pages' CRCs; a
    later reader trusts that hash for the same file (size, mtime, inode) and checks every page instead,
    which catches a byte that rots in place."""
    copy = tmp_path / "copy"
    shutil.copytree(Path(manifest_url).parent, copy)
    url = str(copy / "manifest.json")
    assert dates(ShardReader(url, "train", shuffle=False)) == dates(ShardReader(manifest_url, "train", shuffle=False))
    shard = next(copy.glob("train-*.parquet"))
    stat = shard.stat()
    flip_a_page_byte(shard)  # in place: same inode and size
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ChecksumMismatch, match=f"{shard.name} row group 0: .*CRC checksum verification failed"):
        dates(ShardReader(url, "train", shuffle=False))


def test_tensors_refuse_int_nulls_instead_of_inventing_numbers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    from aifactory_assets.loader import TensorLoader

    table = pa.table({"x": pa.array([1.0, None, 3.0, 4.0]), "label": pa.array([1, None, 3, 4], pa.int64())})
    shard = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, shard)
    data = shard.read_bytes()
    entry = {"path": shard.name, "rows": 4, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    entry["row_groups"] = [4]
    manifest = {"splits": {"train": {"rows": 4, "shards": [entry]}}, "sampler": {"seed": 0, "remainder": "drop"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    url = str(tmp_path / "manifest.json")
    with pytest.raises(ValueError, match="'label' \\(int64\\) has 1 null"):
        next(iter(TensorLoader(url, "train", device="cpu", workers=1)))
    (batch,) = list(TensorLoader(url, "train", device="cpu", workers=1, columns=["x"]))
    assert int(torch.isnan(batch["x"]).sum()) == 1  # a float null is NaN, faithfully
    with pytest.raises(ValueError, match="slots >= 2"):
        TensorLoader(url, "train", device="cpu", slots=1)


def test_shards_open_as_they_are_in_other_readers(manifest_url: str, tmp_path: Path, monkeypatch) -> None:
    import json

    import dask.dataframe as dd

    root = Path(manifest_url).parent
    manifest = json.loads(Path(manifest_url).read_text())
    rows = {split: v["rows"] for split, v in manifest["splits"].items()}

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    hf = load_dataset("parquet", data_dir=str(root))
    hf_names = {"val": "validation"}  # HF's name for the split it detects from `val-*` files
    assert {split: hf[split].num_rows for split in hf} == {hf_names.get(k, k): n for k, n in rows.items()}

    # manifest.json sits beside the shards: PyArrow and pandas skip it by its name (no file opened to find
    # out), Dask by its extension; a split is its files' prefix.
    skip = ["manifest", ".", "_"]
    assert pads.dataset(str(root), format="parquet", ignore_prefixes=skip).count_rows() == sum(rows.values())
    assert len(pd.read_parquet(root, ignore_prefixes=skip)) == sum(rows.values())
    assert len(dd.read_parquet(str(root))) == sum(rows.values())
    train = sorted(str(p) for p in root.glob("train-*.parquet"))
    assert pads.dataset(train, format="parquet").count_rows() == rows["train"]
    assert len(pd.concat(pd.read_parquet(p) for p in train)) == rows["train"]
    assert len(dd.read_parquet(f"{root}/train-*.parquet")) == rows["train"]
    assert os.path.exists(root / "manifest.json")


def rewrite_shard(shard: Path, table: pa.Table, row_group_rows: int) -> None:
    pq.write_table(table, shard, row_group_size=row_group_rows, compression="zstd", write_page_checksum=True)


def test_a_footer_unlike_the_manifest_is_refused(manifest_url: str, tmp_path: Path) -> None:
    """The plan is made from the manifest's row groups: a footer with others (rot where no page CRC looks)
    made batches short and ranks unequal, silently. Its schema must be the manifest's too."""
    copy = tmp_path / "copy"
    shutil.copytree(Path(manifest_url).parent, copy)
    shard = sorted(copy.glob("train-*.parquet"))[0]
    table, groups = pq.read_table(shard), json.loads((copy / "manifest.json").read_text())["splits"]["train"]
    rows = next(s["row_groups"] for s in groups["shards"] if s["path"] == shard.name)

    def read() -> list:
        return dates(ShardReader(str(copy / "manifest.json"), "train", verify=False, batch_size=7))

    rewrite_shard(shard, table, max(1, rows[0] // 2))
    with pytest.raises(ChecksumMismatch, match=f"{shard.name}: row groups of"):
        read()
    rewrite_shard(shard, table.rename_columns([c if c != "wind" else "Wind" for c in table.column_names]), rows[0])
    with pytest.raises(ChecksumMismatch, match=f"{shard.name}: its schema differs"):
        read()


def test_a_row_group_read_short_is_refused(manifest_url: str, tmp_path: Path, monkeypatch) -> None:
    """Past the footer's check too: each row group's rows against the manifest's, for the batches and for
    the tensors (whose gather counts on that range)."""
    pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    from aifactory_assets import torch_dataset

    copy = tmp_path / "copy"
    shutil.copytree(Path(manifest_url).parent, copy)
    shard = sorted(copy.glob("train-*.parquet"))[0]
    rewrite_shard(shard, pq.read_table(shard), 10)
    monkeypatch.setattr(ShardReader, "_check_layout", lambda *_: None)
    reader = ShardReader(str(copy / "manifest.json"), "train", verify=False, columns=["wind"], threads=0)
    with pytest.raises(ChecksumMismatch, match="10 rows where the manifest has"):
        list(reader)
    with pytest.raises(ChecksumMismatch, match="10 rows where the manifest has"):
        list(torch_dataset.BatchGatherer(reader))


def footer_of(data: bytes) -> bytes:
    return data[-8 - int.from_bytes(data[-8:-4], "little") :]


def test_the_manifest_holds_each_shards_footer_hash(manifest_url: str) -> None:
    manifest = json.loads(Path(manifest_url).read_text())
    assert manifest["format_version"] >= 4  # footer_sha256 since 4
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            data = (Path(manifest_url).parent / shard["path"]).read_bytes()
            assert shard["footer_sha256"] == hashlib.sha256(footer_of(data)).hexdigest()


def flip_a_footer_byte(data: bytes) -> bytes:
    """A letter of the writer's name in the footer: it still parses, with the same rows and schema."""
    changed = bytearray(data)
    changed[data.rindex(b"parquet-cpp-arrow")] ^= 0x20  # p -> P
    return bytes(changed)


def test_a_footer_that_rots_is_caught_where_the_shard_is_not_hashed(manifest_url: str, tmp_path: Path) -> None:
    """Page CRCs do not cover the footer: after the first hash, every open hashes it against the manifest,
    also read by range (cache=False)."""
    copy = tmp_path / "copy"
    shutil.copytree(Path(manifest_url).parent, copy)
    url = str(copy / "manifest.json")
    expected = dates(ShardReader(url, "train", shuffle=False))  # hashed whole
    shard = sorted(copy.glob("train-*.parquet"))[0]
    stat = shard.stat()
    with shard.open("r+b") as f:  # in place: same inode, size and mtime
        f.write(flip_a_footer_byte(shard.read_bytes()))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    for verify in (True, "pages"):
        with pytest.raises(ChecksumMismatch, match=f"{shard.name} footer: sha256"):
            dates(ShardReader(url, "train", shuffle=False, verify=verify))
    assert dates(ShardReader(url, "train", shuffle=False, verify=False)) == expected

    remote = fsspec.filesystem("memory")
    for path in copy.iterdir():
        remote.pipe(f"/footer-rot/{path.name}", path.read_bytes())
    try:
        with pytest.raises(ChecksumMismatch, match=f"{shard.name} footer: sha256"):
            dates(ShardReader("memory://footer-rot/manifest.json", "train", cache=False, verify="pages"))
    finally:
        remote.rm("/footer-rot", recursive=True)


@pytest.fixture
def memory_copy(manifest_url: str, tmp_path: Path) -> Iterator[str]:
    """The version in fsspec's in-memory filesystem (a remote as fast as memory): its manifest's URL."""
    remote, folder = fsspec.filesystem("memory"), f"/{tmp_path.name}"
    for path in Path(manifest_url).parent.iterdir():
        remote.pipe(f"{folder}/{path.name}", path.read_bytes())
    try:
        yield f"memory://{folder}/manifest.json"
    finally:
        remote.rm(folder, recursive=True)


def rot(copy: Path, change: Callable[[Path], None]) -> None:
    """Bit rot: the copy's bytes change in place, its size, mtime and inode (its hash record) do not."""
    stat = copy.stat()
    change(copy)
    assert copy.stat().st_ino == stat.st_ino
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("verify", [True, "pages"])
def test_a_cached_copy_whose_pages_rot_is_refused_then_fetched_afresh(
    memory_copy: str, tmp_path: Path, verify: bool | str
) -> None:
    """The copy's hash record still vouched for it: every reader on the node failed on it, though the remote
    shard is sound. Its page's CRC failure names the shard and removes the copy; the next reader downloads it."""
    cache = tmp_path / "cache"

    def reader() -> ShardReader:
        return ShardReader(memory_copy, "train", cache_dir=cache, shuffle=False, verify=verify)

    expected = dates(reader())
    shard, checksum = next(iter(reader().checksums.items()))
    copy = cache / f"{checksum}.parquet"
    rot(copy, flip_a_page_byte)
    with pytest.raises(ChecksumMismatch, match=f"{shard} row group 0: .*CRC.*{copy.name} rotted after it was hashed"):
        dates(reader())
    assert not copy.exists() and not copy.with_suffix(".verified").exists()
    again = reader()
    assert dates(again) == expected
    assert again.cache is not None and again.cache.downloads == 1
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == checksum


@pytest.mark.parametrize("verify", [True, "pages"])
def test_a_cached_copy_whose_footer_rots_is_fetched_afresh_as_it_opens(
    memory_copy: str, tmp_path: Path, verify: bool | str
) -> None:
    """A footer is checked as its shard opens, before any row is read: that reader fetches the copy afresh."""
    cache = tmp_path / "cache"
    expected = dates(ShardReader(memory_copy, "train", cache_dir=cache, shuffle=False))
    reader = ShardReader(memory_copy, "train", cache_dir=cache, shuffle=False, verify=verify)
    checksum = next(iter(reader.checksums.values()))
    copy = cache / f"{checksum}.parquet"

    def footer_rots(path: Path) -> None:
        with path.open("r+b") as f:
            f.write(flip_a_footer_byte(path.read_bytes()))

    rot(copy, footer_rots)
    assert dates(reader) == expected
    assert reader.cache is not None and reader.cache.downloads == 1
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == checksum


def test_a_rotted_copy_is_discarded_only_while_it_is_still_the_cached_one(tmp_path: Path) -> None:
    """Another process may have fetched a fresh copy since this one failed its check: that one stays."""
    from aifactory_assets.loader import CachedShard

    copy, fresh = ShardCache(tmp_path).path("a" * 64), tmp_path / "fresh"
    copy.write_bytes(b"rotted")
    copy.with_suffix(".verified").write_text("its record")
    rotted = CachedShard(copy)
    fresh.write_bytes(b"fresh")
    fresh.replace(copy)
    ShardCache.discard(rotted)
    assert copy.read_bytes() == b"fresh" and copy.with_suffix(".verified").exists()
    current = CachedShard(copy)
    ShardCache.discard(current)
    assert not copy.exists() and not copy.with_suffix(".verified").exists()
    rotted.close()
    current.close()


def test_columns_are_checked_against_the_schema(manifest_url: str, tmp_path: Path) -> None:
    """PyArrow leaves out a column it does not find: a label lost, or no column and no batch, unseen."""
    with pytest.raises(KeyError, match="did you mean 'wind'"):
        ShardReader(manifest_url, "train", columns=["date", "wnd"])
    url = local_split(tmp_path / "s", small_shards(2, 20), row_group_rows=10)  # a manifest without a schema
    with pytest.raises(KeyError, match="train-00000-of-00002.parquet, which has"):
        list(ShardReader(url, "train", columns=["id", "kinds"], shuffle=False))
    if importlib.util.find_spec("torch") is not None:
        from aifactory_assets.loader import ShardIterableDataset

        with pytest.raises(KeyError, match="did you mean 'wind'"):
            ShardIterableDataset(manifest_url, "train", columns=["Wind"])


def listed_batches(per_rank: int, size: int, start: int, worker: int, workers: int) -> list[tuple[int, int]]:
    """The plan as it was listed: every batch of the rank, then this worker's from `start`'s on."""
    batches = [(lo, min(lo + size, per_rank)) for lo in range(0, per_rank, size)]
    first = start // size
    mine = [
        (max(lo, start), hi) for i, (lo, hi) in enumerate(batches) if i >= first and (i - first) % workers == worker
    ]
    return [(lo, hi) for lo, hi in mine if lo < hi]


def plan_manifest(directory: Path, row_groups: list[int]) -> str:
    """A manifest alone (no shard is read to plan), of two shards of these row groups."""
    shards = [{"path": f"train-{i}.parquet", "sha256": "0", "bytes": 1, "row_groups": row_groups} for i in range(2)]
    directory.mkdir()
    (directory / "manifest.json").write_text(
        json.dumps({"splits": {"train": {"shards": shards}}, "sampler": {"seed": 0}})
    )
    return str(directory / "manifest.json")


def test_the_plan_is_counted_not_listed(tmp_path: Path) -> None:
    """Batches of a row over millions of rows: the plan is computed batch by batch, its length by a formula
    (a list of every batch took 1.5 GiB over 5 M rows); the same batches as the list had."""
    import tracemalloc

    url = plan_manifest(tmp_path / "big", [50_000] * 20)
    tracemalloc.start()
    try:
        reader = ShardReader(url, "train", batch_size=1, num_workers=3, worker_id=1, start_sample=5)
        assert len(reader) == 666_665 and reader.batch_count() == 666_665
        assert tracemalloc.get_traced_memory()[1] < 2**20
        assert next(iter(reader._batches())) == (6, 7)
    finally:
        tracemalloc.stop()
    url = plan_manifest(tmp_path / "small", [7, 13, 0, 31])
    for world, size, workers in itertools.product((1, 3, 7), (1, 4, 7, 200), (1, 2, 3)):
        per_rank = ShardReader(url, "train", world_size=world).samples_per_rank()
        for start in {0, 1, size - 1, size, 3 * size + 2, per_rank - 1, per_rank} & set(range(per_rank + 1)):
            for worker in range(workers):
                reader = ShardReader(
                    url,
                    "train",
                    world_size=world,
                    batch_size=size,
                    start_sample=start,
                    worker_id=worker,
                    num_workers=workers,
                )
                expected = listed_batches(per_rank, size, start, worker, workers)
                assert list(reader._batches()) == expected
                assert len(reader) == sum(hi - lo for lo, hi in expected) and reader.batch_count() == len(expected)


def test_a_second_user_reads_through_a_shared_cache(tmp_path: Path, monkeypatch) -> None:
    """Another user's copies in a shared cache (a sticky folder) can be read but not touched or removed:
    recency and eviction skip them, as hash records already did."""
    local_split(tmp_path / "s", small_shards(3, 300), row_group_rows=50)
    remote = fsspec.filesystem("memory")
    for shard in (tmp_path / "s").iterdir():
        remote.pipe(f"/shared-cache/{shard.name}", shard.read_bytes())
    cache = tmp_path / "cache"
    try:
        first = sorted(
            ShardReader("memory://shared-cache/manifest.json", "train", cache_dir=cache).iter_rows(), key=str
        )
        theirs = {str(p) for p in cache.iterdir()}
        utime, unlink = os.utime, os.unlink

        def refused(call: Any) -> Any:
            def as_another_user(path: Any, *args: Any, **kwargs: Any) -> Any:
                if str(path) in theirs:
                    raise PermissionError(1, "Operation not permitted", str(path))
                return call(path, *args, **kwargs)

            return as_another_user

        monkeypatch.setattr(os, "utime", refused(utime))
        monkeypatch.setattr(os, "unlink", refused(unlink))
        with pytest.warns(UserWarning, match="more than cache_bytes"):
            reader = ShardReader(
                "memory://shared-cache/manifest.json", "train", cache_dir=cache, cache_bytes=1, epoch=1
            )
        assert sorted(reader.iter_rows(), key=str) == first
        assert theirs <= {str(p) for p in cache.iterdir()}
        damaged = next(p for p in map(Path, theirs) if p.suffix == ".parquet")
        damaged.write_bytes(damaged.read_bytes()[:-1] + b"?")  # a copy of theirs rots: only they can remove it
        with pytest.raises(ChecksumMismatch, match="a damaged copy of another user's"):
            list(ShardReader("memory://shared-cache/manifest.json", "train", cache_dir=cache, epoch=2))
    finally:
        remote.rm("/shared-cache", recursive=True)


def test_a_resume_point_of_another_run_is_refused(manifest_url: str, tmp_path: Path) -> None:
    """A checkpoint's start_sample counts within its run's slices and order: resumed at another world size,
    seed, shuffle or version it would read other rows, silently; past a rank's slice, nothing."""
    state = ShardReader(manifest_url, "train", rank=3, world_size=4, epoch=2).state_dict(samples_consumed=20)
    assert state["world_size"] == 4 and state["version"] == json.loads(Path(manifest_url).read_text())["version"]
    resumed = ShardReader(manifest_url, "train", rank=1, world_size=4, batch_size=7, state=state)
    assert (resumed.epoch, resumed.start_sample) == (2, 20)
    for name, other in (
        ("world_size", {"world_size": 2, "rank": 1}),
        ("seed", {"seed": 1}),
        ("shuffle", {"shuffle": False}),
    ):
        with pytest.raises(ValueError, match=f"saved by a run with {name} "):
            ShardReader(manifest_url, "train", state=state, **({"world_size": 4} | other))
    copy = tmp_path / "copy"
    shutil.copytree(Path(manifest_url).parent, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": "another"}))
    with pytest.raises(ValueError, match="saved by a run with version"):
        ShardReader(str(copy / "manifest.json"), "train", world_size=4, state=state)
    with pytest.raises(ValueError, match="not both"):
        ShardReader(manifest_url, "train", world_size=4, state=state, epoch=2)
    per_rank = ShardReader(manifest_url, "train", world_size=4).samples_per_rank()
    with pytest.raises(ValueError, match="past the"):
        ShardReader(manifest_url, "train", world_size=4, start_sample=per_rank + 1)
    with pytest.raises(ValueError, match="a rank has"):
        ShardReader(manifest_url, "train", world_size=4).state_dict(per_rank + 1)
    if importlib.util.find_spec("torch") is not None:
        from aifactory_assets.loader import ShardIterableDataset

        dataset = ShardIterableDataset(manifest_url, "train", rank=0, world_size=4, batch_size=7, state=state)
        expected = rank_stream(manifest_url, 0, 4, workers=1, state=state)
        assert [d for b in dataset for d in b["date"]] == expected
        with pytest.raises(ValueError, match="saved by a run with world_size"):
            ShardIterableDataset(manifest_url, "train", rank=0, world_size=2, state=state)


LAUNCHERS = ["WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]


@pytest.mark.parametrize("variable", LAUNCHERS)
def test_a_dataset_made_before_init_process_group_is_refused(manifest_url: str, monkeypatch, variable: str) -> None:
    """Whatever launched the ranks (torchrun, srun, mpirun): each would read rank 0 of 1, the same batches.
    One process in an allocation of several tasks (an `sbatch -n 4` script's body) reads as one."""
    pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    from aifactory_assets.loader import ShardIterableDataset

    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert ShardIterableDataset(manifest_url, "train", columns=["wind"]).world_size == 1
    monkeypatch.setenv(variable, "4")
    with pytest.raises(RuntimeError, match=f"{variable} is 4 but torch.distributed is not initialised"):
        ShardIterableDataset(manifest_url, "train", columns=["wind"])
    assert ShardIterableDataset(manifest_url, "train", rank=2, world_size=4, columns=["wind"]).rank == 2


def test_a_negative_epoch_is_refused_when_set(manifest_url: str) -> None:
    pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    from aifactory_assets.loader import ShardIterableDataset

    with pytest.raises(ValueError, match="epoch must be at least 0"):
        ShardIterableDataset(manifest_url, "train", columns=["wind"]).set_epoch(-1)


@pytest.mark.parametrize(
    ("variables", "affinity", "launcher", "cores"),
    [
        ({}, 16, 128, 16),  # one rank: its own cores
        ({"LOCAL_WORLD_SIZE": "8"}, 16, 16, 2),  # torchrun's 8 ranks share the launcher's 16 cores (a job, a mask)
        ({"LOCAL_WORLD_SIZE": "8"}, 16, 128, 16),  # each bound to 16 of the node's 128 by the launcher
        ({"LOCAL_WORLD_SIZE": "8"}, 4, 4, 1),  # a container's 4 cores for 8 ranks
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "8"}, 8, 16, 2),  # Open MPI binds 4 ranks to each 8-core package
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 8, 16, 4),  # ...and 2 ranks to each
        ({"SLURM_STEP_TASKS_PER_NODE": "4(x2),1", "SLURM_NODEID": "1"}, 16, 16, 4),  # srun, no binding
        ({"SLURM_STEP_TASKS_PER_NODE": "4(x2),1", "SLURM_NODEID": "2"}, 16, 16, 16),  # the node with one task
        ({"SLURM_STEP_TASKS_PER_NODE": "1,4", "SLURM_NODEID": "1"}, 16, 16, 4),
    ],
)
def test_ranks_on_one_node_share_its_cores(
    monkeypatch, variables: dict, affinity: int, launcher: int, cores: int
) -> None:
    """With 8 ranks under one launcher's cores and no binding, each rank's workers took every core."""
    pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    from aifactory_assets.torch_dataset import LAUNCHER_LOCAL_SIZES, launcher_cores, rank_cores

    for name in (*LAUNCHER_LOCAL_SIZES, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NODEID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert rank_cores(affinity=affinity, launcher=launcher) == cores
    assert 1 <= launcher_cores(own=1) <= (os.cpu_count() or 1)  # this process's parent: pytest's shell, say


def test_dataloader_workers_take_their_share_of_the_cores(manifest_url: str) -> None:
    """A worker with two cores or more to itself decodes on PyArrow's pool (4 workers on 16 cores: 5.6-5.9
    M rows/s on their own threads, 9.7-10.4 on the pool); with fewer, on its own thread, the workers being
    the parallelism (each decoding on every core would oversubscribe the machine)."""
    pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")
    from torch.utils.data import DataLoader

    from aifactory_assets.loader import available_cores
    from aifactory_assets.torch_dataset import ShardIterableDataset, worker_threads

    assert [worker_threads(n, cores=16) for n in (1, 2, 4, 8, 9, 16, 32)] == [8, 8, 4, 2, 0, 0, 0]
    assert [worker_threads(n, cores=2) for n in (1, 2)] == [2, 0]

    class ReaderThreads(ShardIterableDataset):
        def __iter__(self):
            yield self.reader().threads

    dataset = ReaderThreads(manifest_url, "train", columns=["wind"])
    assert dataset.reader().threads == min(8, available_cores())  # the training process itself: a reader's default
    for workers in (1, 2):
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, multiprocessing_context="fork")
        assert list(loader) == [worker_threads(workers)] * workers
    given = ReaderThreads(manifest_url, "train", columns=["wind"], threads=3)
    assert list(DataLoader(given, batch_size=None, num_workers=2, multiprocessing_context="fork")) == [3, 3]


@pytest.mark.parametrize("manifest_gone", [True, False])
def test_a_shard_gone_mid_epoch_says_whether_its_version_was_removed(tmp_path: Path, manifest_gone: bool) -> None:
    """A job that outlived `retention` commits met a bare FileNotFoundError of a shard path, which says
    neither that retention removed its version nor what to do."""
    tables = [pa.table({"id": np.arange(i * 40, (i + 1) * 40)}) for i in range(3)]
    url = local_split(tmp_path / "ids", tables, row_group_rows=10)
    batches = iter(ShardReader(url, "train", batch_size=7, shuffle=False, threads=0))
    next(batches)  # the first shard is open: the others are read from disk as the epoch reaches them
    doomed = [tmp_path / "ids" / "train-00002-of-00003.parquet"] + ([Path(url)] if manifest_gone else [])
    for path in doomed:
        path.unlink()
    said = "its version was removed while this job read it" if manifest_gone else "missing from a committed version"
    with pytest.raises(FileNotFoundError, match=f"train-00002-of-00003.parquet: {said}"):
        list(batches)
