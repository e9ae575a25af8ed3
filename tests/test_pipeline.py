"""The whole graph through `dagster.materialize`, on a local directory and on a real S3 server."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aifactory_assets.catalog import Catalog, Dataset
from aifactory_assets.demo import land_demo_data
from aifactory_assets.factory import asset_key, same_bytes
from aifactory_assets.manifest import CODE_FINGERPRINT, git_sha, latest_manifest, latest_version
from aifactory_assets.publish import current, publish
from aifactory_assets.shard_layout import ROW_GROUP_BYTES, row_group_rows, schema_fingerprint, shard_name
from aifactory_assets.sharding import shard_count
from aifactory_assets.validated_rows import read_validated
from aifactory_assets.validation import expectation_label
from resources import DaskCluster, ObjectStore
from tests.conftest import S3_SECRET, failed_checks, logged, materialize_all

SHARD_NAME = re.compile(r"^(train|val|test)-\d{5}-of-\d{5}\.parquet$")


def stages(dataset) -> list[dg.AssetKey]:
    return [asset_key(dataset, s) for s in ("raw", "validated", "shards")]


def test_whole_graph_materialises_into_checked_shards(
    catalog: Catalog, stores: dict[str, ObjectStore], dask: DaskCluster
) -> None:
    land_demo_data(catalog, stores)
    result = materialize_all(catalog, stores, dask)
    assert result.success
    assert failed_checks(result) == []
    assert len(result.get_asset_check_evaluations()) == 11 * len(catalog.datasets)

    for dataset in catalog.datasets.values():
        store = stores[dataset.site]
        manifest = latest_manifest(store, dataset)
        assert manifest is not None, f"{dataset.name} has no committed version"
        prefix = f"shards/{dataset.name}/v={manifest['version']}"
        assert set(manifest["splits"]) == set(dataset.shards.splits)
        rows = 0
        for split, entry in manifest["splits"].items():
            count = len(entry["shards"])
            assert [s["path"] for s in entry["shards"]] == [shard_name(split, i, count) for i in range(count)]
            for shard in entry["shards"]:
                assert SHARD_NAME.match(shard["path"])
                data = store.read_bytes(f"{prefix}/{shard['path']}")
                assert hashlib.sha256(data).hexdigest() == shard["sha256"]
                assert len(data) == shard["bytes"]
                footer = pq.ParquetFile(pa.BufferReader(data)).metadata
                groups = [footer.row_group(g) for g in range(footer.num_row_groups)]
                assert shard["row_groups"] == [g.num_rows for g in groups]
                assert {g.column(c).compression for g in groups for c in range(g.num_columns)} == {"ZSTD"}
                assert schema_fingerprint(footer.schema.to_arrow_schema()) == manifest["schema"]["fingerprint"]
                url = store.url(f"{prefix}/{shard['path']}")
                with store.fs.open(store.path(f"{prefix}/{shard['path']}"), "rb") as f:
                    table = pq.read_table(f)
                frame = pd.read_parquet(url, storage_options=store.storage_options)
                assert table.num_rows == len(frame) == shard["rows"]
                assert list(frame.columns)[: len(dataset.table.names)] == dataset.table.names
                rows += shard["rows"]
        balance = manifest["conservation"]
        assert rows == balance["rows_sharded"] > 0
        assert balance["rows_read"] == (
            balance["rows_sharded"] + balance["rows_quarantined"] + balance["duplicates_dropped"]
        )
        assert_manifest_describes_its_making(manifest, dataset, catalog, store, result.run_id)
        metadata = result.asset_materializations_for_node("__".join(asset_key(dataset, "shards").path))[0].metadata
        assert metadata["dagster/row_count"].value == rows
        schema = metadata["dagster/column_schema"].schema
        assert [c.name for c in schema.columns][:2] == dataset.table.names[:2]
        assert "unique: duplicates dropped" in schema.constraints.other[0]  # the key is unique from here on
        raw_node = "__".join(asset_key(dataset, "raw").path)
        raw_schema = result.asset_materializations_for_node(raw_node)[0].metadata["dagster/column_schema"].schema
        assert not any(c.constraints.unique for c in raw_schema.columns)  # duplicates are dropped later

    if next(iter(stores.values())).protocol == "s3":
        assert S3_SECRET not in logged(result)


def assert_manifest_describes_its_making(
    manifest: dict, dataset, catalog: Catalog, store: ObjectStore, run_id: str
) -> None:
    """Lineage, producer, sampler and the validation and quarantine summaries, against the things they name."""
    inputs = manifest["lineage"]["inputs"]
    assert inputs and sum(i["rows_read"] for i in inputs) == manifest["conservation"]["rows_read"]
    balance = manifest["conservation"]
    for landed in inputs:  # what became of each file's rows, validation's quarantine included
        at = (landed["rows_valid"], landed["quarantined_at_ingest"], landed["quarantined_at_validation"])
        assert landed["rows_read"] == sum(at)
    assert sum(i["rows_valid"] for i in inputs) == balance["rows_sharded"] + balance["duplicates_dropped"]
    for landed in inputs:
        info = store.info(landed["key"])
        assert (landed["size"], landed["etag"], landed["mtime"]) == (info.size, info.etag, info.mtime)
        assert landed["size"] > 0 and landed["mtime"] and (landed["etag"] or store.protocol == "file")
    producer = manifest["producer"]
    assert (producer["version"], producer["git_sha"]) == (version("aifactory"), checkout_sha(Path(__file__).parent))
    assert (producer["code_fingerprint"], producer["dagster_run_id"]) == (CODE_FINGERPRINT, run_id)
    sampler = manifest["sampler"]
    assert (sampler["seed"], sampler["remainder"]) == (dataset.shards.seed, dataset.shards.remainder)
    assert sampler["ratios"] == [[split, ratio] for split, ratio in dataset.shards.splits.items()]
    assert {"split", "shuffle", "dedup", "epoch"} <= set(sampler)
    suite = catalog.suites[dataset.name]["expectations"]
    assert sorted(r["label"] for r in manifest["validation"]["results"]) == sorted(map(expectation_label, suite))
    quarantine = manifest["quarantine"]
    assert quarantine["rows"] == quarantine["at_ingest"] + quarantine["at_validation"]
    assert quarantine["rows"] == manifest["conservation"]["rows_quarantined"]
    assert quarantine["rows_read"] == manifest["conservation"]["rows_read"]


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()


def checkout_sha(folder: Path) -> str:
    """HEAD of the checkout `folder` is in, `-dirty` where a tracked file changed since."""
    changed = git(folder, "status", "--porcelain", "--untracked-files=no")
    return git(folder, "rev-parse", "HEAD") + ("-dirty" if changed else "")


def committed_repository(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    git(folder, "init", "-q")
    git(folder, "add", "-A")
    git(folder, "-c", "user.email=test@example.org", "-c", "user.name=test", "commit", "-qm", "files")


def test_the_producers_git_sha_is_aifactorys_own_checkout_and_says_dirty(tmp_path: Path) -> None:
    """A manifest's git sha names the code that made it: aifactory's own commit, `-dirty` where the tree
    was edited since; never the commit of a training project that vendors or installs the package."""
    checkout = tmp_path / "aifactory"
    project = '[project]\nname = "aifactory"\n'
    committed_repository(checkout, {"pyproject.toml": project, "aifactory_assets/manifest.py": "A = 1\n"})
    package = checkout / "aifactory_assets"
    assert git_sha(package) == git(checkout, "rev-parse", "HEAD")
    (package / "manifest.py").write_text("A = 2\n")
    assert git_sha(package) == git(checkout, "rev-parse", "HEAD") + "-dirty"

    training = tmp_path / "training"
    installed = ".venv/lib/python3.11/site-packages/aifactory_assets/manifest.py"
    committed_repository(training, {"train.py": "", installed: "A = 1\n"})
    assert git_sha((training / installed).parent) == "unknown"
    vendored = tmp_path / "vendoring"
    trainer = '[project]\nname = "trainer"\n'
    committed_repository(vendored, {"pyproject.toml": trainer, "aifactory_assets/manifest.py": "A = 1\n"})
    assert git_sha(vendored / "aifactory_assets") == "unknown"
    (tmp_path / "unpacked").mkdir()
    assert git_sha(tmp_path / "unpacked") == "unknown"  # an sdist or wheel: no checkout at all


def test_row_groups_hold_many_narrow_rows_and_few_wide_ones() -> None:
    """About 1,024 row groups a split, of 1,024 to 65,536 rows, but never past ROW_GROUP_BYTES decoded: a
    split of 100 KB documents in groups of 65,536 rows would give readers 6.5 GB row groups."""
    assert row_group_rows(10**6) == 1_024
    assert row_group_rows(10**8) == 65_536
    assert row_group_rows(10**8, row_bytes=80) == 65_536
    assert row_group_rows(10**8, row_bytes=100_000) == ROW_GROUP_BYTES // 100_000
    assert row_group_rows(10**8, row_bytes=2 * ROW_GROUP_BYTES) == 1  # a row larger than the bound: alone


def test_shards_aim_at_the_target_bytes(catalog: Catalog, tmp_path, dask: DaskCluster) -> None:
    """By default a shard is cut by bytes on disk. Landed in order, the ids, days and stations here
    compress to almost nothing; shuffled they do not, so sizing shards from the validated parts made them
    ~1.5x the target."""
    from tests.conftest import local_stores

    target, rows = 256 * 2**10, 60_000
    rng = np.random.default_rng(0)
    landed = pd.DataFrame(
        {
            "id": np.arange(rows),
            "day": pd.date_range("2020-01-01", periods=1_000).repeat(rows // 1_000).strftime("%Y-%m-%d"),
            "station": np.sort(rng.integers(0, 500, rows)).astype(str),
            "value": rng.normal(size=rows).round(4),
        }
    )
    columns = [{"name": "id", "type": "int64", "nullable": False}, {"name": "day", "type": "string"}]
    columns += [{"name": "station", "type": "string"}, {"name": "value", "type": "float64"}]
    dataset = Dataset.model_validate(
        {
            "name": "ordered_readings",
            "sector": "climate",
            "site": "kajaani",
            "description": "Readings landed in time order.",
            "owner": "team:tests",
            "source": {"format": "csv", "landing": "*.csv"},
            "schema": {"key": ["id"], "columns": columns},
            "suite": "suites/ordered_readings.json",
            "shards": {"target_bytes": target},
        }
    )
    suite = {
        "name": dataset.name,
        "expectations": [{"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": 1}}],
    }
    ordered = catalog.model_copy(update={"datasets": {dataset.name: dataset}, "suites": {dataset.name: suite}})
    stores = local_stores(ordered, tmp_path)
    store = stores[dataset.site]
    store.ensure_root()
    store.write_bytes(f"landing/{dataset.name}/readings.csv", landed.to_csv(index=False).encode())
    assert materialize_all(ordered, stores, dask, selection=stages(dataset)).success
    train = latest_manifest(store, dataset)["splits"]["train"]
    assert len(train["shards"]) >= 3
    assert 0.5 * target < train["bytes"] / len(train["shards"]) <= 1.1 * target
    assert max(s["rows"] for s in train["shards"]) - min(s["rows"] for s in train["shards"]) <= 1


def test_a_byte_target_below_a_files_overhead_makes_no_empty_shard(catalog: Catalog) -> None:
    """Five rows of a sample whose footer alone outweighs the target: five shards of one row, not 250."""
    penguins = catalog.datasets["palmer_penguins"]
    tiny = penguins.model_copy(update={"shards": penguins.shards.model_copy(update={"target_bytes": 100})})
    assert shard_count(5, bytes_per_row=5_000.0, dataset=tiny) == 5
    assert shard_count(0, bytes_per_row=0.0, dataset=tiny) == 0  # an empty split: no shard (no file)
    assert shard_count(10**6, bytes_per_row=50.0, dataset=penguins) == 1  # 50 MB for a 128 MiB target


PENGUIN_HEADER = "record_id,species,island,bill_length_mm,bill_depth_mm,flipper_length_mm,body_mass_g,sex,year\n"
PENGUIN_DROP = PENGUIN_HEADER + (
    "1001,Adelie,Dream,39.1,18.7,181,3750,male,2008\n"  # fine
    "1002,Adelie,Dream,39.1,18.7,181,heavy,male,2008\n"  # unparseable number: quarantined at ingest
    "1003,Adelie,Dream,39.1,18.7\n"  # wrong field count: quarantined at ingest
    "1004,,Dream,39.1,18.7,181,3750,male,2008\n"  # null in a non-nullable column: quarantined at ingest
    "1005,Adelie,Dream,390.0,18.7,181,3750,male,2008\n"  # out of range: quarantined by the suite
    "1006,Adelie,Dream,39.1,18.7,181,3750,unknown,2008\n"  # not in the sex set: quarantined by the suite
    "1,Adelie,Torgersen,40.0,18.0,190,3700,female,2007\n"  # key 1 again, newer file: replaces record 1
)


def penguins_with_drop(catalog: Catalog, tmp_path) -> tuple[dict[str, ObjectStore], ObjectStore]:
    """Local stores with the demo data, and PENGUIN_DROP landed after the demo file (so its record 1 wins)."""
    from tests.conftest import local_stores

    stores = local_stores(catalog, tmp_path)
    land_demo_data(catalog, stores)
    store = stores[catalog.datasets["palmer_penguins"].site]
    store.write_bytes("landing/palmer_penguins/drop-2.csv", PENGUIN_DROP.encode())
    later = os.path.getmtime(store.path("landing/palmer_penguins/palmer_penguins.csv")) + 60
    os.utime(store.path("landing/palmer_penguins/drop-2.csv"), (later, later))
    return stores, store


def test_a_file_uploaded_again_unchanged_keeps_its_place_in_the_landing_order(
    catalog: Catalog, tmp_path, dask: DaskCluster
) -> None:
    """A sync tool uploading an older file again gives it the newest mtime: by mtime alone its records would
    win again over the updates landed after it. Its bytes keep the place they first landed at; the old
    record landed anew is a new drop, and wins."""
    stores, store = penguins_with_drop(catalog, tmp_path)
    dataset = catalog.datasets["palmer_penguins"]

    def record_1() -> str:
        assert materialize_all(catalog, stores, dask, selection=stages(dataset)).success
        shards = pd.concat(
            pd.read_parquet(store.url(f"shards/palmer_penguins/v={latest_version(store, dataset)}/{s['path']}"))
            for split in latest_manifest(store, dataset)["splits"].values()
            for s in split["shards"]
        )
        return shards.loc[shards["record_id"] == 1, "_source"].item()

    assert record_1() == "landing/palmer_penguins/drop-2.csv"
    first = latest_version(store, dataset)
    demo = Path(store.path("landing/palmer_penguins/palmer_penguins.csv"))
    later = os.path.getmtime(store.path("landing/palmer_penguins/drop-2.csv")) + 60
    os.utime(demo, (later, later))  # uploaded again, unchanged
    assert record_1() == "landing/palmer_penguins/drop-2.csv"
    assert latest_version(store, dataset) == first
    header, *rows = demo.read_text().splitlines()
    old = next(row for row in rows if row.startswith("1,"))
    store.write_bytes("landing/palmer_penguins/again.csv", f"{header}\n{old}\n".encode())  # the old record, anew
    os.utime(store.path("landing/palmer_penguins/again.csv"), (later + 60, later + 60))
    assert record_1() == "landing/palmer_penguins/again.csv"


def test_landed_files_with_the_same_bytes_are_said(catalog: Catalog, tmp_path, dask: DaskCluster) -> None:
    """A copy under another name makes every row a duplicate, silently but for the shards' count."""
    from tests.conftest import local_stores

    stores = local_stores(catalog, tmp_path)
    land_demo_data(catalog, stores)
    store, dataset = stores["linkoping"], catalog.datasets["palmer_penguins"]
    store.write_bytes(
        "landing/palmer_penguins/copy.csv", store.read_bytes("landing/palmer_penguins/palmer_penguins.csv")
    )
    raw, _, _ = stages(dataset)
    result = materialize_all(catalog, stores, dask, selection=[raw])
    summary = result.asset_materializations_for_node(raw.to_python_identifier())[0].metadata["summary"].value
    pair = "`landing/palmer_penguins/palmer_penguins.csv` = `landing/palmer_penguins/copy.csv`"  # landing order
    assert result.success and "**Landed files with the same bytes**" in summary and pair in summary


