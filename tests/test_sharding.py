"""The shuffle's own parts: the key's hash, the sampler's text, empty splits, the size estimate, staging,
row groups across buckets, and the validated rows a notebook reads."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import aifactory_assets.sharding as sharding
from aifactory_assets.catalog import Catalog, Dataset
from aifactory_assets.loader import ShardReader
from aifactory_assets.manifest import latest_manifest
from aifactory_assets.shard_layout import take_rows
from aifactory_assets.sharding import (
    SAMPLER,
    assign_splits,
    gather_bucket,
    key_hash,
    measure_parts,
    scatter_part,
    write_shard,
)
from aifactory_assets.staging import BATCH_ROWS, read_sorted_rows, write_sorted
from aifactory_assets.validated_rows import read_validated
from resources import DaskCluster, ObjectStore
from tests.conftest import failed_checks, local_stores, materialize_all

RATIOS = {"train": 0.8, "val": 0.1, "test": 0.1}
SEED = 20241210
M64 = 2**64 - 1


def key_table(rows: int = 3_000) -> pa.Table:
    """Keys of every kind the split has assigned so far, over their whole ranges."""
    rng = np.random.default_rng(0)
    days = rng.integers(0, (dt.date(9999, 12, 31) - dt.date(1, 1, 1)).days, rows)
    return pa.table(
        {
            "int32": pa.array(rng.integers(-(2**31), 2**31 - 1, rows), pa.int32()),
            "int64": pa.array(rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)),
            "text": pa.array([f"record-{i}-é" for i in range(rows)]),
            "date": pa.array([dt.date(1, 1, 1) + dt.timedelta(days=int(d)) for d in days], pa.date32()),
            "timestamp": pa.array(rng.integers(-(2**50), 2**50, rows)).cast(pa.timestamp("us")),
        }
    )


def hashed_as_before(frame: pd.DataFrame) -> np.ndarray:
    """The first versions' hash: pandas' own, of the columns as pandas 3 converts them (timestamps in us,
    dates as objects, that is as their text)."""
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)


@pytest.mark.parametrize("key", [["int32"], ["int64"], ["text"], ["date"], ["timestamp"], ["text", "date", "int64"]])
def test_a_keys_hash_is_todays_and_not_the_unit_pandas_gives(key: list[str]) -> None:
    """A pandas or pyarrow release that converts timestamps in another unit, or dates to datetimes, must
    move no record to another split (train and test would share records across versions)."""
    table = key_table()
    in_us = table.select(key).to_pandas()
    before = hashed_as_before(in_us)
    in_ns = in_us.assign(**{c: in_us[c].astype("datetime64[ns]") for c in key if c == "timestamp"})
    in_text = in_us.assign(**{c: pd.Series(in_us[c].map(str), dtype=object) for c in key if c == "date"})
    assert (hashed_as_before(in_text) == before).all()  # dates were hashed as their ISO text
    for frame in (in_us, in_ns):
        assert (key_hash(frame, key) == before).all()
        assert (assign_splits(key_hash(frame, key), RATIOS) == assign_splits(before, RATIOS)).all()
    assert (key_hash(table, key) == before).all()  # as the shuffle hashes them, from Arrow


def test_nfc_and_nfd_text_are_two_keys() -> None:
    """Text is hashed as its UTF-8 bytes: one name written composed and decomposed is two records."""
    composed, decomposed = "café", "cafe\u0301"
    hashes = key_hash(pd.DataFrame({"k": [composed, decomposed]}), ["k"])
    assert hashes[0] != hashes[1]


def mix(z: int) -> int:
    """splitmix64's finaliser, as SAMPLER["shuffle"] spells it."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def order_by_the_text(keys: list[int], seed: int) -> list[int]:
    """The keys in the order SAMPLER's text gives, followed literally, without the module's functions."""
    assert "finaliser alone (no gamma added)" in SAMPLER["shuffle"]
    assert "first 8 bytes, big-endian, of sha256 of the seed's decimal text" in SAMPLER["shuffle"]
    s = int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:8], "big")
    hashes = pd.util.hash_pandas_object(pd.DataFrame({"k": np.array(keys, np.int64)}), index=False)
    by_key = {k: mix(int(h) ^ s) for k, h in zip(keys, hashes.tolist(), strict=True)}
    return sorted(keys, key=by_key.__getitem__)


def split_by_the_text(keys: list[int]) -> dict[int, str]:
    hashes = pd.util.hash_pandas_object(pd.DataFrame({"k": np.array(keys, np.int64)}), index=False).to_numpy()
    cut = np.searchsorted(np.cumsum(list(RATIOS.values()))[:-1], hashes / 2.0**64, side="right")
    return {k: list(RATIOS)[i] for k, i in zip(keys, cut.tolist(), strict=True)}


