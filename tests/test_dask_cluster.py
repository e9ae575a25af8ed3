"""The Dask resource: fresh workers between stages on a run's own cluster, a shared cluster left alone."""

from __future__ import annotations

import os

from distributed import Client

from resources import DaskCluster


def worker_pids(client: Client) -> set[int]:
    return set(client.run(os.getpid).values())


def test_refresh_restarts_the_runs_own_workers_only(dask_address: str) -> None:
    own = DaskCluster(n_workers=1, memory_limit="1GiB")
    try:
        before = worker_pids(own.get_client())
        own.refresh_workers()
        after = worker_pids(own.get_client())
        assert before and after and before.isdisjoint(after)
    finally:
        own.close()

    shared = DaskCluster(scheduler_address=dask_address)
    try:
        before = worker_pids(shared.get_client())
        shared.refresh_workers()
        assert worker_pids(shared.get_client()) == before
    finally:
        shared.close()