def test_files_of_no_rows_are_not_copies() -> None:
    """Header-only daily drops hash alike: no row of theirs duplicates another's."""
    ledger = [
        {"source": f"landing/x/{day}.csv", "sha256": "h", "rows_read": rows} for day, rows in (("a", 0), ("b", 0))
    ]
    assert same_bytes(ledger) == []
    assert same_bytes([{**e, "rows_read": 3} for e in ledger]) == [["landing/x/a.csv", "landing/x/b.csv"]]


def test_bad_rows_are_quarantined_with_reasons_and_counted(catalog: Catalog, tmp_path, dask: DaskCluster) -> None:
    stores, store = penguins_with_drop(catalog, tmp_path)
    dataset = catalog.datasets["palmer_penguins"]
    store.write_bytes("landing/palmer_penguins/drift.csv", b"record_id,species\n7,Adelie\n")

    result = materialize_all(catalog, stores, dask, selection=stages(dataset))
    assert result.success
    # Both failing expectations are warnings: rows quarantined, the check warns, shards are still built.
    # The drifted file is refused: it stops no other file, and its check warns.
    assert failed_checks(result) == [
        "life_sciences/palmer_penguins/raw:landed_files_read",
        "life_sciences/palmer_penguins/validated:warning_expectations",
    ]
    suite_check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "warning_expectations")
    assert suite_check.severity == dg.AssetCheckSeverity.WARN

    warning = next(e for e in result.get_asset_check_evaluations() if e.check_name == "warning_expectations")
    assert "390.0" in warning.metadata["results"].value  # a sample failing value, shown in the UI
    assert warning.metadata["unexpected_rows"].value == 2
    validated_meta = result.asset_materializations_for_node("life_sciences__palmer_penguins__validated")[0].metadata
    report = validated_meta["data_docs"].value
    assert report.endswith(f"validation-{result.run_id}.html")
    html = store.read_bytes(f"reports/palmer_penguins/validation-{result.run_id}.html").decode()
    assert "expect_column_values_to_be_between" in html or "values must be" in html
    assert store.read_bytes("reports/palmer_penguins/latest.html").decode() == html

    raw = current(store, "raw/palmer_penguins")
    assert raw["rows_read"] == 344 + 7 and raw["rows_quarantined"] == 3 and raw["files_refused"] == 1
    refused = [e for e in raw["ledger"] if "file_error" in e]
    assert refused[0]["source"].endswith("drift.csv") and "island" in refused[0]["file_error"]

    quarantine = pd.concat(
        pd.read_parquet(store.url(g)) for g in (f"quarantine/palmer_penguins/{s}" for s in ("raw", "validated"))
    )
    reasons = dict(zip(quarantine["_row"].astype("Int64").astype(str), quarantine["reason"], strict=True))
    assert "body_mass_g: 'heavy' is not a valid float64" in reasons["3"]
    assert "expected 9 fields, found 5" in reasons["4"]
    assert "species: null in a non-nullable column" in reasons["5"]
    assert "expect_column_values_to_be_between(bill_length_mm)" in reasons["6"]
    assert "expect_column_values_to_be_in_set(sex)" in reasons["7"]
    assert "drift.csv" in " ".join(quarantine.loc[quarantine["_row"].isna(), "_source"])

    manifest = latest_manifest(store, dataset)
    assert_manifest_describes_its_making(manifest, dataset, catalog, store, result.run_id)
    balance = manifest["conservation"]
    assert balance == {"rows_read": 351, "rows_quarantined": 5, "duplicates_dropped": 1, "rows_sharded": 345}
    prefix = f"shards/palmer_penguins/v={manifest['version']}"
    shards = pd.concat(
        pd.read_parquet(store.url(f"{prefix}/{s['path']}"))
        for split in manifest["splits"].values()
        for s in split["shards"]
    )
    record_1 = shards.loc[shards["record_id"] == 1].iloc[0]
    assert (record_1["island"], record_1["_source"]) == ("Torgersen", "landing/palmer_penguins/drop-2.csv")
    assert shards["record_id"].is_unique
    # Validation wrote no copy of the rows that passed: its quarantine is what the shards leave out.
    validated = current(store, "validated/palmer_penguins")
    written = [o.key for o in store.list_objects(validated["generation"])]  # its row verdicts, no rows
    assert validated["raw_parts"] == raw["parts"] and written == [validated["part_verdicts"]]
    dropped = quarantine.loc[quarantine["stage"] == "validated", ["_source", "_row"]]
    assert len(dropped) == 2 and shards.merge(dropped, on=["_source", "_row"]).empty
    passed = read_validated(store, dataset).compute()  # what a notebook reads instead of a copy
    assert len(passed) == validated["rows_valid"] == 351 - 3 - 2
    assert passed.merge(dropped, on=["_source", "_row"]).empty
    raw_stage, _, _ = stages(dataset)
    assert materialize_all(catalog, stores, dask, selection=[raw_stage]).success  # raw again, validated not
    assert materialize_all(catalog, stores, dask, selection=[raw_stage]).success  # replaced twice: gone
    # The version still leads to the rows it left out, though raw's quarantine generation went.
    assert not store.exists(raw["quarantine"])
    kept = pd.concat(pd.read_parquet(store.url(at)) for at in manifest["quarantine"]["locations"])
    by_row = ["_source", "_row", "reason"]
    in_order = [frame[by_row].sort_values(by_row).reset_index(drop=True) for frame in (kept, quarantine)]
    pd.testing.assert_frame_equal(*in_order)
    with pytest.raises(FileNotFoundError, match="validated was made from .*materialise validated first"):
        read_validated(store, dataset)  # its parts are gone or going, not a half-read frame


