"""A seeded synthetic sensor dataset, written straight into a local store as a published raw generation.

The benchmark needs far more rows than the demo catalogue, in the shape the `validated` stage really
reads: typed Parquet parts with provenance behind a `_current.json` pointer. Each part is generated and
written on its own (vectorised numpy/pyarrow, its own seeded generator), so the generator never holds
more than one part, and the same (rows, seed) always gives the same bytes. A row looks like an IoT uplink:
the device's hardware id and the raw frame ride along with the decoded readings, which is what makes a
reading ~250 bytes in memory. About one row in a thousand breaks a row expectation, so quarantine is
exercised.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aifactory_assets.catalog import Dataset
from aifactory_assets.parquet_io import write_parquet
from aifactory_assets.publish import current, generation_prefix, publish
from aifactory_assets.schema import ROW, SOURCE, arrow_schema
from benchmarks import code_digest
from resources.object_store import ObjectStore

NAME = "bench_sensor_readings"
PART_ROWS = 100_000  # one landed file; the raw stage writes one part per file
# Chance that a row breaks one given column; seven columns can break, so ~0.1% of rows are quarantined.
BREAK_RATE = 0.00015
PAYLOAD_BYTES = 24
SITES = ("barcelona", "bissen", "bologna", "stuttgart", "linkoping", "kajaani", "athens")
KINDS = ("thermometer", "hygrometer", "anemometer", "barometer")
SENSORS = pa.array(
    [f"{SITES[i % 7]}/station-{i // 7 % 1000:03d}/{KINDS[i % 4]}-{i:04d}" for i in range(2_000)], pa.string()
)
# The hardware id of each sensor's device: a fixed fleet, the same whatever the seed.
DEVICES = pa.array(
    [
        str(uuid.UUID(bytes=b.tobytes(), version=4))
        for b in np.random.default_rng(0).integers(0, 256, (2_000, 16), np.uint8)
    ]
)
HEX = np.array([f"{b:02x}".encode() for b in range(256)], dtype="S2")
STATUSES = pa.array(["ok", "degraded", "calibrating", "offline"], pa.string())
STATUS_WEIGHTS = (0.9, 0.05, 0.03, 0.02)
START = np.datetime64("2024-01-01T00:00:00", "us")
YEAR = np.timedelta64(366 * 86_400 * 10**6, "us")

DATASET = Dataset.model_validate(
    {
        "name": NAME,
        "sector": "climate",
        "site": "kajaani",
        "description": "Synthetic sensor readings for the validation benchmark.",
        "owner": "team:benchmarks",
        "source": {"format": "parquet", "landing": "*.parquet"},
        "schema": {
            "key": ["id"],
            "columns": [
                {"name": "id", "type": "int64", "nullable": False},
                {"name": "device", "type": "string", "nullable": False},
                {"name": "sensor", "type": "string", "nullable": False},
                {"name": "reading_time", "type": "timestamp", "nullable": False},
                {"name": "temperature", "type": "float64", "nullable": False},
                {"name": "humidity", "type": "float64"},
                {"name": "status", "type": "string", "nullable": False},
                {"name": "count", "type": "int64", "nullable": False},
                {"name": "payload", "type": "string", "nullable": False},
            ],
        },
        "suite": f"suites/{NAME}.json",
    }
)


def _expectation(kind: str, severity: str = "critical", **kwargs: Any) -> dict[str, Any]:
    return {"type": kind, "kwargs": kwargs, "meta": {"severity": severity}}


def make_suite(rows: int) -> dict[str, Any]:
    """Nine row expectations (seven of them broken by some rows), one table and four non-decomposable ones."""
    return {
        "name": NAME,
        "expectations": [
            _expectation("expect_table_row_count_to_be_between", min_value=rows, max_value=rows),
            _expectation("expect_column_values_to_not_be_null", column="id"),
            _expectation(
                "expect_column_values_to_match_regex", column="sensor", regex=r"^[a-z]+/station-\d{3}/[a-z]+-\d{4}$"
            ),
            _expectation(
                "expect_column_values_to_be_between",
                column="reading_time",
                min_value="2024-01-01T00:00:00",
                max_value="2025-01-01T00:00:00",
            ),
            _expectation("expect_column_values_to_be_between", column="temperature", min_value=-60, max_value=60),
            _expectation("expect_column_values_to_not_be_null", "warning", column="humidity", mostly=0.99),
            _expectation("expect_column_values_to_be_between", column="humidity", min_value=0, max_value=100),
            _expectation("expect_column_values_to_be_in_set", column="status", value_set=STATUSES.to_pylist()),
            _expectation("expect_column_values_to_be_between", column="count", min_value=0, max_value=10_000),
            _expectation("expect_column_value_lengths_to_equal", column="payload", value=2 * PAYLOAD_BYTES),
            _expectation("expect_column_values_to_be_unique", column="id"),
            _expectation("expect_column_median_to_be_between", column="temperature", min_value=10, max_value=14),
            _expectation(
                "expect_column_unique_value_count_to_be_between", column="sensor", min_value=1000, max_value=5000
            ),
            _expectation("expect_column_mean_to_be_between", column="humidity", min_value=55, max_value=65),
        ],
    }


def source_key(index: int) -> str:
    """The landed file part `index` stands for, as the raw stage records it in `_source` and the ledger."""
    return f"landing/{NAME}/readings-{index:05d}.parquet"


def make_part(seed: int, index: int, rows: int) -> pa.Table:
    """Part `index`: ids are unique across parts, shuffled within one; provenance names a landed file."""
    rng = np.random.default_rng([seed, index])

    def broken() -> np.ndarray:
        return rng.random(rows) < BREAK_RATE

    reading_time = START + (rng.random(rows) * YEAR).astype("timedelta64[us]")
    reading_time[broken()] = np.datetime64(0, "us")  # a clock that lost its time reads 1970
    temperature = rng.normal(12.0, 8.0, rows).round(2)
    temperature[broken()] = 999.0  # the classic sentinel
    count = rng.poisson(20, rows)
    count[broken()] = -1
    payload = HEX[rng.integers(0, 256, (rows, PAYLOAD_BYTES), dtype=np.uint8)].view(f"S{2 * PAYLOAD_BYTES}").ravel()
    payload = pa.array(payload).cast(pa.string())
    which = pa.array(rng.integers(0, len(SENSORS), rows))
    table = {
        "id": index * PART_ROWS + rng.permutation(rows),
        "device": DEVICES.take(which),
        "sensor": pc.if_else(broken(), "SENSOR?", SENSORS.take(which)),
        "reading_time": reading_time,
        "temperature": temperature,
        "humidity": pa.array(rng.uniform(20.0, 100.0, rows).round(1), mask=broken()),
        "status": pc.if_else(broken(), "UNKNOWN", STATUSES.take(rng.choice(len(STATUSES), rows, p=STATUS_WEIGHTS))),
        "count": count,
        "payload": pc.if_else(broken(), pc.utf8_slice_codeunits(payload, 0, PAYLOAD_BYTES), payload),  # truncated
        SOURCE: pa.array([source_key(index)] * rows, pa.string()),
        ROW: np.arange(rows),
    }
    return pa.table(table).cast(arrow_schema(DATASET))


@dataclass(frozen=True)
class Synthetic:
    store: ObjectStore
    dataset: Dataset
    suite: dict[str, Any]
    raw: dict[str, Any]  # the published raw record, with the in-memory sizes measured at generation
    generated_s: float | None  # None when the cached copy was used


def ensure(workdir: Path, rows: int, seed: int) -> Synthetic:
    """The published raw generation for (rows, seed) under `workdir`, generated only if missing."""
    code = code_digest(make_part, write_parquet, arrow_schema, publish)  # what makes, writes and publishes the parts
    store = ObjectStore(
        site="bench", root=str((workdir / f"{NAME}-rows={rows}-seed={seed}-part={PART_ROWS}-code={code}").resolve())
    )
    raw, took = current(store, f"raw/{NAME}"), None
    if raw is None:
        started = time.perf_counter()
        gen = generation_prefix(f"raw/{NAME}", f"synthetic-seed={seed}")
        parts, ledger, arrow_bytes, pandas_bytes = [], [], 0, 0
        for index, first in enumerate(range(0, rows, PART_ROWS)):
            n = min(PART_ROWS, rows - first)
            table = make_part(seed, index, n)
            parts.append(f"{gen}/part-{index:05d}.parquet")
            write_parquet(table, store.url(parts[-1]), store.storage_options)
            ledger.append({"source": source_key(index), "rows_read": n, "rows_valid": n, "rows_quarantined": 0})
            arrow_bytes += table.nbytes
            pandas_bytes += int(table.to_pandas(date_as_object=False).memory_usage(deep=True).sum())
        record = {
            "parts": parts,
            "part_sources": [entry["source"] for entry in ledger],
            "ledger": ledger,
            "rows_read": rows,
            "rows_valid": rows,
            "rows_quarantined": 0,
            "seed": seed,
            "arrow_bytes": arrow_bytes,
            "pandas_bytes": pandas_bytes,
        }
        raw = publish(store, f"raw/{NAME}", f"synthetic-seed={seed}", record, lambda _: True)  # only writer
        took = time.perf_counter() - started
    return Synthetic(store, DATASET, make_suite(rows), raw, took)
