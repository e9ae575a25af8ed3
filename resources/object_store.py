"""A factory site's object store: a local directory by default, any S3-compatible endpoint by environment.

Everything above this class (assets, sensors, the loader) speaks fsspec paths relative to the site's
root, so local and S3 share one code path. Dask workers get `url()` + `storage_options`, never the
resource itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import itertools
import json
import math
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import dagster as dg
import fsspec
from fsspec.asyn import sync
from fsspec.utils import glob_translate
from pydantic import Field

from aifactory_assets.file_lock import lock, open_to_lock

log = dg.get_dagster_logger(__name__)


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object, as the pipeline fingerprints it."""

    key: str
    size: int
    etag: str | None
    mtime: float | None

    def fingerprint(self) -> str:
        return f"{self.key}|{self.size}|{self.etag or ''}|{self.mtime or ''}"


def local_identity(info: dict[str, Any]) -> str | None:
    """What stands in for an ETag on a local file: its inode and change time. Size and mtime alone miss a
    file rewritten in place with both kept (`cp -p`, `rsync -t`, `touch -r`, one-second mtimes), whose new
    rows would then never be read; a rewrite or a rename-into-place changes the change time."""
    if "ino" not in info or "created" not in info:  # fsspec's local `created` is st_ctime
        return None
    return f"ino{info['ino']}-ctime{info['created']!r}"


@lru_cache(maxsize=32)
def _filesystem(protocol: str, options: tuple[tuple[str, Any], ...]) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem(protocol, **_unfreeze(options))


