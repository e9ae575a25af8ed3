"""`make bench`: validation throughput of aifactory's Dask path against plain GX on one DataFrame.

Both paths validate the same seeded synthetic dataset with the same suite in this one run; the table
gives rows/s, peak memory and the speed-up of the `validate` call alone; the Dask path's time includes
reading the data, so it is also set against plain GX's load and `validate` together. Exits non-zero if the
Dask path is slower than that, if the two disagree on any verdict or count, or (raised) if a Dask worker
ran out of memory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dask.utils import parse_bytes

from aifactory_assets.catalog import GLOBAL_EXPECTATIONS
from aifactory_assets.parquet_io import read_bytes
from aifactory_assets.validation import expectation_label
from benchmarks.synthetic import DATASET, ensure
from benchmarks.validation import PathResult, disagreements, run_dask, run_plain_gx

CORES = os.cpu_count() or 1
WORKERS = 2  # one per core of the 2-core benchmark machine
BUSY = 0.10  # above this share of the CPU taken by other processes, a timing is flagged as contended
# What one worker needs: ~330 MiB of imports (GX, dagster, dask.dataframe, pyarrow) and, measured, a plateau
# near 570 MiB once GX has validated a 100k-row part; Dask pauses a worker at 80% of its limit.
WORKER_LIMIT = "896MiB"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows in the synthetic dataset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    parser.add_argument("--workdir", type=Path, default=Path(".bench"), help="where the dataset is cached")
    parser.add_argument(
        "--memory-limit",
        default=WORKER_LIMIT,
        help=f"per-worker Dask memory limit (default {WORKER_LIMIT}; at 10M rows the {WORKERS} workers "
        "together get less than the dataset takes in memory)",
    )
    return parser.parse_args(argv)


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def row(result: PathResult, rows: int, baseline: PathResult) -> str:
    return (
        f"{result.name:48} {result.seconds:8.1f} {rows / result.seconds:>11,.0f} "
        f"{size(result.watch.peak):>10} {baseline.seconds / result.seconds:>12.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    limit = parse_bytes(args.memory_limit)
    bench = ensure(args.workdir, args.rows, args.seed)
    expectations = bench.suite["expectations"]
    arrow_bytes, pandas_bytes = bench.raw["arrow_bytes"], bench.raw["pandas_bytes"]
    generated = "cached" if bench.generated_s is None else f"generated in {bench.generated_s:.1f} s"
    print(
        f"validation benchmark: {args.rows:,} rows x {len(DATASET.table.columns)} columns (+2 provenance), "
        f"{len(expectations)} expectations ({sum(e['type'] in GLOBAL_EXPECTATIONS for e in expectations)} "
        f"non-decomposable), seed {args.seed}, {len(bench.raw['parts'])} parts ({generated}: {bench.store.root})"
    )
    below = "below" if WORKERS * limit < min(arrow_bytes, pandas_bytes) else "NOT below"
    print(
        f"dataset in memory: {size(arrow_bytes)} as Arrow, {size(pandas_bytes)} as pandas; "
        f"Dask workers' limit {WORKERS} x {size(limit)} = {size(WORKERS * limit)}, {below} it"
    )

    for part in bench.raw["parts"]:  # into the page cache for both paths alike: the first timed would read the disk
        read_bytes(bench.store.url(part), bench.store.storage_options)
    dask = run_dask(bench, WORKERS, limit)
    plain = run_plain_gx(bench)

    print(f"\n{'path':48} {'seconds':>8} {'rows/s':>11} {'peak RSS':>10} {'ratio vs GX':>12}")
    print(row(plain, args.rows, plain))
    print(row(dask, args.rows, plain))
    plain_whole = plain.seconds + plain.notes["load_s"]
    print(
        f"\nplain GX: loading the parts into one DataFrame ({size(plain.notes['frame_bytes'])}) took "
        f"{plain.notes['load_s']:.1f} s, not counted above; its time is the `validate` call alone (SUMMARY). "
        f"With the load, as the Dask path reads the parts itself: {plain_whole:.1f} s, "
        f"{plain_whole / dask.seconds:.2f}x the Dask path's."
    )
    print(
        f"Dask: end to end (read raw parts, GX per part, reductions, write the quarantine, publish); "
        f"largest worker RSS {size(dask.watch.peak_child)} of {size(limit)}, "
        f"workers lost 0, memory pauses {dask.notes['pauses']}, rows quarantined {dask.notes['rows_quarantined']:,}."
    )
    print("peak RSS: this process and all its children (nannies, workers), sampled every 0.2 s.")
    contended = []
    for result in (plain, dask):
        share = result.watch.others_cpu_s / (CORES * result.watch.seconds)
        print(f"other processes took {share:.0%} of the machine's CPU during {result.name}")
        if share > BUSY:
            contended.append(result.name)
    for label in (expectation_label(e) for e in expectations if e["type"] in GLOBAL_EXPECTATIONS):
        ours, theirs = dask.results[label].get("observed"), plain.results[label]["observed"]
        print(f"  {label}: observed {ours} on Dask, {theirs} on plain GX")

    problems = disagreements(bench.suite, dask, plain)
    if below != "below":
        problems.append(
            "the workers' memory limit is not below the dataset's in-memory size: nothing shown about memory"
        )
    if dask.seconds > plain_whole:
        problems.append(f"the Dask path took {dask.seconds:.1f} s, plain GX {plain_whole:.1f} s with its load")
    if contended:
        print(f"WARNING: the machine was busy during {' and '.join(contended)}; these timings are not clean.")
    if problems:
        print("\nFAILED:\n  " + "\n  ".join(problems))
        return 1
    print(
        f"\nOK: both paths agree on all {len(expectations)} verdicts and every row count; Dask is not slower "
        "than plain GX with its load."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
