"""Generations: a stage writes its parts under `run=<id>/`, then a `_current.json` pointer makes them visible.

Readers follow the pointer and never list, so a run that dies mid-write leaves nothing visible. A publish
removes the generation it replaces, and the leftovers of runs the Dagster instance knows are over; a
generation of a run still going, or of one the instance does not know (another deployment's, sharing the
bucket), may be being written: it stays.
"""

from __future__ import annotations

import posixpath
import time
from collections.abc import Callable
from typing import Any

from resources.object_store import ObjectStore

POINTER = "_current.json"


def generation_prefix(prefix: str, run_id: str) -> str:
    return f"{prefix}/run={run_id}"


def publish(
    store: ObjectStore, prefix: str, run_id: str, record: dict[str, Any], is_finished: Callable[[str], bool]
) -> dict[str, Any]:
    """Point `prefix` at this run's generation, then drop the one the pointer named before (whole, and now
    replaced) and the others whose runs `is_finished` says are over."""
    previous = current(store, prefix)
    replaced = f"run={previous['run_id']}" if previous else None
    record = {
        **record,
        "run_id": run_id,
        "generation": generation_prefix(prefix, run_id),
        "published_at": time.time(),
    }
    store.write_json(f"{prefix}/{POINTER}", record)
    if store.exists(prefix):
        for path in store.fs.ls(store.path(prefix), detail=False):
            name = posixpath.basename(path.rstrip("/"))
            if not name.startswith("run=") or name == f"run={run_id}":
                continue
            if name == replaced or is_finished(name.removeprefix("run=")):
                store.delete(f"{prefix}/{name}")
    return record


def current(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    key = f"{prefix}/{POINTER}"
    return store.read_json(key) if store.exists(key) else None


def require_current(store: ObjectStore, prefix: str, upstream: str) -> dict[str, Any]:
    record = current(store, prefix)
    if record is None:
        raise FileNotFoundError(f"{store.url(prefix)} has no published generation: materialise {upstream} first")
    return record
