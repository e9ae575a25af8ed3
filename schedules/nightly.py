"""Nightly refresh: one schedule per site, at 02:00 in the site's own time zone."""

from __future__ import annotations

import dagster as dg

from aifactory_assets.catalog import Catalog
from aifactory_assets.factory import dataset_selection

NIGHTLY_CRON = "0 2 * * *"


def nightly_schedules(catalog: Catalog) -> list[dg.ScheduleDefinition]:
    return [
        dg.ScheduleDefinition(
            name=f"{site.id}_nightly",
            cron_schedule=NIGHTLY_CRON,
            execution_timezone=site.timezone,
            target=dataset_selection(catalog.datasets_of(site.id)),
            description=f"Re-materialise every dataset of {site.name} ({site.city}) at 02:00 {site.timezone}.",
            tags={"site": site.id, "trigger": "nightly"},
            default_status=dg.DefaultScheduleStatus.RUNNING,
        )
        for site in catalog.sites.values()
        if catalog.datasets_of(site.id)
    ]
