"""One factory turns a catalogue dataset into its assets: landing (external) -> raw -> validated -> shards.

Assets read and write the site's store directly with Dask and return `MaterializeResult` with metadata;
no DataFrame goes through an IO manager. Checks are computed in the same step from what was written.
"""

from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial, wraps
from typing import Any, TypeVar, cast

import dagster as dg
from distributed import Client

from aifactory_assets.catalog import Catalog, Dataset
from aifactory_assets.checks import (
    CONSERVATION_CHECK,
    CRITICAL_CHECK,
    FILES_CHECK,
    LEDGER_CHECK,
    SCHEMA_CHECK,
    VERIFIED_CHECK,
    WARNING_CHECK,
    check_description,
    conservation_check,
    expectation_group_check,
    expectations_table,
    files_check,
    footers,
    ledger_check,
    schema_check,
    shard_paths,
    shard_problems,
    verified_check,
)
from aifactory_assets.data_docs import gx_imported, render_data_docs, report_key
from aifactory_assets.ingest import ingest_dataset, reingest_needed
from aifactory_assets.manifest import (
    MANIFEST,
    build_manifest,
    committed_by,
    committed_manifest,
    keep_quarantine,
    latest_left,
    latest_version,
    lineage_inputs,
    make_latest,
    output_software,
    part_seqs,
    remove_abandoned_writes,
    version_for,
    version_prefix,
    workers_on_other_software,
    write_manifest,
)
from aifactory_assets.metadata import column_schema, location, markdown_table, stage_metadata
from aifactory_assets.parquet_io import read_parquet
from aifactory_assets.pools import dataset_pool
from aifactory_assets.publish import POINTER, part_key, require_current
from aifactory_assets.schema import arrow_schema
from aifactory_assets.shard_layout import shard_entries
from aifactory_assets.sharding import shard_dataset
from aifactory_assets.staging import staging_prefix
from aifactory_assets.validated_rows import stale_validation
from aifactory_assets.validation import QUOTED, suite_fingerprint, validate_dataset
from resources.dask_cluster import DaskCluster
from resources.object_store import ObjectStore, credentials_named

STAGES = ("landing", "raw", "validated", "shards")


Compute = TypeVar("Compute", bound=Callable[..., Any])


def store_key(site: str) -> str:
    return f"store_{site}"


def naming_refusals(site: str) -> Callable[[Compute], Compute]:
    """For an asset's or a sensor's function: a refusal (403) from the site's S3 store names the store and
    the variables its credentials come from, where the UI shows the error (botocore's names neither)."""

    def wrap(compute: Compute) -> Compute:
        @wraps(compute)
        def run(context: Any) -> Any:
            try:
                return compute(context)
            except PermissionError as exc:
                store = getattr(context.resources, store_key(site))
                if store.protocol != "s3" or exc.errno is not None or exc.filename is not None:
                    raise  # a file's permissions (an OS error has an errno; s3fs's refusals have none)
                raise PermissionError(
                    f"{store.display()} refused a request of the {site} site ({exc}); its key and secret, as the "
                    f"environment sets them: {credentials_named(site)}; check them, and the bucket's policy"
                ) from exc

        return cast(Compute, run)

    return wrap


def asset_key(dataset: Dataset, stage: str) -> dg.AssetKey:
    return dg.AssetKey([dataset.sector, dataset.name, stage])


def _common(dataset: Dataset, stage: str, description: str) -> dict[str, Any]:
    """What every asset of a dataset declares; the stages aifactory writes show their columns before any
    run (each materialisation records them again)."""
    written = {"metadata": {"dagster/column_schema": column_schema(dataset, stage == "shards")}}
    return {
        "key": asset_key(dataset, stage),
        "group_name": dataset.sector,
        "description": f"{description}\n\n{dataset.description}",
        "owners": [dataset.owner],
        "tags": {"site": dataset.site, "sector": dataset.sector, "dataset": dataset.name, "stage": stage},
        **(written if stage != "landing" else {}),
    }


