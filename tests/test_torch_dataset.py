"""The torch side on small local splits: TensorLoader's workers outlive the thread that started them but not
the trainer, and are replaced when lost; arguments, `stack` groups and int nulls are refused as the loader
is made, on every rank alike, not mid-epoch in one worker; a resume point counts the rank's samples."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch", reason="torch is an optional extra; `make test` installs the pinned CPU build")

from aifactory_assets.loader import ChecksumMismatch  # noqa: E402
from aifactory_assets.manifest import schema_fields  # noqa: E402
from aifactory_assets.torch_dataset import LAUNCHER_WORLD_SIZES, ShardIterableDataset, TensorLoader  # noqa: E402
from tests.test_loader import alive, assert_workers_end_with_a_killed_trainer, local_split  # noqa: E402


def id_split(directory: Path) -> str:
    """111 ids in 3 shards of row groups of 10: batches of 7 straddle row groups and shards."""
    tables = [pa.table({"id": np.arange(i * 37, (i + 1) * 37, dtype=np.int64)}) for i in range(3)]
    return local_split(directory, tables, row_group_rows=10)


def ids_of(batches: Iterable[dict[str, Any]]) -> list[int]:
    return [i for batch in batches for i in batch["id"].tolist()]


def epoch_ids(loader: TensorLoader | ShardIterableDataset, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return ids_of(loader)


def workers() -> dict[int, Any]:
    """TensorLoader's worker processes by id."""
    return {p.pid: p for p in multiprocessing.active_children() if p.name.startswith("TensorLoader")}


def wait_until_gone(thread_id: int, timeout_s: float = 10) -> None:
    """`Thread.join` returns before the OS thread has ended, and the kernel acts on its end (PR_SET_PDEATHSIG)
    only then."""
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/self/task/{thread_id}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_workers_outlive_the_thread_that_started_them(tmp_path: Path) -> None:
    """A loader first iterated on a thread (a per-epoch prefetch thread) lost its workers as that thread
    ended (PR_SET_PDEATHSIG follows the forking thread): the next epoch failed as if OOM-killed."""
    url = id_split(tmp_path / "ids")
    expected = epoch_ids(ShardIterableDataset(url, "train", batch_size=7), 1)
    with TensorLoader(url, "train", device="cpu", workers=2, batch_size=7) as loader:
        ended: list[int] = []

        def first_epoch() -> None:
            ended.append(threading.get_native_id())
            epoch_ids(loader, 0)

        thread = threading.Thread(target=first_epoch)
        thread.start()
        thread.join()
        started = set(workers())
        wait_until_gone(ended[0])
        time.sleep(0.5)  # a SIGKILL sent as the thread ended would have landed by now
        assert len(started) == 2 and all(alive(pid) for pid in started)
        assert epoch_ids(loader, 1) == expected and set(workers()) == started  # the same workers


def test_a_worker_lost_between_epochs_is_replaced(tmp_path: Path) -> None:
    """A worker that died between epochs (the OOM killer) made every later epoch fail: the pool was kept."""
    url = id_split(tmp_path / "ids")
    expected = epoch_ids(ShardIterableDataset(url, "train", batch_size=7), 1)
    with TensorLoader(url, "train", device="cpu", workers=2, batch_size=7) as loader:
        epoch_ids(loader, 0)
        lost = next(iter(workers().values()))
        lost.kill()
        lost.join()
        assert epoch_ids(loader, 1) == expected
        assert len(workers()) == 2 and lost.pid not in workers()


def test_workers_end_with_a_killed_trainer_whichever_thread_started_them(tmp_path: Path) -> None:
    """Workers that no longer end with the thread that forked them must still end with the trainer: killed
    outright (scancel, the OOM killer), it runs no exit handler."""
    url = id_split(tmp_path / "ids")
    assert_workers_end_with_a_killed_trainer(
        "import threading\n"
        "from aifactory_assets.torch_dataset import TensorLoader\n"
        f"loader = TensorLoader({url!r}, 'train', device='cpu', workers=2, batch_size=7)\n"
        "thread = threading.Thread(target=lambda: list(loader))\n"
        "thread.start()\n"
        "thread.join()\n"
        "stream = iter(loader)\n"
        "next(stream)\n"
    )


