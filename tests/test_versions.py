"""Versions: a failed run leaves no visible version and a re-run completes it; retention never touches the
latest or an unfinished version; a record keeps its split when new data arrives."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from distributed import Client

from aifactory_assets.catalog import Catalog, Dataset
from aifactory_assets.checks import CONSERVATION_CHECK, SCHEMA_CHECK, VERIFIED_CHECK, shard_problems
from aifactory_assets.demo import land_demo_data
from aifactory_assets.factory import asset_key, build_catalog_assets, run_finished
from aifactory_assets.ingest import ingest_dataset
from aifactory_assets.loader import ShardReader
from aifactory_assets.manifest import (
    OUTPUT_MODULES,
    committed_versions,
    landing_order,
    latest_manifest,
    latest_version,
    make_latest,
    part_seqs,
    remove_abandoned_writes,
    version_for,
    version_id,
    write_manifest,
)
from aifactory_assets.publish import current, publish
from aifactory_assets.staging import staging_prefix
from aifactory_assets.validation import suite_fingerprint
from resources import DaskCluster, ObjectStore
from tests.conftest import every_run_over, local_stores, pipeline_resources, s3_stores

DATASET = "seattle_weather"


@pytest.fixture
def setup(catalog: Catalog, tmp_path: Path, dask: DaskCluster):
    dataset = catalog.datasets[DATASET]
    dataset = dataset.model_copy(
        update={"shards": dataset.shards.model_copy(update={"retention": 2, "target_rows": 200})}
    )
    small = catalog.model_copy(update={"datasets": {DATASET: dataset}})
    stores = local_stores(small, tmp_path)
    land_demo_data(small, stores)
    return small, dataset, stores[dataset.site], stores, dask


def run(catalog: Catalog, stores, dask, stages=("raw", "validated", "shards"), instance=None):
    dataset = catalog.datasets[DATASET]
    return dg.materialize(
        build_catalog_assets(catalog),
        resources=pipeline_resources(stores, dask),
        instance=instance or dg.DagsterInstance.ephemeral(),
        selection=[asset_key(dataset, s) for s in stages],
        raise_on_error=False,
    )


def land_more(store: ObjectStore, year: int, name: str = "extra") -> None:
    """A later drop: a year of new days (new keys) for the same dataset; the same name replaces it."""
    days = pd.date_range(f"{year}-01-01", f"{year}-12-31", freq="D")
    frame = pd.DataFrame(
        {"date": days, "precipitation": 0.5, "temp_max": 10.0, "temp_min": 2.0, "wind": 3.0, "weather": "rain"}
    )
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    store.write_bytes(f"landing/{DATASET}/{name}.parquet", buffer.getvalue())


def all_rows(store: ObjectStore, manifest: dict) -> pd.DataFrame:
    prefix = f"shards/{DATASET}/v={manifest['version']}"
    return pd.concat(
        pd.read_parquet(store.url(f"{prefix}/{s['path']}")).assign(split=split)
        for split, v in manifest["splits"].items()
        for s in v["shards"]
    )


def commit(store: ObjectStore, dataset: Dataset, version: str, created_at: str, run_id: str) -> None:
    """A version of no shards committed as the shards step commits one: its manifest, then `_latest`."""
    manifest = {"version": version, "created_at": created_at, "splits": {}, "conservation": {}, "quarantine": {}}
    write_manifest(store, dataset, manifest)
    raw = (current(store, f"raw/{DATASET}") or {}).get("generation")
    make_latest(store, dataset, version, run_id, since=latest_version(store, dataset), raw_generation=raw)


def test_a_failed_run_leaves_no_visible_version_and_a_rerun_completes_it(setup) -> None:
    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    first = latest_manifest(store, dataset)

    land_more(store, 2016)
    assert run(catalog, stores, dask, stages=("raw", "validated")).success
    version = version_for(dataset, catalog.suites[DATASET], current(store, f"raw/{DATASET}"))
    blocker = Path(store.path(f"shards/{DATASET}/v={version}/manifest.json"))
    blocker.mkdir(parents=True)  # the commit point cannot be written: the run dies after its shards

    instance = dg.DagsterInstance.ephemeral()  # the failed run and the rerun, as on a site's instance
    failed = run(catalog, stores, dask, stages=("shards",), instance=instance)
    assert not failed.success
    assert list(blocker.parent.glob("train-*.parquet")), "the shards were written before the failure"
    staged = [o.key for o in store.list_objects(f"shards/{DATASET}/_staging")]
    assert any("/sorted/" in k for k in staged) and not any("/scattered/" in k for k in staged)  # gone once gathered
    assert latest_manifest(store, dataset)["version"] == first["version"]  # nothing new is visible
    latest_url = store.url(f"shards/{DATASET}/v={first['version']}/manifest.json")
    assert len(list(ShardReader(latest_url, "train"))) > 0

    blocker.rmdir()
    assert run(catalog, stores, dask, stages=("shards",), instance=instance).success
    second = latest_manifest(store, dataset)
    assert second["version"] == version != first["version"]
    assert second["conservation"]["rows_read"] == first["conservation"]["rows_read"] + 366
    assert not store.list_objects(f"shards/{DATASET}/_staging")  # the failed run's, swept; the rerun's, committed
    assert not list(Path(store.path(f"shards/{DATASET}/_staging")).iterdir())  # nor their empty folders left


def test_retention_keeps_the_latest_and_never_an_unfinished_version(setup) -> None:
    catalog, dataset, store, stores, dask = setup
    unfinished = Path(store.path(f"shards/{DATASET}/v=0000unfinished00/train-00000-of-00001.parquet"))
    unfinished.parent.mkdir(parents=True)
    unfinished.write_bytes(b"being written")
    made = []
    for year in (None, 2016, 2017, 2018):
        if year:
            land_more(store, year)
        assert run(catalog, stores, dask).success
        made.append(latest_manifest(store, dataset)["version"])
    assert len(set(made)) == 4
    kept = [v for _, v in committed_versions(store, dataset)]
    assert kept == made[-2:]  # retention 2: the newest two, the latest among them
    assert json.loads(store.read_bytes(f"shards/{DATASET}/_latest"))["version"] == made[-1]
    assert unfinished.exists()
    assert not store.list_objects(staging_prefix(dataset))  # the runs' own, and retention's marks
    assert not list(Path(store.path(staging_prefix(dataset))).iterdir())  # and their folders
    for old in made[:2]:
        assert not store.exists(f"shards/{DATASET}/v={old}")
        assert not store.exists(f"quarantine/{DATASET}/v={old}")  # the quarantine kept for it goes with it
    assert all(store.list_objects(f"quarantine/{DATASET}/v={v}/raw") for v in kept)


def test_retention_counts_a_version_made_latest_again_as_recent(setup) -> None:
    """A landing reverted to earlier files re-points _latest at an old version: the next commit must not
    remove it as the oldest, while jobs pinned to it still read it."""
    _, dataset, store, *_ = setup  # retention 2
    for i in range(2):
        commit(store, dataset, f"ver{i}", f"2026-01-0{i + 1}", f"run{i}")
    make_latest(store, dataset, "ver0", "run-reverted", since="ver1", raw_generation=None)  # ver0 again
    commit(store, dataset, "ver2", "2026-01-03", "run2")
    assert sorted(v for _, v in committed_versions(store, dataset)) == ["ver0", "ver2"]


def shards_node(dataset: Dataset) -> str:
    return "__".join(asset_key(dataset, "shards").path)


def test_retention_never_removes_the_version_another_deployment_just_made_the_latest(setup, monkeypatch) -> None:
    """Deployment A moves `_latest` to its version; before A's retention, deployment B (its own instance,
    the same bucket) commits one, whose retention removes A's. A's retention must not then remove B's,
    which would leave `_latest` naming no version at all."""
    from aifactory_assets import manifest

    catalog, dataset, store, stores, dask = setup
    dataset = dataset.model_copy(update={"shards": dataset.shards.model_copy(update={"retention": 1})})
    catalog = catalog.model_copy(update={"datasets": {DATASET: dataset}})
    retention = manifest.apply_retention

    def deployment_b_commits_first(*args, **kwargs) -> list[str]:
        monkeypatch.setattr(manifest, "apply_retention", retention)  # B's own commit retains as it is
        commit(store, dataset, "deployment-b", "2099-01-01", "run-b")
        return retention(*args, **kwargs)

    monkeypatch.setattr(manifest, "apply_retention", deployment_b_commits_first)
    assert run(catalog, stores, dask).success
    assert latest_manifest(store, dataset)["version"] == "deployment-b"
    assert [v for _, v in committed_versions(store, dataset)] == ["deployment-b"]


def test_a_version_removed_while_it_is_re_pointed_at_is_not_written_again(setup, monkeypatch) -> None:
    """A landing gone back to earlier files re-points at their committed version. Another deployment's
    retention removing it between this run's checks and its commit must not be undone by writing its
    manifest again (a version without shards): the run fails, naming it, and `_latest` stays."""
    from aifactory_assets import factory, manifest

    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    old = latest_manifest(store, dataset)["version"]
    land_more(store, 2016)
    assert run(catalog, stores, dask).success
    new = latest_manifest(store, dataset)["version"]
    store.delete(f"landing/{DATASET}/extra.parquet")  # back to the old inputs: the old version again
    checks = factory.blocking_checks

    def removed_by_deployment_b(*args, **kwargs) -> list[dg.AssetCheckResult]:
        results = checks(*args, **kwargs)
        manifest.remove_committed(store, dataset, old, "run-b")
        return results

    monkeypatch.setattr(factory, "blocking_checks", removed_by_deployment_b)
    result = run(catalog, stores, dask)
    assert not result.success
    assert f"version {old} was removed before it could be made the latest" in failure_message(result)
    assert latest_manifest(store, dataset)["version"] == new
    assert not store.exists(f"shards/{DATASET}/v={old}/manifest.json")


def ingest_as_another_deployment(store: ObjectStore, dask: DaskCluster, dataset: Dataset) -> None:
    """Raw ingested by another deployment while this one's run holds its client: a client of its own, not
    made the default, which, closed out of order with the run's, would leave Dask's default scheduler set
    to a client no longer there for the tests after."""
    with Client(dask.scheduler_address, set_as_default=False) as client:
        ingest_dataset(store, client, dataset, "run-b", lambda run_id: False)


def sharded_meanwhile(setup, monkeypatch, deployment_b: Callable[[], None]) -> tuple[str, dg.ExecuteInJobResult]:
    """A run that shards a new drop, `deployment_b` acting (on the same bucket) after this run wrote its
    manifest and before `_latest` moves; the version `_latest` named before, and the run's result."""
    from aifactory_assets import factory

    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    first = latest_manifest(store, dataset)["version"]
    land_more(store, 2016)
    write = factory.write_manifest

    def written_then_deployment_b(*args, **kwargs) -> dict:
        written = write(*args, **kwargs)
        deployment_b()
        return written

    monkeypatch.setattr(factory, "write_manifest", written_then_deployment_b)
    return first, run(catalog, stores, dask)


