"""Asset checks computed from what a step wrote: schema, conservation, shards against their manifest."""

from __future__ import annotations

import hashlib

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from aifactory_assets.catalog import Dataset
from aifactory_assets.metadata import location
from aifactory_assets.schema import ARROW_TYPES
from resources.object_store import ObjectStore

SCHEMA_CHECK, CONSERVATION_CHECK = "schema_matches_catalog", "conservation"
SUITE_CHECK, VERIFIED_CHECK = "expectation_suite", "shards_match_manifest"


def parquet_schema(store: ObjectStore, key: str) -> pa.Schema:
    with store.fs.open(store.path(key), "rb") as f:
        return pq.read_schema(f)


def schema_check(dataset: Dataset, store: ObjectStore, key: str | None, expected: pa.Schema) -> dg.AssetCheckResult:
    """Does the Parquet written at `key` carry exactly the catalogue's columns and types?"""
    if key is None:
        return dg.AssetCheckResult(
            check_name=SCHEMA_CHECK, passed=True, metadata={"note": "no part written (every file refused)"}
        )
    found = parquet_schema(store, key)
    mismatches = [
        f"{f.name}: expected {f.type}, found {found.field(f.name).type if f.name in found.names else 'missing'}"
        for f in expected
        if f.name not in found.names or found.field(f.name).type != f.type
    ]
    mismatches += [f"{name}: not in the catalogue" for name in found.names if name not in expected.names]
    expected_types = {c.name: str(ARROW_TYPES[c.type]) for c in dataset.table.columns}
    return dg.AssetCheckResult(
        check_name=SCHEMA_CHECK,
        passed=not mismatches,
        metadata={
            "checked_object": location(store, key),
            "mismatches": "\n".join(mismatches) or "none",
            "expected": dg.MetadataValue.json(expected_types),
        },
    )


def conservation_check(equation: str, left: int, right: dict[str, int]) -> dg.AssetCheckResult:
    """Every row accounted for: `left` must equal the sum of `right`."""
    total = sum(right.values())
    return dg.AssetCheckResult(
        check_name=CONSERVATION_CHECK,
        passed=left == total,
        severity=dg.AssetCheckSeverity.ERROR,
        description=f"{equation}: {left} = {' + '.join(f'{v} {k}' for k, v in right.items())}"
        + ("" if left == total else f" (off by {left - total})"),
        metadata={"left": left, **{k: dg.MetadataValue.int(v) for k, v in right.items()}},
    )


def verify_shards(store: ObjectStore, prefix: str, manifest: dict) -> dg.AssetCheckResult:
    """Re-read every shard of a version: its bytes' checksum and row count must match the manifest."""
    problems, checked = [], 0
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            key = f"{prefix}/{shard['path']}"
            if not store.exists(key):
                problems.append(f"{shard['path']}: missing")
                continue
            data = store.read_bytes(key)
            checked += 1
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                problems.append(f"{shard['path']}: checksum differs from the manifest")
            elif pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows != shard["rows"]:
                problems.append(f"{shard['path']}: row count differs from the manifest")
    return dg.AssetCheckResult(
        check_name=VERIFIED_CHECK,
        passed=not problems,
        description="\n".join(problems) or f"{checked} shard(s) match their checksums and row counts",
        metadata={"shards_checked": checked, "problems": len(problems)},
    )
