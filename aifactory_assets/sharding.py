"""The `shards` stage: dedup by key, split by a stable hash of the key, seeded shuffle, equal-row shards.

Steps, all on the Dask workers, staged through the store so nothing must fit in one process:
1. dedup: shuffle on the key, keep the latest record (the latest landed file, then the last row);
2. split: a stable hash of the key picks the split, so a record never changes split across versions;
3. order: within a split, sort by a seeded hash of the key (a seeded, reproducible global shuffle);
4. shard: cut each sorted split into shards whose row counts differ by at most one.
"""

from __future__ import annotations

import hashlib
import io
import math
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client

from aifactory_assets.catalog import Dataset
from aifactory_assets.parquet_io import open_for_write, read_parquet
from aifactory_assets.schema import ROW, SOURCE, arrow_schema
from resources.object_store import ObjectStore

SEQ, SPLIT, ORDER = "_seq", "_split", "_order"
ROW_GROUP_ROWS = (1_024, 65_536)  # bounds; a split aims at ~1,024 row groups, many more than ranks x workers
SAMPLER = {
    "split": "siphash-2-4 of the key (pandas.util.hash_pandas_object, default hash key) mapped to [0, 1) "
    "and cut by the cumulative split ratios",
    "shuffle": "rows sorted by siphash-2-4 of the key under the seed-derived hash key",
    "dedup": "by key, the record from the latest landed file (mtime, then name) and its last row wins",
}


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def _hash_key(seed: int) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()[:16]


def _key_hash(frame: pd.DataFrame, key: list[str], hash_key: str | None = None) -> np.ndarray:
    kwargs = {"hash_key": hash_key} if hash_key else {}
    return pd.util.hash_pandas_object(frame[key], index=False, **kwargs).to_numpy(dtype=np.uint64)


def assign_splits(frame: pd.DataFrame, key: list[str], ratios: dict[str, float]) -> np.ndarray:
    """Split index per row, from the key alone: stable across versions, independent of the seed."""
    unit = _key_hash(frame, key).astype(np.float64) / float(2**64)
    return np.searchsorted(np.cumsum(list(ratios.values()))[:-1], unit, side="right").astype(np.int8)


def _annotate(frame: pd.DataFrame, key: list[str], ratios: dict[str, float], seed: int) -> pd.DataFrame:
    frame = frame.assign(**{SPLIT: assign_splits(frame, key, ratios)})
    return frame.assign(**{ORDER: _key_hash(frame, key, _hash_key(seed))})


def _dedup(frame: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    return frame.sort_values([SEQ, ROW], kind="stable").drop_duplicates(key, keep="last")


def row_group_rows(split_rows: int) -> int:
    low, high = ROW_GROUP_ROWS
    return min(high, max(low, math.ceil(split_rows / 1_024)))


def write_shard(
    slices: list[tuple[str, int, int]], url: str, storage_options: dict[str, Any], schema: pa.Schema, group_rows: int
) -> dict[str, Any]:
    """Runs on a worker: concatenate row ranges of sorted staging files into one shard, with its checksum."""
    pieces = [read_parquet(part, storage_options).slice(lo, hi - lo) for part, lo, hi in slices]
    table = pa.concat_tables([p.select(schema.names).cast(schema) for p in pieces]) if pieces else schema.empty_table()
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=group_rows, write_statistics=True)
    data = buffer.getvalue()
    fs, path = open_for_write(url, storage_options)
    with fs.open(path, "wb") as f:
        f.write(data)
    meta = pq.ParquetFile(io.BytesIO(data)).metadata
    return {
        "rows": table.num_rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "row_groups": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
    }


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
    source_rank: dict[str, int],
    version_prefix: str,
    staging_prefix: str,
) -> dict[str, Any]:
    """Write every split's shards under `version_prefix`; returns per-split shard entries and counts."""
    options = store.storage_options
    key, ratios = dataset.table.key, dataset.shards.splits
    frame = dd.read_parquet([store.url(p) for p in parts], storage_options=options)
    rows_in = int(frame.shape[0].compute())
    frame = frame.assign(**{SEQ: frame[SOURCE].map(source_rank, meta=(SEQ, "int64"))})
    deduped = frame.shuffle(on=key).map_partitions(_dedup, key)
    annotated = deduped.map_partitions(_annotate, key, ratios, dataset.shards.seed)
    annotated.to_parquet(store.url(f"{staging_prefix}/annotated"), storage_options=options, write_index=False)
    annotated = dd.read_parquet(store.url(f"{staging_prefix}/annotated"), storage_options=options)
    rows_kept = int(annotated.shape[0].compute())

    schema = arrow_schema(dataset)
    splits: dict[str, Any] = {}
    for index, split in enumerate(ratios):
        sorted_prefix = f"{staging_prefix}/sorted/{split}"
        part = annotated[annotated[SPLIT] == index]
        part.sort_values(ORDER).to_parquet(store.url(sorted_prefix), storage_options=options, write_index=False)
        files = [o for o in store.list_objects(sorted_prefix, "*.parquet")]
        files.sort(key=lambda o: int(o.key.rsplit("part.", 1)[-1].split(".")[0]))
        part_rows = [
            (store.url(o.key), pq.ParquetFile(store.fs.open(store.path(o.key))).metadata.num_rows) for o in files
        ]
        rows = sum(n for _, n in part_rows)
        count = shard_count(rows, sum(o.size for o in files), dataset)
        futures = [
            client.submit(
                write_shard,
                plan,
                store.url(f"{version_prefix}/{shard_name(split, i, count)}"),
                options,
                schema,
                row_group_rows(rows),
                key=f"shard-{dataset.name}-{split}-{i}-{version_prefix}",
                pure=False,
            )
            for i, plan in enumerate(plan_shards(part_rows, count))
        ]
        shards = [{"path": shard_name(split, i, count), **entry} for i, entry in enumerate(client.gather(futures))]
        splits[split] = {
            "rows": sum(s["rows"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
            "shards": shards,
        }
    return {"rows_in": rows_in, "duplicates_dropped": rows_in - rows_kept, "splits": splits}
