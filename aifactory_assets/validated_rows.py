"""What the validated stage passes on: each raw part's rows, less those its quarantine part names.

Validation writes the few rows that fail (to quarantine), never a second copy of the many that pass: the
quarantine part works as a delete file (Iceberg's position deletes, Delta Lake's deletion vectors). A raw
part holds one landed file, and `_row` numbers that file's rows, so `_row` alone names a row.
"""

from __future__ import annotations

from typing import Any

import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from aifactory_assets.catalog import Dataset
from aifactory_assets.parquet_io import read_parquet
from aifactory_assets.publish import require_current
from aifactory_assets.schema import ROW, arrow_schema, nullable_integer
from resources.object_store import ObjectStore


def excluded(table: pa.Table, rows: pa.ChunkedArray) -> pa.ChunkedArray:
    """Which of `table`'s rows a delete file naming `rows` removes: the one rule, which validation also uses
    to count the rows it passes on, so its conservation check sees what the shards will read."""
    return pc.is_in(table.column(ROW), value_set=rows.combine_chunks())


def read_validated_part(
    part_url: str, quarantine_url: str, storage_options: dict[str, Any], read_dictionary: list[str] | None = None
) -> pa.Table:
    table = read_parquet(part_url, storage_options, read_dictionary=read_dictionary)
    rows = read_parquet(quarantine_url, storage_options, columns=[ROW]).column(ROW)
    return table.filter(pc.invert(excluded(table, rows))) if len(rows) else table


def nullable_type(kind: pa.DataType) -> pd.api.extensions.ExtensionDtype | None:
    """Integers as validation reads the whole dataset (a null would make a file's column float64, which
    loses digits past 2**53), booleans likewise nullable (a file's with a null would be objects): the same
    type in every partition, whatever its nulls."""
    return pd.BooleanDtype() if pa.types.is_boolean(kind) else nullable_integer(kind)


def as_frame(table: pa.Table) -> pd.DataFrame:
    """A table as every partition of `read_validated`, and its meta, hold it: dates as datetimes, not
    objects (which Dask takes for text)."""
    return table.to_pandas(types_mapper=nullable_type, date_as_object=False)


def _validated_frame(part_url: str, quarantine_url: str, storage_options: dict[str, Any]) -> pd.DataFrame:
    return as_frame(read_validated_part(part_url, quarantine_url, storage_options))


def stale_validation(valid_record: dict[str, Any], raw_record: dict[str, Any]) -> str | None:
    """Why a validated record no longer passes on the current raw rows, if it does not: raw was published
    again since, and its publish removes the parts the record names (at once, or a publish later)."""
    if valid_record["raw_generation"] == raw_record["generation"]:
        return None
    return (
        f"validated was made from {valid_record['raw_generation']}, not from the current raw generation "
        f"{raw_record['generation']}: materialise validated first"
    )


def read_validated(store: ObjectStore, dataset: Dataset) -> dd.DataFrame:
    """The current validated rows as one Dask DataFrame, a partition per landed file: for a person or a
    notebook, where `dd.read_parquet` would have read a copy."""
    record = require_current(store, f"validated/{dataset.name}", "validated")
    if stale := stale_validation(record, require_current(store, f"raw/{dataset.name}", "raw")):
        raise FileNotFoundError(f"{dataset.name}: {stale}")
    meta = as_frame(arrow_schema(dataset).empty_table())
    if not record["raw_parts"]:
        return dd.from_pandas(meta, npartitions=1)
    return dd.from_map(
        _validated_frame,
        [store.url(p) for p in record["raw_parts"]],
        [store.url(p) for p in record["excluded"]],
        storage_options=store.storage_options,
        meta=meta,
        enforce_metadata=True,
    )