def tiny_dataset(catalog: Catalog) -> tuple[Catalog, Dataset]:
    columns = [
        {"name": "k", "type": "int64", "nullable": False},
        {"name": "n", "type": "int64"},
        {"name": "b", "type": "bool"},
        {"name": "d", "type": "date"},
    ]
    dataset = Dataset.model_validate(
        {
            "name": "tiny",
            "sector": "climate",
            "site": "kajaani",
            "description": "Five records: a split of none.",
            "owner": "team:tests",
            "source": {"format": "jsonl", "landing": "*.jsonl"},
            "schema": {"key": ["k"], "columns": columns},
            "suite": "suites/tiny.json",
            "shards": {"splits": RATIOS, "seed": SEED},
        }
    )
    suite = {
        "name": "tiny",
        "expectations": [{"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 1}}],
    }
    return catalog.model_copy(update={"datasets": {"tiny": dataset}, "suites": {"tiny": suite}}), dataset


LANDED = {  # the second file: nulls, and an integer past 2**53
    "a.jsonl": [{"k": k, "n": k, "b": True, "d": "2024-01-01"} for k in (0, 1, 2)],
    "b.jsonl": [{"k": 100, "n": None, "b": None, "d": None}, {"k": 101, "n": 2**53 + 3, "b": None, "d": None}],
}


@pytest.fixture(scope="module")
def tiny(catalog: Catalog, dask_address: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The five records through raw, validated and shards, once for the module."""
    tiny_catalog, dataset = tiny_dataset(catalog)
    stores = local_stores(tiny_catalog, tmp_path_factory.mktemp("tiny"))
    store = stores[dataset.site]
    store.ensure_root()
    for name, rows in LANDED.items():
        store.write_bytes(f"landing/tiny/{name}", "".join(json.dumps(r) + "\n" for r in rows).encode())
    dask = DaskCluster(scheduler_address=dask_address)
    result = materialize_all(tiny_catalog, stores, dask)
    manifest = latest_manifest(store, dataset)
    folder = Path(store.path(f"shards/tiny/v={manifest['version']}"))
    yield {"result": result, "store": store, "dataset": dataset, "manifest": manifest, "folder": folder}
    dask.close()


def test_an_empty_split_has_no_file_and_every_reader_reads_the_version(
    tiny: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest, folder = tiny["manifest"], tiny["folder"]
    assert tiny["result"].success and failed_checks(tiny["result"]) == []
    rows = {split: entry["rows"] for split, entry in manifest["splits"].items()}
    assert rows == {"train": 4, "val": 1, "test": 0}
    assert manifest["splits"]["test"]["shards"] == [] and not list(folder.glob("test-*"))
    assert all(n for entry in manifest["splits"].values() for s in entry["shards"] for n in s["row_groups"])
    assert list(ShardReader(str(folder / "manifest.json"), "test", world_size=2, rank=1)) == []

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from datasets import load_dataset

    hf = load_dataset("parquet", data_dir=str(folder))
    assert {split: hf[split].num_rows for split in hf} == {"train": 4, "validation": 1}
    skip = ["manifest", ".", "_"]
    assert pads.dataset(str(folder), format="parquet", ignore_prefixes=skip).count_rows() == 5
    assert len(pd.read_parquet(folder, ignore_prefixes=skip)) == 5


def test_the_sampler_text_followed_literally_gives_the_shards_split_and_order(tiny: dict[str, Any]) -> None:
    manifest, folder = tiny["manifest"], tiny["folder"]
    assert manifest["sampler"]["shuffle"] == SAMPLER["shuffle"] and manifest["sampler"]["seed"] == SEED
    keys = [r["k"] for rows in LANDED.values() for r in rows]
    split_of = split_by_the_text(keys)
    for split, entry in manifest["splits"].items():
        stored = [k for s in entry["shards"] for k in pq.read_table(folder / s["path"]).column("k").to_pylist()]
        assert stored == order_by_the_text([k for k in keys if split_of[k] == split], SEED)


def test_validated_rows_keep_their_types_in_every_partition(tiny: dict[str, Any]) -> None:
    """Integers past 2**53 with a null beside them, dates, booleans with nulls: as the meta says."""
    frame = read_validated(tiny["store"], tiny["dataset"])
    meta = dict(frame.dtypes.astype(str))
    assert meta["n"] == "Int64" and meta["b"] == "boolean" and meta["d"].startswith("datetime64")
    for i in range(frame.npartitions):
        assert dict(frame.get_partition(i).compute(scheduler="sync").dtypes.astype(str)) == meta
    rows = frame.compute(scheduler="sync").set_index("k")
    assert rows.loc[101, "n"] == 2**53 + 3 and pd.isna(rows.loc[100, "n"]) and pd.isna(rows.loc[101, "b"])
    assert rows.loc[1, "d"] == pd.Timestamp("2024-01-01")


def test_the_estimate_counts_every_parts_bytes(tmp_path: Path) -> None:
    """Short records beside fewer documents: the documents' part counts at its own size, not at the short
    records' bytes per row (which made one bucket of the whole dataset)."""
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    store.ensure_root()
    parts = {"short.parquet": (20_000, 10), "wide.parquet": (1_000, 20_000)}
    actual = 0
    for name, (rows, width) in parts.items():
        text = [f"{i:08d}".ljust(width, "x") for i in range(rows)]  # distinct: written plain, not as a dictionary
        part = pa.table({"k": np.arange(rows), "doc": text, "_source": [name] * rows, "_row": np.arange(rows)})
        pq.write_table(part, store.path(name), compression="zstd")
        actual += part.nbytes
    measured = measure_parts(store, list(parts), ["k"])
    assert 0.9 * actual <= measured.in_memory <= 1.5 * actual


def staged_part(path: Path, rows: int) -> tuple[str, str]:
    """A validated part in several row groups, with a dictionary column, and its empty delete file."""
    part = pa.table(
        {
            "k": np.arange(rows),
            "cat": pa.array([f"c{i // 600}" for i in range(rows)]),  # other values in each row group
            "_source": ["landing/x/a.jsonl"] * rows,
            "_row": np.arange(1, rows + 1),
        }
    )
    pq.write_table(part, path / "part.parquet", row_group_size=rows // 5)
    pq.write_table(pa.table({"_row": pa.array([], pa.int64())}), path / "q.parquet")
    return str(path / "part.parquet"), str(path / "q.parquet")


def shuffled(path: Path) -> dict[int, list[dict[str, Any]]]:
    """A part scattered into buckets and each bucket gathered: its rows in order, by bucket."""
    path.mkdir()
    part, deletes = staged_part(path, 5_000)
    out = str(path / "scattered.arrow")
    found = scatter_part(part, deletes, 0, out, ["k"], ["cat"], RATIOS, SEED, [3, 1, 1], {})
    schema = pa.schema([("k", pa.int64()), ("cat", pa.string())])
    rows = {}
    for b, (index, n) in found.items():
        gather_bucket([(out, index)], str(path / f"bucket-{b}.arrow"), 1_024, ["k"], {}, schema, 0)
        rows[b] = read_sorted_rows(str(path / f"bucket-{b}.arrow"), 0, n, {}).select(["k", "cat"]).to_pylist()
    return rows


def test_a_shuffle_past_2_gib_of_text_takes_pieces_and_keeps_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Arrow's take of a whole part or bucket joins its chunks, whose text overflows 32-bit offsets past
    2 GiB: such tables are taken a piece at a time (the limit lowered here to a few KB), each piece with the
    one dictionary an IPC file holds, and give the rows a single take gives."""
    whole = shuffled(tmp_path / "whole")
    monkeypatch.setattr(sharding, "take_rows", partial(take_rows, limit=20_000))
    assert shuffled(tmp_path / "pieces") == whole
    assert sum(len(rows) for rows in whole.values()) == 5_000


def test_sorted_staging_keeps_every_row_whatever_the_chunks(tmp_path: Path) -> None:
    rows = 2 * BATCH_ROWS + 5
    values = np.arange(rows)
    table = pa.table(
        {"k": pa.chunked_array([values[:1_000], values[1_000 : BATCH_ROWS + 7], values[BATCH_ROWS + 7 :]])}
    )
    write_sorted(str(tmp_path / "sorted.arrow"), table, {})
    for lo, hi in ((0, rows), (BATCH_ROWS - 3, BATCH_ROWS + 9), (rows - 4, rows)):
        assert read_sorted_rows(str(tmp_path / "sorted.arrow"), lo, hi, {}).column("k").to_pylist() == list(
            range(lo, hi)
        )


def test_row_groups_run_whole_across_buckets_with_the_bytes_of_one_bucket(tmp_path: Path) -> None:
    """A shard that spans buckets has row groups of `group_rows` but for its last, as one bucket gives."""
    schema = pa.schema([pa.field("k", pa.int64(), nullable=False), pa.field("text", pa.string())])
    table = pa.table({"k": np.arange(3_000), "text": [f"w{i % 13}" * (i % 5) for i in range(3_000)]}, schema=schema)
    one = str(tmp_path / "one.arrow")
    write_sorted(one, table, {})
    buckets = []
    for i, (lo, hi) in enumerate(((0, 700), (700, 1_900), (1_900, 3_000))):
        buckets.append((str(tmp_path / f"bucket-{i}.arrow"), 0, hi - lo))
        write_sorted(buckets[-1][0], table.slice(lo, hi - lo), {})
    whole = write_shard([(one, 0, 3_000)], str(tmp_path / "one.parquet"), 1_024, {}, schema, str(tmp_path / "writing"))
    spread = write_shard(buckets, str(tmp_path / "spread.parquet"), 1_024, {}, schema, str(tmp_path / "writing"))
    assert spread["row_groups"] == whole["row_groups"] == [1_024, 1_024, 952]
    assert spread["sha256"] == whole["sha256"]
    sink = pa.BufferOutputStream()
    with sharding.shard_writer(sink, schema) as writer:  # as the shards were written before: one write
        writer.write_table(table, 1_024)
    assert hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest() == whole["sha256"]
