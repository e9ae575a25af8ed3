"""Read one landed file (CSV, JSONL or Parquet) into values as landed, with each row's number in the file.

Rows that cannot be read (wrong field count, bytes that are not valid text, a JSONL line that is not an
object) come back as `BadRow`s instead of stopping the read; a file that cannot be read at all raises
`UnreadableFile` and is quarantined whole. Row numbers are what an editor shows: for CSV the header is
row 1 and a record is numbered by the line it starts on (quoted newlines make records span lines), for
JSONL the line number, for Parquet the 1-based row index.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from aifactory_assets.catalog import Dataset, ReaderOptions
from aifactory_assets.schema import ARROW_TYPES, FALSE_WORDS, TRUE_WORDS, JsonNumber, arrow_schema

HEX_LOOKBACK = 64  # bytes before a 0x searched for the start of its field
MAX_BLOCK = 2**31 - 1  # pyarrow's CSV block size limit; a row (e.g. a 10 MB field) must fit in one block
csv.field_size_limit(MAX_BLOCK)  # Python's reader too: its default, 128 KiB, gives up on a long field


@dataclass(frozen=True)
class BadRow:
    row: int
    reason: str
    text: str


@dataclass(frozen=True)
class LandedRows:
    values: pd.DataFrame | None  # the declared columns, as landed (text for CSV); None when `typed` is set
    rows: np.ndarray  # each value row's number (line) in the file
    bad: list[BadRow]
    extra_columns: list[str]
    typed: pa.Table | None = None  # already in the declared types (the clean-file fast path)


class UnreadableFile(ValueError):
    """The whole file cannot be read (or its columns drifted); it is quarantined as one unit."""


MAGIC = {
    b"PAR1": "Parquet",
    b"PK\x03\x04": "zip",  # .xlsx too
    b"\x1f\x8b": "gzip",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"7z\xbc\xaf\x27\x1c": "7z",
    b"\xd0\xcf\x11\xe0": "OLE2 (an old Excel .xls)",
    b"\x89PNG": "PNG",
    b"%PDF": "PDF",
}
# Bytes no text file holds (C0 controls but tab, LF, FF, CR): in compressed or encrypted bytes about 1 in 9.
CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\x0c\r")


def read_landed(data: bytes, dataset: Dataset, fast: bool = True) -> LandedRows:
    """`fast=False` forces the robust CSV path (the tests compare the two)."""
    fmt = dataset.source.format
    if fmt != "parquet":
        refuse_binary(data, fmt)
    if fmt == "csv":
        return _read_csv(data, dataset, fast)
    return {"jsonl": _read_jsonl, "parquet": _read_parquet}[fmt](data, dataset)


def refuse_binary(data: bytes, fmt: str) -> None:
    """A text format with NUL bytes up front is some other kind of file under the wrong extension (a known
    magic number, or control bytes in more than 1% of the first 8 KiB: compressed or encrypted bytes), or
    text in UTF-16 or UTF-32 (Excel's "Unicode Text"), which no encoding the catalogue takes reads. A stray
    NUL in a text export only quarantines its row (`_text_columns`), wherever it falls."""
    head = data[:8192]
    if b"\x00" not in head:
        return
    controls = len(head) - len(head.translate(None, CONTROL_BYTES))
    if controls <= max(1, len(head) // 100) and not head.startswith(tuple(MAGIC)):
        return
    if head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):  # a byte-order mark
        raise UnreadableFile(
            "UTF-16 or UTF-32 text (it starts with a byte-order mark), which no encoding the catalogue takes "
            f"reads: export the {fmt.upper()} file as UTF-8"
        )
    kind = next((name for magic, name in MAGIC.items() if head.startswith(magic)), "binary")
    raise UnreadableFile(f"{kind} content, not a {fmt.upper()} file")


def check_columns(found: list[str], dataset: Dataset, omitted_nulls: bool = False) -> list[str]:
    """Schema drift: a declared column missing refuses the file; an undeclared one too, unless the
    catalogue says `extra_columns: ignore`. Returns the undeclared columns that are ignored.
    `omitted_nulls`: the format's writers leave null fields out (JSONL's do), so only a non-nullable
    column is missing, unless the file holds undeclared ones: then a nullable one in no record was
    likely renamed, and would land as nulls."""
    counts = Counter(found)
    duplicated = [c for c in dataset.table.names if counts[c] > 1]
    if duplicated:  # a reader keeps one of them, silently
        raise UnreadableFile(f"column name(s) {duplicated} appear more than once in the header; found {found}")
    extra = [c for c in found if c not in dataset.table.names]
    may_omit = omitted_nulls and not extra
    missing = [c.name for c in dataset.table.columns if c.name not in found and not (may_omit and c.nullable)]
    if missing and set(dataset.table.names).isdisjoint(found):
        # Not a header: a file without one, or a title line above it. Its cells are data, maybe personal.
        raise UnreadableFile(
            f"schema drift: declared column(s) {missing} missing, none among the {len(found)} found (not shown: "
            "a first line of data would show its values); a file without a header, a line above it, or another "
            "delimiter?"
        )
    if missing:
        raise UnreadableFile(f"schema drift: declared column(s) {missing} missing; found {found}")
    if extra and dataset.source.extra_columns == "refuse":
        raise UnreadableFile(
            f"schema drift: undeclared column(s) {extra}; declare them, or set source.extra_columns: ignore"
        )
    return extra


def _decode(raw: bytes, encoding: str) -> str:
    return raw.decode(encoding, errors="backslashreplace")


def _read_csv(data: bytes, dataset: Dataset, fast: bool) -> LandedRows:
    options = dataset.source.options
    if not data or data.isspace():  # isspace stops at the first other byte; strip copied the file
        raise UnreadableFile(f"empty file ({len(data)} bytes): no header")
    try:
        end = data.find(b"\n")  # not split: it copied the rest of the file (17 ms of a 32 MiB file)
        first_line = data[: end if end >= 0 else len(data)].decode(options.encoding).lstrip("\ufeff").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"header is not {options.encoding} text ({exc.reason}): not a CSV file?") from None
    try:
        header = next(csv.reader([first_line], delimiter=options.delimiter))
    except csv.Error as exc:  # e.g. a classic Mac export: lines end in CR alone, so the file is one "line"
        raise UnreadableFile(f"header line is not CSV ({exc}); lines must end in LF or CRLF") from None
    extra = check_columns(header, dataset)
    fast = _typed_csv(data, dataset) if fast and b"\x00" not in data else None  # NULs: the robust path's to judge
    table, bad, by_python = (*fast, False) if fast else _robust_csv(data, dataset, header)
    newlines = _newlines(table)
    counted = 1 + table.num_rows + len(bad) + int(np.sum(newlines)) + sum(b.text.count("\n") for b in bad)
    # Every other newline is a blank line or inside a column pyarrow dropped: its numbering missed them.
    # Python's reader keeps the last newline in a quote left open to the end: its rows are always counted.
    lines = data.count(b"\n") + (not data.endswith(b"\n"))  # the last line may lack its newline
    starts = record_starts(data, options) if lines > counted or by_python else None
    rows, bad = record_lines(table.num_rows, newlines, bad, starts)
    if fast is not None:
        return LandedRows(None, rows, bad, extra, typed=table)
    values, undecodable = _text_columns(table, options.encoding)
    for i, reason in sorted(undecodable.items()):
        text = options.delimiter.join(_decode(table.column(c)[i].as_py(), "utf-8") for c in table.column_names)
        bad.append(BadRow(rows[i], reason, text))
    keep = np.array([i not in undecodable for i in range(table.num_rows)], dtype=bool)
    return LandedRows(values[keep].reset_index(drop=True), rows[keep], bad, extra)


def _robust_csv(data: bytes, dataset: Dataset, header: list[str]) -> tuple[pa.Table, list[BadRow], bool]:
    """Every cell as bytes, and whether Python's reader read them. pyarrow refuses the whole file when a row
    with the wrong field count is not valid text (it decodes the row for its handler, strictly), as when
    the declared encoding lacks a byte: Python's reader then reads it, such rows quarantined one by one."""
    try:
        return (*_parse_csv(data, dataset, {name: pa.binary() for name in header}, text=False), False)
    except UnreadableFile:
        return (*_python_csv(data, dataset, header), True)


