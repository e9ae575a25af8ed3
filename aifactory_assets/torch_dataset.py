"""The loader for PyTorch (torch is an optional extra: `pip install -e '.[torch]'` in the checkout), two ways:

- `ShardIterableDataset`, for `DataLoader(dataset, batch_size=None, num_workers=W)`: each worker builds
  its own `ShardReader` for (rank, worker), and PyTorch interleaves workers in the order the reader assumes.
- `TensorLoader`, the fast path to a GPU: the same batches in the same order, made by worker processes
  into a fixed ring of shared, CUDA-pinned slots (no tensors through shared-memory files, no pinning copy).

Rank and world size come from `torch.distributed` when it is initialised.
"""

from __future__ import annotations

import operator
import os
import queue
import re
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa

try:
    import torch
    from torch.utils.data import IterableDataset, get_worker_info
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("ShardIterableDataset needs torch: pip install -e '.[torch]' in the checkout") from exc

from aifactory_assets.loader import (
    PAGE_CHECKSUMS,
    READ_THREADS,
    Piece,
    RowGroup,
    ShardReader,
    available_cores,
)
from aifactory_assets.processes import watch_parent

# What launchers set in each of the processes they start: torchrun, Open MPI's and MPICH's mpirun, srun.
# SLURM's step count, not SLURM_NTASKS: that is the allocation's, also set in an `sbatch -n 4` script's
# body, where one process runs.
SLURM_WORLD_SIZE = "SLURM_STEP_NUM_TASKS"
LAUNCHER_WORLD_SIZES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", SLURM_WORLD_SIZE)
# Arrow's names of the types a tensor holds (as `str(pa.DataType)` and a manifest's schema write them); of
# those, ints and bools have no NaN to hold a null.
NO_NAN_TYPES = frozenset(
    str(kind)
    for kind in (pa.bool_(), pa.int8(), pa.int16(), pa.int32(), pa.int64())
    + (pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64())
)
NUMBER_TYPES = NO_NAN_TYPES | {str(kind) for kind in (pa.float16(), pa.float32(), pa.float64())}


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
    (and the batch's dtype would change from one row group to the next). Float nulls are NaN, faithfully.
    Where the dataset read the footers (local shards) it refused them already, on every rank at once."""
    for name, column in zip(table.schema.names, table.columns, strict=True):
        if column.null_count and str(column.type) in NO_NAN_TYPES:
            raise nulls_refused(f"{group.shard} row group {group.index}", name, column.type, column.null_count)


def nulls_refused(where: str, name: str, kind: pa.DataType, count: int) -> ValueError:
    return ValueError(
        f"{where}: column {name!r} ({kind}) has {count} null(s), which a tensor cannot hold; leave it out with "
        "columns=[...] or fill it upstream"
    )


def refuse_nulls_up_front(reader: ShardReader, columns: list[str] | None) -> None:
    """An int or bool null found as its row group is read stops one rank mid-epoch, while the others wait in
    their next collective. Local shards' footers count each column's nulls per row group: read here, each
    rank refuses the same split at once. Remote shards' footers are not read here (a request per shard and
    rank, and their shards are fetched by the workers): theirs are refused as their row groups are read."""
    if not reader.is_local:
        return
    with ThreadPoolExecutor(available_cores()) as pool:
        found = [nulls for nulls in pool.map(partial(footer_nulls, reader, columns), reader.checksums) if nulls]
    if found:
        raise nulls_refused(*found[0])


Nulls = tuple[str, str, pa.DataType, int]  # where (shard, row group), column, its type, how many


def footer_nulls(reader: ShardReader, columns: list[str] | None, shard: str) -> Nulls | None:
    """The first row group and int or bool column of `columns` (None: all) whose footer counts nulls."""
    meta = reader.footer(shard)
    kinds = {f.name: f.type for f in meta.schema.to_arrow_schema() if columns is None or f.name in columns}
    leaves = [j for j in range(meta.num_columns) if str(kinds.get(meta.schema.column(j).path)) in NO_NAN_TYPES]
    for g in range(meta.num_row_groups):
        for j in leaves:
            chunk = meta.row_group(g).column(j)
            stats = chunk.statistics
            if stats is not None and stats.has_null_count and stats.null_count:
                return f"{shard} row group {g}", chunk.path_in_schema, kinds[chunk.path_in_schema], stats.null_count
    return None


def split_schema(reader: ShardReader) -> dict[str, str] | None:
    """Column names and Arrow type names: the manifest's schema, else (a manifest before it had one) its
    first shard's; None for a split with no shard."""
    fields = reader.manifest.get("schema", {}).get("fields")
    if fields is not None:
        return {f["name"]: f["type"] for f in fields}
    if not reader.checksums:
        return None
    return {f.name: str(f.type) for f in reader.footer(next(iter(reader.checksums))).schema.to_arrow_schema()}


