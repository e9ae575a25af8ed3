"""The two validation paths the benchmark compares, each timed and memory-watched in this one process run.

- aifactory on Dask: `validate_dataset` end to end (read raw parts, GX per partition, write the quarantine
  parts, publish) on a LocalCluster whose workers together get less memory than the dataset
  takes in memory, so it can only finish by streaming partitions.
- plain GX: the same data as one pandas DataFrame, the same suite, one `validate` call (SUMMARY).

Peak memory is the resident set of this process plus all its descendants (nannies, workers), sampled every
0.2 s. Worker deaths and memory pauses come from the scheduler's event log, and a cluster whose workers
all stay paused is given up on, so an out-of-memory run fails loudly instead of passing slowly on restarted
workers or hanging.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psutil
import pyarrow as pa
from distributed import Client, LocalCluster

from aifactory_assets.catalog import ROW_EXPECTATIONS
from aifactory_assets.parquet_io import read_parquet
from aifactory_assets.validation import expectation_label, validate_dataset
from benchmarks.synthetic import Synthetic
from resources import prepare_workers


class OutOfMemory(RuntimeError):
    """The Dask path ran out of memory: a worker was killed past its limit, or no worker stayed running."""


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot, all cores together."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


class Watch:
    """Peak RSS of this process and its descendants, and the CPU time other processes took meanwhile.

    Sampled every 0.2 s in a background thread. `peak` sums RSS over the process tree (shared library pages
    count once per process, so it errs high); `peak_child` is the largest single descendant, i.e. the worker
    to compare with its limit. `others_cpu_s` is the machine's busy CPU time minus this tree's: on a shared
    2-core machine it says whether a timing was taken on a quiet machine.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self.peak_child, self.others_cpu_s, self.seconds = interval, 0, 0, 0.0, 0.0
        self._cpu: dict[int, float] = {}  # pid -> user + system seconds, as last sampled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._sample()
        self._cpu_before, self._busy_before, self._started = dict(self._cpu), _busy_cpu_s(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        ours = sum(cpu - self._cpu_before.get(pid, 0.0) for pid, cpu in self._cpu.items())
        self.others_cpu_s = max(0.0, _busy_cpu_s() - self._busy_before - ours)
        self.seconds = time.perf_counter() - self._started

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    rss, cpu = proc.memory_info().rss, proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            self._cpu[proc.pid] = cpu.user + cpu.system
            if proc.pid != me.pid:
                self.peak_child = max(self.peak_child, rss)
        self.peak = max(self.peak, total)


@dataclass
class PathResult:
    name: str
    seconds: float
    watch: Watch  # memory and contention over the whole path, load or cluster start included
    results: dict[str, dict[str, Any]]  # label -> success, counts, observed value, error
    notes: dict[str, Any] = field(default_factory=dict)


STALL_S = 60.0


def _statuses(dask_scheduler: Any) -> list[str]:
    return [worker.status.name for worker in dask_scheduler.workers.values()]


def _memory_events(client: Client) -> tuple[list[str], int]:
    """Workers the scheduler lost (a nanny kills its worker past 95% of the limit) and memory pauses (80%)."""
    events = client.get_events()
    lost = [m["worker"] for _, m in events.get("all", ()) if m.get("action") == "remove-worker"]
    pauses = sum(
        isinstance(m, dict) and m.get("action") == "worker-status-change" and m.get("status") == "paused"
        for topic in events.values()
        for _, m in topic
    )
    return lost, pauses


def _wait(client: Client, running: Future) -> dict[str, Any]:
    """The result of `running`, or OutOfMemory once no worker has been running for STALL_S seconds.

    A paused worker resumes only when its memory falls, and here that memory is its own (imports, GX
    working memory), not spillable results: with every worker paused, or gone, `gather` would wait forever.
    """
    stalled_since = None
    while True:
        try:
            return running.result(timeout=1.0)
        except TimeoutError:
            if "running" in client.run_on_scheduler(_statuses):
                stalled_since = None
            elif stalled_since is None:
                stalled_since = time.perf_counter()
            elif time.perf_counter() - stalled_since > STALL_S:
                raise OutOfMemory(f"no Dask worker running (paused for memory, or gone) for {STALL_S:.0f} s") from None


def run_dask(bench: Synthetic, n_workers: int, memory_limit: int) -> PathResult:
    """`validate_dataset` on a fresh LocalCluster, timed from the first submit to the published pointer."""
    pool = ThreadPoolExecutor(1)  # validate_dataset blocks; this thread watches the workers meanwhile
    with (
        Watch() as watch,
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            memory_limit=memory_limit,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # no dashboard, no clash on port 8787
            silence_logs=logging.ERROR,
        ) as cluster,
        prepare_workers(Client(cluster)) as client,
    ):
        started = time.perf_counter()
        run_id = f"bench-{time.time_ns()}"  # the store's only writer: every earlier generation is over
        running = pool.submit(validate_dataset, bench.store, client, bench.dataset, bench.suite, run_id, lambda _: True)
        try:
            record = _wait(client, running)
        except Exception as exc:
            lost, _ = _memory_events(client)
            if lost:
                raise OutOfMemory(f"Dask workers {lost} died with a {memory_limit / 2**20:.0f} MiB limit each") from exc
            raise
        finally:
            pool.shutdown(wait=False)
        seconds = time.perf_counter() - started
        lost, pauses = _memory_events(client)
        if lost:
            raise OutOfMemory(f"Dask workers {lost} died with a {memory_limit / 2**20:.0f} MiB limit each")
    notes = {"pauses": pauses, "rows_quarantined": record["rows_quarantined"]}
    return PathResult(
        f"aifactory on Dask ({n_workers} workers x {memory_limit / 2**20:.0f} MiB)",
        seconds,
        watch,
        {r["label"]: r for r in record["results"]},
        notes,
    )


