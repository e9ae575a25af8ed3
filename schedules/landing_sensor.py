"""Landing-zone sensors: one per site; a change under `landing/<dataset>/` (a file new, changed or removed)
starts one run of that dataset's assets once the listing has stayed the same for one tick, so a file still
being copied in, or a drop of many files, is ingested once, whole (or once it has kept changing for
UNSETTLED_AT_MOST seconds: a landing zone that never holds still). A listing other than the one last
requested waits while a run that ingests the dataset is queued or running, and starts nothing where the
current raw generation already ingested it (the nightly's run, or a person's) and a run would change
nothing committed. The cursor holds, per dataset, the
listing last seen, the one last requested, the raw pointer last looked at, when the listing began to
change, a count of requests and a token made with the state. The run key names
the listing, the token and the count, so returning to an earlier file set is a new run, not one Dagster
drops as a repeat, also after the cursor is reset.
Listings are kept as digests: Dagster stores the cursor with every tick, and a landing zone can hold many
thousands of files.

A run lists the landing zone when it starts, not when it was requested: if the files changed in between
and changed back (a file dropped and removed while the run waited), the run ingested another listing than
the one requested. Once raw is published again (its pointer changes: a HEAD request per tick), the sensor
compares the listing with what that generation ingested and asks again if they differ; while another run
that ingests the dataset is queued or running, it waits for that run (`decide`; runs made more than a
day ago are taken as stuck, `runs_in_flight`). An empty landing
zone starts nothing: the latest version stays until files land again. A landing zone that cannot be
listed (a bucket policy refusing one dataset's prefix) is logged and listed again next tick; the site's
other datasets go on, and the tick fails, naming the refusal, only when every dataset's listing failed."""

import json
import time
from collections.abc import Callable
from functools import cache, partial
from secrets import token_hex
from typing import Any

import dagster as dg

from aifactory_assets.catalog import Catalog, Dataset
from aifactory_assets.factory import asset_key, dataset_selection, materialisable_keys, naming_refusals, store_key
from aifactory_assets.ingest import landed_objects, landing_prefix
from aifactory_assets.metadata import location
from aifactory_assets.publish import POINTER, current
from resources.object_store import ObjectInfo, ObjectStore
from schedules.listings import ingested_listing, listing_digest
from schedules.nightly import needs_run
from schedules.runs_in_flight import UnfinishedRun, run_ingesting, unfinished_runs

MINIMUM_INTERVAL_SECONDS = 30
UNSETTLED_AT_MOST = 600  # seconds a listing may keep changing before it is taken as it is


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
        runs = cache(partial(unfinished_runs, context.instance))  # read once a tick, where a decision needs them
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
            suite = catalog.suites[dataset.name]
            cursor[dataset.name], request = step(context, store, dataset, suite, listing, state, runs)
            requests += [request] if request else []
        if unlisted and len(unlisted) == len(datasets):
            raise unlisted[0]  # nothing listed at all: the tick fails, the refusal named (naming_refusals)
        return dg.SensorResult(
            run_requests=requests, asset_events=observations, cursor=json.dumps(cursor, sort_keys=True)
        )

    return sensor


ASK, NO, WAIT = "ask", "no", "wait"


def step(
    context: dg.SensorEvaluationContext,
    store: ObjectStore,
    dataset: Dataset,
    suite: dict[str, Any],
    listing: str | None,
    state: dict[str, Any],
    runs: Callable[[], list[UnfinishedRun]],
) -> tuple[dict[str, Any], dg.RunRequest | None]:
    """A dataset's next cursor state, and its run request if one is due. A listing is acted on once it has
    held for a tick, or once it has kept changing for UNSETTLED_AT_MOST seconds (a partner landing a file
    before every tick would otherwise never be ingested); then the clock starts again. An error or a WAIT
    leaves the state as it was: looked at again next tick."""
    clock = time.time()
    now = {key: state.get(key) for key in ("requested", "raw_pointer")}
    now |= {"seen": listing, "requests": state.get("requests", 0), "since": state.get("since") or token_hex(4)}
    if listing is None:
        return now, None
    unsettled = listing != state.get("seen")
    if unsettled:  # a clock that went back (another host's cursor) does not hold the change off
        now["changing_since"] = min(state.get("changing_since") or clock, clock)
        if clock - now["changing_since"] < UNSETTLED_AT_MOST:
            return now, None
    try:
        pointer = raw_pointer(store, dataset)
        decision = decide(context, store, dataset, suite, listing, pointer, now, runs)
    except Exception as exc:  # one dataset's unreadable raw record must not stop the site's others
        context.log.warning(f"{dataset.name}: raw record or runs unreadable, checked next tick: {exc}")
        return now, None
    if decision == WAIT:
        return now, None
    if unsettled:
        context.log.info(f"{dataset.name}: landing zone changing for {clock - now['changing_since']:.0f} s; as it is")
        now["changing_since"] = clock
    request = None
    if decision == ASK:
        now["requests"] += 1
        request = _run_request(dataset, listing, f"{now['since']}-{now['requests']}")
    now["requested"], now["raw_pointer"] = listing, pointer
    return now, request


def decide(
    context: dg.SensorEvaluationContext,
    store: ObjectStore,
    dataset: Dataset,
    suite: dict[str, Any],
    listing: str,
    pointer: str | None,
    state: dict[str, Any],
    runs: Callable[[], list[UnfinishedRun]],
) -> str:
    """For a listing to act on: ASK for a run, NO run, or WAIT (nothing taken as seen: decided again next
    tick). A listing other than the one last requested, or the one last requested where raw was published
    since: WAIT while a run that ingests the dataset is queued or running (it lists the landing zone as it
    starts, or carries on what its raw step ingested), the one that published raw aside where the listing
    is the one requested; then a run if raw ingested another listing, or for a new listing that raw already
    holds, where a run would change what is committed (the nightly's `needs_run`: shards never made from
    it, say). A run that fails after its raw step is not asked for again for the listing it ingested: the
    nightly's rules decide (they skip one failing again on the same files, suite and release)."""
    changed = listing != state["requested"]
    if not changed and pointer == state["raw_pointer"]:
        return NO
    # The raw record (a ledger entry per landed file) is read once a decision, and not while a new listing
    # waits: only the listing last requested needs it first, to leave out the run that published it.
    raw = None if changed else current(store, f"raw/{dataset.name}")
    if run := run_ingesting(runs(), dataset, besides=(raw or {}).get("run_id")):
        context.log.info(f"{dataset.name}: run {run} is queued or running for it; decided once it ends")
        return WAIT
    if changed:
        raw = current(store, f"raw/{dataset.name}")
    if ingested_listing(raw) != listing:
        return ASK
    if not changed:
        return NO
    try:
        return ASK if needs_run(store, dataset, suite)[0] else NO
    except Exception as exc:  # as the nightly does: the run says what is wrong, where the UI shows it
        context.log.warning(f"{dataset.name}: state unreadable, a run will say why: {exc}")
        return ASK


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


def raw_pointer(store: ObjectStore, dataset: Dataset) -> str | None:
    """The raw generation pointer's fingerprint (one HEAD request): it changes when raw is published."""
    try:
        return store.info(f"raw/{dataset.name}/{POINTER}").fingerprint()
    except FileNotFoundError:
        return None


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
