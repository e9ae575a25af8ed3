"""The store's credentials against an S3 server that checks them (SeaweedFS; moto accepts any signature):
every reader and writer, Dask workers and the loader included, signs with them, and a wrong secret
fails clearly, publishes nothing and is never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from aifactory_assets.catalog import Catalog
from aifactory_assets.demo import land_demo_data
from aifactory_assets.loader import ShardReader
from aifactory_assets.manifest import latest_manifest
from aifactory_assets.publish import current
from resources import DaskCluster, ObjectStore
from schedules import landing_sensor
from tests.conftest import S3_SECRET, evaluate, failed_checks, logged, materialize_all, s3_stores

WRONG_SECRET = "not-the-secret-either-do-not-log"


def with_secret(stores: dict[str, ObjectStore], secret: str) -> dict[str, ObjectStore]:
    return {
        site: ObjectStore(
            site=site,
            protocol="s3",
            root=store.root,
            endpoint_url=store.endpoint_url,
            access_key_id=store.access_key_id,
            secret_access_key=secret,
        )
        for site, store in stores.items()
    }


def test_every_reader_and_writer_signs_with_the_stores_credentials(
    catalog: Catalog, seaweed_endpoint: str, dask: DaskCluster, tmp_path: Path
) -> None:
    stores = s3_stores(catalog, seaweed_endpoint)
    land_demo_data(catalog, stores)
    result = materialize_all(catalog, stores, dask)
    assert result.success and failed_checks(result) == []
    assert S3_SECRET not in logged(result)

    wrong = with_secret(stores, WRONG_SECRET)
    for dataset in catalog.datasets.values():
        store = stores[dataset.site]
        manifest = latest_manifest(store, dataset)
        url = store.url(f"shards/{dataset.name}/v={manifest['version']}/manifest.json")
        reader = ShardReader(url, "train", storage_options=store.storage_options, cache_dir=tmp_path / "cache")
        assert sum(batch.num_rows for batch in reader) == manifest["splits"]["train"]["rows"] > 0
        with pytest.raises(PermissionError) as refused:
            ShardReader(url, "train", storage_options=wrong[dataset.site].storage_options, cache_dir=tmp_path / "c")
        assert WRONG_SECRET not in str(refused.value) and S3_SECRET not in str(refused.value)


def test_a_wrong_secret_fails_clearly_publishes_nothing_and_is_never_shown(
    catalog: Catalog, seaweed_endpoint: str, dask: DaskCluster
) -> None:
    stores = s3_stores(catalog, seaweed_endpoint)
    land_demo_data(catalog, stores)
    result = materialize_all(catalog, with_secret(stores, WRONG_SECRET), dask)
    assert not result.success
    failures = [event for event in result.all_events if event.is_step_failure]
    assert failures
    for failure in failures:  # the server's refusal, naming the store and where its credentials come from
        error = failure.event_specific_data.error.to_string()
        assert "SignatureDoesNotMatch" in error and "refused a request of the" in error, error
        assert "AIFACTORY_" in error and "check them, and the bucket's policy" in error, error
    text = logged(result)
    assert WRONG_SECRET not in text and S3_SECRET not in text
    for dataset in catalog.datasets.values():
        store = stores[dataset.site]
        assert current(store, f"raw/{dataset.name}") is None
        assert latest_manifest(store, dataset) is None


def test_a_landing_sensor_lists_with_the_stores_credentials(catalog: Catalog, seaweed_endpoint: str) -> None:
    """The daemon's tick signs its listing: a new file gives a run once settled; with a wrong secret the tick
    fails with the server's refusal (the UI shows it on the sensor), requesting nothing, showing no secret."""
    store = s3_stores(catalog, seaweed_endpoint)["linkoping"]
    sensor = landing_sensor(catalog, "linkoping")
    cursor = evaluate(sensor, store, None).cursor
    store.write_bytes("landing/palmer_penguins/drop-1.csv", b"record_id,species\n1,Adelie\n")
    settled = evaluate(sensor, store, evaluate(sensor, store, cursor).cursor)
    assert [r.tags["dataset"] for r in settled.run_requests] == ["palmer_penguins"]

    wrong = with_secret({"linkoping": store}, WRONG_SECRET)["linkoping"]
    with pytest.raises(Exception) as refused:
        evaluate(sensor, wrong, settled.cursor)
    chain, error = [], refused.value
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    told = "\n".join(chain)
    assert "SignatureDoesNotMatch" in told and "refused a request of the linkoping site" in told, told
    assert WRONG_SECRET not in told and S3_SECRET not in told
