"""The catalogue's column types as Arrow types, and the coercion of landed values into them.

Coercion never raises on a bad value: it reports which rows failed and why, so ingest can quarantine
them and keep the rest. A column whose values break the vectorised path in a way it does not foresee is
judged again in halves, down to the values that break it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa

from aifactory_assets.catalog import PANDAS_FORMATS, Column, Dataset

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
# A date's own offset is dropped, not converted: "2024-01-05T00:00:00+14:00" is the 5th, as written.
OFFSET = r"(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)\s*(?:Z|[+-]\d{2}(?::?\d{2})?)$"  # after a time of day
# A year, or a year and a month (either way round): pandas takes them as their first day.
NO_DAY = r"\s*(?:[0-9]{4}(?:[-/. ][0-9]{1,2})?|[0-9]{1,2}[-/. ][0-9]{4})\s*"
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


def _is_bool(values: pd.Series) -> np.ndarray:
    """JSON's true/false among other values: never a number (pandas would read them as 1 and 0)."""
    if values.dtype != object:
        return np.zeros(len(values), dtype=bool)
    return values.map(lambda v: isinstance(v, bool | np.bool_)).to_numpy(dtype=bool)


def _as_text(value: object) -> str | None:
    """A landed value as text: bytes decoded as UTF-8 (None if they are not), JSON's objects, arrays and
    booleans as JSON, anything else as Python writes it."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, dict | list | bool):
        return json.dumps(value, ensure_ascii=False, default=str)  # Parquet's nested dates and times as text
    return str(value)


def _wall_clock(values: pd.Series, column: Column) -> pd.Series:
    """Date-times as written, without their offsets (naive; unparseable ones NaT)."""
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return values.dt.tz_localize(None) if values.dt.tz is not None else values
    if values.map(lambda v: hasattr(v, "year")).all():
        return pd.Series([pd.Timestamp(v).tz_localize(None) for v in values], index=values.index)
    text = values.astype("str").str.strip()
    if column.format in (None, *PANDAS_FORMATS):  # offsets dropped as written: mixed ones would refuse the file
        text = text.str.replace(OFFSET, r"\1", regex=True)
    elif "%z" in column.format:  # the offset read by the format, then dropped
        return pd.to_datetime(text.map(lambda t: _strptime_as_written(t, column.format)), errors="coerce")
    return pd.to_datetime(_days_only(text, column), errors="coerce", format=column.format or "ISO8601")


def _days_only(text: pd.Series, column: Column) -> pd.Series:
    """Text without a day (a year, a month) as unparseable: it names no date. Not where the column's own
    format reads such text on purpose (`%Y-%m`)."""
    if column.format not in (None, "ISO8601", "mixed"):
        return text
    return text.where(~text.str.fullmatch(NO_DAY).fillna(False).to_numpy(dtype=bool))


def _strptime_as_written(text: str, format: str) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(text, format).replace(tzinfo=None)
    except ValueError:
        return None


def _parse(values: pd.Series, column: Column) -> pd.Series:
    """Parse non-null values; unparseable ones become NaN/NaT (detected by the caller)."""
    kind = column.type
    if pd.api.types.is_bool_dtype(values.dtype) and kind not in ("bool", "string"):
        return pd.Series([None] * len(values), index=values.index, dtype=object)
    if kind.startswith("int"):
        return _parse_int(values, kind)
    if kind.startswith("float"):
        numbers = pd.to_numeric(values, errors="coerce").astype("float64").where(~_is_bool(values))
        # "NaN" and "inf" text is not a number for training: declare such tokens in null_values instead; nor
        # is a value past the type's range (1e40 would be float32's inf; 3.4028235e38 rounds to its largest).
        with np.errstate(over="ignore"):
            in_range = np.isfinite(numbers.to_numpy().astype(ARROW_TYPES[kind].to_pandas_dtype()))
        return numbers.where(in_range)
    if kind == "bool":
        if pd.api.types.is_bool_dtype(values.dtype):
            return values.astype(object)
        text = values.astype("str").str.strip().str.lower()
        return text.map(lambda t: True if t in TRUE_WORDS else (False if t in FALSE_WORDS else None))
    if kind == "date":
        # As written: a date's offset is not converted, and a value with a time of day is not a date.
        stamps = _wall_clock(values, column)
        return stamps.where(stamps == stamps.dt.normalize())
    if kind == "timestamp":
        # In UTC: values with an offset are converted (mixed offsets, e.g. across a DST change, included),
        # values without one are taken as UTC.
        if pd.api.types.is_datetime64_any_dtype(values.dtype) or values.map(lambda v: hasattr(v, "year")).all():
            return pd.to_datetime(values, errors="coerce", utc=True)
        text = _days_only(values.astype("str"), column)
        return pd.to_datetime(text, errors="coerce", utc=True, format=column.format or "ISO8601")
    return values.map(_as_text)  # string


INT_TEXT = r"[+-]?0*[0-9]{1,19}"  # ASCII digits: Python's \d (and int()) also read Arabic-Indic ones
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
INT64_LOW, INT64_HIGH = INT_RANGES["int64"]


class JsonNumber(str):
    """A JSON number with a fraction or an exponent, as written: text to a text column, and to an integer
    column the integer it is exactly, if it is one (pandas writes an integer column with nulls as 5.0;
    through float64, 9007199254740993.0 would lose its last digit)."""

    def as_int(self) -> int | None:
        try:
            exact = decimal.Decimal(self)
        except decimal.InvalidOperation:  # an exponent past Decimal's range (1e1000000000000000000)
            return None
        whole = exact.is_finite() and abs(exact) <= INT64_HIGH + 1 and exact == exact.to_integral_value()
        return int(exact) if whole else None  # bounded first: int() of 1e999999999 would take forever


def _int_or_none(value: object) -> int | None:
    """An exact integer within int64, or None."""
    if isinstance(value, bool | np.bool_):
        number = None
    elif isinstance(value, int | np.integer):
        number = int(value)
    elif isinstance(value, float):
        number = int(value) if value.is_integer() else None
    elif isinstance(value, JsonNumber):
        number = value.as_int()
    else:
        text = (_as_text(value) or "").strip()  # Parquet's binary text decoded, not "b'5'"
        number = int(text) if re.fullmatch(INT_TEXT, text) else None
    return number if number is not None and INT64_LOW <= number <= INT64_HIGH else None


def _parse_int(values: pd.Series, kind: str) -> pd.Series:
    """Exact integers (never through float64, which loses digits past 2**53); out of range -> NA."""
    if pd.api.types.is_unsigned_integer_dtype(values.dtype):
        raw = values.to_numpy()
        fits = raw <= INT64_HIGH
        ints = pd.Series(pd.arrays.IntegerArray(np.where(fits, raw, 0).astype(np.int64), ~fits))
    elif pd.api.types.is_integer_dtype(values.dtype):
        ints = values.astype("Int64")
    elif pd.api.types.is_float_dtype(values.dtype):
        exact = np.isfinite(values) & (values == np.round(values)) & (values.abs() < 2.0**63)
        ints = values.where(exact).astype("Int64")
    elif pd.api.types.is_string_dtype(values.dtype) and values.dtype != object:
        text = values.str.strip()
        whole = text.str.fullmatch(INT_TEXT).fillna(False).to_numpy(dtype=bool).copy()  # pandas' is read-only
        text = text.str.removeprefix("+")  # after the match: "+-5" is no number
        long = whole & (text.str.lstrip("-0").str.len() == 19).fillna(False).to_numpy(dtype=bool)
        whole[long] = [_int_or_none(t) is not None for t in text[long]]  # 19 digits: past int64 or not
        ints = text.where(whole).astype("Int64")
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
        missing, failed, array = _coerce_halving(values, column, null_values)
        bad = failed | (missing & (not column.nullable))
        for i in np.flatnonzero(bad):
            why = (
                f"{column.name}: {str(values.iloc[i])[:80]!r} is not a valid {column.type}"
                if failed[i]
                else f"{column.name}: null in a non-nullable column"
            )
            reasons.iloc[i] = why if reasons.iloc[i] is None else f"{reasons.iloc[i]}; {why}"
        arrays.append(array)
    table = pa.Table.from_arrays(arrays, schema=arrow_schema(dataset, provenance=False).with_metadata(None))
    return table, reasons


def coerce_column(
    values: pd.Series, column: Column, null_values: frozenset[str]
) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Which values are missing, which failed to parse, and the column in its type (both as nulls)."""
    missing = _is_null(values, null_values)
    if (~missing).any():
        parsed = _parse(values.where(~missing, None), column)
    else:
        parsed = pd.Series([None] * len(values), dtype=object)
    failed = ~missing & parsed.isna().to_numpy()
    return missing, failed, _to_arrow(parsed.where(~(missing | failed), None), column)


