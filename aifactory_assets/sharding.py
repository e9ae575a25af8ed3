"""The `shards` stage: dedup by key, split by a stable hash of the key, seeded shuffle, equal-row shards.

A range shuffle through the store, two waves of Dask tasks, so no process ever holds more than one
bucket (about BUCKET_BYTES) and the data is read three times in all:
1. scatter (one task per validated part): hash the key twice, once for the split (stable across
   versions: a record never changes split) and once under the seed (the shuffle order); write each row to
   the bucket of its split and of its order's range. Equal keys land in the same bucket.
2. gather (one task per bucket): drop duplicate keys, the latest landed file and last row winning; sort
   by the seeded order. The buckets of a split, in range order, are the split globally shuffled.
3. shard: cut each split into shards whose row counts differ by at most one.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client

from aifactory_assets.catalog import Dataset
from aifactory_assets.parquet_io import (
    STAGING,
    STAGING_GROUP,
    HashingFile,
    open_for_write,
    read_parquet,
    write_parquet,
)
from aifactory_assets.schema import ROW, arrow_schema
from aifactory_assets.shard_layout import dictionary_columns, row_group_rows, shard_name
from aifactory_assets.tasks import run_tasks
from resources.object_store import ObjectStore

SEQ, ORDER = "_seq", "_order"
BUCKET_BYTES = 64 * 2**20  # in-memory (Arrow) size of one bucket; a gather task peaks near three times that
SAMPLER = {
    "split": "siphash-2-4 of the key (pandas.util.hash_pandas_object, default hash key) mapped to [0, 1) "
    "and cut by the cumulative split ratios",
    "shuffle": "rows sorted by siphash-2-4 of the key under the seed-derived hash key",
    "dedup": "by key, the record from the latest landed file (mtime, then name) and its last row wins",
}


def _hash_key(seed: int) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()[:16]


def _key_hash(frame: pd.DataFrame, key: list[str], hash_key: str | None = None) -> np.ndarray:
    kwargs = {"hash_key": hash_key} if hash_key else {}
    return pd.util.hash_pandas_object(frame[key], index=False, **kwargs).to_numpy(dtype=np.uint64)


def assign_splits(frame: pd.DataFrame, key: list[str], ratios: dict[str, float]) -> np.ndarray:
    """Split index per row, from the key alone: stable across versions, independent of the seed."""
    unit = _key_hash(frame, key).astype(np.float64) / float(2**64)
    return np.searchsorted(np.cumsum(list(ratios.values()))[:-1], unit, side="right").astype(np.int8)


def scatter_part(
    part_url: str,
    seq: int,
    bucket_prefix: str,
    key_columns: list[str],
    ratios: dict[str, float],
    seed: int,
    ranges: list[int],
    storage_options: dict[str, Any],
) -> dict[int, int]:
    """Runs on a worker: split one validated part into bucket fragments; returns rows per bucket."""
    table = read_parquet(part_url, storage_options)
    frame = table.select(key_columns).to_pandas()
    split = assign_splits(frame, key_columns, ratios).astype(np.int64)
    order = _key_hash(frame, key_columns, _hash_key(seed))
    # Monotone in the order (uint64 -> float64 never reorders), so buckets in range order stay sorted.
    per_split = np.array(ranges, dtype=np.int64)[split]
    in_range = np.minimum((order.astype(np.float64) / 2.0**64 * per_split).astype(np.int64), per_split - 1)
    bucket = np.concatenate([[0], np.cumsum(ranges)[:-1]]).astype(np.int64)[split] + in_range
    table = table.append_column(ORDER, pa.array(order, pa.uint64()))
    table = table.append_column(SEQ, pa.array(np.full(table.num_rows, seq, np.int64)))
    # One reorder by bucket, then each bucket is a zero-copy slice (not one filter pass per bucket).
    by_bucket = np.argsort(bucket, kind="stable")
    table, bucket = table.take(pa.array(by_bucket)), bucket[by_bucket]
    ids, starts, sizes = np.unique(bucket, return_index=True, return_counts=True)
    for b, start, size in zip(ids.tolist(), starts.tolist(), sizes.tolist(), strict=True):
        rows = table.slice(start, size)
        write_parquet(rows, f"{bucket_prefix}/bucket={b:05d}/part-{seq:05d}.parquet", storage_options, **STAGING)
    return dict(zip(ids.tolist(), sizes.tolist(), strict=True))


def gather_bucket(
    fragment_urls: list[str], out_url: str, key_columns: list[str], storage_options: dict[str, Any]
) -> tuple[int, int]:
    """Runs on a worker: one bucket's fragments -> deduplicated, sorted by the seeded order.
    Returns (rows kept, bytes written)."""
    table = pa.concat_tables([read_parquet(u, storage_options) for u in fragment_urls])
    order, seq, row = (table.column(c).to_numpy() for c in (ORDER, SEQ, ROW))
    # Latest wins: sort so that, per key, the latest (file, row) comes last; keep the last of each key.
    table = table.take(pa.array(np.lexsort((row, seq, order))))  # the one full copy
    order = table.column(ORDER).to_numpy()
    if table.num_rows > 1 and (order[1:] == order[:-1]).any():  # equal keys have equal order hashes
        frame = table.select(key_columns).to_pandas()
        table = table.filter(pa.array(~frame.duplicated(keep="last").to_numpy()))
    kept = table.drop_columns([SEQ])
    return kept.num_rows, write_parquet(kept, out_url, storage_options, row_group_size=STAGING_GROUP, **STAGING)


def read_rows(url: str, lo: int, hi: int, storage_options: dict[str, Any]) -> pa.Table:
    """Rows [lo, hi) of a Parquet object, reading only the row groups that hold them."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        groups = [i for i in range(len(sizes)) if starts[i] < hi and starts[i + 1] > lo]
        table = parquet.read_row_groups(groups) if groups else parquet.schema_arrow.empty_table()
    return table.slice(lo - int(starts[groups[0]]) if groups else 0, hi - lo)