def _quiet_gx() -> Any:
    import great_expectations as gx

    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return gx


def run_plain_gx(bench: Synthetic) -> PathResult:
    """The same parts loaded into one DataFrame (load timed apart) and the same suite in one `validate`."""
    with Watch() as watch:
        started = time.perf_counter()
        table = pa.concat_tables(
            read_parquet(bench.store.url(part), bench.store.storage_options) for part in bench.raw["parts"]
        )
        # Nanosecond timestamps, as the Dask path hands GX (pandas 3 gives microseconds, on which GX 1.x checks
        # ranges one value at a time): the baseline a plain-GX user who knows this would run.
        frame = table.to_pandas(date_as_object=False, coerce_temporal_nanoseconds=True, self_destruct=True)
        del table
        load_s = time.perf_counter() - started

        gx = _quiet_gx()
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = {"globally": False}
        batch = (
            context.data_sources.add_pandas("bench")
            .add_dataframe_asset("whole")
            .add_batch_definition_whole_dataframe("whole")
            .get_batch(batch_parameters={"dataframe": frame})
        )
        suite = gx.ExpectationSuite(
            name=bench.suite["name"], expectations=[dict(e) for e in bench.suite["expectations"]]
        )
        started = time.perf_counter()
        outcome = batch.validate(suite, result_format={"result_format": "SUMMARY"})
        seconds = time.perf_counter() - started
        frame_bytes = int(frame.memory_usage(deep=True).sum())
    results = {}
    # GX groups results by column, so match them to expectations by their configuration, never by position.
    for one in outcome.results:
        config, raised = one.expectation_config, one.exception_info.get("raised_exception")
        results[expectation_label({"type": config.type, "kwargs": config.kwargs})] = {
            "success": bool(one.success),
            "unexpected_count": one.result.get("unexpected_count"),
            "missing_count": one.result.get("missing_count"),
            "observed": one.result.get("observed_value"),
            "error": one.exception_info.get("exception_message") if raised else None,
        }
    notes = {"load_s": load_s, "frame_bytes": frame_bytes}
    return PathResult("plain GX (1 pandas DataFrame)", seconds, watch, results, notes)


def disagreements(suite: dict[str, Any], dask: PathResult, plain: PathResult) -> list[str]:
    """Where the paths differ: every verdict and error, and the counts wherever both paths count rows."""
    found = []
    for expectation in suite["expectations"]:
        label = expectation_label(expectation)
        ours, theirs = dask.results.get(label), plain.results.get(label)
        if ours is None or theirs is None:
            found.append(f"{label}: missing from the {'Dask' if ours is None else 'plain GX'} results")
            continue
        keys = ["success", "error"]
        if expectation["type"] in ROW_EXPECTATIONS or None not in (
            ours.get("unexpected_count"),
            theirs["unexpected_count"],
        ):
            keys += ["unexpected_count", "missing_count"]  # GX leaves missing_count out where nulls are the point
        found += [
            f"{label}: {key} is {ours.get(key)} on Dask, {theirs[key]} on plain GX"
            for key in keys
            if (ours.get(key) or 0) != (theirs[key] or 0)
        ]
    return found
