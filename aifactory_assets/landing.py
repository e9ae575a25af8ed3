"""Read one landed file (CSV, JSONL or Parquet) into values as landed, with each row's number in the file.

Rows that cannot be read at all (wrong field count, a JSONL line that is not an object) come back as
`BadRow`s instead of stopping the read. Row numbers are what an editor shows: for CSV the header is row 1,
for JSONL the line number, for Parquet the 1-based row index.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from aifactory_assets.catalog import Dataset


@dataclass(frozen=True)
class BadRow:
    row: int
    reason: str
    text: str


@dataclass(frozen=True)
class LandedRows:
    values: pd.DataFrame  # the declared columns, as landed (text for CSV)
    rows: list[int]  # each value row's number in the file
    bad: list[BadRow]
    extra_columns: list[str]


class UnreadableFile(ValueError):
    """The whole file cannot be read (or lacks a declared column); it is quarantined as one unit."""


def read_landed(data: bytes, dataset: Dataset) -> LandedRows:
    reader = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}[dataset.source.format]
    return reader(data, dataset)


def _check_columns(found: list[str], dataset: Dataset) -> list[str]:
    missing = [c for c in dataset.table.names if c not in found]
    if missing:
        raise UnreadableFile(f"schema drift: declared column(s) {missing} missing; found {found}")
    return [c for c in found if c not in dataset.table.names]


def _read_csv(data: bytes, dataset: Dataset) -> LandedRows:
    options = dataset.source.options
    if not data.strip():
        raise UnreadableFile("empty file: no header")
    try:
        first_line = data.split(b"\n", 1)[0].decode(options.encoding).lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"header is not {options.encoding} text: {exc}") from None
    header = next(csv.reader([first_line], delimiter=options.delimiter))
    extra = _check_columns(header, dataset)
    bad: list[BadRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(BadRow(row.number, f"expected {row.expected_columns} fields, found {row.actual_columns}", row.text))
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(encoding=options.encoding, use_threads=False),
            parse_options=pacsv.ParseOptions(
                delimiter=options.delimiter, newlines_in_values=True, invalid_row_handler=on_invalid
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header},
                strings_can_be_null=False,
                include_columns=dataset.table.names,
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise UnreadableFile(f"not readable as CSV ({options.encoding}): {exc}") from None
    bad_numbers = {b.row for b in bad}
    total = table.num_rows + len(bad)
    rows = [n for n in range(2, total + 2) if n not in bad_numbers][: table.num_rows]
    return LandedRows(table.to_pandas(), rows, bad, extra)


def _read_jsonl(data: bytes, dataset: Dataset) -> LandedRows:
    try:
        text = data.decode(dataset.source.options.encoding)
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"not {dataset.source.options.encoding} text: {exc}") from None
    records, rows, bad = [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(BadRow(number, f"not JSON: {exc.msg}", line[:1000]))
            continue
        if not isinstance(record, dict):
            bad.append(BadRow(number, f"a JSON {type(record).__name__}, not an object", line[:1000]))
            continue
        records.append(record)
        rows.append(number)
    found = sorted({k for r in records for k in r})
    extra = [c for c in found if c not in dataset.table.names]
    values = pd.DataFrame.from_records(records, columns=dataset.table.names) if records else _empty(dataset)
    return LandedRows(values.astype(object), rows, bad, extra)


def _read_parquet(data: bytes, dataset: Dataset) -> LandedRows:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UnreadableFile(f"not a readable Parquet file: {exc}") from None
    extra = _check_columns(table.column_names, dataset)
    values = table.select(dataset.table.names).to_pandas()
    return LandedRows(values, list(range(1, table.num_rows + 1)), [], extra)


def _empty(dataset: Dataset) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series([], dtype=object) for name in dataset.table.names})
