"""The CSV fast path (pyarrow straight into the declared types) gives exactly what the robust path gives,
and steps aside whenever the robust path would judge a value differently."""

from __future__ import annotations

import datetime as dt
import io
import json
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aifactory_assets.catalog import Catalog, Column, Dataset
from aifactory_assets.demo import encode
from aifactory_assets.demo_sources import DEMO_SOURCES
from aifactory_assets.landing import UnreadableFile, read_landed
from aifactory_assets.schema import JsonNumber, coerce_column, coerce_frame
from tests.bad_inputs import COLUMNS


def robust(data: bytes, dataset: Dataset) -> tuple[pa.Table, list[int]]:
    landed = read_landed(data, dataset, fast=False)
    typed, reasons = coerce_frame(landed.values, dataset)
    assert reasons.isna().all()
    return typed, landed.rows


@pytest.mark.parametrize("name", ["breast_cancer_wisconsin", "palmer_penguins"])
def test_fast_path_equals_robust_path_on_real_data(catalog: Catalog, name: str) -> None:
    dataset = catalog.datasets[name]
    data = encode(DEMO_SOURCES[name](), dataset)
    fast = read_landed(data, dataset)
    assert fast.typed is not None, "a clean file takes the fast path"
    table, rows = robust(data, dataset)
    assert fast.typed.equals(table)
    assert list(fast.rows) == list(rows)


CORPUS = Dataset.model_validate(
    {
        "name": "fast_path",
        "sector": "climate",
        "site": "kajaani",
        "description": "d",
        "owner": "team:test",
        "source": {"format": "csv", "landing": "*.csv"},
        "schema": {"key": ["id"], "columns": COLUMNS},
        "suite": "s.json",
    }
)
HEADER = b"id,name,amount,day,flag\n"


@pytest.mark.parametrize(
    "body",
    [
        b"1,a,1.5,2024-01-05,true\n2,b,,,\n",  # nulls where allowed
        b'1,"two\nlines",1.5,2024-01-05,YES\n2,b,2,2024-01-06,n\n',  # quoted newline, bool words
        b"1,a,1.5,2024-01-05,true\n2,b,2.0\n3,c,3,2024-01-07,false\n",  # a short row: quarantined, rest fast
        b" 4 ,a, 1.0 ,2024-01-05,true\n",  # padded numbers: both paths read them
        b"00000000000000000004,a,1.0,2024-01-05,true\n",  # zero-padded past 19 characters
        b"1,1920x1080,1.0,2024-01-05,true\n2,ab0x1f,2.0,2024-01-06,false\n",  # 0x inside text: no hex
    ],
)
def test_fast_path_agrees_on_clean_values(body: bytes) -> None:
    fast = read_landed(HEADER + body, CORPUS)
    assert fast.typed is not None
    table, rows = robust(HEADER + body, CORPUS)
    assert fast.typed.equals(table) and list(fast.rows) == list(rows)


@pytest.mark.parametrize(
    "body",
    [
        b"1,a,NaN,2024-01-05,true\n",  # pyarrow reads NaN; we refuse it
        b"1,a,inf,2024-01-05,true\n",
        b"1,  ,1.0,2024-01-05,true\n",  # a padded empty string is null
        b",a,1.0,2024-01-05,true\n",  # null in a non-nullable column
        b"1,a,1.0,01/05/2024,true\n",  # not ISO
        b"1,Jos\xe9,1.0,2024-01-05,true\n",  # not UTF-8
        b"0x10,a,1.0,2024-01-05,true\n",  # pyarrow reads hex (0xFFFFFFFFFFFFFFFF as -1); we refuse it
        b'1,a,1.0,2024-01-05,true\n 0X10,b,1.0,2024-01-05,true\n"0x10",c,1.0,2024-01-05,true\n',  # as it does these
    ],
)
def test_anything_doubtful_takes_the_robust_path(body: bytes) -> None:
    assert read_landed(HEADER + body, CORPUS).typed is None


