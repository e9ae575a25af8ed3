"""Dagster resources: each factory site's object store and the Dask cluster."""

from resources.dask_cluster import DaskCluster, dask_cluster_from_env, prepare_workers
from resources.object_store import ObjectInfo, ObjectStore, object_store_for, object_stores_for

__all__ = [
    "DaskCluster",
    "ObjectInfo",
    "ObjectStore",
    "dask_cluster_from_env",
    "object_store_for",
    "object_stores_for",
    "prepare_workers",
]
