"""The Dask resource: fresh workers between stages on a run's own cluster, a shared cluster left alone."""

from __future__ import annotations

import os
import sys
import time

import dask
import psutil
import pytest
from distributed import Client, Worker
from distributed.security import Security

from aifactory_assets.tasks import run_tasks
from resources import DaskCluster


def worker_pids(client: Client) -> set[int]:
    return set(client.run(os.getpid).values())


def hold_like_gx(mib: int) -> None:
    """What importing GX does to a worker: memory that stays held after the task (a module's state)."""
    import numpy as np

    sys.modules[__name__].held = np.ones(mib * 2**20, dtype=np.uint8)


def test_refresh_replaces_the_runs_own_workers_only_when_they_hold_much(dask_address: str) -> None:
    own = DaskCluster(n_workers=1, memory_limit="1GiB")
    try:
        before = worker_pids(own.get_client())
        assert own.refresh_workers() is None  # a fresh worker: new processes would only cost time
        own.get_client().submit(touch_and_free, 300, pure=False).result()
        assert own.refresh_workers() is None  # what a task freed is not held
        assert worker_pids(own.get_client()) == before
        own.get_client().submit(hold_like_gx, 300, pure=False).result()
        assert own.refresh_workers() > 0.25
        assert run_tasks(own.get_client(), pow, [3], exp=2) == [9]
        after = worker_pids(own.get_client())
        assert before and after and before.isdisjoint(after)
        address = own.get_client().scheduler.address
        assert address.startswith("tls://127.0.0.1:")  # another local user cannot just connect and run code
        with pytest.raises((OSError, TimeoutError)):  # certificates of its own are not the run's
            Client(address, timeout=3, security=Security.temporary())
    finally:
        own.close()

    shared = DaskCluster(scheduler_address=dask_address)
    try:
        before = worker_pids(shared.get_client())
        assert shared.refresh_workers() is None
        assert worker_pids(shared.get_client()) == before
    finally:
        shared.close()


def worker_allocators(dask_worker: Worker) -> tuple[str | None, str, bool]:
    import pyarrow as pa

    trims = "trim-after-task" in dask_worker.plugins
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), pa.default_memory_pool().backend_name, trims


def test_new_workers_serve_the_next_wave_however_soon_lost_ones_are_given_up() -> None:
    """LocalCluster closes the nanny of a worker not back within `lost-worker-timeout` (15 s): restarted
    workers that came back late left a run waiting for workers forever; replaced ones are new nannies."""
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "10ms"}):
        own = DaskCluster(n_workers=1, memory_limit="1GiB")
        try:
            own.get_client().submit(hold_like_gx, 300, pure=False).result()
            assert own.refresh_workers()
            assert own.get_client().submit(pow, 3, 2, pure=False).result(timeout=60) == 9
        finally:
            own.close()


def test_workers_allocate_as_measured() -> None:
    """Arrow on mimalloc, glibc adaptive, trimmed after a task that leaves them above half their limit:
    measured speed and memory choices (resources/dask_cluster.py) that every worker the resource starts
    must have, also in a cluster that replaced one."""
    own = DaskCluster(n_workers=1, memory_limit="1GiB")
    try:
        assert set(own.get_client().run(worker_allocators).values()) == {(None, "mimalloc", True)}
        port = own._cluster.scheduler.http_server.port
        listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"]
        assert listening and set(listening) <= {"127.0.0.1"}  # the dashboard, unauthenticated: this host only
        own.get_client().submit(hold_like_gx, 300, pure=False).result()
        assert own.refresh_workers()
        assert set(own.get_client().run(worker_allocators).values()) == {(None, "mimalloc", True)}
    finally:
        own.close()


def touch_and_free(mib: int) -> int:
    """A task's working memory, written to (so resident) and freed; returns the worker's RSS meanwhile."""
    import numpy as np
    import pyarrow as pa

    buffer = pa.allocate_buffer(mib * 2**20)  # from Arrow's pool (mimalloc), as the stages' tables are
    np.frombuffer(buffer, dtype=np.uint8)[:] = 1
    return psutil.Process().memory_info().rss


def worker_rss(client: Client) -> int:
    return next(iter(client.run(lambda: psutil.Process().memory_info().rss).values()))


def test_a_worker_above_half_its_limit_hands_memory_back_after_a_task() -> None:
    """Below half its limit a worker keeps what a task freed for the next (no page faults); above, the
    next task's headroom matters more."""
    own = DaskCluster(n_workers=1, memory_limit="1GiB")
    try:
        client = own.get_client()
        kept = client.submit(touch_and_free, 300, pure=False).result()
        assert kept < 512 * 2**20
        assert worker_rss(client) > kept - 100 * 2**20  # below half its limit: kept for the next task
        peak = client.submit(touch_and_free, 600, pure=False).result()
        after = worker_rss(client)
        assert peak > 600 * 2**20 > 512 * 2**20
        assert after < peak - 400 * 2**20, (
            f"{after / 2**20:.0f} MiB held after a task that peaked at {peak / 2**20:.0f}"
        )
    finally:
        own.close()


def test_a_wave_leaves_no_results_on_the_workers(dask_address: str) -> None:
    """Results a wave's futures still held would be recomputed if a worker died during the next wave."""
    with Client(dask_address) as client:
        assert run_tasks(client, pow, [1, 2, 3], exp=2) == [1, 4, 9]
        deadline = time.monotonic() + 10
        while wave_tasks(client) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert wave_tasks(client) == []


def wave_tasks(client: Client) -> list[str]:
    keys = client.run_on_scheduler(lambda dask_scheduler: [str(k) for k in dask_scheduler.tasks])
    return [k for k in keys if k.startswith("pow-")]