@pytest.mark.parametrize("delimiter", ["\t", " ", ";"])
def test_hex_after_any_delimiter_takes_the_robust_path(delimiter: str) -> None:
    """A tab or a space delimiter is also a blank that may pad a field: it still ends the field before (the
    integer column second here, so that a delimiter, not a line's start, comes before it)."""
    options = CORPUS.source.options.model_copy(update={"delimiter": delimiter})
    declared = CORPUS.model_copy(update={"source": CORPUS.source.model_copy(update={"options": options})})
    lines = [["name", "id", "amount", "day", "flag"], ["a", "1", "1.0", "2024-01-05", "true"]]
    lines.append(["b", "0x10", "1.0", "2024-01-05", "true"])
    data = "".join(delimiter.join(line) + "\n" for line in lines).encode()
    assert read_landed(data, declared).typed is None


@pytest.mark.parametrize("fast", [True, False])
def test_rows_keep_their_lines_past_blank_lines_and_ignored_columns(fast: bool) -> None:
    """pyarrow numbers records without blank lines, and sees newlines only in the columns it keeps."""
    ignoring = CORPUS.model_copy(update={"source": CORPUS.source.model_copy(update={"extra_columns": "ignore"})})
    data = (
        b"id,name,amount,day,flag,note\n"
        b'1,a,1.5,2024-01-05,true,"a note\nover\nthree lines"\n'
        b"\n"
        b"2,b,2.5,2024-01-06,false,x\n"
        b"\r\n"
        b"3,c,3.5,2024-01-07,true,y\n"
    )
    assert list(read_landed(data, ignoring, fast=fast).rows) == [2, 6, 8]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    "data",
    [
        HEADER + b"1,a,1.5,2024-01-05,true\n\n2,b,2.5,2024-01-06,false",  # no newline after the last line
        HEADER + b'1,"a\rb",1.5,2024-01-05,true\n\n2,b,2.5,2024-01-06,false\n',  # a lone CR is inside a line
    ],
)
def test_rows_keep_their_lines_past_a_blank_line_whatever_ends_the_lines(fast: bool, data: bytes) -> None:
    assert list(read_landed(data, CORPUS, fast=fast).rows) == [2, 4]


@pytest.mark.parametrize("fast", [True, False])
def test_a_row_with_the_wrong_field_count_and_bytes_that_are_not_text_is_quarantined_alone(fast: bool) -> None:
    """pyarrow decodes such a row for its handler, strictly, and would refuse the whole file."""
    data = HEADER + b"1,a,1.5,2024-01-05,true\n2,Jos\xe9,2.0\n3,c,3,2024-01-07,false\n"
    landed = read_landed(data, CORPUS, fast=fast)
    assert list(landed.rows) == [2, 4]
    assert [(b.row, b.reason, b.text) for b in landed.bad] == [(3, "expected 5 fields, found 3", "2,Jos\\xe9,2.0")]
    # Its text keeps its quotes; one left open to the end still starts on its own line.
    data = HEADER + b'1,a,1.5,2024-01-05,true\n2,"Jos\xe9, Jr.","say ""hi"""\n\n3,b,"open\n'
    landed = read_landed(data, CORPUS, fast=fast)
    assert [(b.row, b.text) for b in landed.bad] == [(3, '2,"Jos\\xe9, Jr.","say ""hi"""'), (5, '3,b,"open\n"')]


@pytest.mark.parametrize("first", [b"1,Jane Secretperson,1.5,2024-01-05,true\n", b"Export for jane@example.org\n"])
def test_a_first_line_of_data_is_refused_without_its_values(first: bytes) -> None:
    """A file without a header, or with a title line above it: its first line is data (names, addresses),
    which the refusal would carry into the UI's checks and tables."""
    with pytest.raises(
        UnreadableFile, match="a file without a header, a line above it, or another delimiter"
    ) as refused:
        read_landed(first + HEADER + b"2,b,2.0,2024-01-06,false\n", CORPUS)
    assert "Jane" not in str(refused.value) and "jane@" not in str(refused.value)
    with pytest.raises(UnreadableFile, match=r"\['flag'\] missing; found \['id', 'name', 'amount', 'day', 'flg'\]"):
        read_landed(b"id,name,amount,day,flg\n1,a,1.5,2024-01-05,true\n", CORPUS)  # a header: said as it is


