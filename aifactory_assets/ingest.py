"""The `raw` stage: landed files -> typed Parquet with provenance, bad rows and files -> quarantine.

One Dask task per landed file: read, coerce to the declared schema, write the raw part and the
quarantine part, return a small ledger entry. No data passes through the client.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from distributed import Client

from aifactory_assets.catalog import Dataset
from aifactory_assets.landing import UnreadableFile, read_landed
from aifactory_assets.manifest import CODE_FINGERPRINT, LIBRARY_VERSIONS, landed_at, workers_on_other_software
from aifactory_assets.parquet_io import read_bytes, write_parquet
from aifactory_assets.publish import current, generation_prefix, part_key, publish
from aifactory_assets.quarantine import quarantine_rows
from aifactory_assets.schema import ROW, SOURCE, arrow_schema, coerce_frame
from aifactory_assets.tasks import run_tasks
from resources.object_store import ObjectInfo, ObjectStore


def landing_prefix(dataset: Dataset) -> str:
    return f"landing/{dataset.name}"


# What a copy leaves while it writes (rsync's `.name.XXXXXX`, `name.part`, Hadoop's `._COPYING_`) and what
# sits beside data (`_SUCCESS`, `_temporary/`): never data, as for pyarrow.dataset's `ignore_prefixes`.
NOT_DATA_PREFIXES = (".", "_")
IN_PROGRESS_SUFFIXES = (".part", ".partial", ".tmp", ".filepart", ".crdownload", "._COPYING_")


# Seconds a landing zone may keep changing, and an empty object stay empty, before either is taken as it is.
UNSETTLED_AT_MOST = 600


def is_landed_data(key: str) -> bool:
    """Whether a key under the landing zone names data, not a copy in progress or a marker."""
    names = key.split("/")
    return not any(name.startswith(NOT_DATA_PREFIXES) for name in names) and not key.endswith(IN_PROGRESS_SUFFIXES)


def still_arriving(landed: ObjectInfo, now: float) -> bool:
    """Whether an object is an empty placeholder under its final name, its bytes still to come: s3fs-fuse
    (before its PR #1640) and gcsfuse create the object at open() and write it at close(), `touch` then
    fill, an SFTP client that creates the file and stalls. Taken as a file once it has stayed empty for
    UNSETTLED_AT_MOST seconds (an empty file meant as one is then refused, and reported, as ever): a run
    meanwhile would commit a version without its rows, and the bytes another, pushing a good one out."""
    return landed.size == 0 and landed.mtime is not None and now - landed.mtime < UNSETTLED_AT_MOST


def nothing_landed(store: ObjectStore, dataset: Dataset) -> str:
    """A tick's line where no file matches the catalogue's `landing` glob: naming it, for files landed in a
    folder it does not reach."""
    return f"{dataset.name}: nothing landed matching {store.url(landing_prefix(dataset))}/{dataset.source.landing}"


def landed_objects(store: ObjectStore, dataset: Dataset) -> list[ObjectInfo]:
    """The dataset's landed files, oldest first, so that later files win when keys repeat: the one rule for
    the sensor, the nightly and raw."""
    prefix, now = landing_prefix(dataset), time.time()
    found = [
        o
        for o in store.list_objects(prefix, dataset.source.landing)
        if is_landed_data(o.key[len(prefix) + 1 :]) and not still_arriving(o, now)
    ]
    return sorted(found, key=lambda o: (o.mtime or 0, o.key))


def ingest_file(
    source_url: str,
    source_key: str,
    raw_url: str,
    quarantine_url: str,
    dataset: Dataset,
    storage_options: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    """Runs on a worker: one landed file in, one raw part and one quarantine part out."""
    data = read_bytes(source_url, storage_options)  # the store failing fails the run; the data failing, the file
    entry: dict[str, Any] = {
        "source": source_key,
        "sha256": hashlib.sha256(data).hexdigest(),  # of what was read: the version id names these bytes
        "rows_read": 0,
        "rows_valid": 0,
        "rows_quarantined": 0,
    }
    try:
        landed = read_landed(data, dataset)
        if landed.typed is not None:
            typed, reasons = landed.typed, pd.Series([None] * landed.typed.num_rows, dtype=object)
        else:
            typed, reasons = coerce_frame(landed.values, dataset)
    except MemoryError:  # the worker, not the data
        raise
    except Exception as exc:  # UnreadableFile, or a reader failing on what it does not foresee: this file only
        entry["file_error"] = (
            str(exc) if isinstance(exc, UnreadableFile) else f"unreadable: {type(exc).__name__}: {exc}"
        )
        table = quarantine_rows([source_key], [None], [f"file refused: {entry['file_error']}"], [None], "raw", run_id)
        write_parquet(table, quarantine_url, storage_options)
        return entry
    ok = reasons.isna().to_numpy()
    good = typed.filter(pa.array(ok))
    good = good.append_column(SOURCE, pa.repeat(pa.scalar(source_key, pa.string()), good.num_rows))
    good = good.append_column(ROW, pa.array(landed.rows[ok], pa.int64()))
    entry["raw_bytes"] = write_parquet(good.cast(arrow_schema(dataset)), raw_url, storage_options)

    failed = np.flatnonzero(~ok).tolist()
    rejected = landed.values.iloc[failed] if failed else pd.DataFrame()
    records = rejected.astype(object).where(rejected.notna(), None)
    quarantined = quarantine_rows(
        [source_key] * (len(failed) + len(landed.bad)),
        [int(landed.rows[i]) for i in failed] + [b.row for b in landed.bad],
        [reasons.iloc[i] for i in failed] + [b.reason for b in landed.bad],
        records.to_dict("records") + [b.text for b in landed.bad],
        "raw",
        run_id,
    )
    write_parquet(quarantined, quarantine_url, storage_options)
    entry.update(
        rows_read=len(ok) + len(landed.bad),
        rows_valid=good.num_rows,
        rows_quarantined=quarantined.num_rows,
        extra_columns=landed.extra_columns,
    )
    return entry


class LandedFileChanged(RuntimeError):
    """The ledger would name a landed object the parts were not read from."""


def changed_since_read(store: ObjectStore, dataset: Dataset, listed: list[ObjectInfo], read: list[dict]) -> list[str]:
    """The keys of `listed` written again since they were listed (or gone): the raw part read from one may
    hold half of a write. A local file whose inode or change time moved but not its size and mtime (a
    chmod, a backup's hard link, or `cp -p` over it) is hashed again: unchanged if its bytes are the ones
    read (`read`: the ledger entries the reads returned)."""
    now = {o.key: o for o in landed_objects(store, dataset)}

    def same_bytes(was: ObjectInfo, entry: dict) -> bool:
        found = now.get(was.key)
        if found == was:
            return True
        if found is None or store.protocol != "file" or (found.size, found.mtime) != (was.size, was.mtime):
            return False
        try:
            with open(store.path(was.key), "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest() == entry["sha256"]
        except FileNotFoundError:  # gone since the listing above
            return False

    return [o.key for o, entry in zip(listed, read, strict=True) if not same_bytes(o, entry)]


def ingest_fingerprint(dataset: Dataset) -> str:
    """What makes a landed file's raw and quarantine parts, besides the file: the dataset's source and
    schema (not their descriptions), the code and the libraries."""
    config = {
        "code": CODE_FINGERPRINT,
        "libraries": LIBRARY_VERSIONS,
        "source": dataset.source.model_dump(mode="json"),
        "schema": dataset.table.model_dump(mode="json", exclude={"columns": {"__all__": {"description"}}}),
    }
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def reingest_needed(dataset: Dataset, raw_record: dict[str, Any]) -> str | None:
    """Why the published raw generation is not what raw would make now, if it is not. What validated and
    shards build from it would otherwise carry a version id that promises this catalogue and release."""
    if "ingest_fingerprint" not in raw_record:
        return "raw was ingested by an earlier release: materialise raw first"
    if raw_record["ingest_fingerprint"] is None:
        return (
            "raw was ingested by Dask workers that run other code or releases than this process: install the "
            "same aifactory and lock on both, then materialise raw"
        )
    if raw_record["ingest_fingerprint"] != ingest_fingerprint(dataset):
        return (
            "raw was ingested under another source or schema in the catalogue, or by another release: "
            "materialise raw first"
        )
    return None


@dataclass(frozen=True)
class IngestedFile:
    """A landed file as the current raw generation ingested it: its ledger entry and parts."""

    entry: dict[str, Any]
    raw_part: str | None  # None: the file was refused
    quarantine_part: str


def ingested_files(previous: dict[str, Any] | None, fingerprint: str | None, run_id: str) -> dict[str, IngestedFile]:
    """By landed object fingerprint, the files the current raw generation ingested as this run would (the
    same ingest fingerprint): their parts can be copied rather than read, parsed and typed again. Not this
    run's own generation (a retried step): its parts would be copied onto themselves."""
    if not previous or fingerprint is None or previous.get("ingest_fingerprint") != fingerprint:
        return {}
    if previous.get("run_id") == run_id:
        return {}
    raw_parts = dict(zip(previous["part_sources"], previous["parts"], strict=True))
    return {
        ObjectInfo(**entry["object"]).fingerprint(): IngestedFile(
            entry, raw_parts.get(entry["source"]), part_key(previous["quarantine"], i)
        )
        for i, entry in enumerate(previous["ledger"])
    }


def lent_parts(file: IngestedFile, raw_part: str, quarantine_part: str) -> list[tuple[str, str]]:
    """(source, target) of the parts a file's ingest left, for this run's generations: a refused file left
    no raw part."""
    pairs = [(file.quarantine_part, quarantine_part)]
    return pairs if file.raw_part is None else [(file.raw_part, raw_part), *pairs]


def ingest_dataset(
    store: ObjectStore, client: Client, dataset: Dataset, run_id: str, is_finished: Callable[[str], bool]
) -> dict[str, Any]:
    """Ingest the landed files of `dataset` in parallel and publish the raw and quarantine generations. A
    file the current generation ingested the same way (same object, same ingest fingerprint) is copied
    from it: a drop of one new file reads one file, not the dataset's history."""
    objects = landed_objects(store, dataset)
    if not objects:
        raise FileNotFoundError(f"no files match {dataset.source.landing!r} under {store.url(landing_prefix(dataset))}")
    raw_gen = generation_prefix(f"raw/{dataset.name}", run_id)
    q_gen = generation_prefix(f"quarantine/{dataset.name}/raw", run_id)
    raw_parts = [part_key(raw_gen, i) for i in range(len(objects))]
    q_parts = [part_key(q_gen, i) for i in range(len(objects))]
    # Parts written by workers on other code or libraries are not this release's: none of them are lent on.
    fingerprint = None if workers_on_other_software(client) else ingest_fingerprint(dataset)
    previous = current(store, f"raw/{dataset.name}")
    done = ingested_files(previous, fingerprint, run_id)
    first_landed = {  # by name and bytes: when the current generation's files first landed
        (e["source"], e["sha256"]): landed_at(e) for e in (previous or {}).get("ledger", []) if e.get("sha256")
    }
    ledger: list[dict[str, Any] | None] = [None] * len(objects)
    lent = {i: done[o.fingerprint()] for i, o in enumerate(objects) if o.fingerprint() in done}
    pairs = {i: lent_parts(file, raw_parts[i], q_parts[i]) for i, file in lent.items()}
    copied = iter(store.copy_many([pair for file in pairs.values() for pair in file]))
    for i, file in pairs.items():
        if all([next(copied) for _ in file]):  # else a part went meanwhile (another deployment's publish): read again
            ledger[i] = lent[i].entry
    fresh = [i for i, entry in enumerate(ledger) if entry is None]
    read = run_tasks(
        client,
        ingest_file,
        [store.url(objects[i].key) for i in fresh],
        [objects[i].key for i in fresh],
        [store.url(raw_parts[i]) for i in fresh],
        [store.url(q_parts[i]) for i in fresh],
        dataset=dataset,
        storage_options=store.storage_options,
        run_id=run_id,
    )
    if changed := changed_since_read(store, dataset, [objects[i] for i in fresh], read):
        raise LandedFileChanged(
            f"{dataset.name}: landed file(s) {changed} changed while raw read them (written again, or a copy "
            "still going on under the final name): nothing is published, and the next run reads them as they are"
        )
    for i, entry in zip(fresh, read, strict=True):
        first = first_landed.get((entry["source"], entry.get("sha256")), objects[i].mtime)
        ledger[i] = {**entry, "object": asdict(objects[i]), "ingested_by": run_id, "landed_at": first}
    parts = [(raw_parts[i], e["source"]) for i, e in enumerate(ledger) if "file_error" not in e]
    totals = {k: sum(e[k] for e in ledger) for k in ("rows_read", "rows_valid", "rows_quarantined")}
    # The record first, then the quarantine pointer, whose publish deletes the older quarantine: a step that
    # dies between the two leaves a record whose quarantine still exists (as validation does).
    record = publish(
        store,
        f"raw/{dataset.name}",
        run_id,
        {
            "parts": [part for part, _ in parts],
            "part_sources": [source for _, source in parts],
            "ledger": ledger,
            "ingest_fingerprint": fingerprint,
            "files_read": len(fresh),
            **totals,
            "files_refused": sum("file_error" in e for e in ledger),
            "quarantine": q_gen,
        },
        is_finished,
    )
    publish(
        store,
        f"quarantine/{dataset.name}/raw",
        run_id,
        {"parts": q_parts, "rows": totals["rows_quarantined"]},
        is_finished,
    )
    return record
