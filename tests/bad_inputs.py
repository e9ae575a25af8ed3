"""The bad-input corpus: every kind of broken landed file we promise an outcome for, built as bytes.

Each case names its file, its bytes, and the documented outcome (README, "What happens to bad input"):
rows read, valid and quarantined, and for refused files the reason. The files are generated rather than
committed so that binary, zero-byte and 10 MB cases stay reviewable.
"""

from __future__ import annotations

import io
import lzma
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

HEADER = "id,name,amount,day,flag\n"
COLUMNS = [
    {"name": "id", "type": "int64", "nullable": False},
    {"name": "name", "type": "string", "nullable": False},
    {"name": "amount", "type": "float64", "nullable": True},
    {"name": "day", "type": "date", "nullable": True},
    {"name": "flag", "type": "bool", "nullable": True},
]
SUITE = {
    "name": "corpus",
    "expectations": [
        {
            "type": "expect_column_values_to_be_between",
            "kwargs": {"column": "amount", "min_value": 0, "max_value": 1000},
            "meta": {"severity": "warning"},
        },
        {
            "type": "expect_column_value_lengths_to_be_between",
            "kwargs": {"column": "name", "max_value": 100},
            "meta": {"severity": "warning"},
        },
    ],
}
HUGE = "x" * (10 * 2**20)