def check_stack(stack: dict[str, list[str]], schema: dict[str, str], columns: list[str] | None) -> None:
    """`stack` groups against the split's schema, here, rather than in a worker mid-epoch or never: each of
    numbers of one type (NumPy would convert mixed ones to one: an int64 id past 2**53 rounded in a float64),
    each column read, and no group named like a column read unstacked (one would replace the other)."""
    read = list(schema) if columns is None else columns
    stacked = {c for group in stack.values() for c in group}
    for name, group in stack.items():
        where = f"stack group {name!r}"
        if isinstance(group, str) or not isinstance(group, list | tuple) or not group:
            raise ValueError(f"{where}: a non-empty list of column names, got {group!r}")
        if unknown := [c for c in group if c not in schema]:
            raise ValueError(f"{where}: column(s) {unknown} not in the split, which has {list(schema)}")
        if unread := [c for c in group if c not in read]:
            raise ValueError(f"{where}: column(s) {unread} are not read: add them to columns={columns}")
        kinds = {c: schema[c] for c in group}
        if text := [c for c, kind in kinds.items() if kind not in NUMBER_TYPES]:
            raise ValueError(f"{where}: column(s) {text} are not numbers ({kinds}); a tensor stacks numbers only")
        dtypes = {c: np.dtype(pa.type_for_alias(kind).to_pandas_dtype()) for c, kind in kinds.items()}
        common = np.result_type(*dtypes.values())  # what np.column_stack makes of them
        if rounded := [c for c, dtype in dtypes.items() if not exactly_in(dtype, common)]:
            raise ValueError(
                f"{where} mixes types {kinds}: stacked, all become {common}, which rounds values of {rounded} (an "
                "int64 past 2**53 in a float64); cast them to one type upstream, or stack them in groups of their own"
            )
        if name in read and name not in stacked:
            raise ValueError(
                f"{where} is named like column {name!r}, also read unstacked: one would replace the other; name the "
                "group otherwise, or leave the column out with columns=[...]"
            )


def exactly_in(dtype: np.dtype, common: np.dtype) -> bool:
    """Whether every value of `dtype` is one of `common`'s. NumPy promotes mixed numbers to a type that holds
    them all, exactly but for ints wider than a float's mantissa (int64 in float64, int32 in float32)."""
    if common.kind != "f" or dtype.kind not in "iu":
        return True
    return dtype.itemsize * 8 - (dtype.kind == "i") <= np.finfo(common).nmant + 1


def need_count(name: str, value: Any, least: int) -> int:
    """`value` as an int of at least `least`; a bool, or a string (an environment variable's), refused by name."""
    try:
        count = operator.index(value)
    except TypeError:
        count = None
    if count is None or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if count < least:
        raise ValueError(f"need {name} >= {least}, got {count}")
    return count


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype)).dtype


def is_numeric(kind: pa.DataType) -> bool:
    return str(kind) in NUMBER_TYPES


def rows_of(values: pa.Array, order: np.ndarray | None, lo: int, hi: int) -> list[Any]:
    return (values.slice(lo, hi - lo) if order is None else values.take(order[lo:hi])).to_pylist()


