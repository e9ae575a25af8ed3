"""The Dask resource: fresh workers between stages on a run's own cluster, a shared cluster left alone."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import dagster as dg
import dask
import psutil
import pytest
from dask.utils import format_bytes
from distributed import Client, Worker
from distributed.security import Security
from distributed.system import MEMORY_LIMIT

from aifactory_assets.tasks import run_tasks
from resources import DaskCluster, dask_cluster_from_env
from resources.dask_cluster import runs_at_once, size_local_workers


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


@dg.asset
def probe(dask: DaskCluster) -> dg.MaterializeResult:
    limits = dask.get_client().run(lambda dask_worker: dask_worker.memory_manager.memory_limit)
    return dg.MaterializeResult(metadata={"limits": sorted(limits.values())})


def queued(max_concurrent_runs: int) -> contextlib.AbstractContextManager[dg.DagsterInstance]:
    """An instance whose run queue starts `max_concurrent_runs` at once."""
    return dg.instance_for_test(overrides={"concurrency": {"runs": {"max_concurrent_runs": max_concurrent_runs}}})


def running_beside_the_queue(instance: dg.DagsterInstance, runs: int) -> None:
    """Runs in progress that the queue did not start, as `make materialize` runs in its own process."""
    for _ in range(runs):
        instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", status=dg.DagsterRunStatus.STARTED))


def probe_run(instance: dg.DagsterInstance, dask: DaskCluster) -> tuple[list[int], list[tuple[int, str]]]:
    """The workers' memory limits in a run of `probe`, and what (at which level) its log said of Dask."""
    result = dg.materialize([probe], resources={"dask": dask}, instance=instance)
    said = [(e.level, e.message) for e in instance.all_logs(result.run_id) if e.message.startswith("Dask: ")]
    return result.asset_materializations_for_node("probe")[0].metadata["limits"].value, said


@pytest.mark.parametrize(("runs", "shared_by"), [(3, 3), (-1, 1)])
def test_auto_shares_the_hosts_memory_among_the_runs_the_instance_has_at_once(runs: int, shared_by: int) -> None:
    """Two runs' clusters each sized to the whole host let Dask spill or pause neither before the kernel
    kills a worker; the run's log says what each worker got, why, and where its dashboard is."""
    with queued(runs) as instance:
        limits, said = probe_run(instance, DaskCluster(n_workers=2))
    each = MEMORY_LIMIT // shared_by // 2
    assert limits == [each, each]
    assert len(said) == 1 and f"2 local worker(s) x 1 thread(s), {format_bytes(each)} each" in said[0][1]
    assert ("nothing limits the runs" in said[0][1]) == (runs == -1)
    assert "dashboard http://127.0.0.1:" in said[0][1] and said[0][0] == logging.INFO


def test_a_run_leaves_no_closed_client_as_the_current_one() -> None:
    """Dask collections computed after a run (a notebook's, the next test's) reach the current client: the
    run's, closed at its end, had stayed current and failed them with ClosedClientError."""
    with queued(2) as instance:
        probe_run(instance, DaskCluster(n_workers=1))
    assert dask.compute(dask.delayed(sum)([1, 2]))[0] == 3


def test_limits_past_the_host_beside_the_runs_in_progress_are_said_as_a_warning() -> None:
    """Workers and limits set by hand are kept. Two workers of half the host each fill it; beside a run the
    queue did not start (`make materialize`) they pass it, and Dask would spill or pause none of them before
    the kernel killed one."""
    with queued(1) as instance:
        running_beside_the_queue(instance, 1)
        limits, said = probe_run(instance, DaskCluster(n_workers=2, memory_limit="0.5"))
    each = int(0.5 * MEMORY_LIMIT)
    assert limits == [each, each]
    assert len(said) == 1 and said[0][0] == logging.WARNING
    assert f"2 x {format_bytes(each)} x 2 run(s) is more than this host's memory" in said[0][1]


GiB = 2**30


