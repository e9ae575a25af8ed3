"""Runs queued or running: what the sensor and the nightly wait for rather than ask for the same work again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg

from aifactory_assets.catalog import Dataset
from aifactory_assets.factory import asset_key

UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


STUCK_AFTER = timedelta(days=1)  # the default run launcher cannot see a run worker die: its run stays STARTED


def unfinished_runs(instance: dg.DagsterInstance) -> dict[str, frozenset[dg.AssetKey]]:
    """Each queued or running run's id and the assets it materialises (any trigger: a sensor, the nightly,
    a person's "Materialize" in the UI). Not runs made more than STUCK_AFTER ago: one whose worker was
    killed would otherwise hold its datasets back every night until someone ends it in the UI."""
    since = datetime.now(UTC) - STUCK_AFTER
    runs = instance.get_runs(dg.RunsFilter(statuses=UNFINISHED, created_after=since))
    return {run.run_id: frozenset(run.asset_selection or ()) for run in runs}


def run_ingesting(runs: dict[str, frozenset[dg.AssetKey]], dataset: Dataset, besides: str | None = None) -> str | None:
    """A queued or running run that materialises `dataset`'s raw asset, which lists the landing zone as it
    starts and ingests what it finds: the id of one, or None. `besides`: a run that has listed already (the
    one that published raw, still running its later steps)."""
    raw = asset_key(dataset, "raw")
    return next((run for run, selection in runs.items() if raw in selection and run != besides), None)