def typed_split(directory: Path, schema_in_manifest: bool) -> str:
    """Columns of several types, the manifest with or without the schema (older manifests have none)."""
    n = 8
    table = pa.table(
        {
            "id": np.arange(2**53, 2**53 + n, dtype=np.int64),  # past float64's exact integers
            "f32": np.full(n, 0.5, np.float32),
            "a": np.arange(n, dtype=np.float32),
            "b": np.arange(n, dtype=np.float32),
            "x": np.zeros(n, np.float32),
            "i16": np.arange(-n, 0, dtype=np.int16),  # exact in a float32
            "s": pa.array([f"s{i}" for i in range(n)]),
        }
    )
    url = local_split(directory, [table], row_group_rows=100)
    if schema_in_manifest:
        manifest = json.loads(Path(url).read_text())
        Path(url).write_text(json.dumps(manifest | {"schema": {"fields": schema_fields(table.schema)}}))
    return url


@pytest.mark.parametrize("schema_in_manifest", [False, True])
@pytest.mark.parametrize(
    ("stack", "columns", "refusal"),
    [
        ({"x": ["id", "f32"]}, ["id", "f32"], r"group 'x' mixes types \{'id': 'int64', 'f32': 'float'\}.*cast"),
        ({"x": ["a", "b"]}, ["a", "b", "x"], r"group 'x' is named like column 'x', also read unstacked"),
        ({"v": ["a", "s"]}, None, r"group 'v': column\(s\) \['s'\] are not numbers"),
        ({"v": ["a", "bb"]}, None, r"group 'v': column\(s\) \['bb'\] not in the split"),
        ({"v": ["a", "b"]}, ["a"], r"group 'v': column\(s\) \['b'\] are not read"),
        ({"v": []}, None, r"group 'v': a non-empty list"),
    ],
)
def test_stack_groups_are_checked_as_the_dataset_is_made(
    tmp_path: Path, schema_in_manifest: bool, stack: dict, columns: list[str] | None, refusal: str
) -> None:
    """Mixed types were converted silently (ids past 2**53 rounded), a clash replaced a column silently,
    and text or a misspelt name failed only in a worker, mid-epoch."""
    url = typed_split(tmp_path / "typed", schema_in_manifest)
    with pytest.raises(ValueError, match=refusal):
        ShardIterableDataset(url, "train", columns=columns, stack=stack)


def test_a_stack_group_of_one_type_is_taken(tmp_path: Path) -> None:
    """The checks refuse only what would go wrong."""
    url = typed_split(tmp_path / "typed", schema_in_manifest=False)
    (batch,) = ShardIterableDataset(url, "train", columns=["a", "b", "id"], stack={"x": ["a", "b"]}, shuffle=False)
    assert batch["x"].dtype == torch.float32 and batch["x"][:, 1].tolist() == list(range(8))
    assert batch["id"].tolist() == list(range(2**53, 2**53 + 8))
    # Mixed types that stack exactly (an int16 in a float32; auto_mpg's ints beside its floats) are taken.
    (batch,) = ShardIterableDataset(url, "train", columns=["a", "i16"], stack={"x": ["a", "i16"]}, shuffle=False)
    assert batch["x"].dtype == torch.float32 and batch["x"][:, 1].tolist() == list(range(-8, 0))


def test_int_nulls_are_refused_on_every_rank_before_any_batch(tmp_path: Path) -> None:
    """Found as its row group was read, a null stopped the one rank that read it, mid-epoch, while the
    others went on (in a real job, to wait in their next collective)."""
    label = pa.array([None if i == 390 else i % 3 for i in range(400)], pa.int64())
    table = pa.table({"x": np.arange(400, dtype=np.float32), "label": label})
    url = local_split(tmp_path / "nulls", [table], row_group_rows=50)
    for rank in (0, 1):
        with pytest.raises(ValueError, match=r"row group 7: column 'label' \(int64\) has 1 null"):
            ShardIterableDataset(url, "train", rank=rank, world_size=2, batch_size=20)
    assert ShardIterableDataset(url, "train", rank=0, world_size=2, columns=["x"]).rank == 0