@pytest.mark.parametrize(
    ("n_workers", "runs", "host", "count", "each", "enough"),
    [
        (None, 2, 64 * GiB, 16, 2 * GiB, True),  # a worker per core, half the host between them
        (None, 10, 64 * GiB, 6, 64 * GiB // 10 // 6, True),  # Dagster's default queue: fewer, 1 GiB at least
        (None, 10, 8 * GiB, 1, 8 * GiB // 10, False),  # not even one worker's need: said as a warning
        (None, None, 64 * GiB, 16, 4 * GiB, True),  # no limit on runs: the whole host, said so
        (4, 2, 64 * GiB, 4, 8 * GiB, True),  # workers set by hand are kept
    ],
)
def test_local_workers_get_a_worker_per_core_while_each_has_what_it_needs(
    n_workers: int | None, runs: int | None, host: int, count: int, each: int, enough: bool
) -> None:
    sized = size_local_workers(n_workers, "auto", runs, cores=16, host=host)
    assert (sized.count, sized.memory_limit, not sized.warning) == (count, each, enough)
    assert ("fewer workers than the 16 cores" in sized.why) == (count < 16 and n_workers is None)


@pytest.mark.parametrize(
    ("limit", "n_workers", "runs", "count", "each", "warning"),
    [
        ("0.25", None, 2, 2, int(0.25 * MEMORY_LIMIT), ""),  # a quarter each, half the host per run
        ("0.75", None, 1, 1, int(0.75 * MEMORY_LIMIT), ""),  # a worker per core was 1.5 times the host
        ("1", None, 2, 1, MEMORY_LIMIT, f"1 x {format_bytes(MEMORY_LIMIT)} x 2 run(s) is more than this host's"),
        ("0.75", 2, 1, 2, int(0.75 * MEMORY_LIMIT), f"2 x {format_bytes(int(0.75 * MEMORY_LIMIT))} x 1 run(s)"),
        ("600MiB", None, 1, 2, 600 * 2**20, "under the 1.00 GiB a worker needs"),
    ],
)
def test_a_limit_set_by_hand_gives_as_many_workers_as_the_host_holds(
    limit: str, n_workers: int | None, runs: int, count: int, each: int, warning: str
) -> None:
    """A worker per core, each given the limit and the runs at once not counted, added up past the host:
    Dask would spill or pause none of them before the kernel killed one. Read as the workers read it."""
    sized = size_local_workers(n_workers, limit, runs, cores=2)
    assert (sized.count, sized.memory_limit) == (count, each)
    assert warning in sized.warning and bool(sized.warning) == bool(warning)


def test_the_environment_sizes_the_runs_own_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIFACTORY_DASK_WORKERS", "3")
    monkeypatch.setenv("AIFACTORY_DASK_MEMORY_LIMIT", "3GiB")
    assert (dask_cluster_from_env().n_workers, dask_cluster_from_env().memory_limit) == (3, "3GiB")
    for wrong in ("0", "two", "-1"):
        monkeypatch.setenv("AIFACTORY_DASK_WORKERS", wrong)
        with pytest.raises(ValueError, match=f"AIFACTORY_DASK_WORKERS='{wrong}'"):
            dask_cluster_from_env()
    monkeypatch.delenv("AIFACTORY_DASK_WORKERS")
    assert dask_cluster_from_env().n_workers is None  # one per core, as memory allows


@pytest.mark.parametrize("limit", ["auto", "3GiB", "2 GB", "4e9", "0.25", "1"])
def test_memory_limits_as_a_local_cluster_reads_them_load(monkeypatch: pytest.MonkeyPatch, limit: str) -> None:
    monkeypatch.setenv("AIFACTORY_DASK_MEMORY_LIMIT", limit)
    assert dask_cluster_from_env().memory_limit == limit  # a number up to 1: that share of the host, per worker


def refusals(monkeypatch: pytest.MonkeyPatch, variable: str, field: str, wrong: str) -> tuple[str, str]:
    """What the load (from `variable`) and the resource (its `field`, as run config sets it) say of `wrong`:
    one rule for both."""
    monkeypatch.setenv(variable, wrong)
    said = []
    for build in (dask_cluster_from_env, lambda: DaskCluster(**{field: wrong})):
        with pytest.raises(ValueError) as refused:
            build()
        said.append(str(refused.value))
    return said[0], said[1]


@pytest.mark.parametrize(
    "wrong", ["lots", "AUTO", "0", "0GB", "0.0", "-1GB", "-0.5", "inf", "nan", "16", "1.5", "256MiB"]
)
def test_a_memory_limit_dask_cannot_keep_is_refused(monkeypatch: pytest.MonkeyPatch, wrong: str) -> None:
    """Unchecked, `lots` loaded fine and failed every run's first step without naming the variable, `0`
    (Dask's "no limit") left workers to the kernel's OOM killer, and `16` (bytes) restarted a worker on every
    task."""
    load, config = refusals(monkeypatch, "AIFACTORY_DASK_MEMORY_LIMIT", "memory_limit", wrong)
    assert f"AIFACTORY_DASK_MEMORY_LIMIT='{wrong}': a per-worker memory limit is" in load
    assert f"memory_limit='{wrong}': a per-worker memory limit is" in config


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"n_workers": 1, "memory_limit": "0"}, "memory_limit='0': a per-worker memory limit is"),
        ({"n_workers": 0}, "n_workers\n  Input should be greater than or equal to 1"),
    ],
)
def test_run_config_is_checked_as_the_environment_is(config: dict[str, object], named: str) -> None:
    """The launchpad's `resources.dask.config` passed by the load's checks: `0` ran workers with no limit."""
    with pytest.raises(dg.DagsterResourceFunctionError) as failed:
        dg.materialize(
            [probe], resources={"dask": DaskCluster()}, run_config={"resources": {"dask": {"config": config}}}
        )
    assert named in str(failed.value.__cause__)


