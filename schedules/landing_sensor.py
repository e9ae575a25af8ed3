"""Landing-zone sensors: one per site; a new or changed file under `landing/<dataset>/` starts a run of
that dataset's assets. The cursor remembers each file's fingerprint, so a file is picked up once."""

import hashlib
import json

import dagster as dg

from aifactory_assets.catalog import Catalog, Dataset
from aifactory_assets.factory import dataset_selection, materialisable_keys, store_key
from aifactory_assets.ingest import landed_objects

MINIMUM_INTERVAL_SECONDS = 30


def landing_sensor(catalog: Catalog, site: str) -> dg.SensorDefinition:
    datasets = catalog.datasets_of(site)

    @dg.sensor(
        name=f"{site}_landing_sensor",
        description=f"Starts a run for each dataset of {site} whose landing zone has new or changed files.",
        target=dataset_selection(datasets),
        minimum_interval_seconds=MINIMUM_INTERVAL_SECONDS,
        required_resource_keys={store_key(site)},
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        store = getattr(context.resources, store_key(site))
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        requests = []
        for dataset in datasets:
            current = {o.key: o.fingerprint() for o in landed_objects(store, dataset)}
            new = sorted(k for k, fp in current.items() if seen.get(k) != fp)
            if new:
                requests.append(_run_request(dataset, new, current))
            seen.update(current)
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(seen, sort_keys=True))

    return sensor


def _run_request(dataset: Dataset, new: list[str], current: dict[str, str]) -> dg.RunRequest:
    digest = hashlib.sha256("\n".join(current[k] for k in new).encode()).hexdigest()[:16]
    return dg.RunRequest(
        run_key=f"{dataset.name}-{digest}",
        asset_selection=materialisable_keys(dataset),
        tags={"site": dataset.site, "dataset": dataset.name, "trigger": "landing"},
    )


def landing_sensors(catalog: Catalog) -> list[dg.SensorDefinition]:
    return [landing_sensor(catalog, site) for site in catalog.sites if catalog.datasets_of(site)]
