"""Parquet reads and writes by URL, the way Dask workers do them (no resource objects on the worker)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from resources.object_store import filesystem_of, written_whole


def read_bytes(url: str, storage_options: dict[str, Any]) -> bytes:
    fs, path = filesystem_of(url, storage_options)
    return fs.cat_file(path)


def open_ranged(url: str, storage_options: dict[str, Any]) -> Any:
    """`url` opened for a reader that seeks to the ranges it needs (a footer, then record batches or column
    chunks): each read one ranged GET of its bytes. s3fs's default read-ahead fetched up to 50 MiB past each
    read, ~30 times what a gather needs of a scatter file. A local file takes no cache and ignores it."""
    fs, path = filesystem_of(url, storage_options)
    return fs.open(path, "rb", cache_type="none")


def read_footers(urls: list[str], storage_options: dict[str, Any]) -> list[pq.FileMetaData]:
    """Each Parquet object's footer (schema, row counts), read in parallel: on S3 each is a round trip."""

    def footer(url: str) -> pq.FileMetaData:
        with open_ranged(url, storage_options) as f:
            return pq.read_metadata(f)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(footer, urls))


def open_for_write(url: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path for writing `url`, with local parent folders made (object stores have none)."""
    fs, path = filesystem_of(url, storage_options)
    fs.makedirs(fs._parent(path), exist_ok=True)
    return fs, path


@contextlib.contextmanager
def open_whole(url: str, storage_options: dict[str, Any], tmp_folder: str) -> Iterator[BinaryIO]:
    """`url` opened for writing, there only once whole, and left as it was by a write that fails. Locally
    through a rename from `tmp_folder` (a URL on the same disk: a write killed outright leaves its file
    there, not hidden beside `url`). On S3 as a PUT or a multipart upload is, aborted on an error (s3fs's
    own `with` would upload what was written before it). A version's shards: another deployment writing
    the same version at once writes the same bytes over them, and a reader of the one it committed first
    must never meet one cut short."""
    fs, path = open_for_write(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        folder = Path(filesystem_of(tmp_folder, storage_options)[1])
        with written_whole(Path(path), folder=folder) as tmp, open(tmp, "wb") as f:
            yield f
        return
    f = fs.open(path, "wb")
    try:
        yield f
        f.close()  # the last part, and the upload completed
    except BaseException as exc:
        try:
            f.discard()  # aborts the multipart upload, if one began
        except Exception as abort:  # the write's own error says what went wrong; this one what it left
            exc.add_note(f"aborting the upload of {url} failed too, which leaves its parts stored: {abort}")
        f.buffer, f.closed = None, True  # neither closing nor collecting the file uploads what it holds
        raise


def write_parquet(table: pa.Table, url: str, storage_options: dict[str, Any], **options: Any) -> int:
    """Write `table` as one Parquet object (zstd unless `options` say otherwise); returns its size in bytes."""
    fs, path = open_for_write(url, storage_options)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, **({"compression": "zstd"} | options))
    return int(fs.size(path))


class HashingFile:
    """A write-only file that hashes and counts what passes through it to `inner`, so a writer gets its
    output's checksum without reading it back."""

    def __init__(self, inner: Any):
        self.inner, self.digest, self.size = inner, hashlib.sha256(), 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.size += view.nbytes
        return self.inner.write(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.inner.flush()

    @property
    def closed(self) -> bool:
        return self.inner.closed

    def close(self) -> None:
        """The owner of `inner` closes it (its `with` block), not the Parquet writer."""


def read_parquet(
    url: str,
    storage_options: dict[str, Any],
    read_dictionary: list[str] | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    with open_ranged(url, storage_options) as f:
        return pq.read_table(f, read_dictionary=read_dictionary, columns=columns)