def test_a_row_pyarrow_cannot_decode_prints_no_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow prints its own handler's decoding failure before Python's reader takes the file over: a
    traceback in the worker's log for a file that is read as it should be."""
    printed: list = []
    monkeypatch.setattr(sys, "unraisablehook", printed.append)
    landed = read_landed(HEADER + b"1,a,1.5,2024-01-05,true\n2,Jos\xe9,2.0\n", CORPUS, fast=False)
    assert len(landed.bad) == 1 and printed == []


@pytest.mark.parametrize(
    ("encoding", "name", "bad"), [("cp1252", b"Jos\xe9", b"\x81"), ("utf-8-sig", b"Jos\xc3\xa9", b"\xe9")]
)
def test_a_byte_the_declared_encoding_lacks_quarantines_its_row_only(encoding: str, name: bytes, bad: bytes) -> None:
    """Python transcodes such files for pyarrow, strictly: one such byte refused the whole file."""
    options = CORPUS.source.options.model_copy(update={"encoding": encoding})
    declared = CORPUS.model_copy(update={"source": CORPUS.source.model_copy(update={"options": options})})
    data = HEADER + b"1," + name + b",1.5,2024-01-05,true\n2,x" + bad + b",2.0,2024-01-05,true\n3,c,3,2024-01-07,\n"
    landed = read_landed(data, declared)
    assert list(landed.values["name"]) == ["Jos\u00e9", "c"] and list(landed.rows) == [2, 4]
    assert [(b.row, b.reason) for b in landed.bad] == [(3, f"name: bytes {bad!r} are not valid {encoding}")]


@pytest.mark.parametrize("fast", [True, False])
def test_rows_keep_their_lines_past_a_field_longer_than_pythons_csv_limit(fast: bool) -> None:
    """Python's csv reader, which counts blank lines, stops at fields over 128 KiB unless told otherwise."""
    rest = b",1,2024-01-05,true"
    data = HEADER + b"1," + b"x" * 200_000 + rest + b"\n\n\n2,b" + rest + b"\n3,c,1\n4,d" + rest + b"\n"
    landed = read_landed(data, CORPUS, fast=fast)
    assert list(landed.rows) == [2, 5, 7]
    assert [b.row for b in landed.bad] == [6]


def test_timestamps_are_read_in_utc_whatever_their_offsets() -> None:
    """A file crossing a DST change mixes offsets; values without an offset are taken as UTC."""
    columns = [{"name": "id", "type": "int64"}, {"name": "at", "type": "timestamp"}]
    dataset = CORPUS.model_copy(update={"table": CORPUS.table.model_validate({"key": ["id"], "columns": columns})})
    data = (
        b"id,at\n1,2024-03-31T01:30:00+02:00\n2,2024-03-31T04:30:00+03:00\n3,2024-03-31T00:30:00Z\n4,2024-03-31 00:30\n"
    )
    typed, _ = robust(data, dataset)
    assert [str(t) for t in typed.column("at").to_pylist()] == [
        "2024-03-30 23:30:00",
        "2024-03-31 01:30:00",
        "2024-03-31 00:30:00",
        "2024-03-31 00:30:00",
    ]


def test_timestamps_keep_microseconds_and_float32_its_range() -> None:
    """.NET writes 100 ns ticks: kept to the type's microsecond, not refused (nor the whole file with them);
    1e40 would be float32's infinity."""
    columns = [{"name": "id", "type": "int64"}, {"name": "at", "type": "timestamp"}, {"name": "x", "type": "float32"}]
    dataset = CORPUS.model_copy(update={"table": CORPUS.table.model_validate({"key": ["id"], "columns": columns})})
    typed, reasons = coerce_frame(
        read_landed(
            b"id,at,x\n1,2024-01-05T10:00:00.1234567Z,3.4028235e38\n2,2024-01-05T10:00:00Z,1e40\n", dataset
        ).values,
        dataset,
    )
    assert str(typed.column("at")[0].as_py()) == "2024-01-05 10:00:00.123456"
    assert typed.column("x")[0].as_py() == float(np.finfo(np.float32).max)  # how NumPy writes float32's largest
    assert reasons.iloc[0] is None and "x: '1e40' is not a valid float32" in reasons.iloc[1]


