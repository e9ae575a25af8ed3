"""Loader throughput into GPU memory: what a training job at a factory site would see.

Needs only pyarrow, numpy, fsspec and torch (what the lent GPU machine has), and this repository for
`aifactory_assets.loader`. Generates a committed shard version in the pipeline's layout (16 float32
features, an int label and an int id, zstd shards, a manifest with checksums and row-group counts),
then measures, on the same files:

- a multi-threaded PyArrow read of every shard, file by file and as one dataset (the physical baselines);
- with `--reader-threads`, `ShardReader(..., threads=T)` for each T: Arrow record batches on the CPU, two
  epochs each (the first hashes every shard, as a new process's would), nothing on the device;
- `DataLoader(ShardIterableDataset(...), batch_size=None, num_workers=W, pin_memory=True)` for each W in
  `--workers`, and `TensorLoader(..., workers=P)` for each P in `--processes`, two epochs each, every batch
  on the device;
- with `--transport`, the DataLoader moving empty batches of the same shapes (its own ceiling);
- with `--mlp`, a small MLP (16-512-512-10) alone on a batch resident on the device (its own ceiling), then
  each path again, feeding it.

    python -m benchmarks.gpu_loader --rows 16000000 --shards 32 --workers 4 --processes 1 8 12 16 --mlp --transport \
        --reader-threads 0 4 8 12 16

Refuses to run without a CUDA device (saying whether torch was built without CUDA or found no device),
unless `--allow-cpu` (the test suite's smoke run).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import time
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from aifactory_assets.loader import ShardReader, forget_verified
from aifactory_assets.shard_layout import (
    dictionary_columns,
    read_footer,
    row_group_rows,
    schema_fingerprint,
    shard_name,
)
from aifactory_assets.torch_dataset import ShardIterableDataset, TensorLoader
from benchmarks import code_digest

FEATURES = [f"f{i:02d}" for i in range(16)]


def generate(root: Path, rows: int, shards: int, group_rows: int | None, seed: int) -> Path:
    """A committed version: `train-*` shards plus the manifest ShardReader reads (as the pipeline writes it)."""
    manifest_path = root / "manifest.json"
    if manifest_path.exists():
        return manifest_path
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, start = [], 0
    for i in range(shards):
        n = (rows * (i + 1)) // shards - (rows * i) // shards
        table = pa.table(
            {
                **{name: rng.standard_normal(n, dtype=np.float32) for name in FEATURES},
                "label": rng.integers(0, 10, n, dtype=np.int64),
                "id": np.arange(start, start + n, dtype=np.int64),
            }
        )
        start += n
        name = shard_name("train", i, shards)
        pq.write_table(
            table,
            root / name,
            compression="zstd",
            row_group_size=group_rows or row_group_rows(rows),
            use_dictionary=dictionary_columns(table.schema),
            write_page_checksum=True,
        )
        data = (root / name).read_bytes()
        groups = pq.ParquetFile(root / name).metadata
        entries.append(
            {
                "path": name,
                "rows": n,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "footer_sha256": hashlib.sha256(read_footer(io.BytesIO(data))).hexdigest(),
                "row_groups": [groups.row_group(g).num_rows for g in range(groups.num_row_groups)],
            }
        )
    manifest = {
        "format_version": 4,  # as the pipeline writes them: every open checks the footer's hash
        "dataset": "synthetic_gpu",
        "schema": {"fingerprint": schema_fingerprint(table.schema)},
        "version": f"rows{rows}-shards{shards}-seed{seed}",
        "splits": {"train": {"rows": rows, "shards": entries}},
        "sampler": {"seed": seed, "remainder": "drop"},
    }
    manifest_path.write_text(json.dumps(manifest))
    return manifest_path


def raw_read(root: Path, at_once: bool = False) -> tuple[float, int, int]:
    """PyArrow's multi-threaded read of every shard: file by file, or all files as one dataset (its
    threads then decode row groups of many files at once)."""
    paths = sorted(root.glob("train-*.parquet"))
    start = time.perf_counter()
    if at_once:
        table = ds.dataset(paths, format="parquet").to_table(use_threads=True)
        rows, nbytes = table.num_rows, table.nbytes
    else:
        rows = nbytes = 0
        for path in paths:
            table = pq.read_table(path, use_threads=True)
            rows, nbytes = rows + table.num_rows, nbytes + table.nbytes
    return time.perf_counter() - start, rows, nbytes


def reader_epochs(manifest: Path, threads: int, batch: int, count: int = 2) -> list[tuple[float, int, int]]:
    """Per epoch (seconds, rows, bytes) of `ShardReader`'s record batches, a reader per epoch as a training
    loop makes them; the first epoch hashes every shard (as in a new process), the later ones check every
    page's CRC instead."""
    forget_verified()
    results = []
    for epoch in range(count):
        start, rows, nbytes = time.perf_counter(), 0, 0
        for record_batch in ShardReader(str(manifest), "train", epoch=epoch, batch_size=batch, threads=threads):
            rows, nbytes = rows + record_batch.num_rows, nbytes + record_batch.nbytes
        results.append((time.perf_counter() - start, rows, nbytes))
    return results


