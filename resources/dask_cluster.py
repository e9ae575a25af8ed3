"""The Dask cluster the assets compute on: a LocalCluster sized to the machine, or an existing scheduler."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Callable
from urllib.parse import urlsplit

import dagster as dg
import dask
import psutil
import pyarrow as pa
from dask.utils import format_bytes
from distributed import Client, LocalCluster, Worker, WorkerPlugin, default_client
from distributed.security import Security
from distributed.system import MEMORY_LIMIT
from distributed.worker_memory import parse_memory_limit
from pydantic import ConfigDict, Field, PrivateAttr, field_validator

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


LEAST_WORKER_MEMORY = 512 * 2**20  # a worker's imports take about 330 MiB: below this it restarts on every task
# Dask's parse of a size past this host's memory warns that it keeps the host's: each worker says so itself.
UNSAID = logging.Logger(f"{__name__}.memory_limit", level=logging.CRITICAL)


def memory_limit_bytes(value: str, name: str) -> int:
    """A worker's memory limit in bytes as Dask reads `value` (a share of this host's memory, a size capped at
    it), checked wherever it is set (`name`): unchecked, a typo loaded fine and then failed every run's first
    step without naming its setting. 0 is refused: Dask reads it as no limit, and workers without one never
    spill or pause before the kernel kills one; `1`, all of this host's memory, is the most there is."""
    try:  # as each worker reads it
        limit = parse_memory_limit(value, nthreads=1, total_cores=1, logger=UNSAID)
    except (ValueError, OverflowError):  # not a size; inf
        limit = None
    if limit is None or limit < LEAST_WORKER_MEMORY:
        raise ValueError(
            f"{name}={value!r}: a per-worker memory limit is auto (the default), a size such as 4GiB, or a share "
            f"of this host's memory such as 0.25, of {format_bytes(LEAST_WORKER_MEMORY)} at least (a bare number "
            "above 1 is bytes); not 0, which Dask reads as no limit at all"
        )
    return limit


def checked_scheduler_address(address: str, name: str) -> str:
    """A running scheduler's address, checked wherever it is set (`name`): Dask took a typo (`tls//host:port`)
    for a host name and tried it for 30 s, and a user:password@ (which Dask never reads) would reach the logs."""
    parts = urlsplit(address)
    if parts.scheme not in ("tls", "tcp") or not parts.hostname or "@" in address:
        shown = f"{parts.scheme}://***@{address.rpartition('@')[2]}" if "@" in address else address
        raise ValueError(
            f"{name}={shown!r}: a running scheduler's address is tls://host:port (or tcp://host:port, in clear), "
            "with no user:password@: Dask's TLS settings say who connects"
        )
    return address


def close_failed_default_client() -> None:
    """A Client that failed to connect (a TLS setting missing) stays Dask's default client and scheduler:
    this process's next dask.compute (a notebook's, a test's) hung on it, or asked for a client there was
    none of. Closed, it hands both back."""
    with contextlib.suppress(ValueError):  # no default client
        stale = default_client()
        if stale.status != "running":
            stale.close()


def runs_at_once(instance: dg.DagsterInstance | None) -> int | None:
    """How many runs the instance has at once: its run queue's `max_concurrent_runs`, or more where more are
    in progress (this one included), since runs in their own process (`make materialize`, `dagster asset
    materialize`) pass by the queue; 1 for an ephemeral instance (runs in the caller's process, one at a
    time); None where nothing limits them (-1, or a run coordinator without a queue, which launches every
    run as it comes)."""
    if instance is None or instance.is_ephemeral:
        return 1
    queue = instance.get_concurrency_config().run_queue_config
    if queue is None or queue.max_concurrent_runs < 0:
        return None
    # The statuses the queue counts against its limit: a run holding its process (and its workers).
    running = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
    return max(queue.max_concurrent_runs, instance.get_runs_count(dg.RunsFilter(statuses=running)), 1)


@dataclasses.dataclass(frozen=True)
class LocalWorkers:
    """How a run's LocalCluster is sized, and why (said in the run's log)."""

    count: int
    memory_limit: int  # each worker's, in bytes
    why: str
    warning: str = ""  # what a worker or the host lacks, said as a warning; empty: nothing


