"""ObjectStore against a local directory and a real S3 server (moto on 127.0.0.1): one code path."""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pytest
import s3fs

from aifactory_assets.catalog import Catalog
from aifactory_assets.definitions import build_definitions
from aifactory_assets.factory import naming_refusals, store_key
from aifactory_assets.parquet_io import open_whole, read_parquet, write_parquet
from aifactory_assets.staging import read_batches, write_batches
from resources import ObjectStore, object_store_for
from resources.object_store import credentials_named, filesystem_of
from tests.conftest import S3_KEY, S3_SECRET, local_stores, s3_stores

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(stores: dict[str, ObjectStore]) -> ObjectStore:
    return stores["kajaani"]


def test_write_read_list_delete(store: ObjectStore) -> None:
    store.write_bytes("landing/demo/a.csv", b"x,y\n1,2\n")
    store.write_bytes("landing/demo/sub/b.csv", b"x,y\n3,4\n")
    store.write_json("landing/demo/meta.json", {"n": 2})

    assert store.read_bytes("landing/demo/a.csv") == b"x,y\n1,2\n"
    assert store.read_json("landing/demo/meta.json") == {"n": 2}
    assert [o.key for o in store.list_objects("landing/demo", "*.csv")] == ["landing/demo/a.csv"]
    assert [o.key for o in store.list_objects("landing/demo", "**/*.csv")] == [
        "landing/demo/a.csv",
        "landing/demo/sub/b.csv",
    ]
    info = store.info("landing/demo/a.csv")
    assert info.size == 8 and (info.etag or info.mtime)

    store.delete("landing/demo/sub")
    assert not store.exists("landing/demo/sub/b.csv")
    assert store.exists("landing/demo/a.csv")


def test_json_is_strict_for_every_reader(store: ObjectStore) -> None:
    store.write_json("reports/x.json", {"mean": float("nan"), "values": [1.5, float("inf")]})
    assert b"NaN" not in store.read_bytes("reports/x.json") and b"Infinity" not in store.read_bytes("reports/x.json")
    assert store.read_json("reports/x.json") == {"mean": None, "values": [1.5, None]}