def _resources(context: dg.AssetExecutionContext, dataset: Dataset) -> tuple[ObjectStore, DaskCluster]:
    return getattr(context.resources, store_key(dataset.site)), context.resources.dask


def same_bytes(ledger: list[dict[str, Any]]) -> list[list[str]]:
    """Landed files whose bytes are the same (a copy under another name, a drop sent twice), in groups:
    all their rows are duplicates, and the later file's win, silently but for this."""
    by_hash: dict[str, list[str]] = {}
    for entry in ledger:
        if entry.get("sha256") and entry["rows_read"]:  # not refused files, nor header-only ones
            by_hash.setdefault(entry["sha256"], []).append(entry["source"])
    return [sources for sources in by_hash.values() if len(sources) > 1]


CAUSE_PARTS = 20  # quarantine parts a failure's message samples its reasons from (one read each)


def quarantine_causes(
    store: ObjectStore, raw_record: dict[str, Any], valid_record: dict[str, Any], results: list[dict[str, Any]]
) -> str:
    """Where rows were quarantined, and the commonest causes: a few of ingest's reasons (a column declared
    with the wrong type quarantines every row there, and every expectation then passes on nothing), and
    the expectations that failed most."""
    causes = []
    if raw_record["rows_quarantined"]:
        reasons: Counter[str] = Counter()
        sampled = [i for i, entry in enumerate(raw_record["ledger"]) if entry["rows_quarantined"]][:CAUSE_PARTS]
        for i in sampled:
            part_url = store.url(part_key(raw_record["quarantine"], i))
            # Values left out: they vary row by row, and may be personal data.
            found = read_parquet(part_url, store.storage_options, columns=["reason"]).column("reason")
            reasons.update(QUOTED.sub("…", reason) for reason in found.to_pylist())
        common = "; ".join(f"{reason} ({n} rows)" for reason, n in reasons.most_common(3))
        causes.append(f"{raw_record['rows_quarantined']} at ingest, e.g. {common}")
    failed = sorted((r for r in results if r.get("unexpected_count")), key=lambda r: -r["unexpected_count"])[:3]
    if valid_record["rows_quarantined"]:
        worst = ", ".join(f"{r['label']} ({r['unexpected_count']} rows)" for r in failed)
        causes.append(f"{valid_record['rows_quarantined']} at validation, failing most: {worst}")
    return "; ".join(causes)


def quarantined_fraction(raw_record: dict[str, Any], valid_record: dict[str, Any]) -> float:
    quarantined = raw_record["rows_quarantined"] + valid_record["rows_quarantined"]
    return quarantined / raw_record["rows_read"] if raw_record["rows_read"] else 0.0


