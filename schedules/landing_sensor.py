"""Landing-zone sensors: one per site; a change under `landing/<dataset>/` (a file new, changed or removed)
starts one run of that dataset's assets once the listing has stayed the same for one tick, so a file still
being copied in, or a drop of many files, is ingested once, whole (or once it has kept changing for
UNSETTLED_AT_MOST seconds: a landing zone that never holds still). A listing other than the one last
requested waits while a run that ingests the dataset is queued or running, and starts nothing where the
current raw generation already ingested it (the nightly's run, or a person's) and a run would change
nothing committed. The cursor holds, per dataset, the
listing last seen, the one last requested, the raw pointer last looked at, when the listing began to
change, a count of requests and a token made with the state, whether the run last requested is still
awaited and how often its listing was asked for again. The run key names
the listing, the token and the count, so returning to an earlier file set is a new run, not one Dagster
drops as a repeat, also after the cursor is reset.
Listings are kept as digests: Dagster stores the cursor with every tick, and a landing zone can hold many
thousands of files.

A run lists the landing zone when it starts, not when it was requested: if the files changed in between
and changed back (a file dropped and removed while the run waited), the run ingested another listing than
the one requested. Once raw is published again (its pointer changes: a HEAD request per tick), the sensor
compares the listing with what that generation ingested and asks again if they differ; while another run
that ingests the dataset is queued or running, it waits for that run (`decide`; runs made more than
STUCK_AFTER ago are taken as stuck, `runs_in_flight`). A run requested that ends failed or cancelled
before raw was published (a Dask cluster that did not start, an S3 503, a run cancelled in the queue) is
asked for again, ASKED_AGAIN_AT_MOST times (`follow_request`). An empty landing
zone starts nothing: the latest version stays until files land again. An empty object is a copy still
coming in (`still_arriving`), for UNSETTLED_AT_MOST seconds. A tick that asks for no run says why, a line
per dataset. A landing zone that cannot be
listed (a bucket policy refusing one dataset's prefix) is logged and listed again next tick; the site's
other datasets go on, and the tick fails, naming the refusal, only when every dataset's listing failed."""

import json
import time
from collections.abc import Callable
from functools import cache, partial
from secrets import token_hex
from typing import Any, NamedTuple

import dagster as dg

from aifactory_assets.catalog import Catalog, Dataset
from aifactory_assets.factory import asset_key, dataset_selection, materialisable_keys, naming_refusals, store_key
from aifactory_assets.ingest import UNSETTLED_AT_MOST, landed_objects, landing_prefix, nothing_landed
from aifactory_assets.metadata import location
from aifactory_assets.pools import set_up_pools
from aifactory_assets.publish import POINTER, current
from resources.object_store import ObjectInfo, ObjectStore
from schedules.listings import ingested_listing, listing_digest
from schedules.nightly import needs_run
from schedules.runs_in_flight import UnfinishedRun, run_ingesting, unfinished_runs

MINIMUM_INTERVAL_SECONDS = 30
ASKED_AGAIN_AT_MOST = 3  # times a listing is asked for again, its runs ending without publishing raw
# A run asked for that the instance still does not hold after this long was never made, or was deleted: the
# daemon makes a run of a request in the tick that returned it.
LOST_AFTER_S = 600
# Asked again no sooner than this after the last request, doubled each time: the re-asks span a quarter of an
# hour of an outage (an S3 endpoint refusing, a Dask scheduler restarting), not three ticks.
ASK_AGAIN_AFTER_S = 120
SKIP_LINES = 20  # datasets a tick that asks for no run names, a line each
RUN_KEY_TAG = "dagster/run_key"  # the tag Dagster gives a sensor's run: its RunRequest's run_key


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
        requests, observations, cursor, reasons, unlisted = [], [], {}, [], []
        set_up_pools(context.instance, datasets)
        runs = cache(partial(unfinished_runs, context.instance))  # read once a tick, where a decision needs them
        for dataset in datasets:
            state = before.get(dataset.name, {})
            try:
                landed = landed_objects(store, dataset)
            except Exception as exc:  # one dataset's prefix refused must not stop the site's others
                context.log.error(f"{dataset.name}: landing zone not listed, listed again next tick: {exc}")
                unlisted.append(exc)
                cursor[dataset.name] = state
                reasons.append(f"{dataset.name}: landing zone not listed ({type(exc).__name__}), listed again")
                continue
            suite = catalog.suites[dataset.name]
            cursor[dataset.name], request, reason = step(context, store, dataset, suite, landed, state, runs)
            if cursor[dataset.name]["seen"] != state.get("seen"):
                observations.append(landing_observation(store, dataset, landed))
            requests += [request] if request else []
            reasons.append(reason)
        if unlisted and len(unlisted) == len(datasets):
            raise unlisted[0]  # nothing listed at all: the tick fails, the refusal named (naming_refusals)
        return dg.SensorResult(
            run_requests=requests,
            asset_events=observations,
            cursor=json.dumps(cursor, sort_keys=True),
            skip_reason=None if requests else skip_reason(reasons),
        )

    return sensor