@pytest.mark.parametrize(
    "wrong", ["tls//127.0.0.1:8786", "127.0.0.1:8786", "http://127.0.0.1:8786", "tls://", "tls://me:secret@host:1"]
)
def test_a_scheduler_address_dask_cannot_use_is_refused(monkeypatch: pytest.MonkeyPatch, wrong: str) -> None:
    """Unchecked, Dask tried a typo as a host name for 30 s in every run's first step, and a password in the
    address (which Dask never reads) went into the error."""
    load, config = refusals(monkeypatch, "AIFACTORY_DASK_SCHEDULER", "scheduler_address", wrong)
    for said, name in ((load, "AIFACTORY_DASK_SCHEDULER"), (config, "scheduler_address")):
        assert f"{name}='" in said and "a running scheduler's address is tls://host:port" in said
        assert "secret" not in said


@pytest.mark.parametrize("scheme", ["tls", "tcp"])
def test_a_scheduler_not_reached_names_the_settings_to_look_at(scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    """Dask's own error named neither AIFACTORY_DASK_SCHEDULER nor, for tls://, its TLS settings; the log says
    which settings a shared scheduler ignores, and that over tcp:// the store's credentials go in clear."""
    address = f"{scheme}://127.0.0.1:9"  # nothing listens there
    shared = DaskCluster(scheduler_address=address, n_workers=2, memory_limit="2GiB")
    with (
        dask.config.set({"distributed.comm.timeouts.connect": "1s"}),
        pytest.raises(ConnectionError, match=f"scheduler at {address}: see AIFACTORY_DASK_SCHEDULER") as failed,
    ):
        shared.get_client()
    assert ("DASK_DISTRIBUTED__COMM__TLS__CA_FILE" in str(failed.value)) == (scheme == "tls")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("AIFACTORY_DASK_WORKERS, AIFACTORY_DASK_MEMORY_LIMIT) size a run's own" in w for w in warned)
    assert any("cross the network in clear" in w for w in warned) == (scheme == "tcp")
    # The failed client left itself Dask's scheduler: this process's next compute asked for a client it lacked.
    assert dask.compute(dask.delayed(sum)([1, 2]))[0] == 3


def test_runs_at_once_follows_the_instances_run_coordinator() -> None:
    assert runs_at_once(dg.DagsterInstance.ephemeral()) == 1  # in the caller's process, one at a time
    default = {"module": "dagster._core.run_coordinator", "class": "DefaultRunCoordinator"}
    with dg.instance_for_test(overrides={"run_coordinator": default}) as instance:
        assert runs_at_once(instance) is None  # every run launched as it comes
    for limit, beside, runs in ((0, 0, 1), (1, 3, 3), (4, 3, 4), (-1, 3, None)):  # runs beside the queue count
        with queued(limit) as instance:
            running_beside_the_queue(instance, beside)
            for status in (dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.SUCCESS):  # not in progress
                instance.add_run(dg.DagsterRun(job_name="__ASSET_JOB", status=status))
            assert runs_at_once(instance) == runs


def dask_worker_pids() -> set[int]:
    """This process's Dask worker processes (a nanny spawns each), a LocalCluster's or not."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # one that ended meanwhile
            if "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
    return pids


def test_a_cluster_whose_client_failed_to_start_is_closed() -> None:
    """Kept with no client, the next step started another cluster, and the run's teardown closed only that
    one: the first's workers outlived the run."""
    before = dask_worker_pids()
    own = DaskCluster(n_workers=1, memory_limit="1GiB")
    try:
        with (
            dask.config.set({"distributed.client.heartbeat": "never"}),  # read by the client, not the cluster
            pytest.raises(KeyError, match="time unit"),
        ):
            own.get_client()
        assert dask_worker_pids() == before
    finally:
        own.close()