def test_latest_stays_at_a_version_another_deployment_committed_from_newer_inputs(setup, monkeypatch) -> None:
    """Another deployment lands, ingests and commits a newer drop while this run shards the older one: the
    version this run made is complete and stays committed, but `_latest` must not move back to older
    inputs; the run warns and its materialisation says so."""
    catalog, dataset, store, stores, dask = setup
    dataset = dataset.model_copy(update={"shards": dataset.shards.model_copy(update={"retention": 3})})
    catalog = catalog.model_copy(update={"datasets": {DATASET: dataset}})  # B's retention leaves this run's

    def deployment_b_commits_a_newer_drop() -> None:
        land_more(store, 2017, "later")
        ingest_as_another_deployment(store, dask, dataset)
        commit(store, dataset, "deployment-b", "2099-01-01", "run-b")

    _, result = sharded_meanwhile(
        (catalog, dataset, store, stores, dask), monkeypatch, deployment_b_commits_a_newer_drop
    )
    assert result.success
    [materialization] = result.asset_materializations_for_node(shards_node(dataset))
    made = materialization.metadata["version"].value
    assert materialization.metadata["made_latest"].value is False
    assert latest_manifest(store, dataset)["version"] == "deployment-b" == materialization.metadata["latest"].value
    assert made in [v for _, v in committed_versions(store, dataset)]
    assert "not made the latest" in materialization.metadata["summary"].value


def test_latest_moves_past_a_version_another_deployment_committed_from_older_inputs(setup, monkeypatch) -> None:
    """Another deployment that sharded older inputs finishes first and moves `_latest`: this run's inputs
    are still raw's current ones, so its version replaces that one, rather than the first to finish
    winning until the next nightly."""
    catalog, dataset, store, stores, dask = setup
    dataset = dataset.model_copy(update={"shards": dataset.shards.model_copy(update={"retention": 3})})
    catalog = catalog.model_copy(update={"datasets": {DATASET: dataset}})

    def deployment_b_commits_older_inputs() -> None:
        commit(store, dataset, "deployment-b", "2099-01-01", "run-b")

    _, result = sharded_meanwhile(
        (catalog, dataset, store, stores, dask), monkeypatch, deployment_b_commits_older_inputs
    )
    assert result.success
    [materialization] = result.asset_materializations_for_node(shards_node(dataset))
    assert materialization.metadata["made_latest"].value is True
    assert latest_manifest(store, dataset)["version"] == materialization.metadata["version"].value


def test_latest_moves_forward_past_a_drop_another_deployment_only_ingested(setup, monkeypatch) -> None:
    """Another deployment ingests a newer drop while this run shards (its validation may fail, and it
    commits nothing): `_latest` has not moved meanwhile, so this run's version, newer than the one there,
    becomes the latest."""
    catalog, dataset, store, stores, dask = setup

    def deployment_b_ingests_a_newer_drop() -> None:
        land_more(store, 2017, "later")
        ingest_as_another_deployment(store, dask, dataset)

    first, result = sharded_meanwhile(setup, monkeypatch, deployment_b_ingests_a_newer_drop)
    assert result.success
    [materialization] = result.asset_materializations_for_node(shards_node(dataset))
    made = materialization.metadata["version"].value
    assert materialization.metadata["made_latest"].value is True and made != first
    assert latest_manifest(store, dataset)["version"] == made


def committed_meanwhile(setup, monkeypatch, other_shards: bool) -> tuple[bytes, dg.ExecuteInJobResult]:
    """A run that shards what deployment B (its own instance, the same bucket) shards at the same time: B
    commits the same version after this run's shards are written and checked, before its manifest; B's
    manifest names this run's shards, or `other_shards`. B's manifest bytes, and the run's result."""
    from aifactory_assets import factory

    catalog, dataset, store, stores, dask = setup
    checks, theirs = factory.blocking_checks, []

    def deployment_b_commits_first(*args, **kwargs) -> list[dg.AssetCheckResult]:
        results = checks(*args, **kwargs)
        manifest = json.loads(json.dumps(args[2]))  # B's is the same but for its run id
        manifest["producer"]["dagster_run_id"] = "run-b"
        if other_shards:
            next(iter(manifest["splits"].values()))["shards"][0]["sha256"] = "0" * 64
        write_manifest(store, dataset, manifest)
        theirs.append(store.read_bytes(f"shards/{DATASET}/v={manifest['version']}/manifest.json"))
        return results

    monkeypatch.setattr(factory, "blocking_checks", deployment_b_commits_first)
    result = run(catalog, stores, dask)
    return theirs[0], result


