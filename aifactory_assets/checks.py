"""Asset checks computed from what a step wrote: schema, conservation, shards against their manifest."""

from __future__ import annotations

import hashlib
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client

from aifactory_assets.catalog import Dataset
from aifactory_assets.ingest import NOT_DATA_PREFIXES
from aifactory_assets.metadata import location, markdown_table
from aifactory_assets.parquet_io import read_footers
from aifactory_assets.schema import ARROW_TYPES
from aifactory_assets.shard_layout import MANIFEST, shard_entries
from aifactory_assets.tasks import run_tasks
from resources.object_store import ObjectStore, filesystem_of

SCHEMA_CHECK, CONSERVATION_CHECK = "schema_matches_catalog", "conservation"
CRITICAL_CHECK, WARNING_CHECK = "critical_expectations", "warning_expectations"
LEDGER_CHECK, VERIFIED_CHECK = "ledger_per_source", "shards_match_manifest"
FILES_CHECK = "landed_files_read"
EXPECTATION_CHECKS = {"critical": CRITICAL_CHECK, "warning": WARNING_CHECK}
# What each check asks, as the UI shows it before any run: per stage where the question differs.
CHECK_DESCRIPTIONS = {
    SCHEMA_CHECK: "Every Parquet file of this stage has exactly the catalogue's columns and types.",
    (SCHEMA_CHECK, "validated"): "Every raw part this stage passes on has exactly the catalogue's columns and "
    "types (the rows that failed are in its quarantine, not in a copy).",
    (CONSERVATION_CHECK, "raw"): "Every row read is accounted for: rows read = written + quarantined.",
    (CONSERVATION_CHECK, "validated"): "Every raw row is accounted for: raw rows = passed on + quarantined.",
    (CONSERVATION_CHECK, "shards"): "Every row read at landing is accounted for: rows read = sharded + "
    "quarantined (at ingest and validation) + duplicates dropped.",
    FILES_CHECK: "Every landed file was read; a refused one (unreadable, a declared column missing) warns, "
    "since its rows are missing downstream until a person looks.",
    CRITICAL_CHECK: "The suite's critical expectations hold; a failure blocks the shards.",
    WARNING_CHECK: "The suite's warning expectations hold; a failure only warns.",
    LEDGER_CHECK: "Per landed file: rows read = passed on + quarantined at ingest + quarantined at validation.",
    VERIFIED_CHECK: "Every shard of the committed version matches the manifest's checksum and row count, "
    "re-read before the commit.",
}


def check_description(name: str, stage: str) -> str:
    return CHECK_DESCRIPTIONS.get((name, stage)) or CHECK_DESCRIPTIONS[name]


def footers(store: ObjectStore, keys: list[str]) -> dict[str, pq.FileMetaData]:
    """Every written Parquet file's footer, by key: a check that reads one file out of many misses the one
    that went wrong."""
    return dict(zip(keys, read_footers([store.url(k) for k in keys], store.storage_options), strict=True))


def schema_check(
    dataset: Dataset, store: ObjectStore, written: dict[str, pq.FileMetaData], expected: pa.Schema
) -> dg.AssetCheckResult:
    """Does every Parquet file a step wrote carry exactly the catalogue's columns and types?"""
    problems: dict[str, list[str]] = {}
    for key, meta in written.items():
        found = meta.schema.to_arrow_schema()
        mismatches = [
            f"{f.name}: expected {f.type}, found {found.field(f.name).type if f.name in found.names else 'missing'}"
            for f in expected
            if f.name not in found.names or found.field(f.name).type != f.type
        ]
        mismatches += [f"{name}: not in the catalogue" for name in found.names if name not in expected.names]
        for mismatch in mismatches:
            problems.setdefault(mismatch, []).append(key)
    expected_types = {c.name: str(ARROW_TYPES[c.type]) for c in dataset.table.columns}
    return dg.AssetCheckResult(
        check_name=SCHEMA_CHECK,
        passed=not problems,
        description="; ".join(f"{m} (in {len(keys)} of {len(written)} files)" for m, keys in problems.items())
        or (f"{len(written)} file(s) match the catalogue" if written else "nothing written to check"),
        metadata={
            "files_checked": len(written),
            "first_mismatching": location(store, next(iter(problems.values()))[0]) if problems else "none",
            "expected": dg.MetadataValue.json(expected_types),
        },
    )


