"""How a split is cut into files and row groups; shared by the writer (`sharding`) and the benchmarks
that generate shards without Dask or Dagster (e.g. on the GPU machine)."""

from __future__ import annotations

import math

import pyarrow as pa

MANIFEST, LATEST = "manifest.json", "_latest"  # a version's commit point; a dataset's pointer to its latest
ROW_GROUP_ROWS = (1_024, 65_536)  # bounds; a split aims at ~1,024 row groups, many more than ranks x workers
# A row group of average rows, decoded, at most: a reader holds one or two per data-loader worker (and two per
# thread reading ahead, `loader.READ_THREADS` at most, where it reads ahead), and rows of
# documents or images (100 KB each) would otherwise make row groups of gigabytes (past Arrow's 2 GiB per text
# column).
ROW_GROUP_BYTES = 64 * 2**20


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.parquet"


def row_group_rows(split_rows: int, row_bytes: float = 0.0) -> int:
    """Rows per row group for a split, given its rows' decoded size where known."""
    low, high = ROW_GROUP_ROWS
    rows = min(high, max(low, math.ceil(split_rows / 1_024)))
    return max(1, min(rows, int(ROW_GROUP_BYTES / row_bytes))) if row_bytes > 0 else rows


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary encoding: text and other non-numeric values. Numbers are written plain:
    in row groups this size a float column always fits a dictionary, which then makes the file ~1.5x larger
    and its reads ~1.5x slower (random float32 features, zstd, measured with pyarrow 26)."""
    numeric = (pa.types.is_integer, pa.types.is_floating, pa.types.is_temporal, pa.types.is_decimal)
    return [field.name for field in schema if not any(test(field.type) for test in numeric)]