def test_a_relative_local_root_lists_keys(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = ObjectStore(site="kajaani", root="stores/kajaani")  # as a hand-written config might say
    store.write_bytes("landing/demo/a.csv", b"x\n1\n")
    assert [o.key for o in store.list_objects("landing/demo", "*.csv")] == ["landing/demo/a.csv"]


def test_a_root_with_glob_characters_lists_keys(tmp_path) -> None:
    """AIFACTORY_HOME or S3_PREFIX may hold [ ] * ?: only the pattern is a glob, not the root."""
    store = ObjectStore(site="kajaani", root=str(tmp_path / "home[1]" / "kajaani"))
    store.write_bytes("landing/demo/a.csv", b"x\n1\n")
    assert [o.key for o in store.list_objects("landing/demo", "*.csv")] == ["landing/demo/a.csv"]


def beside(store: ObjectStore, root: str) -> ObjectStore:
    """A store like `store` (same backend, bucket, credentials) under another root beside its own."""
    parent = store.root.rsplit("/", 1)[0]
    return ObjectStore(
        site=store.site,
        protocol=store.protocol,
        root=f"{parent}/{root}",
        endpoint_url=store.endpoint_url,
        access_key_id=store.access_key_id,
        secret_access_key=store.secret_access_key,
    )


def test_delete_takes_root_and_key_as_written(store: ObjectStore) -> None:
    """fsspec's rm globs its path: on S3 a root holding [ ] failed every delete (and so every publish), and
    one holding * deleted another deployment's objects under the same names."""
    mine, theirs = beside(store, "team*/kajaani"), beside(store, "team-b/kajaani")
    for each in (mine, theirs):
        each.write_bytes("shards/d/v=abc/train-00000-of-00001.parquet", b"x")
    mine.delete("shards/d/v=abc")
    assert not mine.exists("shards/d/v=abc/train-00000-of-00001.parquet")
    assert theirs.read_bytes("shards/d/v=abc/train-00000-of-00001.parquet") == b"x"
    bracketed = beside(store, "proj[1]/kajaani")
    for key in ("raw/d/run=a/part-00000.parquet", "raw/d/run=a/w[1].csv", "raw/d/w[1].csv"):
        bracketed.write_bytes(key, b"x")
    bracketed.delete("raw/d/run=a")
    bracketed.delete("raw/d/w[1].csv")
    bracketed.delete("raw/d/never-written")
    assert not bracketed.list_objects("raw/d")
    if store.protocol == "s3":  # an object whose key is also a prefix (local files cannot be both)
        store.write_bytes("raw/both", b"x")
        store.write_bytes("raw/both/child", b"x")
        store.delete("raw/both")
        assert not store.list_objects("raw")
        beside_root = beside(store, "")  # the bucket's own root: an object named as this store's root
        beside_root.write_bytes(store.root.rsplit("/", 1)[1], b"not the store's")
        store.write_bytes("raw/d/a", b"x")
        store.delete("")
        assert not store.list_objects("") and beside_root.read_bytes(store.root.rsplit("/", 1)[1])


def test_deleting_a_local_root_that_is_a_link_keeps_the_link(tmp_path: Path) -> None:
    """AIFACTORY_HOME linked to a bigger disk: emptying the store empties that disk's folder, and later
    writes still go there (removing the link made a plain folder in its place)."""
    (tmp_path / "disk").mkdir()
    (tmp_path / "home").symlink_to(tmp_path / "disk")
    store = ObjectStore(site="kajaani", root=str(tmp_path / "home"))
    store.write_bytes("landing/d/a.csv", b"x\n1\n")
    store.delete("")
    assert (tmp_path / "home").is_symlink() and list((tmp_path / "disk").iterdir()) == []


def test_colons_in_a_landed_name_are_part_of_the_name(store: ObjectStore) -> None:
    """fsspec's url_to_fs read `sensor-fe80::1.csv` as a chain of filesystems: the whole raw step failed."""
    from aifactory_assets.parquet_io import read_bytes, read_parquet, write_parquet

    store.write_bytes("landing/d/sensor-fe80::1.csv", b"x\n1\n")
    assert [o.key for o in store.list_objects("landing/d")] == ["landing/d/sensor-fe80::1.csv"]
    assert read_bytes(store.url("landing/d/sensor-fe80::1.csv"), store.storage_options) == b"x\n1\n"
    table = pa.table({"x": [1, 2]})
    write_parquet(table, store.url("raw/d/fe80::1.parquet"), store.storage_options)
    assert read_parquet(store.url("raw/d/fe80::1.parquet"), store.storage_options).equals(table)


def test_folder_markers_are_not_landed_files(stores: dict[str, ObjectStore]) -> None:
    """Zero-byte keys ending in "/" (a console's "Create folder", rclone) are folders, not files to read."""
    store = stores["kajaani"]
    if store.protocol == "s3":
        bucket, base = store.root.split("/", 1)
        for key in ("landing/d/", "landing/d/2024/"):
            store.fs.call_s3("put_object", Bucket=bucket, Key=f"{base}/{key}", Body=b"")
    else:
        Path(store.path("landing/d/2024")).mkdir(parents=True)
    store.write_bytes("landing/d/2024/a.csv", b"x\n1\n")
    assert [o.key for o in store.list_objects("landing/d", "**")] == ["landing/d/2024/a.csv"]


def test_a_failed_local_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    store.write_bytes("shards/d/_latest/held", b"x")  # `_latest` is a folder: the rename over it fails
    with pytest.raises(OSError):
        store.write_bytes("shards/d/_latest", b"{}")
    assert sorted(p.name for p in (tmp_path / "shards" / "d").iterdir()) == ["_latest"]


def test_a_file_dated_1970_keeps_its_time(tmp_path: Path) -> None:
    """mtime 0 is a time: read as missing, the change time stood in, and a chmod changed the fingerprint."""
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    store.write_bytes("landing/d/a.csv", b"x\n1\n")
    os.utime(store.path("landing/d/a.csv"), (0, 0))
    assert store.info("landing/d/a.csv").mtime == 0.0


def test_fingerprint_changes_when_object_changes(store: ObjectStore) -> None:
    store.write_bytes("landing/demo/a.csv", b"x\n1\n")
    before = store.info("landing/demo/a.csv").fingerprint()
    store.write_bytes("landing/demo/a.csv", b"x\n1\n2\n")
    assert store.info("landing/demo/a.csv").fingerprint() != before


def test_url_points_at_the_object(store: ObjectStore) -> None:
    store.write_bytes("shards/x/manifest.json", b"{}")
    url = store.url("shards/x/manifest.json")
    assert url.startswith("s3://" if store.protocol == "s3" else "/")
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **store.storage_options)
    assert fs.cat_file(path) == b"{}"