ASK, NO, WAIT = "ask", "no", "wait"


class Decision(NamedTuple):
    """What a listing to act on gets, and why: the tick's line for the dataset where it asks for no run."""

    act: str  # ASK, NO or WAIT
    why: str
    awaiting: bool = False  # a NO while the run asked for has not ended: it may end without publishing raw
    asked_again: int = 0  # times the listing was asked for again, its runs ending without publishing raw


def step(
    context: dg.SensorEvaluationContext,
    store: ObjectStore,
    dataset: Dataset,
    suite: dict[str, Any],
    landed: list[ObjectInfo],
    state: dict[str, Any],
    runs: Callable[[], list[UnfinishedRun]],
) -> tuple[dict[str, Any], dg.RunRequest | None, str]:
    """A dataset's next cursor state, its run request if one is due, and why. A listing is acted on once it
    has held for a tick, or once it has kept changing for UNSETTLED_AT_MOST seconds (a partner landing a
    file before every tick would otherwise never be ingested); then the clock starts again. An error or a
    WAIT leaves the state as it was: looked at again next tick."""
    clock = time.time()
    listing = listing_digest([o.fingerprint() for o in landed]) if landed else None
    now = {key: state.get(key) for key in ("requested", "raw_pointer")}
    now |= {"seen": listing, "requests": state.get("requests", 0), "since": state.get("since") or token_hex(4)}
    now |= {"awaiting": state.get("awaiting", False), "asked_again": state.get("asked_again", 0)}
    now["asked_at"] = state.get("asked_at")  # when the last request was made (this host's clock)
    if listing is None:
        return now, None, nothing_landed(store, dataset)
    unsettled = listing != state.get("seen")
    if unsettled:  # a clock that went back (another host's cursor) does not hold the change off
        now["changing_since"] = min(state.get("changing_since") or clock, clock)
        if (changing := clock - now["changing_since"]) < UNSETTLED_AT_MOST:
            return now, None, f"{dataset.name}: settling: {len(landed)} file(s), changing for {changing:.0f} s"
    try:
        pointer = raw_pointer(store, dataset)
        decision = decide(context, store, dataset, suite, listing, pointer, now, runs)
    except Exception as exc:  # one dataset's unreadable raw record must not stop the site's others
        context.log.warning(f"{dataset.name}: raw record or runs unreadable, checked next tick: {exc}")
        return now, None, f"{dataset.name}: raw record or runs unreadable ({type(exc).__name__}), checked again"
    if decision.act == WAIT:
        return now, None, decision.why
    if unsettled:
        context.log.info(f"{dataset.name}: landing zone changing for {clock - now['changing_since']:.0f} s; as it is")
        now["changing_since"] = clock
    now |= {"requested": listing, "raw_pointer": pointer, "asked_again": decision.asked_again}
    now["awaiting"] = decision.act == ASK or decision.awaiting
    if decision.act == NO:
        return now, None, decision.why
    now["requests"] += 1
    now["asked_at"] = clock
    return now, _run_request(dataset, now), decision.why


def decide(
    context: dg.SensorEvaluationContext,
    store: ObjectStore,
    dataset: Dataset,
    suite: dict[str, Any],
    listing: str,
    pointer: str | None,
    state: dict[str, Any],
    runs: Callable[[], list[UnfinishedRun]],
) -> Decision:
    """For a listing to act on: ASK for a run, NO run, or WAIT (nothing taken as seen: decided again next
    tick). A listing other than the one last requested, or the one last requested where raw was published
    since: WAIT while a run that ingests the dataset is queued or running (it lists the landing zone as it
    starts, or carries on what its raw step ingested), the one that published raw aside where the listing
    is the one requested; then a run if raw ingested another listing, or for a new listing that raw already
    holds, where a run would change what is committed (the nightly's `needs_run`: shards never made from
    it, say). The listing last requested, raw not published since: `follow_request`. A run that fails after
    its raw step is not asked for again for the listing it ingested: the nightly's rules decide (they skip
    one failing again on the same files, suite and release)."""
    changed = listing != state["requested"]
    if not changed and pointer == state["raw_pointer"]:
        return follow_request(context, dataset, state, runs)
    # The raw record (a ledger entry per landed file) is read once a decision, and not while a new listing
    # waits: only the listing last requested needs it first, to leave out the run that published it.
    raw = None if changed else current(store, f"raw/{dataset.name}")
    if run := run_ingesting(runs(), dataset, besides=(raw or {}).get("run_id")):
        context.log.info(f"{dataset.name}: run {run} is queued or running for it; decided once it ends")
        return Decision(WAIT, f"{dataset.name}: waiting for run {run}, queued or running for it")
    if changed:
        raw = current(store, f"raw/{dataset.name}")
    if ingested_listing(raw) != listing:
        return Decision(ASK, f"{dataset.name}: landed files that raw did not ingest")
    if not changed:
        return Decision(NO, f"{dataset.name}: already ingested")
    try:
        due, why = needs_run(store, dataset, suite)
    except Exception as exc:  # as the nightly does: the run says what is wrong, where the UI shows it
        context.log.warning(f"{dataset.name}: state unreadable, a run will say why: {exc}")
        return Decision(ASK, f"{dataset.name}: state unreadable, a run will say why")
    return Decision(ASK if due else NO, why)