def test_integer_text_is_read_vectorised_to_the_last_int64() -> None:
    """The vectorised path itself (a failure there sends the column down the halving fallback):
    a plus sign, 19 digits, past int64, and digits other than ASCII's."""
    values = pd.Series(
        ["+400", "1234567890123456789", "9223372036854775808", "-9223372036854775808", "١٢"]
        + ["+-5", "-00000000000000000001", "09223372036854775808"],
        dtype="str",
    )
    _, failed, array = coerce_column(values, Column(name="id", type="int64"), frozenset({""}))
    assert array.to_pylist() == [400, 1234567890123456789, None, -(2**63), None, None, -1, None]
    assert failed.tolist() == [False, False, True, False, True, True, False, True]


def test_dates_with_a_zone_format_are_taken_as_written() -> None:
    columns = [{"name": "id", "type": "int64"}, {"name": "day", "type": "date", "format": "%Y-%m-%dT%H:%M:%S%z"}]
    dataset = CORPUS.model_copy(update={"table": CORPUS.table.model_validate({"key": ["id"], "columns": columns})})
    data = b"id,day\n1,2024-01-05T00:00:00+14:00\n2,2024-01-05T00:00:00-05:00\n3,2024-01-05T09:00:00+01:00\n"
    typed, reasons = coerce_frame(read_landed(data, dataset).values, dataset)
    assert [str(d) for d in typed.column("day").to_pylist()[:2]] == ["2024-01-05", "2024-01-05"]
    assert reasons.iloc[2] is not None  # a time of day: not a date


def test_extra_columns_ignored_may_repeat_but_declared_ones_may_not() -> None:
    """Excel writes a trailing comma as an unnamed column, once per comma."""
    ignoring = CORPUS.model_copy(update={"source": CORPUS.source.model_copy(update={"extra_columns": "ignore"})})
    assert list(read_landed(b"id,name,amount,day,flag,,\n1,a,1.5,2024-01-05,true,,\n", ignoring).rows) == [2]
    with pytest.raises(UnreadableFile, match=r"\['amount'\] appear more than once"):
        read_landed(b"id,name,amount,day,flag,amount\n1,a,1.5,2024-01-05,true,2\n", ignoring)


def test_json_numbers_stay_exact_and_nan_is_judged_as_in_csv() -> None:
    jsonl = CORPUS.model_copy(update={"source": CORPUS.source.model_copy(update={"format": "jsonl"})})
    lines = [
        '{"id": 9007199254740993, "name": 1234, "amount": 1.5, "day": "2024-01-05", "flag": true}',
        '{"id": 7, "name": null, "amount": NaN, "day": null, "flag": null}',
        '{"id": null, "name": "no key", "amount": 2.5, "day": null, "flag": null}',
    ]
    landed = read_landed("\n".join(lines).encode(), jsonl)
    typed, reasons = coerce_frame(landed.values, jsonl)
    assert typed.column("id").to_pylist()[:2] == [9007199254740993, 7]  # not through float64 (a null is there)
    assert typed.column("name").to_pylist()[0] == "1234"
    assert reasons.iloc[0] is None and "'NaN' is not a valid float64" in reasons.iloc[1]
    assert "id: null in a non-nullable column" in reasons.iloc[2]


def test_a_parquet_nan_is_judged_as_in_csv_and_a_null_stays_null() -> None:
    parquet = CORPUS.model_copy(update={"source": CORPUS.source.model_copy(update={"format": "parquet"})})
    table = pa.table(
        {
            "id": pa.array([1, 2, 3], pa.int64()),
            "name": ["a", "b", "c"],
            "amount": pa.array([1.5, float("nan"), None], pa.float64()),
            "day": pa.array([None, None, None], pa.string()),
            "flag": pa.array([None, None, None], pa.bool_()),
        }
    )
    data = io.BytesIO()
    pq.write_table(table, data)
    typed, reasons = coerce_frame(read_landed(data.getvalue(), parquet).values, parquet)
    assert reasons.iloc[0] is None and reasons.iloc[2] is None  # the null is a null (the column allows it)
    assert "amount: 'NaN' is not a valid float64" in reasons.iloc[1]
    assert typed.column("amount").to_pylist() == [1.5, None, None]


