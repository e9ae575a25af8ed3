"""Versions and the manifest: what training reads instead of listing buckets.

The version id is a hash of the input fingerprints and the configuration, so the same inputs and config
give the same version. `manifest.json` is written last and is the commit point; `_latest` follows it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib
import json
import posixpath
import subprocess
import tomllib
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
from distributed import Client

from aifactory_assets.catalog import Dataset, judged_suite
from aifactory_assets.publish import current
from aifactory_assets.shard_layout import LATEST, MANIFEST, schema_fingerprint
from aifactory_assets.sharding import SAMPLER
from aifactory_assets.staging import staging_prefix
from resources.object_store import ObjectStore, json_bytes

RETENTION_MARK = "removing"  # under a run's staging of an old version: retention is removing it
FORMAT_VERSION = 5  # bump whenever the layout of a version changes (3: every page carries a CRC32; 4: each
# shard's footer_sha256, which the loader checks on every open; 5: a version keeps its quarantine)
# The modules that decide what a version holds (how files are read and typed, what is quarantined, the
# verdicts, the shuffle and the bytes): their source is part of the version id, so new code never
# re-publishes shards that older code made from the same inputs. The catalogue's module too: besides the
# configuration (hashed as such), its code sorts expectations into row and dataset ones and judges their
# columns, which decides the rows quarantined.
OUTPUT_MODULES = (
    "catalog",
    "landing",
    "ingest",
    "schema",
    "quarantine",
    "validation",
    "validated_rows",
    "dataset_statistics",
    "sharding",
    "shard_layout",
    "staging",
    "parquet_io",
    "manifest",
)


def code_fingerprint() -> str:
    digest = hashlib.sha256()
    for name in OUTPUT_MODULES:
        digest.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


CODE_FINGERPRINT = code_fingerprint()
# The libraries whose release changes the bytes or the rows of a version: pyarrow writes the files (its
# version is in every footer), pandas hashes the keys into splits, numpy sorts and samples, GX judges rows.
OUTPUT_LIBRARIES = ("pyarrow", "pandas", "numpy", "great_expectations")


def library_versions() -> dict[str, str]:
    found = {}
    for name in OUTPUT_LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:  # installed without metadata
            found[name] = importlib.import_module(name).__version__
    return found


LIBRARY_VERSIONS = library_versions()


def package_version() -> str:
    try:
        return version("aifactory")
    except PackageNotFoundError:
        return "0+unknown"


PACKAGE = Path(__file__).parent


def git(folder: Path, *args: str) -> str | None:
    """A git command's output in `folder`; None where git is missing, slow or fails (not a checkout)."""
    try:
        out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def aifactory_project(folder: Path) -> bool:
    """Whether `folder` is aifactory's own project (its pyproject.toml names it), not another that holds a
    copy of the package at its top."""
    try:
        return tomllib.loads((folder / "pyproject.toml").read_text())["project"]["name"] == "aifactory"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return False


def git_sha(package: Path = PACKAGE) -> str:
    """The commit of aifactory's own checkout that the package runs from, `-dirty` where its tracked files
    changed since; "unknown" where the package is not at the top of aifactory's checkout: a copy vendored
    or installed inside another repository (a training project's) would report that project's commit."""
    found = git(package, "rev-parse", "--show-toplevel", "HEAD")
    if found is None or len(found.splitlines()) != 2:
        return "unknown"
    top, sha = found.splitlines()
    if Path(top).resolve() != package.parent.resolve() or not aifactory_project(Path(top)):
        return "unknown"
    changed = git(package, "status", "--porcelain", "--untracked-files=no")
    return "unknown" if changed is None else f"{sha}-dirty" if changed else sha


def schema_fields(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in schema]


# Catalogue fields that shape no byte of a version: what it is and who owns it, and housekeeping (how many
# versions to keep, when to refuse a run). Changing them must not reshard into a new version. Residency
# does count: the manifest records it, and what copies a version elsewhere trusts that record.
NOT_OUTPUT = {
    "description": True,
    "owner": True,
    "origin": True,
    "max_quarantined_fraction": True,
    "shards": {"retention"},
    "table": {"columns": {"__all__": {"description"}}},
}


