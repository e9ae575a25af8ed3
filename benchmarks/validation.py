"""The two validation paths the benchmark compares, each timed and memory-watched in this one process run.

- aifactory on Dask: `validate_dataset` end to end (read raw parts, GX per partition, write validated and
  quarantine parts, publish) on a LocalCluster whose workers together get less memory than the dataset
  takes in memory, so it can only finish by streaming partitions.
- plain GX: the same data as one pandas DataFrame, the same suite, one `validate` call (SUMMARY).

Peak memory is the resident set of this process plus all its descendants (nannies, workers), sampled every
0.2 s. Worker deaths and memory pauses come from the scheduler's event log, so an out-of-memory run fails
loudly instead of passing slowly on restarted workers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import pyarrow as pa
from distributed import Client, LocalCluster

from aifactory_assets.catalog import ROW_EXPECTATIONS
from aifactory_assets.parquet_io import read_parquet
from aifactory_assets.validation import expectation_label, validate_dataset
from benchmarks.synthetic import Synthetic


class OutOfMemory(RuntimeError):
    """A Dask worker was lost (killed by its nanny past the memory limit) during the benchmark."""


class PeakRSS:
    """Peak RSS of this process and its descendants, sampled in a background thread.

    `peak` is the sum over the process tree (shared library pages count once per process, so it errs
    high); `peak_child` is the largest single descendant, i.e. the worker to compare with its limit.
    """

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self.peak_child = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            if proc.pid != me.pid:
                self.peak_child = max(self.peak_child, rss)
        self.peak = max(self.peak, total)


@dataclass
class PathResult:
    name: str
    seconds: float
    peak_rss: int
    results: dict[str, dict[str, Any]]  # label -> success, unexpected_count, missing_count
    notes: dict[str, Any] = field(default_factory=dict)


def run_dask(bench: Synthetic, n_workers: int, memory_limit: int) -> PathResult:
    """`validate_dataset` on a fresh LocalCluster, timed from submit to the published pointer."""
    run_id = f"bench-{time.time_ns()}"
    with (
        PeakRSS() as rss,
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
        Client(cluster) as client,
    ):
        workers_before = set(client.scheduler_info()["workers"])
        started = time.perf_counter()
        try:
            record = validate_dataset(bench.store, client, bench.dataset, bench.suite, run_id)
        finally:
            seconds = time.perf_counter() - started
            events = client.get_events()
            lost = [m["worker"] for _, m in events.get("all", ()) if m.get("action") == "remove-worker"]
            lost += sorted(workers_before - set(client.scheduler_info()["workers"]) - set(lost))
            pauses = sum(
                isinstance(m, dict) and m.get("action") == "worker-status-change" and m.get("status") == "paused"
                for topic in events.values()
                for _, m in topic
            )
        if lost:
            raise OutOfMemory(f"Dask path lost worker(s) {lost} with a {memory_limit / 2**20:.0f} MiB limit each")
    results = {r["label"]: r for r in record["results"]}
    notes = {
        "peak_worker_rss": rss.peak_child,
        "pauses": pauses,
        "rows_quarantined": record["rows_quarantined"],
        "success": record["success"],
    }
    return PathResult(f"aifactory on Dask ({n_workers} workers)", seconds, rss.peak, results, notes)


def _quiet_gx() -> Any:
    import great_expectations as gx

    for name in ("great_expectations", "great_expectations.core", "great_expectations.data_context"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return gx


def run_plain_gx(bench: Synthetic) -> PathResult:
    """The same parts loaded into one DataFrame (load timed apart) and the same suite in one `validate`."""
    with PeakRSS() as rss:
        started = time.perf_counter()
        table = pa.concat_tables(
            read_parquet(bench.store.url(part), bench.store.storage_options) for part in bench.raw["parts"]
        )
        frame = table.to_pandas(date_as_object=False, self_destruct=True)
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
        config = one.expectation_config
        label = expectation_label({"type": config.type, "kwargs": config.kwargs})
        results[label] = {
            "success": bool(one.success),
            "unexpected_count": one.result.get("unexpected_count"),
            "missing_count": one.result.get("missing_count"),
            "error": one.exception_info.get("exception_message")
            if one.exception_info.get("raised_exception")
            else None,
        }
    notes = {"load_s": load_s, "frame_bytes": frame_bytes, "success": bool(outcome.success)}
    return PathResult("plain GX (1 pandas DataFrame)", seconds, rss.peak, results, notes)


def disagreements(suite: dict[str, Any], dask: PathResult, plain: PathResult) -> list[str]:
    """Where the paths differ: every verdict, and the counts of every row expectation."""
    found = []
    for expectation in suite["expectations"]:
        label = expectation_label(expectation)
        ours, theirs = dask.results.get(label), plain.results.get(label)
        if ours is None or theirs is None:
            found.append(f"{label}: missing from {'Dask' if ours is None else 'plain GX'} results")
            continue
        keys = ["success"]
        if expectation["type"] in ROW_EXPECTATIONS:
            keys += ["unexpected_count", "missing_count"]
        found += [
            f"{label}: {k} Dask {ours.get(k)} != GX {theirs.get(k)}" for k in keys if ours.get(k) != theirs.get(k)
        ]
    return found
