"""The Dask cluster the assets compute on: a LocalCluster sized to the machine, or an existing scheduler."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable

import dagster as dg
import dask
import psutil
import pyarrow as pa
from dask.utils import format_bytes
from distributed import Client, LocalCluster, Worker, WorkerPlugin
from distributed.security import Security
from distributed.system import MEMORY_LIMIT
from distributed.worker_memory import parse_memory_limit
from pydantic import Field, PrivateAttr

# P2P shuffles (dataset statistics) log every start and stop at WARNING; they are routine here.
logging.getLogger("distributed.shuffle._scheduler_plugin").setLevel(logging.ERROR)
# The workers' allocators, set before their processes start (for every LocalCluster in this process, the
# benchmarks' baselines included, so comparisons stay fair):
# - Arrow on mimalloc, its pages handed back after a task that leaves the worker above half its memory
#   limit (TrimAfterTask). jemalloc gives pages back on its own within a second, but faults them in again
#   all through a task: per validation task, measured on the 2-core machine, 0.42 s and 42 k page faults
#   on jemalloc, 0.36 s and 11 k on mimalloc with the release, and 530 vs 410 MiB of RSS after the task.
# - glibc's malloc left adaptive. Dask sets MALLOC_TRIM_THRESHOLD_=65536, and any explicit threshold also
#   freezes glibc's mmap threshold at 128 KiB: every larger numpy or pandas buffer is then a fresh mmap,
#   faulted in and zeroed page by page. Measured on the 2-core machine: 3.5x the page faults and 0.43 vs
#   0.35 s per ingest task, the 2 GB benchmark 89 -> 76 s. What a task frees goes back to the OS through
#   TrimAfterTask instead.
dask.config.set(
    {
        "distributed.nanny.pre-spawn-environ.ARROW_DEFAULT_MEMORY_POOL": "mimalloc",
        "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,  # None: not set (nanny.py)
    }
)


TRIM_ABOVE = 0.5  # of a worker's memory limit: below where Dask spills on process memory (0.7)
# Of a worker's memory limit held between stages: above it, fresh workers. Of a 1 GiB limit a fresh worker
# holds 0.12, one that imported GX 0.30 (more once it validated), and the shuffle's gather peaks near 0.25
# more (4 x BUCKET_BYTES): on a GX worker that comes near where Dask spills (0.7) and pauses (0.8).
REFRESH_ABOVE = 0.25


@functools.cache
def glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim; None on musl or macOS. Looked up once (find_library runs ldconfig)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None
    return getattr(libc, "malloc_trim", None)


def hand_back_free_memory() -> None:
    """What Arrow's mimalloc and glibc keep of freed memory goes back to the OS. mimalloc 3's arenas are
    shared, so any thread (the worker's event loop) may free what a task's thread held."""
    pa.default_memory_pool().release_unused()
    if (malloc_trim := glibc_malloc_trim()) is not None:
        malloc_trim(0)


def memory_limit(worker: Worker) -> int:
    """The worker's memory limit, or what this host (its cgroup included) gives the process without one."""
    return worker.memory_manager.memory_limit or MEMORY_LIMIT


class TrimAfterTask(WorkerPlugin):
    """glibc and mimalloc keep what a task freed for reuse (no page faults); once a task is done and the
    worker holds more than TRIM_ABOVE of its memory limit, that goes back to the OS, so the next task's
    headroom is not spent on this one's free lists. Below it the next task reuses those pages: trimming
    after every task made each fault in its memory afresh (a gather task 0.20 vs 0.15 s, 15 k vs 1 k page
    faults, 60 of them on the 2-core machine; the workers held 260 vs 340 MiB after them)."""

    idempotent = True

    def setup(self, worker: Worker) -> None:
        self.trim_above, self.process = TRIM_ABOVE * memory_limit(worker), psutil.Process()

    def transition(self, key: object, start: str, finish: str, **kwargs: object) -> None:
        if start == "executing" and self.process.memory_info().rss > self.trim_above:
            hand_back_free_memory()


def memory_share(dask_worker: Worker) -> float:
    """What the worker process holds once its free memory is handed back, as a share of its limit."""
    hand_back_free_memory()
    return psutil.Process().memory_info().rss / memory_limit(dask_worker)


def prepare_workers(client: Client) -> Client:
    """What a cluster this process started needs (the benchmarks' too): mimalloc keeps what a task freed
    until TrimAfterTask hands it back, and a worker without it grows until Dask pauses it."""
    client.register_plugin(TrimAfterTask(), name="trim-after-task")
    return client


# What a worker needs: GX's import alone holds ~330 MiB and a shuffle's gather peaks ~250 MiB above it; the
# 6 GB memory benchmark goes through on 1 GiB workers.
MIN_WORKER_MEMORY = 2**30


def runs_at_once(instance: dg.DagsterInstance | None) -> int | None:
    """How many runs the instance starts at once: its run queue's `max_concurrent_runs`; 1 for an ephemeral
    instance (runs in the caller's process, one at a time); None where nothing limits them (-1, or a run
    coordinator without a queue, which launches every run as it comes)."""
    if instance is None or instance.is_ephemeral:
        return 1
    queue = instance.get_concurrency_config().run_queue_config
    if queue is None or queue.max_concurrent_runs < 0:
        return None
    return max(queue.max_concurrent_runs, 1)


@dataclasses.dataclass(frozen=True)
class LocalWorkers:
    """How a run's LocalCluster is sized, and why (said in the run's log)."""

    count: int
    memory_limit: int | str
    why: str
    enough: bool = True  # False: each worker gets less than MIN_WORKER_MEMORY


def size_local_workers(
    n_workers: int | None,
    memory_limit: str,
    runs: int | None,
    cores: int = dask.system.CPU_COUNT,  # the CPUs this job may use (cgroups, affinity)
    host: int = MEMORY_LIMIT,  # this host's memory, or its cgroup's limit
) -> LocalWorkers:
    """One worker per core by default. `auto` shares the host's memory among the runs the instance starts
    at once, then among the run's workers: clusters each sized to the whole host let Dask spill or pause
    none of them before the kernel kills one. A share too small for a worker per core gives fewer workers,
    each MIN_WORKER_MEMORY at least."""
    if memory_limit != "auto":
        return LocalWorkers(n_workers or cores, memory_limit, "set by memory_limit")
    share = host // (runs or 1)
    count = n_workers or max(1, min(cores, share // MIN_WORKER_MEMORY))
    shared_by = (
        f"shared by the {runs} run(s) the instance starts at once"
        if runs
        else "(nothing limits the runs the instance starts at once)"
    )
    why = f"this host's {format_bytes(host)} {shared_by}"
    if count < cores and not n_workers:
        why += f"; fewer workers than the {cores} cores, {format_bytes(MIN_WORKER_MEMORY)} each at least"
    return LocalWorkers(count, share // count, why, enough=share // count >= MIN_WORKER_MEMORY)


class DaskCluster(dg.ConfigurableResource):
    """Connects to `scheduler_address` when given (e.g. dask-jobqueue on the site's SLURM); else starts one
    LocalCluster on first use in a run, shared by the run's steps, and closes it when the run ends."""

    scheduler_address: str | None = Field(
        default=None,
        description="tls://host:port of a running scheduler (over tcp:// the store's credentials, in every "
        "task's arguments, cross the network in clear)",
    )
    n_workers: int | None = Field(default=None, description="LocalCluster workers; default: one per core")
    threads_per_worker: int = 1
    memory_limit: str = Field(
        default="auto",
        description="per-worker memory limit, e.g. '2GiB'; auto: the host's memory shared by the runs the "
        "instance starts at once (max_concurrent_runs), then by the workers",
    )

    _cluster: LocalCluster | None = PrivateAttr(default=None)
    _client: Client | None = PrivateAttr(default=None)
    _runs_at_once: int | None = PrivateAttr(default=1)
    _log: logging.Logger | dg.DagsterLogManager = PrivateAttr(default=logging.getLogger(__name__))

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._runs_at_once = runs_at_once(context.instance)
        self._log = context.log or self._log

    def get_client(self) -> Client:
        if self._client is None:
            if self.scheduler_address:
                self._client = Client(self.scheduler_address)
                self._log.info(f"Dask: scheduler {self.scheduler_address}; dashboard {self._client.dashboard_link}")
            else:
                workers = size_local_workers(self.n_workers, self.memory_limit, self._runs_at_once)
                self._cluster = LocalCluster(
                    n_workers=workers.count,
                    threads_per_worker=self.threads_per_worker,
                    memory_limit=workers.memory_limit,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address="127.0.0.1:0",  # a free port, this host only: runs side by side never clash
                    # TLS with certificates made for this run alone: on a shared login node, another user could
                    # otherwise connect to 127.0.0.1 and run code in workers that hold the store's credentials.
                    security=Security.temporary(),
                )
                self._client = prepare_workers(Client(self._cluster))
                each = next(iter(self._cluster.workers.values())).memory_manager.memory_limit  # None: no limit
                said = (
                    f"Dask: {workers.count} local worker(s) x {self.threads_per_worker} thread(s), "
                    f"{format_bytes(each) if each else 'no memory limit'} each ({workers.why}); "
                    f"dashboard {self._client.dashboard_link}"
                )
                if workers.enough:
                    self._log.info(said)
                else:
                    fewer = "fewer workers (AIFACTORY_DASK_WORKERS), " if self.n_workers else ""
                    self._log.warning(
                        f"{said}. Under the {format_bytes(MIN_WORKER_MEMORY)} a worker needs: {fewer}a lower "
                        "max_concurrent_runs for the instance, or AIFACTORY_DASK_MEMORY_LIMIT"
                    )
        return self._client

    def refresh_workers(self) -> float | None:
        """A fresh LocalCluster for the next stage when this run started its own (a shared scheduler's
        workers are not ours to replace) and a worker holds more than REFRESH_ABOVE of its memory limit:
        validation imports GX into every worker, ~330 MiB that no task gives back, a third of a 1 GiB
        worker's limit but nothing to a 12 GiB one, where new processes only cost time (2.8 s in the 2 GB
        benchmark) and GX's import again. Returns the largest share held when it replaced the workers.
        Replaced, not restarted: LocalCluster closes a nanny whose worker is away 15 s after it left
        (`lost-worker-timeout`); with restarts a few seconds apart that check could fall while a later
        restart had the worker away, and the run then waited for workers forever (`make materialize` at a
        1 GiB limit; a loop of restarts under load hung at its 11th)."""
        if self._cluster is None or self._client is None:
            return None
        shares = [v for v in self._client.run(memory_share, on_error="return").values() if isinstance(v, float)]
        held = max(shares, default=0.0)
        if held <= REFRESH_ABOVE:
            return None
        self.close()  # the next get_client() starts the new one
        return held

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close()

    def close(self) -> None:
        client, cluster, self._client, self._cluster = self._client, self._cluster, None, None
        try:
            if client is not None:
                client.close()
        finally:
            if cluster is not None:  # even when the client's close failed: its worker processes go too
                cluster.close()


LEAST_WORKER_MEMORY = 512 * 2**20  # a worker's imports take about 330 MiB: below this it restarts on every task


def memory_limit_from_env() -> str:
    """AIFACTORY_DASK_MEMORY_LIMIT, checked at load: unchecked, a typo loaded fine and then failed every run's
    first step without naming the variable. 0 is refused: Dask reads it as no limit, and workers without one
    never spill or pause before the kernel kills one; `1`, all of this host's memory, is the most there is."""
    value = os.environ.get("AIFACTORY_DASK_MEMORY_LIMIT") or "auto"
    try:  # as each worker reads it
        limit = parse_memory_limit(value, nthreads=1, total_cores=1, logger=logging.getLogger(__name__))
    except (ValueError, OverflowError):  # not a size; inf
        limit = None
    if limit is None or limit < LEAST_WORKER_MEMORY:
        raise ValueError(
            f"AIFACTORY_DASK_MEMORY_LIMIT={value!r}: a per-worker memory limit is auto (the default), a size such "
            f"as 4GiB, or a share of this host's memory such as 0.25, of {format_bytes(LEAST_WORKER_MEMORY)} at "
            "least (a bare number above 1 is bytes); not 0, which Dask reads as no limit at all"
        )
    return value


def dask_cluster_from_env() -> DaskCluster:
    """`AIFACTORY_DASK_SCHEDULER` points at a shared cluster; else `AIFACTORY_DASK_WORKERS` and
    `AIFACTORY_DASK_MEMORY_LIMIT` size the run's own."""
    workers = os.environ.get("AIFACTORY_DASK_WORKERS") or None
    if workers is not None and not (workers.isdigit() and int(workers) > 0):
        raise ValueError(f"AIFACTORY_DASK_WORKERS={workers!r}: a number of workers, at least 1")
    return DaskCluster(
        scheduler_address=os.environ.get("AIFACTORY_DASK_SCHEDULER") or None,
        n_workers=int(workers) if workers else None,
        memory_limit=memory_limit_from_env(),
    )