@pytest.mark.parametrize("format", [None, "ISO8601", "mixed"])
def test_dates_with_mixed_offsets_are_read_as_written_whatever_the_iso_format(format: str | None) -> None:
    """pandas' ISO8601 and mixed take offsets only when every value has the same kind: dropped first, as
    without a format, rather than refuse the whole file."""
    values = pd.Series(["2024-01-01", "2024-01-02T00:00:00+05:00", "2024-01-03T00:00:00-03:00", "junk"])
    _, failed, array = coerce_column(values, Column(name="day", type="date", format=format), frozenset({""}))
    assert failed.tolist() == [False, False, False, True]
    assert [str(d) for d in array.to_pylist()[:3]] == ["2024-01-01", "2024-01-02", "2024-01-03"]


def test_a_json_number_with_a_fraction_is_read_exactly() -> None:
    """pandas writes an integer column with nulls as 5.0: a whole number goes into an integer column, and
    exactly (through float64, 9007199254740993.0 would reach it as ...992); 1.5 does not, nor 1e400, whose
    digits are never spelt out. Text columns take the number as written."""
    jsonl = CORPUS.model_copy(update={"source": CORPUS.source.model_copy(update={"format": "jsonl"})})
    lines = [
        '{"id": 9007199254740993.0, "name": "a", "amount": 1.5, "day": null, "flag": null}',
        '{"id": 5.0, "name": 2.50, "amount": 1e2, "day": null, "flag": null}',
        '{"id": 1.5, "name": "c", "amount": null, "day": null, "flag": null}',
        '{"id": 1e999999999, "name": "d", "amount": null, "day": null, "flag": null}',
        '{"id": 1e1000000000000000000, "name": "e", "amount": null, "day": null, "flag": null}',  # past Decimal's
    ]
    typed, reasons = coerce_frame(read_landed("\n".join(lines).encode(), jsonl).values, jsonl)
    assert reasons.iloc[:2].isna().all()
    assert typed.column("id").to_pylist()[:2] == [9007199254740993, 5]
    assert reasons.iloc[2] == "id: '1.5' is not a valid int64"
    assert reasons.iloc[3] == "id: '1e999999999' is not a valid int64"
    assert reasons.iloc[4] == "id: '1e1000000000000000000' is not a valid int64"
    assert JsonNumber("1e1000000000000000000").as_int() is None  # not an error, which split the column row by row
    assert typed.column("amount").to_pylist()[:2] == [1.5, 100.0] and typed.column("name")[1].as_py() == "2.50"


def test_jsonl_writers_may_omit_a_nullable_column_but_not_a_required_one() -> None:
    """Spark, Go's omitempty and pydantic's exclude_none leave null fields out, in every record if need be."""
    jsonl = CORPUS.model_copy(update={"source": CORPUS.source.model_copy(update={"format": "jsonl"})})
    landed = read_landed(b'{"id": 1, "name": "a"}\n{"id": 2, "name": "b"}\n', jsonl)
    typed, reasons = coerce_frame(landed.values, jsonl)
    assert reasons.isna().all() and typed.column("amount").to_pylist() == [None, None]
    with pytest.raises(UnreadableFile, match=r"\['name'\] missing"):
        read_landed(b'{"id": 1}\n', jsonl)
    ignoring = jsonl.model_copy(update={"source": jsonl.source.model_copy(update={"extra_columns": "ignore"})})
    with pytest.raises(UnreadableFile, match=r"\['amount'\] missing"):  # renamed: it would land as nulls
        read_landed(b'{"id": 1, "name": "a", "amt": 2.0, "day": null, "flag": null}\n', ignoring)


