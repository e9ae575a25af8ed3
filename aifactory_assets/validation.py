"""The `validated` stage: a GX 1.x suite run partition by partition on the Dask workers.

GX objects do not serialise, so each worker builds its own (once per process) from the suite JSON. Row
expectations come back as element/missing/unexpected counts per partition and are summed; `mostly` is
judged on the totals, never by AND-ing partition verdicts. Table expectations are judged once on the
totals, and expectations that do not decompose run over the whole dataset as Dask reductions
(dataset_statistics.py). Every row that fails a row expectation goes to quarantine naming the
expectations it failed.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from distributed import Client

from aifactory_assets.catalog import (
    GLOBAL_EXPECTATIONS,
    ROW_EXPECTATIONS,
    Dataset,
    judge_columns,
    judged_suite,
    severity,
)
from aifactory_assets.dataset_statistics import between, judge_global
from aifactory_assets.ingest import ingest_fingerprint
from aifactory_assets.manifest import workers_on_other_software
from aifactory_assets.parquet_io import read_parquet, write_parquet
from aifactory_assets.publish import current, generation_prefix, part_key, publish, require_current
from aifactory_assets.quarantine import quarantine_rows
from aifactory_assets.schema import PROVENANCE, ROW, SOURCE, arrow_schema, nullable_integer
from aifactory_assets.tasks import run_tasks
from aifactory_assets.validated_rows import excluded
from resources.object_store import ObjectInfo, ObjectStore

SAMPLE_SIZE = 5
SAMPLE_CHARS = 200  # a failing value shown in metadata and data docs is cut to this (a 10 MiB field happens)
POSITION = "aifactory_position"
PART_VERDICTS = "part_verdicts.json"  # per raw part, in the generation's folder: its landed object and counts


def expectation_label(expectation: dict[str, Any]) -> str:
    kwargs = expectation.get("kwargs", {})
    columns = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs] + kwargs.get("column_list", [])
    return f"{expectation['type']}({', '.join(columns)})" if columns else expectation["type"]


_GX = threading.local()


def _batch_definition() -> Any:
    """One ephemeral GX context per worker thread: a context's batch holds the frame it validates, so two
    threads sharing one (a worker with threads_per_worker > 1) validated each other's files. Imported here
    because GX costs seconds to import."""
    if not hasattr(_GX, "batch_definition"):
        import great_expectations as gx

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = {"globally": False}
        source = context.data_sources.add_pandas("aifactory")
        _GX.batch_definition = source.add_dataframe_asset("partition").add_batch_definition_whole_dataframe("whole")
    return _GX.batch_definition


def pandas_for_gx(table: pa.Table, compared: Collection[str] = ()) -> pd.DataFrame:
    """Temporal columns as datetime64[ns]: GX 1.x vectorises its range checks only at that unit (pandas 3
    gives us/ms and GX then checks one value at a time). A column with a value outside 1677-2262 keeps its
    unit (`in_nanoseconds`).
    Integer columns with a value past 2**53 as pandas' nullable integers: plain pandas makes a column with
    a null float64, which loses such digits. Those GX compares with other columns (`compared`: pair and
    multicolumn expectations) as Python ints with NaN for nulls instead: GX cannot compare pandas' NA there
    ("boolean value of NA is ambiguous"), and judges NaN as in a float column. Within 2**53 a null makes
    the column float64 (exact there). GX turns a bound (and a sum's total) into a float: past 2**53 it is
    judged through floats against nullable integers, exactly against Python ints."""
    table = table.replace_schema_metadata(None)  # pandas' own metadata would bring its nullable types back
    frame = table.to_pandas(date_as_object=False)
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_date(column.type) or pa.types.is_timestamp(column.type):
            frame[name] = in_nanoseconds(frame[name])
        if pa.types.is_integer(column.type) and past_float_precision(column):
            frame[name] = (
                python_ints(column)
                if name in compared
                else column.to_pandas(types_mapper=pd.ArrowDtype).astype(f"Int{column.type.bit_width}")
            )
    return frame


def in_nanoseconds(values: pd.Series) -> pd.Series:
    """Datetimes in ns where all of them fit (pandas' cast checks the range), else in their own unit:
    pyarrow's coerce_temporal_nanoseconds wraps a date past 2262 without a word (9999-12-31, a common open
    end, was judged and shown in quarantine samples as 1816-03-29)."""
    try:
        return values.astype("datetime64[ns]")
    except pd.errors.OutOfBoundsDatetime:
        return values


def members_as_compared(frame: pd.DataFrame, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A set's members as GX compares them with the frame's values: on a date or timestamp column as
    instants (the catalogue writes them as ISO text, which pandas never finds equal to a datetime64), on a
    float32 column in float32, as the statistics compare their bounds (39.1 is then the stored 39.1). What is
    not a list (of pairs) goes to GX as it is, for GX to name."""
    if isinstance(kwargs.get("value_set"), list):
        dtypes = [frame[kwargs["column"]].dtype]
        return {**kwargs, "value_set": [v for (v,) in occurring([[v] for v in kwargs["value_set"]], dtypes)]}
    pairs = kwargs.get("value_pairs_set")
    if isinstance(pairs, list) and all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
        dtypes = [frame[kwargs[c]].dtype for c in ("column_A", "column_B")]
        return {**kwargs, "value_pairs_set": occurring(pairs, dtypes)}
    return kwargs


NEVER_EQUAL = object()  # what _as_compared gives for a value that no value of the column can equal


def occurring(members: list[list[Any]], dtypes: list[Any]) -> list[list[Any]]:
    """Members (a value per column) as their columns' values compare and hash (GX looks pairs up in a
    Python set), less those that no value of a column can equal: an instant outside its unit's range
    (9999-12-31 in a file read in ns, whose values all lie in 1677-2262) or finer than it. Such a member
    matches no value, in a set or not in it; converted, it failed every part of such a file."""
    found = []
    for member in members:
        typed = [_as_compared(v, d) for v, d in zip(member, dtypes, strict=True)]
        if all(v is not NEVER_EQUAL for v in typed):
            found.append(typed)
    return found


def _as_compared(value: Any, dtype: Any) -> Any:
    """As a value of `dtype` compares and hashes, or NEVER_EQUAL."""
    if value is None:
        return None
    if pd.api.types.is_datetime64_dtype(dtype):
        instant = pd.Timestamp(value)
        try:
            return instant.as_unit(np.datetime_data(dtype)[0], round_ok=False)
        except ValueError:  # past the unit's range (pandas' OutOfBoundsDatetime), or finer than the unit
            return NEVER_EQUAL
    return float(np.float32(value)) if dtype == np.float32 else value


def python_ints(column: pa.ChunkedArray) -> np.ndarray:
    """Exact integers that GX's comparisons take: Python ints (converted by numpy, not row by row in
    Python), NaN for nulls."""
    values = column.fill_null(0).to_numpy().astype(object)
    values[column.is_null().to_numpy()] = np.nan
    return values


def past_float_precision(column: pa.ChunkedArray) -> bool:
    bounds = pc.min_max(column)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    return low is not None and (low < -(2**53) or high > 2**53)


def compared_columns(expectations: list[dict[str, Any]]) -> set[str]:
    """The columns pair and multicolumn expectations compare with each other."""
    kwargs = [e.get("kwargs") or {} for e in expectations]
    return {c for k in kwargs for c in [k.get("column_A"), k.get("column_B"), *(k.get("column_list") or [])] if c}


def referenced_columns(expectations: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for expectation in expectations:
        kwargs = expectation.get("kwargs") or {}
        names += [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
        names += list(kwargs.get("column_list") or [])
    return list(dict.fromkeys(names))


def shorten(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else f"{text[:SAMPLE_CHARS]}… ({len(text):,} characters)"


def gx_error(outcome: Any) -> str | None:
    """Why GX could not judge an expectation (a bad regex, a bound of the wrong type), or None. GX 1.x puts
    a metric's failure under its metric id rather than at the top, and then returns no counts at all: such
    an outcome must fail, not pass with nothing unexpected."""
    info = outcome.exception_info or {}
    nested = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    for entry in nested:
        if entry.get("raised_exception"):
            return str(entry.get("exception_message") or "raised an error")
    if not outcome.success and "element_count" not in outcome.result:
        return "failed without counts"
    return None


def _row_counts(outcome: Any, rows: int) -> dict[str, Any]:
    found = outcome.result
    return {
        "element_count": int(found.get("element_count", rows)),
        "missing_count": int(found.get("missing_count", 0)),
        "unexpected_count": int(found.get("unexpected_count", 0)),
        "sample": [shorten(str(v)) for v in (found.get("partial_unexpected_list") or [])[:SAMPLE_SIZE]],
        "error": gx_error(outcome),
    }


def gx_outcomes(frame: pd.DataFrame, suite: dict[str, Any], expectations: list[dict[str, Any]]) -> list[Any]:
    """GX's result for each of `expectations` on `frame`, in their order. GX's and pydantic's errors come
    back as plain ones: a pydantic error's message fails to print once Dask has pickled it."""
    import great_expectations as gx
    from great_expectations.compatibility.pydantic import ValidationError
    from great_expectations.exceptions import GreatExpectationsError

    tagged = [
        {
            **e,
            "kwargs": members_as_compared(frame, e.get("kwargs") or {}),
            "meta": {**(e.get("meta") or {}), POSITION: i},
        }
        for i, e in enumerate(expectations)
    ]
    try:
        gx_suite = gx.ExpectationSuite(name=suite["name"], expectations=tagged)
        batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(gx_suite, result_format={"result_format": "COMPLETE"})
    except (ValidationError, GreatExpectationsError) as exc:
        raise RuntimeError(f"GX refused suite {suite['name']!r}: {type(exc).__name__}: {exc}") from None
    # GX groups results by column, not in suite order: match them back by the position we tagged.
    return sorted(result.results, key=lambda o: o.expectation_config.meta[POSITION])


def validate_part(
    part_url: str,
    source: str,
    quarantine_url: str,
    suite: dict[str, Any],
    storage_options: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    """Runs on a worker: validate one raw part (one landed file) and write its failing rows to quarantine;
    the rows that pass stay where they are (validated_rows.py)."""
    table = read_parquet(part_url, storage_options)
    row_expectations = [e for e in suite["expectations"] if e["type"] in ROW_EXPECTATIONS]
    failures: dict[int, list[str]] = {}
    counts = []
    if row_expectations and table.num_rows:
        # Only the columns the expectations name go to pandas and GX (which also hashes the whole frame).
        named = table.select([c for c in referenced_columns(row_expectations) if c in table.column_names])
        outcomes = gx_outcomes(pandas_for_gx(named, compared_columns(row_expectations)), suite, row_expectations)
        for expectation, outcome in zip(row_expectations, outcomes, strict=True):
            for index in outcome.result.get("unexpected_index_list") or []:
                failures.setdefault(int(index), []).append(expectation_label(expectation))
            counts.append(_row_counts(outcome, table.num_rows))
    bad = sorted(failures)
    rejected = table.take(pa.array(bad, pa.int64()))
    quarantine_bytes = write_parquet(
        quarantine_rows(
            rejected.column(SOURCE).to_pylist(),
            rejected.column(ROW).to_pylist(),
            ["failed: " + ", ".join(failures[i]) for i in bad],
            rejected.drop_columns(list(PROVENANCE)).to_pylist(),
            "validated",
            run_id,
            expectations=[failures[i] for i in bad],
        ),
        quarantine_url,
        storage_options,
    )
    return {
        "source": source,
        "rows_in": table.num_rows,
        "rows_valid": table.num_rows - (pc.sum(excluded(table, rejected.column(ROW))).as_py() or 0),
        "rows_quarantined": len(bad),
        "quarantine_bytes": quarantine_bytes,
        "counts": counts,
    }


def _judge_row(expectation: dict[str, Any], partials: list[dict[str, Any]], position: int) -> dict[str, Any]:
    """Sum one row expectation's counts over partitions; `mostly` is judged on the totals."""
    mine = [p["counts"][position] for p in partials if p["counts"]]
    element = sum(c["element_count"] for c in mine)
    missing = sum(c["missing_count"] for c in mine)
    unexpected = sum(c["unexpected_count"] for c in mine)
    judged = element - missing
    mostly = expectation.get("kwargs", {}).get("mostly")
    share_ok = 1.0 if judged == 0 else (judged - unexpected) / judged
    errors = [c["error"] for c in mine if c["error"]]
    return {
        "success": (unexpected == 0 if mostly is None else share_ok >= mostly) and not errors,
        "element_count": element,
        "missing_count": missing,
        "unexpected_count": unexpected,
        "sample": [v for c in mine for v in c["sample"]][:SAMPLE_SIZE],
        "error": errors[0] if errors else None,
    }


def _judge_table(expectation: dict[str, Any], rows: int, columns: list[str]) -> dict[str, Any]:
    kwargs, kind = expectation.get("kwargs", {}), expectation["type"]
    if kind == "expect_table_row_count_to_be_between":
        success, observed = between(rows, kwargs), rows
    elif kind == "expect_table_row_count_to_equal":
        success, observed = rows == kwargs["value"], rows
    else:
        success, observed = judge_columns(kind, kwargs, columns)
    return {"success": bool(success), "observed": observed}


def judge_suite(
    suite: dict[str, Any], partials: list[dict[str, Any]], frame: Callable[[], dd.DataFrame], columns: list[str]
) -> list[dict[str, Any]]:
    """One GX-shaped result per expectation of the suite, in suite order. `frame` builds the whole dataset
    for the non-decomposable expectations; it is not called (no footers read) when the suite has none."""
    expectations = suite["expectations"]
    rows_in = sum(p["rows_in"] for p in partials)
    row_positions = {i: n for n, i in enumerate(i for i, e in enumerate(expectations) if e["type"] in ROW_EXPECTATIONS)}
    global_positions = [i for i, e in enumerate(expectations) if e["type"] in GLOBAL_EXPECTATIONS]
    global_results = (
        dict(zip(global_positions, judge_global(frame(), [expectations[i] for i in global_positions]), strict=True))
        if global_positions
        else {}
    )
    results = []
    for i, expectation in enumerate(expectations):
        if i in row_positions:
            outcome, scope = _judge_row(expectation, partials, row_positions[i]), "row"
        elif i in global_results:
            outcome, scope = global_results[i], "dataset"
        else:
            outcome, scope = _judge_table(expectation, rows_in, columns), "table"
        results.append(
            {
                "label": expectation_label(expectation),
                "type": expectation["type"],
                "kwargs": expectation.get("kwargs", {}),
                "severity": severity(expectation),
                "scope": scope,
                **outcome,
            }
        )
    return results


def source_ledger(raw: dict[str, Any], partials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per landed object: rows read = valid + quarantined at ingest + quarantined at validation."""
    validated = {p["source"]: p for p in partials}
    ledger = []
    for entry in raw["ledger"]:
        part = validated.get(entry["source"], {"rows_valid": 0, "rows_quarantined": 0})
        ledger.append(
            {
                "source": entry["source"],
                "rows_read": entry["rows_read"],
                "rows_valid": part["rows_valid"],
                "quarantined_at_ingest": entry["rows_quarantined"],
                "quarantined_at_validation": part["rows_quarantined"],
                "file_error": entry.get("file_error"),
            }
        )
    return ledger


def suite_fingerprint(suite: dict[str, Any]) -> str:
    """Which suite judged a validated generation: shards made later must be judged by the same one."""
    return hashlib.sha256(json.dumps(judged_suite(suite), sort_keys=True).encode()).hexdigest()[:16]


VALUE_STATISTICS = frozenset(
    f"expect_column_{statistic}_to_be_between" for statistic in ("min", "max", "mean", "median", "sum", "stdev")
) | {"expect_column_quantile_values_to_be_between"}


# A value an error message quotes, as Python's reprs and most libraries' messages quote them.
QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def without_quoted_values(error: str | None) -> str | None:
    """An error of GX about a PII column, its quoted values hidden (a parser's "could not convert 'jane@…'"):
    what went wrong stays readable."""
    return QUOTED.sub("'hidden: PII'", error) if error else error


def hide_personal_values(results: list[dict[str, Any]], dataset: Dataset) -> list[dict[str, Any]]:
    """Failing values and statistics of PII columns stay in the quarantine at the home site: results go
    into the UI's metadata, the data docs and the manifest, which replicas copy to other sites."""
    personal = {c.name for c in dataset.table.columns if c.pii}
    hidden = []
    for result in results:
        if set(referenced_columns([result])) & personal:
            result = {
                **result,
                "sample": [f"{len(result['sample'])} value(s) hidden: PII"] if result.get("sample") else [],
                "error": without_quoted_values(result.get("error")),
            }
            if result["type"] in VALUE_STATISTICS:
                result["observed"] = "hidden: PII"
        hidden.append(result)
    return hidden


def without_personal_samples(partial: dict[str, Any], suite: dict[str, Any], dataset: Dataset) -> dict[str, Any]:
    """A part's counts as kept for later runs: the failing values of PII columns masked (their number kept,
    which is all the results show of them), so only the quarantine holds them."""
    personal = {c.name for c in dataset.table.columns if c.pii}
    if not partial["counts"] or not personal:  # no counts: an empty part
        return partial
    row_expectations = [e for e in suite["expectations"] if e["type"] in ROW_EXPECTATIONS]
    counts = [
        {**count, "sample": ["hidden: PII"] * len(count["sample"]), "error": without_quoted_values(count["error"])}
        if set(referenced_columns([expectation])) & personal
        else count
        for expectation, count in zip(row_expectations, partial["counts"], strict=True)
    ]
    return {**partial, "counts": counts}


def verdict_fingerprint(suite: dict[str, Any], raw: dict[str, Any], dataset: Dataset) -> str | None:
    """What a raw part's row verdicts depend on besides its landed object: how raw typed it and how this
    release judges it (raw's ingest fingerprint, which names the code and the libraries, GX's included,
    and must be this release's) and the suite. None where the parts or their verdicts cannot be vouched
    for: raw written by workers on other software, or by another release than this process's."""
    if raw.get("ingest_fingerprint") != ingest_fingerprint(dataset):
        return None
    return hashlib.sha256(f"{raw['ingest_fingerprint']}|{suite_fingerprint(suite)}".encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JudgedPart:
    """A raw part as the current validated generation judged it: its counts and its delete file."""

    partial: dict[str, Any]
    quarantine_part: str


def judged_parts(
    store: ObjectStore, previous: dict[str, Any] | None, fingerprint: str | None, run_id: str
) -> dict[str, JudgedPart]:
    """By landed object fingerprint, the parts the current validated generation judged as this run would:
    their counts are kept and their delete files copied, rather than run through GX again. Not this run's
    own generation (a retried step)."""
    if not previous or fingerprint is None or previous.get("verdict_fingerprint") != fingerprint:
        return {}
    if previous.get("run_id") == run_id:
        return {}
    try:
        verdicts = store.read_json(previous["part_verdicts"])
    except FileNotFoundError:  # gone with its generation (another deployment's publish): judged again
        return {}
    return {
        verdict["object"]: JudgedPart(verdict["partial"], delete_file)
        for verdict, delete_file in zip(verdicts, previous["excluded"], strict=True)
        if not any(count["error"] for count in verdict["partial"]["counts"])  # GX failing once: judged again
    }


def validate_dataset(
    store: ObjectStore,
    client: Client,
    dataset: Dataset,
    suite: dict[str, Any],
    run_id: str,
    is_finished: Callable[[str], bool],
) -> dict[str, Any]:
    """Validate the published raw generation in parallel and publish the verdicts and the quarantine; the
    validated rows are raw's parts less the quarantined rows (validated_rows.py). A part the current
    generation judged the same way (same landed object, raw's ingest and the suite alike) keeps its row
    verdicts: a drop of one new file runs GX over one file; the dataset's own expectations (uniqueness,
    statistics) are computed over every part again."""
    raw = require_current(store, f"raw/{dataset.name}", "raw")
    generation = generation_prefix(f"validated/{dataset.name}", run_id)
    q_gen = generation_prefix(f"quarantine/{dataset.name}/validated", run_id)
    parts = raw["parts"]
    q_parts = [part_key(q_gen, i) for i in range(len(parts))]
    objects = {e["source"]: ObjectInfo(**e["object"]).fingerprint() for e in raw["ledger"] if "object" in e}
    part_objects = [objects.get(source) for source in raw["part_sources"]]
    vouched = None not in part_objects and not workers_on_other_software(client)
    fingerprint = verdict_fingerprint(suite, raw, dataset) if vouched else None
    judged = judged_parts(store, current(store, f"validated/{dataset.name}"), fingerprint, run_id)
    partials: list[dict[str, Any] | None] = [None] * len(parts)
    kept = [i for i, o in enumerate(part_objects) if o in judged]
    copies = store.copy_many([(judged[part_objects[i]].quarantine_part, q_parts[i]) for i in kept])
    for i, copied in zip(kept, copies, strict=True):
        if copied:  # else gone meanwhile (another deployment's publish): judged again
            partials[i] = judged[part_objects[i]].partial
    fresh = [i for i, partial in enumerate(partials) if partial is None]
    judged_now = run_tasks(
        client,
        validate_part,
        [store.url(parts[i]) for i in fresh],
        [raw["part_sources"][i] for i in fresh],
        [store.url(q_parts[i]) for i in fresh],
        suite=suite,
        storage_options=store.storage_options,
        run_id=run_id,
    )
    for i, partial in zip(fresh, judged_now, strict=True):
        partials[i] = partial
    store.write_json(
        f"{generation}/{PART_VERDICTS}",
        [
            {"object": o, "partial": without_personal_samples(p, suite, dataset)}
            for o, p in zip(part_objects, partials, strict=True)
        ],
    )

    def whole_dataset() -> dd.DataFrame:
        if parts:
            return dd.read_parquet(
                [store.url(p) for p in parts],
                storage_options=store.storage_options,
                arrow_to_pandas={"types_mapper": nullable_integer},
            )
        # every file refused: judge the suite on an empty table of the right schema, typed as read_parquet
        # types it (plain to_pandas makes a date column one of objects, whose mean fails)
        empty = arrow_schema(dataset).empty_table().to_pandas(types_mapper=pd.ArrowDtype)
        return dd.from_pandas(empty, npartitions=1)

    results = hide_personal_values(judge_suite(suite, partials, whole_dataset, dataset.table.names), dataset)
    rows_in = sum(p["rows_in"] for p in partials)
    rows_quarantined = sum(p["rows_quarantined"] for p in partials)
    # The record first, then the quarantine pointer, whose publish deletes the older quarantine: a step that
    # dies between the two leaves a record whose delete files still exist.
    record = publish(
        store,
        f"validated/{dataset.name}",
        run_id,
        {
            # Not "parts", which held copies before 1607f94: an older release rolled back to fails on the key
            # rather than shard raw's parts whole.
            "raw_parts": parts,
            "excluded": q_parts,  # per part, the rows it does not pass on
            "rows_in": rows_in,
            "rows_valid": sum(p["rows_valid"] for p in partials),  # as the delete files leave them
            "rows_quarantined": rows_quarantined,
            "quarantine_bytes": sum(p["quarantine_bytes"] for p in partials),
            "results": results,
            "success": all(r["success"] for r in results),
            "ledger": source_ledger(raw, partials),
            "raw_generation": raw["generation"],
            "suite_fingerprint": suite_fingerprint(suite),
            "quarantine": q_gen,
            "verdict_fingerprint": fingerprint,
            "part_verdicts": f"{generation}/{PART_VERDICTS}",
            "parts_judged": len(fresh),
        },
        is_finished,
    )
    quarantine = {"parts": q_parts, "rows": rows_quarantined}
    publish(store, f"quarantine/{dataset.name}/validated", run_id, quarantine, is_finished)
    return record