def test_tables_of_landed_files_show_what_matters_first_and_say_where_the_rest_is(
    catalog: Catalog, tmp_path, dask: DaskCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Years of daily drops make thousands of landed files: the UI's tables stop at TABLE_ROWS (1 here),
    the files with rows left out first."""
    from aifactory_assets import metadata

    monkeypatch.setattr(metadata, "TABLE_ROWS", 1)
    stores, store = penguins_with_drop(catalog, tmp_path)
    store.write_bytes("landing/palmer_penguins/drift.csv", b"record_id,species\n7,Adelie\n")  # refused
    dataset = catalog.datasets["palmer_penguins"]
    raw, validated, _ = stages(dataset)
    result = materialize_all(catalog, stores, dask, selection=[raw, validated])
    assert result.success
    summary = result.asset_materializations_for_node(raw.to_python_identifier())[0].metadata["summary"].value
    raw_record = store.url("raw/palmer_penguins/_current.json")
    assert summary.count("| `landing/") == 2  # one file, one refused file
    assert "| `landing/palmer_penguins/drop-2.csv` | 7 | 4 | 3 |" in summary  # the one with rows quarantined
    assert f"2 more not shown: every file is in `{raw_record}`" in summary
    ledger = next(e for e in result.get_asset_check_evaluations() if e.check_name == "ledger_per_source")
    table = ledger.metadata["ledger"].value
    assert table.count("| `landing/") == 1 and "| `landing/palmer_penguins/drift.csv` | 0 | 0 | 0 | 0 |" in table
    assert f"2 more not shown: every object is in `{store.url('validated/palmer_penguins/_current.json')}`" in table
    judged = result.asset_materializations_for_node(validated.to_python_identifier())[0].metadata["summary"].value
    assert judged.count(" | ❌ | ") == 1 and " | ✅ | " not in judged  # a failed expectation first
    assert "more not shown: every expectation is in the validation's Data Docs report" in judged


def test_a_validated_step_killed_between_its_two_pointers_leaves_its_delete_files(
    catalog: Catalog, tmp_path, dask: DaskCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The validated record points at its quarantine parts as delete files, and publishing the quarantine
    removes the older ones: whichever pointer a death leaves behind, the shards still leave those rows out."""
    from aifactory_assets import validation

    stores, store = penguins_with_drop(catalog, tmp_path)
    dataset = catalog.datasets["palmer_penguins"]
    raw, validated, shards = stages(dataset)
    assert materialize_all(catalog, stores, dask, selection=[raw, validated]).success

    published: list[str] = []

    def killed_at_the_second_pointer(store: ObjectStore, prefix: str, run_id: str, record: dict, is_finished) -> dict:
        published.append(prefix)
        if len(published) == 2:
            raise RuntimeError("killed")
        return publish(store, prefix, run_id, record, is_finished)

    with monkeypatch.context() as patch:
        patch.setattr(validation, "publish", killed_at_the_second_pointer)
        assert not materialize_all(catalog, stores, dask, selection=[validated]).success
    assert len(published) == 2
    record = current(store, "validated/palmer_penguins")

    assert materialize_all(catalog, stores, dask, selection=[shards]).success
    manifest = latest_manifest(store, dataset)
    assert manifest["conservation"]["rows_quarantined"] == record["rows_quarantined"] + 3  # 3 at ingest
    prefix = f"shards/palmer_penguins/v={manifest['version']}"
    rows = pd.concat(
        pd.read_parquet(store.url(f"{prefix}/{s['path']}")) for v in manifest["splits"].values() for s in v["shards"]
    )
    assert not ((rows["_source"] == "landing/palmer_penguins/drop-2.csv") & rows["_row"].isin([6, 7])).any()


def test_a_delete_file_changed_after_validation_stops_the_commit(catalog: Catalog, tmp_path, dask: DaskCluster) -> None:
    """The shards count what they read through the delete files against what validated passed on, before
    anything is committed: a quarantine part edited by hand (or by a purge) must not silently drop rows."""
    stores, store = penguins_with_drop(catalog, tmp_path)
    dataset = catalog.datasets["palmer_penguins"]
    raw, validated, shards = stages(dataset)
    assert materialize_all(catalog, stores, dask, selection=[raw, validated]).success
    record = current(store, "validated/palmer_penguins")
    edited = next(key for key in record["excluded"] if pq.read_metadata(store.url(key)).num_rows)
    table = pq.read_table(store.url(edited))
    pq.write_table(
        pa.concat_tables([table, table.slice(0, 1).set_column(1, "_row", pa.array([2], pa.int64()))]), store.url(edited)
    )

    result = materialize_all(catalog, stores, dask, selection=[shards])
    assert not result.success
    failure = "\n".join(e.event_specific_data.error.message for e in result.all_events if e.is_step_failure)
    assert f"read {record['rows_valid'] - 1} validated rows where validated passed on {record['rows_valid']}" in failure
    assert latest_manifest(store, dataset) is None


def test_critical_expectation_failure_blocks_the_shards(catalog: Catalog, tmp_path, dask: DaskCluster) -> None:
    from tests.conftest import local_stores

    stores = local_stores(catalog, tmp_path)
    land_demo_data(catalog, stores)
    dataset = catalog.datasets["palmer_penguins"]
    stores[dataset.site].write_bytes(
        "landing/palmer_penguins/emperor.csv",
        (PENGUIN_HEADER + "2001,Emperor,Dream,39.1,18.7,181,3750,male,2008\n").encode(),
    )
    result = materialize_all(catalog, stores, dask, selection=stages(dataset))
    assert not result.success
    assert failed_checks(result) == ["life_sciences/palmer_penguins/validated:critical_expectations"]
    assert latest_manifest(stores[dataset.site], dataset) is None
    assert result.asset_materializations_for_node("life_sciences__palmer_penguins__shards") == []


def test_quarantined_fraction_above_the_catalogue_threshold_fails_the_run(
    catalog: Catalog, tmp_path, dask: DaskCluster
) -> None:
    from tests.conftest import local_stores

    strict = catalog.model_copy(
        update={
            "datasets": {
                **catalog.datasets,
                "palmer_penguins": catalog.datasets["palmer_penguins"].model_copy(
                    update={"max_quarantined_fraction": 0.01}
                ),
            }
        }
    )
    stores = local_stores(strict, tmp_path)
    land_demo_data(strict, stores)
    dataset = strict.datasets["palmer_penguins"]
    stores[dataset.site].write_bytes("landing/palmer_penguins/drop-2.csv", PENGUIN_DROP.encode())
    quoted = PENGUIN_HEADER + "1003,Adelie,Dream,39.1,18.7,181,O'Brien,male,2008\n"  # a value Python quotes with "
    stores[dataset.site].write_bytes("landing/palmer_penguins/drop-3.csv", quoted.encode())
    result = materialize_all(strict, stores, dask, selection=stages(dataset))
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "palmer_penguins: 1.7% of rows quarantined (6 of 352)" in message
    assert "max_quarantined_fraction 1.0%" in message
    assert "expect_column_values_to_be_between(bill_length_mm) (1 rows)" in message
    # Where they went, and why: ingest's reasons without the values (which may be personal data); only
    # the expectations that failed.
    assert "4 at ingest, e.g. " in message and "body_mass_g: … is not a valid float64 (2 rows)" in message
    assert "heavy" not in message and "Brien" not in message and "2 at validation, failing most: " in message
    assert "(0 rows)" not in message
    assert latest_manifest(stores[dataset.site], dataset) is None


def test_same_inputs_give_same_version_and_bytes(catalog: Catalog, tmp_path, dask: DaskCluster) -> None:
    from tests.conftest import local_stores

    stores = local_stores(catalog, tmp_path)
    land_demo_data(catalog, stores)
    dataset = catalog.datasets["seattle_weather"]
    selection = stages(dataset)
    store = stores[dataset.site]

    assert materialize_all(catalog, stores, dask, selection=selection).success
    first = latest_manifest(store, dataset)
    store.delete(f"shards/seattle_weather/v={first['version']}")  # force a full rebuild
    assert materialize_all(catalog, stores, dask, selection=selection).success
    second = latest_manifest(store, dataset)

    assert second["version"] == first["version"]
    assert second["producer"]["dagster_run_id"] != first["producer"]["dagster_run_id"]
    assert second["splits"] == first["splits"]  # same checksums: byte-identical shards


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_split_is_a_function_of_the_key(split: str) -> None:
    from aifactory_assets.sharding import assign_splits, key_hash

    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    frame = pd.DataFrame({"id": range(20_000)})
    first = assign_splits(key_hash(frame, ["id"]), ratios)
    shuffled = frame.sample(frac=1, random_state=1)
    again = pd.Series(assign_splits(key_hash(shuffled, ["id"]), ratios), index=shuffled.index).sort_index()
    assert (first == again.to_numpy()).all()
    share = (first == list(ratios).index(split)).mean()
    assert abs(share - ratios[split]) < 0.02


@pytest.mark.parametrize("keys", [range(50_000), [f"record-{i}" for i in range(50_000)]], ids=["int", "text"])
def test_shuffle_depends_on_the_seed_and_spreads_each_split_evenly(keys) -> None:
    from aifactory_assets.sharding import assign_splits, key_hash, shuffle_order

    hashes = key_hash(pd.DataFrame({"id": keys}), ["id"])
    order = shuffle_order(hashes, seed=7)
    assert (np.argsort(order) != np.argsort(shuffle_order(hashes, seed=8))).mean() > 0.99
    assert (shuffle_order(hashes, seed=7) == order).all()
    split = assign_splits(hashes, {"train": 0.8, "val": 0.1, "test": 0.1})
    for index in range(3):  # the order within a split is not bunched where the split's hashes lie
        ranges = np.floor(order[split == index].astype(np.float64) / 2.0**64 * 10).astype(int)
        counts = np.bincount(ranges, minlength=10)
        assert counts.min() > 0.8 * counts.mean(), counts


def test_only_repeating_text_moves_as_dictionaries() -> None:
    """A staging file holds its part's whole dictionary and every gather reads a batch of each file: free
    text as a dictionary would bring every part's text into every gather."""
    import pyarrow as pa

    from aifactory_assets.sharding import text_for_dictionaries

    rows = 50_000
    sample = pa.table(
        {
            "name": [f"record-{i}" for i in range(rows)],  # the key
            "species": [("Adelie", "Gentoo", "Chinstrap")[i % 3] for i in range(rows)],
            "notes": [f"free text {i} about the bird" for i in range(rows)],
            "_source": ["landing/penguins/part-0.csv"] * rows,
            "mass": np.arange(rows, dtype=np.float64),
        }
    )
    assert text_for_dictionaries(sample, 64, ["name"]) == ["species", "_source"]
    assert text_for_dictionaries(sample, 64, []) == ["species", "_source"]  # unique names: free text too