def version_id(dataset: Dataset, suite: dict[str, Any], inputs: list[str]) -> str:
    """A hash of the input fingerprints and everything that shapes the output: configuration, suite, the
    code that reads, judges and shards and the libraries it calls (not the time or the run)."""
    config = {
        "format": FORMAT_VERSION,
        "code": CODE_FINGERPRINT,
        "libraries": LIBRARY_VERSIONS,
        "dataset": dataset.model_dump(mode="json", exclude=NOT_OUTPUT),
        "split_order": list(dataset.shards.splits),  # the cut follows it; the dump's keys get sorted
        "suite": judged_suite(suite),
        "inputs": sorted(inputs),
    }
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def output_software() -> dict[str, Any]:
    """What makes a version's bytes, as the version id names it: aifactory's code and the libraries. Also
    run on the Dask workers, which write the bytes: a shared cluster (an external scheduler, its workers
    on their own install) may run another release of either."""
    return {"code": CODE_FINGERPRINT, "libraries": LIBRARY_VERSIONS}


def workers_on_other_software(client: Client) -> dict[str, Any]:
    """The workers whose code or libraries differ from the ones the version id names (this process's). A
    worker that cannot run `output_software` (an older release, without it) differs too; one that left
    meanwhile (a connection error) writes nothing."""
    found, mine = client.run(output_software, on_error="return"), output_software()
    return {
        worker: v if isinstance(v, dict) else repr(v)
        for worker, v in found.items()
        if (isinstance(v, dict) and v != mine) or (isinstance(v, BaseException) and not isinstance(v, OSError))
    }


def landed_at(entry: dict[str, Any]) -> float:
    """When a ledger entry's bytes first landed under its name (a record before `landed_at`: its mtime)."""
    return entry.get("landed_at", entry["object"]["mtime"]) or 0


def landing_order(ledger: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ledger's files in the order that decides which duplicate wins (the later one): by when each
    file's bytes first landed under its name, then by name. A file uploaded again unchanged keeps its place:
    a sync tool's re-upload of an older file would otherwise undo the updates of every file after it."""
    return sorted(ledger, key=lambda e: (landed_at(e), e["source"]))


def part_seqs(raw_record: dict[str, Any]) -> list[int]:
    """Each raw part's place in the landing order, which the shuffle's dedup goes by (the later file's
    record wins): part of what a version holds, so it is here, in the code the version id names."""
    rank = {e["source"]: i for i, e in enumerate(landing_order(raw_record["ledger"]))}
    return [rank[source] for source in raw_record["part_sources"]]


def version_for(dataset: Dataset, suite: dict[str, Any], raw_record: dict[str, Any]) -> str:
    """The version the published raw generation will shard into: per landed file its place in the landing
    order (which decides which duplicate wins), its key and the sha256 of the bytes raw read. Not its mtime,
    which orders the files but is no byte of the shards: a sync tool that uploads the same bytes again makes
    no new version (which retention would count against the real ones). Nor the store's ETag, nor a local
    file's inode and change time, which a chmod, a hard link or a move to another disk changes: those make
    raw read the file again, never a new version of the same bytes."""
    inputs = [f"{i}|{e['object']['key']}|{e.get('sha256')}" for i, e in enumerate(landing_order(raw_record["ledger"]))]
    return version_id(dataset, suite, inputs)


def dataset_prefix(dataset: Dataset) -> str:
    return f"shards/{dataset.name}"


def version_prefix(dataset: Dataset, version: str) -> str:
    return f"{dataset_prefix(dataset)}/v={version}"


def lineage_inputs(raw_record: dict[str, Any], valid_record: dict[str, Any]) -> list[dict[str, Any]]:
    """Per landed object: what raw read (key, size, etag, mtime, sha256) and what became of its rows, as
    validation counted them (raw's own counts stop at ingest)."""
    counted = {e["source"]: e for e in valid_record["ledger"]}
    rows = ("rows_read", "rows_valid", "quarantined_at_ingest", "quarantined_at_validation")
    return [
        {**e["object"], "sha256": e.get("sha256"), **{k: counted[e["source"]][k] for k in rows}}
        for e in raw_record["ledger"]
    ]


def kept_quarantine_prefix(dataset: Dataset, version: str) -> str:
    """The quarantine a version was made with, kept as long as the version. Beside the stages' own
    quarantine, not in the version's folder, which any Parquet reader must be able to open as it is."""
    return f"quarantine/{dataset.name}/v={version}"


def keep_quarantine(
    store: ObjectStore, dataset: Dataset, version: str, generations: dict[str, tuple[str, int]]
) -> list[str]:
    """Copies each stage's quarantine generation (its prefix, and the parts it holds) for the version: the
    next run of the stage replaces the generation, and a version's manifest must still lead to the rows it
    left out. Returns the copies' keys."""
    kept = {stage: f"{kept_quarantine_prefix(dataset, version)}/{stage}" for stage in generations}
    listed = {stage: store.list_objects(generation) for stage, (generation, _) in generations.items()}
    pairs = [(info.key, f"{kept[stage]}/{posixpath.basename(info.key)}") for stage in listed for info in listed[stage]]
    copied = store.copy_many(pairs)
    if not all(copied) or any(len(listed[stage]) != parts for stage, (_, parts) in generations.items()):
        raise FileNotFoundError(
            f"{dataset.name}: quarantine parts of {[g for g, _ in generations.values()]} went while version "
            f"{version} was written (another deployment's publish): run it again"
        )
    return list(kept.values())


def build_manifest(
    dataset: Dataset,
    version: str,
    schema: pa.Schema,
    sharded: dict[str, Any],
    lineage: list[dict[str, Any]],
    validation: dict[str, Any],
    quarantine: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset.name,
        "sector": dataset.sector,
        "site": dataset.site,
        "version": version,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),  # orders versions
        "producer": {
            "package": "aifactory",
            "version": package_version(),
            "git_sha": git_sha(),
            "code_fingerprint": CODE_FINGERPRINT,
            "libraries": LIBRARY_VERSIONS,
            "dagster_run_id": run_id,
        },
        "schema": {
            "fields": schema_fields(schema),
            "fingerprint": schema_fingerprint(schema),
            "key": dataset.table.key,
        },
        "splits": sharded["splits"],
        "sampler": {
            "seed": dataset.shards.seed,
            "ratios": [[split, ratio] for split, ratio in dataset.shards.splits.items()],  # in cut order
            "remainder": dataset.shards.remainder,
            **SAMPLER,
        },
        "lineage": {"inputs": lineage},
        "validation": validation,
        "quarantine": quarantine,
        "conservation": {
            "rows_read": quarantine["rows_read"],
            "rows_quarantined": quarantine["rows"],
            "duplicates_dropped": sharded["duplicates_dropped"],
            "rows_sharded": sum(s["rows"] for s in sharded["splits"].values()),
        },
        "residency": dataset.residency or [dataset.site],
        "replicas": [],
    }


