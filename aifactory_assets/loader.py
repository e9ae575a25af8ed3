"""Read a committed shard version for training, from its manifest alone (no bucket listing, no Dagster).

    from aifactory_assets.loader import ShardReader
    reader = ShardReader("s3://bucket/shards/x/v=abc/manifest.json", "train", rank=0, world_size=8,
                         storage_options={...}, epoch=3)
    for batch in reader:        # pyarrow.RecordBatch
        ...

The order is a pure function of (seed, epoch): row groups are permuted per epoch and the rows within each
row group too (every row by default; `shuffle_block` > 1 moves runs of rows, cheaper, but then a batch
no longer than a run holds the same rows every epoch), on top of the seeded global shuffle the shards were
written in. That stream is cut into `world_size` equal contiguous slices, one per rank, so every rank gets
exactly the same number of samples (the tail is dropped, or padded by wrapping around, as the manifest's
sampler says): uneven ranks hang collective ops. Within a rank, the i-th batch (counted from where the run
starts) goes to data-loader worker i % num_workers, the order in which PyTorch's DataLoader interleaves
workers, so the rank's order does not depend on the worker count. `state=reader.state_dict(n)`
resumes a rank exactly where it stopped, and refuses a run laid out otherwise (world size, sampling, version).

`verify=True` hashes each shard whole against the manifest on first read (a local shard once per process,
a remote one once per node: as its copy enters the cache, and again only if the copy was written since),
and checks every page's CRC32 as it is read where the shard was not hashed just before it was opened (a
later epoch; a copy another process hashed); `verify="pages"` only the pages' CRCs and each shard's size:
where every rank hashing the whole split would cost more than training reads (thousands of ranks on one
shared filesystem). Page checksums catch torn copies and bit rot in the pages read, not a file replaced
on purpose. They do not cover the footer (row counts, schema, where pages lie): where a shard is not hashed
whole, its footer is hashed against the manifest's `footer_sha256` (from format 4) wherever it is read
(as the shard is opened, or before, for the torch loader's checks); and every footer's row groups and
schema must be the manifest's, every row group read its row count.

`threads` (by default one per core this process may use, READ_THREADS at most) read, decode and shuffle
row groups, up to two per thread ahead of the batches, and as many more open (hash, download) shards;
text stored with a dictionary is shuffled as its indices and turned back into text once per batch.
`threads=0` reads one row group at a time on the calling thread, for data-loader worker processes that
are the parallelism themselves.

Remote shards go through a node's `ShardCache` whole; `cache=False` (with `verify="pages"`) reads each row
group in place by byte range instead: for a split larger than the cache, or many nodes, each of which
would otherwise download nearly the whole split (row groups are shuffled across every shard).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import hashlib
import json
import operator
import os
import posixpath
import threading
import time
import warnings
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aifactory_assets.file_lock import lock, open_to_lock
from aifactory_assets.shard_layout import LATEST, MANIFEST, read_footer, schema_fingerprint, take_rows

DEFAULT_CACHE_BYTES = 20 * 2**30
COPY_CHUNK = 8 * 2**20  # a download is streamed to disk, never held whole
ABANDONED_S = 3_600
STALLED_S = 60  # a download writes a chunk every few seconds: a copy silent this long is no longer arriving
Remainder = Literal["drop", "pad"]
PAGE_CHECKSUMS = 3  # the manifest format from which every shard's pages carry a CRC32
MAX_OPEN_FILES = 64  # shards a reader keeps open: a split of thousands would exhaust descriptors; reopening
# costs a footer parse (0.4 ms for 32 row groups of 18 columns), so a split of up to 64 shards never reopens
REPEATS_SEEN_IN = 1_024  # rows of a row group, at least, to judge whether a text column's values repeat
READ_THREADS = 8  # by default at most, a reader's threads reading ahead: two row groups each (64 MiB at most,
# decoded); on 16 vCPUs 12 or 16 read within the runs' spread of 8 (the README's GPU machine)
MAX_HELD_COPIES = 8  # of cached shards: each one held is disk the cache cannot give back (1-2 GiB at 8)


@dataclass(frozen=True)
class RowGroup:
    """One unit of reading and shuffling: a row group of a shard."""

    shard: str
    index: int
    rows: int


Piece = tuple[RowGroup, int, int]  # rows [lo, hi) of a row group, in this epoch's order of its rows
Dictionary = dict[str, pa.DataType]  # text columns read as dictionaries, with the type each is stored as


@dataclass(frozen=True)
class OpenShard:
    """A shard open for reading. `dictionary`: its text columns read as dictionary indices, shuffled as
    such and turned back into text once per batch (text taken row by row costs three times as much).
    `lock` serialises reads where PyArrow pre-buffers (a remote file read by range: one request per row
    group rather than per column); a local file is read by several threads at once."""

    file: pq.ParquetFile
    held: CachedShard | CountingFile | None
    dictionary: Dictionary
    lock: contextlib.AbstractContextManager[Any]


def epoch_seed(seed: int, epoch: int, *more: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *more])


# Copies this process holds, or is fetching to hold (a reader opens shards on several threads: one's
# eviction must not remove the copy another has just fetched). NFS emulates flock with byte-range locks,
# which belong to a process: there an eviction by the same process would take them over, and closing its
# descriptor would drop the hold.
_HELD: Counter[str] = Counter()
_HELD_LOCK = threading.RLock()  # reentrant: a CachedShard's finaliser may run on a thread inside it
_ROOM_LOCK = threading.Lock()  # with a cache's `.room.lock`: on NFS a flock is the process's, not the thread's
# Descriptors this process holds a flock through, blocking or held for long: copies in use, download and room
# locks. A flock belongs to the open file, which a forked child (a DataLoader worker) shares: the child's
# duplicates would hold a copy against eviction, or a shard's download for the node, as long as it lives.
_LOCK_FDS: set[int] = set()


def _before_fork() -> None:
    """Never fork while a thread holds the room, or the hold lock (the child would wait on it for good)."""
    _ROOM_LOCK.acquire()
    _HELD_LOCK.acquire()


def _after_fork_in_parent() -> None:
    _HELD_LOCK.release()
    _ROOM_LOCK.release()


def _after_fork_in_child() -> None:
    """The child lets go of its duplicates (the parent's locks stay) and holds nothing yet."""
    for fd in _LOCK_FDS:
        os.close(fd)
    _LOCK_FDS.clear()
    _HELD.clear()
    _after_fork_in_parent()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def opened_to_lock(open_fd: Callable[[], int | None]) -> int | None:
    """A descriptor to lock through, known to the fork hooks from before it is locked."""
    with _HELD_LOCK:
        fd = open_fd()
        if fd is not None:
            _LOCK_FDS.add(fd)
        return fd


def close_locked(fd: int) -> None:
    with _HELD_LOCK:
        _LOCK_FDS.discard(fd)
        os.close(fd)


def hold(path: str, count: int) -> None:
    with _HELD_LOCK:
        _HELD[path] += count
        if not _HELD[path]:
            del _HELD[path]


class CachedShard:
    """A shard's local copy held in use: a shared lock on it keeps every process's eviction off it until
    `close()` (unlinking a file in use frees no disk, so the bound would be a fiction). In a forked child
    it holds nothing (the fork hooks closed its descriptor)."""

    fd = -1

    def __init__(self, path: Path):
        self.path, self.pid = str(path), os.getpid()
        self.fd = opened_to_lock(lambda: os.open(path, os.O_RDONLY))
        hold(self.path, 1)
        try:
            lock(self.fd, fcntl.LOCK_SH)
            if os.fstat(self.fd).st_ino != path.stat().st_ino:  # evicted (and fetched again) meanwhile
                raise FileNotFoundError(path)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fd >= 0 and self.pid == os.getpid():
            close_locked(self.fd)
            hold(self.path, -1)
        self.fd = -1

    __del__ = close  # a reader dropped without close() releases its copies with it


class ShardCache:
    """Local copies of remote shards, named by their checksum, evicted least recently used past `max_bytes`.

    Shared by every rank and data-loader worker on a node: a copy enters only whole (written to a temporary
    file, synced, renamed) and only once its bytes hash to its name, so a file in the cache is trusted as
    far as a crash can make it. The hash is recorded next to the copy (`<checksum>.verified`: its size,
    mtime and inode); a reader that verifies trusts a copy that still matches that record and hashes one
    written since (fetching it again if damaged), so a node's ranks and data-loader workers, however often
    restarted, hash each copy once between them. One process downloads a shard while the others wait for
    it; a copy arriving counts whole from its start, and a copy in use (`CachedShard`) is never evicted, so
    the cache exceeds `max_bytes` only by the copies readers hold open (at most MAX_HELD_COPIES per reader
    by default); readers holding more than `max_bytes` between them leave room for nothing else, and every
    other copy is fetched again. Files that another process evicts meanwhile are fetched again, and so are
    copies that fail a check after their hash (`discard`).
    """

    def __init__(self, directory: str | Path, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.directory, self.max_bytes = Path(directory), max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        # This process's own: how well the cache serves it, and copies it hashed again (written since hashed).
        self.downloads = self.downloaded_bytes = self.rehashed = 0
        self._counting = threading.Lock()

    def path(self, checksum: str) -> Path:
        return self.directory / f"{checksum}.parquet"

    def fetch(
        self, fs: fsspec.AbstractFileSystem, remote: str, checksum: str, verify: bool, size: int | None = None
    ) -> tuple[Path, bool]:
        """The local copy, and whether this call hashed it (downloaded, or written since its last hash). It
        comes held against this process's evictions (`hold`): the caller releases it once it holds a
        `CachedShard` of it (another process may still evict it meanwhile). Room for its `size` is made and
        claimed before the download (`_reserve`), so the copies on disk, this one and others arriving, stay
        within the bound while it arrives (a node-local disk sized to `max_bytes` would otherwise fill)."""
        target = self.path(checksum)
        hold(str(target), 1)
        try:
            if (hashed := self._present(target, checksum, verify)) is not None:
                return target, hashed
            fd = self._lock_download(target.with_suffix(".lock"))
            try:
                if (hashed := self._present(target, checksum, verify)) is not None:
                    return target, hashed
                self._download(fs, remote, checksum, target, size or 0)
            finally:
                close_locked(fd)
            self.evict(keep=target)
            return target, True
        except BaseException:
            hold(str(target), -1)
            raise

    @staticmethod
    def _lock_download(path: Path) -> int:
        """A lock file, locked: a shard's waits for another process downloading the same shard (and
        `.room.lock` for one making room). Locked, it must still be the file at `path` (an eviction may have
        removed a shard's while we waited)."""
        while True:
            try:
                fd = opened_to_lock(lambda: os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
            except PermissionError:  # another user's: a local flock needs no write access
                if (fd := opened_to_lock(lambda: open_to_lock(path))) is None:
                    continue
            lock(fd, fcntl.LOCK_EX)
            try:
                if os.fstat(fd).st_ino == path.stat().st_ino:
                    return fd
            except FileNotFoundError:
                pass
            close_locked(fd)

    def _present(self, target: Path, checksum: str, verify: bool) -> bool | None:
        """None where there is no sound copy; else whether it was hashed just now."""
        try:
            mtime = target.stat().st_mtime_ns
            with contextlib.suppress(PermissionError):  # another user's copy: recency is best effort
                os.utime(target, ns=(time.time_ns(), mtime))  # used now; mtime kept (the record)
            if verify and not self._hashed_as_is(target):
                stamp = file_stamp(target)
                verify_digest(sha256_of(target), checksum, str(target))
                with self._counting:
                    self.rehashed += 1
                self._record_hash(target, stamp)
                return True
            return False
        except FileNotFoundError:
            return None
        except ChecksumMismatch:
            if not remove(target):  # a damaged local copy (the remote one may be fine), but another user's
                raise not_ours(target) from None
            return None

    @staticmethod
    def discard(copy: CachedShard) -> None:
        """Removes a copy that failed a check after its hash, and its `.verified` record: bytes that rot in
        place keep the size, mtime and inode the record vouches for, so every reader would go on trusting
        the copy and failing on it. The next fetch downloads it afresh. Under its download lock, and only
        while it is still the file at its path: another process may have fetched a fresh one meanwhile."""
        target = Path(copy.path)
        fd = ShardCache._lock_download(target.with_suffix(".lock"))
        try:
            if os.fstat(copy.fd).st_ino != target.stat().st_ino:
                return
            if not remove(target):
                raise not_ours(target)
            remove(target.with_suffix(".verified"))
        except FileNotFoundError:  # removed already
            pass
        finally:
            close_locked(fd)

    @staticmethod
    def _hashed_as_is(target: Path) -> bool:
        try:
            return target.with_suffix(".verified").read_text() == _record_text(file_stamp(target))
        except (FileNotFoundError, UnicodeDecodeError):
            return False

    @staticmethod
    def _record_hash(target: Path, stamp: tuple[int, int, int]) -> None:
        """Best effort: a record that cannot be written (another user's copy) only costs a hash later."""
        with contextlib.suppress(OSError):
            target.with_suffix(".verified").write_text(_record_text(stamp))

    def _download(self, fs: fsspec.AbstractFileSystem, remote: str, checksum: str, target: Path, size: int) -> None:
        tmp = target.with_suffix(f".tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            self._reserve(tmp, size)
            digest = hashlib.sha256()
            with fs.open(remote, "rb") as source, tmp.open("r+b") as copy:
                while chunk := source.read(COPY_CHUNK):
                    digest.update(chunk)
                    copy.write(chunk)
                copy.truncate()  # to the bytes that came: a shard of another size fails its hash below
                copy.flush()
                os.fsync(copy.fileno())
                with self._counting:
                    self.downloads += 1
                    self.downloaded_bytes += copy.tell()
            verify_digest(digest.hexdigest(), checksum, remote)  # always: the name promises these bytes
            os.utime(tmp, ns=(time.time_ns(), tmp.stat().st_mtime_ns))  # the newest, for the LRU
            # Hashed on the way in; recorded before the rename (which keeps the inode), so a reader that
            # finds the copy finds its record.
            self._record_hash(target, file_stamp(tmp))
            with self._room():  # an eviction counting meanwhile sees the copy under one name or the other
                tmp.replace(target)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            raise OSError(
                errno.ENOSPC,
                f"{self.directory} (the shard cache) has no room left for {remote} ({size or 'unknown'} bytes): its "
                f"disk is smaller than cache_bytes ({self.max_bytes}) plus the copies readers hold open (up to "
                "max_open_files each): lower either, or read with cache=False, verify='pages'",
            ) from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _reserve(self, tmp: Path, size: int) -> None:
        """Makes room for a copy of `size` bytes (0: a manifest without sizes, room made after) and claims it:
        `tmp` at that size (sparse) from the start, which every eviction counts whole. One process at a
        time: two making room at once each counted the other's copy at the few bytes it had so far, and the
        disk filled past the bound."""
        with self._room():
            if size:
                self.evict(keep=None, room=size)
            with tmp.open("wb") as claimed:
                claimed.truncate(size)

    @contextlib.contextmanager
    def _room(self) -> Iterator[None]:
        """The cache's lock on room made and claimed, across processes and this process's threads."""
        with _ROOM_LOCK:
            fd = self._lock_download(self.directory / ".room.lock")
            try:
                yield
            finally:
                close_locked(fd)

    def evict(self, keep: Path | None, room: int = 0) -> None:
        """Oldest used first, down to `max_bytes` less `room`, skipping copies in use; also the temporary files of
        copies that died (a copy takes seconds, so one an hour old is abandoned), while live ones count
        against the bound (whole while they arrive: `_reserve`; a killed rank's, silent for STALLED_S, only
        by the bytes it wrote, or its claim would shrink the cache for the hour), and hash records an hour
        old whose copy is gone (records and lock files, a few bytes each, count for nothing: a bound of
        exactly two copies would otherwise keep one). Other processes may evict at the same time."""
        now, files, total = time.time(), [], 0
        for path in self.directory.iterdir():
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            if path.suffix == ".parquet":
                files.append((stat.st_atime, stat.st_size, path))
            elif ".tmp-" in path.name and now - stat.st_mtime > ABANDONED_S:
                remove(path)
                continue
            elif (
                path.suffix == ".verified"
                and now - stat.st_mtime > ABANDONED_S
                and not path.with_suffix(".parquet").exists()
            ):
                # Its copy was evicted, or its download died between the record and the rename. Not a young
                # one: a download writes its record just before the rename, and removing it then made the
                # node hash that copy again (seen as a rank's rehash in the shared-cache test).
                remove(path)
                continue
            if path.suffix == ".parquet":
                total += stat.st_size
            elif ".tmp-" in path.name:
                stalled = now - stat.st_mtime >= STALLED_S
                total += min(stat.st_size, stat.st_blocks * 512) if stalled else stat.st_size
        for _, size, path in sorted(files):
            if total + room <= self.max_bytes:
                break
            if path != keep and self._evict_unused(path):
                total -= size

    @staticmethod
    def _evict_unused(path: Path) -> bool:
        """Removes a copy no reader holds, and its lock file unless a download holds that (its hash record
        goes with the next eviction). Under the hold lock: a thread of this process must not take its hold
        between the check and the removal."""
        with _HELD_LOCK:
            return ShardCache._evict_unheld(path)

    @staticmethod
    def _evict_unheld(path: Path) -> bool:
        if str(path) in _HELD:
            return False
        removed = False
        for target in (path, path.with_suffix(".lock")):
            fd = open_to_lock(target)
            if fd is None:
                continue
            try:
                if not lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) or not remove(target):
                    return removed  # a reader holds the copy, a download its lock, or another user owns it
                removed = removed or target == path
            finally:
                os.close(fd)
        return removed


def not_ours(copy: Path) -> ChecksumMismatch:
    """A damaged copy this user cannot remove."""
    return ChecksumMismatch(
        f"{copy}: a damaged copy of another user's in a shared cache, which only they (or root) can remove; "
        "until then read through a cache_dir of your own"
    )


def remove(path: Path) -> bool:
    """Unlinks `path`; False where it is another user's in a shared cache (a sticky folder): theirs to remove."""
    try:
        path.unlink(missing_ok=True)
    except PermissionError:
        return False
    return True


class CountingFile:
    """A remote file read through, counting the bytes it fetched: what a reader with cache=False costs."""

    def __init__(self, inner: Any):
        self.inner, self.read_bytes = inner, 0

    def read(self, size: int = -1) -> bytes:
        data = self.inner.read(size)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name: str) -> Any:  # seek, tell, size, close, closed, ...: the inner file's
        if name == "read_buffer":  # PyArrow reads through it where it exists, around `read`: not counted
            raise AttributeError(name)
        return getattr(self.inner, name)


class ChecksumMismatch(OSError):
    """A shard's bytes differ from its manifest: a torn copy or a tampered file; never train on it."""


def verify_digest(found: str, checksum: str, where: str) -> None:
    if found != checksum:
        raise ChecksumMismatch(f"{where}: sha256 {found} differs from the manifest's {checksum}")


_VERIFIED: set[tuple[str, str, int, int, int]] = set()  # (path, sha256, *file_stamp) this process has hashed


def file_stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is written or replaced: its size, mtime and inode."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def verify_file(path: Path, checksum: str) -> tuple[int, int, int] | None:
    """Hash a local shard once per process (a reader is made per epoch; the file is not re-hashed
    unless it changed on disk since); the `file_stamp` it hashed, None where it trusted an earlier hash."""
    stamp = file_stamp(path)
    if (str(path), checksum, *stamp) in _VERIFIED:
        return None
    verify_digest(sha256_of(path), checksum, str(path))
    _VERIFIED.add((str(path), checksum, *stamp))
    return stamp


def forget_verified() -> None:
    """Forget the local shards this process has hashed: the next reader hashes them again, as a new
    process's would (for benchmarks that time a first epoch more than once)."""
    _VERIFIED.clear()


def _record_text(stamp: tuple[int, int, int]) -> str:
    """A `.verified` record's content: the copy's `file_stamp` when it was hashed."""
    return " ".join(map(str, stamp))


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # streamed, GIL released


def is_manifest(uri: str) -> bool:
    """A version's manifest (`manifest.json`, or a copy renamed), not a pointer or a folder."""
    return uri.endswith(".json")


def resolve_manifest(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """The manifest a dataset's `_latest` pointer names now, for `uri` that pointer or the dataset's folder
    (`.../shards/<dataset>`); a manifest's own URI comes back as it is. Resolve once and give every rank and
    data-loader worker the URI it returns: each resolving `_latest` itself could read a version committed
    meanwhile, and ranks on different versions hang."""
    uri = uri.rstrip("/")
    if is_manifest(uri):
        return uri
    pointer = uri if posixpath.basename(uri) == LATEST else f"{uri}/{LATEST}"
    fs, path = fsspec.core.url_to_fs(pointer, **(storage_options or {}))
    try:
        named = json.loads(fs.cat_file(path))["manifest"]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{pointer}: no committed version (a dataset's `_latest` is written at commit)"
        ) from None
    return f"{posixpath.dirname(pointer)}/{named}"


class ShardReader:
    """One rank's (and one data-loader worker's) view of a split of a committed version."""

    def __init__(
        self,
        manifest: str,
        split: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        worker_id: int = 0,
        num_workers: int = 1,
        epoch: int = 0,
        seed: int | None = None,
        batch_size: int = 65_536,
        columns: list[str] | None = None,
        shuffle: bool = True,
        shuffle_block: int = 1,
        remainder: Remainder | None = None,
        start_sample: int = 0,
        state: Mapping[str, Any] | None = None,
        verify: bool | Literal["pages"] = True,
        storage_options: dict[str, Any] | None = None,
        cache_dir: str | Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cache: bool = True,
        memory_map: bool = True,
        threads: int | None = None,
        max_open_files: int | None = None,
    ):
        if not 0 <= rank < world_size or not 0 <= worker_id < num_workers:
            raise ValueError(f"rank {rank} of {world_size}, worker {worker_id} of {num_workers}: out of range")
        if state is not None:
            if epoch or start_sample:
                raise ValueError("state= resumes at its own epoch and start_sample: give state= or those, not both")
            epoch, start_sample = state["epoch"], state["start_sample"]
        least = (("batch_size", batch_size, 1), ("shuffle_block", shuffle_block, 1), ("start_sample", start_sample, 0))
        for name, value, minimum in (*least, ("epoch", epoch, 0), ("seed", 0 if seed is None else seed, 0)):
            if value < minimum:  # a negative seed or epoch would fail later, in NumPy, with no name
                raise ValueError(f"{name} must be at least {minimum}, got {value}")
        if columns is not None and not columns:
            raise ValueError("columns=[] reads no column (and yields no batch): leave columns out to read them all")
        if threads is not None and (isinstance(threads, bool) or operator.index(threads) < 0):
            raise ValueError(
                f"threads {threads!r}: a count of at least 0 (0: in turn), or None (a thread per core, 8 at most)"
            )
        if remainder not in (None, *get_args(Remainder)):
            raise ValueError(f"remainder {remainder!r}: one of {get_args(Remainder)}, or None for the manifest's")
        verify = bool(verify) if isinstance(verify, np.bool_) else verify
        # A string from a config file, or a 1, would turn checks off unseen (only `True` hashes whole shards).
        if not (verify is True or verify is False or verify == "pages"):
            raise ValueError(f"verify {verify!r}: True, False or 'pages'")
        if not is_manifest(manifest):
            raise ValueError(
                f"{manifest} is not a version's {MANIFEST}: resolve_manifest() gives the one `_latest` names now; "
                "resolve it once and give every rank and worker that URI"
            )
        self.fs, self.manifest_path = fsspec.core.url_to_fs(manifest, **(storage_options or {}))
        self.manifest: dict[str, Any] = json.loads(self.fs.cat_file(self.manifest_path))
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} not in {manifest}; it has {sorted(self.manifest['splits'])}")
        schema = self.manifest.get("schema", {})
        if "fields" in schema:
            check_columns(columns, [f["name"] for f in schema["fields"]], manifest)
        self.schema_fingerprint: str | None = schema.get("fingerprint")
        self.root = posixpath.dirname(self.manifest_path)
        self.split, self.rank, self.world_size = split, rank, world_size
        self.worker_id, self.num_workers = worker_id, num_workers
        self.epoch, self.batch_size, self.columns, self.shuffle = epoch, batch_size, columns, shuffle
        self.shuffle_block = shuffle_block
        self.seed = self.manifest["sampler"]["seed"] if seed is None else seed
        self.remainder = remainder or self.manifest["sampler"].get("remainder", "drop")
        self.start_sample, self.verify = start_sample, verify
        self.memory_map = memory_map  # see the module docstring
        self.threads = min(READ_THREADS, available_cores()) if threads is None else operator.index(threads)
        if verify == "pages" and self.manifest.get("format_version", 0) < PAGE_CHECKSUMS:
            raise ValueError(f"{manifest}: written before shards carried page checksums; use verify=True")
        shards = self.manifest["splits"][split]["shards"]
        self.checksums = {s["path"]: s["sha256"] for s in shards}
        self.footers = {s["path"]: s.get("footer_sha256") for s in shards}  # from format 4
        self.row_groups = {s["path"]: s["row_groups"] for s in shards}
        self.sizes = {s["path"]: s.get("bytes") for s in shards}  # in every manifest of format 3
        self.shard_numbers = {s["path"]: i for i, s in enumerate(shards)}
        self.groups = [RowGroup(s["path"], i, n) for s in shards for i, n in enumerate(s["row_groups"]) if n]
        self.total = sum(g.rows for g in self.groups)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if 0 < self.total < world_size and self.remainder == "drop":
            raise ValueError(
                f"split {split!r} of {manifest} has {self.total} rows, fewer than world_size {world_size}: dropping "
                "the remainder would leave every rank with nothing; use remainder='pad'"
            )
        if state is not None:
            self._check_resumable(state)
        if start_sample > self.samples_per_rank():
            raise ValueError(
                f"start_sample {start_sample} is past the {self.samples_per_rank()} samples a rank has in an epoch "
                f"of split {split!r} at world_size {world_size}: a resume point of another run or version"
            )
        if not cache and verify is True and not self.is_local:
            raise ValueError(
                "verify=True hashes whole shards, which needs the cache; with cache=False row groups are read "
                "by range: use verify='pages' (every page's CRC and each shard's size)"
            )
        self.cache = ShardCache(cache_dir or default_cache_dir(), cache_bytes) if cache and not self.is_local else None
        if self.cache is not None and (split_bytes := sum(self.sizes.values())) > cache_bytes:
            warnings.warn(
                f"split {split!r} of {manifest} is {split_bytes:,} bytes, more than cache_bytes {cache_bytes:,}: "
                "every epoch downloads its shards again, whole, for a few row groups each; read row groups by "
                "range instead with cache=False, verify='pages'",
                stacklevel=2,
            )
        self.remote_bytes = 0  # fetched by range (cache=False), from the shards this reader closed
        self.max_open_files = max_open_files or (MAX_HELD_COPIES if self.cache is not None else MAX_OPEN_FILES)
        self._files: OrderedDict[str, Future[OpenShard]] = OrderedDict()
        self._pending: Counter[str] = Counter()  # reads submitted and not yet taken, per shard
        self._plain_text: set[str] = set()  # text columns whose values hardly repeat: read as text

    # The sampling plan: pure functions of (seed, epoch, rank, world_size).
    def samples_per_rank(self) -> int:
        if self.remainder == "pad":
            return -(-self.total // self.world_size)
        return self.total // self.world_size

    def __len__(self) -> int:
        """Samples this worker yields in the epoch (from `start_sample` on): its batches, less what the first
        one skips before `start_sample` and the last one lacks at the end of the rank's slice."""
        mine, size = self._batch_numbers(), self.batch_size
        if not mine:
            return 0
        first, end = self.start_sample // size, -(-self.samples_per_rank() // size)
        skipped = self.start_sample - first * size if mine[0] == first else 0
        short = end * size - self.samples_per_rank() if mine[-1] == end - 1 else 0
        return len(mine) * size - skipped - short

    def batch_count(self) -> int:
        """Batches this worker yields in the epoch (from `start_sample` on)."""
        return len(self._batch_numbers())

    def _order(self) -> list[RowGroup]:
        if not self.shuffle:
            return self.groups
        return [self.groups[i] for i in epoch_seed(self.seed, self.epoch).permutation(len(self.groups))]

    def _batch_numbers(self) -> range:
        """This worker's batches by number in the rank's epoch (batch i: its slice's rows from i * batch_size):
        every num_workers-th from the one `start_sample` falls in. A range, never a list: batches of a row
        over millions of rows."""
        per_rank = self.samples_per_rank()
        end = -(-per_rank // self.batch_size) if self.start_sample < per_rank else 0
        return range(self.start_sample // self.batch_size + self.worker_id, end, self.num_workers)

    def _batches(self) -> Iterator[tuple[int, int]]:
        """This worker's batches, as [lo, hi) positions in the rank's slice of the epoch stream."""
        per_rank = self.samples_per_rank()
        for i in self._batch_numbers():
            yield max(i * self.batch_size, self.start_sample), min((i + 1) * self.batch_size, per_rank)

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        """A record batch per batch, except where a text or binary column of it passes 2 GiB: Arrow's 32-bit
        offsets then keep it in several chunks, and the batch comes as that many record batches."""
        # The plan twice, rather than one plan buffered (itertools.tee) for as many batches as the groups
        # read ahead span: millions where batches are a row each.
        batches = self._plan()
        tables = self._prepared(group for pieces in self._plan() for group, _, _ in pieces)
        held: dict[RowGroup, tuple[pa.Table, Dictionary]] = {}
        try:
            for pieces in batches:
                for group, _, _ in pieces:
                    while group not in held:
                        done, table, dictionary = next(tables)
                        held[done] = table, dictionary
                parts = [as_stored(held[g][0].slice(lo, hi - lo), held[g][1]) for g, lo, hi in pieces]
                last = pieces[-1][0]
                held = {last: held[last]}  # only the last row group of a batch can go on in the next
                yield from pa.concat_tables(parts).combine_chunks().to_batches()
        finally:
            tables.close()  # the reads still running end before their shards close
            self.close()

    def plan(self) -> Iterator[list[Piece]]:
        """Per batch, where its rows come from: rows [lo, hi) of row groups in their permuted order (see
        `read_group` and `permutation`), for a consumer that gathers them itself (`torch_dataset`)."""
        try:
            yield from self._plan()
        finally:  # the epoch is read (or abandoned): its shards need not stay open, nor their copies held
            self.close()

    def _plan(self) -> Iterator[list[Piece]]:
        if self.total == 0:
            return
        order = self._order()
        ends = np.cumsum([g.rows for g in order])
        offset = self.rank * self.samples_per_rank()
        for lo, hi in self._batches():
            yield self._pieces(order, ends, offset + lo, offset + hi)

    def _prepared(self, groups: Iterable[RowGroup]) -> Iterator[tuple[RowGroup, pa.Table, Dictionary]]:
        """Row groups read and put in this epoch's order of rows, in turn, up to two per thread ahead of the
        consumer, on `threads` threads: PyArrow decodes, NumPy and Arrow shuffle, and shards are hashed or
        downloaded without the GIL, while the consumer joins the batches."""
        # Shards are opened (hashed, downloaded) on threads of their own: reads wait for them, not for a free
        # thread behind other reads that wait.
        pools = [ThreadPoolExecutor(self.threads, f"ShardReader-{use}") for use in ("read", "open") if self.threads]
        read, open_ = (pool.submit for pool in pools) if self.threads else (run_now, run_now)
        window: deque[tuple[RowGroup, Future[tuple[pa.Table, Dictionary]]]] = deque()
        try:
            previous = None
            for group in groups:
                if group == previous:  # consecutive batches share it
                    continue
                previous = group
                while window and self._at_open_limit(group.shard):  # reads finish before another shard opens
                    yield self._taken(*window.popleft())
                shard = self._shard(group.shard, open_)
                self._pending[group.shard] += 1
                window.append((group, read(self._read_permuted, shard, group)))
                while window and len(window) >= 2 * self.threads:
                    yield self._taken(*window.popleft())
            while window:
                yield self._taken(*window.popleft())
        finally:
            for pool in reversed(pools):  # a consumer that stops early waits for no queued hash, download or read
                pool.shutdown(wait=True, cancel_futures=True)

    def _at_open_limit(self, shard: str) -> bool:
        busy = sum(1 for s in self._files if self._pending[s])
        return shard not in self._files and busy >= max(1, self.max_open_files)

    def _taken(
        self, group: RowGroup, future: Future[tuple[pa.Table, Dictionary]]
    ) -> tuple[RowGroup, pa.Table, Dictionary]:
        table, dictionary = future.result()
        self._pending[group.shard] -= 1
        return group, table, dictionary

    def _read_permuted(self, opened: Future[OpenShard], group: RowGroup) -> tuple[pa.Table, Dictionary]:
        shard = opened.result()
        table, order = self._read(shard, group, use_threads=False), self.permutation(group)
        return (table if order is None else take_rows(table, order)), shard.dictionary

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        for batch in self:
            yield from batch.to_pylist()

    def _pieces(self, order: list[RowGroup], ends: np.ndarray, start: int, stop: int) -> list[Piece]:
        """Rows [start, stop) of the epoch stream; positions past the end wrap around (padding)."""
        pieces, position = [], start
        while position < stop:
            q = position % self.total
            k = int(np.searchsorted(ends, q, side="right"))
            lo = q - (int(ends[k]) - order[k].rows)
            take = min(stop - position, int(ends[k]) - q)
            pieces.append((order[k], lo, lo + take))
            position += take
        return pieces

    def read_group(self, group: RowGroup) -> pa.Table:
        """A row group as stored (verified first, when asked); with `threads` > 0 PyArrow decodes it on its
        own pool (as many threads as the machine has cores), with 0 on the calling thread."""
        shard = self._shard(group.shard, run_now).result()
        return as_stored(self._read(shard, group, self.threads > 0), shard.dictionary)

    def _read(self, shard: OpenShard, group: RowGroup, use_threads: bool) -> pa.Table:
        try:
            with shard.lock:
                table = shard.file.read_row_group(group.index, columns=self.columns, use_threads=use_threads)
        except OSError as exc:
            if "CRC checksum verification failed" not in str(exc):
                raise
            raise self._damaged(shard, f"{self.root}/{group.shard} row group {group.index}: {exc}") from exc
        if table.num_rows != group.rows:  # the plan counts on the manifest's rows: short batches, unequal ranks
            raise ChecksumMismatch(
                f"{self.root}/{group.shard} row group {group.index}: {table.num_rows} rows where the manifest has "
                f"{group.rows}"
            )
        for name in shard.dictionary:
            column = table.column(name)
            if len(column) >= REPEATS_SEEN_IN and sum(len(c.dictionary) for c in column.chunks) * 2 > len(column):
                self._plain_text.add(name)  # shards opened (or reopened) from now on read it as text
        return table

    @staticmethod
    def _damaged(shard: OpenShard, failure: str) -> ChecksumMismatch:
        """A page that failed its CRC (PyArrow's error names no file). A cached copy is removed, not fetched
        again mid-epoch: reads of its other row groups may be in flight on the copy that failed."""
        if not isinstance(shard.held, CachedShard):
            return ChecksumMismatch(failure)
        ShardCache.discard(shard.held)
        return ChecksumMismatch(
            f"{failure}; its cached copy {shard.held.path} rotted after it was hashed and is removed: this reader "
            "stops, and the next one (a restarted run) downloads the shard afresh"
        )

    def permutation(self, group: RowGroup) -> np.ndarray | None:
        """This epoch's order of a row group's rows, None when not shuffling."""
        if not self.shuffle:
            return None
        rng = epoch_seed(self.seed, self.epoch, self.shard_numbers[group.shard], group.index)
        return shuffle_index(group.rows, rng, self.shuffle_block)

    def _shard(self, shard: str, submit: Submit) -> Future[OpenShard]:
        """A shard, opened by `submit` (hashed or downloaded first, as asked). Past `max_open_files` the least
        recently used with no read pending is closed, and so is one opened to read text columns as
        dictionaries that have since proved not to repeat."""
        opened = self._files.get(shard)
        if (
            opened is not None
            and self._idle(opened, shard)
            and self._plain_text.intersection(opened.result().dictionary)
        ):
            self._close_shard(shard)
            opened = None
        if opened is None:
            idle = [s for s in self._files if not self._pending[s]]
            for old in idle[: max(0, len(self._files) + 1 - max(1, self.max_open_files))]:
                self._close_shard(old)
            opened = self._files[shard] = submit(self._open_shard, shard)
        self._files.move_to_end(shard)
        return opened

    def _idle(self, opened: Future[OpenShard], shard: str) -> bool:
        return not self._pending[shard] and opened.done() and not opened.cancelled() and opened.exception() is None

    def _open_shard(self, shard: str, attempts: int = 3) -> OpenShard:
        try:
            return self._open_present(shard, attempts)
        except FileNotFoundError as exc:
            raise self._missing(shard) from exc

    def _missing(self, shard: str) -> FileNotFoundError:
        """A shard that is gone, said as what most likely happened: with its manifest gone too, the version
        was removed (by retention, as newer ones were committed) while this job read it."""
        where = f"{self.root}/{shard}"
        if self.fs.exists(self.manifest_path):
            return FileNotFoundError(f"{where}: missing from a committed version (its {MANIFEST} names it)")
        return FileNotFoundError(
            f"{where}: its version was removed while this job read it ({MANIFEST} is gone too): retention "
            "(`shards.retention` in the catalogue) removes versions beyond that many commits; raise it, or copy "
            "the version, for jobs that outlive it"
        )

    def _open_present(self, shard: str, attempts: int) -> OpenShard:
        remote, checksum = f"{self.root}/{shard}", self.checksums[shard]
        if self.is_local:
            for _ in range(attempts):
                hashed = verify_file(Path(remote), checksum) if self.verify is True else None
                if self.verify == "pages":
                    self._check_size(shard, Path(remote).stat().st_size)
                opened = self._open(shard, remote, None, hashed is not None)
                if hashed is None or file_stamp(Path(remote)) == hashed:
                    return opened
                opened.file.close()  # written between its hash and its opening: what was hashed is not this
            raise OSError(f"{remote}: changed on disk {attempts} times while it was being verified")
        if self.cache is None:
            return self._open_ranges(shard)
        return self._open_cached(self.cache, shard, attempts)

    def _open_cached(self, cache: ShardCache, shard: str, attempts: int) -> OpenShard:
        """Held in use once open; between the fetch and the hold another process may evict it, and it is
        fetched again, as is a copy whose footer or layout rotted since it was hashed (a copy hashed just now
        holds the manifest's bytes: a layout unlike the manifest's is then no rot, and refused as it is)."""
        remote, checksum = f"{self.root}/{shard}", self.checksums[shard]
        for _ in range(attempts):
            local, hashed = cache.fetch(self.fs, remote, checksum, self.verify is True, self.sizes[shard])
            try:
                held = CachedShard(local)
            except FileNotFoundError:
                continue
            finally:
                hold(str(local), -1)
            try:
                return self._open(shard, local, held, hashed)
            except BaseException as exc:
                with contextlib.closing(held):
                    # A copy not hashed just now that fails a check, or cannot be opened at all (cut short
                    # where verify=False trusts it as it is), rotted since it came: the next attempt downloads
                    # it afresh (hashing it), rather than every reader failing on it until someone clears it.
                    if hashed or not isinstance(exc, OSError | pa.ArrowException):  # ChecksumMismatch too
                        raise
                    cache.discard(held)
        raise OSError(
            f"{remote}: evicted from {cache.directory} {attempts} times before it could be opened; "
            f"cache_bytes ({cache.max_bytes}) is too small for the readers sharing it"
        )

    def _open_ranges(self, shard: str) -> OpenShard:
        """A remote shard read in place: its footer, then each row group's column chunks as they are read,
        each one ranged request (no read-ahead: s3fs's default block is 50 MiB)."""
        source = CountingFile(self.fs.open(f"{self.root}/{shard}", "rb", cache_type="none"))
        try:
            if self.verify == "pages":
                self._check_size(shard, source.size)
            return self._open(shard, source, source, hashed=False)
        except BaseException:
            source.close()
            raise

    def _check_size(self, shard: str, size: int) -> None:
        if size != self.sizes[shard]:
            raise ChecksumMismatch(f"{self.root}/{shard}: {size} bytes where the manifest has {self.sizes[shard]}")

    def _open(
        self, shard: str, source: str | Path | CountingFile, held: CachedShard | CountingFile | None, hashed: bool
    ) -> OpenShard:
        """`hashed`: its bytes were just found to be the manifest's, which every page's CRC (and the footer's
        hash) would check again."""
        ranged = isinstance(held, CountingFile)
        options = {
            "memory_map": self.memory_map and not ranged,
            "page_checksum_verification": bool(self.verify) and not hashed,
            "pre_buffer": ranged,  # PyArrow's pre-buffer cache is one per file: threads would race on it
        }
        metadata = self._verified_footer(shard, source) if self.verify and not hashed else None
        file = pq.ParquetFile(source, metadata=metadata, **options)
        self._check_layout(shard, file)
        dictionary = self._dictionary_columns(file)
        if dictionary:
            file = pq.ParquetFile(source, metadata=file.metadata, read_dictionary=sorted(dictionary), **options)
        return OpenShard(file, held, dictionary, threading.Lock() if ranged else contextlib.nullcontext())

    def footer(self, shard: str) -> pq.FileMetaData:
        """A shard's metadata, read in one request (no read-ahead: s3fs's default block is 50 MiB) for checks
        made before any of its pages is read, and held to the manifest's `footer_sha256` as `_open` holds it."""
        with self.fs.open(f"{self.root}/{shard}", "rb", cache_type="none") as file:
            return self._parsed_footer(shard, read_footer(file))

    def _verified_footer(self, shard: str, source: str | Path | CountingFile) -> pq.FileMetaData | None:
        """The shard's metadata, parsed from footer bytes read once that hash to the manifest's `footer_sha256`;
        None where the manifest predates it (PyArrow then reads the footer itself)."""
        if self.footers[shard] is None:
            return None
        if isinstance(source, CountingFile):
            return self._parsed_footer(shard, read_footer(source))
        with open(source, "rb") as f:
            return self._parsed_footer(shard, read_footer(f))

    def _parsed_footer(self, shard: str, footer: bytes) -> pq.FileMetaData:
        """Footer bytes checked (where verifying and the manifest has their hash), then parsed; a footer that
        does not parse names its shard."""
        where = f"{self.root}/{shard}"
        if self.verify and self.footers[shard] is not None:
            verify_digest(hashlib.sha256(footer).hexdigest(), self.footers[shard], f"{where} footer")
        try:
            return pq.read_metadata(pa.BufferReader(footer))
        except (OSError, pa.ArrowException) as exc:  # "Couldn't deserialize thrift" is an OSError
            raise ChecksumMismatch(f"{where}: its footer does not parse: {exc}") from exc

    def _check_layout(self, shard: str, file: pq.ParquetFile) -> None:
        """The footer's row groups and schema against the manifest's, which the plan is made from (a footer
        changed where no check looked would make batches short and ranks unequal); the columns asked for
        against the schema, where the manifest has none."""
        meta, where = file.metadata, f"{self.root}/{shard}"
        found = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        if found != self.row_groups[shard]:
            raise ChecksumMismatch(
                f"{where}: row groups of {found} rows where the manifest has {self.row_groups[shard]}"
            )
        schema = file.schema_arrow
        if self.schema_fingerprint is not None and schema_fingerprint(schema) != self.schema_fingerprint:
            raise ChecksumMismatch(f"{where}: its schema differs from the manifest's:\n{schema}")
        check_columns(self.columns, schema.names, where)

    def _dictionary_columns(self, file: pq.ParquetFile) -> Dictionary:
        """Text columns stored with a dictionary (as a shard's first row group has them), unless their values
        proved not to repeat (a dictionary past its page limit, then plain pages)."""
        meta, schema = file.metadata, file.schema_arrow
        if not meta.num_row_groups:
            return {}
        wanted = set(self.columns or schema.names) - self._plain_text
        first = meta.row_group(0)
        names = (
            first.column(j).path_in_schema for j in range(first.num_columns) if first.column(j).has_dictionary_page
        )
        fields = (schema.field(n) for n in names if n in wanted and schema.get_field_index(n) >= 0)
        return {f.name: f.type for f in fields if is_text(f.type)}

    def _close_shard(self, shard: str) -> None:
        opened = self._files.pop(shard)
        if opened.cancelled() or opened.exception() is not None:  # it never opened
            return
        held = opened.result().held
        opened.result().file.close()
        if held is not None:
            held.close()
        if isinstance(held, CountingFile):
            self.remote_bytes += held.read_bytes

    def close(self) -> None:
        """Closes the open shards, releasing the cached copies they held, and brings the cache back within
        its bound (an epoch's end does this; a reader merely dropped releases its copies without evicting)."""
        held = bool(self._files)
        while self._files:
            self._close_shard(next(reversed(self._files)))
        self._pending.clear()  # reads cancelled or failed were never taken
        if held and self.cache is not None:
            self.cache.evict(keep=None)

    def verify_local_shards(self) -> bool:
        """Hash every shard of the split now, on every core, when they are local; True if it did. Data-loader
        workers share shards, so hashing once here spares each worker hashing them all again. Remote
        shards are verified as they are downloaded into the cache instead."""
        if self.cache is not None or self.verify is not True:
            return False
        paths = [Path(f"{self.root}/{shard}") for shard in self.checksums]
        with ThreadPoolExecutor(available_cores()) as pool:
            list(pool.map(verify_file, paths, self.checksums.values()))
        return True

    def state_dict(self, samples_consumed: int) -> dict[str, Any]:
        """What to save with a checkpoint: resume with `ShardReader(..., state=state)`. With the position, what
        it means something under (the run's layout and sampling, the version), and the batch size, which it
        does not depend on: a rank's stream from `start_sample` on is the same in batches of any size."""
        start = self.start_sample + samples_consumed
        if not 0 <= start <= self.samples_per_rank():
            raise ValueError(
                f"{samples_consumed} samples consumed from {self.start_sample}: a rank has {self.samples_per_rank()}"
            )
        return {"epoch": self.epoch, "start_sample": start, "batch_size": self.batch_size, **self._run()}

    def _run(self) -> dict[str, Any]:
        """What a resume point's `start_sample` counts within: other values send it to other rows."""
        names = ("split", "world_size", "seed", "remainder", "shuffle", "shuffle_block")
        return {name: getattr(self, name) for name in names} | {"version": self.manifest.get("version")}

    def _check_resumable(self, state: Mapping[str, Any]) -> None:
        """A resume point of this run; one saved before state_dict said more than its position is trusted."""
        mine = self._run()
        differ = [name for name in mine if name in state and state[name] != mine[name]]
        if differ:
            saved = ", ".join(f"{name} {state[name]!r}" for name in differ)
            raise ValueError(
                f"state= was saved by a run with {saved}; this reader has "
                f"{', '.join(f'{name} {mine[name]!r}' for name in differ)}: its start_sample would resume at other "
                "rows. Resume with the same settings and version, or start the epoch afresh (epoch=)"
            )


Submit = Callable[..., Future[Any]]


def available_cores() -> int:
    """The cores this process may run on (its affinity, where the OS has one: a batch job's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_now(fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """`submit` without threads: the call made at once, its outcome in a done Future."""
    future: Future[Any] = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


def check_columns(columns: list[str] | None, names: list[str], where: str) -> None:
    """PyArrow leaves out a column it does not find, unseen: a label lost, or no column and no batch."""
    unknown = [c for c in columns or [] if c not in names]
    if unknown:
        close = {c: m for c in unknown if (m := difflib.get_close_matches(c, names, 1))}
        hint = "".join(f"; {c!r}: did you mean {m[0]!r}?" for c, m in close.items())
        raise KeyError(f"columns {unknown} not in {where}, which has {names}{hint}")


def is_text(kind: pa.DataType) -> bool:
    return any(
        test(kind)
        for test in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    )


def as_stored(table: pa.Table, dictionary: Dictionary, limit: int = 2**31 - 1) -> pa.Table:
    """The columns read as dictionaries back to the text they are stored as; a chunk whose text would pass
    2 GiB (`limit`: Arrow's 32-bit offsets) in as many chunks as it takes."""
    for name, kind in dictionary.items():
        i = table.schema.get_field_index(name)
        chunks = [piece.cast(kind) for chunk in table.column(i).chunks for piece in text_pieces(chunk, limit)]
        table = table.set_column(i, table.schema.field(i).with_type(kind), pa.chunked_array(chunks, kind))
    return table


def text_pieces(chunk: pa.DictionaryArray, limit: int) -> list[pa.DictionaryArray]:
    """Slices of a dictionary array whose values, written out, stay within `limit` bytes each."""
    value_type = chunk.type.value_type
    if pa.types.is_large_string(value_type) or pa.types.is_large_binary(value_type):
        return [chunk]  # 64-bit offsets
    if len(chunk) * chunk.dictionary.nbytes <= limit:  # no value is longer than all of them together
        return [chunk]
    lengths = pc.binary_length(chunk.dictionary)
    if len(chunk) * (pc.max(lengths).as_py() or 0) <= limit:
        return [chunk]
    ends = np.cumsum(lengths.take(chunk.indices).fill_null(0).to_numpy(zero_copy_only=False))
    cuts, start = [], 0
    while start < len(chunk):
        stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + limit, side="right")))
        cuts.append(chunk.slice(start, stop - start))
        start = stop
    return cuts


def shuffle_index(rows: int, rng: np.random.Generator, block: int) -> np.ndarray:
    """A permutation of a row group's rows that moves blocks of `block` rows (1 = every row), on top of
    the seeded global shuffle the shards were written in."""
    starts = rng.permutation(np.arange(0, rows, block))
    if block <= 1:
        return starts
    index = (starts[:, None] + np.arange(block)).ravel()
    return index[index < rows]


def default_cache_dir() -> Path:
    return Path(os.environ.get("AIFACTORY_CACHE", Path.home() / ".cache" / "aifactory" / "shards"))


def __getattr__(name: str) -> Any:
    """The torch classes exist only where torch is installed (an optional extra)."""
    if name in ("ShardIterableDataset", "TensorLoader"):
        from aifactory_assets import torch_dataset

        return getattr(torch_dataset, name)
    raise AttributeError(name)