def files_check(ledger: list[dict[str, Any]]) -> dg.AssetCheckResult:
    """Every landed file read: a refused one (unreadable, schema drift) stops no other file, but its rows
    are missing from everything downstream until a person looks, so it warns."""
    refused = [e for e in ledger if "file_error" in e]
    return dg.AssetCheckResult(
        check_name=FILES_CHECK,
        passed=not refused,
        severity=dg.AssetCheckSeverity.WARN,
        description="\n".join(f"{e['source']}: {e['file_error']}" for e in refused)
        or f"{len(ledger)} landed file(s) read",
        metadata={"files": len(ledger), "refused": len(refused)},
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


def shard_problem(url: str, sha256: str, rows: int, storage_options: dict[str, Any]) -> str | None:
    """Runs on a worker: what is wrong with one shard against its manifest entry, if anything."""
    fs, path = filesystem_of(url, storage_options)
    if not fs.exists(path):
        return "missing"
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 2**20), b""):  # streamed: memory does not grow with the shard
            digest.update(block)
        if digest.hexdigest() != sha256:
            return "checksum differs from the manifest"
        if pq.ParquetFile(f).metadata.num_rows != rows:
            return "row count differs from the manifest"
    return None


def shard_problems(store: ObjectStore, client: Client, prefix: str, manifest: dict) -> dict[str, str]:
    """Re-read every shard of a version, in parallel: by path, what is wrong with the ones that do not match
    their manifest entry (checksum, row count), and the files in the version's folder it does not name."""
    shards = shard_entries(manifest)
    found = run_tasks(
        client,
        shard_problem,
        [store.url(f"{prefix}/{s['path']}") for s in shards],
        [s["sha256"] for s in shards],
        [s["rows"] for s in shards],
        storage_options=store.storage_options,
    )
    damaged = {s["path"]: problem for s, problem in zip(shards, found, strict=True) if problem}
    return damaged | stray_files(store, prefix, manifest)


STRAY = (
    "not in the manifest, yet read with the shards by directory readers (Hugging Face data_dir, pyarrow, "
    "pandas): move it out of the version's folder"
)


def shard_paths(manifest: dict) -> set[str]:
    """The shards a version's manifest names, by path within its folder."""
    return {s["path"] for s in shard_entries(manifest)}


def read_as_data(path: str) -> bool:
    """Whether a directory reader may take a file in a version's folder for data: any `.parquet` file, under
    whatever name (Dask's read_parquet of the folder reads `_old/x.parquet`; Hugging Face skips only `.` and
    `__` names), and any other file not under a hidden or marker name (`.nfs*`, `.DS_Store`, `_SUCCESS`),
    which pyarrow's discovery would try to read."""
    hidden = any(name.startswith(NOT_DATA_PREFIXES) for name in path.split("/"))
    return path.endswith(".parquet") or not hidden


def stray_files(store: ObjectStore, prefix: str, manifest: dict) -> dict[str, str]:
    """Files in a version's folder that its manifest does not name and readers take for data: the loader
    never reads them, but the README's other readers open the folder as it is. Named, never removed: a
    person decides what they are."""
    named = {MANIFEST} | shard_paths(manifest)
    paths = (o.key[len(prefix) + 1 :] for o in store.list_objects(prefix))
    return {path: STRAY for path in paths if path not in named and read_as_data(path)}