def test_display_never_shows_the_secret(store: ObjectStore) -> None:
    assert S3_SECRET not in store.display()
    assert S3_SECRET not in repr(store) and S3_SECRET not in str(store)  # a resource printed in a log


def test_environment_selects_local_or_s3(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for var in ("AIFACTORY_S3_ENDPOINT", "AIFACTORY_S3_BUCKET", "AIFACTORY_ATHENS_S3_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AIFACTORY_HOME", str(tmp_path))
    local = object_store_for("athens", "aifactory-athens")
    assert local.protocol == "file" and local.root == str(tmp_path / "athens")

    monkeypatch.setenv("AIFACTORY_ATHENS_S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AIFACTORY_ATHENS_S3_KEY", "k")
    monkeypatch.setenv("AIFACTORY_ATHENS_S3_SECRET", S3_SECRET)
    s3 = object_store_for("athens", "aifactory-athens")
    # Credentials are EnvVars: the resource's config (what the UI shows) holds their names only.
    assert (s3.protocol, s3.root, s3.secret_access_key) == ("s3", "aifactory-athens", "AIFACTORY_ATHENS_S3_SECRET")
    resolved = s3.process_config_and_initialize()
    assert resolved.secret_access_key == S3_SECRET and resolved.endpoint_url == "http://127.0.0.1:9"

    monkeypatch.setenv("AIFACTORY_S3_BUCKET", "shared")
    assert object_store_for("athens", "aifactory-athens").root == "shared/athens"


def test_credentials_stay_with_their_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared pair goes to the shared endpoint (and sites on it) only; a key never pairs with another
    level's secret. Each refusal names the variables to set, never a value."""
    shared = {"AIFACTORY_S3_ENDPOINT": "http://shared:9000", "AIFACTORY_S3_KEY": "k", "AIFACTORY_S3_SECRET": S3_SECRET}
    for name, value in shared.items():
        monkeypatch.setenv(name, value)
    assert object_store_for("athens", "b").secret_access_key == "AIFACTORY_S3_SECRET"
    monkeypatch.setenv("AIFACTORY_ATHENS_S3_BUCKET", "athens-own")  # its own bucket on the shared server
    assert object_store_for("athens", "b").secret_access_key == "AIFACTORY_S3_SECRET"
    monkeypatch.setenv("AIFACTORY_ATHENS_S3_ENDPOINT", "http://shared:9000/")  # the same server, spelt again
    assert object_store_for("athens", "b").secret_access_key == "AIFACTORY_S3_SECRET"

    monkeypatch.setenv("AIFACTORY_ATHENS_S3_ENDPOINT", "http://athens:9000")
    with pytest.raises(ValueError, match="set AIFACTORY_ATHENS_S3_KEY and AIFACTORY_ATHENS_S3_SECRET") as refused:
        object_store_for("athens", "b")
    assert S3_SECRET not in str(refused.value)
    assert object_store_for("bologna", "b").secret_access_key == "AIFACTORY_S3_SECRET"  # other sites unaffected

    monkeypatch.setenv("AIFACTORY_ATHENS_S3_KEY", "athens-key")  # its secret left to the shared one
    with pytest.raises(ValueError, match="AIFACTORY_ATHENS_S3_KEY is set but AIFACTORY_ATHENS_S3_SECRET is not"):
        object_store_for("athens", "b")
    monkeypatch.setenv("AIFACTORY_ATHENS_S3_SECRET", "athens-secret")
    store = object_store_for("athens", "b").process_config_and_initialize()
    assert (store.access_key_id, store.secret_access_key) == ("athens-key", "athens-secret")

    assert credentials_named("athens") == "AIFACTORY_ATHENS_S3_KEY and AIFACTORY_ATHENS_S3_SECRET"  # for errors
    monkeypatch.delenv("AIFACTORY_S3_SECRET")
    assert credentials_named("bologna").startswith("unclear (AIFACTORY_S3_KEY is set but")  # an error's aside
    with pytest.raises(ValueError, match="AIFACTORY_S3_KEY is set but AIFACTORY_S3_SECRET is not"):
        object_store_for("bologna", "b")


IGNORED = "are set, but no endpoint (AIFACTORY_ATHENS_S3_ENDPOINT or AIFACTORY_S3_ENDPOINT) or bucket"


@pytest.mark.parametrize(
    ("environment", "refusal"),
    [
        ({"AIFACTORY_ATHENS_S3_KEY": "key-id-1", "AIFACTORY_ATHENS_S3_SECRET": S3_SECRET}, f"_S3_SECRET {IGNORED}"),
        ({"AIFACTORY_S3_PREFIX": "pre-1", "AIFACTORY_S3_REGION": "eu-1"}, "_S3_PREFIX, AIFACTORY_S3_REGION are set"),
        ({"AIFACTORY_S3_ENDPOINT_URL": "http://s3:9000", "AIFACTORY_S3_SECRET": S3_SECRET}, "ENDPOINT_URL: no such"),
        ({"AIFACTORY_S3_ENDPOINT": "http://s3:9000", "AIFACTORY_S3_REGOIN": "eu-1"}, "_REGOIN: no such setting"),
        ({"AIFACTORY_KAJAANI_S3_BUKCET": "bucket-1"}, "AIFACTORY_KAJAANI_S3_BUKCET: no such setting of the kajaani"),
        (  # a misspelt site: its store would stay local, and the shared key unused
            {"AIFACTORY_LINKOEPING_S3_BUCKET": "b-1", "AIFACTORY_S3_KEY": "key-1", "AIFACTORY_S3_SECRET": S3_SECRET},
            "AIFACTORY_LINKOEPING_S3_BUCKET: no site of the catalogue is named so",
        ),
        (
            {"AIFACTORY_LINKOEPING_S3_ENDPOINT": "http://s3:9000", "AIFACTORY_LINKOEPING_S3_BUCKET": "bucket-1"},
            "AIFACTORY_LINKOEPING_S3_BUCKET, AIFACTORY_LINKOEPING_S3_ENDPOINT: no site",
        ),
    ],
)
def test_settings_the_store_would_ignore_fail_the_load(
    monkeypatch: pytest.MonkeyPatch, catalog: Catalog, environment: dict[str, str], refusal: str
) -> None:
    """A key without an endpoint, or a misspelt name, would leave a site on the local disk unsaid: the code
    location refuses to load, naming the variables, never their values."""
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(refusal)) as refused:
        build_definitions(catalog)
    assert not any(value in str(refused.value) for value in environment.values())