def test_a_version_another_deployment_committed_meanwhile_keeps_its_manifest(setup, monkeypatch) -> None:
    """Two deployments shard the same inputs at once: both write the version's shards (the same bytes, each
    whole), and the second to commit finds the first's manifest. It keeps that one as written (a training
    job may have resolved it), names its run, and makes the version the latest."""
    catalog, dataset, store, stores, dask = setup
    theirs, result = committed_meanwhile(setup, monkeypatch, other_shards=False)
    assert result.success
    [materialization] = result.asset_materializations_for_node(shards_node(dataset))
    version = materialization.metadata["version"].value
    assert store.read_bytes(f"shards/{DATASET}/v={version}/manifest.json") == theirs
    assert materialization.metadata["committed_by_run"].value == "run-b"
    assert materialization.metadata["made_latest"].value is True
    assert latest_manifest(store, dataset)["version"] == version
    assert not shard_problems(store, dask.get_client(), f"shards/{DATASET}/v={version}", json.loads(theirs))


def test_a_version_another_deployment_committed_meanwhile_with_other_shards_fails_by_name(setup, monkeypatch) -> None:
    """The same inputs and software give the same bytes; where the other deployment's manifest names other
    shards than this run wrote over them, the run fails, naming that run and the way out, and neither the
    manifest nor `_latest` is touched."""
    catalog, dataset, store, stores, dask = setup
    theirs, result = committed_meanwhile(setup, monkeypatch, other_shards=True)
    assert not result.success
    message = failure_message(result)
    assert "was committed meanwhile by run run-b" in message and "other shards" in message
    version = json.loads(theirs)["version"]
    assert store.read_bytes(f"shards/{DATASET}/v={version}/manifest.json") == theirs
    assert latest_version(store, dataset) is None


class DiesDeleting(ObjectStore):
    """A store whose process is killed as it deletes `dies_at` (fault injection: deleting is all it changes)."""

    dies_at: str

    def delete(self, key: str) -> None:
        if key == self.dies_at:
            raise KeyboardInterrupt(f"killed while deleting {key}")
        super().delete(key)


class DiesWriting(ObjectStore):
    """A store whose process is killed as it writes `dies_at` (fault injection)."""

    dies_at: str

    def write_bytes(self, key: str, data: bytes) -> None:
        if key == self.dies_at:
            raise KeyboardInterrupt(f"killed while writing {key}")
        super().write_bytes(key, data)


def test_a_raw_step_killed_between_its_two_pointers_leaves_a_whole_generation(setup) -> None:
    """The raw pointer first, then the quarantine's, whose publish deletes older quarantines: killed before
    the raw pointer, the current raw generation still has the quarantine its record names."""
    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask, stages=("raw",)).success
    dying = DiesWriting(site=store.site, root=store.root, dies_at=f"raw/{DATASET}/_current.json")
    with pytest.raises(KeyboardInterrupt):
        ingest_dataset(dying, dask.get_client(), dataset, "killed-run", every_run_over)
    raw = current(store, f"raw/{DATASET}")
    assert raw["run_id"] != "killed-run"
    assert store.list_objects(raw["quarantine"]), "the quarantine the current raw generation names is gone"
    assert current(store, f"quarantine/{DATASET}/raw")["generation"] == raw["quarantine"]


def test_a_publish_removes_what_it_replaces_and_leaves_generations_being_written(setup) -> None:
    """Runs this instance knows are over lose their generations at the next publish. One of a run it does
    not know (another deployment's on the same bucket; an ephemeral instance's) may be being written or
    read: never named by the pointer, it stays; named, it goes once replaced twice, a publish's grace for
    a reader that followed the pointer just before."""
    catalog, dataset, store, stores, dask = setup
    written = [f"raw/{DATASET}", f"quarantine/{DATASET}/raw", f"quarantine/{DATASET}/validated"]
    elsewhere = "a-run-this-instance-does-not-know"
    for stage in ("raw", "validated"):
        store.write_bytes(f"{stage}/{DATASET}/run={elsewhere}/part-00000.parquet", b"being written")

    def run_ids(instance: dg.DagsterInstance | None = None) -> str:
        result = run(catalog, stores, dask, stages=("raw", "validated"), instance=instance)
        assert result.success
        assert all(current(store, prefix)["run_id"] == result.run_id for prefix in [*written, f"validated/{DATASET}"])
        return result.run_id

    def kept(run_id: str) -> list[bool]:
        return [store.exists(f"{prefix}/run={run_id}") for prefix in written]

    instance = dg.DagsterInstance.ephemeral()
    first = run_ids(instance)
    assert kept(first) == [True] * 3
    second = run_ids(instance)
    assert kept(first) == [False] * 3 and kept(second) == [True] * 3  # first's run is over: gone
    third = run_ids()  # another instance, which knows neither run
    assert kept(second) == [True] * 3  # replaced once: a publish's grace
    run_ids()
    assert kept(second) == [False] * 3 and kept(third) == [True] * 3
    for stage in ("raw", "validated"):
        assert store.read_bytes(f"{stage}/{DATASET}/run={elsewhere}/part-00000.parquet") == b"being written"


def test_a_retried_publish_keeps_the_grace_of_what_it_replaced(tmp_path: Path) -> None:
    """A step retried in its run (a RetryPolicy) publishes again under the same run id: the generation its
    first try replaced was replaced once only, and a reader of another deployment may still follow it."""
    store, unknown = ObjectStore(site="kajaani", root=str(tmp_path)), lambda run_id: False
    for run_id in ("first", "second", "third", "third"):
        store.write_bytes(f"raw/{DATASET}/run={run_id}/part-00000.parquet", b"rows")
        publish(store, f"raw/{DATASET}", run_id, {}, unknown)
    assert current(store, f"raw/{DATASET}")["replaces"] == f"raw/{DATASET}/run=second"
    assert [store.exists(f"raw/{DATASET}/run={r}") for r in ("first", "second", "third")] == [False, True, True]


@pytest.mark.parametrize(
    "dies_at", [f"shards/{DATASET}/v=ver0/manifest.json", f"shards/{DATASET}/v=ver0", f"quarantine/{DATASET}/v=ver0"]
)
def test_a_retention_cut_short_is_finished_by_the_next_run(setup, dies_at: str) -> None:
    """Killed after the manifest went, the folder and the quarantine kept for the version are an abandoned
    write that the next run removes; killed before, the version stays committed, whole, for the next
    commit's retention."""
    _, dataset, store, *_ = setup  # retention 2
    for i in range(2):
        store.write_bytes(f"shards/{DATASET}/v=ver{i}/train-00000-of-00001.parquet", b"a shard")
        store.write_bytes(f"quarantine/{DATASET}/v=ver{i}/raw/part-00000.parquet", b"its quarantine")
        commit(store, dataset, f"ver{i}", f"2026-01-0{i + 1}", f"run{i}")
    dying = DiesDeleting(site=store.site, root=store.root, dies_at=dies_at)
    with pytest.raises(KeyboardInterrupt):
        commit(dying, dataset, "ver2", "2026-01-03", "run2")
    manifest_gone = not dies_at.endswith("manifest.json")
    assert store.exists(f"shards/{DATASET}/v=ver0/train-00000-of-00001.parquet") is not dies_at.startswith("quar")
    assert store.exists(f"quarantine/{DATASET}/v=ver0/raw/part-00000.parquet")
    assert [v for _, v in committed_versions(store, dataset)] == (
        ["ver1", "ver2"] if manifest_gone else ["ver0", "ver1", "ver2"]
    )
    assert store.is_object(f"{staging_prefix(dataset)}/ver0/run2/removing")  # marked before anything went

    removed = remove_abandoned_writes(store, dataset, lambda run_id: run_id == "run2")
    assert removed == (["ver0"] if manifest_gone else [])
    assert store.exists(f"shards/{DATASET}/v=ver0") is not manifest_gone
    assert store.exists(f"quarantine/{DATASET}/v=ver0") is not manifest_gone
    assert not store.list_objects(staging_prefix(dataset))