def _python_csv(data: bytes, dataset: Dataset, header: list[str]) -> tuple[pa.Table, list[BadRow]]:
    """What `_parse_csv` gives (records numbered as pyarrow does), read by Python's csv reader: slower,
    but bytes that are not valid text stay in their cells, for `_text_columns` to judge."""
    options = dataset.source.options
    # newline="": a lone CR ends a line outside quotes, as in pyarrow
    reader = csv.reader(io.StringIO(_text(data, options), newline=""), delimiter=options.delimiter)
    next(reader)  # the header
    records: list[list[bytes]] = []
    bad: list[BadRow] = []
    for record in reader:
        if not record:  # a blank line, uncounted as pyarrow does
            continue
        cells = [cell.encode("utf-8", "surrogateescape") for cell in record]
        if len(cells) == len(header):
            records.append(cells)
            continue
        text = (
            _written(record, options.delimiter).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        )
        bad.append(BadRow(2 + len(records) + len(bad), f"expected {len(header)} fields, found {len(cells)}", text))
    kept = {name: header.index(name) for name in dataset.table.names}
    return pa.table({name: pa.array([r[i] for r in records], pa.binary()) for name, i in kept.items()}), bad


def _written(record: list[str], delimiter: str) -> str:
    """A record as CSV again, quoted where its cells need it (a line break too): a quarantined row's text as
    it was landed."""
    line = io.StringIO()
    csv.writer(line, delimiter=delimiter, lineterminator="\r\n").writerow(record)
    return line.getvalue().removesuffix("\r\n")