def run_finished(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Known to this instance and over; a run it does not know may be another deployment's, still going."""
    run = instance.get_run_by_id(run_id)
    return run is not None and run.is_finished


def revalidation_needed(suite: dict[str, Any], raw_record: dict[str, Any], valid_record: dict[str, Any]) -> str | None:
    """Why the validated record cannot serve the shards as it is, if it cannot: validated must run again."""
    if "excluded" not in valid_record:
        return (
            "validated was published by an earlier release (a copy of the rows, no delete files): "
            "materialise validated first"
        )
    if stale := stale_validation(valid_record, raw_record):
        return stale
    if valid_record.get("suite_fingerprint") != suite_fingerprint(suite):
        return f"validated was judged by another version of suite {suite['name']!r}: materialise validated first"
    return None


def require_shardable(
    dataset: Dataset, suite: dict[str, Any], raw_record: dict[str, Any], valid_record: dict[str, Any]
) -> None:
    """A run may materialise the shards alone, so they check what the validated step decided: a failed
    validation still publishes (its report and quarantine are what a person needs), validated may lag
    behind a newer raw generation or an edited suite, raw behind the catalogue or the release, and a version
    of no rows would replace the latest."""
    if again := reingest_needed(dataset, raw_record) or revalidation_needed(suite, raw_record, valid_record):
        raise dg.Failure(f"{dataset.name}: {again}")
    if raw_record["rows_read"] == 0:
        raise dg.Failure(
            f"{dataset.name}: no rows read ({raw_record['files_refused']} of {len(raw_record['ledger'])} landed "
            "file(s) refused, see the raw step's landed_files_read check); nothing to shard"
        )
    failed = [r["label"] for r in valid_record["results"] if r["severity"] == "critical" and not r["success"]]
    if failed:
        raise dg.Failure(f"{dataset.name}: validated failed critical expectation(s) {failed}; nothing to shard")
    fraction = quarantined_fraction(raw_record, valid_record)
    if fraction > dataset.max_quarantined_fraction:
        raise dg.Failure(
            f"{dataset.name}: {fraction:.1%} of rows quarantined, above the catalogue's max_quarantined_fraction "
            f"{dataset.max_quarantined_fraction:.1%}; nothing to shard"
        )
    if valid_record["rows_valid"] == 0:
        raise dg.Failure(
            f"{dataset.name}: all {raw_record['rows_read']} rows read were quarantined (see the quarantine at raw "
            "and validated); a version of no rows would replace the latest, so nothing to shard"
        )


def shard_version(
    store: ObjectStore,
    client: Client,
    dataset: Dataset,
    raw_record: dict[str, Any],
    valid_record: dict[str, Any],
    into: str,
    staging: str,
) -> dict[str, Any]:
    """The validated rows shuffled into shards under `into`, by workers on this process's software (which
    the version id names)."""
    seqs = part_seqs(raw_record)
    sharded = shard_dataset(
        store, client, dataset, valid_record["raw_parts"], valid_record["excluded"], seqs, into, staging
    )
    if elsewhere := workers_on_other_software(client):
        raise dg.Failure(
            f"{dataset.name}: Dask workers run other code or releases than this process ({output_software()}), "
            f"which the version id names: {elsewhere}; install the same aifactory and lock on both"
        )
    return sharded


def new_version(
    store: ObjectStore,
    dataset: Dataset,
    version: str,
    raw_record: dict[str, Any],
    valid_record: dict[str, Any],
    shard: Callable[[str], dict[str, Any]],
    run_id: str,
) -> dict[str, Any]:
    """A version not committed yet: its shards written under its folder (each there only whole, so a
    version whose manifest cannot be read is made again under the readers that resolved it before), its
    quarantine kept, and the manifest that will commit it."""
    sharded = shard(version_prefix(dataset, version))
    if sharded["rows_in"] != valid_record["rows_valid"]:
        raise dg.Failure(
            f"{dataset.name}: the shuffle read {sharded['rows_in']} validated rows where validated passed "
            f"on {valid_record['rows_valid']}; version {version} is not committed"
        )
    lineage = lineage_inputs(raw_record, valid_record)
    kept = {  # each stage's quarantine generation, and its parts: one per landed file, per raw part
        "raw": (raw_record["quarantine"], len(raw_record["ledger"])),
        "validated": (valid_record["quarantine"], len(valid_record["excluded"])),
    }
    quarantine = {
        "rows_read": raw_record["rows_read"],
        "rows": raw_record["rows_quarantined"] + valid_record["rows_quarantined"],
        "at_ingest": raw_record["rows_quarantined"],
        "at_validation": valid_record["rows_quarantined"],
        "files_refused": raw_record["files_refused"],
        "locations": keep_quarantine(store, dataset, version, kept),
    }
    validation = {"success": valid_record["success"], "results": valid_record["results"]}
    return build_manifest(dataset, version, arrow_schema(dataset), sharded, lineage, validation, quarantine, run_id)


def repair_version(
    store: ObjectStore,
    dataset: Dataset,
    prefix: str,
    manifest: dict[str, Any],
    damaged: dict[str, str],
    rebuilt: dict[str, Any],
    rebuilt_at: str,
) -> None:
    """A committed version whose shards (`damaged`, by path) rotted, or were removed, gets them back: the
    same inputs and configuration give the same bytes, so they are rebuilt in the staging, compared with
    the manifest, and copied over, each whole; the manifest stays as committed. A Failure where one went
    from the staging meanwhile."""
    made = {s["path"]: s["sha256"] for s in shard_entries(rebuilt)}
    wanted = {s["path"]: s["sha256"] for s in shard_entries(manifest)}
    if made != wanted:
        raise dg.Failure(
            f"{dataset.name}: version {manifest['version']} is damaged ({damaged}) and its shards, made again, "
            f"differ from its manifest: remove {store.url(prefix)}/{MANIFEST} and run again to write it anew"
        )
    paths = sorted(damaged)
    copied = store.copy_many([(f"{rebuilt_at}/{path}", f"{prefix}/{path}") for path in paths])
    if gone := [path for path, done in zip(paths, copied, strict=True) if not done]:
        raise dg.Failure(
            f"{dataset.name}: {gone}, made again under {store.url(rebuilt_at)}/, went from there before they were "
            f"copied over the damaged ones in {store.url(prefix)}/ (another run's clean-up?): run again"
        )


class ChecksFailed(dg.Failure):
    """A blocking check failed before the commit; `results`, the checks judged so far, are reported with
    the step's failure."""

    def __init__(self, description: str, metadata: dict[str, Any], results: list[dg.AssetCheckResult]):
        super().__init__(description, metadata=metadata)
        self.results = results


def refuse_failed(
    store: ObjectStore, dataset: Dataset, version: str, results: list[dg.AssetCheckResult], committed: bool
) -> None:
    """A Failure naming the blocking checks that failed, before anything is committed or re-pointed at; it
    says what state the version and `_latest` are left in (a version committed before stays committed)."""
    failed = [r for r in results if not r.passed]
    if not failed:
        return
    said = "; ".join(f"{r.check_name}: {r.description}" for r in failed)
    latest = latest_version(store, dataset)
    manifest_url = store.url(f"{version_prefix(dataset, version)}/{MANIFEST}")
    named = "_latest still names it" if latest == version else latest_left(latest)
    if not committed:
        state = f"so it is not committed ({named})"
    else:
        state = (
            f"yet it is committed and {named}: set right what is named above, or remove {manifest_url} and run "
            "again to write the version anew"
        )
    # Dagster files a check under the asset's latest materialisation, which is another version's (or none):
    # each says which version it judged, and in what state, lest it be read as the other version's.
    judged = f"version {version}, {'committed' if committed else 'not committed'}, {named}"
    raise ChecksFailed(
        f"{dataset.name}: version {version} does not pass {said}; {state}",
        metadata={k: v for r in failed for k, v in r.metadata.items()},
        results=[
            dg.AssetCheckResult(
                check_name=r.check_name,
                passed=r.passed,
                severity=r.severity,
                description=f"{judged}: {r.description}",
                metadata={**r.metadata, "version": version, "committed": committed},
            )
            for r in results
        ],
    )


def shard_footers(store: ObjectStore, dataset: Dataset, manifest: dict[str, Any]) -> dict[str, Any]:
    """Every shard's footer, by key; a Failure naming the version where a shard went after it was verified
    (another deployment's retention removing it), rather than a bare FileNotFoundError."""
    prefix = version_prefix(dataset, manifest["version"])
    try:
        return footers(store, [f"{prefix}/{s['path']}" for s in shard_entries(manifest)])
    except FileNotFoundError as exc:
        raise dg.Failure(
            f"{dataset.name}: a shard of version {manifest['version']} went while this run checked it ({exc}), "
            f"most likely removed by another deployment's retention; {latest_left(latest_version(store, dataset))}: "
            "run the shards again"
        ) from exc


def blocking_checks(
    store: ObjectStore, dataset: Dataset, manifest: dict[str, Any], verified: dg.AssetCheckResult, committed: bool
) -> list[dg.AssetCheckResult]:
    """The shards step's checks, all blocking, evaluated before the commit, which a failed one stops: after
    it, `_latest` would name a version the UI says is wrong. The shards must match first (footers need
    every one of them)."""
    refuse_failed(store, dataset, manifest["version"], [verified], committed)
    balance = manifest["conservation"]
    written = shard_footers(store, dataset, manifest)
    results = [
        schema_check(dataset, store, written, arrow_schema(dataset)),
        conservation_check(
            "rows read = sharded + quarantined + duplicates dropped",
            balance["rows_read"],
            {
                "sharded": balance["rows_sharded"],
                "quarantined": balance["rows_quarantined"],
                "duplicates dropped": balance["duplicates_dropped"],
            },
        ),
        verified,
    ]
    refuse_failed(store, dataset, manifest["version"], results, committed)
    return results


def _checks(dataset: Dataset, stage: str, *names: str, blocking: bool = True) -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            name, asset=asset_key(dataset, stage), blocking=blocking, description=check_description(name, stage)
        )
        for name in names
    ]