def test_records_keep_their_split_when_new_data_arrives(setup) -> None:
    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    before = all_rows(store, latest_manifest(store, dataset)).set_index("date")["split"]
    land_more(store, 2016)
    assert run(catalog, stores, dask).success
    after = all_rows(store, latest_manifest(store, dataset)).set_index("date")["split"]
    assert len(after) == len(before) + 366
    assert (after.loc[before.index] == before).all()
    train = latest_manifest(store, dataset)["splits"]["train"]["shards"]
    assert max(s["rows"] for s in train) - min(s["rows"] for s in train) <= 1


def failure_message(result: dg.ExecuteInJobResult) -> str:
    """Every failed step's error, with the errors that caused it (as the UI shows them)."""
    messages = []
    for event in (e for e in result.all_events if e.is_step_failure):
        error = event.event_specific_data.error
        while error is not None:
            messages.append(error.message)
            error = error.cause
    return "\n".join(messages)


def test_a_version_whose_quarantine_went_meanwhile_is_not_committed(setup) -> None:
    """The version keeps a copy of its quarantine: a generation removed while the shards were written
    (another deployment's publishes) would be copied as nothing, and the manifest lead to no rows."""
    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask, stages=("raw", "validated")).success
    store.delete(current(store, f"raw/{DATASET}")["quarantine"])
    failed = run(catalog, stores, dask, stages=("shards",))
    assert not failed.success and "quarantine parts of" in failure_message(failed)
    assert latest_manifest(store, dataset) is None


def test_shards_refuse_validated_rows_of_an_older_raw_generation(setup) -> None:
    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    first = latest_manifest(store, dataset)
    land_more(store, 2016)
    assert run(catalog, stores, dask, stages=("raw",)).success  # validated still holds the old rows
    stale = run(catalog, stores, dask, stages=("shards",))
    assert not stale.success
    assert "materialise validated first" in failure_message(stale)
    assert latest_manifest(store, dataset)["version"] == first["version"]


def test_validated_and_shards_refuse_raw_ingested_under_another_catalogue_entry(setup) -> None:
    """A file with a column the catalogue does not declare is refused; allowed later, raw must read it again
    before anything is built on it: a version made from the old raw would carry the new entry's version id,
    and every later full run would re-point at it, the file's rows missing (a reviewer's reproduction)."""
    catalog, dataset, store, stores, dask = setup
    land_more(store, 2016)
    frame = pd.read_parquet(io.BytesIO(store.read_bytes(f"landing/{DATASET}/extra.parquet"))).assign(station="SEA")
    store.write_bytes(f"landing/{DATASET}/extra.parquet", frame.to_parquet(index=False))
    assert run(catalog, stores, dask).success
    first = latest_manifest(store, dataset)
    assert first["quarantine"]["files_refused"] == 1
    ignoring = dataset.model_copy(update={"source": dataset.source.model_copy(update={"extra_columns": "ignore"})})
    allowed = catalog.model_copy(update={"datasets": {DATASET: ignoring}})
    for stages in (("validated", "shards"), ("shards",)):
        stale = run(allowed, stores, dask, stages=stages)
        assert not stale.success
        assert "raw was ingested under another source or schema" in failure_message(stale)
        assert latest_manifest(store, dataset)["version"] == first["version"]
    assert run(allowed, stores, dask).success
    assert latest_manifest(store, dataset)["conservation"]["rows_sharded"] == first["conservation"]["rows_read"] + 366


def test_every_module_the_output_modules_import_is_in_the_version() -> None:
    """A module that reads, judges or shards but is missing from OUTPUT_MODULES would let new code re-point
    `_latest` at shards that old code made. Only plumbing stays out."""
    plumbing = {"publish", "tasks"}
    package = Path(__file__).parent.parent / "aifactory_assets"
    seen, todo = set(), list(OUTPUT_MODULES)
    while todo:
        name = todo.pop()
        if name in seen or name in plumbing:
            continue
        seen.add(name)
        tree = ast.parse((package / f"{name}.py").read_text())
        todo += [
            node.module.split(".")[1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aifactory_assets.")
        ]
    assert seen <= set(OUTPUT_MODULES), f"imported but not in OUTPUT_MODULES: {sorted(seen - set(OUTPUT_MODULES))}"


def test_the_landing_rank_that_picks_among_duplicates_is_in_the_version() -> None:
    """Which record of a key wins follows each part's rank in the landing order: that rank is computed in
    a module whose source the version id hashes, not in the factory (new code must make a new version)."""
    entry = {"object": {"mtime": 0}}
    ledger = [{**entry, "source": "b.csv", "landed_at": 1.0}, {**entry, "source": "a.csv", "landed_at": 2.0}]
    assert part_seqs({"ledger": ledger, "part_sources": ["a.csv", "b.csv"]}) == [1, 0]
    assert part_seqs.__module__.rpartition(".")[2] in OUTPUT_MODULES


def test_shards_refuse_a_validated_record_of_an_earlier_release(setup) -> None:
    """Before 1607f94 validated wrote a copy of the rows and no delete files: after an upgrade, a run of the
    shards alone must ask for validated again, not fail on a missing field."""
    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask, stages=("raw", "validated")).success
    record = current(store, f"validated/{DATASET}")
    store.write_json(f"validated/{DATASET}/_current.json", {k: v for k, v in record.items() if k != "excluded"})
    stale = run(catalog, stores, dask, stages=("shards",))
    assert not stale.success
    assert "earlier release" in failure_message(stale) and "materialise validated first" in failure_message(stale)
    assert latest_manifest(store, dataset) is None


def test_shards_refuse_a_validation_judged_by_another_suite(setup) -> None:
    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    first = latest_manifest(store, dataset)
    suite = catalog.suites[DATASET]
    edited = {**suite, "expectations": suite["expectations"][:-1]}
    tightened = catalog.model_copy(update={"suites": {DATASET: edited}})
    stale = run(tightened, stores, dask, stages=("shards",))  # the old verdict must not publish the new suite
    assert not stale.success
    assert "judged by another version of suite" in failure_message(stale)
    assert latest_manifest(store, dataset)["version"] == first["version"]


def test_a_landing_of_refused_files_warns_and_never_becomes_the_latest_version(setup) -> None:
    catalog, dataset, store, stores, dask = setup
    suite = catalog.suites[DATASET]  # without its row-count expectation, which would stop an empty table first
    lenient = {**suite, "expectations": [e for e in suite["expectations"] if "row_count" not in e["type"]]}
    mean_day = {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "date", "min_value": "2000-01-01"}}
    lenient["expectations"].append({**mean_day, "meta": {"severity": "warning"}})  # judged on an empty table
    catalog = catalog.model_copy(update={"suites": {DATASET: lenient}})
    assert run(catalog, stores, dask).success
    first = latest_manifest(store, dataset)
    for key in store.fs.ls(store.path(f"landing/{DATASET}"), detail=False):
        store.delete(store.key_of(key))
    store.write_bytes(f"landing/{DATASET}/broken.parquet", b"date,wind\n2012-01-01,3\n")  # CSV named .parquet
    result = run(catalog, stores, dask)
    assert not result.success
    files = next(e for e in result.get_asset_check_evaluations() if e.check_name == "landed_files_read")
    assert not files.passed and files.severity == dg.AssetCheckSeverity.WARN
    assert "broken.parquet" in files.description and "not a readable Parquet file" in files.description
    assert "no rows read (1 of 1 landed file(s) refused" in failure_message(result)
    assert result.asset_materializations_for_node("climate__seattle_weather__validated")  # its report published
    assert latest_manifest(store, dataset)["version"] == first["version"]  # training keeps the last good one


