"""Runs queued or running: what the sensor and the nightly wait for rather than ask for the same work again."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg

from aifactory_assets.catalog import Dataset
from aifactory_assets.factory import asset_key

FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
# Every other status, CANCELING included: a run being cancelled may still be writing its raw step.
UNFINISHED = [status for status in dg.DagsterRunStatus if status not in FINISHED]


# The default run launcher cannot see a run worker die: its run stays STARTED. Clearly longer than the
# nightly's period: last night's run still going at 02:00 is a day old, give or take the daemon's seconds of
# lag (25 h across the autumn clock change), and at a day exactly it was waited for, or run a second time
# beside itself, by chance. A run whose worker died holds its datasets back one night, not every night.
STUCK_AFTER = timedelta(hours=36)


ASSET_JOB = "__ASSET_JOB"  # Dagster's job of every asset: a run of it without a selection runs them all


@dataclass(frozen=True)
class UnfinishedRun:
    run_id: str
    selection: frozenset[dg.AssetKey] | None  # None: every asset (the whole asset job, `make materialize`)


def unfinished_runs(instance: dg.DagsterInstance) -> list[UnfinishedRun]:
    """Each queued or running run and the assets it materialises (any trigger: a sensor, the nightly, a
    person's "Materialize" in the UI). Not runs made more than STUCK_AFTER ago: one whose worker was killed
    would otherwise hold its datasets back every night until someone ends it in the UI."""
    since = datetime.now(UTC) - STUCK_AFTER
    return [
        UnfinishedRun(run.run_id, selected(run))
        for run in instance.get_runs(dg.RunsFilter(statuses=UNFINISHED, created_after=since))
    ]


def selected(run: dg.DagsterRun) -> frozenset[dg.AssetKey] | None:
    """The assets a run materialises; None for all (a run of the whole asset job has no selection)."""
    if run.asset_selection:
        return frozenset(run.asset_selection)
    return None if run.job_name == ASSET_JOB else frozenset()


def run_ingesting(runs: list[UnfinishedRun], dataset: Dataset, besides: str | None = None) -> str | None:
    """The id of a queued or running run that materialises `dataset`'s raw asset (which lists the landing
    zone as it starts and ingests what it finds), or None. `besides`: a run that has listed already (the
    one that published raw, still running its later steps)."""
    raw = asset_key(dataset, "raw")
    return next(
        (run.run_id for run in runs if (run.selection is None or raw in run.selection) and run.run_id != besides),
        None,
    )
