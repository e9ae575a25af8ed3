"""The loader as a `torch.utils.data.IterableDataset` (torch is an optional extra: `pip install .[torch]`).

Each DataLoader worker builds its own `ShardReader` for (rank, worker); rank and world size come from
`torch.distributed` when it is initialised. Use `DataLoader(dataset, batch_size=None, num_workers=W)`:
the reader already yields batches, and PyTorch interleaves workers in the order the reader assumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ShardIterableDataset needs torch: pip install 'aifactory[torch]'") from exc

from aifactory_assets.loader import ShardReader


def batch_to_tensors(batch: pa.RecordBatch, stack: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Numeric columns as tensors, and each `stack` group as one [rows, k] tensor built in the worker
    (one transfer to the main process instead of k); other columns stay Python lists."""
    out: dict[str, Any] = {}
    stacked = {c for columns in (stack or {}).values() for c in columns}
    for name, columns in (stack or {}).items():
        out[name] = torch.from_numpy(np.column_stack([batch.column(c).to_numpy(zero_copy_only=False) for c in columns]))
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        if name in stacked:
            continue
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
            out[name] = torch.from_numpy(np.array(column.to_numpy(zero_copy_only=False)))
        else:
            out[name] = column.to_pylist()
    return out


class ShardIterableDataset(IterableDataset):
    def __init__(
        self,
        manifest: str,
        split: str,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        stack: dict[str, list[str]] | None = None,
        **options: Any,
    ):
        super().__init__()
        self.manifest, self.split, self.stack, self.options = manifest, split, stack, options
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self.world_size = (
            world_size if world_size is not None else (torch.distributed.get_world_size() if distributed else 1)
        )
        self.epoch = options.pop("epoch", 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def reader(self) -> ShardReader:
        info = get_worker_info()
        return ShardReader(
            self.manifest,
            self.split,
            rank=self.rank,
            world_size=self.world_size,
            worker_id=info.id if info else 0,
            num_workers=info.num_workers if info else 1,
            epoch=self.epoch,
            **self.options,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.reader():
            yield batch_to_tensors(batch, self.stack)
