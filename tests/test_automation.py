"""Landing sensors (new file -> one run request, the same file -> none) and nightly schedules per zone."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.storage.tags import RUN_KEY_TAG  # Dagster's own name for it: the daemon's, not ours

from aifactory_assets.catalog import Catalog
from aifactory_assets.definitions import build_definitions
from aifactory_assets.demo import land_demo_data
from aifactory_assets.factory import asset_key, build_catalog_assets, materialisable_keys, store_key
from aifactory_assets.ingest import is_landed_data
from aifactory_assets.manifest import latest_manifest, latest_version
from aifactory_assets.publish import current
from resources import DaskCluster, ObjectStore
from schedules import NIGHTLY_CRON, landing_sensor, nightly_schedules, runs_in_flight
from schedules.landing_sensor import ASK_AGAIN_AFTER_S, ASKED_AGAIN_AT_MOST, LOST_AFTER_S, UNSETTLED_AT_MOST
from schedules.nightly import needs_run
from tests.conftest import evaluate, local_stores, materialize_all, pipeline_resources


def test_each_settled_change_requests_one_run(catalog: Catalog, tmp_path) -> None:
    """New, changed, removed or restored files: one run each, once the listing has held for a tick."""
    store = local_stores(catalog, tmp_path)["linkoping"]
    sensor = landing_sensor(catalog, "linkoping")
    dataset = catalog.datasets["palmer_penguins"]
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    cursor = evaluate(sensor, store, None).cursor
    keys = []

    def settle() -> dg.RunRequest:
        nonlocal cursor, observed
        changing = evaluate(sensor, store, cursor)  # still being copied in, as far as the sensor knows
        assert changing.run_requests == []
        (observed,) = changing.asset_events  # the landing asset shows the change in the UI, once
        assert observed.asset_key == asset_key(dataset, "landing")
        settled = evaluate(sensor, store, changing.cursor)
        assert len(settled.run_requests) == 1
        again = evaluate(sensor, store, settled.cursor)
        assert again.run_requests == [] and settled.asset_events == again.asset_events == []
        cursor = again.cursor
        request = settled.run_requests[0]
        assert request.run_key not in keys  # Dagster drops a run whose key it has seen
        keys.append(request.run_key)
        return request

    observed = None
    store.write_bytes("landing/palmer_penguins/drop-1.csv", b"record_id,species\n1,Adelie\n")
    store.write_bytes("landing/palmer_penguins/notes.txt", b"not a landing file for this dataset")
    request = settle()
    assert (observed.metadata["files"].value, observed.metadata["bytes"].value) == (1, 27)
    assert set(request.asset_selection) == {asset_key(dataset, s) for s in ("raw", "validated", "shards")}
    assert request.tags["dataset"] == "palmer_penguins" and request.tags["trigger"] == "landing"

    first = Path(store.path("landing/palmer_penguins/drop-1.csv"))
    first_mtime = first.stat().st_mtime_ns
    store.write_bytes("landing/palmer_penguins/drop-1.csv", b"record_id,species\n1,Adelie\n2,Gentoo\n")
    settle()
    store.write_bytes("landing/palmer_penguins/drop-2.csv", b"record_id,species\n3,Gentoo\n")
    settle()
    store.delete("landing/palmer_penguins/drop-2.csv")
    settle()
    store.write_bytes("landing/palmer_penguins/drop-1.csv", b"record_id,species\n1,Adelie\n")
    os.utime(first, ns=(first_mtime, first_mtime))  # restored as it was (rsync -a): the first file set again
    settle()
    store.write_bytes("landing/palmer_penguins/._drop-1.csv", b"\x00\x05\x16\x07")  # macOS's AppleDouble
    store.write_bytes("landing/palmer_penguins/.drop-3.csv", b"record_id,species\n4,")  # a copy in progress
    for _ in range(2):  # seen, then settled: still nothing to ingest
        result = evaluate(sensor, store, cursor)
        assert result.run_requests == []
        cursor = result.cursor
    for i in range(500):  # Dagster keeps the cursor with every tick: it must not grow with the landing zone
        store.write_bytes(f"landing/palmer_penguins/many-{i:03d}.csv", b"record_id,species\n1,Adelie\n")
    settle()
    assert len(cursor) < 1_000


def test_a_run_that_ingested_another_listing_is_followed_by_one_more(
    catalog: Catalog, tmp_path, dask: DaskCluster
) -> None:
    """A run lists the landing zone when it starts: a file dropped and removed while it waited was ingested
    though the listing is back to the one requested. The sensor sees it in the raw ledger and asks again."""
    stores = local_stores(catalog, tmp_path)
    store, dataset = stores["linkoping"], catalog.datasets["palmer_penguins"]
    land_demo_data(catalog, stores)
    sensor = landing_sensor(catalog, "linkoping")

    def tick(cursor: str | None) -> tuple[str, list[dg.RunRequest]]:
        result = evaluate(sensor, store, cursor)
        return result.cursor, [r for r in result.run_requests if r.tags["dataset"] == dataset.name]

    def ingest() -> None:  # the requested run's first step, as it starts
        assets = build_catalog_assets(catalog)
        selection = [asset_key(dataset, "raw")]
        dg.materialize(assets, resources=pipeline_resources(stores, dask), selection=selection)

    cursor, _ = tick(None)
    cursor, requested = tick(cursor)
    assert len(requested) == 1
    store.write_bytes("landing/palmer_penguins/late.csv", b"record_id,species\n9001,Adelie\n")
    ingest()  # the run starts now, and ingests the late file too
    store.delete("landing/palmer_penguins/late.csv")  # the listing is the requested one again
    cursor, again = tick(cursor)
    assert len(again) == 1 and again[0].run_key != requested[0].run_key
    cursor, none = tick(cursor)
    assert none == []  # asked once, not every tick while the run waits
    ingest()
    cursor, none = tick(cursor)
    assert none == []  # the new raw generation ingested the listing requested


def test_an_empty_placeholder_waits_for_its_bytes(catalog: Catalog, tmp_path, dask: DaskCluster) -> None:
    """An empty object under the final name (s3fs-fuse, `touch` then fill, an SFTP client that stalls) held
    for a tick started a run that committed a version without its rows, and the bytes another, pushing a
    good version out. The sensor and raw both take it for a copy still coming in; left empty for
    UNSETTLED_AT_MOST seconds, it is a file, refused and reported as ever."""
    stores = local_stores(catalog, tmp_path)
    store, dataset = stores["linkoping"], catalog.datasets["palmer_penguins"]
    land_demo_data(catalog, stores)
    sensor = landing_sensor(catalog, "linkoping")
    raw = partial(dg.materialize, build_catalog_assets(catalog), resources=pipeline_resources(stores, dask))

    def settle(cursor: str | None) -> tuple[str, list[dg.RunRequest], str | None]:
        result = evaluate(sensor, store, evaluate(sensor, store, cursor).cursor)
        return result.cursor, result.run_requests, result.skip_message

    def refused() -> dict[str, str]:
        """Runs raw (the nightly's run, a person's), and says which files it refused, and why."""
        assert raw(selection=[asset_key(dataset, "raw")]).success
        ledger = current(store, "raw/palmer_penguins")["ledger"]
        return {e["source"].rsplit("/", 1)[1]: e["file_error"] for e in ledger if "file_error" in e}

    cursor, requested, _ = settle(None)
    assert len(requested) == 1 and refused() == {}
    store.write_bytes("landing/palmer_penguins/2026-12.csv", b"")  # the upload has begun
    cursor, requested, skipped = settle(cursor)
    assert requested == [] and skipped == "palmer_penguins: already ingested"
    assert refused() == {}  # a run meanwhile (the nightly's) leaves it out too
    gone = time.time() - UNSETTLED_AT_MOST - 1
    os.utime(store.path("landing/palmer_penguins/2026-12.csv"), (gone, gone))  # it never got its bytes
    cursor, requested, _ = settle(cursor)
    assert len(requested) == 1 and refused() == {"2026-12.csv": "empty file (0 bytes): no header"}


def test_a_reset_cursor_never_reuses_a_run_key(catalog: Catalog, tmp_path) -> None:
    """Dagster drops a run whose key it has seen: after `dagster sensor cursor --delete`, a landing zone back
    at an earlier file set (a bad file withdrawn) must still start its run."""
    store = local_stores(catalog, tmp_path)["linkoping"]
    sensor = landing_sensor(catalog, "linkoping")

    def settle(cursor: str | None) -> tuple[str, list[str]]:
        result = evaluate(sensor, store, evaluate(sensor, store, cursor).cursor)
        return result.cursor, [r.run_key for r in result.run_requests]

    store.write_bytes("landing/palmer_penguins/a.csv", b"record_id,species\n1,Adelie\n")
    cursor, first = settle(None)
    store.write_bytes("landing/palmer_penguins/b.csv", b"record_id,species\n2,Adelie\n")
    cursor, second = settle(cursor)
    store.delete("landing/palmer_penguins/b.csv")
    _, after_reset = settle(None)
    assert len(first) == len(second) == len(after_reset) == 1
    assert after_reset[0] not in first + second


def test_a_landing_zone_that_never_holds_still_is_taken_as_it_is(catalog: Catalog, tmp_path) -> None:
    """A partner landing a file before every tick: the listing never holds for a tick, and was never ingested.
    After UNSETTLED_AT_MOST seconds of changes it is taken as it is, then at most once per that time."""
    store = local_stores(catalog, tmp_path)["linkoping"]
    sensor = landing_sensor(catalog, "linkoping")
    cursor, requested = None, []
    for minute in range(4):  # a new file each tick
        store.write_bytes(f"landing/palmer_penguins/{minute:02d}.csv", b"record_id,species\n1,Adelie\n")
        result = evaluate(sensor, store, cursor)
        cursor, requested = result.cursor, requested + result.run_requests
    assert requested == []
    state = json.loads(cursor)  # the changes began longer ago than that (the cursor is plain data)
    state["palmer_penguins"]["changing_since"] -= UNSETTLED_AT_MOST
    for minute in range(4, 6):
        store.write_bytes(f"landing/palmer_penguins/{minute:02d}.csv", b"record_id,species\n1,Adelie\n")
        result = evaluate(sensor, store, json.dumps(state) if minute == 4 else cursor)
        cursor, requested = result.cursor, requested + result.run_requests
    assert len(requested) == 1  # once, and the clock starts again


def test_a_forced_look_waits_for_a_queued_run_and_for_no_clock(catalog: Catalog, tmp_path) -> None:
    """Taken as it is after UNSETTLED_AT_MOST, a listing still waits for a queued run of the dataset (it
    lists the landing zone as it starts: one run per 10 minutes would pile up behind it); a `changing_since`
    from a clock ahead of this one does not hold the change off."""
    store = local_stores(catalog, tmp_path)["linkoping"]
    sensor = landing_sensor(catalog, "linkoping")
    dataset = catalog.datasets["palmer_penguins"]
    with dg.instance_for_test() as instance:

        def land_and_tick(minute: int, cursor: str | None, since: float | None = None) -> tuple[str, list]:
            store.write_bytes(f"landing/palmer_penguins/{minute:02d}.csv", b"record_id,species\n1,Adelie\n")
            if since is not None:
                state = json.loads(cursor)
                state["palmer_penguins"]["changing_since"] = since
                cursor = json.dumps(state)
            result = evaluate(sensor, store, cursor, instance)
            return result.cursor, result.run_requests

        cursor, _ = land_and_tick(0, None)
        waiting = queued_run(instance, materialisable_keys(dataset))
        cursor, requested = land_and_tick(1, cursor, since=time.time() - UNSETTLED_AT_MOST - 1)
        assert requested == []
        instance.report_run_canceled(instance.get_run_by_id(waiting))
        started = dg.DagsterRun(
            job_name="__ASSET_JOB",
            status=dg.DagsterRunStatus.STARTED,  # started, its raw step not yet published
            asset_selection=frozenset(materialisable_keys(dataset)),
        )
        instance.add_run(started)
        cursor, requested = land_and_tick(2, cursor)
        assert requested == []  # not a second run behind it: decided once it ends
        instance.report_run_canceled(instance.get_run_by_id(started.run_id))
        cursor, requested = land_and_tick(3, cursor)
        assert len(requested) == 1  # the wait kept the clock: asked at the next tick
        cursor, _ = land_and_tick(4, cursor, since=time.time() + 86_400)
        assert json.loads(cursor)["palmer_penguins"]["changing_since"] <= time.time()


def test_a_waiting_listing_reads_no_raw_record(catalog: Catalog, tmp_path) -> None:
    """The raw record holds a ledger entry per landed file (5.5 MB at 10,000 files): a new listing that
    waits for a run reads it on no tick, and unfinished runs are read once a tick."""
    store = ReadCountingStore(site="linkoping", root=str(tmp_path / "linkoping"))
    sensor = landing_sensor(catalog, "linkoping")
    JSON_READS.clear()
    store.write_bytes("raw/palmer_penguins/_current.json", b"{}")  # a raw generation, as far as reads go
    with dg.instance_for_test() as instance:
        queued_run(instance, materialisable_keys(catalog.datasets["palmer_penguins"]))
        store.write_bytes("landing/palmer_penguins/a.csv", b"record_id,species\n1,Adelie\n")
        cursor = evaluate(sensor, store, None, instance).cursor
        for _ in range(3):
            result = evaluate(sensor, store, cursor, instance)
            assert result.run_requests == []
            cursor = result.cursor
    assert JSON_READS == []


JSON_READS: list[str] = []  # outside the resource, which Dagster copies for the sensor


class ReadCountingStore(ObjectStore):
    """A local store that records the JSON objects read through it."""

    def read_json(self, key: str) -> Any:
        JSON_READS.append(key)
        return super().read_json(key)


def queued_run(instance: dg.DagsterInstance, selection: list[dg.AssetKey], tags: dict[str, str] | None = None) -> str:
    """A run made and not started yet (a queued one needs a code location's origin), materialising
    `selection`: the sensor and the nightly treat both alike."""
    run = dg.DagsterRun(
        job_name="__ASSET_JOB",
        status=dg.DagsterRunStatus.NOT_STARTED,
        asset_selection=frozenset(selection),
        tags=tags or {},
    )
    return instance.add_run(run).run_id


def test_a_listing_raw_ingested_or_a_run_will_ingest_is_not_asked_again(
    catalog: Catalog, tmp_path, dask: DaskCluster
) -> None:
    """Raw ingested the listing already (the nightly's run, a person's): no run, unless shards were never
    made from it. A change while a run reads: one more run, not a third while that one still waits in the
    queue; but the run that published is no reason to wait, nor is a cancelled one."""
    stores = local_stores(catalog, tmp_path)
    store, dataset = stores["linkoping"], catalog.datasets["palmer_penguins"]
    land_demo_data(catalog, stores)
    sensor = landing_sensor(catalog, "linkoping")
    resources = pipeline_resources(stores, dask)
    ingest = partial(dg.materialize, build_catalog_assets(catalog), resources=resources)
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> tuple[str, list[dg.RunRequest]]:
            result = evaluate(sensor, store, cursor, instance)
            return result.cursor, [r for r in result.run_requests if r.tags["dataset"] == dataset.name]

        def settle() -> list[dg.RunRequest]:
            nonlocal cursor
            cursor, _ = tick(cursor)
            cursor, requested = tick(cursor)
            return requested

        cursor = None
        published = ingest(selection=[asset_key(dataset, "raw")])  # a person's run, sensor off: its raw step
        running = dg.DagsterRun(
            job_name="__ASSET_JOB",
            run_id=published.run_id,
            status=dg.DagsterRunStatus.STARTED,  # its validated and shards steps to go
            asset_selection=frozenset(materialisable_keys(dataset)),
        )
        instance.add_run(running)
        assert settle() == []  # that run carries the listing on
        instance.report_run_canceled(instance.get_run_by_id(running.run_id))
        whole = instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", status=dg.DagsterRunStatus.NOT_STARTED))
        cursor = None
        assert settle() == []  # `make materialize`: the whole asset job, with no selection, is on its way
        instance.report_run_canceling(whole)
        assert settle() == []  # still ending: its raw step may yet publish
        instance.report_run_canceled(instance.get_run_by_id(whole.run_id))
        cursor, requested = tick(cursor)
        assert len(requested) == 1  # decided again once no run carries it: nothing was sharded from it
        assert ingest(selection=materialisable_keys(dataset)).success  # that run
        cursor = None  # `dagster sensor cursor --delete`
        assert settle() == []  # raw holds this listing, and the version a run would commit is the latest
        manifest = f"shards/palmer_penguins/v={latest_version(store, dataset)}/manifest.json"
        kept = store.read_bytes(manifest)
        store.write_bytes(manifest, b"{not json")
        cursor = None
        assert len(settle()) == 1  # state unreadable: a run says why, as the nightly's does...
        assert settle() == []  # ...once, not every tick
        store.write_bytes(manifest, kept)

        store.write_bytes("landing/palmer_penguins/late.csv", b"record_id,species\n9001,Adelie\n")
        assert len(settle()) == 1
        waiting = queued_run(instance, materialisable_keys(dataset))  # the run requested, in the queue
        store.write_bytes("landing/palmer_penguins/later.csv", b"record_id,species\n9002,Adelie\n")
        ingest(selection=[asset_key(dataset, "raw")])  # an earlier run, reading as the file lands
        store.delete("landing/palmer_penguins/later.csv")
        cursor, requested = tick(cursor)
        assert requested == []  # raw changed, but the queued run will list the landing zone as it starts
        instance.report_run_canceled(instance.get_run_by_id(waiting))
        cursor, requested = tick(cursor)
        assert len(requested) == 1  # cancelled: raw still holds later.csv, withdrawn

        store.write_bytes("landing/palmer_penguins/later.csv", b"record_id,species\n9002,Adelie\n")
        publishing = ingest(selection=[asset_key(dataset, "raw")])  # its raw step, reading as the file lands...
        publisher = dg.DagsterRun(
            job_name="__ASSET_JOB",
            run_id=publishing.run_id,
            status=dg.DagsterRunStatus.STARTED,  # ...its validated and shards steps still to go
            asset_selection=frozenset(materialisable_keys(dataset)),
        )
        instance.add_run(publisher)
        store.delete("landing/palmer_penguins/later.csv")  # ...and the file withdrawn
        cursor, requested = tick(cursor)
        assert len(requested) == 1  # the run still running published already: it will not list again


def test_a_run_that_ended_before_raw_is_asked_for_again_a_few_times(
    catalog: Catalog, tmp_path, dask: DaskCluster
) -> None:
    """The run asked for that fails before its raw step publishes (an S3 503, a Dask cluster that did not
    start) or is cancelled in the queue ingested nothing: its files waited for the nightly, unsaid. It is
    asked for again, ASKED_AGAIN_AT_MOST times, each after a wait twice the one before; then the ticks say
    that it stopped."""
    stores = local_stores(catalog, tmp_path)
    store = stores["linkoping"]
    refusing = {**stores, "linkoping": RefusingStore(site="linkoping", root=store.root, refused="landing")}
    sensor = landing_sensor(catalog, "linkoping")
    store.write_bytes("landing/palmer_penguins/a.csv", b"record_id,species\n1,Adelie\n")
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> tuple[str, list[dg.RunRequest], str | None]:
            result = evaluate(sensor, store, cursor, instance)
            return result.cursor, result.run_requests, result.skip_message

        cursor, _, _ = tick(None)
        cursor, requested, _ = tick(cursor)
        failed = dg.materialize(  # the run, as the daemon makes it, on a store refusing its reads
            build_catalog_assets(catalog),
            selection=requested[0].asset_selection,
            resources=pipeline_resources(refusing, dask),
            instance=instance,
            tags=daemon_tags(requested[0]),
            raise_on_error=False,
        )
        assert not failed.success
        for again in range(1, ASKED_AGAIN_AT_MOST + 1):
            cursor, requested, skipped = tick(cursor)  # not at once: an outage of minutes would use them all up
            waited = re.search(rf"asked again in (\d+) s \({again}/{ASKED_AGAIN_AT_MOST}\)", skipped or "")
            assert requested == [] and waited and 0 < int(waited[1]) <= ASK_AGAIN_AFTER_S * 2 ** (again - 1)
            state = json.loads(cursor)
            state["palmer_penguins"]["asked_at"] -= ASK_AGAIN_AFTER_S * 2 ** (again - 1)
            cursor, requested, _ = tick(json.dumps(state))
            assert len(requested) == 1
            queued = queued_run(instance, requested[0].asset_selection, daemon_tags(requested[0]))
            cursor, requested, skipped = tick(cursor)
            assert requested == []
            assert skipped == f"palmer_penguins: waiting for run {queued} (asked again {again}/{ASKED_AGAIN_AT_MOST})"
            instance.report_run_canceled(instance.get_run_by_id(queued))
        for _ in range(2):  # said on every tick, not only in the log of the one that gave up
            cursor, requested, skipped = tick(cursor)
            assert requested == []
            assert f"asked again {ASKED_AGAIN_AT_MOST}/{ASKED_AGAIN_AT_MOST}, not again until the files" in skipped


def test_a_run_asked_for_that_never_appears_is_asked_for_again(catalog: Catalog, tmp_path) -> None:
    """A run deleted in the UI (or one the daemon never made) was waited for until the files changed: once
    the instance still holds none LOST_AFTER_S after the request, the tick asks again, counting it."""
    store = local_stores(catalog, tmp_path)["linkoping"]
    sensor = landing_sensor(catalog, "linkoping")
    store.write_bytes("landing/palmer_penguins/a.csv", b"record_id,species\n1,Adelie\n")
    with dg.instance_for_test() as instance:
        cursor = evaluate(sensor, store, None, instance).cursor
        asked = evaluate(sensor, store, cursor, instance)
        assert len(asked.run_requests) == 1  # and the run it names is never made
        waiting = evaluate(sensor, store, asked.cursor, instance)
        assert waiting.run_requests == [] and waiting.skip_message == "palmer_penguins: waiting for the run asked for"
        state = json.loads(waiting.cursor)
        state["palmer_penguins"]["asked_at"] -= LOST_AFTER_S + 1
        again = evaluate(sensor, store, json.dumps(state), instance)
        assert len(again.run_requests) == 1 and again.run_requests[0].run_key != asked.run_requests[0].run_key
        assert json.loads(again.cursor)["palmer_penguins"]["asked_again"] == 1


def daemon_tags(request: dg.RunRequest) -> dict[str, str]:
    """The tags the sensor daemon gives the run it makes of `request`: the sensor finds its run by them."""
    return {**request.tags, RUN_KEY_TAG: request.run_key}


def test_a_tick_without_runs_says_why_for_each_dataset(catalog: Catalog, tmp_path) -> None:
    """Dagster's UI shows a skipped tick's reason: without one, files settling, waiting for a queued run or
    already ingested all read "Sensor function returned an empty result"."""
    moved = catalog.datasets["wine_cultivars"].model_copy(update={"site": "linkoping"})
    two = catalog.model_copy(update={"datasets": {**catalog.datasets, "wine_cultivars": moved}})
    store = local_stores(two, tmp_path)["linkoping"]
    sensor = landing_sensor(two, "linkoping")
    store.write_bytes("landing/palmer_penguins/a.csv", b"record_id,species\n1,Adelie\n")
    with dg.instance_for_test() as instance:
        first = evaluate(sensor, store, None, instance)
        assert first.skip_message == (
            "palmer_penguins: settling: 1 file(s), changing for 0 s\n"
            f"wine_cultivars: nothing landed matching {store.url('landing/wine_cultivars')}/*.jsonl"
        )
        queued = queued_run(instance, materialisable_keys(two.datasets["palmer_penguins"]))
        waiting = evaluate(sensor, store, first.cursor, instance)
        assert (
            waiting.skip_message.splitlines()[0]
            == f"palmer_penguins: waiting for run {queued}, queued or running for it"
        )


def test_one_datasets_refused_landing_zone_stops_no_other(catalog: Catalog, tmp_path) -> None:
    """A bucket policy refusing one dataset's prefix (a restricted health dataset, say): the site's other
    datasets are still watched and run; the tick fails, naming it, only when every listing is refused."""
    moved = catalog.datasets["wine_cultivars"].model_copy(update={"site": "linkoping"})
    two = catalog.model_copy(update={"datasets": {**catalog.datasets, "wine_cultivars": moved}})
    assert [d.name for d in two.datasets_of("linkoping")] == ["palmer_penguins", "wine_cultivars"]
    store = RefusingStore(site="linkoping", root=str(tmp_path / "linkoping"), refused="landing/wine_cultivars")
    store.write_bytes("landing/palmer_penguins/a.csv", b"record_id,species\n1,Adelie\n")
    sensor = landing_sensor(two, "linkoping")
    settled = evaluate(sensor, store, evaluate(sensor, store, None).cursor)
    assert [r.tags["dataset"] for r in settled.run_requests] == ["palmer_penguins"]
    requests, _ = tick({s.name: s for s in nightly_schedules(two)}["linkoping_nightly"], store)
    assert [r.tags["datasets"] for r in requests] == ["palmer_penguins,wine_cultivars"]  # the run names the refusal
    everything = RefusingStore(site="linkoping", root=store.root, refused="landing")
    with pytest.raises(PermissionError, match="Access Denied"):
        evaluate(sensor, everything, settled.cursor)


class RefusingStore(ObjectStore):
    """A local store whose listings under `refused` fail as s3fs reports an S3 AccessDenied."""

    refused: str

    def list_objects(self, prefix: str, pattern: str = "**") -> list:
        if prefix.startswith(self.refused):
            raise PermissionError("Access Denied")
        return super().list_objects(prefix, pattern)


def test_sensor_resolves_through_definitions(catalog: Catalog, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("AIFACTORY_HOME", str(tmp_path))
    defs = build_definitions(catalog)
    sensor = defs.resolve_sensor_def("kajaani_landing_sensor")
    store = local_stores(catalog, tmp_path)["kajaani"]
    store.write_bytes("landing/seattle_weather/2026-11.parquet", b"PAR1")
    cursor = None
    for _ in range(2):  # seen, then settled
        with dg.build_sensor_context(
            resources=defs.resources, instance=dg.DagsterInstance.ephemeral(), cursor=cursor
        ) as context:
            result = sensor.evaluate_tick(context)
        cursor = result.cursor
    assert [r.tags["dataset"] for r in result.run_requests] == ["seattle_weather"]


def test_one_nightly_schedule_per_site_in_its_zone(catalog: Catalog) -> None:
    schedules = {s.name: s for s in nightly_schedules(catalog)}
    assert all(catalog.sites[name.removesuffix("_nightly")].name in s.description for name, s in schedules.items())
    assert set(schedules) == {f"{site}_nightly" for site in catalog.sites}
    for site in catalog.sites.values():
        schedule = schedules[f"{site.id}_nightly"]
        assert schedule.cron_schedule == NIGHTLY_CRON
        assert schedule.execution_timezone == site.timezone
        assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING  # nightly without a person


def tick(
    schedule: dg.ScheduleDefinition, store: ObjectStore, instance: dg.DagsterInstance | None = None
) -> tuple[list[dg.RunRequest], str | None]:
    """The daemon's own path: `evaluate_tick`, with the site's store as the schedule's resource (and an
    instance, whose runs the schedule looks at: a persistent one, as a schedule context needs)."""
    with contextlib.ExitStack() as stack:
        instance = instance or stack.enter_context(dg.instance_for_test())
        context = stack.enter_context(
            dg.build_schedule_context(resources={store_key(store.site): store}, instance=instance)
        )
        data = schedule.evaluate_tick(context)
    return list(data.run_requests or []), data.skip_message


def test_nightly_runs_only_what_a_run_would_change(catalog: Catalog, tmp_path, dask: DaskCluster) -> None:
    """Nothing landed is skipped, not failed every night; an up-to-date dataset is skipped (a run would
    re-read every landed file for the same version), unless a shard of it went missing; new files or a
    changed suite give a run."""
    stores = local_stores(catalog, tmp_path)
    store, dataset = stores["linkoping"], catalog.datasets["palmer_penguins"]
    nightly = {s.name: s for s in nightly_schedules(catalog)}["linkoping_nightly"]
    requests, skipped = tick(nightly, store)
    assert (
        requests == []
        and f"palmer_penguins: nothing landed matching {store.url('landing/palmer_penguins')}/*.csv" in skipped
    )

    land_demo_data(catalog, stores)
    with dg.instance_for_test() as instance:
        waiting = queued_run(instance, [asset_key(dataset, "raw")])  # a sensor's run, waiting for a slot
        requests, skipped = tick(nightly, store, instance)
        assert requests == [] and skipped == f"palmer_penguins: run {waiting} is queued or running for it"
        with pytest.MonkeyPatch.context() as patch:  # a run made longer ago than that is taken as stuck
            patch.setattr(runs_in_flight, "STUCK_AFTER", timedelta(0))
            assert len(tick(nightly, store, instance)[0]) == 1
    requests, _ = tick(nightly, store)
    assert [set(r.asset_selection) for r in requests] == [set(materialisable_keys(dataset))]
    assert requests[0].tags["trigger"] == "nightly" and requests[0].tags["datasets"] == "palmer_penguins"

    assert materialize_all(catalog, stores, dask, selection=requests[0].asset_selection).success
    requests, skipped = tick(nightly, store)
    version = latest_version(store, dataset)
    assert requests == [] and skipped == f"palmer_penguins: up to date (version {version})"
    shard = latest_manifest(store, dataset)["splits"]["val"]["shards"][0]["path"]
    moved = store.read_bytes(f"shards/palmer_penguins/v={version}/{shard}")
    store.delete(f"shards/palmer_penguins/v={version}/{shard}")  # someone's clean-up
    requests, _ = tick(nightly, store)
    assert len(requests) == 1  # the run repairs it
    store.write_bytes(f"shards/palmer_penguins/v={version}/{shard}", moved)
    manifest = store.read_bytes(f"shards/palmer_penguins/v={version}/manifest.json")
    store.delete(f"shards/palmer_penguins/v={version}/manifest.json")
    due, reason = needs_run(store, dataset, catalog.suites["palmer_penguins"])
    assert due and "has shards missing or of another size (['manifest.json'])" in reason
    store.write_bytes(f"shards/palmer_penguins/v={version}/manifest.json", manifest[: len(manifest) // 2])
    due, reason = needs_run(store, dataset, catalog.suites["palmer_penguins"])  # cut short: a run makes it again
    assert due and "has shards missing or of another size (['manifest.json'])" in reason
    store.write_bytes(f"shards/palmer_penguins/v={version}/manifest.json", manifest)

    suite = catalog.suites["palmer_penguins"]
    stricter = {**suite, "expectations": [*suite["expectations"], suite["expectations"][-1]]}
    changed = catalog.model_copy(update={"suites": {**catalog.suites, "palmer_penguins": stricter}})
    requests, _ = tick({s.name: s for s in nightly_schedules(changed)}["linkoping_nightly"], store)
    assert len(requests) == 1  # the suite gives another version

    impossible = {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 10**9}}
    failing = catalog.model_copy(
        update={"suites": {**catalog.suites, "palmer_penguins": {**suite, "expectations": [impossible]}}}
    )
    assert not materialize_all(failing, stores, dask, selection=requests[0].asset_selection).success
    failing_nightly = {s.name: s for s in nightly_schedules(failing)}["linkoping_nightly"]
    requests, skipped = tick(failing_nightly, store)
    assert requests == [] and "failed on these files and this suite and release" in skipped
    assert "critical expectation(s)" in skipped  # the shards step's own reason: nothing changed, it stands

    store.write_bytes("landing/palmer_penguins/late.csv", b"record_id,species\n9001,Adelie\n")
    requests, _ = tick(nightly, store)
    assert len(requests) == 1  # a file the sensor missed (switched off, say)


@pytest.mark.parametrize(
    ("age", "waited"),
    [(timedelta(hours=24, seconds=5), True), (timedelta(hours=25), True), (timedelta(hours=48), False)],
)
def test_last_nights_run_still_going_at_02_is_waited_for(
    catalog: Catalog, tmp_path, age: timedelta, waited: bool
) -> None:
    """Last night's run still going at 02:00 is a day old, give or take the daemon's seconds of lag (25 h
    across the autumn clock change): it is waited for, not run a second time beside itself. A run far
    older is taken as stuck (its worker killed) and holds its datasets back no longer."""
    store = local_stores(catalog, tmp_path)["linkoping"]
    store.write_bytes("landing/palmer_penguins/a.csv", b"record_id,species\n1,Adelie\n")
    nightly = {s.name: s for s in nightly_schedules(catalog)}["linkoping_nightly"]
    with dg.instance_for_test() as instance:
        run = dg.DagsterRun(
            job_name="__ASSET_JOB",
            status=dg.DagsterRunStatus.STARTED,
            asset_selection=frozenset(materialisable_keys(catalog.datasets["palmer_penguins"])),
            tags={"trigger": "nightly"},
        )
        made = datetime.now(UTC).replace(tzinfo=None) - age  # the run storage's time: UTC, without a zone
        instance.run_storage.add_historical_run(run, made)
        requests, _ = tick(nightly, store, instance)
    assert (requests == []) is waited


@pytest.mark.parametrize(
    ("key", "data"),
    [
        ("2026-11.csv", True),
        ("site-a/2026-11.csv", True),
        (".2026-11.csv.Xy12Ab", False),  # rsync's temporary name
        ("2026-11.csv.part", False),
        ("2026-11.csv._COPYING_", False),  # hdfs dfs -put
        ("._2026-11.csv", False),  # macOS's AppleDouble
        ("_SUCCESS", False),
        ("_temporary/0/part-0.csv", False),
        ("site-a/.hidden/2026-11.csv", False),
    ],
)
def test_copies_in_progress_and_markers_are_not_landed_data(key: str, data: bool) -> None:
    assert is_landed_data(key) is data
