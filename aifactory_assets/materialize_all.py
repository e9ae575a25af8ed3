"""Headless: materialise every asset of the catalogue (or of the datasets named), then print where each
dataset's shards landed and, where something failed, what and why.

`python -m aifactory_assets.materialize_all [dataset ...]` (what `make materialize [DATASETS="a b"]`
runs). With DAGSTER_HOME set, the run is recorded in that instance, so the UI shows it afterwards.
"""

from __future__ import annotations

import os
import sys

import dagster as dg
from dagster._utils.error import SerializableErrorInfo  # a step failure's error, as Dagster records it

from aifactory_assets.catalog import Dataset, load_catalog
from aifactory_assets.data_docs import report_key
from aifactory_assets.definitions import build_definitions
from aifactory_assets.demo import stores_from_env
from aifactory_assets.factory import materialisable_keys
from aifactory_assets.manifest import committed_by, dataset_prefix, latest_manifest, version_prefix
from aifactory_assets.pools import held_pools, set_up_pools
from aifactory_assets.shard_layout import LATEST, MANIFEST
from resources import ObjectStore

DAGSTER_ERRORS = "dagster._core.errors."  # the module of the errors Dagster wraps user code's in
MOST_LINES = 10  # of a failure's why: the rest are in the Dagster UI
# What reading a manifest raises where it is damaged: cut short (JSON), gone (OS), lacking a field (key),
# not an object (type).
UNREADABLE = (OSError, ValueError, KeyError, TypeError)


def failures(result: dg.ExecuteInProcessResult) -> list[str]:
    """What failed, and why: a failed step's error (a threshold, a refusal, a setting to look at), then
    each failed check's severity and description (the expectations or files behind it)."""
    lines = [
        f"step {event.step_key} failed: {bounded(why_failed(event.event_specific_data.error))}"
        for event in result.all_events
        if event.is_step_failure
    ]
    for check in result.get_asset_check_evaluations():
        if not check.passed:
            lines.append(
                f"{check.severity.value.lower()}: {check.asset_key.to_user_string()}:{check.check_name}: "
                + bounded(check.description or "")
            )
    return lines


def why_failed(error: SerializableErrorInfo) -> str:
    """The error user code raised, as its class and message: Dagster wraps it in errors of its own whose
    message says only which op failed ("Error occurred while executing op ..."). Not the innermost cause:
    aifactory's own errors (a Dask scheduler not there, a 403) name the setting to look at and quote the
    library error beneath, which names neither."""
    while error.cause is not None and error.message.startswith(DAGSTER_ERRORS):
        error = error.cause
    qualified, _, message = error.message.strip().partition(": ")
    return f"{error.cls_name}: {message}" if qualified.endswith(error.cls_name) else error.message


def bounded(text: str, most: int = MOST_LINES, width: int = 400) -> str:
    """`text`'s lines, the first on the summary's line and the rest indented under it, each at most `width`
    long: a description names one refused file or shard a line, and a thousand of them would bury the
    summary (the Dagster UI's check has them all). Past `most` lines, the first ones, a count of those left
    out and the last, and a long line loses its middle: a failure ends with what to do (the key to remove)."""
    lines = [shortened(line, width) for line in text.strip().splitlines()]
    if len(lines) > most:
        first = lines[: max(most - 2, 1)]
        lines = [*first, f"… and {len(lines) - len(first) - 1} more", lines[-1]]
    return "\n    ".join(lines)


def shortened(line: str, width: int) -> str:
    """`line`, cut in the middle to `width` characters where longer: its start and its end are kept."""
    if len(line) <= width:
        return line
    start = (width - 1) // 2
    return f"{line[:start]}…{line[len(line) - (width - 1 - start) :]}"


def manifest_line(store: ObjectStore, dataset: Dataset, run_id: str) -> tuple[str, bool]:
    """The dataset's version, rows and manifest for the summary, and whether its manifest could be read:
    one cut short or damaged is said on the dataset's own line, and the summary goes on."""
    try:
        manifest = latest_manifest(store, dataset)
        if manifest is None:
            return f"{'-':17} {'-':>7}  (no committed version)", True
        version, rows = manifest["version"], manifest["conservation"]["rows_sharded"]
        where = store.url(f"{version_prefix(dataset, version)}/{MANIFEST}")
        if (by := committed_by(manifest)) != run_id:
            where += f"  (committed by another run, {by})"
        return f"{version:17} {rows:>7}  {where}", True
    except dg.Failure as failure:  # manifest.py's own account of a damaged manifest, naming it
        return f"{'-':17} {'-':>7}  {bounded(failure.description or '', most=3)}", False
    except UNREADABLE as exc:
        why = f"{type(exc).__name__}: {bounded(str(exc), most=3)}"
        return f"{'-':17} {'-':>7}  {store.url(manifest_key(store, dataset))} unreadable: {why}", False


def manifest_key(store: ObjectStore, dataset: Dataset) -> str:
    """The key that could not be read: the manifest `_latest` names, or `_latest` itself where that one is
    the damaged one."""
    pointer = f"{dataset_prefix(dataset)}/{LATEST}"
    try:
        return f"{dataset_prefix(dataset)}/{store.read_json(pointer)['manifest']}"
    except UNREADABLE:
        return pointer


def reports_of_run(stores: dict[str, ObjectStore], datasets: list[Dataset], run_id: str) -> list[str]:
    """The Data Docs pages this run wrote: a dataset whose validation did not run in it has none (its
    `latest.html` is an earlier run's, or not there at all)."""
    keys = [(stores[d.site], report_key(d.name, run_id)) for d in datasets]
    return [store.url(key) for store, key in keys if store.exists(key)]


def main(names: list[str]) -> int:
    catalog = load_catalog()
    if unknown := sorted(set(names) - set(catalog.datasets)):
        print(f"no dataset(s) {unknown} in the catalogue; it has {sorted(catalog.datasets)}", file=sys.stderr)
        return 2
    chosen = [catalog.datasets[name] for name in names] or list(catalog.datasets.values())
    defs = build_definitions(catalog)
    instance = dg.DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
    set_up_pools(instance, list(catalog.datasets.values()))
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
    readable = True
    for dataset in chosen:
        line, read = manifest_line(stores[dataset.site], dataset, result.run_id)
        readable &= read
        print(f"{dataset.name:26} {dataset.site:10} {line}")
    for line in failures(result):
        print(line)
    if (not result.success or errors) and (reports := reports_of_run(stores, chosen, result.run_id)):
        print("this run's Data Docs: " + ", ".join(reports))
    return 0 if result.success and not errors and readable else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
