"""Quarantine: rows (or whole files) the pipeline refused, kept with the reason and where they came from."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("_source", pa.string(), nullable=False),
        pa.field("_row", pa.int64()),  # null when the whole file was refused
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("expectations", pa.list_(pa.string())),
        pa.field("record", pa.string()),  # the original values as JSON text
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


def quarantine_rows(
    source: list[str],
    rows: list[int | None],
    reasons: list[str],
    records: list[Any],
    stage: str,
    run_id: str,
    expectations: list[list[str]] | None = None,
) -> pa.Table:
    """One quarantine table for any stage; `records` are dicts or raw text, stored as JSON text."""
    return pa.table(
        {
            "_source": source,
            "_row": rows,
            "stage": [stage] * len(rows),
            "reason": reasons,
            "expectations": expectations or [[] for _ in rows],
            "record": [r if isinstance(r, str) else json.dumps(r, default=str) for r in records],
            "run_id": [run_id] * len(rows),
        },
        schema=QUARANTINE_SCHEMA,
    )