def size_local_workers(
    n_workers: int | None,
    memory_limit: str,
    runs: int | None,
    cores: int = dask.system.CPU_COUNT,  # the CPUs this job may use (cgroups, affinity)
    host: int = MEMORY_LIMIT,  # this host's memory, or its cgroup's limit
) -> LocalWorkers:
    """One worker per core, while the host's memory shared among the runs the instance has at once holds
    them: clusters that add up past the host let Dask spill or pause none of them before the kernel kills
    one. `auto` shares that share among the workers, each MIN_WORKER_MEMORY at least (fewer workers
    otherwise); a limit set by hand gives each worker that limit, and as many workers as the share holds.
    Workers set by hand are kept, said as a warning where they need more than the host has."""
    share = host // (runs or 1)
    shared_by = (
        f"shared by the {runs} run(s) the instance has at once"
        if runs
        else "(nothing limits the runs the instance starts at once)"
    )
    if memory_limit == "auto":
        count = n_workers or max(1, min(cores, share // MIN_WORKER_MEMORY))
        each, why, fewer = share // count, "", f"{format_bytes(MIN_WORKER_MEMORY)} each at least"
    else:
        each = memory_limit_bytes(memory_limit, "memory_limit")
        count = n_workers or max(1, min(cores, share // each))
        why, fewer = f"{memory_limit} set by memory_limit; ", "as many as that holds"
    why += f"this host's {format_bytes(host)} {shared_by}"
    if count < cores and not n_workers:
        why += f"; fewer workers than the {cores} cores, {fewer}"
    lacks = [f"under the {format_bytes(MIN_WORKER_MEMORY)} a worker needs"] if each < MIN_WORKER_MEMORY else []
    if count * each * (runs or 1) > host:
        lacks.append(f"{count} x {format_bytes(each)} x {runs or 1} run(s) is more than this host's memory")
    return LocalWorkers(count, each, why, "; ".join(lacks))


class DaskCluster(dg.ConfigurableResource):
    """Connects to `scheduler_address` when given (e.g. dask-jobqueue on the site's SLURM); else starts one
    LocalCluster on first use in a run, shared by the run's steps, and closes it when the run ends."""

    scheduler_address: str | None = Field(
        default=None,
        description="tls://host:port of a running scheduler (over tcp:// the store's credentials, in every "
        "task's arguments, cross the network in clear)",
    )
    n_workers: int | None = Field(default=None, ge=1, description="LocalCluster workers; default: one per core")
    threads_per_worker: int = 1
    memory_limit: str = Field(
        default="auto",
        description="per-worker memory limit, e.g. '2GiB'; auto: the host's memory shared by the runs the "
        "instance has at once (max_concurrent_runs, or more in progress), then by the workers",
    )

    # An error shows what our checks say of a value, never the value: an address may hold user:password@.
    model_config = ConfigDict(hide_input_in_errors=True)

    _cluster: LocalCluster | None = PrivateAttr(default=None)
    _client: Client | None = PrivateAttr(default=None)
    _runs_at_once: int | None = PrivateAttr(default=1)
    _log: logging.Logger | dg.DagsterLogManager = PrivateAttr(default=logging.getLogger(__name__))

    @field_validator("scheduler_address")
    @classmethod
    def _a_scheduler_address(cls, value: str | None) -> str | None:
        """Run config (the launchpad's) is checked as the environment is at load."""
        return None if value is None else checked_scheduler_address(value, "scheduler_address")

    @field_validator("memory_limit")
    @classmethod
    def _a_memory_limit_dask_can_keep(cls, value: str) -> str:
        """Run config (the launchpad's) is checked as the environment is at load."""
        memory_limit_bytes(value, "memory_limit")
        return value

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        self._runs_at_once = runs_at_once(context.instance)
        self._log = context.log or self._log

    def get_client(self) -> Client:
        if self._client is None:
            if self.scheduler_address:
                self._client = self.connect(self.scheduler_address)
            else:
                self._cluster, self._client = self.start_local_cluster()
        return self._client

    def connect(self, address: str) -> Client:
        """A client of a running scheduler. Settings it ignores and credentials in clear are said as warnings;
        a failure names the setting to look at, with Dask's own for tls://."""
        if self.n_workers is not None or self.memory_limit != "auto":
            self._log.warning(
                "Dask: n_workers and memory_limit (AIFACTORY_DASK_WORKERS, AIFACTORY_DASK_MEMORY_LIMIT) size a "
                f"run's own LocalCluster and are ignored: the workers of the scheduler at {address} are sized "
                "where they were started"
            )
        if address.startswith("tcp://"):
            self._log.warning(
                f"Dask: scheduler {address} over tcp://: the store's credentials, in every task's arguments, "
                "cross the network in clear (tls:// with Dask's TLS settings encrypts them)"
            )
        try:
            client = Client(address)
        except Exception as exc:
            close_failed_default_client()
            tls = (
                " and Dask's TLS settings (DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ..._CLIENT__CERT, ..._CLIENT__KEY)"
                if address.startswith("tls://")
                else ""
            )
            raise ConnectionError(
                f"Dask: no client of the scheduler at {address}: see AIFACTORY_DASK_SCHEDULER (the resource's "
                f"scheduler_address){tls}. {type(exc).__name__}: {exc}"
            ) from exc
        self._log.info(f"Dask: scheduler {address}; dashboard {client.dashboard_link}")
        return client

    def start_local_cluster(self) -> tuple[LocalCluster, Client]:
        """The run's own cluster, said in the run's log. Closed again where what follows its start fails (a
        connect timeout on a loaded node): else the next step started another, and this one outlived the run."""
        workers = size_local_workers(self.n_workers, self.memory_limit, self._runs_at_once)
        # Closed through callbacks, not as context managers: entering a Client makes it the current one for
        # the rest of this thread (`dask.compute` then reaches it, closed, after the run), and `pop_all` keeps
        # its exit from ever running.
        with contextlib.ExitStack() as on_failure:
            cluster = LocalCluster(
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
            on_failure.callback(cluster.close)
            client = Client(cluster)
            on_failure.callback(client.close)
            prepare_workers(client)
            self.say_sized(workers, client.dashboard_link)
            on_failure.pop_all()
        return cluster, client

    def say_sized(self, workers: LocalWorkers, dashboard: str) -> None:
        """What each worker got and why, in the run's log: a warning where a worker or the host lacks memory."""
        said = (
            f"Dask: {workers.count} local worker(s) x {self.threads_per_worker} thread(s), "
            f"{format_bytes(workers.memory_limit)} each ({workers.why}); dashboard {dashboard}"
        )
        if not workers.warning:
            self._log.info(said)
            return
        fewer = "fewer workers (AIFACTORY_DASK_WORKERS), " if self.n_workers else ""
        self._log.warning(
            f"{said}. {workers.warning}: {fewer}a lower max_concurrent_runs for the instance, or another memory "
            "limit (AIFACTORY_DASK_MEMORY_LIMIT)"
        )

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


def memory_limit_from_env() -> str:
    """AIFACTORY_DASK_MEMORY_LIMIT, checked at load, naming the variable."""
    value = os.environ.get("AIFACTORY_DASK_MEMORY_LIMIT") or "auto"
    memory_limit_bytes(value, "AIFACTORY_DASK_MEMORY_LIMIT")
    return value


def dask_cluster_from_env() -> DaskCluster:
    """`AIFACTORY_DASK_SCHEDULER` points at a shared cluster; else `AIFACTORY_DASK_WORKERS` and
    `AIFACTORY_DASK_MEMORY_LIMIT` size the run's own. Each is checked at load, naming the variable."""
    scheduler = os.environ.get("AIFACTORY_DASK_SCHEDULER") or None
    workers = os.environ.get("AIFACTORY_DASK_WORKERS") or None
    if workers is not None and not (workers.isdigit() and int(workers) > 0):
        raise ValueError(f"AIFACTORY_DASK_WORKERS={workers!r}: a number of workers, at least 1")
    return DaskCluster(
        scheduler_address=scheduler and checked_scheduler_address(scheduler, "AIFACTORY_DASK_SCHEDULER"),
        n_workers=int(workers) if workers else None,
        memory_limit=memory_limit_from_env(),
    )