def test_footers_read_before_any_page_are_held_to_the_manifest(tmp_path: Path) -> None:
    """Unhashed (verify="pages"), each shard's footer is read for its null counts before a worker reads it.
    Those footers were not checked against the manifest: a shard replaced by one with a null was refused
    as data to "fill upstream", not as a shard that is not the manifest's. Unverified, a footer that does
    not parse still names its shard."""
    url = local_split(tmp_path / "labels", [pa.table({"label": np.arange(40, dtype=np.int64)})], row_group_rows=10)
    shard = tmp_path / "labels" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"label": pa.array([None, *range(1, 40)], pa.int64())}), shard, row_group_size=10)
    with pytest.raises(ChecksumMismatch, match=f"{shard.name} footer: sha256 [0-9a-f]+ differs from the manifest"):
        ShardIterableDataset(url, "train", verify="pages")
    data = bytearray(shard.read_bytes())
    length = int.from_bytes(data[-8:-4], "little")
    data[-8 - length : -8] = b"\xff" * length
    shard.write_bytes(data)
    with pytest.raises(ChecksumMismatch, match=f"{shard.name}: its footer does not parse"):
        ShardIterableDataset(url, "train", verify=False)


@pytest.mark.parametrize(
    ("make", "options", "refusal"),
    [
        (ShardIterableDataset, {"world_size": 4}, r"rank=None and world_size=4: give both"),
        (ShardIterableDataset, {"rank": "1", "world_size": 4}, r"rank must be an int, got '1' \(str\)"),
        (ShardIterableDataset, {"rank": 1, "world_size": "4"}, r"world_size must be an int, got '4'"),
        (TensorLoader, {"device": "cpu", "workers": 0}, r"need workers >= 1, got 0"),
        (TensorLoader, {"device": "cpu", "chunk": 0}, r"need chunk >= 1, got 0"),
        (TensorLoader, {"device": "cpu", "workers": True}, r"workers must be an int, got True"),
    ],
)
def test_arguments_are_refused_by_name_as_the_loader_is_made(
    tmp_path: Path, make: type, options: dict[str, Any], refusal: str
) -> None:
    """world_size=4 alone meant rank 0 of 4 on every process; a rank from the environment (a string), or
    workers=0 or chunk=0, failed later in a comparison or a division that named nothing."""
    url = id_split(tmp_path / "ids")
    with pytest.raises((TypeError, ValueError), match=refusal):
        make(url, "train", **options)


def test_slurms_step_count_gives_way_to_a_launcher_inside_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun's WORLD_SIZE=1 in each task of a 4-task srun step (four runs of one process each) was
    refused for the step's count; a count of 1 must not hide mpirun's 4 either."""
    url = id_split(tmp_path / "ids")
    for name in LAUNCHER_WORLD_SIZES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert ShardIterableDataset(url, "train").world_size == 1
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match="OMPI_COMM_WORLD_SIZE is 4 but torch.distributed is not initialised"):
        ShardIterableDataset(url, "train")
    monkeypatch.setenv("WORLD_SIZE", "1")  # leaked in from a container's environment: mpirun's 4 still counts
    with pytest.raises(RuntimeError, match="OMPI_COMM_WORLD_SIZE is 4 but torch.distributed is not initialised"):
        ShardIterableDataset(url, "train")


def in_dataloader(dataset: ShardIterableDataset) -> Iterator[dict[str, Any]]:
    """Two worker processes: the rank's batches alternate between them."""
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork"))


@pytest.mark.parametrize("tensor_loader", [False, True])
def test_a_resume_point_counts_the_ranks_samples_across_its_workers(tmp_path: Path, tensor_loader: bool) -> None:
    """The samples a rank's training loop took, from all its workers: a resume point counted per worker
    resumed at rows already read."""
    url = id_split(tmp_path / "ids")

    def make(**resume: Any) -> TensorLoader | ShardIterableDataset:
        options = {"rank": 1, "world_size": 2, "batch_size": 7, **resume}
        if tensor_loader:
            return TensorLoader(url, "train", device="cpu", workers=2, chunk=1, **options)
        return ShardIterableDataset(url, "train", **options)

    def batches(loader: TensorLoader | ShardIterableDataset) -> Iterator[dict[str, Any]]:
        return iter(loader) if tensor_loader else in_dataloader(loader)

    loader = make()
    loader.set_epoch(1)
    whole = ids_of(batches(loader))
    stream = batches(loader)
    taken = [next(stream) for _ in range(3)]  # from workers 0, 1 and 0
    del stream  # its workers end
    state = loader.state_dict(sum(len(batch["id"]) for batch in taken))
    assert ids_of(taken) + ids_of(batches(make(state=state))) == whole
