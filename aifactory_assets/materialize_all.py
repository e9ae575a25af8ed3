"""Headless: materialise every asset of the catalogue (or of the datasets named), then print where each
dataset's shards landed and, where something failed, what and why.

`python -m aifactory_assets.materialize_all [dataset ...]` (what `make materialize [DATASETS="a b"]`
runs). With DAGSTER_HOME set, the run is recorded in that instance, so the UI shows it afterwards.
"""

from __future__ import annotations

import os
import sys

import dagster as dg

from aifactory_assets.catalog import Dataset, load_catalog
from aifactory_assets.definitions import build_definitions
from aifactory_assets.demo import stores_from_env
from aifactory_assets.factory import dataset_pool, materialisable_keys
from aifactory_assets.manifest import latest_manifest


def held_pools(instance: dg.DagsterInstance, datasets: list[Dataset]) -> list[str]:
    """The datasets' pool slots other runs hold, said before this run waits on them: silently, and for
    good when the holder was killed outright (it stays STARTED until terminated in the UI)."""
    if not instance.event_log_storage.supports_global_concurrency_limits:
        return []
    held = []
    for dataset in datasets:
        pool = dataset_pool(dataset)
        for slot in instance.event_log_storage.get_concurrency_info(pool).claimed_slots:
            run = instance.get_run_by_id(slot.run_id)
            status = run.status.value if run else "unknown to this instance"
            held.append(
                f"pool {pool} is held by run {slot.run_id} ({status}, step {slot.step_key}): this run waits for "
                "it; if that run is dead, terminate it in the Dagster UI (Runs, Terminate, then force)"
            )
    return held


def failures(result: dg.ExecuteInProcessResult) -> list[str]:
    """What failed, and why, one line each: a failed step's error (a threshold, a refusal), then each
    failed check's severity and description (the expectations or files behind it)."""
    lines = [
        f"step {event.step_key} failed: {first_line(event.event_specific_data.error.message)}"
        for event in result.all_events
        if event.is_step_failure
    ]
    for check in result.get_asset_check_evaluations():
        if not check.passed:
            why = first_line(check.description or "")
            lines.append(
                f"{check.severity.value.lower()}: {check.asset_key.to_user_string()}:{check.check_name}: {why}"
            )
    return lines


def first_line(text: str, limit: int = 400) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def main(names: list[str]) -> int:
    catalog = load_catalog()
    if unknown := sorted(set(names) - set(catalog.datasets)):
        print(f"no dataset(s) {unknown} in the catalogue; it has {sorted(catalog.datasets)}", file=sys.stderr)
        return 2
    chosen = [catalog.datasets[name] for name in names] or list(catalog.datasets.values())
    defs = build_definitions(catalog)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    for message in held_pools(instance, chosen):
        print(message, file=sys.stderr)
    job = defs.resolve_implicit_global_asset_job_def()
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    selection = [key for dataset in chosen for key in materialisable_keys(dataset)] if names else None
    result = job.execute_in_process(
        instance=instance, raise_on_error=False, run_config=quiet, asset_selection=selection
    )
    stores = stores_from_env(catalog)
    errors = [
        e for e in result.get_asset_check_evaluations() if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR
    ]  # warnings only warn
    print(f"\nrun {result.run_id}: {'succeeded' if result.success else 'FAILED'}")
    print(f"{'dataset':26} {'site':10} {'version':17} {'rows':>7}  manifest")
    for dataset in chosen:
        store = stores[dataset.site]
        manifest = latest_manifest(store, dataset)
        if manifest is None:
            print(f"{dataset.name:26} {dataset.site:10} {'-':17} {'-':>7}  (no committed version)")
            continue
        rows = manifest["conservation"]["rows_sharded"]
        where = store.url(f"shards/{dataset.name}/v={manifest['version']}/manifest.json")
        if manifest["producer"]["dagster_run_id"] != result.run_id:
            where += "  (made by an earlier run)"
        print(f"{dataset.name:26} {dataset.site:10} {manifest['version']:17} {rows:>7}  {where}")
    for line in failures(result):
        print(line)
    if not result.success or errors:
        print(
            "each validated step's Data Docs: "
            + ", ".join(stores[d.site].url(f"reports/{d.name}/latest.html") for d in chosen)
        )
    return 0 if result.success and not errors else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
