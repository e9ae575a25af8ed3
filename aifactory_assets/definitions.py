"""The aifactory code location: every dataset of every site, from the catalogue."""

from __future__ import annotations

import dagster as dg

from aifactory_assets.catalog import Catalog, load_catalog
from aifactory_assets.factory import build_catalog_assets, store_key
from resources import dask_cluster_from_env, object_stores_for
from schedules import landing_sensors, nightly_schedules


def site_stores(catalog: Catalog) -> dict[str, dg.ConfigurableResource]:
    stores = object_stores_for({site.id: site.storage.bucket for site in catalog.sites.values()})
    return {store_key(site): store for site, store in stores.items()}


def build_definitions(catalog: Catalog) -> dg.Definitions:
    """Steps run in one process per run: Dask parallelises inside each step, and the run's steps share one
    Dask cluster instead of starting one per step."""
    return dg.Definitions(
        assets=build_catalog_assets(catalog),
        schedules=nightly_schedules(catalog),
        sensors=landing_sensors(catalog),
        resources={**site_stores(catalog), "dask": dask_cluster_from_env()},
        executor=dg.in_process_executor,
    )


defs = build_definitions(load_catalog())
