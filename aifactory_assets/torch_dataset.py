"""The loader for PyTorch (torch is an optional extra: `pip install .[torch]`), two ways:

- `ShardIterableDataset`, for `DataLoader(dataset, batch_size=None, num_workers=W)`: each worker builds
  its own `ShardReader` for (rank, worker), and PyTorch interleaves workers in the order the reader assumes.
- `TensorLoader`, the fast path to a GPU: the same batches in the same order, read by threads into pinned
  memory (no worker processes, no shared-memory copies).

Rank and world size come from `torch.distributed` when it is initialised.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ShardIterableDataset needs torch: pip install 'aifactory[torch]'") from exc

from aifactory_assets.loader import Piece, RowGroup, ShardReader


class BatchGatherer:
    """A reader's batches as tensors, gathered straight from decoded row groups: each value is copied
    once, by one `np.take` per piece of a batch into the batch's tensor (pinned when `pin`, so the copy to
    the GPU is asynchronous). `stack` groups become one [rows, k] tensor, stacked once per row group.
    Few, large calls that release the GIL, so threads reading in parallel seldom wait for each other."""

    def __init__(self, reader: ShardReader, stack: dict[str, list[str]] | None = None, pin: bool = False):
        self.reader, self.stack, self.pin = reader, stack or {}, pin
        self._groups: OrderedDict[RowGroup, tuple[dict[str, Any], np.ndarray | None]] = OrderedDict()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for pieces in self.reader.plan():
            yield self.batch(pieces)

    def batch(self, pieces: list[Piece]) -> dict[str, Any]:
        parts = [(*self.group(group), lo, hi) for group, lo, hi in pieces]
        rows = sum(hi - lo for _, _, lo, hi in parts)
        out: dict[str, Any] = {}
        for name, sample in parts[0][0].items():
            if not isinstance(sample, np.ndarray):  # values torch has no type for stay Python lists
                out[name] = [v for arrays, order, lo, hi in parts for v in rows_of(arrays[name], order, lo, hi)]
                continue
            dtype = torch.from_numpy(np.empty(0, sample.dtype)).dtype
            tensor = torch.empty((rows, *sample.shape[1:]), dtype=dtype, pin_memory=self.pin)
            view, position = tensor.numpy(), 0
            for arrays, order, lo, hi in parts:
                target = view[position : position + hi - lo]
                if order is None:
                    target[...] = arrays[name][lo:hi]
                else:
                    np.take(arrays[name], order[lo:hi], axis=0, out=target, mode="clip")
                position += hi - lo
            out[name] = tensor
        return out

    def group(self, group: RowGroup) -> tuple[dict[str, Any], np.ndarray | None]:
        """A decoded row group as arrays (numeric columns as NumPy, zero-copy where Arrow allows) and this
        epoch's order of its rows; the last two stay in memory, as consecutive batches share them."""
        if group in self._groups:
            self._groups.move_to_end(group)
            return self._groups[group]
        table = self.reader.read_group(group)
        arrays: dict[str, Any] = {
            name: np.column_stack([table.column(c).to_numpy() for c in columns]) for name, columns in self.stack.items()
        }
        stacked = {c for columns in self.stack.values() for c in columns}
        for name, column in zip(table.schema.names, table.columns, strict=True):
            if name not in stacked:
                arrays[name] = column.to_numpy() if is_numeric(column.type) else column.combine_chunks()
        self._groups[group] = (arrays, self.reader.permutation(group))
        while len(self._groups) > 2:
            self._groups.popitem(last=False)
        return self._groups[group]


def is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def rows_of(values: pa.Array, order: np.ndarray | None, lo: int, hi: int) -> list[Any]:
    return (values.slice(lo, hi - lo) if order is None else values.take(order[lo:hi])).to_pylist()


class ShardIterableDataset(IterableDataset):
    """Use as `DataLoader(dataset, batch_size=None, num_workers=W)`; local shards are hashed once, here,
    in parallel, rather than by every data-loader worker."""

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
        if ShardReader(manifest, split, **options).verify_local_shards():
            self.options["verify"] = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def reader(self, worker_id: int | None = None, num_workers: int | None = None) -> ShardReader:
        """The reader of one worker; by default the calling DataLoader worker's."""
        info = get_worker_info()
        return ShardReader(
            self.manifest,
            self.split,
            rank=self.rank,
            world_size=self.world_size,
            worker_id=worker_id if worker_id is not None else (info.id if info else 0),
            num_workers=num_workers if num_workers is not None else (info.num_workers if info else 1),
            epoch=self.epoch,
            **self.options,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from BatchGatherer(self.reader(), self.stack)


class TensorLoader:
    """Batches as tensors on `device`, read by threads of this process instead of DataLoader worker
    processes: PyArrow decodes with the GIL released, each batch is copied once, straight into pinned
    memory, and from there asynchronously to the GPU; nothing goes through shared memory or a pickle.
    The batches are the rank's stream in order (the same as `ShardIterableDataset` gives through a
    DataLoader with any number of workers), so it resumes the same way. Each thread makes `chunk`
    consecutive batches in turn, so row groups that straddle two batches are mostly decoded once."""

    def __init__(
        self,
        manifest: str,
        split: str,
        *,
        device: str | torch.device = "cuda",
        threads: int = 8,
        chunk: int = 4,
        prefetch: int = 2,
        **dataset_options: Any,
    ):
        # Its threads are the parallelism: each decodes one row group at a time, read rather than mapped
        # (faster with 8 threads on the lent H100 host than PyArrow's own threads or memory maps).
        dataset_options = {"use_threads": False, "memory_map": False} | dataset_options
        self.dataset = ShardIterableDataset(manifest, split, **dataset_options)
        self.device, self.threads, self.chunk, self.prefetch = torch.device(device), threads, chunk, prefetch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pin = self.device.type == "cuda"
        plan = list(self.dataset.reader(0, 1).plan())
        queues: list[queue.Queue] = [queue.Queue(self.prefetch * self.chunk) for _ in range(self.threads)]
        stop = threading.Event()

        def owner(batch: int) -> int:
            return (batch // self.chunk) % self.threads

        def offer(q: queue.Queue, item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read(worker: int) -> None:
            try:
                gather = BatchGatherer(self.dataset.reader(0, 1), self.dataset.stack, pin)
                for i, pieces in enumerate(plan):
                    if owner(i) == worker and not offer(queues[worker], gather.batch(pieces)):
                        return
            except BaseException as exc:  # handed to the consumer, raised in its turn
                offer(queues[worker], exc)

        workers = [threading.Thread(target=read, args=(w,), daemon=True) for w in range(self.threads)]
        for thread in workers:
            thread.start()
        try:
            for i in range(len(plan)):
                item = queues[owner(i)].get()
                if isinstance(item, BaseException):
                    raise item
                yield {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in item.items()}
        finally:
            stop.set()
            for thread in workers:
                thread.join()
