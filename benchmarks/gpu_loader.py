"""Loader throughput into GPU memory: what a training job at a factory site would see.

Needs only pyarrow, numpy, fsspec and torch (what the lent GPU machine has), and this repository for
`aifactory_assets.loader`. Generates a committed shard version in the pipeline's layout (16 float32
features, an int label and an int id, zstd shards, a manifest with checksums and row-group counts),
then measures, on the same files:

- a multi-threaded PyArrow read of every shard (the physical baseline);
- the loader: `DataLoader(ShardIterableDataset(...), batch_size=None, num_workers=W, pin_memory=True)`,
  each batch stacked and copied to the device;
- optionally a small MLP (16-512-512-10) consuming those batches.

    python -m benchmarks.gpu_loader --rows 16000000 --shards 32 --workers 4

Falls back to the CPU when no CUDA device is present (the numbers then say so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from aifactory_assets.loader import ShardIterableDataset

FEATURES = [f"f{i:02d}" for i in range(16)]


def generate(root: Path, rows: int, shards: int, group_rows: int, seed: int) -> Path:
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
        name = f"train-{i:05d}-of-{shards:05d}.parquet"
        pq.write_table(table, root / name, compression="zstd", row_group_size=group_rows)
        data = (root / name).read_bytes()
        groups = pq.ParquetFile(root / name).metadata
        entries.append(
            {
                "path": name,
                "rows": n,
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "row_groups": [groups.row_group(g).num_rows for g in range(groups.num_row_groups)],
            }
        )
    manifest = {
        "dataset": "synthetic_gpu",
        "version": f"rows{rows}-shards{shards}-seed{seed}",
        "splits": {"train": {"rows": rows, "shards": entries}},
        "sampler": {"seed": seed, "remainder": "drop"},
    }
    manifest_path.write_text(json.dumps(manifest))
    return manifest_path


def raw_read(root: Path) -> tuple[float, int, int]:
    start = time.perf_counter()
    rows = nbytes = 0
    for path in sorted(root.glob("train-*.parquet")):
        table = pq.read_table(path, use_threads=True)
        rows, nbytes = rows + table.num_rows, nbytes + table.nbytes
    return time.perf_counter() - start, rows, nbytes


def loader_read(manifest: Path, device: torch.device, workers: int, batch: int, model: torch.nn.Module | None):
    dataset = ShardIterableDataset(str(manifest), "train", batch_size=batch, verify=True, stack={"x": FEATURES})
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    rows = nbytes = 0
    start = time.perf_counter()
    for item in loader:
        x = item["x"].to(device, non_blocking=True)
        y = item["label"].to(device, non_blocking=True)
        if model is not None:
            model(x).sum().backward()
        rows += y.shape[0]
        nbytes += x.element_size() * x.nelement() + y.element_size() * y.nelement()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, rows, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16_000_000)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--group-rows", type=int, default=65_536)
    parser.add_argument("--batch", type=int, default=65_536)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path(".bench/gpu_loader"))
    parser.add_argument("--mlp", action="store_true", help="also time a 16-512-512-10 MLP consuming the batches")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (no CUDA device)"
    manifest = generate(
        args.workdir / f"r{args.rows}-s{args.shards}", args.rows, args.shards, args.group_rows, args.seed
    )
    raw_read(manifest.parent)  # warm the page cache, as a long training job would have it
    results = [("pyarrow read (multi-threaded)", *raw_read(manifest.parent))]
    results.append(
        (
            f"loader -> {device.type} ({args.workers} workers)",
            *loader_read(manifest, device, args.workers, args.batch, None),
        )
    )
    if args.mlp:
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        ).to(device)
        results.append(("loader + MLP fwd/bwd", *loader_read(manifest, device, args.workers, args.batch, model)))

    print(f"\nloader on {name}: {args.rows:,} rows x 18 columns in {args.shards} zstd shards, batch {args.batch:,}")
    print(f"{'path':40} {'seconds':>8} {'M rows/s':>9} {'GB/s':>6} {'vs pyarrow':>10}")
    base = results[0][2] / results[0][1]
    for label, seconds, rows, nbytes in results:
        rate = rows / seconds
        print(f"{label:40} {seconds:8.2f} {rate / 1e6:9.2f} {nbytes / seconds / 1e9:6.2f} {rate / base:10.2f}")


if __name__ == "__main__":
    main()
