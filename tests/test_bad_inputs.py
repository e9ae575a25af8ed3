"""The bad-input corpus end to end through `dagster.materialize`: each file gets its documented outcome,
the good files of the same run still reach the shards, and every row is accounted for."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml

from aifactory_assets.catalog import Catalog, load_catalog
from aifactory_assets.definitions import build_definitions
from aifactory_assets.factory import asset_key
from aifactory_assets.ingest import UNSETTLED_AT_MOST
from aifactory_assets.manifest import latest_manifest
from aifactory_assets.metadata import markdown_table
from aifactory_assets.publish import current
from resources import DaskCluster, ObjectStore
from tests.bad_inputs import CORPUS, SUITE, Case, dataset_entry
from tests.conftest import local_stores, pipeline_resources

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus_catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    root = tmp_path_factory.mktemp("catalog")
    shutil.copy(REPO / "catalog" / "sites.yaml", root / "sites.yaml")
    (root / "datasets").mkdir()
    (root / "suites").mkdir()
    (root / "suites" / "corpus.json").write_text(json.dumps(SUITE))
    for name, (fmt, _) in CORPUS.items():
        (root / "datasets" / f"{name}.yaml").write_text(yaml.safe_dump(dataset_entry(name, fmt)))
    return load_catalog(root)


@pytest.fixture(scope="module")
def corpus_run(corpus_catalog: Catalog, tmp_path_factory: pytest.TempPathFactory, dask_address: str):
    stores = local_stores(corpus_catalog, tmp_path_factory.mktemp("stores"))
    store = stores["kajaani"]
    empty_since = time.time() - UNSETTLED_AT_MOST - 1  # left empty that long: a file, not an upload to come
    for name, (_, cases) in CORPUS.items():
        for case in cases():
            store.write_bytes(f"landing/{name}/{case.file}", case.data)
            if not case.data:
                os.utime(store.path(f"landing/{name}/{case.file}"), (empty_since, empty_since))
    dask = DaskCluster(scheduler_address=dask_address)
    defs = build_definitions(corpus_catalog)
    result = dg.materialize(
        [a for a in defs.assets if isinstance(a, dg.AssetsDefinition)],
        resources=pipeline_resources(stores, dask),
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    dask.close()
    return result, store


def quarantine(store: ObjectStore, dataset: str) -> pd.DataFrame:
    frames = [
        pd.read_parquet(store.url(current(store, f"quarantine/{dataset}/{stage}")["generation"]))
        for stage in ("raw", "validated")
    ]
    return pd.concat(frames, ignore_index=True)


def test_the_run_survives_every_bad_file(corpus_run, corpus_catalog: Catalog) -> None:
    result, store = corpus_run
    assert result.success
    failed = sorted(
        f"{e.asset_key.path[1]}:{e.check_name}" for e in result.get_asset_check_evaluations() if not e.passed
    )
    # Only warnings fire: refused files (each dataset's corpus has some), amount out of range and a 10 MB
    # name. Warnings never block the shards.
    refusing = {name for name, (_, cases) in CORPUS.items() if any(case.refused for case in cases())}
    assert failed == sorted(["corpus_csv:warning_expectations", *(f"{name}:landed_files_read" for name in refusing)])
    assert all(e.severity == dg.AssetCheckSeverity.WARN for e in result.get_asset_check_evaluations() if not e.passed)
    for name in CORPUS:
        manifest = latest_manifest(store, corpus_catalog.datasets[name])
        balance = manifest["conservation"]
        assert (
            balance["rows_read"]
            == balance["rows_sharded"] + balance["rows_quarantined"] + balance["duplicates_dropped"]
        )


@pytest.mark.parametrize(
    ("dataset", "case"),
    [(name, case) for name, (_, cases) in CORPUS.items() for case in cases()],
    ids=lambda value: value.file if isinstance(value, Case) else value,
)
def test_each_bad_file_gets_its_documented_outcome(corpus_run, dataset: str, case: Case) -> None:
    _, store = corpus_run
    source = f"landing/{dataset}/{case.file}"
    ledger = {e["source"]: e for e in current(store, f"validated/{dataset}")["ledger"]}[source]
    assert ledger["rows_read"] == case.read
    assert ledger["rows_valid"] == case.valid
    assert ledger["quarantined_at_ingest"] + ledger["quarantined_at_validation"] == case.quarantined
    rows = quarantine(store, dataset)
    mine = rows[rows["_source"] == source]
    if case.refused:
        assert case.refused in (ledger["file_error"] or ""), ledger["file_error"]
        assert mine["reason"].str.contains(case.refused, regex=False).any()
        assert mine["_row"].isna().all()
        return
    assert ledger["file_error"] is None
    reasons = {int(r): reason for r, reason in zip(mine["_row"], mine["reason"], strict=True)}
    assert set(reasons) == set(case.reasons), reasons
    for row, phrase in case.reasons.items():
        assert phrase in reasons[row], (row, reasons[row])


def test_quarantined_rows_keep_their_original_text(corpus_run) -> None:
    _, store = corpus_run
    rows = quarantine(store, "corpus_csv")
    latin1 = rows[rows["_source"].str.endswith("latin1.csv")].iloc[0]
    assert "Jos\\xe9" in latin1["record"]  # the undecodable byte, escaped, not lost
    numbers = rows[rows["_source"].str.endswith("numbers.csv")]
    assert json.loads(numbers.loc[numbers["_row"] == 2, "record"].iloc[0])["amount"] == "NaN"
    assert rows["run_id"].nunique() == 1
    jsonl = quarantine(store, "corpus_jsonl")
    long_line = jsonl[jsonl["_source"].str.endswith("long_not_json.jsonl")].iloc[0]
    assert len(long_line["record"]) > 20_000  # the whole line, not a prefix


def test_the_good_files_reach_the_shards(corpus_run, corpus_catalog: Catalog) -> None:
    _, store = corpus_run
    dataset = corpus_catalog.datasets["corpus_csv"]
    manifest = latest_manifest(store, dataset)
    prefix = f"shards/corpus_csv/v={manifest['version']}"
    shards = pd.concat(
        pd.read_parquet(store.url(f"{prefix}/{s['path']}")) for v in manifest["splits"].values() for s in v["shards"]
    )
    assert {1, 2, 3, 20, 21, 22, 30, 50, 62, 70, 91, 100} <= set(shards["id"])
    assert shards.loc[shards["id"] == 50, "name"].iloc[0] == "two\nlines"
    assert shards.loc[shards["id"] == 50, "_row"].iloc[0] == 2
    assert {400, 1234567890123456789} <= set(shards["id"])
    assert str(shards.loc[shards["id"] == 410, "day"].iloc[0]) == "2024-01-05"  # its own offset not applied
    assert asset_key(dataset, "shards").path[-1] == "shards"


def test_odd_values_reach_the_shards_as_text_a_person_would_read(corpus_run, corpus_catalog: Catalog) -> None:
    _, store = corpus_run
    rows = {}
    for name in ("corpus_jsonl", "corpus_parquet"):
        manifest = latest_manifest(store, corpus_catalog.datasets[name])
        prefix = f"shards/{name}/v={manifest['version']}"
        for v in manifest["splits"].values():
            for s in v["shards"]:
                frame = pd.read_parquet(store.url(f"{prefix}/{s['path']}"))
                rows |= dict(zip(frame["id"], frame["name"], strict=True))
    assert rows[430] == '{"first": "A"}'  # JSON, not Python's repr
    assert rows[450] == "plain"  # Parquet bytes decoded, not "b'plain'"


def test_failing_values_are_shown_cut_short(corpus_run, corpus_catalog: Catalog) -> None:
    """A 10 MiB field fails its length expectation; its sample in the metadata and data docs is cut."""
    _, store = corpus_run
    samples = [
        value
        for name in corpus_catalog.datasets
        for result in current(store, f"validated/{name}")["results"]
        for value in result.get("sample", [])
    ]
    assert any(value.endswith(f"({10 * 2**20:,} characters)") for value in samples), samples
    assert max(len(value) for value in samples) < 300


def test_a_line_break_in_a_value_stays_in_its_table_cell() -> None:
    """Failing values are shown in the UI's markdown tables; a quoted CSV field may hold line breaks."""
    rows = markdown_table(["value", "rows"], [["three\nlines\r\nhere | x", 1]]).splitlines()
    assert rows[2] == "| three\\nlines\\r\\nhere \\| x | 1 |"
    assert len(rows) == 3
