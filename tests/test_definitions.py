"""The code location: assets from the catalogue, grouped by sector; a YAML-only dataset; the UI's view."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pytest
import yaml

from aifactory_assets.catalog import Catalog, load_catalog
from aifactory_assets.definitions import build_definitions
from aifactory_assets.demo import land_demo_data
from aifactory_assets.factory import asset_key, store_key
from aifactory_assets.manifest import latest_manifest
from aifactory_assets.materialize_all import bounded
from aifactory_assets.pools import dataset_pool, held_pools
from schedules.landing_sensor import landing_sensor
from schedules.nightly import nightly_schedule
from tests.conftest import evaluate, free_port, local_stores, pipeline_resources

REPO = Path(__file__).resolve().parent.parent


def test_every_dataset_has_its_assets_grouped_by_sector(catalog: Catalog) -> None:
    defs = build_definitions(catalog)
    dg.Definitions.validate_loadable(defs)
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    for dataset in catalog.datasets.values():
        for stage in ("landing", "raw", "validated", "shards"):
            spec = specs[asset_key(dataset, stage)]
            assert spec.group_name == dataset.sector
            assert spec.tags["site"] == dataset.site
            assert spec.owners == [dataset.owner]
            assert dataset.description in spec.description
    graph = defs.resolve_asset_graph()
    shards = asset_key(catalog.datasets["stock_prices"], "shards")
    assert graph.get(shards).parent_keys == {asset_key(catalog.datasets["stock_prices"], "validated")}


def test_one_step_at_a_time_writes_a_datasets_data(catalog: Catalog, tmp_path: Path) -> None:
    """Each dataset's steps share a pool of their own, limited to one by the instance `make dev` uses (read
    from a copy: opening dagster_home/ itself writes its storage there, beside a running `make dev`)."""
    defs = build_definitions(catalog)
    for dataset in catalog.datasets.values():
        pools = {defs.resolve_assets_def(asset_key(dataset, s)).op.pool for s in ("raw", "validated", "shards")}
        assert pools == {f"aifactory/{dataset.name}"}
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:  # disposed: its SQLite closed in order
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1


def test_a_headless_run_names_the_pool_slots_others_hold(catalog: Catalog, tmp_path: Path) -> None:
    """A run killed outright keeps its slot: `make materialize` says so instead of waiting in silence."""
    shutil.copy(Path(__file__).parents[1] / "dagster_home" / "dagster.yaml", tmp_path)
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    assert held_pools(instance, list(catalog.datasets.values())) == []
    dataset = catalog.datasets["stock_prices"]
    storage = instance.event_log_storage
    storage.initialize_concurrency_limit_to_default(dataset_pool(dataset))
    assert storage.claim_concurrency_slot(dataset_pool(dataset), "killed-run", "stock_prices__raw").is_claimed
    [message] = held_pools(instance, list(catalog.datasets.values()))
    assert "aifactory/stock_prices" in message and "killed-run" in message and "terminate it" in message
    assert held_pools(instance, [catalog.datasets["palmer_penguins"]]) == []  # DATASETS=palmer_penguins waits not
    storage.free_concurrency_slots_for_run("killed-run")
    assert held_pools(instance, list(catalog.datasets.values())) == []


def test_whoever_starts_runs_sets_each_pool_up_front(catalog: Catalog, tmp_path: Path) -> None:
    """Dagster sets a pool's limit at its first claim, and two processes claiming a new pool at once both
    got a slot: a sensor or schedule tick sets its site's pools first, from the instance's default (marked
    as the default, as Dagster marks it), and a limit set by hand stays."""
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path)
    stores = local_stores(catalog, tmp_path / "stores")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        assert storage.get_concurrency_keys() == set()
        storage.set_concurrency_slots(dataset_pool(catalog.datasets["seattle_weather"]), 3)
        evaluate(landing_sensor(catalog, "linkoping"), stores["linkoping"], None, instance)
        for site in ("kajaani", "bologna"):
            schedule = nightly_schedule(catalog, site)
            with dg.build_schedule_context(resources={store_key(site): stores[site]}, instance=instance) as context:
                schedule.evaluate_tick(context)
        limits = {(limit.name, limit.limit, limit.from_default) for limit in storage.get_pool_limits()}
        datasets = [catalog.datasets_of(site)[0] for site in ("linkoping", "kajaani", "bologna")]
        assert limits == {
            (dataset_pool(datasets[0]), 1, True),
            (dataset_pool(datasets[1]), 3, False),
            (dataset_pool(datasets[2]), 1, True),
        }


def test_a_pool_the_storage_will_not_set_up_fails_no_tick(
    catalog: Catalog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Two processes setting up one new pool on Postgres: the loser's failed insert spoils its transaction.
    The sensor's tick goes on, with a warning (Dagster sets the pool at its first claim)."""
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", tmp_path)
    store = local_stores(catalog, tmp_path / "stores")["linkoping"]
    store.write_bytes("landing/palmer_penguins/a.csv", b"record_id,species\n1,Adelie\n")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:

        def refused(pool: str) -> bool:
            raise RuntimeError(f"current transaction is aborted ({pool})")

        monkeypatch.setattr(instance.event_log_storage, "initialize_concurrency_limit_to_default", refused)
        result = evaluate(landing_sensor(catalog, "linkoping"), store, None, instance)
    assert json.loads(result.cursor)["palmer_penguins"]["seen"]  # the tick listed the landing zone
    assert "not all set up before their first claim (RuntimeError: current transaction is aborted" in caplog.text