def read_parquet(table: pa.Table, columns: list[dict], null_values: tuple[str, ...] = ("",), **write: bool):
    """`table` written as Parquet (with `write`'s options) and read as `columns`: typed, each row's reason."""
    options = CORPUS.source.options.model_copy(update={"null_values": list(null_values)})
    source = CORPUS.source.model_copy(update={"format": "parquet", "options": options})
    schema = CORPUS.table.model_validate({"key": ["id"], "columns": [{"name": "id", "type": "int64"}, *columns]})
    dataset = CORPUS.model_copy(update={"source": source, "table": schema})
    data = io.BytesIO()
    pq.write_table(table, data, **write)
    typed, reasons = coerce_frame(read_landed(data.getvalue(), dataset).values, dataset)
    return typed, reasons.tolist()


def test_parquet_int96_timestamps_past_2262_keep_their_year() -> None:
    """Spark's and Hive's legacy INT96 stamps, read as nanoseconds, wrapped 9999-12-31 (an SCD's end of time)."""
    far = pa.array([dt.datetime(9999, 12, 31)], pa.timestamp("us"))
    typed, reasons = read_parquet(
        pa.table({"id": [1], "at": far, "day": far}),
        [{"name": "at", "type": "timestamp"}, {"name": "day", "type": "date"}],
        use_deprecated_int96_timestamps=True,
    )
    assert reasons == [None]
    assert typed.to_pylist() == [{"id": 1, "at": dt.datetime(9999, 12, 31), "day": dt.date(9999, 12, 31)}]


def test_parquet_values_declared_text_are_written_as_jsonl_gives_them() -> None:
    """Lists and structs as JSON (numpy's repr cut a list at 1000 items), booleans as JSON's true/false."""
    many = [str(i) for i in range(2000)]
    struct = pa.array([{"k": ["x"], "n": 1}, None, {"k": [], "n": 2}])
    typed, reasons = read_parquet(
        pa.table({"id": [1, 2, 3], "tags": [["a", "b"], many, None], "meta": struct, "ok": [True, False, True]}),
        [{"name": c, "type": "string"} for c in ("tags", "meta", "ok")],
    )
    assert reasons == [None, None, None]
    assert typed.column("tags").to_pylist() == ['["a", "b"]', json.dumps(many), None]
    assert typed.column("meta").to_pylist() == ['{"k": ["x"], "n": 1}', None, '{"k": [], "n": 2}']
    assert typed.column("ok").to_pylist() == ["true", "false", "true"]


def test_parquet_dictionary_text_meets_null_values_and_the_non_nullable_check() -> None:
    """pandas' Categorical lands dictionary-encoded."""
    text = pa.array(["ok", "NA", ""]).dictionary_encode()
    _, reasons = read_parquet(
        pa.table({"id": [1, 2, 3], "s": text}), [{"name": "s", "type": "string", "nullable": False}], ("", "NA")
    )
    assert reasons == [None, "s: null in a non-nullable column", "s: null in a non-nullable column"]


def test_parquet_binary_text_is_read_as_text_in_an_integer_column_too() -> None:
    """Hive writes text without its UTF-8 annotation."""
    typed, reasons = read_parquet(
        pa.table({"id": [1, 2], "n": pa.array([b"5", b"x"], pa.binary())}), [{"name": "n", "type": "int64"}]
    )
    assert typed.column("n").to_pylist() == [5, None]
    assert reasons == [None, "n: \"b'x'\" is not a valid int64"]


@pytest.mark.parametrize("format", [None, "ISO8601", "mixed"])
@pytest.mark.parametrize("kind", ["date", "timestamp"])
def test_a_year_or_a_month_alone_is_no_date(format: str | None, kind: str) -> None:
    """pandas reads them as their first day, whatever the separator."""
    values = pd.Series(["2024", "2024-03", " 2024-3 ", "2024/03", "2024.03", "03/2024", "2024-03-05"])
    _, failed, _ = coerce_column(values, Column(name="day", type=kind, format=format), frozenset({""}))
    assert failed.tolist() == [True] * 6 + [False]


def test_a_format_that_names_no_day_reads_months() -> None:
    """A column whose own format is a month reads them on purpose."""
    _, failed, _ = coerce_column(pd.Series(["2024-03"]), Column(name="m", type="date", format="%Y-%m"), frozenset())
    assert failed.tolist() == [False]
