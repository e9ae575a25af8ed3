"""Landing-zone sensors: one per site; a change under `landing/<dataset>/` (a file new, changed or removed)
starts one run of that dataset's assets once the listing has stayed the same for one tick, so a file still
being copied in, or a drop of many files, is ingested once, whole. A settled listing that the current raw
generation already ingested (the nightly's run, or a person's) starts nothing. The cursor holds, per
dataset, the listing last seen, the one last requested, the raw pointer last looked at, a count of
requests and a token made with the state. The run key names the listing, the token and the count, so
returning to an earlier file set is a new run, not one Dagster drops as a repeat, also after the cursor
is reset.
Listings are kept as digests: Dagster stores the cursor with every tick, and a landing zone can hold many
thousands of files.

A run lists the landing zone when it starts, not when it was requested: if the files changed in between
and changed back (a file dropped and removed while the run waited), the run ingested another listing than
the one requested. Once raw is published again (its pointer changes: a HEAD request per tick), the sensor
compares the listing with what that generation ingested and asks again if they differ, unless a run that
ingests the dataset is still queued or running (it will list the landing zone itself). An empty landing
zone starts nothing: the latest version stays until files land again. A landing zone that cannot be
listed (a bucket policy refusing one dataset's prefix) is logged and listed again next tick; the site's
other datasets go on, and the tick fails, naming the refusal, only when every dataset's listing failed."""

import hashlib
import json
from secrets import token_hex
from typing import Any

import dagster as dg

from aifactory_assets.catalog import Catalog, Dataset
from aifactory_assets.factory import asset_key, dataset_selection, materialisable_keys, naming_refusals, store_key
from aifactory_assets.ingest import landed_objects, landing_prefix
from aifactory_assets.metadata import location
from aifactory_assets.publish import POINTER, current
from resources.object_store import ObjectInfo, ObjectStore
from schedules.runs_in_flight import run_ingesting, unfinished_runs

MINIMUM_INTERVAL_SECONDS = 30


def landing_sensor(catalog: Catalog, site: str) -> dg.SensorDefinition:
    datasets, info = catalog.datasets_of(site), catalog.sites[site]

    @dg.sensor(
        name=f"{site}_landing_sensor",
        description=f"Every {MINIMUM_INTERVAL_SECONDS} s, starts a run for each dataset of {info.name} "
        f"({info.city}) whose landing zone has changed and settled.",
        target=dataset_selection(datasets),
        minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        required_resource_keys={store_key(site)},
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    @naming_refusals(site)
    def sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        store = getattr(context.resources, store_key(site))
        before: dict[str, Any] = json.loads(context.cursor) if context.cursor else {}
        requests, observations, cursor, unlisted = [], [], {}, []
        for dataset in datasets:
            state = before.get(dataset.name, {})
            try:
                landed = landed_objects(store, dataset)
            except Exception as exc:  # one dataset's prefix refused must not stop the site's others
                context.log.error(f"{dataset.name}: landing zone not listed, listed again next tick: {exc}")
                unlisted.append(exc)
                cursor[dataset.name] = state
                continue
            listing = listing_digest([o.fingerprint() for o in landed]) if landed else None
            if listing != state.get("seen"):
                observations.append(landing_observation(store, dataset, landed))
            now = {key: state.get(key) for key in ("requested", "raw_pointer")}
            now |= {"seen": listing, "requests": state.get("requests", 0), "since": state.get("since") or token_hex(4)}
            if listing is not None and listing == state.get("seen"):  # settled
                try:
                    pointer = raw_pointer(store, dataset)
                    ask = should_ask(context, store, dataset, listing, pointer, now)
                except Exception as exc:  # one dataset's unreadable raw record must not stop the site's others
                    context.log.warning(f"{dataset.name}: raw record or runs unreadable, checked next tick: {exc}")
                else:
                    if ask:
                        now["requests"] += 1
                        requests.append(_run_request(dataset, listing, f"{now['since']}-{now['requests']}"))
                    now["requested"], now["raw_pointer"] = listing, pointer
            cursor[dataset.name] = now
        if unlisted and len(unlisted) == len(datasets):
            raise unlisted[0]  # nothing listed at all: the tick fails, the refusal named (naming_refusals)
        return dg.SensorResult(
            run_requests=requests, asset_events=observations, cursor=json.dumps(cursor, sort_keys=True)
        )

    return sensor


def should_ask(
    context: dg.SensorEvaluationContext,
    store: ObjectStore,
    dataset: Dataset,
    listing: str,
    pointer: str | None,
    state: dict[str, Any],
) -> bool:
    """Whether a settled listing needs a run: it is not the one last requested, or raw was published since
    and ingested another; and the current raw generation has not ingested it already (the nightly's run, a
    person's). After a publish, not while a run that ingests the dataset is queued or running: it lists the
    landing zone as it starts."""
    changed = listing != state["requested"]
    if not changed and pointer == state["raw_pointer"]:
        return False
    if ingested_listing(current(store, f"raw/{dataset.name}")) == listing:
        return False
    if not changed and (run := run_ingesting(unfinished_runs(context.instance), dataset)):
        context.log.info(f"{dataset.name}: run {run} will ingest the landing zone as it starts; not asked again")
        return False
    return True


def landing_observation(store: ObjectStore, dataset: Dataset, landed: list[ObjectInfo]) -> dg.AssetObservation:
    """What the landing asset shows in the UI: its files as the sensor saw them change."""
    newest = max((o.mtime for o in landed if o.mtime is not None), default=None)
    return dg.AssetObservation(
        asset_key=asset_key(dataset, "landing"),
        metadata={
            "files": dg.MetadataValue.int(len(landed)),
            "bytes": dg.MetadataValue.int(sum(o.size for o in landed)),
            "newest_file": dg.MetadataValue.timestamp(newest) if newest is not None else "none",
            "location": location(store, landing_prefix(dataset)),
        },
    )


def listing_digest(fingerprints: list[str]) -> str:
    """A landing zone's listing in 16 hex digits (each fingerprint names its key, size and version)."""
    return hashlib.sha256("\n".join(sorted(fingerprints)).encode()).hexdigest()[:16]


def raw_pointer(store: ObjectStore, dataset: Dataset) -> str | None:
    """The raw generation pointer's fingerprint (one HEAD request): it changes when raw is published."""
    try:
        return store.info(f"raw/{dataset.name}/{POINTER}").fingerprint()
    except FileNotFoundError:
        return None


def ingested_listing(raw: dict[str, Any] | None) -> str | None:
    """The digest of the listing a raw record ingested (every landed file is in its ledger)."""
    objects = [entry.get("object") for entry in (raw or {}).get("ledger", [])]
    if not objects or None in objects:
        return None
    return listing_digest([ObjectInfo(**o).fingerprint() for o in objects])


def _run_request(dataset: Dataset, listing: str, request: str) -> dg.RunRequest:
    """`request` is the dataset's cursor state's own token and its count of requests: a cursor reset (or a
    dataset taken out of the catalogue and put back) starts a new token, where a count starting again at 1
    made keys Dagster had seen, and it dropped those runs."""
    return dg.RunRequest(
        run_key=f"{dataset.name}-{request}-{listing}",
        asset_selection=materialisable_keys(dataset),
        tags={"site": dataset.site, "dataset": dataset.name, "trigger": "landing"},
    )


def landing_sensors(catalog: Catalog) -> list[dg.SensorDefinition]:
    return [landing_sensor(catalog, site) for site in catalog.sites if catalog.datasets_of(site)]