def _coerce_halving(
    values: pd.Series, column: Column, null_values: frozenset[str]
) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """`coerce_column`, and where a value breaks it in a way it does not foresee, each half again, down to
    that value alone, which fails: a few odd values cost a few vectorised passes, not one per value."""
    try:
        return coerce_column(values, column, null_values)
    except MemoryError:  # the worker, not the data
        raise
    except Exception:
        if len(values) <= 1:
            return (
                np.zeros(len(values), bool),
                np.ones(len(values), bool),
                pa.nulls(len(values), ARROW_TYPES[column.type]),
            )
    middle = len(values) // 2
    halves = [
        _coerce_halving(part.reset_index(drop=True), column, null_values) for part in (values[:middle], values[middle:])
    ]
    return (
        np.concatenate([h[0] for h in halves]),
        np.concatenate([h[1] for h in halves]),
        pa.concat_arrays([h[2] for h in halves]),
    )


def _to_arrow(values: pd.Series, column: Column) -> pa.Array:
    target = ARROW_TYPES[column.type]
    if column.type in ("date", "timestamp"):
        stamps = pd.to_datetime(values, errors="coerce", utc=True).dt.tz_localize(None)  # UTC, as _parse made it
        # The type keeps microseconds: finer digits (.NET's 100 ns ticks, Parquet's nanoseconds) are dropped.
        array = pa.array(stamps.dt.floor("us"), type=pa.timestamp("us"))
        return array.cast(target) if column.type == "date" else array
    if column.type.startswith("int"):
        return pa.array(values.astype("Int64"), type=pa.int64()).cast(target)
    if column.type.startswith("float"):
        return pa.array(values.astype("Float64"), type=pa.float64()).cast(target)
    return pa.array(values.astype(object).where(values.notna(), None).tolist(), type=target)


def nullable_integer(kind: pa.DataType) -> pd.api.extensions.ExtensionDtype | None:
    """Integer columns of the whole dataset as pandas' nullable integers: plain pandas makes a file's with a
    null float64, where ids past 2**53 collide (false duplicates, rounded min, max and sum)."""
    if not pa.types.is_integer(kind):
        return None
    return pd.api.types.pandas_dtype(f"{'U' if pa.types.is_unsigned_integer(kind) else ''}Int{kind.bit_width}")
