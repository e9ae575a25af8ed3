"""Generations: a stage writes its parts under `run=<id>/`, then a `_current.json` pointer makes them visible.

Readers follow the pointer and never list, so a run that dies mid-write leaves nothing visible. A publish
removes the generations of runs the Dagster instance knows are over, the one it replaces among them. A
generation of a run it does not know (another deployment's, sharing the bucket) may be being written or
read: one never named stays; one the pointer named goes a publish later, when it has been replaced twice
(a reader that followed the pointer just before has a publish's grace).
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


def part_key(generation: str, index: int) -> str:
    """A generation's `index`-th part: a raw or quarantine part per landed file, in the ledger's order."""
    return f"{generation}/part-{index:05d}.parquet"


def publish(
    store: ObjectStore, prefix: str, run_id: str, record: dict[str, Any], is_finished: Callable[[str], bool]
) -> dict[str, Any]:
    """Point `prefix` at this run's generation, by a conditional write (what it replaces is what was there),
    then drop the generations of runs `is_finished` says are over, and the one the previous publish
    replaced."""
    generation, graced = generation_prefix(prefix, run_id), []

    def pointed(previous: dict[str, Any] | None) -> dict[str, Any]:
        previous = previous or {}
        retried = previous.get("generation") == generation  # a step's retry replaces what its first try did
        replaces = previous.get("replaces" if retried else "generation")
        # What the previous publish replaced has had its publish of grace. On a retry that publish is this
        # run's first try, which removed its own; the one it replaced has had none yet.
        graced[:] = [None if retried else previous.get("replaces")]
        return {**record, "run_id": run_id, "generation": generation, "replaces": replaces, "published_at": time.time()}

    written = store.update_json(f"{prefix}/{POINTER}", pointed)
    replaced_before = posixpath.basename(graced[0] or "")
    if store.exists(prefix):
        for path in store.fs.ls(store.path(prefix), detail=False):
            name = posixpath.basename(path.rstrip("/"))
            if not name.startswith("run=") or name == f"run={run_id}":
                continue
            if name == replaced_before or is_finished(name.removeprefix("run=")):
                store.delete(f"{prefix}/{name}")
    return written


def current(store: ObjectStore, prefix: str) -> dict[str, Any] | None:
    key = f"{prefix}/{POINTER}"
    return store.read_json(key) if store.exists(key) else None


def require_current(store: ObjectStore, prefix: str, upstream: str) -> dict[str, Any]:
    record = current(store, prefix)
    if record is None:
        raise FileNotFoundError(f"{store.url(prefix)} has no published generation: materialise {upstream} first")
    return record