def write_shard(
    slices: list[tuple[str, int, int]], url: str, group_rows: int, storage_options: dict[str, Any], schema: pa.Schema
) -> dict[str, Any]:
    """Runs on a worker: stream row ranges of sorted buckets into one shard, one range in memory at a time,
    hashing the bytes on their way out (no temporary copy, no reading back). Written in place: the version
    is invisible until its manifest is committed."""
    fs, path = open_for_write(url, storage_options)
    with fs.open(path, "wb") as f:
        out = HashingFile(f)
        with pq.ParquetWriter(
            out, schema, compression="zstd", write_statistics=True, use_dictionary=dictionary_columns(schema)
        ) as writer:
            for part, lo, hi in slices:
                writer.write_table(
                    read_rows(part, lo, hi, storage_options).select(schema.names).cast(schema), group_rows
                )
            if not slices:
                writer.write_table(schema.empty_table())
    with fs.open(path, "rb") as f:
        meta = pq.read_metadata(f)
    return {
        "rows": meta.num_rows,
        "bytes": out.size,
        "sha256": out.digest.hexdigest(),
        "row_groups": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
    }


def footer_rows(store: ObjectStore, key: str) -> int:
    with store.fs.open(store.path(key), "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def in_memory_bytes(store: ObjectStore, parts: list[str]) -> int:
    """What the parts' rows take as Arrow tables: row counts from the footers, bytes per row measured on
    the largest part (footers understate it: dictionary-encoded strings expand in memory)."""
    rows = {p: footer_rows(store, p) for p in parts}
    sample = max(rows, key=rows.get, default=None)
    if sample is None or rows[sample] == 0:
        return 0
    table = read_parquet(store.url(sample), store.storage_options)
    return int(table.nbytes / table.num_rows * sum(rows.values()))


def plan_shards(part_rows: list[tuple[str, int]], shards: int) -> list[list[tuple[str, int, int]]]:
    """Cut the concatenation of sorted parts into `shards` ranges whose sizes differ by at most one."""
    total = sum(n for _, n in part_rows)
    bounds = [(i * total) // shards for i in range(shards + 1)]
    plans: list[list[tuple[str, int, int]]] = []
    for start, stop in zip(bounds, bounds[1:], strict=False):
        plan, offset = [], 0
        for part, n in part_rows:
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                plan.append((part, lo, hi))
            offset += n
        plans.append(plan)
    return plans


def shard_count(rows: int, staged_bytes: int, dataset: Dataset) -> int:
    settings = dataset.shards
    if settings.target_rows:
        return max(1, math.ceil(rows / settings.target_rows))
    return max(1, math.ceil(staged_bytes / settings.target_bytes))


def shard_dataset(
    store: ObjectStore,
    client: Client,
    dataset: Dataset,
    parts: list[str],
    part_seqs: list[int],
    version_prefix: str,
    staging_prefix: str,
) -> dict[str, Any]:
    """Write every split's shards under `version_prefix`; returns per-split shard entries and counts."""
    options = store.storage_options
    key, ratios = dataset.table.key, dataset.shards.splits
    in_memory = in_memory_bytes(store, parts)
    ranges = [max(1, math.ceil(ratio * in_memory / BUCKET_BYTES)) for ratio in ratios.values()]
    first_bucket = np.concatenate([[0], np.cumsum(ranges)]).tolist()
    buckets = store.url(f"{staging_prefix}/fragments")
    seqs = part_seqs  # each part's landed file, in landing order: later files win on duplicate keys
    scattered = run_tasks(
        client,
        scatter_part,
        [store.url(p) for p in parts],
        seqs,
        bucket_prefix=buckets,
        key_columns=key,
        ratios=ratios,
        seed=dataset.shards.seed,
        ranges=ranges,
        storage_options=options,
    )
    rows_in = sum(n for counts in scattered for n in counts.values())
    by_bucket: dict[int, list[str]] = {}
    for seq, counts in zip(seqs, scattered, strict=True):
        for b in counts:
            by_bucket.setdefault(b, []).append(f"{buckets}/bucket={b:05d}/part-{seq:05d}.parquet")
    ordered = sorted(by_bucket)
    gathered = run_tasks(
        client,
        gather_bucket,
        [by_bucket[b] for b in ordered],
        [store.url(f"{staging_prefix}/sorted/bucket={b:05d}.parquet") for b in ordered],
        key_columns=key,
        storage_options=options,
    )
    sorted_rows = dict(zip(ordered, gathered, strict=True))
    # Every split's shards in one wave, so no worker idles while a small split finishes.
    shards: dict[str, list[tuple[str, list[tuple[str, int, int]], int]]] = {}
    for index, split in enumerate(ratios):
        mine = [b for b in ordered if first_bucket[index] <= b < first_bucket[index + 1]]
        part_rows = [(store.url(f"{staging_prefix}/sorted/bucket={b:05d}.parquet"), sorted_rows[b][0]) for b in mine]
        rows = sum(n for _, n in part_rows)
        count = shard_count(rows, sum(sorted_rows[b][1] for b in mine), dataset)
        plans = plan_shards(part_rows, count)
        shards[split] = [(shard_name(split, i, count), plan, row_group_rows(rows)) for i, plan in enumerate(plans)]
    jobs = [job for split_jobs in shards.values() for job in split_jobs]
    written = iter(
        run_tasks(
            client,
            write_shard,
            [plan for _, plan, _ in jobs],
            [store.url(f"{version_prefix}/{name}") for name, _, _ in jobs],
            [group_rows for _, _, group_rows in jobs],
            storage_options=options,
            schema=arrow_schema(dataset),
        )
    )
    splits: dict[str, Any] = {}
    for split, split_jobs in shards.items():
        entries = [{"path": name, **next(written)} for name, _, _ in split_jobs]
        splits[split] = {
            "rows": sum(e["rows"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "shards": entries,
        }
    rows_kept = sum(kept for kept, _ in gathered)
    return {"rows_in": rows_in, "duplicates_dropped": rows_in - rows_kept, "splits": splits}