def test_shared_settings_a_site_of_its_own_bucket_uses_load(monkeypatch: pytest.MonkeyPatch, catalog: Catalog) -> None:
    """The shared key may serve one site's own bucket while the others stay local."""
    for name in ("AIFACTORY_S3_KEY", "AIFACTORY_S3_SECRET", "AIFACTORY_S3_REGION"):
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("AIFACTORY_KAJAANI_S3_BUCKET", "kajaani-own")
    defs = build_definitions(catalog)
    kajaani, athens = (defs.resources[store_key(site)] for site in ("kajaani", "athens"))
    assert (kajaani.protocol, kajaani.secret_access_key, athens.protocol) == ("s3", "AIFACTORY_S3_SECRET", "file")


def test_copy_is_whole_and_takes_keys_as_written(store: ObjectStore) -> None:
    """A key with glob characters names itself (fs.copy would glob it); a missing source says so."""
    store.write_bytes("raw/x/run=a[1]/part-00000.parquet", b"PAR1 bytes")
    store.copy("raw/x/run=a[1]/part-00000.parquet", "raw/x/run=b/part-00003.parquet")
    assert store.read_bytes("raw/x/run=b/part-00003.parquet") == b"PAR1 bytes"
    with pytest.raises(FileNotFoundError):
        store.copy("raw/x/run=gone/part-00000.parquet", "raw/x/run=b/part-00004.parquet")
    assert not store.exists("raw/x/run=b/part-00004.parquet")


def test_a_shard_is_there_only_whole_and_a_failed_write_leaves_the_one_before(store: ObjectStore) -> None:
    """Another deployment writing the same version writes over shards a reader may be reading: the old
    bytes until the new ones are all there, and the old ones still where its write fails (s3fs's own
    `with` would have uploaded what came before the error)."""
    key, url = "shards/d/v=1/train-00000-of-00001.parquet", store.url("shards/d/v=1/train-00000-of-00001.parquet")
    writing = store.url("shards/d/_staging/1/run/writing")
    store.write_bytes(key, b"old bytes")
    with pytest.raises(RuntimeError, match="the writer fails"), open_whole(url, store.storage_options, writing) as f:
        f.write(b"new bytes, cut short")
        raise RuntimeError("the writer fails")
    assert store.read_bytes(key) == b"old bytes"
    with open_whole(url, store.storage_options, writing) as f:
        f.write(b"new bytes")
        assert store.read_bytes(key) == b"old bytes"
    assert store.read_bytes(key) == b"new bytes"
    assert [o.key for o in store.list_objects("shards/d", "**")] == [key]  # no temporary file left
    if store.protocol == "s3":
        bucket = store.root.split("/")[0]
        assert store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", []) == []