def write_report(
    store: ObjectStore,
    client: Client,
    dataset: Dataset,
    suite: dict[str, Any],
    results: list[dict[str, Any]],
    run_id: str,
) -> dg.MetadataValue:
    """GX Data Docs for this run under the site's `reports/`, plus `latest.html`; returns a link to it.
    Rendered on a worker that has imported GX already where one has (it costs 2.4 s in any other process;
    a dataset of one landed file validates on one worker only, and a run that kept every part's verdicts
    ran GX on none)."""
    warm = [worker for worker, imported in client.run(gx_imported, on_error="return").items() if imported is True]
    where = {"workers": warm, "allow_other_workers": True} if warm else {}
    rendering = client.submit(render_data_docs, suite["name"], results, run_id, pure=False, **where)
    html = rendering.result().encode()
    store.write_bytes(report_key(dataset.name, run_id), html)
    store.write_bytes(f"reports/{dataset.name}/latest.html", html)
    return location(store, report_key(dataset.name, run_id))


def build_dataset_assets(dataset: Dataset, catalog: Catalog) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    suite = catalog.suites[dataset.name]
    schema = arrow_schema(dataset)
    resource_keys = {store_key(dataset.site), "dask"}

    landing = dg.AssetSpec(
        **_common(
            dataset,
            "landing",
            f"Files partners drop under `landing/{dataset.name}/` "
            f"(`{dataset.source.landing}`, {dataset.source.format}).",
        ),
        kinds={dataset.source.format},
    )

    @dg.asset(
        **_common(
            dataset,
            "raw",
            "Landed files with the declared schema enforced, plus provenance; "
            "unreadable rows and files quarantined with the reason.",
        ),
        deps=[landing.key],
        kinds={"dask", "parquet"},
        required_resource_keys=resource_keys,
        check_specs=[
            *_checks(dataset, "raw", SCHEMA_CHECK, CONSERVATION_CHECK),
            *_checks(dataset, "raw", FILES_CHECK, blocking=False),
        ],
        pool=dataset_pool(dataset),
    )
    @naming_refusals(dataset.site)
    def raw(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        store, dask = _resources(context, dataset)
        record = ingest_dataset(
            store, dask.get_client(), dataset, context.run.run_id, partial(run_finished, context.instance)
        )
        refused = [e for e in record["ledger"] if "file_error" in e]
        # This run's files and the ones with rows quarantined first: past TABLE_ROWS only those are shown.
        ledger = sorted(
            record["ledger"], key=lambda e: (e["ingested_by"] != context.run.run_id, not e["rows_quarantined"])
        )
        rows = [
            [f"`{e['source']}`", e["rows_read"], e["rows_valid"], e["rows_quarantined"], e["ingested_by"][:8]]
            for e in ledger
        ]
        every_file = f": every file is in `{store.url(f'raw/{dataset.name}/{POINTER}')}`"
        summary = markdown_table(["source", "read", "valid", "quarantined", "read by run"], rows, every_file)
        if record["files_read"] < len(record["ledger"]):
            summary += (
                f"\n\nThis run read {record['files_read']} of {len(record['ledger'])} files; the others are the same "
                "objects, ingested the same way by the runs named, and their parts were copied."
            )
        if refused:
            reasons = [[f"`{e['source']}`", e["file_error"]] for e in refused]
            summary += "\n\n**Refused files**\n\n" + markdown_table(["source", "why"], reasons, every_file)
        for entry in record["ledger"]:
            if entry.get("extra_columns"):
                context.log.warning(f"{entry['source']}: undeclared column(s) {entry['extra_columns']} ignored")
        if copies := same_bytes(record["ledger"]):
            said = "; ".join(" = ".join(f"`{source}`" for source in group) for group in copies)
            context.log.warning(f"landed files with the same bytes (every row a duplicate of the other's): {said}")
            summary += (
                f"\n\n**Landed files with the same bytes** (their rows are duplicates; the later file's win): {said}"
            )
        written = footers(store, record["parts"])
        return dg.MaterializeResult(
            metadata={
                **stage_metadata(
                    dataset,
                    store,
                    record["generation"],
                    record["rows_valid"],
                    sum(e.get("raw_bytes", 0) for e in record["ledger"]),
                    record["rows_quarantined"],
                    summary,
                ),
                "files": len(record["ledger"]),
                "files_read": record["files_read"],
                "files_refused": record["files_refused"],
            },
            check_results=[
                schema_check(dataset, store, written, schema),
                conservation_check(
                    "rows read = written + quarantined",
                    record["rows_read"],
                    {"written": sum(m.num_rows for m in written.values()), "quarantined": record["rows_quarantined"]},
                ),
                files_check(record["ledger"]),
            ],
        )

    @dg.asset(
        **_common(
            dataset,
            "validated",
            "Rows that pass the dataset's Great Expectations suite: raw's parts less the failing rows, which "
            "are quarantined naming the expectations they failed (no second copy of the passing rows).",
        ),
        deps=[raw.key],
        kinds={"dask", "parquet", "great_expectations"},
        required_resource_keys=resource_keys,
        check_specs=[
            *_checks(dataset, "validated", SCHEMA_CHECK, CONSERVATION_CHECK, CRITICAL_CHECK, LEDGER_CHECK),
            *_checks(dataset, "validated", WARNING_CHECK, blocking=False),
        ],
        pool=dataset_pool(dataset),
    )
    @naming_refusals(dataset.site)
    def validated(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        store, dask = _resources(context, dataset)
        run_id = context.run.run_id
        if again := reingest_needed(dataset, require_current(store, f"raw/{dataset.name}", "raw")):
            raise dg.Failure(f"{dataset.name}: {again}")
        record = validate_dataset(
            store, dask.get_client(), dataset, suite, run_id, partial(run_finished, context.instance)
        )
        raw_record = require_current(store, f"raw/{dataset.name}", "raw")
        if raw_record["generation"] != record["raw_generation"]:  # the pool keeps other runs out; another instance?
            raise dg.Failure(f"{dataset.name}: raw was published again while validating; materialise validated again")
        results = record["results"]
        report = write_report(store, dask.get_client(), dataset, suite, results, run_id)
        try:
            if held := dask.refresh_workers():
                context.log.info(f"new Dask workers after validation: one held {held:.0%} of its memory limit")
        except Exception as exc:  # validation is done and published; only the next stage's headroom is lost
            context.log.warning(f"Dask workers not replaced after validation: {exc}")
        fraction = quarantined_fraction(raw_record, record)
        if fraction > dataset.max_quarantined_fraction:
            raise dg.Failure(
                f"{dataset.name}: {fraction:.1%} of rows quarantined "
                f"({raw_record['rows_quarantined'] + record['rows_quarantined']} of {raw_record['rows_read']}), "
                f"above the catalogue's max_quarantined_fraction {dataset.max_quarantined_fraction:.1%}: "
                f"{quarantine_causes(store, raw_record, record, results)} (the quarantine says why, row by row; "
                "where the data is right, fix the schema or the suite, else raise max_quarantined_fraction)",
                metadata={"expectations": dg.MetadataValue.md(expectations_table(results)), "data_docs": report},
            )
        passed_on, excluded = footers(store, record["raw_parts"]), footers(store, record["excluded"])
        quarantined = sum(m.num_rows for m in excluded.values())
        return dg.MaterializeResult(
            metadata={
                **stage_metadata(
                    dataset,
                    store,
                    f"validated/{dataset.name}/{POINTER}",
                    record["rows_valid"],
                    sum(e.get("raw_bytes", 0) for e in raw_record["ledger"]),  # where its rows are read from
                    record["rows_quarantined"],
                    expectations_table(results),
                ),
                "rows_from": location(store, raw_record["generation"]),
                "written_bytes": dg.MetadataValue.int(record["quarantine_bytes"]),  # its delete files, no copy of rows
                "quarantined_fraction": dg.MetadataValue.float(round(fraction, 6)),
                "parts_judged": dg.MetadataValue.int(record["parts_judged"]),  # by GX in this run; the rest kept
                "data_docs": report,
            },
            check_results=[
                schema_check(dataset, store, passed_on, schema),
                conservation_check(
                    "raw rows = passed on + quarantined",
                    raw_record["rows_valid"],
                    {
                        "passed on": record["rows_valid"],
                        "quarantined": quarantined,
                    },
                ),
                expectation_group_check(results, "critical"),
                expectation_group_check(results, "warning"),
                ledger_check(record["ledger"], store.url(f"validated/{dataset.name}/{POINTER}")),
            ],
        )

    @naming_refusals(dataset.site)
    def commit_shards(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        store, dask = _resources(context, dataset)
        since = latest_version(store, dataset)  # moved to newer inputs meanwhile, it stays there (make_latest)
        raw_record = require_current(store, f"raw/{dataset.name}", "raw")
        valid_record = require_current(store, f"validated/{dataset.name}", "validated")
        require_shardable(dataset, suite, raw_record, valid_record)
        version = version_for(dataset, suite, raw_record)
        prefix = version_prefix(dataset, version)
        for abandoned in remove_abandoned_writes(store, dataset, partial(run_finished, context.instance)):
            context.log.info(f"removed v={abandoned}/, left unfinished by runs that are over")
        staging = f"{staging_prefix(dataset)}/{version}/{context.run.run_id}"  # marks the version being written
        shard = partial(shard_version, store, dask.get_client(), dataset, raw_record, valid_record, staging=staging)
        rebuilt_at = f"{staging}/rebuilt"
        committed = committed_manifest(store, dataset, version)
        if committed:
            manifest = committed
            context.log.info(f"version {version} is already committed; re-pointing _latest at it")
        else:
            manifest = new_version(store, dataset, version, raw_record, valid_record, shard, context.run.run_id)
        problems, repaired = shard_problems(store, dask.get_client(), prefix, manifest), {}
        damaged = {path: problem for path, problem in problems.items() if path in shard_paths(manifest)}
        if damaged and committed:  # strays alone need no shard made again
            context.log.warning(f"version {version} is committed but damaged, {damaged}: rebuilding those shards")
            repair_version(store, dataset, prefix, manifest, damaged, shard(rebuilt_at), rebuilt_at)
            repaired, problems = damaged, shard_problems(store, dask.get_client(), prefix, manifest)
        verified = verified_check(manifest, problems, repaired)
        check_results = blocking_checks(store, dataset, manifest, verified, bool(committed))
        if not committed:
            manifest = write_manifest(store, dataset, manifest)
            if (by := committed_by(manifest)) != context.run.run_id:
                context.log.info(
                    f"version {version} was committed meanwhile by run {by} (another deployment on the same bucket), "
                    "with the shards this run made: its manifest stays as that run wrote it"
                )
        made_latest = make_latest(store, dataset, version, context.run.run_id, since, raw_record["generation"])
        latest = latest_version(store, dataset)
        if not made_latest:
            context.log.warning(
                f"{dataset.name}: version {version} is committed but not made the latest: _latest moved from "
                f"{since or 'no version'} to {latest} while this run sharded, and raw was published again from a "
                "newer landing (another deployment on the same bucket), so it stays there"
            )
        store.delete(staging)  # kept if anything above failed: it marks the version left unfinished
        store.remove_empty_folder(f"{staging_prefix(dataset)}/{version}")  # unless another run writes it too
        balance = manifest["conservation"]
        split_rows = [[s, v["rows"], len(v["shards"]), v["bytes"]] for s, v in manifest["splits"].items()]
        made = "committed" if made_latest else f"committed, not made the latest (`_latest` moved on to `{latest}`)"
        summary = f"Version `{version}` {made}: `{store.url(prefix)}/{MANIFEST}`\n\n" + markdown_table(
            ["split", "rows", "shards", "bytes"], split_rows
        )
        return dg.MaterializeResult(
            metadata={
                **stage_metadata(
                    dataset,
                    store,
                    prefix,
                    balance["rows_sharded"],
                    sum(v["bytes"] for v in manifest["splits"].values()),
                    manifest["quarantine"]["rows"],
                    summary,
                    deduplicated=True,
                ),
                "version": version,
                "manifest": dg.MetadataValue.path(store.url(f"{prefix}/{MANIFEST}")),
                "duplicates_dropped": balance["duplicates_dropped"],
                "made_latest": made_latest,
                "committed_by_run": committed_by(manifest),
                "latest": latest or "none",
                "repaired": dg.MetadataValue.json(repaired),
            },
            check_results=check_results,
        )

    @dg.asset(
        **_common(
            dataset,
            "shards",
            "Deduplicated, split and shuffled Parquet shards with a checksummed "
            f"manifest, under `shards/{dataset.name}/v=<version>/`; `shards/{dataset.name}/_latest` names "
            "the latest version.",
        ),
        deps=[validated.key],
        kinds={"dask", "parquet"},
        required_resource_keys=resource_keys,
        check_specs=_checks(dataset, "shards", SCHEMA_CHECK, CONSERVATION_CHECK, VERIFIED_CHECK),
        pool=dataset_pool(dataset),
    )
    def shards(context: dg.AssetExecutionContext) -> Iterator[dg.AssetCheckResult | dg.MaterializeResult]:
        try:
            result = commit_shards(context)
        except ChecksFailed as failed:  # the checks as judged: the UI shows them failed, not unevaluated
            yield from failed.results
            raise
        yield result

    return [landing, raw, validated, shards]


def build_catalog_assets(catalog: Catalog) -> list[dg.AssetsDefinition | dg.AssetSpec]:
    return [a for dataset in catalog.datasets.values() for a in build_dataset_assets(dataset, catalog)]


def materialisable_keys(dataset: Dataset) -> list[dg.AssetKey]:
    """raw, validated and shards: landing is external (partners produce it)."""
    return [asset_key(dataset, stage) for stage in STAGES[1:]]


def dataset_selection(datasets: list[Dataset]) -> dg.AssetSelection:
    return dg.AssetSelection.assets(*[key for d in datasets for key in materialisable_keys(d)])