def follow_request(
    context: dg.SensorEvaluationContext,
    dataset: Dataset,
    state: dict[str, Any],
    runs: Callable[[], list[UnfinishedRun]],
) -> Decision:
    """The listing last requested, raw not published since: NO run, unless the run asked for ended failed
    or cancelled (a Dask cluster that did not start, an S3 503, a run cancelled in the queue). Nothing was
    ingested then, and the files would wait for the nightly unsaid: it is asked for again, up to
    ASKED_AGAIN_AT_MOST times, ASK_AGAIN_AFTER_S after the last request at the soonest, doubled each time
    (a run failing on every try stops there, and the tick says so). So is a run
    the instance still does not hold LOST_AFTER_S after the request (deleted in the UI, or never made),
    which was otherwise waited for until the files changed. Only while `awaiting`: one look at the runs of
    a run key, not every tick."""
    asked = state["asked_again"]
    if not state["awaiting"]:
        done = given_up(asked) if asked >= ASKED_AGAIN_AT_MOST else "already ingested"
        return Decision(NO, f"{dataset.name}: {done}", asked_again=asked)
    found = context.instance.get_runs(dg.RunsFilter(tags={RUN_KEY_TAG: run_key(dataset, state)}), limit=1)
    run = found[0] if found else None  # the newest: Dagster's automatic retry of it, where there is one
    lost = run is None and time.time() - (state.get("asked_at") or time.time()) > LOST_AFTER_S
    if not lost and (run is None or not run.is_finished):
        waited = f"run {run.run_id}" if run else "the run asked for"
        again = f" (asked again {asked}/{ASKED_AGAIN_AT_MOST})" if asked else ""
        return Decision(NO, f"{dataset.name}: waiting for {waited}{again}", awaiting=True, asked_again=asked)
    if run is not None and run.status == dg.DagsterRunStatus.SUCCESS:
        return Decision(NO, f"{dataset.name}: already ingested", asked_again=asked)
    if run is None:
        ended = f"the run asked for is not in the instance {LOST_AFTER_S} s on (deleted, or never made)"
    else:
        ended = f"requested run {run.run_id} ended {run.status.value} before raw was published"
    if other := run_ingesting(runs(), dataset):
        return Decision(WAIT, f"{dataset.name}: {ended}; waiting for run {other}, queued or running for it")
    if asked >= ASKED_AGAIN_AT_MOST:
        context.log.warning(f"{dataset.name}: {ended}; {given_up(asked)}")
        return Decision(NO, f"{dataset.name}: {ended}; {given_up(asked)}", asked_again=asked)
    if (wait := ASK_AGAIN_AFTER_S * 2**asked - (time.time() - (state.get("asked_at") or 0))) > 0:
        later = f"asked again in {wait:.0f} s ({asked + 1}/{ASKED_AGAIN_AT_MOST})"
        return Decision(NO, f"{dataset.name}: {ended}; {later}", awaiting=True, asked_again=asked)
    context.log.warning(f"{dataset.name}: {ended}; asked again {asked + 1}/{ASKED_AGAIN_AT_MOST}")
    return Decision(ASK, f"{dataset.name}: {ended}; asked again", asked_again=asked + 1)


def given_up(asked: int) -> str:
    """Said on every tick until the files or raw change: not only in the log of the tick that gave up."""
    return f"asked again {asked}/{ASKED_AGAIN_AT_MOST}, not again until the files change: the nightly runs it"


def skip_reason(reasons: list[str]) -> str:
    """A tick with no run request says why, a line per dataset: the first SKIP_LINES of them."""
    more = len(reasons) - SKIP_LINES
    return "\n".join(reasons[:SKIP_LINES] + ([f"... and {more} more datasets"] if more > 0 else []))


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


def run_key(dataset: Dataset, state: dict[str, Any]) -> str:
    """The run key of the state's last request: its listing, the state's own token and its count of
    requests. A cursor reset (or a dataset taken out of the catalogue and put back) starts a new token, where
    a count starting again at 1 made keys Dagster had seen, and it dropped those runs."""
    return f"{dataset.name}-{state['since']}-{state['requests']}-{state['requested']}"


def _run_request(dataset: Dataset, state: dict[str, Any]) -> dg.RunRequest:
    return dg.RunRequest(
        run_key=run_key(dataset, state),
        asset_selection=materialisable_keys(dataset),
        tags={"site": dataset.site, "dataset": dataset.name, "trigger": "landing"},
    )


def landing_sensors(catalog: Catalog) -> list[dg.SensorDefinition]:
    return [landing_sensor(catalog, site) for site in catalog.sites if catalog.datasets_of(site)]