def verified_check(manifest: dict, problems: dict[str, str], repaired: dict[str, str]) -> dg.AssetCheckResult:
    """The version's shards against its manifest, after any repair: `repaired` names the shards this run
    made again and what was wrong with them, which the UI keeps (a log line alone scrolls away)."""
    shards = sum(len(split["shards"]) for split in manifest["splits"].values())
    said = "; ".join(f"{path} ({problem})" for path, problem in repaired.items())
    return dg.AssetCheckResult(
        check_name=VERIFIED_CHECK,
        passed=not problems,
        description="\n".join(f"{path}: {problem}" for path, problem in problems.items())
        or f"{shards} shard(s) match their checksums and row counts" + (f"; repaired: {said}" if said else ""),
        metadata={"shards_checked": shards, "problems": len(problems), "repaired": dg.MetadataValue.json(repaired)},
    )


def expectations_table(results: list[dict[str, Any]]) -> str:
    """Failed expectations first (a suite past TABLE_ROWS shows those); every one is in the Data Docs."""
    return markdown_table(
        ["expectation", "severity", "scope", "ok", "unexpected", "of", "observed / sample"],
        [
            [
                r["label"],
                r["severity"],
                r["scope"],
                "✅" if r["success"] else "❌",
                r.get("unexpected_count", "-"),
                r.get("element_count", "-"),
                (
                    f"error: {r['error']}"
                    if r.get("error")
                    else ", ".join(r.get("sample", [])) or str(r.get("observed", ""))
                )[:80],
            ]
            for r in sorted(results, key=lambda r: r["success"])
        ],
        ": every expectation is in the validation's Data Docs report (`data_docs`)",
    )


def expectation_group_check(results: list[dict[str, Any]], severity: str) -> dg.AssetCheckResult:
    """One check per severity: critical failures block the shards (ERROR), warnings only warn."""
    mine = [r for r in results if r["severity"] == severity]
    failed = [r for r in mine if not r["success"]]
    return dg.AssetCheckResult(
        check_name=EXPECTATION_CHECKS[severity],
        passed=not failed,
        severity=dg.AssetCheckSeverity.ERROR if severity == "critical" else dg.AssetCheckSeverity.WARN,
        description=(
            "failed: "
            + ", ".join(
                f"{r['label']} ({r['error'] if r.get('error') else r.get('unexpected_count', r.get('observed'))})"
                for r in failed
            )
            if failed
            else f"{len(mine)} {severity} expectation(s) hold"
        ),
        metadata={
            "expectations": len(mine),
            "failed": len(failed),
            "unexpected_rows": sum(r.get("unexpected_count", 0) for r in mine),
            "results": dg.MetadataValue.md(expectations_table(mine) if mine else "none"),
        },
    )


def ledger_check(ledger: list[dict[str, Any]], record_url: str) -> dg.AssetCheckResult:
    """Per landed object: rows read = valid + quarantined at ingest + quarantined at validation. The table
    shows unbalanced objects first, then refused ones, then those with rows left out (all of them are in
    `record_url`)."""

    def balances(e: dict[str, Any]) -> bool:
        return e["rows_read"] == e["rows_valid"] + e["quarantined_at_ingest"] + e["quarantined_at_validation"]

    off = [e["source"] for e in ledger if not balances(e)]
    rows = [
        [
            f"`{e['source']}`",
            e["rows_read"],
            e["rows_valid"],
            e["quarantined_at_ingest"],
            e["quarantined_at_validation"],
            e["file_error"] or "",
        ]
        for e in sorted(ledger, key=lambda e: (balances(e), not e["file_error"], e["rows_valid"] == e["rows_read"]))
    ]
    return dg.AssetCheckResult(
        check_name=LEDGER_CHECK,
        passed=not off,
        description=f"unbalanced: {', '.join(off)}" if off else f"{len(ledger)} source object(s) balance",
        metadata={
            "ledger": dg.MetadataValue.md(
                markdown_table(
                    ["source", "read", "valid", "quarantined (ingest)", "quarantined (suite)", "refused"],
                    rows,
                    f": every object is in `{record_url}`",
                )
            )
        },
    )