BARLEY_YAML = {
    "name": "barley_trials",
    "sector": "agrifood",
    "site": "bologna",
    "description": "Minnesota barley yield trials (1931-1932), a classic agronomy dataset.",
    "owner": "team:bologna-agrifood",
    "source": {"format": "csv", "landing": "*.csv"},
    "schema": {
        "key": ["variety", "year", "site"],
        "columns": [
            {"name": "yield", "type": "float64", "nullable": False},
            {"name": "variety", "type": "string", "nullable": False},
            {"name": "year", "type": "int32", "nullable": False},
            {"name": "site", "type": "string", "nullable": False},
        ],
    },
    "suite": "suites/barley_trials.json",
    "shards": {"target_rows": 40, "seed": 7},
}
BARLEY_SUITE = {
    "name": "barley_trials",
    "expectations": [
        {"type": "expect_column_values_to_be_between", "kwargs": {"column": "yield", "min_value": 0, "max_value": 100}},
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "year", "value_set": [1931, 1932]}},
    ],
}


def test_a_headless_run_of_one_dataset_says_what_failed_and_why(
    catalog: Catalog, tmp_path: Path, dask_address: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`make materialize DATASETS=...` runs those datasets alone and prints, per failed check, its severity
    and why (a refused file's reason), not only the check's name; an unknown name is refused."""
    from aifactory_assets import materialize_all

    monkeypatch.setenv("AIFACTORY_HOME", str(tmp_path))
    monkeypatch.setenv("AIFACTORY_DASK_SCHEDULER", dask_address)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    stores = local_stores(catalog, tmp_path)
    land_demo_data(catalog, stores)
    stores["linkoping"].write_bytes("landing/palmer_penguins/drift.csv", b"record_id,species\n7,Adelie\n")
    assert materialize_all.main(["palmer_penguins"]) == 0  # a refused file only warns
    shown = capsys.readouterr().out
    assert "warn: life_sciences/palmer_penguins/raw:landed_files_read: landing/palmer_penguins/drift.csv: " in shown
    assert "schema drift" in shown
    table = shown.split("manifest\n", 1)[1].split("\nwarn:", 1)[0].splitlines()
    assert [row.split()[0] for row in table] == ["palmer_penguins"]
    assert not stores["bologna"].exists("raw")  # no other dataset ran
    assert materialize_all.main(["palmer_pengiuns"]) == 2
    assert "no dataset(s) ['palmer_pengiuns'] in the catalogue" in capsys.readouterr().err


def test_a_headless_run_says_why_a_step_failed_not_that_dagster_wrapped_it(catalog: Catalog, tmp_path: Path) -> None:
    """`make materialize` with no Dask scheduler where AIFACTORY_DASK_SCHEDULER points: the summary gives the
    error aifactory raised, naming the setting, not Dagster's "Error occurred while executing op"; and no
    Data Docs page, as this run validated nothing."""
    land_demo_data(catalog, local_stores(catalog, tmp_path))
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    env |= {"AIFACTORY_HOME": str(tmp_path), "AIFACTORY_DASK_SCHEDULER": address}
    env["DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"] = "2s"  # not Dask's 30 s wait on a port nothing serves
    out = subprocess.run(
        [sys.executable, "-m", "aifactory_assets.materialize_all", "palmer_penguins"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1, out.stdout + out.stderr[-3000:]
    assert (
        "step life_sciences__palmer_penguins__raw failed: ConnectionError: Dask: no client of the scheduler at "
        f"{address}: see AIFACTORY_DASK_SCHEDULER"
    ) in out.stdout
    assert "DagsterExecutionStepExecutionError" not in out.stdout
    assert "Data Docs" not in out.stdout


def test_a_failed_headless_run_names_every_refusal_its_data_docs_and_a_damaged_manifest(
    catalog: Catalog, tmp_path: Path, dask_address: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A run whose critical expectation fails, with twelve files refused and the latest manifest cut short:
    the summary names the first eight refused files, counts the others but the last, names that one, links
    the Data Docs page this run wrote (not `latest.html`, an earlier run's where validation did not run), and
    says on the dataset's line which manifest it could not read instead of ending in a traceback."""
    from aifactory_assets import materialize_all

    monkeypatch.setenv("AIFACTORY_HOME", str(tmp_path))
    monkeypatch.setenv("AIFACTORY_DASK_SCHEDULER", dask_address)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    stores = local_stores(catalog, tmp_path)
    land_demo_data(catalog, stores)
    store = stores["linkoping"]
    landed = store.read_bytes("landing/palmer_penguins/palmer_penguins.csv").decode().splitlines()
    store.write_bytes("landing/palmer_penguins/palmer_penguins.csv", "\n".join(landed[:101]).encode() + b"\n")
    for i in range(12):
        store.write_bytes(f"landing/palmer_penguins/drift{i:02}.csv", f"record_id,species\n{i},Adelie\n".encode())
    version = "0123456789abcdef"
    manifest = f"shards/palmer_penguins/v={version}/manifest.json"
    store.write_json("shards/palmer_penguins/_latest", {"version": version, "manifest": f"v={version}/manifest.json"})
    store.write_bytes(manifest, f'{{"version": "{version}", "conserv'.encode())  # cut short

    assert materialize_all.main(["palmer_penguins"]) == 1
    shown = capsys.readouterr().out
    run_id = shown.split("\nrun ", 1)[1].split(":", 1)[0]
    [row] = [line for line in shown.splitlines() if line.startswith("palmer_penguins ")]
    assert store.url(manifest) in row and "JSON" in row  # the key, and why: not JSON
    assert "warn: life_sciences/palmer_penguins/raw:landed_files_read: landing/palmer_penguins/drift" in shown
    assert shown.count("landing/palmer_penguins/drift") == 9 and "drift07.csv" in shown and "drift11.csv" in shown
    assert "drift08.csv" not in shown and "… and 3 more" in shown
    assert "error: life_sciences/palmer_penguins/validated:critical_expectations: failed: " in shown
    assert f"this run's Data Docs: {store.url(f'reports/palmer_penguins/validation-{run_id}.html')}\n" in shown
    assert "latest.html" not in shown


def test_a_headless_runs_summary_keeps_what_a_long_failure_says_to_do() -> None:
    """A failure's last words say what to do (the key to remove): a line too long for the summary loses its
    middle, not its end, and a failure of many lines keeps its last."""
    key = "s3://bucket/shards/x/v=0123456789abcdef/manifest.json"
    line = f"x: version 0123456789abcdef does not pass {'a.parquet: checksum differs; ' * 40}remove {key} and run again"
    shown = bounded(line)
    assert len(shown) == 400 and shown.startswith("x: version 0123456789abcdef")
    assert shown.endswith(f"remove {key} and run again")
    many = bounded("\n".join([*(f"shard-{i}: missing" for i in range(30)), f"remove {key}"]))
    assert many.splitlines() == [
        "shard-0: missing",
        *(f"    shard-{i}: missing" for i in range(1, 8)),
        "    … and 22 more",
        f"    remove {key}",
    ]


def test_a_dataset_added_as_yaml_becomes_assets_with_no_code(tmp_path: Path, dask) -> None:
    root = tmp_path / "catalog"
    shutil.copytree(REPO / "catalog", root)
    (root / "datasets" / "barley_trials.yaml").write_text(yaml.safe_dump(BARLEY_YAML))
    (root / "suites" / "barley_trials.json").write_text(json.dumps(BARLEY_SUITE))
    catalog = load_catalog(root)
    defs = build_definitions(catalog)

    dataset = catalog.datasets["barley_trials"]
    keys = {spec.key for spec in defs.resolve_all_asset_specs()}
    assert {asset_key(dataset, s) for s in ("landing", "raw", "validated", "shards")} <= keys
    repository = defs.get_repository_def()
    nightly = repository.get_job(repository.get_schedule_def("bologna_nightly").job_name)
    assert asset_key(dataset, "shards") in nightly.asset_layer.executable_asset_keys

    from vega_datasets import local_data

    stores = local_stores(catalog, tmp_path / "stores")
    stores["bologna"].write_bytes("landing/barley_trials/barley.csv", local_data.barley().to_csv(index=False).encode())
    result = dg.materialize(
        [a for a in defs.assets if isinstance(a, dg.AssetsDefinition) and a.key.path[1] == "barley_trials"],
        resources=pipeline_resources(stores, dask),
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    manifest = latest_manifest(stores["bologna"], dataset)
    assert manifest["conservation"]["rows_read"] == 120
    # 120 rows of which 2 repeat a (variety, year, site) key in the published data.
    assert manifest["conservation"]["rows_sharded"] + manifest["conservation"]["duplicates_dropped"] == 120
    train = manifest["splits"]["train"]["shards"]
    assert len(train) >= 2 and max(s["rows"] for s in train) - min(s["rows"] for s in train) <= 1


@pytest.fixture(scope="module")
def webserver(tmp_path_factory: pytest.TempPathFactory):
    """The real UI server on the repo's workspace.yaml, as `make dev` starts it."""
    home = tmp_path_factory.mktemp("dagster_home")
    port = free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "AIFACTORY_HOME": str(home / "stores")}
    server = subprocess.Popen(
        [sys.executable, "-m", "dagster_webserver", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/server_info", timeout=2)
            break
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"dagster-webserver exited: {server.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.5)
    else:
        server.kill()
        raise RuntimeError("dagster-webserver did not answer within 120 s")
    yield url
    server.terminate()
    server.wait(timeout=30)


def graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(f"{url}/graphql", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        payload = json.loads(response.read())
    assert "errors" not in payload, payload
    return payload["data"]


REPOSITORY_QUERY = """
query Location($cursor: Float) {
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes {
        location { name }
        assetNodes {
          assetKey { path }
          groupName
          metadataEntries { label ... on TableSchemaMetadataEntry { schema { columns { name } } } }
          assetChecksOrError { ... on AssetChecks { checks { name description } } }
        }
        schedules { name executionTimezone futureTicks(cursor: $cursor, limit: 1) { results { timestamp } } }
        sensors { name }
      }
    }
    ... on PythonError { message }
  }
}
"""


def test_webserver_lists_every_asset_schedule_and_sensor(webserver: str, catalog: Catalog) -> None:
    winter = datetime(2026, 1, 15, 12, 0, tzinfo=UTC).timestamp()
    data = graphql(webserver, REPOSITORY_QUERY, {"cursor": winter})
    (repo,) = data["repositoriesOrError"]["nodes"]
    assert repo["location"]["name"] == "aifactory"
    nodes = {tuple(a["assetKey"]["path"]): a for a in repo["assetNodes"]}
    for dataset in catalog.datasets.values():
        shards = nodes[(dataset.sector, dataset.name, "shards")]
        assert shards["groupName"] == dataset.sector
        # Before any run: the columns the catalogue declares, and what each check asks.
        (schema,) = [e for e in shards["metadataEntries"] if e["label"] == "dagster/column_schema"]
        assert [c["name"] for c in schema["schema"]["columns"]] == [*dataset.table.names, "_source", "_row"]
        checks = shards["assetChecksOrError"]["checks"]
        assert {c["name"] for c in checks} == {"schema_matches_catalog", "conservation", "shards_match_manifest"}
        assert all(c["description"] for c in checks)
    assert {s["name"] for s in repo["sensors"]} == {f"{site}_landing_sensor" for site in catalog.sites}

    ticks = {s["name"]: s for s in repo["schedules"]}
    # 02:00 local time the next night: Lisbon is not a factory; Madrid is UTC+1 and Athens UTC+2 in January.
    assert ticks["barcelona_nightly"]["executionTimezone"] == "Europe/Madrid"
    next_barcelona = ticks["barcelona_nightly"]["futureTicks"]["results"][0]["timestamp"]
    next_athens = ticks["athens_nightly"]["futureTicks"]["results"][0]["timestamp"]
    assert datetime.fromtimestamp(next_barcelona, UTC) == datetime(2026, 1, 16, 1, 0, tzinfo=UTC)
    assert datetime.fromtimestamp(next_athens, UTC) == datetime(2026, 1, 16, 0, 0, tzinfo=UTC)

    summer = graphql(webserver, REPOSITORY_QUERY, {"cursor": datetime(2026, 7, 1, 12, 0, tzinfo=UTC).timestamp()})
    summer_ticks = {s["name"]: s for s in summer["repositoriesOrError"]["nodes"][0]["schedules"]}
    next_kajaani = summer_ticks["kajaani_nightly"]["futureTicks"]["results"][0]["timestamp"]
    assert datetime.fromtimestamp(next_kajaani, UTC) == datetime(2026, 7, 1, 23, 0, tzinfo=UTC)  # UTC+3 (EEST)


def test_dagster_cli_validates_the_code_location(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path), "AIFACTORY_HOME": str(tmp_path / "stores")}
    dagster = Path(sys.executable).with_name("dagster")
    out = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