def test_a_landing_whose_every_row_is_quarantined_never_becomes_the_latest_version(setup) -> None:
    catalog, dataset, store, stores, dask = setup
    suite = catalog.suites[DATASET]  # no row-count expectation, and no limit on the quarantined fraction
    lenient = {**suite, "expectations": [e for e in suite["expectations"] if "row_count" not in e["type"]]}
    tolerant = dataset.model_copy(update={"max_quarantined_fraction": 1.0})
    catalog = catalog.model_copy(update={"suites": {DATASET: lenient}, "datasets": {DATASET: tolerant}})
    assert run(catalog, stores, dask).success
    first = latest_manifest(store, dataset)
    for key in store.fs.ls(store.path(f"landing/{DATASET}"), detail=False):
        store.delete(store.key_of(key))
    days = pd.date_range("2012-01-01", periods=30, freq="D")
    frame = pd.DataFrame({"date": days, "precipitation": "n/a", "temp_max": 10.0, "temp_min": 2.0, "wind": 3.0})
    buffer = io.BytesIO()
    frame.assign(weather="rain").to_parquet(buffer, index=False)
    store.write_bytes(f"landing/{DATASET}/all-bad.parquet", buffer.getvalue())
    result = run(catalog, stores, dask)
    assert not result.success
    assert "all 30 rows read were quarantined" in failure_message(result)
    assert latest_manifest(store, dataset)["version"] == first["version"]


def test_the_split_order_is_part_of_the_version(setup) -> None:
    catalog, dataset, *_ = setup
    turned = dataset.model_copy(
        update={"shards": dataset.shards.model_copy(update={"splits": {"val": 0.1, "train": 0.8, "test": 0.1}})}
    )
    inputs = ["landing/x.csv|10|etag|1.0"]
    suite = catalog.suites[DATASET]
    assert version_id(turned, suite, inputs) != version_id(dataset, suite, inputs)  # other keys in each split