def _text(data: bytes, options: ReaderOptions) -> str:
    """The file for Python's csv reader, bytes the encoding lacks kept (as surrogates)."""
    return data.decode(options.encoding, "surrogateescape").lstrip("\ufeff")


def _parse_csv(
    data: bytes, dataset: Dataset, column_types: dict[str, pa.DataType], text: bool
) -> tuple[pa.Table, list[BadRow]]:
    """One pyarrow pass; rows with the wrong field count are collected, not fatal. `text` reads values as
    the typed fast path does (null tokens, bool words); otherwise every cell stays raw bytes."""
    options = dataset.source.options
    bad: list[BadRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(BadRow(row.number, f"expected {row.expected_columns} fields, found {row.actual_columns}", row.text))
        return "skip"

    convert = {"column_types": column_types, "include_columns": dataset.table.names}
    if text:
        words = {
            kind: sorted({v for w in words for v in (w, w.upper(), w.capitalize())})
            for kind, words in (("true_values", TRUE_WORDS), ("false_values", FALSE_WORDS))
        }
        convert |= {"null_values": options.null_values, "strings_can_be_null": True, **words}
    else:
        convert |= {"strings_can_be_null": False}
    try:
        with _undecodable_rows_unprinted():
            table = pacsv.read_csv(
                io.BytesIO(data),
                read_options=pacsv.ReadOptions(
                    encoding=options.encoding, use_threads=False, block_size=min(MAX_BLOCK, max(1 << 20, len(data) + 1))
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=options.delimiter, newlines_in_values=True, invalid_row_handler=on_invalid
                ),
                convert_options=pacsv.ConvertOptions(**convert),
            )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise UnreadableFile(f"not readable as CSV ({options.encoding}): {exc}") from None
    return table, bad


@contextlib.contextmanager
def _undecodable_rows_unprinted() -> Iterator[None]:
    """pyarrow decodes a row of the wrong length for its handler, strictly, and prints the failure as an
    unraisable exception (a traceback in the worker's log) before it refuses the file, which `_robust_csv`
    then reads with Python's reader: expected, so not printed. Any other unraisable exception still is."""
    printing = sys.unraisablehook

    def unless_ours(unraisable: Any) -> None:
        if not (
            unraisable.exc_type is UnicodeDecodeError and getattr(unraisable.object, "__name__", "") == "on_invalid"
        ):
            printing(unraisable)

    sys.unraisablehook = unless_ours
    try:
        yield
    finally:
        sys.unraisablehook = printing


def _typed_csv(data: bytes, dataset: Dataset) -> tuple[pa.Table, list[BadRow]] | None:
    """The fast path for clean files: pyarrow parses straight into the declared types. Any value the
    robust path would judge differently (unparseable, non-finite, padded null, null in a non-nullable
    column, a custom date format, timestamps and their zones, hex) sends the file down the robust path."""
    columns = dataset.table.columns
    if any(c.type == "timestamp" or c.format for c in columns):
        return None
    if any(c.type.startswith("int") for c in columns) and _may_hold_hex(data, dataset.source.options.delimiter):
        return None
    try:
        table, bad = _parse_csv(data, dataset, {c.name: ARROW_TYPES[c.type] for c in columns}, text=True)
    except UnreadableFile:
        return None
    nulls = pa.array(dataset.source.options.null_values, pa.string())
    for column in columns:
        values = table.column(column.name)
        if not column.nullable and values.null_count:
            return None
        if column.type.startswith("float") and pc.all(pc.is_finite(values)).as_py() is False:
            return None
        if column.type == "string":
            padded = pc.and_(pc.is_in(pc.utf8_trim_whitespace(values), nulls), pc.invert(pc.is_in(values, nulls)))
            if pc.any(padded).as_py():
                return None
    return table.cast(arrow_schema(dataset, provenance=False)), bad


def _may_hold_hex(data: bytes, delimiter: str) -> bool:
    """pyarrow reads a field that starts 0x1F (after spaces or a quote) into an integer (0xFFFFFFFFFFFFFFFF
    as -1). Most files hold no x at all, which a byte scan finds at memory speed; in the rest each 0x is
    judged by what precedes it, so text such as 1920x1080, or a hash inside a field, costs no robust read."""
    if b"x" not in data and b"X" not in data:
        return False
    field_ends = (b"\n", b"\r", delimiter.encode())
    blanks = bytes(set(b' \t"') - set(delimiter.encode()))  # a tab or a space may be the delimiter itself
    for found in re.finditer(rb"0[xX]", data):
        before = data[max(0, found.start() - HEX_LOOKBACK) : found.start()].rstrip(blanks)
        if not before or before[-1:] in field_ends:  # the file's start (or a long run of blanks): a field's
            return True
    return False


def _newlines(table: pa.Table) -> np.ndarray | int:
    """Newlines inside each record's values (quoted newlines), from text or binary columns."""
    texts = [
        c
        for c in table.column_names
        if pa.types.is_string(table.schema.field(c).type) or pa.types.is_binary(table.schema.field(c).type)
    ]
    return sum(pc.count_substring(table.column(c), "\n").fill_null(0).to_numpy(zero_copy_only=False) for c in texts)


def record_lines(
    good: int, newlines: np.ndarray | int, bad: list[BadRow], starts: np.ndarray | None = None
) -> tuple[np.ndarray, list[BadRow]]:
    """The line each record starts on. pyarrow numbers records (header = 1) and reports only the bad ones,
    so good records fill the gaps; quoted newlines make a record span lines. `starts`, where counted
    (`record_starts`), gives every record's line directly."""
    total = good + len(bad)
    is_bad = np.zeros(total, dtype=bool)
    bad_index = np.array([b.row - 2 for b in bad], dtype=np.int64)
    is_bad[bad_index] = True
    if starts is None or len(starts) != total:
        spans = np.zeros(total, dtype=np.int64)
        spans[~is_bad] = newlines
        spans[bad_index] = [b.text.count("\n") for b in bad]
        starts = 2 + np.concatenate([[0], np.cumsum(1 + spans)[:-1]])
    return starts[~is_bad], [BadRow(int(starts[b.row - 2]), b.reason, b.text) for b in bad]


def record_starts(data: bytes, options: ReaderOptions) -> np.ndarray | None:
    """The line each non-empty record starts on, counted by Python's csv reader, which sees blank lines and
    every column (pyarrow skips blank lines uncounted, and counts quoted newlines only in the columns it
    keeps). Slower than pyarrow, so only for files that need it; None if the reader cannot follow the file."""
    # newline="\n": lines as an editor counts them; a lone CR in a quoted value is no line end
    reader = csv.reader(io.StringIO(_text(data, options), newline="\n"), delimiter=options.delimiter)
    starts = []
    try:
        next(reader)  # the header
        while True:
            start = reader.line_num + 1
            record = next(reader, None)
            if record is None:
                break
            if record:
                starts.append(start)
    except csv.Error:
        return None
    return np.array(starts, dtype=np.int64)


def _text_columns(table: pa.Table, encoding: str) -> tuple[pd.DataFrame, dict[int, str]]:
    """Binary CSV cells (UTF-8, transcoded from `encoding`) as text; the positions of rows with a cell that
    is not valid UTF-8 (bytes `encoding` lacks) or holds a NUL byte, and why."""
    columns, undecodable = {}, {}
    for name in table.column_names:
        column = table.column(name)
        for i in np.flatnonzero(pc.fill_null(pc.match_substring(column, "\x00"), False).to_numpy()):
            undecodable.setdefault(int(i), f"{name}: a NUL byte (\\x00) in its value (a damaged export, or not text)")
        try:
            columns[name] = column.cast(pa.string()).to_pandas()
            continue
        except pa.ArrowInvalid:
            pass
        texts = []
        for i, cell in enumerate(column.to_pylist()):
            try:
                texts.append(cell.decode("utf-8"))
            except UnicodeDecodeError as exc:
                texts.append(None)
                undecodable.setdefault(i, f"{name}: bytes {cell[exc.start : exc.end]!r} are not valid {encoding}")
        columns[name] = pd.Series(texts, dtype=object)
    return pd.DataFrame(columns), undecodable


def _read_jsonl(data: bytes, dataset: Dataset) -> LandedRows:
    encoding = dataset.source.options.encoding
    records, rows, bad = [], [], []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode(encoding).lstrip("\ufeff")
            # Numbers with a fraction or an exponent stay as written (JsonNumber), as NaN / Infinity do:
            # through float64, 9007199254740993.0 would reach an integer column as ...992.
            record = json.loads(line, parse_float=JsonNumber, parse_constant=str)
        except UnicodeDecodeError as exc:
            bad.append(
                BadRow(number, f"bytes {raw[exc.start : exc.end]!r} are not valid {encoding}", _decode(raw, encoding))
            )
            continue
        except json.JSONDecodeError as exc:
            bad.append(BadRow(number, f"not JSON: {exc.msg} (column {exc.colno})", line))
            continue
        if not isinstance(record, dict):
            bad.append(BadRow(number, f"a JSON {type(record).__name__}, not an object", line))
            continue
        records.append(record)
        rows.append(number)
    found = list(dict.fromkeys(k for r in records for k in r))
    extra = check_columns(found, dataset, omitted_nulls=True) if records else []
    # Python objects as parsed: inferring dtypes would turn an integer column with a null into floats
    # (digits past 2**53 lost) and the numbers of a text column into "1234.0".
    values = pd.DataFrame(
        {name: pd.Series([r.get(name) for r in records], dtype=object) for name in dataset.table.names}
    )
    return LandedRows(values, np.array(rows, dtype=np.int64), bad, extra)


def _read_parquet(data: bytes, dataset: Dataset) -> LandedRows:
    try:
        # Legacy INT96 timestamps (Spark, Impala, Hive) in raw's unit: as nanoseconds, past 2262 wraps.
        table = pq.read_table(io.BytesIO(data), coerce_int96_timestamp_unit="us")
    except (pa.ArrowInvalid, OSError) as exc:
        raise UnreadableFile(f"not a readable Parquet file ({len(data)} bytes): {exc}") from None
    extra = check_columns(table.column_names, dataset)
    table = _decoded(table.select(dataset.table.names))
    values = table.to_pandas(integer_object_nulls=True)  # exact, nulls or not
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_nested(column.type):  # lists, structs, maps as Python's, written as JSON (not numpy's repr)
            values[name] = pd.Series(column.to_pylist(), dtype=object)
        elif pa.types.is_floating(column.type):
            # pandas would make a NaN a null; it is a value, judged as the CSV text "NaN" is.
            nan = pc.fill_null(pc.is_nan(column), False).to_numpy(zero_copy_only=False)
            if nan.any():
                values[name] = pd.Series(np.where(nan, "NaN", values[name].to_numpy(dtype=object)), dtype=object)
    return LandedRows(values, np.arange(1, table.num_rows + 1, dtype=np.int64), [], extra)


def _decoded(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns (pandas' Categorical) as their values: as categories, pandas hides them
    from null_values and the non-nullable check."""
    for i, column in enumerate(table.columns):
        if pa.types.is_dictionary(column.type):
            table = table.set_column(i, table.field(i).name, column.cast(column.type.value_type))
    return table