def filesystem_of(url: str, storage_options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a URL that `ObjectStore.url` made (`s3://...` or a local path). Not
    fsspec's `url_to_fs`, which reads `::` in a landed file's name (`sensor-fe80::1.csv`) as a chain of
    filesystems."""
    if url.startswith("s3://"):
        return _filesystem("s3", _freeze(storage_options)), url.removeprefix("s3://")
    return _filesystem("file", ()), url


def _freeze(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, _freeze(v) if isinstance(v, dict) else v) for k, v in options.items()))


def _unfreeze(options: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {k: _unfreeze(v) if isinstance(v, tuple) else v for k, v in options}


def strict_json(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def json_bytes(value: Any) -> bytes:
    """Strict JSON: NaN and infinities (the mean of an all-null column, say) become null, which every
    reader parses (Python would write bare `NaN`, which JavaScript, Go or jq refuse)."""
    return json.dumps(strict_json(value), indent=2, sort_keys=True, default=str, allow_nan=False).encode()


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code behind s3fs's OSError (botocore's ClientError is its cause): PreconditionFailed
    (412) where another writer's object was there, ConditionalRequestConflict (409) where AWS saw two
    conditional writes at once."""
    response = getattr(exc.__cause__, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


async def _get_object(fs: Any, bucket: str, key: str) -> tuple[str | None, bytes]:
    """Body and ETag from one GET: a HEAD then a GET could pair an older ETag with a newer body."""
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    try:
        return response.get("ETag"), await response["Body"].read()
    finally:
        response["Body"].close()


class ObjectStore(dg.ConfigurableResource):
    """The object storage of one factory site."""

    site: str = Field(description="the factory site this store belongs to")
    protocol: Literal["file", "s3"] = Field(default="file", description="'file' (local directory) or 's3'")
    root: str = Field(description="local directory, or 'bucket/prefix' for S3")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; None means AWS")
    access_key_id: str | None = Field(default=None, repr=False, description="from the environment (dg.EnvVar)")
    secret_access_key: str | None = Field(default=None, repr=False, description="from the environment (dg.EnvVar)")
    region: str | None = Field(default=None, description="S3 region, where the endpoint needs one")

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec options for this store, as Dask and pyarrow readers take them."""
        if self.protocol == "file":
            return {}
        client_kwargs: dict[str, Any] = {"region_name": self.region} if self.region else {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        return {
            "key": self.access_key_id,
            "secret": self.secret_access_key,
            "client_kwargs": client_kwargs,
            "use_listings_cache": False,
        }

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return _filesystem(self.protocol, _freeze(self.storage_options))

    @property
    def base(self) -> str:
        """The root as listings name it: a local root absolute, so that a listing's paths map back to keys."""
        return os.path.abspath(self.root) if self.protocol == "file" else self.root.rstrip("/")

    def path(self, key: str = "") -> str:
        """The fsspec path of `key` (relative to the site's root)."""
        return f"{self.base}/{key.lstrip('/')}".rstrip("/")

    def url(self, key: str = "") -> str:
        """Where `key` lives, as a URL Dask, pyarrow and people can use."""
        return f"s3://{self.path(key)}" if self.protocol == "s3" else self.path(key)

    def key_of(self, path: str) -> str:
        """The inverse of `path`: a key relative to the site's root. A path outside the root has none: taken
        as it was, it named another object under this root."""
        path = path.removeprefix("s3://")
        if path != self.base and not path.startswith(f"{self.base}/"):
            raise ValueError(f"{path} is not under the root of {self.display()}")
        return path[len(self.base) + 1 :]

    def ensure_root(self) -> None:
        if self.protocol == "file":
            Path(self.root).mkdir(parents=True, exist_ok=True)
        elif not self.fs.exists(self.root.split("/")[0]):
            self.fs.mkdir(self.root.split("/")[0])

    def list_objects(self, prefix: str, pattern: str = "**") -> list[ObjectInfo]:
        """Objects under `prefix` whose key (relative to the prefix) matches the glob `pattern` (as fsspec's
        glob reads it; only the pattern is a glob: a root may hold [ ] * ?)."""
        self.fs.invalidate_cache()
        base = self.path(prefix)
        glob_of = re.compile(glob_translate(f"{glob.escape(base)}/{pattern}"))
        folders, depth = fixed_folders(pattern)
        listed = self._local_files if self.protocol == "file" else self._s3_objects
        found = listed("/".join([base, *folders]), depth, lambda path: glob_of.match(path) is not None)
        return sorted((self._info(path, info) for path, info in found.items()), key=lambda o: o.key)

    def _s3_objects(self, base: str, depth: int | None, matches: Callable[[str], bool]) -> dict[str, Any]:
        """The objects under `base` that `matches` takes. A key with an empty segment (`d//a.csv`, a
        partner's path join) no glob segment matches: it is named in a warning, not passed over unsaid."""
        # By levels (a depth), fsspec's walk passes over a listing that fails: a refused one must fail the caller.
        by_levels = {"on_error": _raise_unless_missing} if depth else {}
        found = self.fs.find(base, maxdepth=depth, detail=True, **by_levels)
        # Listed by levels, such keys come back as a folder named with a trailing "/" (their common prefix).
        unmatched = sorted(
            self.key_of(path) + ("/*" if info["type"] == "directory" else "")
            for path, info in found.items()
            if ("//" in path[len(base) :] or (info["type"] == "directory" and path.endswith("/"))) and not matches(path)
        )
        if unmatched:
            log.warning(
                f"{self.display()}: not listed, keys with an empty segment (//) that the glob does not match: "
                f"{', '.join(unmatched)}; rename them without the doubled /"
            )
        # An S3 key ending in "/" is a folder marker (a console's "Create folder", rclone), not a file.
        return {
            path: info
            for path, info in found.items()
            if info["type"] != "directory" and not path.endswith("/") and matches(path)
        }

    def _local_files(self, base: str, depth: int | None, matches: Callable[[str], bool]) -> dict[str, Any]:
        """The files under `base` that `matches` takes, into linked folders as into real ones, each as
        `info` describes it: a linked file by its target (the link's own inode and times never change as
        the target is rewritten), and a link whose target is gone named in a warning, not listed."""
        found = {}
        for path in _walk_into_links(base, depth):
            if matches(path) and (info := self._target_info(path)) and info["type"] == "file":
                found[path] = info
        return found

    def _target_info(self, path: str) -> dict[str, Any] | None:
        """fsspec's info of a local path, a link's of its target; None where there is none to read."""
        try:
            return self.fs.info(path)
        except OSError as exc:
            if os.path.islink(path):
                target = os.readlink(path)
                log.warning(f"{self.display()}: not listed, {self.key_of(path)}: a link to {target} ({exc.strerror})")
            elif not isinstance(exc, FileNotFoundError):  # else removed since the folder was read
                raise
            return None

    def info(self, key: str) -> ObjectInfo:
        self.fs.invalidate_cache()
        return self._info(self.path(key), self.fs.info(self.path(key)))

    def _info(self, path: str, info: dict[str, Any]) -> ObjectInfo:
        etag = info.get("ETag") or info.get("etag") or local_identity(info)
        # The first present, not the first true: a file dated 1970 (mtime 0) keeps its own time.
        mtime = next((info[k] for k in ("mtime", "LastModified", "created") if info.get(k) is not None), None)
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        return ObjectInfo(
            key=self.key_of(path),
            size=int(info.get("size") or 0),
            etag=etag.strip('"') if etag else None,
            mtime=float(mtime) if mtime is not None else None,
        )

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache()
        return self.fs.exists(self.path(key))

    def is_object(self, key: str) -> bool:
        """An object (a file), not a prefix (a folder)."""
        self.fs.invalidate_cache()
        return self.fs.isfile(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object whole: an S3 PUT is atomic, and a local write goes through a rename."""
        if self.protocol == "file":
            self._write_locally(key, lambda tmp: tmp.write_bytes(data), durable=True)
        else:
            self.fs.pipe_file(self.path(key), data)

    def copy(self, source: str, target: str) -> None:
        """One object to another key, whole: on S3 by the server (no bytes through this process), locally
        through a rename. Never a hard link: a later write to either key would change both."""
        if self.protocol == "file":
            self._write_locally(target, lambda tmp: shutil.copyfile(self.path(source), tmp))
        else:
            self.fs.cp_file(self.path(source), self.path(target))  # not copy(), which globs: a key may hold [ ]

    def copy_many(self, pairs: list[tuple[str, str]], threads: int = 16) -> list[bool]:
        """Each (source, target) copied, several at once (requests to the store, not CPU work): True where
        it was, False where its source is gone (removed meanwhile)."""

        def copied(pair: tuple[str, str]) -> bool:
            try:
                self.copy(*pair)
            except FileNotFoundError:
                return False
            return True

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(copied, pairs))

    def _write_locally(self, key: str, write: Callable[[Path], Any], durable: bool = False) -> None:
        """Whole (`written_whole`). `durable` not for copies of parts: the workers' own writes are not durable
        either, and the disk would wait for their every byte (48 copies of 16 MiB: 0.18 s, 0.43 s flushed)."""
        with written_whole(Path(self.path(key)), durable) as tmp:
            write(tmp)

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, value: Any) -> None:
        self.write_bytes(key, json_bytes(value))

    def update_json(self, key: str, change: Callable[[Any], Any], attempts: int = 10) -> Any:
        """`update_object` for a JSON object: `change` gets it parsed (None where absent); returns what it
        wrote."""
        made: list[Any] = []

        def changed(body: bytes | None) -> bytes:
            made[:] = [change(None if body is None else json.loads(body))]
            return json_bytes(made[0])

        self.update_object(key, changed, attempts)
        return made[0]

    def update_object(self, key: str, change: Callable[[bytes | None], bytes], attempts: int = 10) -> None:
        """Replace one small object with `change(current)` (None where absent), losing no update that another
        writer makes the same way meanwhile; `change` may run several times, and what it raises stops the
        update. On S3 a conditional PUT (If-Match the ETag that came with the body read, If-None-Match where
        absent), read and changed again on a conflict. Locally under an exclusive lock on `.<name>.lock`
        beside it, where the filesystem has flock."""
        if self.protocol == "file":
            target = Path(self.path(key))
            target.parent.mkdir(parents=True, exist_ok=True)
            beside = target.with_name(f".{target.name}.lock")
            beside.touch()
            fd = open_to_lock(beside)
            try:
                if fd is not None:
                    lock(fd, fcntl.LOCK_EX)  # released as the descriptor closes
                self.write_bytes(key, change(target.read_bytes() if target.exists() else None))
                return
            finally:
                if fd is not None:
                    os.close(fd)
        bucket, name, _ = self.fs.split_path(self.path(key))
        for attempt in range(attempts):
            try:
                etag, body = sync(self.fs.loop, _get_object, self.fs, bucket, name)
            except FileNotFoundError:
                etag, body = None, None
            if body is not None and not etag:
                raise OSError(f"{self.display()}: {key} came without an ETag, so it cannot be replaced conditionally")
            data, condition = change(body), {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=name, Body=data, **condition)
                return
            except OSError as exc:
                code = _error_code(exc)
                if code == "NotImplemented":
                    raise OSError(
                        f"{self.display()} refused a conditional PUT ({code}): its pointers and manifests need "
                        "If-Match and If-None-Match on PUT (AWS S3 and SeaweedFS have them)"
                    ) from exc
                if code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise
            finally:
                self.fs.invalidate_cache(self.path(key))
            time.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))  # writers that collided spread out
        raise RuntimeError(f"{self.url(key)} changed under each of {attempts} conditional writes")

    def remove_empty_folder(self, key: str) -> None:
        """The folder at `key` if it holds nothing: on a local store, deleting the objects under a prefix
        leaves its folder behind (S3 has no folders). Best effort, that one folder alone: one that holds
        anything, or that another run is filling, stays."""
        if self.protocol == "file":
            with contextlib.suppress(OSError):
                os.rmdir(self.path(key))

    def delete(self, key: str) -> None:
        """Remove an object or everything under a prefix; missing is fine. By name, never by fsspec's `rm`,
        which globs the path: a root or key holding `[ ]` failed every publish on S3, and one holding `*`
        deleted another deployment's objects."""
        path = self.path(key)
        if self.protocol == "file":
            if not key.strip("/"):  # the root: what it holds (it may be a link to another disk)
                for name in os.listdir(path) if os.path.isdir(path) else []:
                    self.delete(name)
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, onerror=_unless_missing)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            return
        self.fs.invalidate_cache()
        bucket, name, _ = self.fs.split_path(path)
        # What is under `path/`, and the object at `path` itself (find lists it only where nothing is under
        # it); for the root, only what is under it: an object named as the root is beside the store.
        itself = [name] if key.strip("/") else []
        names = [n for n in dict.fromkeys([self.fs.split_path(f)[1] for f in self.fs.find(path)] + itself) if n]
        for start in range(0, len(names), 1000):  # DeleteObjects takes 1,000 keys at most
            batch = [{"Key": name} for name in names[start : start + 1000]]
            response = self.fs.call_s3("delete_objects", Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
            if errors := response.get("Errors"):
                raise OSError(f"{self.display()}: could not delete {len(errors)} object(s) under {key}: {errors[0]}")
        self.fs.invalidate_cache()

    def upload(self, local_path: str | Path, key: str) -> None:
        if self.protocol == "file":
            Path(self.path(key)).parent.mkdir(parents=True, exist_ok=True)
        self.fs.put_file(str(local_path), self.path(key))

    def display(self) -> str:
        """A description safe for logs and metadata: never the credentials."""
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"{self.url()}{where}"


@contextlib.contextmanager
def written_whole(target: Path, durable: bool = False, folder: Path | None = None) -> Iterator[Path]:
    """A file to write, in `folder` (beside `target` where none is given or it is on another disk), renamed
    over `target` once the block ends: a reader (or another writer of the same bytes) never meets it cut
    short, and a failed write leaves no temporary file (a killed one leaves it in `folder`). `durable`: on
    disk before the rename, so that after a node's crash a pointer or manifest holds its old bytes or its
    new ones, never none (XFS, unlike ext4, does not flush a file renamed over another)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = folder or target.parent
    folder.mkdir(parents=True, exist_ok=True)
    if folder.stat().st_dev != target.parent.stat().st_dev:  # a rename cannot cross disks (a linked `_staging`)
        folder = target.parent
    tmp = folder / f".{target.name}.tmp-{uuid.uuid4().hex}"  # unique across the hosts sharing the disk
    try:
        yield tmp
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        tmp.replace(target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def fixed_folders(pattern: str) -> tuple[list[str], int | None]:
    """The folders every match of a glob lies in (its leading segments without a wildcard), and the levels
    below them that can match (None: any). A listing starts there: from the landing zone's top, the files
    of an `archive/` beside `incoming/*.csv` were listed too, a request per thousand keys every tick."""
    segments = pattern.split("/")
    folders = list(itertools.takewhile(lambda segment: not glob.has_magic(segment), segments[:-1]))
    return folders, None if "**" in pattern else len(segments) - len(folders)


def _raise_unless_missing(exc: Exception) -> None:
    """A folder not there lists nothing; any other failure (a refused listing) is raised."""
    if not isinstance(exc, FileNotFoundError):
        raise exc


def _walk_into_links(base: str, depth: int | None) -> Iterator[str]:
    """Every file's path under `base`, to `depth` levels (None: all), into linked folders as `ls -RL` goes
    (a landing zone linking a shared data area in); a link to a folder above it, a loop, is not followed."""
    above: dict[str, frozenset[tuple[int, int]]] = {base: frozenset()}
    for folder, folders, files in os.walk(base, followlinks=True):
        try:
            found = os.stat(folder)
        except FileNotFoundError:  # removed since its parent was read
            continue
        chain = above.pop(folder)
        if (found.st_dev, found.st_ino) in chain:
            folders.clear()
            continue
        chain |= {(found.st_dev, found.st_ino)}
        if depth is not None and folder.count(os.sep) - base.count(os.sep) + 1 >= depth:
            folders.clear()  # their files would lie deeper than `depth`
        above.update((os.path.join(folder, name), chain) for name in folders)
        yield from (os.path.join(folder, name) for name in files)


def _unless_missing(function: Callable[..., Any], path: str, exc_info: Any) -> None:
    """rmtree's error handler: what another process removed meanwhile is fine."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def aifactory_home() -> Path:
    return Path(os.environ.get("AIFACTORY_HOME", ".aifactory")).resolve()


def _levels(site: str) -> tuple[str, str]:
    """The prefixes of a site's S3 variables: its own level, then the shared one."""
    return f"AIFACTORY_{site.upper()}_S3_", "AIFACTORY_S3_"


def _env(site: str, name: str) -> str | None:
    """The site-specific variable `AIFACTORY_<SITE>_<NAME>` if set, else the shared `AIFACTORY_<NAME>`."""
    for var in (f"AIFACTORY_{site.upper()}_{name}", f"AIFACTORY_{name}"):
        if os.environ.get(var):
            return var
    return None


def credential_vars(site: str, endpoint_var: str | None) -> tuple[str | None, str | None]:
    """The variables holding the key and the secret: a pair from one level, the site's or the shared one.
    The shared pair belongs to the shared endpoint: it never signs requests to another server that a site
    names as its own (where it would fail mid-run, or work where no one meant it to, and hand that server
    the key id and requests signed with it), and a key never goes with another level's secret. Neither
    level set: none, and the endpoint's client looks for its own (an IAM role, say)."""
    levels = _levels(site)
    for level in levels:
        names = (f"{level}KEY", f"{level}SECRET")
        present = [name for name in names if os.environ.get(name)]
        if not present:
            continue
        if len(present) == 1:
            missing = next(name for name in names if name not in present)
            raise ValueError(f"{present[0]} is set but {missing} is not: a key and its secret are set together")
        if level == levels[1] and endpoint_var == f"{levels[0]}ENDPOINT" and not _same_server(endpoint_var):
            raise ValueError(
                f"{endpoint_var} names a server of the {site} site's own, and only the shared credentials "
                f"(AIFACTORY_S3_KEY, AIFACTORY_S3_SECRET) are set: set {levels[0]}KEY and {levels[0]}SECRET; "
                "shared credentials are never sent to a site's own endpoint"
            )
        return names
    return None, None


def credentials_named(site: str) -> str:
    """Where the environment gives `site` its key and secret, for error messages: names, never values."""
    try:
        key_var, secret_var = credential_vars(site, _env(site, "S3_ENDPOINT"))
    except ValueError as exc:  # an environment changed since the code location loaded: say so, hide nothing
        return f"unclear ({exc})"
    if key_var:
        return f"{key_var} and {secret_var}"
    return (
        f"none of AIFACTORY_{site.upper()}_S3_KEY/_SECRET and AIFACTORY_S3_KEY/_SECRET (the client then looks for "
        "its own: AWS_* variables, ~/.aws, an IAM role)"
    )


def _same_server(endpoint_var: str) -> bool:
    """A site's endpoint variable that repeats the shared endpoint."""
    shared = os.environ.get("AIFACTORY_S3_ENDPOINT", "")
    return bool(shared) and os.environ[endpoint_var].rstrip("/") == shared.rstrip("/")


SETTINGS = ("ENDPOINT", "BUCKET", "PREFIX", "KEY", "SECRET", "REGION")
# A name of either level: the shared AIFACTORY_S3_<SETTING> (no site), or a site's AIFACTORY_<SITE>_S3_<SETTING>
# (a site id may be `s3` or begin with `s3_`: AIFACTORY_S3_S3_KEY is a site's key, not a misspelling).
_S3_VARIABLE = re.compile(rf"AIFACTORY_(?:(?P<site>.+)_)?S3_(?P<setting>{'|'.join(SETTINGS)})")


def _s3_variables() -> list[re.Match[str]]:
    """The S3 settings the environment sets, of either level."""
    return [found for name, value in os.environ.items() if value and (found := _S3_VARIABLE.fullmatch(name))]


def refuse_s3_variables_of_no_site(sites: list[str]) -> None:
    """A site's settings under a misspelt site id (AIFACTORY_LINKOEPING_S3_BUCKET) are read by no store: the
    site meant stays on the local disk unsaid, and the name counted as a site on S3 where shared settings
    are judged. Any AIFACTORY_<X>_S3_<SETTING> whose X is no site of the catalogue fails the load."""
    strays = sorted(found[0] for found in _s3_variables() if found["site"] and found["site"].lower() not in sites)
    if strays:
        raise ValueError(
            f"{', '.join(strays)}: no site of the catalogue is named so (its sites: {', '.join(sorted(sites))}); "
            "a store reads AIFACTORY_<SITE>_S3_<SETTING>"
        )


def object_stores_for(buckets: dict[str, str]) -> dict[str, ObjectStore]:
    """Every site's store, by site id (`buckets`: each site's bucket in the catalogue)."""
    refuse_s3_variables_of_no_site(list(buckets))
    return {site: object_store_for(site, bucket) for site, bucket in buckets.items()}


def refuse_unknown_s3_variables(site: str) -> None:
    """A misspelt setting (AIFACTORY_S3_ENDPOINT_URL) would be ignored and the site's data go elsewhere
    unsaid: a set name under the site's or the shared prefix that names no setting fails the load."""
    unknown = sorted(
        name
        for name, value in os.environ.items()
        if value and name.startswith(_levels(site)) and not _S3_VARIABLE.fullmatch(name)
    )
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: no such setting of the {site} site's store; it reads "
            f"AIFACTORY_{site.upper()}_S3_<SETTING> and AIFACTORY_S3_<SETTING>, <SETTING> one of {', '.join(SETTINGS)}"
        )


def refuse_settings_of_a_local_store(site: str) -> None:
    """For a site with neither endpoint nor bucket (a local store): its own S3 settings, which would be
    ignored, fail the load. So do shared ones that no site's store uses (no endpoint or bucket is set at
    all); where some site names its own, the shared key, prefix or region may be that site's."""
    site_level, shared = _levels(site)
    ignored = [f"{site_level}{s}" for s in SETTINGS if os.environ.get(f"{site_level}{s}")]
    if not any(found["setting"] in ("ENDPOINT", "BUCKET") for found in _s3_variables()):
        ignored += [f"{shared}{s}" for s in SETTINGS if os.environ.get(f"{shared}{s}")]
    if ignored:
        raise ValueError(
            f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} set, but no endpoint ({site_level}ENDPOINT "
            f"or {shared}ENDPOINT) or bucket ({site_level}BUCKET or {shared}BUCKET) is: the {site} site's store "
            f"would be the local directory {aifactory_home() / site}, ignoring them. Set the endpoint or bucket, "
            "or unset them"
        )


# A bucket's name as S3-compatible servers take it: AWS's rules (the catalogue's) and the looser older ones
# (capitals, `_`) that buckets made before 2018 and some servers (Ceph's relaxed names) still have.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def bucket_named(var: str) -> str:
    """The bucket an `S3_BUCKET` variable names, without the slashes around it (as the prefix's): `bucket/`
    made a root `bucket//site`, whose keys began with "/" and whose listings held none of them. A URL
    (`s3://bucket`) or a prefix fails the load: its paths would name no object."""
    bucket = os.environ[var].strip("/")
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(
            f"{var} is not a bucket name (letters, digits, '.', '-', '_'): give the bucket alone, without s3:// "
            f"or an endpoint, and a prefix inside it in {var.removesuffix('BUCKET')}PREFIX"
        )
    return bucket


def object_store_for(site: str, bucket: str) -> ObjectStore:
    """The store the environment configures for `site`: S3 when an endpoint or bucket is set, else local.

    Variables (site-specific `AIFACTORY_<SITE>_...` wins over the shared `AIFACTORY_...`):
    `S3_ENDPOINT`, `S3_BUCKET` (default: the catalogue's bucket), `S3_PREFIX`, `S3_KEY`, `S3_SECRET`,
    `S3_REGION`. Credentials go in as `dg.EnvVar`, so the UI and the run config show only their names;
    see `credential_vars` for where they may come from. A setting the store would ignore fails instead.
    """
    refuse_unknown_s3_variables(site)
    endpoint, bucket_var = _env(site, "S3_ENDPOINT"), _env(site, "S3_BUCKET")
    if not (endpoint or bucket_var):
        refuse_settings_of_a_local_store(site)
        return ObjectStore(site=site, root=str(aifactory_home() / site))
    bucket = bucket_named(bucket_var) if bucket_var else bucket
    prefix_var = _env(site, "S3_PREFIX")
    prefix = os.environ[prefix_var].strip("/") if prefix_var else ""
    # A bucket shared by several sites keeps each site under its own prefix.
    shared_bucket = bucket_var is not None and bucket_var == "AIFACTORY_S3_BUCKET"
    parts = [bucket, prefix, site if shared_bucket else ""]
    key_var, secret_var = credential_vars(site, endpoint)
    region_var = _env(site, "S3_REGION")
    return ObjectStore(
        site=site,
        protocol="s3",
        root="/".join(p for p in parts if p),
        endpoint_url=dg.EnvVar(endpoint) if endpoint else None,
        access_key_id=dg.EnvVar(key_var) if key_var else None,
        secret_access_key=dg.EnvVar(secret_var) if secret_var else None,
        region=os.environ[region_var] if region_var else None,
    )
