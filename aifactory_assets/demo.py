"""Put the demo catalogue's real data into each site's landing zone, as a partner would drop it.

`python -m aifactory_assets.demo` writes `landing/<dataset>/<dataset>.<csv|parquet|jsonl>` into the
store the environment configures for each site. Existing files are left alone, so re-running does not
look like a new drop to the landing sensors.
"""

from __future__ import annotations

import io

import pandas as pd

from aifactory_assets.catalog import Catalog, Dataset, load_catalog
from aifactory_assets.demo_sources import DEMO_SOURCES
from aifactory_assets.ingest import landing_prefix
from resources.object_store import ObjectStore, object_stores_for


def encode(frame: pd.DataFrame, dataset: Dataset) -> bytes:
    """The frame in the dataset's landing format; dates as ISO text where the format has no date type."""
    fmt = dataset.source.format
    if fmt == "parquet":
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()
    dates = {
        c.name: "%Y-%m-%d" if c.type == "date" else "%Y-%m-%dT%H:%M:%S"
        for c in dataset.table.columns
        if c.type in ("date", "timestamp")
    }
    text = frame.assign(**{name: frame[name].dt.strftime(f) for name, f in dates.items()})
    if fmt == "csv":
        return text.to_csv(index=False, sep=dataset.source.options.delimiter).encode()
    return text.to_json(orient="records", lines=True).encode()


def landing_key(dataset: Dataset) -> str:
    return f"{landing_prefix(dataset)}/{dataset.name}.{dataset.source.format}"


def land_demo_data(catalog: Catalog, stores: dict[str, ObjectStore], overwrite: bool = False) -> list[str]:
    """Land every demo dataset that has a loader; returns the URLs written."""
    written = []
    for dataset in catalog.datasets.values():
        loader = DEMO_SOURCES.get(dataset.name)
        store = stores[dataset.site]
        if loader is None or (store.exists(landing_key(dataset)) and not overwrite):
            continue
        store.ensure_root()
        store.write_bytes(landing_key(dataset), encode(loader(), dataset))
        written.append(store.url(landing_key(dataset)))
    return written


def stores_from_env(catalog: Catalog) -> dict[str, ObjectStore]:
    """Each site's store as the environment configures it, with secrets resolved (outside Dagster)."""
    stores = object_stores_for({site.id: site.storage.bucket for site in catalog.sites.values()})
    return {site: store.process_config_and_initialize() for site, store in stores.items()}


def main() -> None:
    catalog = load_catalog()
    written = land_demo_data(catalog, stores_from_env(catalog))
    print(f"landed {len(written)} demo file(s)" + "".join(f"\n  {url}" for url in written))


if __name__ == "__main__":
    main()
