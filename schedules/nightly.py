"""Nightly reconciliation: one schedule per site, at 02:00 in the site's own time zone.

It runs the site's datasets that are not up to date: files landed that the current raw generation did not
ingest (the sensor switched off, or a change it missed), or a catalogue entry, suite or release that gives
another version than the latest committed one. A dataset with nothing landed is skipped rather than failed,
and so is one whose latest version is what a run would commit again, or whose last run failed on the same
files, suite and release: such a run would re-read every landed file for the same outcome; and one that a
queued or running run already ingests (a sensor's, a person's). The tick says why for each dataset. One
dataset whose state cannot be read (a prefix a bucket policy refuses) is run, where the run names the
error; the tick fails only when the store refused every dataset.
"""

from __future__ import annotations

import dagster as dg

from aifactory_assets.catalog import Catalog, Dataset
from aifactory_assets.factory import (
    dataset_selection,
    materialisable_keys,
    naming_refusals,
    require_shardable,
    revalidation_needed,
    store_key,
)
from aifactory_assets.ingest import landed_objects, nothing_landed, reingest_needed
from aifactory_assets.manifest import committed_manifest, latest_version, version_for, version_prefix
from aifactory_assets.pools import set_up_pools
from aifactory_assets.publish import current
from aifactory_assets.shard_layout import MANIFEST, shard_entries
from resources.object_store import ObjectStore
from schedules.listings import ingested_listing, listing_digest
from schedules.runs_in_flight import run_ingesting, unfinished_runs

NIGHTLY_CRON = "0 2 * * *"


def needs_run(store: ObjectStore, dataset: Dataset, suite: dict) -> tuple[bool, str]:
    """Whether a run tonight would change what `dataset` has committed, and why."""
    landed = [o.fingerprint() for o in landed_objects(store, dataset)]
    if not landed:
        return False, nothing_landed(store, dataset)
    raw = current(store, f"raw/{dataset.name}") or {}
    if listing_digest(landed) != ingested_listing(raw):
        return True, f"{dataset.name}: landed files that the current raw generation did not ingest"
    latest = latest_version(store, dataset)
    wanted = version_for(dataset, suite, raw)
    if wanted == latest and (damaged := shards_gone_or_resized(store, dataset, latest)):
        return (
            True,
            f"{dataset.name}: version {latest} has shards missing or of another size ({damaged}): a run repairs it",
        )
    if wanted == latest:
        return False, f"{dataset.name}: up to date (version {latest})"
    if failed := verdict_stands(store, dataset, suite, raw):
        return False, f"{dataset.name}: version {wanted} failed on these files and this suite and release ({failed})"
    return True, f"{dataset.name}: its catalogue entry, suite and release give version {wanted}; latest is {latest}"


def shards_gone_or_resized(store: ObjectStore, dataset: Dataset, version: str) -> list[str]:
    """A committed version's shards that are missing or not of the manifest's size: one listing, where
    hashing every shard each night would read them all (a run hashes them, and repairs what it finds)."""
    folder = version_prefix(dataset, version)
    manifest = committed_manifest(store, dataset, version)
    if manifest is None:  # `_latest` names a version whose folder went, or whose manifest is unreadable
        return [MANIFEST]
    sizes = {o.key[len(folder) + 1 :]: o.size for o in store.list_objects(folder, "*.parquet")}
    shards = shard_entries(manifest)
    return [s["path"] for s in shards if sizes.get(s["path"]) != s["bytes"]]


def verdict_stands(store: ObjectStore, dataset: Dataset, suite: dict, raw: dict) -> str | None:
    """Why the shards refused the current raw and validated records, where a run would decide the same:
    both made by this release (ingest fingerprint) from these files and this suite. A dataset failing its
    suite is skipped until something changes, rather than read whole again each night to fail again."""
    valid = current(store, f"validated/{dataset.name}")
    if valid is None or reingest_needed(dataset, raw):
        return None
    if revalidation_needed(suite, raw, valid):
        return None
    try:
        require_shardable(dataset, suite, raw, valid)
    except dg.Failure as failure:
        return failure.description
    return None


def nightly_schedule(catalog: Catalog, site: str) -> dg.ScheduleDefinition:
    info, datasets = catalog.sites[site], catalog.datasets_of(site)

    @dg.schedule(
        name=f"{site}_nightly",
        cron_schedule=NIGHTLY_CRON,
        execution_timezone=info.timezone,
        target=dataset_selection(datasets),
        description=f"At 02:00 {info.timezone}, materialises each dataset of {info.name} ({info.city}) that "
        "is not up to date: landed files not ingested yet, or a catalogue entry, suite or release changed.",
        tags={"site": site, "trigger": "nightly"},
        required_resource_keys={store_key(site)},
        default_status=dg.DefaultScheduleStatus.RUNNING,
    )
    @naming_refusals(site)
    def schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest | dg.SkipReason:
        store = getattr(context.resources, store_key(site))
        due, reasons, refusals = [], [], []
        set_up_pools(context.instance, datasets)
        in_flight = unfinished_runs(context.instance)
        for dataset in datasets:
            if running := run_ingesting(in_flight, dataset):
                run, reason = False, f"{dataset.name}: run {running} is queued or running for it"
            else:
                try:
                    run, reason = needs_run(store, dataset, catalog.suites[dataset.name])
                except Exception as exc:  # an unreadable record, a refused prefix: the run says what is wrong
                    refusals += [exc] if isinstance(exc, PermissionError) else []
                    run, reason = True, f"{dataset.name}: state unreadable ({type(exc).__name__}: {exc})"
            due += [dataset] if run else []
            reasons.append(reason)
            context.log.info(reason)
        if refusals and len(refusals) == len(datasets):
            raise refusals[0]  # the whole store refused: the tick fails, the refusal named (naming_refusals)
        if not due:
            return dg.SkipReason("; ".join(reasons))
        return dg.RunRequest(
            asset_selection=[key for dataset in due for key in materialisable_keys(dataset)],
            tags={"site": site, "trigger": "nightly", "datasets": ",".join(d.name for d in due)},
        )

    return schedule


def nightly_schedules(catalog: Catalog) -> list[dg.ScheduleDefinition]:
    return [nightly_schedule(catalog, site) for site in catalog.sites if catalog.datasets_of(site)]
