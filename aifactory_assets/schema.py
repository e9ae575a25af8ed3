"""The catalogue's column types as Arrow types, and the coercion of landed values into them.

Coercion never raises on a bad value: it reports which rows failed and why, so ingest can quarantine
them and keep the rest.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pyarrow as pa

from aifactory_assets.catalog import Column, Dataset

# Provenance columns added at ingest and kept through every stage.
SOURCE, ROW = "_source", "_row"
PROVENANCE = (SOURCE, ROW)

ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us"),
}
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "0"})


def arrow_schema(dataset: Dataset, provenance: bool = True) -> pa.Schema:
    fields = [pa.field(c.name, ARROW_TYPES[c.type], nullable=c.nullable) for c in dataset.table.columns]
    if provenance:
        fields += [pa.field(SOURCE, pa.string(), nullable=False), pa.field(ROW, pa.int64(), nullable=False)]
    return pa.schema(fields)


def _is_null(values: pd.Series, null_values: frozenset[str]) -> np.ndarray:
    missing = values.isna().to_numpy()
    if values.dtype == object or pd.api.types.is_string_dtype(values.dtype):
        text = values.astype("str").str.strip()
        missing = missing | text.isin(list(null_values)).fillna(False).to_numpy(dtype=bool)
    return missing


def _parse(values: pd.Series, column: Column) -> pd.Series:
    """Parse non-null values; unparseable ones become NaN/NaT (detected by the caller)."""
    kind = column.type
    if pd.api.types.is_bool_dtype(values.dtype) and kind != "bool":
        return pd.Series([None] * len(values), index=values.index, dtype=object)
    if kind.startswith("int"):
        return _parse_int(values, kind)
    if kind.startswith("float"):
        numbers = pd.to_numeric(values, errors="coerce").astype("float64")
        # "NaN" and "inf" text is not a number for training: declare such tokens in null_values instead.
        return numbers.where(np.isfinite(numbers))
    if kind == "bool":
        if pd.api.types.is_bool_dtype(values.dtype):
            return values.astype(object)
        text = values.astype("str").str.strip().str.lower()
        return text.map(lambda t: True if t in TRUE_WORDS else (False if t in FALSE_WORDS else None))
    if kind in ("date", "timestamp"):
        # In UTC: values with an offset are converted (mixed offsets, e.g. across a DST change, included),
        # values without one are taken as UTC.
        if pd.api.types.is_datetime64_any_dtype(values.dtype) or values.map(lambda v: hasattr(v, "year")).all():
            return pd.to_datetime(values, errors="coerce", utc=True)
        return pd.to_datetime(values.astype("str"), errors="coerce", utc=True, format=column.format or "ISO8601")
    # string: keep text as is; render other scalars as text (JSON numbers in a string column).
    return values.map(lambda v: v if isinstance(v, str) else str(v))


INT_TEXT = r"[+-]?\d{1,18}"
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}


def _int_or_none(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = str(value).strip()
    return int(text) if re.fullmatch(INT_TEXT, text) else None


def _parse_int(values: pd.Series, kind: str) -> pd.Series:
    """Exact integers (never through float64, which loses digits past 2**53); out of range -> NA."""
    if pd.api.types.is_integer_dtype(values.dtype):
        ints = values.astype("Int64")
    elif pd.api.types.is_float_dtype(values.dtype):
        ints = values.where(np.isfinite(values) & (values == np.round(values))).astype("Int64")
    elif pd.api.types.is_string_dtype(values.dtype) and values.dtype != object:
        text = values.str.strip()
        ints = text.where(text.str.fullmatch(INT_TEXT).fillna(False).astype(bool)).astype("Int64")
    else:
        ints = pd.Series([_int_or_none(v) if v is not None else None for v in values], dtype="Int64")
    low, high = INT_RANGES[kind]
    return ints.where((ints >= low) & (ints <= high))


def coerce_frame(frame: pd.DataFrame, dataset: Dataset) -> tuple[pa.Table, pd.Series]:
    """Cast `frame` (values as landed, possibly text) to the dataset's Arrow schema.

    Returns the typed table of all rows (failed cells as null) and, per row, the failure reason or None.
    """
    null_values = frozenset(dataset.source.options.null_values)
    reasons = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    arrays = []
    for column in dataset.table.columns:
        values = frame[column.name] if column.name in frame else pd.Series([None] * len(frame), dtype=object)
        values = values.reset_index(drop=True)
        missing = _is_null(values, null_values)
        if (~missing).any():
            parsed = _parse(values.where(~missing, None), column)
        else:
            parsed = pd.Series([None] * len(values), dtype=object)
        failed = ~missing & parsed.isna().to_numpy()
        bad = failed | (missing & (not column.nullable))
        for i in np.flatnonzero(bad):
            why = (
                f"{column.name}: {str(values.iloc[i])[:80]!r} is not a valid {column.type}"
                if failed[i]
                else f"{column.name}: null in a non-nullable column"
            )
            reasons.iloc[i] = why if reasons.iloc[i] is None else f"{reasons.iloc[i]}; {why}"
        clean = parsed.where(~(missing | failed), None)
        arrays.append(_to_arrow(clean, column))
    table = pa.Table.from_arrays(arrays, schema=arrow_schema(dataset, provenance=False).with_metadata(None))
    return table, reasons


def _to_arrow(values: pd.Series, column: Column) -> pa.Array:
    target = ARROW_TYPES[column.type]
    if column.type in ("date", "timestamp"):
        stamps = pd.to_datetime(values, errors="coerce", utc=True).dt.tz_localize(None)  # UTC, as _parse made it
        array = pa.array(stamps, type=pa.timestamp("us"))
        return array.cast(target) if column.type == "date" else array
    if column.type.startswith("int"):
        return pa.array(values.astype("Int64"), type=pa.int64()).cast(target)
    if column.type.startswith("float"):
        return pa.array(values.astype("Float64"), type=pa.float64()).cast(target)
    return pa.array(values.astype(object).where(values.notna(), None).tolist(), type=target)