def test_a_damaged_version_is_repaired_when_its_inputs_come_back_or_never_becomes_the_latest(setup) -> None:
    """The same inputs give the same bytes: a committed version's rotten or missing shards are made again
    and copied over them, the healthy ones and the manifest untouched. A version its rebuilt shards cannot
    match stays out of `_latest`."""
    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    old = latest_manifest(store, dataset)
    land_more(store, 2016)
    assert run(catalog, stores, dask).success
    new = latest_manifest(store, dataset)
    folder = f"shards/{DATASET}/v={old['version']}"
    tampered = json.loads(json.dumps(old))
    tampered["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    store.write_json(f"{folder}/manifest.json", tampered)
    store.delete(f"landing/{DATASET}/extra.parquet")  # back to the old inputs: the old version again
    instance = dg.DagsterInstance.ephemeral()  # the failed run and the next, as on a site's instance
    result = run(catalog, stores, dask, instance=instance)
    assert not result.success
    assert "differ from its manifest" in failure_message(result)
    assert latest_manifest(store, dataset)["version"] == new["version"]  # training keeps a sound version

    store.write_json(f"{folder}/manifest.json", old)
    rotten, missing, healthy = (old["splits"][split]["shards"][0]["path"] for split in ("train", "val", "test"))
    data = bytearray(store.read_bytes(f"{folder}/{rotten}"))
    data[len(data) // 2] ^= 0xFF
    store.write_bytes(f"{folder}/{rotten}", bytes(data))
    store.delete(f"{folder}/{missing}")
    untouched = os.stat(store.path(f"{folder}/{healthy}")).st_ino
    repaired = run(catalog, stores, dask, instance=instance)
    assert repaired.success
    said = {rotten: "checksum differs from the manifest", missing: "missing"}  # kept in the UI, not only logged
    [materialization] = repaired.asset_materializations_for_node(shards_node(dataset))
    assert materialization.metadata["repaired"].value == said
    [verified] = [c for c in repaired.get_asset_check_evaluations() if c.check_name == "shards_match_manifest"]
    assert verified.passed and verified.metadata["repaired"].value == said
    assert latest_manifest(store, dataset) == old
    assert not shard_problems(store, dask.get_client(), folder, old)
    assert os.stat(store.path(f"{folder}/{healthy}")).st_ino == untouched
    assert not store.list_objects(f"shards/{DATASET}/_staging")


def test_a_rebuilt_shard_gone_from_the_staging_before_its_copy_fails_by_name(setup, monkeypatch) -> None:
    """A repair copies the shards it made again from its staging; one gone from there meanwhile is named,
    not left for the verified check to report as the damage it came to mend."""
    from aifactory_assets import factory

    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    manifest = latest_manifest(store, dataset)
    rotten = manifest["splits"]["train"]["shards"][0]["path"]
    store.write_bytes(f"shards/{DATASET}/v={manifest['version']}/{rotten}", b"rotten")
    shard = factory.shard_version

    def gone_after_the_rebuild(*args, **kwargs) -> dict:
        sharded = shard(*args, **kwargs)
        store.delete(f"{args[-1]}/{rotten}")  # the staging folder the rebuild wrote into
        return sharded

    monkeypatch.setattr(factory, "shard_version", gone_after_the_rebuild)
    result = run(catalog, stores, dask, stages=("shards",))
    assert not result.success
    assert f"['{rotten}'], made again under" in failure_message(result)
    assert "went from there before they were copied over the damaged ones" in failure_message(result)


def cut_short(store: ObjectStore, key: str) -> None:
    """A manifest cut in half, as a full disk or a partial copy leaves it."""
    data = store.read_bytes(key)
    store.write_bytes(key, data[: len(data) // 2])


def test_an_unreadable_manifest_is_made_again_or_left_alone_never_a_dead_end(setup) -> None:
    """The latest's own manifest cut short: the version counts as not committed and the next run makes it
    again, byte for byte. An older version's: later commits go on, warning of it, and retention leaves its
    folder alone (it cannot tell what that is). Neither stops the dataset with a bare JSONDecodeError."""
    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    old = latest_manifest(store, dataset)
    key = f"shards/{DATASET}/v={old['version']}/manifest.json"
    cut_short(store, key)
    with pytest.raises(dg.Failure, match=f"{key} cannot be read: not JSON"):
        latest_manifest(store, dataset)
    shards = [f"shards/{DATASET}/v={old['version']}/{s['path']}" for v in old["splits"].values() for s in v["shards"]]
    before = {shard: (os.stat(store.path(shard)).st_ino, store.read_bytes(shard)) for shard in shards}
    assert run(catalog, stores, dask, stages=("shards",)).success
    again = latest_manifest(store, dataset)
    assert again["version"] == old["version"] and again["splits"] == old["splits"]
    for shard, (inode, data) in before.items():  # each replaced whole, never truncated under a reader
        assert os.stat(store.path(shard)).st_ino != inode and store.read_bytes(shard) == data
    assert not store.list_objects(f"shards/{DATASET}/_staging")

    cut_short(store, key)
    instance = dg.DagsterInstance.ephemeral()
    for year in (2016, 2017):  # retention 2: the old version would be the one to go
        land_more(store, year)
        result = run(catalog, stores, dask, instance=instance)
        assert result.success
        assert any(f"{key} cannot be read" in e.user_message for e in instance.all_logs(result.run_id))
    assert store.exists(f"shards/{DATASET}/v={old['version']}/{old['splits']['train']['shards'][0]['path']}")
    assert len(committed_versions(store, dataset)) == 2


def shards_checks(result: dg.ExecuteInJobResult, dataset: Dataset, judged: str) -> dict[str, bool]:
    """The shards step's checks as a run that failed them judged them (the UI's Checks tab), by name: passed
    or not. Each names the version it judged and its state (`judged`): Dagster files them under the asset's
    latest materialisation, which is another version's or none."""
    evaluations = [e for e in result.get_asset_check_evaluations() if e.asset_key == asset_key(dataset, "shards")]
    assert all(e.description.startswith(judged) and "version" in e.metadata for e in evaluations)
    return {e.check_name: e.passed for e in evaluations}


def test_a_version_failing_a_blocking_check_is_never_committed(setup, monkeypatch) -> None:
    """The shards' schema and conservation checks are judged before the commit: a version whose rows do
    not add up (here a shuffle that miscounts its duplicates) stays uncommitted, `_latest` where it was."""
    from aifactory_assets import factory

    catalog, dataset, store, stores, dask = setup
    shard = factory.shard_version

    def miscounted(*args, **kwargs) -> dict:
        sharded = shard(*args, **kwargs)
        return {**sharded, "duplicates_dropped": sharded["duplicates_dropped"] + 1}

    monkeypatch.setattr(factory, "shard_version", miscounted)
    result = run(catalog, stores, dask)
    assert not result.success
    assert latest_manifest(store, dataset) is None and not committed_versions(store, dataset)
    assert "does not pass conservation: rows read = sharded" in failure_message(result)
    assert "so it is not committed (there is no committed version yet)" in failure_message(result)
    assert "None" not in failure_message(result)
    judged = "version {}, not committed, there is no committed version yet: "
    version = failure_message(result).split("version ")[1].split(" ")[0]
    checks = {SCHEMA_CHECK: True, CONSERVATION_CHECK: False, VERIFIED_CHECK: True}
    assert shards_checks(result, dataset, judged.format(version)) == checks


def test_a_committed_version_that_fails_its_checks_says_so_and_names_strays(setup, monkeypatch) -> None:
    """A file in a version's folder that its manifest does not name is read by Hugging Face's data_dir,
    pyarrow.dataset and pandas alike: the verified check names it (and leaves it), saying to move it out,
    and no shard is made again for it. The version is committed and `_latest` names it, which the failure
    says rather than "not committed"."""
    from aifactory_assets import factory

    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    version = latest_manifest(store, dataset)["version"]
    stray = f"shards/{DATASET}/v={version}/train-00099-of-00099.parquet"
    store.write_bytes(stray, b"someone's copy")
    sharded = []
    monkeypatch.setattr(factory, "shard_version", lambda *args, **kwargs: sharded.append(args))
    result = run(catalog, stores, dask, stages=("shards",))
    assert not result.success and not sharded
    said = failure_message(result)
    assert "train-00099-of-00099.parquet: not in the manifest" in said
    assert f"version {version} does not pass shards_match_manifest" in said
    assert "yet it is committed and _latest still names it" in said and "not committed" not in said
    assert said.index("move it out of the version's folder") < said.index(f"v={version}/manifest.json and run")
    assert store.exists(stray) and latest_manifest(store, dataset)["version"] == version
    judged = f"version {version}, committed, _latest still names it: "
    assert shards_checks(result, dataset, judged) == {VERIFIED_CHECK: False}  # the others need every shard to match


def test_files_no_reader_takes_for_data_fail_no_version(setup) -> None:
    """An NFS silly-rename, a Finder's `.DS_Store`, a `.keep`, Spark's `_SUCCESS` in a version's folder: no
    reader takes them for data, so they are no stray and the version is re-pointed at. A Parquet file is
    one under any name: Dask's read_parquet of the folder reads `_old/x.parquet`, and Hugging Face skips
    only `.` and `__` names."""
    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    version = latest_manifest(store, dataset)["version"]
    for name in (".nfs000000000123abcd00000001", ".DS_Store", ".keep", "_SUCCESS", "_temporary/0/part-0"):
        store.write_bytes(f"shards/{DATASET}/v={version}/{name}", b"")
    result = run(catalog, stores, dask, stages=("shards",))
    assert result.success, failure_message(result)
    [verified] = [c for c in result.get_asset_check_evaluations() if c.check_name == "shards_match_manifest"]
    assert verified.passed and verified.metadata["problems"].value == 0
    shard = latest_manifest(store, dataset)["splits"]["train"]["shards"][0]["path"]
    store.copy_many([(f"shards/{DATASET}/v={version}/{shard}", f"shards/{DATASET}/v={version}/_old/{shard}")])
    result = run(catalog, stores, dask, stages=("shards",))
    assert not result.success and f"_old/{shard}: not in the manifest" in failure_message(result)


def test_new_code_or_libraries_make_a_new_version(setup, monkeypatch) -> None:
    """Code that reads, judges or shards differently, or a pyarrow that writes other bytes, must not
    re-publish what the older ones made under the same version."""
    from aifactory_assets import manifest

    catalog, dataset, *_ = setup
    inputs, suite = ["landing/x.csv|10|etag|1.0"], catalog.suites[DATASET]
    before = version_id(dataset, suite, inputs)
    monkeypatch.setattr(manifest, "CODE_FINGERPRINT", "another-release")
    assert version_id(dataset, suite, inputs) != before
    monkeypatch.undo()
    monkeypatch.setattr(manifest, "LIBRARY_VERSIONS", {**manifest.LIBRARY_VERSIONS, "pyarrow": "0.0.1"})
    assert version_id(dataset, suite, inputs) != before


@pytest.mark.parametrize("differs", ["libraries", "code"])
def test_workers_on_other_releases_commit_nothing(setup, monkeypatch, differs: str) -> None:
    """The version id names this process's pyarrow and aifactory code; workers of a shared cluster that
    write with others (their own install) would make bytes the id does not describe. Here this process
    is the one that differs: its workers are the same install."""
    from aifactory_assets import manifest

    catalog, dataset, store, stores, dask = setup
    if differs == "libraries":
        monkeypatch.setattr(manifest, "LIBRARY_VERSIONS", {**manifest.LIBRARY_VERSIONS, "pyarrow": "0.0.1"})
    else:
        monkeypatch.setattr(manifest, "CODE_FINGERPRINT", "another-release")
    result = run(catalog, stores, dask)
    assert not result.success
    assert "Dask workers that run other code or releases than this process" in failure_message(result)
    assert latest_manifest(store, dataset) is None
    assert current(store, f"raw/{DATASET}")["ingest_fingerprint"] is None  # its parts lent to no later run
    monkeypatch.undo()
    assert run(catalog, stores, dask).success
    assert current(store, f"raw/{DATASET}")["files_read"] == 1  # read again by this release's workers
    assert latest_manifest(store, dataset)["producer"]["libraries"] == manifest.LIBRARY_VERSIONS


def test_housekeeping_settings_keep_the_version(setup) -> None:
    """How many versions to keep, when to refuse a run, or how a column or an expectation is described
    shapes no byte: no reshard into a new version (and notes judge no part again)."""
    catalog, dataset, *_ = setup
    inputs, suite = ["landing/x.csv|10|etag|1.0"], catalog.suites[DATASET]
    housekept = dataset.model_copy(
        update={"shards": dataset.shards.model_copy(update={"retention": 7}), "max_quarantined_fraction": 0.5}
    )
    columns = [c.model_copy(update={"description": "reworded"}) for c in dataset.table.columns]
    described = dataset.model_copy(update={"table": dataset.table.model_copy(update={"columns": columns})})
    noted = {
        **suite,
        "expectations": [{**e, "meta": {**e.get("meta", {}), "notes": "why"}} for e in suite["expectations"]],
    }
    reseeded = dataset.model_copy(update={"shards": dataset.shards.model_copy(update={"seed": 7})})
    resident = dataset.model_copy(update={"residency": [dataset.site]})  # the manifest records it
    first = version_id(dataset, suite, inputs)
    assert version_id(housekept, suite, inputs) == version_id(described, suite, inputs) == first
    assert version_id(dataset, noted, inputs) == first and suite_fingerprint(noted) == suite_fingerprint(suite)
    assert version_id(reseeded, suite, inputs) != first != version_id(resident, suite, inputs)


def test_what_runs_that_are_over_left_unfinished_is_removed(setup) -> None:
    catalog, dataset, store, stores, dask = setup
    instance = dg.DagsterInstance.ephemeral()
    over = dg.materialize([nothing], instance=instance).run_id
    going = "a-run-this-instance-does-not-know"  # may be another deployment's, still writing
    prefix = staging_prefix(dataset)
    for version, run_id in (("v1", over), ("v2", going), ("v3", over)):
        store.write_bytes(f"{prefix}/{version}/{run_id}/scattered/part-00000.arrow", b"left behind")
        store.write_bytes(f"shards/{DATASET}/v={version}/train-00000-of-00001.parquet", b"half written")
    store.write_bytes(f"shards/{DATASET}/v=v3/manifest.json", b"{}")  # v3 was committed before its run died
    store.write_bytes(f"{prefix}/stray.txt", b"not a run's")

    assert remove_abandoned_writes(store, dataset, lambda run_id: run_finished(instance, run_id)) == ["v1"]
    left = sorted(o.key[len(prefix) + 1 :] for o in store.list_objects(prefix))
    assert left == ["stray.txt", f"v2/{going}/scattered/part-00000.arrow"]
    assert not store.exists(f"shards/{DATASET}/v=v1")
    assert store.exists(f"shards/{DATASET}/v=v2/train-00000-of-00001.parquet")
    assert store.exists(f"shards/{DATASET}/v=v3/train-00000-of-00001.parquet")


@dg.asset
def nothing() -> None:
    """A run to finish."""


def land_the_same(store: ObjectStore, fresh: ObjectStore) -> None:
    """`store`'s landed files into a fresh local store, with their mtimes: the same listing order."""
    for path in store.fs.find(store.path(f"landing/{DATASET}")):
        key = store.key_of(path)
        fresh.write_bytes(key, store.fs.cat_file(path))
        mtime = store.info(key).mtime
        os.utime(fresh.path(key), (mtime, mtime))


def raw_tables(store: ObjectStore) -> dict[str, pd.DataFrame]:
    """The current raw generation's rows, by landed file: what validation and the shards read."""
    raw = current(store, f"raw/{DATASET}")
    return {
        s: pd.read_parquet(store.url(p), storage_options=store.storage_options)
        for s, p in zip(raw["part_sources"], raw["parts"], strict=True)
    }


@pytest.mark.parametrize("where", ["local", "s3"])
def test_raw_reads_only_the_files_its_current_generation_did_not_ingest_the_same_way(
    catalog: Catalog, tmp_path: Path, dask: DaskCluster, where: str, request: pytest.FixtureRequest
) -> None:
    """A daily drop reads one new file, not the dataset's history; what it copies is what a fresh run would
    write; a change to how files are read (the schema, not a description) reads them all again."""
    dataset = catalog.datasets[DATASET]
    small = catalog.model_copy(update={"datasets": {DATASET: dataset}})
    stores = (
        local_stores(small, tmp_path) if where == "local" else s3_stores(small, request.getfixturevalue("s3_endpoint"))
    )
    store = stores[dataset.site]
    land_demo_data(small, stores)
    land_more(store, 2016, "bad")  # a second file, ...
    store.write_bytes(f"landing/{DATASET}/bad.parquet", b"date,wind\n2016-01-01,3\n")  # ... refused: no Parquet
    first = run(small, stores, dask, stages=("raw",))
    assert first.success and current(store, f"raw/{DATASET}")["files_read"] == 2

    land_more(store, 2016)
    second = run(small, stores, dask, stages=("raw",))
    raw = current(store, f"raw/{DATASET}")
    assert second.success and raw["files_read"] == 1
    by = {e["source"].rsplit("/", 1)[-1]: e["ingested_by"] for e in raw["ledger"]}
    assert by == {"seattle_weather.parquet": first.run_id, "bad.parquet": first.run_id, "extra.parquet": second.run_id}
    refused = next(e for e in raw["ledger"] if "file_error" in e)
    assert refused["source"].endswith("bad.parquet") and "not a readable Parquet file" in refused["file_error"]
    quarantined = pd.concat(
        pd.read_parquet(store.url(p), storage_options=store.storage_options)
        for p in current(store, f"quarantine/{DATASET}/raw")["parts"]
    )
    assert quarantined["_source"].str.endswith("bad.parquet").sum() == 1  # its refusal, copied too
    copied = raw_tables(store)

    fresh_stores = local_stores(small, tmp_path / "fresh")
    land_the_same(store, fresh_stores[dataset.site])
    assert run(small, fresh_stores, dask, stages=("raw",)).success
    fresh = raw_tables(fresh_stores[dataset.site])
    assert list(fresh) == list(copied) and all(fresh[s].equals(copied[s]) for s in fresh)

    ingest_dataset(store, dask.get_client(), dataset, second.run_id, every_run_over)  # the step retried
    assert current(store, f"raw/{DATASET}")["files_read"] == 3  # its own parts are not copied onto themselves

    described = [c.model_copy(update={"description": "edited"}) for c in dataset.table.columns]
    described = dataset.model_copy(update={"table": dataset.table.model_copy(update={"columns": described})})
    assert run(small.model_copy(update={"datasets": {DATASET: described}}), stores, dask, stages=("raw",)).success
    assert current(store, f"raw/{DATASET}")["files_read"] == 0  # a description changes how nothing is read
    columns = [c.model_copy(update={"nullable": True}) if c.name == "wind" else c for c in dataset.table.columns]
    retyped = dataset.model_copy(update={"table": dataset.table.model_copy(update={"columns": columns})})
    assert run(small.model_copy(update={"datasets": {DATASET: retyped}}), stores, dask, stages=("raw",)).success
    assert current(store, f"raw/{DATASET}")["files_read"] == 3


def land_windy(store: ObjectStore, year: int, wind: float) -> None:
    """A year of days, one in 40 with `wind` (failing a bound below it), the others calm."""
    days = pd.date_range(f"{year}-01-01", f"{year}-12-31", freq="D")
    frame = pd.DataFrame(
        {"date": days, "precipitation": 0.5, "temp_max": 10.0, "temp_min": 2.0, "weather": "rain"}
    ).assign(wind=[wind if i % 40 == 0 else 3.0 for i in range(len(days))])
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    store.write_bytes(f"landing/{DATASET}/y{year}.parquet", buffer.getvalue())


def test_a_local_file_rewritten_with_its_size_and_mtime_kept_is_read_again(setup) -> None:
    """`cp -p`, `rsync -t` or one-second mtimes: size and mtime alone would keep the old rows forever."""
    catalog, dataset, store, stores, dask = setup
    landed = Path(store.path(f"landing/{DATASET}/y2016.parquet"))
    days = pd.date_range("2016-01-01", "2016-12-31", freq="D")
    frame = pd.DataFrame({"date": days, "precipitation": 0.5, "temp_max": 10.0, "temp_min": 2.0, "weather": "rain"})
    landed.write_bytes(frame.assign(wind=3.0).to_parquet(index=False, compression=None))
    assert run(catalog, stores, dask).success
    before = landed.stat()
    landed.write_bytes(frame.assign(wind=4.5).to_parquet(index=False, compression=None))  # a correction
    os.utime(landed, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert landed.stat().st_size == before.st_size
    assert run(catalog, stores, dask).success
    assert current(store, f"raw/{DATASET}")["files_read"] == 1
    rows = all_rows(store, latest_manifest(store, dataset))
    assert set(rows.loc[pd.to_datetime(rows["date"]).dt.year == 2016, "wind"]) == {4.5}


def test_the_same_bytes_uploaded_again_keep_the_version(setup) -> None:
    """A sync tool uploading unchanged files again gives them new mtimes: the same shards, the same version
    (a new one would push real ones out of retention), for the latest file and for an older one, whose
    bytes keep the place in the landing order they first landed at."""
    catalog, dataset, store, stores, dask = setup
    (demo,) = [store.path(o.key) for o in store.list_objects(f"landing/{DATASET}", "*")]
    land_more(store, 2016)
    extra, now = store.path(f"landing/{DATASET}/extra.parquet"), time.time()
    os.utime(demo, (now - 100, now - 100))
    os.utime(extra, (now - 50, now - 50))
    assert run(catalog, stores, dask).success
    first = latest_manifest(store, dataset)["version"]
    for uploaded in (extra, demo):  # again: the latest file, then the older one, now the newest by mtime
        now += 50
        os.utime(uploaded, (now, now))
        assert run(catalog, stores, dask).success
        assert latest_manifest(store, dataset)["version"] == first
    order = [store.path(e["source"]) for e in landing_order(current(store, f"raw/{DATASET}")["ledger"])]
    assert order == [demo, extra]  # by mtime, demo would now be the later


def test_a_chmod_or_a_backups_hard_link_reads_the_file_again_and_keeps_the_version(
    setup, tmp_path, monkeypatch
) -> None:
    """A local file's inode and change time move with its metadata: raw reads it again (its bytes may have
    changed under the same size and mtime), but the same bytes give the same version, not a re-shard that
    would push older versions out of retention; a hard link made while raw reads is no change."""
    from aifactory_assets import ingest

    catalog, dataset, store, stores, dask = setup
    assert run(catalog, stores, dask).success
    first = latest_manifest(store, dataset)
    (landed,) = [Path(store.path(o.key)) for o in store.list_objects(f"landing/{DATASET}", "*")]
    landed.chmod(0o640)

    def read_while_a_backup_links(*args, **kwargs):
        read = run_tasks(*args, **kwargs)
        os.link(landed, tmp_path / "backup.parquet")
        return read

    run_tasks = ingest.run_tasks
    monkeypatch.setattr(ingest, "run_tasks", read_while_a_backup_links)
    assert run(catalog, stores, dask).success
    assert current(store, f"raw/{DATASET}")["files_read"] == 1
    assert latest_manifest(store, dataset)["version"] == first["version"]
    (source,) = first["lineage"]["inputs"]
    assert source["sha256"] == hashlib.sha256(landed.read_bytes()).hexdigest()


def test_a_landed_file_written_again_while_raw_reads_it_publishes_nothing(setup, monkeypatch) -> None:
    """The ledger, and the version id, would otherwise name the object listed before the read, while the
    part holds whatever bytes the read found."""
    from aifactory_assets import ingest

    catalog, dataset, store, stores, dask = setup
    land_more(store, 2016)

    def read_while_a_producer_writes(*args, **kwargs):
        read = run_tasks(*args, **kwargs)
        land_more(store, 2017)  # the same name, written again
        return read

    run_tasks = ingest.run_tasks
    monkeypatch.setattr(ingest, "run_tasks", read_while_a_producer_writes)
    result = run(catalog, stores, dask, stages=("raw",))
    assert not result.success
    assert "landed file(s) ['landing/seattle_weather/extra.parquet'] changed while raw read them" in failure_message(
        result
    )
    assert current(store, f"raw/{DATASET}") is None
    monkeypatch.undo()
    assert run(catalog, stores, dask, stages=("raw",)).success

    # `cp -p` over it while it is read: the same bytes, size and mtime in the end, half of them when read
    landed = Path(store.path(f"landing/{DATASET}/extra.parquet"))
    whole, stamp = landed.read_bytes(), landed.stat()

    def read_during_cp_p(*args, **kwargs):
        with landed.open("r+b") as f:
            f.truncate(len(whole) // 2)
        read = run_tasks(*args, **kwargs)
        with landed.open("r+b") as f:
            f.write(whole)
        os.utime(landed, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        return read

    landed.chmod(0o640)  # its change time moves: raw reads it again
    monkeypatch.setattr(ingest, "run_tasks", read_during_cp_p)
    result = run(catalog, stores, dask, stages=("raw",))
    assert not result.success and "changed while raw read them" in failure_message(result)


def test_validated_judges_only_the_parts_its_current_generation_did_not_judge_the_same_way(
    setup, tmp_path, monkeypatch
) -> None:
    """After a drop, GX runs over the new file alone and the record is what a fresh validation of every
    file gives (`mostly` over the totals, samples from kept and new parts, PII hidden alike); a delete file
    gone, another suite or another release judges again (a release also reads raw again, first)."""
    from aifactory_assets import ingest

    catalog, dataset, store, stores, dask = setup
    columns = [c.model_copy(update={"pii": c.name == "wind"}) for c in dataset.table.columns]
    dataset = dataset.model_copy(update={"table": dataset.table.model_copy(update={"columns": columns})})
    windy = {
        "type": "expect_column_values_to_be_between",
        "kwargs": {"column": "wind", "max_value": 7.5, "mostly": 0.9},
        "meta": {"severity": "warning"},
    }
    kept_ones = [e for e in catalog.suites[DATASET]["expectations"] if "row_count" not in e["type"]]  # more years
    suite = {**catalog.suites[DATASET], "expectations": [windy, *kept_ones]}
    catalog = catalog.model_copy(update={"datasets": {DATASET: dataset}, "suites": {DATASET: suite}})
    stages = ("raw", "validated")
    land_windy(store, 2016, 9.0)
    assert run(catalog, stores, dask, stages=stages).success
    land_windy(store, 2017, 8.0)
    assert run(catalog, stores, dask, stages=stages).success
    kept = current(store, f"validated/{DATASET}")
    assert kept["parts_judged"] == 1 and kept["rows_quarantined"] > 0

    fresh_stores = local_stores(catalog, tmp_path / "fresh")
    land_the_same(store, fresh_stores[dataset.site])
    assert run(catalog, fresh_stores, dask, stages=stages).success
    fresh = current(fresh_stores[dataset.site], f"validated/{DATASET}")
    assert fresh["parts_judged"] == 3
    this_run = {"run_id", "generation", "replaces", "published_at", "raw_generation", "quarantine", "raw_parts"}
    this_run |= {"excluded", "part_verdicts", "parts_judged"}
    assert {k: v for k, v in kept.items() if k not in this_run} == {k: v for k, v in fresh.items() if k not in this_run}
    (wind,) = [r for r in kept["results"] if r["kwargs"] == windy["kwargs"]]
    assert wind["sample"] == ["5 value(s) hidden: PII"]

    def delete_files(where: ObjectStore, record: dict) -> list[pd.DataFrame]:
        return [pd.read_parquet(where.url(p)).drop(columns="run_id") for p in record["excluded"]]

    pairs = zip(delete_files(store, kept), delete_files(fresh_stores[dataset.site], fresh), strict=True)
    assert all(a.equals(b) for a, b in pairs)

    own = DaskCluster(n_workers=1, memory_limit="1GiB")  # a run's own fresh workers, as under `make dev`
    try:
        assert run(catalog, stores, own, stages=("validated",)).success  # GX on no worker: its report still made
    finally:
        own.close()
    assert current(store, f"validated/{DATASET}")["parts_judged"] == 0

    store.delete(current(store, f"validated/{DATASET}")["excluded"][0])  # gone meanwhile: judged again
    assert run(catalog, stores, dask, stages=("validated",)).success
    assert current(store, f"validated/{DATASET}")["parts_judged"] == 1
    stricter = {
        **suite,
        "expectations": [*suite["expectations"], {**windy, "kwargs": {"column": "wind", "max_value": 8}}],
    }
    assert run(catalog.model_copy(update={"suites": {DATASET: stricter}}), stores, dask, stages=("validated",)).success
    assert current(store, f"validated/{DATASET}")["parts_judged"] == 3
    assert run(catalog, stores, dask, stages=("validated",)).success
    monkeypatch.setattr(ingest, "CODE_FINGERPRINT", "another-release")  # a new release: raw first, then all judged
    alone = run(catalog, stores, dask, stages=("validated",))
    assert not alone.success and "by another release: materialise raw first" in failure_message(alone)
    assert run(catalog, stores, dask, stages=stages).success
    assert current(store, f"validated/{DATASET}")["parts_judged"] == 3
