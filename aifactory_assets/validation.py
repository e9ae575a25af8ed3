"""The `validated` stage: a GX 1.x suite run partition by partition on the Dask workers.

GX objects do not serialise, so each worker builds its own (once per process) from the suite JSON. Row
expectations come back as element/missing/unexpected counts per partition and are summed; `mostly` is
judged on the totals, never by AND-ing partition verdicts. Table expectations are judged once, on the
totals. Every row that fails a row expectation goes to quarantine naming the expectations it failed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pyarrow as pa
from distributed import Client

from aifactory_assets.catalog import ROW_EXPECTATIONS, Dataset
from aifactory_assets.parquet_io import read_parquet, write_parquet
from aifactory_assets.publish import generation_prefix, publish, require_current
from aifactory_assets.quarantine import quarantine_rows
from aifactory_assets.schema import PROVENANCE, ROW, SOURCE
from resources.object_store import ObjectStore

SAMPLE_SIZE = 5


def expectation_label(expectation: dict[str, Any]) -> str:
    kwargs = expectation.get("kwargs", {})
    columns = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs] + kwargs.get("column_list", [])
    return f"{expectation['type']}({', '.join(columns)})" if columns else expectation["type"]


def severity(expectation: dict[str, Any]) -> str:
    return (expectation.get("meta") or {}).get("severity", "critical")


@lru_cache(maxsize=1)
def _batch_definition() -> Any:
    """One ephemeral GX context per worker process; imported here because GX costs seconds to import."""
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_pandas("aifactory")
    return source.add_dataframe_asset("partition").add_batch_definition_whole_dataframe("whole")


def validate_part(
    suite: dict[str, Any],
    part_url: str,
    source_part: str,
    valid_url: str,
    quarantine_url: str,
    storage_options: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    """Runs on a worker: validate one raw part, write its valid rows and its quarantined rows."""
    import great_expectations as gx

    table = read_parquet(part_url, storage_options)
    row_expectations = [e for e in suite["expectations"] if e["type"] in ROW_EXPECTATIONS]
    failures: dict[int, list[str]] = {}
    stats = []
    if row_expectations and table.num_rows:
        frame = table.to_pandas(date_as_object=False)
        gx_suite = gx.ExpectationSuite(name=suite["name"], expectations=[dict(e) for e in row_expectations])
        batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(gx_suite, result_format={"result_format": "COMPLETE"})
        for expectation, outcome in zip(row_expectations, result.results, strict=True):
            found = outcome.result
            label = expectation_label(expectation)
            for index in found.get("unexpected_index_list") or []:
                failures.setdefault(int(index), []).append(label)
            stats.append(
                {
                    "label": label,
                    "element_count": int(found.get("element_count", table.num_rows)),
                    "missing_count": int(found.get("missing_count", 0)),
                    "unexpected_count": int(found.get("unexpected_count", 0)),
                    "sample": [str(v) for v in (found.get("partial_unexpected_list") or [])[:SAMPLE_SIZE]],
                    "exception": outcome.exception_info.get("exception_message")
                    if outcome.exception_info.get("raised_exception")
                    else None,
                }
            )
    bad = sorted(failures)
    keep = [i not in failures for i in range(table.num_rows)]
    valid_bytes = write_parquet(table.filter(pa.array(keep, pa.bool_())), valid_url, storage_options)
    rejected = table.take(pa.array(bad, pa.int64()))
    records = rejected.drop_columns(list(PROVENANCE)).to_pylist()
    write_parquet(
        quarantine_rows(
            rejected.column(SOURCE).to_pylist(),
            rejected.column(ROW).to_pylist(),
            ["failed: " + ", ".join(failures[i]) for i in bad],
            records,
            "validated",
            run_id,
            expectations=[failures[i] for i in bad],
        ),
        quarantine_url,
        storage_options,
    )
    return {
        "part": source_part,
        "rows_in": table.num_rows,
        "rows_valid": table.num_rows - len(bad),
        "rows_quarantined": len(bad),
        "bytes": valid_bytes,
        "expectations": stats,
    }


def _judge_row(expectation: dict[str, Any], partials: list[dict[str, Any]]) -> dict[str, Any]:
    label = expectation_label(expectation)
    mine = [s for p in partials for s in p["expectations"] if s["label"] == label]
    element = sum(s["element_count"] for s in mine)
    missing = sum(s["missing_count"] for s in mine)
    unexpected = sum(s["unexpected_count"] for s in mine)
    judged = element - missing
    mostly = expectation.get("kwargs", {}).get("mostly")
    fraction_ok = 1.0 if judged == 0 else (judged - unexpected) / judged
    success = unexpected == 0 if mostly is None else fraction_ok >= mostly
    errors = [s["exception"] for s in mine if s["exception"]]
    return {
        "label": label,
        "severity": severity(expectation),
        "success": success and not errors,
        "element_count": element,
        "missing_count": missing,
        "unexpected_count": unexpected,
        "mostly": mostly,
        "sample": [v for s in mine for v in s["sample"]][:SAMPLE_SIZE],
        "error": errors[0] if errors else None,
    }


def _judge_table(expectation: dict[str, Any], rows: int, columns: list[str]) -> dict[str, Any]:
    kwargs, kind = expectation.get("kwargs", {}), expectation["type"]
    if kind == "expect_table_row_count_to_be_between":
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        success, observed = (low is None or rows >= low) and (high is None or rows <= high), rows
    elif kind == "expect_table_row_count_to_equal":
        success, observed = rows == kwargs["value"], rows
    elif kind == "expect_table_columns_to_match_set":
        wanted, have = set(kwargs["column_set"]), set(columns)
        success = have == wanted if kwargs.get("exact_match", True) else wanted <= have
        observed = sorted(have)
    elif kind == "expect_table_columns_to_match_ordered_list":
        success, observed = columns == list(kwargs["column_list"]), columns
    elif kind == "expect_column_to_exist":
        success, observed = kwargs["column"] in columns, columns
    else:  # expect_table_column_count_to_equal
        success, observed = len(columns) == kwargs["value"], len(columns)
    return {
        "label": expectation_label(expectation),
        "severity": severity(expectation),
        "success": bool(success),
        "observed": observed,
    }


def validate_dataset(
    store: ObjectStore, client: Client, dataset: Dataset, suite: dict[str, Any], run_id: str
) -> dict[str, Any]:
    """Validate the published raw generation in parallel and publish valid rows and the quarantine."""
    raw = require_current(store, f"raw/{dataset.name}", "raw")
    valid_gen = generation_prefix(f"validated/{dataset.name}", run_id)
    q_gen = generation_prefix(f"quarantine/{dataset.name}/validated", run_id)
    futures = [
        client.submit(
            validate_part,
            suite,
            store.url(part),
            part,
            store.url(f"{valid_gen}/part-{i:05d}.parquet"),
            store.url(f"{q_gen}/part-{i:05d}.parquet"),
            store.storage_options,
            run_id,
            key=f"validate-{dataset.name}-{run_id}-{i}",
            pure=False,
        )
        for i, part in enumerate(raw["parts"])
    ]
    partials = client.gather(futures)
    rows_in = sum(p["rows_in"] for p in partials)
    results = [
        _judge_row(e, partials) if e["type"] in ROW_EXPECTATIONS else _judge_table(e, rows_in, dataset.table.names)
        for e in suite["expectations"]
    ]
    rows_quarantined = sum(p["rows_quarantined"] for p in partials)
    quarantine = publish(
        store,
        f"quarantine/{dataset.name}/validated",
        run_id,
        {"parts": [f"{q_gen}/part-{i:05d}.parquet" for i in range(len(partials))], "rows": rows_quarantined},
    )
    return publish(
        store,
        f"validated/{dataset.name}",
        run_id,
        {
            "parts": [f"{valid_gen}/part-{i:05d}.parquet" for i in range(len(partials))],
            "rows_in": rows_in,
            "rows_valid": rows_in - rows_quarantined,
            "rows_quarantined": rows_quarantined,
            "bytes": sum(p["bytes"] for p in partials),
            "results": results,
            "success": all(r["success"] for r in results),
            "raw_generation": raw["generation"],
            "quarantine": quarantine["generation"],
        },
    )