# What this package reads of a manifest: one without them (cut short, edited) cannot be trusted or re-pointed at.
MANIFEST_KEYS = ("version", "created_at", "splits", "conservation", "quarantine")


def parsed_manifest(body: bytes) -> dict[str, Any]:
    """A manifest's bytes as this package reads them; a ValueError saying what is wrong where they are not
    JSON or lack what it reads (cut short by a full disk, edited by hand)."""
    try:
        manifest = json.loads(body)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"not JSON ({exc})") from exc
    missing = [k for k in MANIFEST_KEYS if k not in manifest] if isinstance(manifest, dict) else list(MANIFEST_KEYS)
    if missing:
        raise ValueError(f"missing {missing}")
    return manifest


def read_manifest(store: ObjectStore, key: str) -> dict[str, Any]:
    """A version's manifest, or a Failure naming it where it cannot be read: a bare JSONDecodeError named
    neither the key nor a way out."""
    try:
        return parsed_manifest(store.read_bytes(key))
    except ValueError as exc:
        raise unreadable(store, key, str(exc)) from exc


def unreadable(store: ObjectStore, key: str, why: str) -> dg.Failure:
    return dg.Failure(
        f"{store.url(key)} cannot be read: {why}. Its version counts as not committed, and retention leaves "
        f"its folder alone: a shards run of the same inputs makes it again, manifest included; else remove "
        f"{store.url(posixpath.dirname(key))}/"
    )