def good_frame(start: int, rows: int = 3) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": range(start, start + rows),
            "name": [f"item {i}" for i in range(start, start + rows)],
            "amount": [10.5 * (i + 1) for i in range(rows)],
            "day": pd.to_datetime(["2024-01-05"] * rows).date,
            "flag": [True, False, True][:rows] + [True] * max(0, rows - 3),
        }
    )


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def csv_bytes(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


@dataclass(frozen=True)
class Case:
    file: str
    data: bytes
    read: int
    valid: int  # rows that reach validated/
    refused: str | None = None  # a phrase of the reason the whole file was refused
    reasons: dict[int, str] = field(default_factory=dict)  # row (line) number -> a phrase of its reason

    @property
    def quarantined(self) -> int:
        return self.read - self.valid


def csv_cases() -> list[Case]:
    return [
        Case("good.csv", csv_bytes(good_frame(1)), read=3, valid=3),
        Case(
            "malformed_lines.csv",
            (
                HEADER
                + "10,a,1.0,2024-01-05,true\n11,b,2.0\n12,c,3.0,2024-01-05,true,extra\n13,d,4.0,2024-01-05,false\n"
            ).encode(),
            read=4,
            valid=2,
            reasons={3: "expected 5 fields, found 3", 4: "expected 5 fields, found 6"},
        ),
        Case(
            "short_row_not_utf8.csv",  # pyarrow refused the whole file, quoting the row in its reason
            (HEADER + "360,a,1.0,2024-01-05,true\n").encode() + b"361,Jos\xe9,2.0\n362,c,3.0,2024-01-05,true\n",
            read=3,
            valid=2,
            reasons={3: "expected 5 fields, found 3"},
        ),
        Case("bom.csv", b"\xef\xbb\xbf" + csv_bytes(good_frame(20)), read=3, valid=3),
        Case(
            "latin1.csv",
            (HEADER + "30,ok,1.0,2024-01-05,true\n").encode() + b"31,Jos\xe9,2.0,2024-01-05,true\n",
            read=2,
            valid=1,
            reasons={3: "not valid utf-8"},
        ),
        Case("semicolons.csv", csv_bytes(good_frame(40)).replace(b",", b";"), read=0, valid=0, refused="missing"),
        Case(
            "quoted_newlines.csv",
            (
                HEADER
                + '50,"two\nlines",1.0,2024-01-05,true\n'
                + '51,"three\nlines\nhere",-5,2024-01-05,true\n'
                + "52,c,1.0,2024-01-05\n"
            ).encode(),
            read=3,
            valid=1,
            reasons={4: "expect_column_values_to_be_between(amount)", 7: "expected 5 fields, found 4"},
        ),
        Case(
            "numbers.csv",
            (
                HEADER + "60,nan-text,NaN,,true\n61,inf,inf,,\n62,empty-amount,,,\n,no-id,1.0,,\n63,neg,-1e400,,\n"
            ).encode(),
            read=5,
            valid=1,
            reasons={
                2: "'NaN' is not a valid float64",
                3: "'inf' is not a valid float64",
                5: "id: null in a non-nullable column",
                6: "'-1e400' is not a valid float64",
            },
        ),
        Case(
            "dates.csv",
            (
                HEADER + "70,iso,1.0,2024-01-05,yes\n71,us,1.0,01/05/2024,no\n72,bad-month,1.0,2024-13-01,maybe\n"
            ).encode(),
            read=3,
            valid=1,
            reasons={3: "'01/05/2024' is not a valid date", 4: "'maybe' is not a valid bool"},
        ),
        Case(
            "blank_lines.csv",
            (HEADER + "\n340,a,1.0,2024-01-05,true\n\r\n\n341,b,2.0\n342,c,-5,2024-01-05,true\n").encode(),
            read=3,
            valid=1,
            reasons={6: "expected 5 fields, found 3", 7: "expect_column_values_to_be_between(amount)"},
        ),
        Case("header_only.csv", HEADER.encode(), read=0, valid=0),
        Case("zero_bytes.csv", b"", read=0, valid=0, refused="empty file (0 bytes)"),
        Case(
            "mac_line_ends.csv",
            csv_bytes(good_frame(335)).replace(b"\r\n", b"\r").replace(b"\n", b"\r"),
            read=0,
            valid=0,
            refused="lines must end in LF or CRLF",
        ),
        Case(
            "drift_missing.csv",
            b"id,name,amount,day\n80,a,1.0,2024-01-05\n",
            read=0,
            valid=0,
            refused="['flag'] missing",
        ),
        Case(
            "drift_extra.csv",
            b"id,name,amount,day,flag,colour\n81,a,1.0,2024-01-05,true,red\n",
            read=0,
            valid=0,
            refused="undeclared column(s) ['colour']",
        ),
        Case(
            "huge_field.csv",
            (HEADER + f"90,{HUGE},1.0,2024-01-05,true\n91,small,1.0,2024-01-05,true\n").encode(),
            read=2,
            valid=1,
            reasons={2: "expect_column_value_lengths_to_be_between(name)"},
        ),
        Case(
            "truncated.csv",
            (HEADER + "100,a,1.0,2024-01-05,true\n101,b,2.0,2024-0").encode(),
            read=2,
            valid=1,
            reasons={3: "expected 5 fields, found 4"},
        ),
        Case(
            "really_parquet.csv",
            parquet_bytes(good_frame(110)),
            read=0,
            valid=0,
            refused="Parquet content, not a CSV file",
        ),
        Case(
            "stray_nul.csv",  # one NUL in a value, up front (where a binary file's would be) and further on
            (
                HEADER
                + "7000,a\x00b,1.0,2024-01-05,true\n"
                + "".join(f"{n},ok,1.0,2024-01-05,true\n" for n in range(7001, 7301))
                + "7301,c\x00,1.0,2024-01-05,true\n"
            ).encode(),
            read=302,
            valid=300,
            reasons={2: "name: a NUL byte (\\x00) in its value", 303: "name: a NUL byte (\\x00) in its value"},
        ),
        Case(
            "excel_unicode_text.csv",  # Excel's "Unicode Text": UTF-16 with a byte-order mark
            (HEADER + "115,unicode,1.0,2024-01-05,true\n").encode("utf-16"),
            read=0,
            valid=0,
            refused="UTF-16 or UTF-32 text (it starts with a byte-order mark), which no encoding the catalogue "
            "takes reads: export the CSV file as UTF-8",
        ),
        Case(
            "int64_edges.csv",
            (
                HEADER
                + "+400,plus,1.0,2024-01-05,true\n"
                + "1234567890123456789,nineteen-digits,1.0,2024-01-05,true\n"
                + "9223372036854775808,past-int64,1.0,2024-01-05,true\n"
            ).encode(),
            read=3,
            valid=2,
            reasons={4: "'9223372036854775808' is not a valid int64"},
        ),
        Case(
            "days_with_times.csv",
            (
                HEADER
                + "410,midnight-far-east,1.0,2024-01-05T00:00:00+14:00,true\n"  # the 5th, as written
                + "411,evening-new-york,1.0,2024-01-05T23:30:00-05:00,true\n"  # a time of day: not a date
                + "412,morning,1.0,2024-01-05T10:00,true\n"
            ).encode(),
            read=3,
            valid=1,
            reasons={3: "'2024-01-05T23:30:00-05:00' is not a valid date", 4: "'2024-01-05T10:00' is not a valid date"},
        ),
        Case(
            "duplicate_header.csv",
            b"id,name,amount,day,flag,amount\n420,a,1.5,2024-01-05,true,999\n",
            read=0,
            valid=0,
            refused="['amount'] appear more than once",
        ),
    ]


def jsonl_cases() -> list[Case]:
    return [
        Case("good.jsonl", good_frame(200).to_json(orient="records", lines=True, date_format="iso").encode(), 3, 3),
        Case(
            "not_json.jsonl",
            b'{"id": 210, "name": "a", "amount": 1.0, "day": "2024-01-05", "flag": true}\n'
            b'{"id": 211, "name": \n'
            b"[1, 2, 3]\n"
            b'{"id": 212, "name": "b\\u00e9", "amount": "12", "day": "2024-01-05", "flag": false}\n'
            b'{"id": 213, "name": "c", "amount": 1.0, "day": "2024-01-05", "flag": true}\n',
            read=5,
            valid=3,
            reasons={2: "not JSON", 3: "not an object"},
        ),
        Case(
            "drift.jsonl",
            b'{"id": 230, "name": "a", "amount": 1.0, "day": "2024-01-05", "flag": true, "colour": "red"}\n',
            read=0,
            valid=0,
            refused="undeclared column(s) ['colour']",
        ),
        Case("zero_bytes.jsonl", b"", read=0, valid=0),
        Case(  # a compressed export under the wrong name: JSONL has no header to refuse it by
            "compressed.jsonl",
            lzma.compress(good_frame(240, 400).to_json(orient="records", lines=True, date_format="iso").encode()),
            read=0,
            valid=0,
            refused="xz content, not a JSONL file",
        ),
        Case("encrypted.jsonl", np.random.default_rng(7).bytes(20_000), read=0, valid=0, refused="binary content"),
        Case(
            "odd_values.jsonl",
            b'{"id": 430, "name": {"first": "A"}, "amount": 1.0, "day": "2024-01-05", "flag": true}\n'
            b'{"id": 431, "name": "b", "amount": true, "day": "2024-01-05", "flag": true}\n'
            b'{"id": 1e20, "name": "c", "amount": 1.0, "day": "2024-01-05", "flag": true}\n'
            b'{"id": 18446744073709551616, "name": "d", "amount": 1.0, "day": "2024-01-05", "flag": true}\n'
            b'{"id": 432, "name": "\\ud800", "amount": 1.0, "day": "2024-01-05", "flag": true}\n',
            read=5,
            valid=1,
            reasons={
                2: "amount: 'True' is not a valid float64",
                3: "id: '1e20' is not a valid int64",  # as written
                4: "id: '18446744073709551616' is not a valid int64",
                5: "is not a valid string",  # a lone surrogate (an emoji cut in half): no UTF-8 for it
            },
        ),
        Case(
            "long_not_json.jsonl",
            b'{"id": 440, "name": "' + b"x" * 20_000 + b"\n",
            read=1,
            valid=0,
            reasons={1: "not JSON"},
        ),
        Case(
            "bad_bytes.jsonl",
            b'{"id": 220, "name": "ok", "amount": 1.0, "day": "2024-01-05", "flag": true}\n'
            b'{"id": 221, "name": "Jos\xe9", "amount": 1.0, "day": "2024-01-05", "flag": true}\n',
            read=2,
            valid=1,
            reasons={2: "are not valid utf-8"},
        ),
    ]


def parquet_cases() -> list[Case]:
    good = parquet_bytes(good_frame(300))
    typed = good_frame(310).astype({"amount": "str"})
    typed.loc[1, "amount"] = "abc"
    odd_types = pa.table(
        {
            "id": pa.array([450, 2**63 + 5], pa.uint64()),
            "name": pa.array([b"plain", b"\xff"], pa.binary()),  # text without its UTF-8 annotation (Hive)
            "amount": [1.0, 2.0],
            "day": pa.array([1704412800 * 10**9, 1704448800 * 10**9 + 123456789], pa.timestamp("ns")),
            "flag": [True, False],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(odd_types, buffer)
    return [
        Case("good.parquet", good, read=3, valid=3),
        Case(
            "odd_types.parquet",
            buffer.getvalue(),
            read=2,
            valid=1,
            reasons={2: "id: '9223372036854775813' is not a valid int64"},
        ),
        Case("truncated.parquet", good[: len(good) // 2], read=0, valid=0, refused="not a readable Parquet file"),
        Case("really_csv.parquet", csv_bytes(good_frame(320)), read=0, valid=0, refused="not a readable Parquet file"),
        Case("zero_bytes.parquet", b"", read=0, valid=0, refused="not a readable Parquet file (0 bytes)"),
        Case("drift.parquet", parquet_bytes(good_frame(330).drop(columns=["flag"])), 0, 0, refused="['flag'] missing"),
        Case(
            "amount_as_text.parquet", parquet_bytes(typed), read=3, valid=2, reasons={2: "'abc' is not a valid float64"}
        ),
    ]


CORPUS = {
    "corpus_csv": ("csv", csv_cases),
    "corpus_jsonl": ("jsonl", jsonl_cases),
    "corpus_parquet": ("parquet", parquet_cases),
}


def dataset_entry(name: str, fmt: str) -> dict:
    return {
        "name": name,
        "sector": "climate",
        "site": "kajaani",
        "description": f"The bad-input corpus, as {fmt}.",
        "owner": "team:aifactory",
        "source": {"format": fmt, "landing": f"*.{fmt}"},
        "schema": {"key": ["id"], "columns": COLUMNS},
        "suite": "suites/corpus.json",
        "max_quarantined_fraction": 1.0,
    }
