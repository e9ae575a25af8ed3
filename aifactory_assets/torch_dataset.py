"""The loader for PyTorch (torch is an optional extra: `pip install -e '.[torch]'` in the checkout), two ways:

- `ShardIterableDataset`, for `DataLoader(dataset, batch_size=None, num_workers=W)`: each worker builds
  its own `ShardReader` for (rank, worker), and PyTorch interleaves workers in the order the reader assumes.
- `TensorLoader`, the fast path to a GPU: the same batches in the same order, made by worker processes
  into a fixed ring of shared, CUDA-pinned slots (no tensors through shared-memory files, no pinning copy).

Rank and world size come from `torch.distributed` when it is initialised.
"""

from __future__ import annotations

import os
import queue
import re
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ShardIterableDataset needs torch: pip install -e '.[torch]' in the checkout") from exc

from aifactory_assets.loader import PAGE_CHECKSUMS, READ_THREADS, Piece, RowGroup, ShardReader, available_cores
from aifactory_assets.processes import end_with_parent

# What launchers set in each of the processes they start: torchrun, srun, Open MPI's and MPICH's mpirun.
# SLURM's step count, not SLURM_NTASKS: that is the allocation's, also set in an `sbatch -n 4` script's
# body, where one process runs.
LAUNCHER_WORLD_SIZES = ("WORLD_SIZE", "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class BatchGatherer:
    """A reader's batches as tensors, gathered straight from decoded row groups: each value is copied
    once, by one `np.take` per piece of a batch into the batch's tensor (pinned when `pin`, so the copy to
    the GPU is asynchronous). `stack` groups become one [rows, k] tensor, stacked once per row group.
    Few, large NumPy and Arrow calls per batch."""

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
            if isinstance(sample, np.ndarray):
                shape = (rows, *sample.shape[1:])
                out[name] = torch.empty(shape, dtype=torch_dtype(sample.dtype), pin_memory=self.pin)
            else:  # values torch has no type for stay Python lists
                out[name] = [v for arrays, order, lo, hi in parts for v in rows_of(arrays[name], order, lo, hi)]
        self._fill(parts, {name: value.numpy() for name, value in out.items() if torch.is_tensor(value)})
        return out

    def fill(self, pieces: list[Piece], targets: dict[str, np.ndarray]) -> int:
        """Write a batch into preallocated arrays (at least the batch's rows each); returns its rows."""
        return self._fill([(*self.group(group), lo, hi) for group, lo, hi in pieces], targets)

    @staticmethod
    def _fill(parts: list[tuple[dict[str, Any], np.ndarray | None, int, int]], targets: dict[str, np.ndarray]) -> int:
        position = 0
        for arrays, order, lo, hi in parts:
            for name, target in targets.items():
                view = target[position : position + hi - lo]
                if order is None:
                    view[...] = arrays[name][lo:hi]
                else:
                    # In range: each row group read has the manifest's rows (ShardReader._read). "clip"
                    # spares NumPy's buffered copy of `out` (a take 30-40% slower in "raise" mode).
                    np.take(arrays[name], order[lo:hi], axis=0, out=view, mode="clip")
            position += hi - lo
        return position

    def group(self, group: RowGroup) -> tuple[dict[str, Any], np.ndarray | None]:
        """A decoded row group as arrays (numeric columns as NumPy, zero-copy where Arrow allows) and this
        epoch's order of its rows; the last two stay in memory, as consecutive batches share them."""
        if group in self._groups:
            self._groups.move_to_end(group)
            return self._groups[group]
        table = self.reader.read_group(group)
        require_no_nulls(table, group)
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


def require_no_nulls(table: pa.Table, group: RowGroup) -> None:
    """A tensor has no null: an int or bool null would become a float, a wrong number or False, silently
    (and the batch's dtype would change from one row group to the next). Float nulls are NaN, faithfully."""
    for name, column in zip(table.schema.names, table.columns, strict=True):
        if column.null_count and is_numeric(column.type) and not pa.types.is_floating(column.type):
            raise ValueError(
                f"{group.shard} row group {group.index}: column {name!r} ({column.type}) has {column.null_count} "
                "null(s), which a tensor cannot hold; leave it out with columns=[...] or fill it upstream"
            )


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def is_numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def rows_of(values: pa.Array, order: np.ndarray | None, lo: int, hi: int) -> list[Any]:
    return (values.slice(lo, hi - lo) if order is None else values.take(order[lo:hi])).to_pylist()


def launched_world_size() -> tuple[str, int] | None:
    """The launcher's variable that makes this process one of several, and its value; None if none does."""
    for name in LAUNCHER_WORLD_SIZES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 1:
            return name, int(value)
    return None


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
        if not distributed and (rank is None or world_size is None) and (launched := launched_world_size()):
            # Made before init_process_group, every rank would read rank 0 of 1: the same batches everywhere.
            raise RuntimeError(
                f"{launched[0]} is {launched[1]} but torch.distributed is not initialised: make the "
                "loader after init_process_group, or pass rank= and world_size="
            )
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self.world_size = (
            world_size if world_size is not None else (torch.distributed.get_world_size() if distributed else 1)
        )
        # Here the options are checked (a resume point, `state=`, against this run) before any worker starts.
        probe = ShardReader(manifest, split, rank=self.rank, world_size=self.world_size, **options)
        for resumed in ("epoch", "start_sample", "state"):
            options.pop(resumed, None)
        # In shared memory, so that persistent DataLoader workers see `set_epoch` too (they keep the copy of
        # the dataset they were started with).
        self._epoch = torch.tensor(probe.epoch, dtype=torch.int64).share_memory_()
        self.resume = (probe.epoch, probe.start_sample)  # a resume point belongs to its epoch
        self.rank_cores = rank_cores()  # here, in the rank: its workers' parent is the rank, not the launcher
        if probe.verify_local_shards():  # hashed whole here; the workers still check each page's CRC as they read
            self.options["verify"] = "pages" if probe.manifest.get("format_version", 0) >= PAGE_CHECKSUMS else False

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch. `start_sample` (or `state`) applies to the epoch it was given with; others
        start at 0."""
        if epoch < 0:  # checked here: the workers' readers would fail in their own processes
            raise ValueError(f"epoch must be at least 0, got {epoch}")
        self._epoch.fill_(epoch)

    def reader(
        self, worker_id: int | None = None, num_workers: int | None = None, epoch: int | None = None
    ) -> ShardReader:
        """The reader of one worker; by default the calling DataLoader worker's, for the current epoch. In a
        DataLoader worker, `threads` is `worker_threads(num_workers, rank's cores)` unless given."""
        info = get_worker_info()
        epoch = self.epoch if epoch is None else epoch
        threads = {} if info is None else {"threads": worker_threads(info.num_workers, self.rank_cores)}
        options = threads | self.options
        return ShardReader(
            self.manifest,
            self.split,
            rank=self.rank,
            world_size=self.world_size,
            worker_id=worker_id if worker_id is not None else (info.id if info else 0),
            num_workers=num_workers if num_workers is not None else (info.num_workers if info else 1),
            epoch=epoch,
            start_sample=self.resume[1] if epoch == self.resume[0] else 0,
            **options,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from BatchGatherer(self.reader(), self.stack)


def worker_threads(num_workers: int, cores: int | None = None) -> int:
    """A DataLoader worker's `threads` by default: where its share of the rank's `cores` (`rank_cores()`,
    counted in the rank, by default here: call it there, not in a worker, whose parent is the rank) is two
    or more, PyArrow decodes its row groups on its pool, else it decodes one row group at a time on its own
    thread (the workers then are the parallelism; on PyArrow's pools too, each would decode on every core).
    In this path `threads` only chooses between the two. On the lent H100's 16 vCPUs, 4 workers read 5.6-5.9
    M rows/s on their own threads and 9.7-10.4 on PyArrow's; 8 workers 10.5-10.8 either way
    (`benchmarks/README.md`)."""
    share = (rank_cores() if cores is None else cores) // max(num_workers, 1)
    return min(READ_THREADS, share) if share >= 2 else 0


# What launchers set to the number of processes they started on this node: torchrun, Open MPI, MPICH.
LAUNCHER_LOCAL_SIZES = ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def rank_cores(affinity: int | None = None, launcher: int | None = None) -> int:
    """The cores this rank may count on. The ranks a launcher started on one node share what the launcher
    may use (its affinity: a Slurm job's cores, a container's cpuset, a user's taskset): each takes its own
    affinity where the launcher bound it to a share that small, else an equal share of the launcher's
    (torchrun's 8 ranks under a 16-core mask each counted all 16; Open MPI binds 8 ranks to two 8-core
    packages). Call it in the rank itself: a DataLoader worker's parent is the rank, not the launcher."""
    affinity = available_cores() if affinity is None else affinity
    ranks = local_ranks()
    if ranks <= 1:
        return affinity
    launcher = launcher_cores(affinity) if launcher is None else launcher
    return affinity if affinity * ranks <= launcher else min(affinity, max(1, launcher // ranks))


def launcher_cores(own: int) -> int:
    """The cores the process that started this one may use (torchrun's agent, slurmstepd, Open MPI's prted);
    where that cannot be read, this rank's own (`own`): a share counted too small, never one too large.
    Behind a wrapper (`srun ./train.sh`) the parent is the wrapper, whose cores are the rank's own: a rank
    bound to its own share then counts its share of that share."""
    try:
        return len(os.sched_getaffinity(os.getppid()))
    except (AttributeError, OSError):  # no affinity on this OS; the parent gone or not ours to read
        return own


def local_ranks() -> int:
    """How many processes the launcher started on this node (1 where none says)."""
    for name in LAUNCHER_LOCAL_SIZES:
        if (value := os.environ.get(name, "")).isdigit():
            return max(1, int(value))
    # srun: a count per node in node order, runs written "4(x2)": "4(x2),1" is 4, 4 and 1
    counts = [
        int(count)
        for count, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", os.environ.get("SLURM_STEP_TASKS_PER_NODE", ""))
        for _ in range(int(times or 1))
    ]
    node = int(os.environ.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else 1


class TensorLoader:
    """Batches as tensors on `device`, made by `workers` processes straight into a fixed ring of slots in
    shared memory that is registered with CUDA (pinned): a worker decodes, shuffles and gathers a batch
    into one of its own slots, the training process copies the slot to the GPU asynchronously and hands
    it back. Per batch only two small messages cross processes: no tensors through shared-memory files,
    no pinning copy, no GIL shared between the workers (a DataLoader's transport alone tops out below
    what its workers can decode; threads contend).
    The batches are the rank's stream in order (the same as `ShardIterableDataset` gives through a
    DataLoader with any number of workers), so it resumes the same way. Each worker makes `chunk`
    consecutive batches in turn, so row groups that straddle two batches are mostly decoded once.
    The workers and the ring are made on the first epoch and kept for the next ones (forking a process
    that holds a CUDA context and pinning the ring cost almost half of a one-second epoch). An epoch left
    unfinished ends them (closing its iterator, or starting the next epoch, which then starts afresh);
    `close()`, leaving a `with` block or dropping the loader ends them for good.
    Numeric columns only (select them with `columns=`); workers are forked (Linux)."""

    def __init__(
        self,
        manifest: str,
        split: str,
        *,
        device: str | torch.device = "cuda",
        workers: int = 8,
        chunk: int = 4,
        slots: int = 4,
        **dataset_options: Any,
    ):
        # Workers are the parallelism: each decodes one row group at a time, read rather than mapped
        # (faster on the lent H100 host than PyArrow's own threads or memory maps).
        if slots < 2:  # a worker fills its next slot while the trainer still holds the last one
            raise ValueError(f"TensorLoader needs slots >= 2, got {slots}")
        dataset_options = {"threads": 0, "memory_map": False} | dataset_options
        self._pool: WorkerPool | None = None
        self.dataset = ShardIterableDataset(manifest, split, **dataset_options)
        self.device, self.workers, self.chunk, self.slots = torch.device(device), workers, chunk, slots

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        reader = self.dataset.reader(0, 1)
        batches = reader.batch_count()
        if not batches:
            return
        if self._pool is not None and self._pool.busy:
            self.close()  # an earlier epoch left unfinished: this one replaces it, as a DataLoader's iterator
        pool = self._pool or self._start(reader)
        pool.begin_epoch(reader.epoch)
        copies = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        in_flight: tuple[Any, int, int] | None = None  # the last batch's copy, its worker and slot
        received = 0
        try:
            for i in range(batches):
                worker = pool.owner(i)
                slot, rows = pool.receive(worker)
                received += 1
                batch = {name: t[worker, slot, :rows] for name, t in pool.ring.items()}
                if self.device.type == "cuda":
                    # Copied on a stream of its own, so handing the slot back waits for this copy alone,
                    # not for the model's work queued before it; the model's stream waits for the copy.
                    with torch.cuda.stream(copies):
                        batch = {name: t.to(self.device, non_blocking=pool.pinned) for name, t in batch.items()}
                        event = torch.cuda.Event()
                        event.record(copies)
                    torch.cuda.current_stream(self.device).wait_event(event)
                    for t in batch.values():
                        t.record_stream(torch.cuda.current_stream(self.device))
                else:
                    batch, event = {name: t.clone() for name, t in batch.items()}, None
                if in_flight is not None:
                    pool.release(*in_flight)
                in_flight = (event, worker, slot)
                yield batch
        finally:
            if in_flight is not None:
                pool.release(*in_flight)
            pool.busy = False
            if received < batches and self._pool is pool:  # workers mid-epoch (or lost): afresh next time
                self.close()

    def close(self) -> None:
        """End the worker processes and unpin the ring; the next epoch starts new ones."""
        if self._pool is not None:
            self._pool = None
            self._closing()

    def __enter__(self) -> TensorLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, reader: ShardReader) -> WorkerPool:
        """The ring ([workers, slots, batch rows, ...] shared tensors, one per output, shaped after the first
        row group and the largest batch any epoch has), then the workers forked over it."""
        plan = reader.plan()
        first = next(plan)[0][0]
        plan.close()
        arrays, _ = BatchGatherer(reader, self.dataset.stack).group(first)
        text = [name for name, values in arrays.items() if not isinstance(values, np.ndarray)]
        if text:
            raise ValueError(f"TensorLoader carries numbers only; leave out {text} with columns=[...]")
        rows = min(reader.batch_size, reader.samples_per_rank())
        ring = {
            name: torch.empty(
                (self.workers, self.slots, rows, *values.shape[1:]), dtype=torch_dtype(values.dtype)
            ).share_memory_()
            for name, values in arrays.items()
        }
        reader.close()  # the workers fork from here: a cached copy held now would be held by all of them
        self._pool = WorkerPool(self.dataset, ring, self.device, self.chunk)
        # Also when the loader is dropped, or the interpreter exits (before the modules it needs are gone).
        self._closing = weakref.finalize(self, self._pool.close)
        return self._pool


class WorkerPool:
    """TensorLoader's worker processes, the ring they fill and the queues between them and the trainer.
    Worker w makes batches chunk*w .. chunk*w + chunk-1, then those `workers` chunks further, and so on."""

    def __init__(self, dataset: ShardIterableDataset, ring: dict[str, torch.Tensor], device: torch.device, chunk: int):
        self.ring, self.chunk, self.busy, self.closed = ring, chunk, False, False
        self.trainer = os.getpid()
        self.registered = [t for t in ring.values() if device.type == "cuda" and pin_shared(t)]
        self.pinned = bool(self.registered) and len(self.registered) == len(ring)  # else copies wait for the host
        self.workers, slots = next(iter(ring.values())).shape[:2]
        context = torch.multiprocessing.get_context("fork")
        self.epochs = [context.SimpleQueue() for _ in range(self.workers)]
        self.free = [context.SimpleQueue() for _ in range(self.workers)]
        self.ready = [context.Queue() for _ in range(self.workers)]
        for queue_ in self.free:
            for slot in range(slots):
                queue_.put(slot)
        self.processes = [
            context.Process(
                target=self.work,
                args=(w, dataset, self.epochs[w], self.free[w], self.ready[w]),
                name=f"TensorLoader-{w}",
                daemon=True,
            )
            for w in range(self.workers)
        ]
        for process in self.processes:
            process.start()

    def owner(self, batch: int) -> int:
        return (batch // self.chunk) % self.workers

    def work(self, worker: int, dataset: ShardIterableDataset, epochs: Any, free: Any, ready: Any) -> None:
        """A worker process: told to start an epoch, it makes its batches in order, each into a free slot
        of its own. The epoch comes with the message (read from the dataset's shared state instead, a worker
        with no batch in an epoch that reads its message late would make the next epoch's batches twice)."""
        end_with_parent(self.trainer)
        try:
            while (epoch := epochs.get()) is not None:
                gather = BatchGatherer(dataset.reader(0, 1, epoch), dataset.stack)
                for i, pieces in enumerate(gather.reader.plan()):
                    if self.owner(i) != worker:
                        continue
                    slot = free.get()
                    if slot is None:
                        return
                    targets = {name: t[worker, slot].numpy() for name, t in self.ring.items()}
                    ready.put((slot, gather.fill(pieces, targets)))
        except BaseException:
            ready.put(traceback.format_exc())

    def begin_epoch(self, epoch: int) -> None:
        self.busy = True
        for queue_ in self.epochs:
            queue_.put(epoch)

    def receive(self, worker: int) -> tuple[int, int]:
        """The worker's next (slot, rows); an error, not a hang, if it failed or died without a word."""
        if self.closed:
            raise RuntimeError("TensorLoader: this epoch was ended (closed, or a later epoch started)")
        process = self.processes[worker]
        while True:
            try:
                message = self.ready[worker].get(timeout=1.0)
                break
            except queue.Empty:
                if not process.is_alive():
                    raise RuntimeError(f"TensorLoader worker {process.name} exited ({process.exitcode})") from None
        if isinstance(message, str):
            raise RuntimeError(f"TensorLoader worker {worker} failed:\n{message}")
        return message

    def release(self, event: Any, worker: int, slot: int) -> None:
        """Give a slot back to its worker once the copy out of it is done."""
        if event is not None:
            event.synchronize()
        self.free[worker].put(slot)

    def close(self) -> None:
        self.closed = True
        for epochs, free in zip(self.epochs, self.free, strict=True):
            epochs.put(None)
            free.put(None)  # a worker waiting for a slot mid-epoch stops too
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
        for t in self.registered:
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def pin_shared(tensor: torch.Tensor) -> bool:
    """Page-lock a shared-memory tensor for asynchronous copies to the GPU; False where CUDA refuses."""
    cudart = torch.cuda.cudart()
    nbytes = tensor.numel() * tensor.element_size()
    return cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0) == cudart.cudaError.success