def launched_world_size() -> tuple[str, int] | None:
    """The launcher's variable that makes this process one of several, and its value; None if none does.
    Slurm's step count counts only where no other launcher's variable is set: torchrun or mpirun in a
    step's task start their own processes (torchrun's WORLD_SIZE=1 in each task of a 4-task step: four runs
    of one process each). Otherwise any count above 1 does: a WORLD_SIZE=1 leaking in from a container's
    environment must not hide mpirun's 4."""
    counts = {name: int(os.environ[name]) for name in LAUNCHER_WORLD_SIZES if os.environ.get(name, "").isdigit()}
    if any(name != SLURM_WORLD_SIZE for name in counts):
        counts.pop(SLURM_WORLD_SIZE, None)
    name = max(counts, key=counts.get, default=None)
    return (name, counts[name]) if name is not None and counts[name] > 1 else None


class ShardIterableDataset(IterableDataset):
    """Use as `DataLoader(dataset, batch_size=None, num_workers=W)`; local shards are hashed once, here,
    in parallel, rather than by every data-loader worker. Checked here, on every rank alike, rather than in
    a worker mid-epoch: `stack` groups against the split's schema, and int or bool nulls in local shards.
    Resume with `state=dataset.state_dict(samples_consumed)`: the rank's count, across all its workers."""

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
        rank = None if rank is None else need_count("rank", rank, 0)
        world_size = None if world_size is None else need_count("world_size", world_size, 1)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed and (rank is None) != (world_size is None):
            # world_size=4 alone made every process rank 0 of 4: the same batches everywhere, a quarter read.
            raise ValueError(
                f"rank={rank} and world_size={world_size}: give both (or neither, to take torch.distributed's "
                "once init_process_group has run)"
            )
        if not distributed and rank is None and (launched := launched_world_size()):
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
        if stack and (schema := split_schema(probe)) is not None:
            check_stack(stack, schema, probe.columns)
        refuse_nulls_up_front(probe, probe.columns)

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

    def state_dict(self, samples_consumed: int) -> dict[str, Any]:
        """What to save with a checkpoint; resume with `ShardIterableDataset(..., state=state)`. `samples_consumed`
        is the rank's: the samples its training loop took from this epoch's batches, from all its DataLoader
        workers together, not one worker's (the workers make one stream, in turn). See `ShardReader.state_dict`."""
        return self.reader(0, 1).state_dict(samples_consumed)

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
    that holds a CUDA context and pinning the ring cost almost half of a one-second epoch), whichever
    thread iterates; they end with the training process. An epoch left unfinished ends them (closing its
    iterator, or starting the next epoch, which then starts afresh), and so does a worker lost between
    epochs (the OOM killer); `close()`, leaving a `with` block or dropping the loader ends them for good.
    Resume with `state=loader.state_dict(samples_consumed)`, the samples the rank took this epoch.
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
        self.workers, self.chunk = need_count("workers", workers, 1), need_count("chunk", chunk, 1)
        self.slots = need_count("slots", slots, 2)  # a worker fills its next slot while the trainer holds the last
        self.device = torch.device(device)
        dataset_options = {"threads": 0, "memory_map": False} | dataset_options
        self._pool: WorkerPool | None = None
        self.dataset = ShardIterableDataset(manifest, split, **dataset_options)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self, samples_consumed: int) -> dict[str, Any]:
        """`ShardIterableDataset.state_dict`: `samples_consumed` is the samples the rank took from this epoch's
        batches, all workers' together (its training loop's count)."""
        return self.dataset.state_dict(samples_consumed)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        reader = self.dataset.reader(0, 1)
        batches = reader.batch_count()
        if not batches:
            return
        if self._pool is not None and (self._pool.busy or not self._pool.alive()):
            # An earlier epoch left unfinished (this one replaces it, as a DataLoader's iterator), or a worker
            # lost since (the OOM killer): this epoch starts afresh.
            self.close()
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

    def alive(self) -> bool:
        return all(process.is_alive() for process in self.processes)

    def work(self, worker: int, dataset: ShardIterableDataset, epochs: Any, free: Any, ready: Any) -> None:
        """A worker process: told to start an epoch, it makes its batches in order, each into a free slot
        of its own. The epoch comes with the message (read from the dataset's shared state instead, a worker
        with no batch in an epoch that reads its message late would make the next epoch's batches twice)."""
        watch_parent(self.trainer)  # not PR_SET_PDEATHSIG: that follows the thread that forked, which may end first
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