def readable_manifest(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """The manifest at `key`; None, with a warning naming it, where it cannot be read. Retention neither
    counts nor removes such a version (it cannot tell what it is): the warning asks a person to."""
    try:
        return read_manifest(store, key)
    except dg.Failure as failure:
        dg.get_dagster_logger().warning(failure.description)
        return None


def committed_manifest(store: ObjectStore, dataset: Dataset, version: str) -> dict[str, Any] | None:
    """`version`'s manifest where it is committed, by a manifest this package can read."""
    key = f"{version_prefix(dataset, version)}/{MANIFEST}"
    return readable_manifest(store, key) if store.is_object(key) else None


class CommittedMeanwhile(Exception):
    """The version's manifest another writer committed between this run's look and its commit."""

    def __init__(self, manifest: dict[str, Any]):
        super().__init__(manifest["version"])
        self.manifest = manifest


def write_manifest(store: ObjectStore, dataset: Dataset, manifest: dict[str, Any]) -> dict[str, Any]:
    """A new version's commit point: its shards are verified; from here it is a complete version. Returns
    the manifest committed. Written only where none is there, or one that cannot be read (made again): a
    manifest once written is never written again, for readers may have resolved it, and another
    deployment's retention may have removed its version meanwhile (a manifest alone would be a version
    without shards). So where another deployment on the same bucket committed the same version while this
    run sharded it, its manifest stays and is returned, once its shards are shown to be the ones this run
    wrote over them (the same inputs and software give the same bytes)."""
    key = f"{version_prefix(dataset, manifest['version'])}/{MANIFEST}"

    def committing(body: bytes | None) -> bytes:
        try:
            there = None if body is None else parsed_manifest(body)
        except ValueError:  # one that cannot be read is written over
            there = None
        if there is not None:
            raise CommittedMeanwhile(there)
        return json_bytes(manifest)

    try:
        store.update_object(key, committing)
    except CommittedMeanwhile as meanwhile:
        theirs = meanwhile.manifest
        if json_bytes(theirs["splits"]) != json_bytes(manifest["splits"]):  # as both were written
            raise dg.Failure(
                f"{dataset.name}: version {manifest['version']} was committed meanwhile by run "
                f"{committed_by(theirs)} (another deployment on the same bucket) with other shards than this run "
                f"wrote over them, though the same inputs and software give the same bytes: remove "
                f"{store.url(key)} and run again to write the version anew"
            ) from meanwhile
        return theirs
    return manifest


def committed_by(manifest: dict[str, Any]) -> str:
    """The Dagster run that committed a version (of its own deployment, or another's)."""
    return manifest.get("producer", {}).get("dagster_run_id", "unknown")


class LatestMovedOn(Exception):
    """`_latest` changed while this run sharded, to newer inputs than this run's."""


def latest_left(latest: str | None) -> str:
    """Where a failure leaves `_latest`, as it says it: a dataset's first version has none to be left at."""
    return f"_latest left at {latest}" if latest else "there is no committed version yet"


def raw_moved_on(store: ObjectStore, dataset: Dataset, raw_generation: str | None) -> bool:
    """Whether raw was published again since `raw_generation` (a newer landing ingested, here or by another
    deployment on the same bucket)."""
    return (current(store, f"raw/{dataset.name}") or {}).get("generation") != raw_generation


def make_latest(
    store: ObjectStore, dataset: Dataset, version: str, run_id: str, since: str | None, raw_generation: str | None
) -> bool:
    """Point `_latest` at a committed version, then apply retention (by run `run_id`); whether it did. Not
    where both `_latest` moved off `since` (the version it named as this run began to shard) and raw moved
    on from `raw_generation` (the one sharded) meanwhile: another deployment committed newer inputs. Either
    alone is no reason: a newer drop only ingested has no version to be the latest, and a version another
    deployment committed from inputs older than the current raw (it finished first) is replaced as this
    one's would be. A Failure, `_latest` untouched, where the version's manifest went meanwhile (another
    deployment's retention)."""

    def pointed(latest: dict[str, Any] | None) -> dict[str, Any]:
        """`_latest` from the one read (again on a conflict): a version another deployment committed
        meanwhile keeps its place in the history, which retention goes by."""
        committed = {v for _, v in committed_versions(store, dataset)}
        now = (latest or {}).get("version")
        if version not in committed:
            raise dg.Failure(
                f"{dataset.name}: version {version} was removed before it could be made the latest "
                f"({store.url(f'{version_prefix(dataset, version)}/{MANIFEST}')} is gone, most likely by another "
                f"deployment's retention); {latest_left(now)}: run the shards again"
            )
        if now not in (since, version) and raw_moved_on(store, dataset, raw_generation):
            raise LatestMovedOn(now)
        history = [v for v in (latest or {}).get("history", []) if v in committed and v != version] + [version]
        return {"version": version, "manifest": f"v={version}/{MANIFEST}", "history": history}

    try:
        store.update_json(f"{dataset_prefix(dataset)}/{LATEST}", pointed)
    except LatestMovedOn:
        return False
    apply_retention(store, dataset, keep=version, run_id=run_id)
    return True


def latest_pointer(store: ObjectStore, dataset: Dataset) -> dict[str, Any] | None:
    """`_latest` (version, manifest, history), in one read; None before the first commit."""
    try:
        return store.read_json(f"{dataset_prefix(dataset)}/{LATEST}")
    except FileNotFoundError:
        return None


def latest_history(store: ObjectStore, dataset: Dataset) -> list[str]:
    """Versions in the order they were last made the latest, the latest last: a version re-pointed at
    (a landing reverted to earlier files) is as recent as a new one, whatever its manifest's created_at."""
    return (latest_pointer(store, dataset) or {}).get("history", [])


def latest_version(store: ObjectStore, dataset: Dataset) -> str | None:
    """The version `_latest` names; None before the first commit."""
    pointer = latest_pointer(store, dataset)
    return pointer["version"] if pointer else None


def committed_versions(store: ObjectStore, dataset: Dataset) -> list[tuple[str, str]]:
    """(created_at, version) of every version with a readable manifest, oldest first."""
    found = (
        readable_manifest(store, obj.key) for obj in store.list_objects(dataset_prefix(dataset), f"v=*/{MANIFEST}")
    )
    return sorted((manifest["created_at"], manifest["version"]) for manifest in found if manifest)


def apply_retention(store: ObjectStore, dataset: Dataset, keep: str, run_id: str) -> list[str]:
    """Remove committed versions beyond the catalogue's retention, least recently the latest first, never
    `keep` nor the version `_latest` names as each goes (read again: another deployment may have committed
    since this run moved it). Returns the versions removed."""
    recency = {v: i for i, v in enumerate(latest_history(store, dataset))}
    by_age = sorted(committed_versions(store, dataset), key=lambda cv: (recency.get(cv[1], -1), cv[0]))
    protected = {keep, latest_version(store, dataset)}
    versions = [v for _, v in by_age if v not in protected]
    kept = max(0, dataset.shards.retention - len(protected & {v for _, v in by_age}))
    doomed = versions[: max(0, len(versions) - kept)]
    removed = []
    for old in doomed:
        if old != latest_version(store, dataset):  # else another deployment re-pointed at it meanwhile
            remove_committed(store, dataset, old, run_id)
            removed.append(old)
    return removed


def remove_committed(store: ObjectStore, dataset: Dataset, version: str, run_id: str) -> None:
    """One committed version, manifest first, so a removal cut short leaves an uncommitted folder, never a
    committed version with holes; and a staging mark in run `run_id`'s name goes before it, so that folder
    is an abandoned write, which the next run's `remove_abandoned_writes` removes once this run is over
    (cut short before the manifest went, the version stays committed and only the mark goes)."""
    mark = f"{staging_prefix(dataset)}/{version}/{run_id}/{RETENTION_MARK}"
    store.write_bytes(mark, b"")
    store.delete(f"{version_prefix(dataset, version)}/{MANIFEST}")
    remove_version(store, dataset, version)
    store.delete(posixpath.dirname(mark))  # the mark, and its run's folder
    store.remove_empty_folder(f"{staging_prefix(dataset)}/{version}")


def remove_abandoned_writes(store: ObjectStore, dataset: Dataset, is_finished: Callable[[str], bool]) -> list[str]:
    """A run removes its staging once it has committed; one that failed or was killed leaves it, and the
    staging names the version it was writing (or, with a RETENTION_MARK, removing). Once every run writing
    a version is over, their staging goes, and so does the version's folder unless a manifest committed it.
    Returns the folders removed. A folder that no staging names (another deployment's, or older) is left
    alone."""
    prefix = staging_prefix(dataset)
    writers: dict[str, set[str]] = {}
    for obj in store.list_objects(prefix, "*/*/**"):
        version, run_id = obj.key[len(prefix) + 1 :].split("/")[:2]
        writers.setdefault(version, set()).add(run_id)
    removed = []
    for version, runs in sorted(writers.items()):
        over = {run_id for run_id in runs if is_finished(run_id)}
        for run_id in sorted(over):
            store.delete(f"{prefix}/{version}/{run_id}")
        store.remove_empty_folder(f"{prefix}/{version}")
        committed = store.is_object(f"{version_prefix(dataset, version)}/{MANIFEST}")
        if over == runs and not committed and remove_version(store, dataset, version):
            removed.append(version)
    return removed


def remove_version(store: ObjectStore, dataset: Dataset, version: str) -> bool:
    """A version's folder, then the quarantine kept for it; whether there was anything to remove."""
    found = [p for p in (version_prefix(dataset, version), kept_quarantine_prefix(dataset, version)) if store.exists(p)]
    for prefix in found:
        store.delete(prefix)
    return bool(found)


def latest_manifest(store: ObjectStore, dataset: Dataset) -> dict[str, Any] | None:
    pointer = latest_pointer(store, dataset)
    return read_manifest(store, f"{dataset_prefix(dataset)}/{pointer['manifest']}") if pointer else None
