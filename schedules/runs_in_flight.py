"""Runs queued or running: what the sensor and the nightly wait for rather than ask for the same work again."""

from __future__ import annotations

import dagster as dg

from aifactory_assets.catalog import Dataset
from aifactory_assets.factory import asset_key

UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def unfinished_runs(instance: dg.DagsterInstance) -> dict[str, frozenset[dg.AssetKey]]:
    """Each queued or running run's id and the assets it materialises (any trigger: a sensor, the nightly,
    a person's "Materialize" in the UI)."""
    runs = instance.get_runs(dg.RunsFilter(statuses=UNFINISHED))
    return {run.run_id: frozenset(run.asset_selection or ()) for run in runs}


def run_ingesting(runs: dict[str, frozenset[dg.AssetKey]], dataset: Dataset) -> str | None:
    """A queued or running run that materialises `dataset`'s raw asset, which lists the landing zone as it
    starts and ingests what it finds: the id of one, or None."""
    raw = asset_key(dataset, "raw")
    return next((run_id for run_id, selection in runs.items() if raw in selection), None)