def test_a_shard_write_killed_outright_leaves_its_file_in_the_staging(tmp_path: Path) -> None:
    """A worker killed mid-write (out of memory, a lost node) cleans nothing up: what it wrote stays in
    the run's staging, which the run or the next one removes, not hidden in a version's folder for good."""
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    url, writing = store.url("shards/d/v=1/train-00000-of-00001.parquet"), store.url("shards/d/_staging/1/run/writing")
    killed = (
        "import os, sys\n"
        "from aifactory_assets.parquet_io import open_whole\n"
        "with open_whole(sys.argv[1], {}, sys.argv[2]) as f:\n"
        "    f.write(b'half a shard'); f.flush(); os._exit(9)\n"
    )
    done = subprocess.run([sys.executable, "-c", killed, url, writing], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    assert [o.key for o in store.list_objects("shards/d/v=1", "**")] == []
    [left] = store.list_objects("shards/d/_staging", "**")
    assert left.key.startswith("shards/d/_staging/1/run/writing/.train-00000-of-00001.parquet.tmp-")


def test_a_staging_on_another_disk_still_writes_shards_whole(tmp_path: Path) -> None:
    """`_staging` linked to node-local scratch (the README calls it as large as the data): a rename from there
    into the version's folder cannot cross disks, so the temporary file goes beside the shard instead."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own, which this machine does not have")
    scratch = Path(tempfile.mkdtemp(dir=shm))
    try:
        store = ObjectStore(site="kajaani", root=str(tmp_path))
        (tmp_path / "shards" / "d").mkdir(parents=True)
        (tmp_path / "shards" / "d" / "_staging").symlink_to(scratch)
        url = store.url("shards/d/v=1/train-00000-of-00001.parquet")
        with open_whole(url, store.storage_options, store.url("shards/d/_staging/1/run/writing")) as f:
            f.write(b"shard bytes")
        assert store.read_bytes("shards/d/v=1/train-00000-of-00001.parquet") == b"shard bytes"
        assert [p.name for p in (tmp_path / "shards" / "d" / "v=1").iterdir()] == ["train-00000-of-00001.parquet"]
    finally:
        shutil.rmtree(scratch)


@pytest.mark.parametrize("fails_at", ["the abort", "the completion"])
def test_a_large_shard_whose_upload_fails_leaves_the_one_before(
    s3_store: ObjectStore, monkeypatch: pytest.MonkeyPatch, fails_at: str
) -> None:
    """A multipart upload that fails once parts are up, and whose abort fails too (one network drop), or
    that fails as it completes: the shard before stays, even once the file is collected (fsspec's finaliser
    closes it, which completed the upload with the parts up), the write's own error is the one raised, and
    a completion that fails leaves no upload open (parts stored and billed)."""
    options = {**s3_store.storage_options, "default_block_size": 5 * 2**20}  # parts of 5 MiB, S3's least
    key = "shards/d/v=1/train-00000-of-00001.parquet"
    url, fs = s3_store.url(key), filesystem_of(s3_store.url(key), options)[0]
    s3_store.write_bytes(key, b"old bytes")
    call = fs.call_s3

    def dropped(*args: object, **kwargs: object) -> object:
        raise OSError(f"{fails_at}: connection reset")

    def completion_dropped(method: str, *args: object, **kwargs: object) -> object:
        return dropped() if method == "complete_multipart_upload" else call(method, *args, **kwargs)

    if fails_at == "the abort":
        monkeypatch.setattr(fs, "abort_mpu", dropped)
    else:
        monkeypatch.setattr(fs, "call_s3", completion_dropped)
    with pytest.raises(Exception) as raised, open_whole(url, options, "unused on S3") as f:  # noqa: PT011
        f.write(np.random.default_rng(0).bytes(12 * 2**20))  # two parts up, the third at close
        if fails_at == "the abort":
            raise RuntimeError("the writer fails")
    del f
    gc.collect()
    monkeypatch.undo()
    assert s3_store.read_bytes(key) == b"old bytes"
    bucket = s3_store.root.split("/")[0]
    uploads = s3_store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    if fails_at == "the abort":
        assert isinstance(raised.value, RuntimeError)
        assert "aborting the upload" in "".join(getattr(raised.value, "__notes__", []))
        [left] = uploads  # the one a lifecycle rule would clear: cleared here
        s3_store.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=left["Key"], UploadId=left["UploadId"])
    else:
        assert "the completion: connection reset" in str(raised.value) and uploads == []


@pytest.fixture(params=["local", "moto", "seaweedfs"])
def any_store(request: pytest.FixtureRequest, catalog: Catalog, tmp_path: Path) -> ObjectStore:
    """Conditional writes as each server enforces them: SeaweedFS as well as moto."""
    if request.param == "local":
        return local_stores(catalog, tmp_path)["kajaani"]
    endpoint = request.getfixturevalue("s3_endpoint" if request.param == "moto" else "seaweed_endpoint")
    return s3_stores(catalog, endpoint)["kajaani"]


@pytest.mark.parametrize("existed", [True, False])
def test_an_update_between_anothers_read_and_write_is_not_lost(any_store: ObjectStore, existed: bool) -> None:
    """Writer B updates `_latest` after writer A has read it and before A writes (another deployment's
    commit): A's write keeps B's entry. On S3, A's conditional write is refused and A reads and changes
    again; locally, B waits on the lock until A is done."""
    key, on_s3 = "shards/d/_latest", any_store.protocol == "s3"
    before = ["v0"] if existed else []
    if existed:
        any_store.write_json(key, {"history": before})
    a_read, b_done = threading.Event(), threading.Event()
    seen_by_a: list[list[str]] = []
    seen_by_b: list[list[str]] = []
    failures: list[BaseException] = []

    def add(entry: str, latest: dict | None, seen: list[list[str]]) -> dict:
        seen.append((latest or {}).get("history", []))
        return {"history": [*seen[-1], entry]}

    def a_change(latest: dict | None) -> dict:
        changed = add("a", latest, seen_by_a)
        a_read.set()
        # On S3 nothing holds B back: A writes after it. Locally the lock holds B while A has not written.
        assert b_done.wait(timeout=60) if on_s3 else not b_done.wait(timeout=0.5)
        return changed

    def b() -> None:
        try:
            a_read.wait(timeout=60)
            any_store.update_json(key, lambda latest: add("b", latest, seen_by_b))
        except BaseException as exc:
            failures.append(exc)
        finally:
            b_done.set()

    other = threading.Thread(target=b)
    other.start()
    any_store.update_json(key, a_change)
    other.join(timeout=120)
    assert not other.is_alive() and failures == []
    assert sorted(any_store.read_json(key)["history"]) == sorted([*before, "a", "b"])
    if on_s3:  # refused once, then A read B's update
        assert (seen_by_a, seen_by_b) == ([before, [*before, "b"]], [before])
    else:  # B read A's update
        assert (seen_by_a, seen_by_b) == ([before], [[*before, "a"]])


def test_only_a_stores_refusal_is_named_as_one(stores: dict[str, ObjectStore]) -> None:
    """A 403 from an S3 store names the store and the credential variables; a file's permission error (an
    OS error, with its errno) stays what it is, as does any error on a local store."""
    store, raising = stores["kajaani"], []

    @naming_refusals("kajaani")
    def step(context: dg.AssetExecutionContext) -> None:
        raise raising[0]

    local_file, refusal = PermissionError(13, "Permission denied", "/scratch/x"), PermissionError("Forbidden")
    caught = []  # (the error itself?, its message, caused by the original?)
    with dg.build_asset_context(resources={store_key("kajaani"): store}) as context:
        for error in (local_file, refusal):
            raising[:] = [error]
            try:
                step(context)
            except PermissionError as exc:
                caught.append((exc is error, str(exc), exc.__cause__ is error))
    assert caught[0][0]
    if store.protocol == "file":
        assert caught[1][0]
    else:
        assert "refused a request of the kajaani site (Forbidden)" in caught[1][1] and caught[1][2]


@pytest.fixture
def s3_store(catalog: Catalog, s3_endpoint: str) -> ObjectStore:
    return s3_stores(catalog, s3_endpoint)["kajaani"]


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each ranged GET that s3fs's files make from now on: the bytes a reader pulls."""
    sizes: list[int] = []
    fetch = s3fs.core.S3File._fetch_range

    def counted(self: s3fs.core.S3File, start: int, end: int) -> bytes:
        data = fetch(self, start, end)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counted)
    return sizes


