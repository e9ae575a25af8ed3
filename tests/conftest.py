"""Real parts for the tests: a moto S3 server on 127.0.0.1, a Dask LocalCluster, stores on both."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import LocalCluster

from aifactory_assets.catalog import Catalog, load_catalog
from aifactory_assets.factory import store_key
from resources import DaskCluster, ObjectStore

S3_KEY, S3_SECRET = "aifactory-test-key", "aifactory-test-secret-do-not-log"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(autouse=True)
def no_site_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own AIFACTORY_* settings (an S3 endpoint, a prefix) must not steer the tests, nor
    send them to a real bucket; a test sets what it needs."""
    for name in [n for n in os.environ if n.startswith("AIFACTORY_")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's threaded S3 server, as s3fs tests itself; reachable from the Dask worker processes."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def dask_address() -> Iterator[str]:
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0"
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def dask(dask_address: str) -> Iterator[DaskCluster]:
    cluster = DaskCluster(scheduler_address=dask_address)
    yield cluster
    cluster.close()


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return load_catalog()


def local_stores(catalog: Catalog, root: Path) -> dict[str, ObjectStore]:
    return {site: ObjectStore(site=site, root=str(root / site)) for site in catalog.sites}


def s3_stores(catalog: Catalog, endpoint: str) -> dict[str, ObjectStore]:
    """Every site in one fresh bucket, each under its own prefix."""
    bucket = f"aifactory-{uuid.uuid4().hex[:12]}"
    stores = {
        site: ObjectStore(
            site=site,
            protocol="s3",
            root=f"{bucket}/{site}",
            endpoint_url=endpoint,
            access_key_id=S3_KEY,
            secret_access_key=S3_SECRET,
        )
        for site in catalog.sites
    }
    next(iter(stores.values())).ensure_root()
    return stores


@pytest.fixture(params=["local", "s3"])
def stores(request: pytest.FixtureRequest, catalog: Catalog, tmp_path: Path) -> dict[str, ObjectStore]:
    if request.param == "local":
        return local_stores(catalog, tmp_path)
    return s3_stores(catalog, request.getfixturevalue("s3_endpoint"))


def pipeline_resources(stores: dict[str, ObjectStore], dask: DaskCluster) -> dict[str, object]:
    return {**{store_key(site): store for site, store in stores.items()}, "dask": dask}