def dataloader(manifest: Path, device: torch.device, workers: int, batch: int, **options):
    """`DataLoader(ShardIterableDataset)` with worker processes; the dataset carries the epoch to them."""
    dataset = ShardIterableDataset(
        str(manifest), "train", batch_size=batch, verify=True, stack={"x": FEATURES}, **options
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    return dataset.set_epoch, loader


class EmptyBatches(torch.utils.data.IterableDataset):
    """Batches of the real epoch's shapes with nothing read: what the DataLoader's transport alone allows
    (copies into shared memory, the main process's receiving and pinning)."""

    def __init__(self, rows: int, batch: int):
        self.rows, self.batch = rows, batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i in range(worker, -(-self.rows // self.batch), workers):
            n = min(self.batch, self.rows - i * self.batch)
            yield {
                "x": torch.empty((n, len(FEATURES))),
                "label": torch.empty(n, dtype=torch.int64),
                "id": torch.empty(n, dtype=torch.int64),
            }


def transport(device: torch.device, workers: int, batch: int, rows: int):
    loader = torch.utils.data.DataLoader(
        EmptyBatches(rows, batch),
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    return (lambda epoch: None), loader


def tensor_loader(manifest: Path, device: torch.device, processes: int, batch: int, **options):
    loader = TensorLoader(
        str(manifest),
        "train",
        device=device,
        workers=processes,
        batch_size=batch,
        verify=True,
        stack={"x": FEATURES},
        **options,
    )
    return loader.set_epoch, loader


def epochs(make, device: torch.device, model: torch.nn.Module | None, count: int = 2) -> list[tuple[float, int, int]]:
    """Per epoch (seconds, rows, bytes) delivered to the device; the first counts making the loader (which
    hashes every shard, as in a new process: the hashes an earlier path checked are forgotten) and starting its
    workers, the later ones are what a long training run sees."""
    forget_verified()
    results = []
    start = time.perf_counter()
    set_epoch, loader = make()
    for epoch in range(count):
        set_epoch(epoch)
        rows = nbytes = 0
        for item in loader:
            x = item["x"].to(device, non_blocking=True)
            y = item["label"].to(device, non_blocking=True)
            if model is not None:
                model(x).sum().backward()
            rows += y.shape[0]
            nbytes += x.element_size() * x.nelement() + y.element_size() * y.nelement()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results.append((time.perf_counter() - start, rows, nbytes))
        start = time.perf_counter()
    return results


def mlp(device: torch.device, batch: int) -> torch.nn.Module:
    """The small model of the issue's bar: 16-512-512-10, fp32, its kernels chosen before any timing."""
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    ).to(device)
    model(torch.zeros(batch, len(FEATURES), device=device)).sum().backward()
    return model


def model_alone(model: torch.nn.Module, device: torch.device, args: argparse.Namespace) -> tuple[float, int, int]:
    """The model's own ceiling: an epoch's worth of steps on one batch already on the device, nothing loaded."""
    x = torch.randn(args.batch, len(FEATURES), device=device)
    steps = args.rows // args.batch
    start = time.perf_counter()
    for _ in range(steps):
        model(x).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, steps * args.batch, steps * x.element_size() * x.nelement()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16_000_000)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--group-rows", type=int, help="rows per row group (default: the pipeline's rule)")
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8], help="DataLoader worker counts to try")
    parser.add_argument("--processes", type=int, nargs="+", default=[8], help="TensorLoader worker counts to try")
    parser.add_argument("--memory-map", type=int, nargs="+", help="memory-map shards (1/0; default: the loader's)")
    parser.add_argument(
        "--decode-threads", type=int, nargs="+", help="torch paths: PyArrow's threads per decode (1/0; ditto)"
    )
    parser.add_argument(
        "--reader-threads", type=int, nargs="+", default=[], help="ShardReader thread counts to try (0: in turn)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/gpu_loader"))
    parser.add_argument("--transport", action="store_true", help="also time the DataLoader moving empty batches")
    parser.add_argument("--mlp", action="store_true", help="also time a 16-512-512-10 MLP consuming the batches")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU where no CUDA device is usable")
    args = parser.parse_args()

    if not torch.cuda.is_available() and not args.allow_cpu:
        why = (
            f"torch {torch.__version__} is built without CUDA"
            if torch.version.cuda is None
            else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device"
        )
        raise SystemExit(f"benchmarks.gpu_loader measures delivery to a GPU, but {why}; --allow-cpu runs it on the CPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (no CUDA device)"
    groups = args.group_rows or "pipeline"
    layout = f"r{args.rows}-s{args.shards}-g{groups}-seed{args.seed}-{code_digest(generate, row_group_rows)}"
    manifest = generate(args.workdir / layout, args.rows, args.shards, args.group_rows, args.seed)
    torch.ones(1, device=device).sum().item()  # CUDA context outside the timings
    raw_read(manifest.parent)  # warm the page cache, as a long training job would have it
    results = [
        ("pyarrow read, file by file (multi-threaded)", *raw_read(manifest.parent)),
        ("pyarrow read, all files as one dataset (multi-threaded)", *raw_read(manifest.parent, at_once=True)),
    ]
    for threads in args.reader_threads:
        for epoch, measured in enumerate(reader_epochs(manifest, threads, args.batch)):
            results.append((f"ShardReader, {threads} threads, Arrow batches on the CPU, epoch {epoch}", *measured))
    paths = []
    for memory_map, threads in itertools.product(args.memory_map or [None], args.decode_threads or [None]):
        options = {k: v for k, v in (("memory_map", memory_map), ("threads", threads)) if v is not None}
        how = "".join(f", {k}={v}" for k, v in options.items())
        for n in args.workers:
            paths.append(
                (f"DataLoader, {n} workers{how}", partial(dataloader, manifest, device, n, args.batch, **options))
            )
        for n in args.processes:
            paths.append(
                (f"TensorLoader, {n} workers{how}", partial(tensor_loader, manifest, device, n, args.batch, **options))
            )
    model = mlp(device, args.batch) if args.mlp else None
    if model is not None:
        results.append(("MLP alone, one batch resident on the device", *model_alone(model, device, args)))
    for label, make in paths:
        for epoch, measured in enumerate(epochs(make, device, None)):
            results.append((f"{label}, epoch {epoch}", *measured))
        if model is not None:
            for epoch, measured in enumerate(epochs(make, device, model)):
                results.append((f"{label} + MLP, epoch {epoch}", *measured))
    for n in args.workers if args.transport else []:
        make = partial(transport, device, n, args.batch, args.rows)
        for epoch, measured in enumerate(epochs(make, device, None)):
            results.append((f"DataLoader moving empty batches, {n} workers, epoch {epoch}", *measured))

    groups = pq.ParquetFile(next(manifest.parent.glob("train-*.parquet"))).metadata.row_group(0).num_rows
    print(
        f"\nloader on {name}, {os.cpu_count()} CPUs, kernel {os.uname().release}: {args.rows:,} rows x 18 columns "
        f"in {args.shards} zstd shards (row groups of {groups:,} rows), batch {args.batch:,}, checksums verified; "
        f"pyarrow {pa.__version__}, numpy {np.__version__}, torch {torch.__version__}"
    )
    print(f"{'path':70} {'seconds':>8} {'M rows/s':>9} {'GB/s':>6} {'x best read':>11}")
    base = max(rows / seconds for _, seconds, rows, _ in results[:2])  # the faster PyArrow read
    for label, seconds, rows, nbytes in results:
        rate = rows / seconds
        print(f"{label:70} {seconds:8.2f} {rate / 1e6:9.2f} {nbytes / seconds / 1e9:6.2f} {rate / base:11.2f}")


if __name__ == "__main__":
    main()
