"""How a split is cut into files and row groups; shared by the writer (`sharding`) and the benchmarks
that generate shards without Dask or Dagster (e.g. on the GPU machine)."""

from __future__ import annotations

import hashlib
import math
import os
from typing import BinaryIO

import numpy as np
import pyarrow as pa

MANIFEST, LATEST = "manifest.json", "_latest"  # a version's commit point; a dataset's pointer to its latest
ROW_GROUP_ROWS = (1_024, 65_536)  # bounds; a split aims at ~1,024 row groups, many more than ranks x workers
# A row group of average rows, decoded, at most: a reader holds one or two per data-loader worker (and two per
# thread reading ahead, `loader.READ_THREADS` at most, where it reads ahead), and rows of
# documents or images (100 KB each) would otherwise make row groups of gigabytes (past Arrow's 2 GiB per text
# column).
ROW_GROUP_BYTES = 64 * 2**20
FOOTER_READ = 64 * 2**10  # a file's tail read at once for its footer, as PyArrow reads it


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


def read_footer(file: BinaryIO) -> bytes:
    """A Parquet file's footer as stored: its metadata, their length and the magic (the last 8 + length
    bytes). One read of the tail where the footer fits it, as PyArrow's own (a ranged request, remotely)."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - FOOTER_READ))
    tail = file.read()
    length = int.from_bytes(tail[-8:-4], "little") + 8
    if len(tail) < length <= size:
        file.seek(size - length)
        tail = file.read(length - len(tail)) + tail
    return tail[-length:]


def shard_entries(manifest: dict) -> list[dict]:
    """Every shard's entry in a version's manifest (path, rows, bytes, checksums), all splits together."""
    return [shard for split in manifest["splits"].values() for shard in split["shards"]]


def schema_fingerprint(schema: pa.Schema) -> str:
    """The manifest's, of the shards' Arrow schema; readers check each shard's footer against it."""
    return hashlib.sha256(schema.remove_metadata().serialize().to_pybytes()).hexdigest()


def take_rows(table: pa.Table, order: np.ndarray, limit: int = 2**31 - 1) -> pa.Table:
    """`table.take(order)`, also where a text or binary column passes 2 GiB (`limit`): Arrow's take joins
    a column's chunks first and its 32-bit offsets overflow. Such a table is taken a piece of `order` at a
    time, each piece gathered from every chunk apart and put in order, and comes as one chunk per piece."""
    if table.nbytes <= limit:
        return table.take(order)
    batches = table.to_batches()  # one chunk layout for every column
    starts = np.cumsum([0] + [b.num_rows for b in batches])
    pieces = []
    for part in np.array_split(order, -(-table.nbytes // (limit // 2))):
        source = np.searchsorted(starts, part, side="right") - 1
        by_source = np.argsort(source, kind="stable")
        taken = [batches[b].take(part[by_source][source[by_source] == b] - starts[b]) for b in np.unique(source)]
        pieces.append(pa.Table.from_batches(taken, table.schema).combine_chunks().take(np.argsort(by_source)))
    return pa.concat_tables(pieces)