def test_a_gather_fetches_its_own_batch_not_the_file(s3_store: ObjectStore, fetched: list[int]) -> None:
    """A gather reads one record batch of each scatter file: s3fs's read-ahead (up to 50 MiB an open) pulled
    the rest of the file along, some 30 times the bytes over a shuffle."""
    rng = np.random.default_rng(0)  # random floats: lz4 leaves each batch its size
    tables = [pa.table({"x": rng.random(40_000)}) for _ in range(16)]
    url = s3_store.url("shards/d/_staging/v/run/scattered/part-00000.arrow")
    write_batches(url, tables[0].schema, tables, s3_store.storage_options)
    assert read_batches(url, [7], s3_store.storage_options).equals(tables[7])
    assert sum(fetched) < 1.5 * tables[7].nbytes


def test_reading_a_column_fetches_that_column(s3_store: ObjectStore, fetched: list[int]) -> None:
    """A column read alone (the quarantine's reasons) fetches its chunks and the footer, not the read-ahead's
    50 MiB after its first chunk."""
    rng = np.random.default_rng(0)
    table = pa.table({"reason": ["not a date"] * 200_000, "x": rng.random(200_000)})
    url = s3_store.url("quarantine/d/raw/run=a/part-00000.parquet")
    size = write_parquet(table, url, s3_store.storage_options)
    assert read_parquet(url, s3_store.storage_options, columns=["reason"]).equals(table.select(["reason"]))
    assert sum(fetched) < size / 4


