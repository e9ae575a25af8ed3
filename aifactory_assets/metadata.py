"""What the Dagster UI shows for each materialisation: row counts, the column schema, where data is."""

from __future__ import annotations

from typing import Any

import dagster as dg

from aifactory_assets.catalog import Dataset
from aifactory_assets.schema import ROW, SOURCE
from resources.object_store import ObjectStore


def column_schema(dataset: Dataset, deduplicated: bool) -> dg.TableSchema:
    """The key is unique only once the shards stage has dropped duplicates; before, a key may repeat."""
    key = dataset.table.key
    columns = [
        dg.TableColumn(
            name=c.name,
            type=c.type,
            description=(c.description + (" [PII]" if c.pii else "")).strip() or None,
            constraints=dg.TableColumnConstraints(nullable=c.nullable, unique=deduplicated and key == [c.name]),
            tags={"pii": "true"} if c.pii else {},
        )
        for c in dataset.table.columns
    ]
    columns += [
        dg.TableColumn(SOURCE, "string", description="landed object the row came from"),
        dg.TableColumn(ROW, "int64", description="row number in that object (CSV header = row 1)"),
    ]
    rule = (
        "unique: duplicates dropped, the latest landed record kept"
        if deduplicated
        else "may repeat: duplicates are dropped at the shards stage"
    )
    return dg.TableSchema(columns=columns, constraints=dg.TableConstraints(other=[f"key ({', '.join(key)}) {rule}"]))


def location(store: ObjectStore, key: str) -> dg.MetadataValue:
    url = store.url(key)
    return dg.MetadataValue.url(url) if url.startswith("s3://") else dg.MetadataValue.path(url)


def stage_metadata(
    dataset: Dataset,
    store: ObjectStore,
    key: str,
    rows: int,
    size: int,
    quarantined: int,
    summary: str,
    deduplicated: bool = False,
) -> dict[str, Any]:
    return {
        "dagster/row_count": dg.MetadataValue.int(rows),
        "dagster/column_schema": column_schema(dataset, deduplicated),
        "bytes": dg.MetadataValue.int(size),
        "quarantined_rows": dg.MetadataValue.int(quarantined),
        "location": location(store, key),
        "store": dg.MetadataValue.text(store.display()),
        "site": dg.MetadataValue.text(dataset.site),
        "summary": dg.MetadataValue.md(summary),
    }


def markdown_cell(value: Any) -> str:
    """One line of a table cell: a pipe escaped, a line break (in a quoted CSV field) written as `\\n`."""
    return str(value).replace("|", "\\|").replace("\r", "\\r").replace("\n", "\\n")


TABLE_ROWS = 100  # per table in the UI: a dataset of years of daily drops lists thousands of files


def markdown_table(header: list[str], rows: list[list[Any]], rest: str = "") -> str:
    """The first TABLE_ROWS rows (callers put first what a person should see), then how many are left out
    and `rest`, where all of them are."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows[:TABLE_ROWS]]
    if len(rows) > TABLE_ROWS:
        lines.append(f"\n{len(rows) - TABLE_ROWS} more not shown{rest}")
    return "\n".join(lines)