def test_slashes_around_the_bucket_setting_are_dropped(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> None:
    """`bucket/` made the root `bucket//athens`: writes went to keys beginning with "/", listings held none of
    them, and the sensor saw an empty landing zone."""
    bucket = f"aifactory-{uuid.uuid4().hex[:12]}"
    settings = {"ENDPOINT": s3_endpoint, "KEY": S3_KEY, "SECRET": S3_SECRET, "BUCKET": f"{bucket}/"}
    for setting, value in settings.items():
        monkeypatch.setenv(f"AIFACTORY_S3_{setting}", value)
    store = object_store_for("athens", "aifactory-athens").process_config_and_initialize()
    store.ensure_root()
    store.write_bytes("landing/d/a.csv", b"x\n1\n")
    stored = store.fs.call_s3("list_objects_v2", Bucket=bucket)["Contents"]
    assert [found["Key"] for found in stored] == ["athens/landing/d/a.csv"]
    assert [o.key for o in store.list_objects("landing/d")] == ["landing/d/a.csv"]


@pytest.mark.parametrize("value", ["s3://bucket-1", "bucket-1/team-a", "http://s3:9000/bucket-1"])
def test_a_bucket_setting_that_names_no_bucket_fails_the_load(
    monkeypatch: pytest.MonkeyPatch, catalog: Catalog, value: str
) -> None:
    """`s3://bucket` made paths `s3://s3://bucket/...`, which failed at the first read, long after the load;
    a prefix has its own setting."""
    monkeypatch.setenv("AIFACTORY_KAJAANI_S3_BUCKET", value)
    with pytest.raises(ValueError, match="AIFACTORY_KAJAANI_S3_BUCKET is not a bucket name") as refused:
        build_definitions(catalog)
    assert "AIFACTORY_KAJAANI_S3_PREFIX" in str(refused.value) and value not in str(refused.value)


def test_a_path_outside_the_root_has_no_key(store: ObjectStore) -> None:
    """Returned as it was, a path beside the root (another site's) read as a key under this one."""
    assert store.key_of(store.url("landing/d/a.csv")) == "landing/d/a.csv"
    with pytest.raises(ValueError, match="is not under the root of"):
        store.key_of(beside(store, f"{store.site}-old").path("landing/d/a.csv"))


def landing_zone(tmp_path: Path) -> ObjectStore:
    """A local store whose `landing/d/` exists, for links to be made in."""
    store = ObjectStore(site="kajaani", root=str(tmp_path / "kajaani"))
    Path(store.path("landing/d")).mkdir(parents=True)
    return store


def test_a_linked_landed_file_is_fingerprinted_by_its_target(tmp_path: Path) -> None:
    """A site links a shared data area into its landing zone: listed by the link's own inode and times, a file
    corrected in place at its size never changed (no run; raw lent the old part), and `info` disagreed."""
    store, target = landing_zone(tmp_path), tmp_path / "a.csv"
    target.write_bytes(b"id,v\n1,10\n")
    os.utime(target, (1_700_000_000, 1_700_000_000))  # landed in 2023
    Path(store.path("landing/d/a.csv")).symlink_to(target)
    before = store.list_objects("landing/d", "*.csv")
    target.write_bytes(b"id,v\n1,99\n")
    after = store.list_objects("landing/d", "*.csv")
    assert after == [store.info("landing/d/a.csv")] and after[0].fingerprint() != before[0].fingerprint()


def test_a_link_whose_target_is_gone_is_named_not_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A link into a scratch area since purged: listed as an empty file, it failed every run that read it."""
    store = landing_zone(tmp_path)
    store.write_bytes("landing/d/a.csv", b"x\n1\n")
    Path(store.path("landing/d/b.csv")).symlink_to(tmp_path / "purged.csv")
    with caplog.at_level(logging.WARNING):
        assert [o.key for o in store.list_objects("landing/d", "*.csv")] == ["landing/d/a.csv"]
    assert f"landing/d/b.csv: a link to {tmp_path / 'purged.csv'}" in caplog.text


def test_a_linked_folder_is_listed_as_a_folder(tmp_path: Path) -> None:
    """A year's folder linked in from a shared area: fsspec listed the link as one file, and `**/*.csv` missed
    what it holds. A link in it back up to the landing zone is not followed round."""
    store, shared = landing_zone(tmp_path), tmp_path / "2026"
    shared.mkdir()
    (shared / "b.csv").write_bytes(b"x\n1\n")
    (shared / "up").symlink_to(store.path("landing"))
    Path(store.path("landing/d/2026")).symlink_to(shared)
    store.write_bytes("landing/d/a.csv", b"x\n2\n")
    for pattern in ("**/*.csv", "**"):
        assert [o.key for o in store.list_objects("landing/d", pattern)] == ["landing/d/2026/b.csv", "landing/d/a.csv"]
    assert [o.key for o in store.list_objects("landing/d", "*.csv")] == ["landing/d/a.csv"]


def test_a_key_with_an_empty_segment_is_named(s3_store: ObjectStore, caplog: pytest.LogCaptureFixture) -> None:
    """`landing/d//a.csv` (a partner joining `d/` and `/a.csv`) matches no landing glob: said, not passed over."""
    bucket, base = s3_store.root.split("/", 1)
    for key in ("landing/d//a.csv", "landing/d/b.csv"):
        s3_store.fs.call_s3("put_object", Bucket=bucket, Key=f"{base}/{key}", Body=b"x\n1\n")
    with caplog.at_level(logging.WARNING):
        for pattern in ("**/*.csv", "*.csv"):  # listed whole, and by levels (where it is a folder "d/")
            assert [o.key for o in s3_store.list_objects("landing/d", pattern)] == ["landing/d/b.csv"]
    assert "landing/d//a.csv" in caplog.text and "landing/d//*" in caplog.text


@pytest.mark.parametrize("pattern", ["incoming/*.csv", "incoming/**/*.csv"])
def test_a_listing_starts_at_the_patterns_fixed_folders(
    s3_store: ObjectStore, monkeypatch: pytest.MonkeyPatch, pattern: str
) -> None:
    """`incoming/*.csv` lists `incoming/` alone: from the landing zone's top, an `archive/` beside it (a
    million keys, say) was listed too, a request per thousand keys on every 30 s sensor tick."""
    for key in ("incoming/a.csv", "incoming/b.csv", "archive/2025/a.csv", "archive/2026/b.csv"):
        s3_store.write_bytes(f"landing/d/{key}", b"x\n1\n")
    prefixes: list[str] = []
    call = s3fs.S3FileSystem._call_s3

    async def listed(self, method, *args, **kwargs):
        if method == "list_objects_v2":
            prefixes.append(kwargs["Prefix"])
        return await call(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", listed)
    found = [o.key for o in s3_store.list_objects("landing/d", pattern)]
    assert found == ["landing/d/incoming/a.csv", "landing/d/incoming/b.csv"]
    within = s3_store.path("landing/d/incoming/").partition("/")[2]  # a prefix is a key, without the bucket
    assert prefixes and all(p.startswith(within) for p in prefixes), prefixes
