"""Distributed GX gives the answers GX gives on the whole table: counts summed, `mostly` on the totals,
non-decomposable expectations over the whole dataset."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from aifactory_assets.catalog import QUANTILE_METHODS, Dataset, load_suite
from aifactory_assets.dataset_statistics import judge_global
from aifactory_assets.parquet_io import write_parquet
from aifactory_assets.publish import publish
from aifactory_assets.schema import coerce_frame
from aifactory_assets.validation import hide_personal_values, pandas_for_gx, validate_dataset
from resources import DaskCluster, ObjectStore
from tests.conftest import every_run_over

DATASET = Dataset.model_validate(
    {
        "name": "readings",
        "sector": "climate",
        "site": "kajaani",
        "description": "synthetic sensor readings",
        "owner": "team:test",
        "source": {"format": "parquet", "landing": "*.parquet"},
        "schema": {
            "key": ["id"],
            "columns": [
                {"name": "id", "type": "int64", "nullable": False},
                {"name": "sensor", "type": "string"},
                {"name": "value", "type": "float64"},
            ],
        },
        "suite": "suites/readings.json",
    }
)


def gx_whole_table(frame: pd.DataFrame, expectations: list[dict]) -> list:
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    batch = (
        context.data_sources.add_pandas("whole")
        .add_dataframe_asset("table")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": frame})
    )
    tagged = [{**e, "meta": {"position": i}} for i, e in enumerate(expectations)]
    suite = gx.ExpectationSuite(name="reference", expectations=tagged)
    results = batch.validate(suite, result_format={"result_format": "SUMMARY"}).results
    return sorted(results, key=lambda r: r.expectation_config.meta["position"])  # GX groups by column


def partitions() -> list[pd.DataFrame]:
    """Three files; only the middle one has many out-of-range values (20 of 100)."""
    frames = []
    for part in range(3):
        values = np.linspace(0, 50, 100)
        if part == 1:
            values[:20] = 500.0
        frames.append(
            pd.DataFrame({"id": np.arange(part * 100, part * 100 + 100), "sensor": ["a", "b"] * 50, "value": values})
        )
    return frames


def publish_raw(store: ObjectStore, frames: list[pd.DataFrame]) -> None:
    publish_raw_tables(store, [pa.Table.from_pandas(frame, preserve_index=False) for frame in frames])


def publish_raw_tables(store: ObjectStore, tables: list[pa.Table]) -> None:
    """As raw writes its parts; a table without pandas' metadata (as raw's) is read with Dask's own types."""
    parts = []
    for i, table in enumerate(tables):
        source = f"landing/readings/part-{i}.parquet"
        table = table.append_column("_source", pa.array([source] * len(table), pa.string()))
        table = table.append_column("_row", pa.array(np.arange(1, len(table) + 1), pa.int64()))
        key = f"raw/readings/run=r0/part-{i:05d}.parquet"
        write_parquet(table, store.url(key), store.storage_options)
        parts.append((key, source, len(table)))
    publish(
        store,
        "raw/readings",
        "r0",
        {
            "parts": [p for p, _, _ in parts],
            "part_sources": [s for _, s, _ in parts],
            "ledger": [{"source": s, "rows_read": n, "rows_valid": n, "rows_quarantined": 0} for _, s, n in parts],
        },
        every_run_over,
    )


def with_columns(columns: list[dict]) -> Dataset:
    return DATASET.model_copy(update={"table": DATASET.table.model_validate({"key": ["id"], "columns": columns})})


@pytest.mark.parametrize(("mostly", "passes"), [(0.9, True), (0.95, False)])
def test_mostly_is_judged_on_the_totals(tmp_path, dask: DaskCluster, mostly: float, passes: bool) -> None:
    """20 of 300 values out of range: 93% good overall, though the middle file alone is only 80% good."""
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    frames = partitions()
    publish_raw(store, frames)
    expectation = {
        "type": "expect_column_values_to_be_between",
        "kwargs": {"column": "value", "min_value": 0, "max_value": 100, "mostly": mostly},
    }
    record = validate_dataset(
        store, dask.get_client(), DATASET, {"name": "readings", "expectations": [expectation]}, "r1", every_run_over
    )
    (result,) = record["results"]
    (reference,) = gx_whole_table(pd.concat(frames, ignore_index=True), [expectation])
    assert result["success"] is passes is reference.success
    assert result["unexpected_count"] == reference.result["unexpected_count"] == 20
    assert result["element_count"] == reference.result["element_count"] == 300
    assert record["rows_quarantined"] == 20 and record["rows_valid"] == 280
    assert [e["quarantined_at_validation"] for e in record["ledger"]] == [0, 20, 0]


def test_validation_threads_each_judge_their_own_file(tmp_path) -> None:
    """A Dask worker may run several threads (threads_per_worker, or a site's own cluster): file k, with
    exactly k values out of range, must report k whichever thread judged it."""
    from concurrent.futures import ThreadPoolExecutor

    from aifactory_assets.validation import validate_part

    store = ObjectStore(site="kajaani", root=str(tmp_path))
    suite = {
        "name": "readings",
        "expectations": [
            {
                "type": "expect_column_values_to_be_between",
                "kwargs": {"column": "value", "min_value": 0, "max_value": 10},
            }
        ],
    }

    def judge(k: int) -> tuple[int, int, int]:
        rows = 1_000 + 37 * k
        values = np.full(rows, 5.0)
        values[:k] = 50.0
        source = f"landing/readings/part-{k}.parquet"
        frame = pd.DataFrame({"id": np.arange(rows), "value": values, "_source": source, "_row": np.arange(rows) + 1})
        part = store.url(f"raw/part-{k}.parquet")
        write_parquet(pa.Table.from_pandas(frame, preserve_index=False), part, {})
        found = validate_part(part, source, store.url(f"quarantine/part-{k}.parquet"), suite, {}, "r1")
        return found["rows_quarantined"], found["counts"][0]["unexpected_count"], found["counts"][0]["element_count"]

    with ThreadPoolExecutor(4) as pool:
        judged = list(pool.map(judge, range(24)))
    assert judged == [(k, k, 1_000 + 37 * k) for k in range(24)]


def test_column_pairs_with_a_null_in_an_integer_column_agree_with_gx(tmp_path, dask: DaskCluster) -> None:
    """pandas' nullable integers made GX's pair comparison raise ("boolean value of NA is ambiguous")."""
    columns = [{"name": "id", "type": "int64", "nullable": False}]
    columns += [{"name": "a", "type": "int64"}, {"name": "b", "type": "int64"}]
    dataset = with_columns(columns)
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    frames = [
        pd.DataFrame({"id": [1, 2, 3], "a": [5, 1, 7], "b": [1, 2, 3]}),
        pd.DataFrame({"id": [4, 5, 6], "a": pd.array([None, 9, 0], dtype="Int64"), "b": [1, 2, 3]}),
    ]
    publish_raw(store, frames)
    expectation = {
        "type": "expect_column_pair_values_a_to_be_greater_than_b",
        "kwargs": {"column_A": "a", "column_B": "b", "mostly": 0.5},
    }
    record = validate_dataset(
        store, dask.get_client(), dataset, {"name": "readings", "expectations": [expectation]}, "r1", every_run_over
    )
    (result,) = record["results"]
    (reference,) = gx_whole_table(pd.concat(frames, ignore_index=True).astype({"a": "float64"}), [expectation])
    assert result["error"] is None
    assert result["success"] is reference.success is True
    assert result["unexpected_count"] == reference.result["unexpected_count"] == 3  # the null row too, as GX


BIG = 2**60  # snowflake-style ids, past 2**53: float64 cannot hold them apart


def test_columns_compared_past_2_53_with_a_null_agree_with_gx(tmp_path, dask: DaskCluster) -> None:
    """Past 2**53 a column with a null went to GX as pandas' nullable integers, whose NA GX's pair and
    multicolumn comparisons cannot judge ("boolean value of NA is ambiguous"): the part failed, and was
    judged again every run. The verdicts are those of the same ids less 2**60, which floats hold exactly."""
    columns = [{"name": "id", "type": "int64", "nullable": False}, {"name": "parent_id", "type": "int64"}]
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    ids, parents = [BIG + 5, BIG + 7, BIG + 9], [BIG + 1, None, BIG + 9]
    publish_raw_tables(store, [pa.table({"id": pa.array(ids, pa.int64()), "parent_id": pa.array(parents, pa.int64())})])

    def expectations(offset: int) -> list[dict]:
        pair = {"column_A": "id", "column_B": "parent_id"}
        return [
            {"type": "expect_column_pair_values_a_to_be_greater_than_b", "kwargs": pair},
            {"type": "expect_column_pair_values_to_be_equal", "kwargs": pair},
            {"type": "expect_multicolumn_sum_to_equal", "kwargs": {"column_list": list(pair.values()), "sum_total": 0}},
            {
                "type": "expect_column_pair_values_to_be_in_set",
                "kwargs": {**pair, "value_pairs_set": [[offset + 5, offset + 1]]},
            },
        ]

    suite = {"name": "readings", "expectations": expectations(BIG)}
    record = validate_dataset(store, dask.get_client(), with_columns(columns), suite, "r1", every_run_over)
    small = pd.DataFrame({"id": [5, 7, 9], "parent_id": [1.0, np.nan, 9.0]})
    reference = gx_whole_table(small, expectations(0))
    assert [r["error"] for r in record["results"]] == [None] * 4
    assert [r["success"] for r in record["results"]] == [r.success for r in reference] == [False] * 4
    assert [r["unexpected_count"] for r in record["results"]] == [r.result["unexpected_count"] for r in reference]
    assert [r["unexpected_count"] for r in record["results"]] == [2, 2, 3, 2]  # the null row counts, as in GX


def test_row_bounds_on_dates_as_written_agree_with_gx_on_their_instants(tmp_path, dask: DaskCluster) -> None:
    """A date-only bound on a date column, and a zoned one on timestamps (raw stores them in UTC, without a
    zone), failed every part with pandas' "Invalid comparison": the suite failed every run, blocked the
    shards and quarantined none of the rows out of range. As the catalogue loads them they judge as GX
    judges the same instants written without a zone, and as min and max judge the bounds as written."""
    dataset = with_columns(
        [
            {"name": "id", "type": "int64", "nullable": False},
            {"name": "day", "type": "date"},
            {"name": "at", "type": "timestamp"},
        ]
    )
    noon, late = dt.datetime(2024, 1, 1, 12), dt.datetime(2024, 12, 31, 23, 30)
    tables = [
        pa.table({"id": [0, 1], "day": [dt.date(2024, 1, 1), dt.date(2024, 6, 1)], "at": [noon, noon]}),
        pa.table({"id": [2, 3], "day": [dt.date(2025, 1, 1), dt.date(2024, 7, 1)], "at": [noon, late]}),
    ]
    assert [str(kind) for kind in tables[0].schema.types] == ["int64", "date32[day]", "timestamp[us]"]  # as raw's

    def bounded(day: tuple[str, str], at: tuple[str, str]) -> list[dict]:
        """Rows between the bounds; the min and the max at them."""
        expectations = []
        for column, (low, high) in (("day", day), ("at", at)):
            expectations += [
                {"type": f"expect_column_{kind}", "kwargs": {"column": column, **kwargs}}
                for kind, kwargs in (
                    ("values_to_be_between", {"min_value": low, "max_value": high}),
                    ("min_to_be_between", {"min_value": low}),
                    ("max_to_be_between", {"max_value": high}),
                )
            ]
        return expectations

    written = bounded(("2024-01-01", "2024-12-31"), ("2024-01-01T13:00:00+01:00", "2025-01-01T00:00:00+01:00"))
    naive = bounded(("2024-01-01T00:00:00", "2024-12-31T00:00:00"), ("2024-01-01T12:00:00", "2024-12-31T23:00:00"))
    (tmp_path / "readings.json").write_text(json.dumps({"name": "readings", "expectations": written}))
    suite = load_suite(tmp_path / "readings.json", dataset, tmp_path / "readings.yaml")
    store = ObjectStore(site="kajaani", root=str(tmp_path / "store"))
    publish_raw_tables(store, tables)
    record = validate_dataset(store, dask.get_client(), dataset, suite, "r1", every_run_over)
    reference = gx_whole_table(pandas_for_gx(pa.concat_tables(tables)), naive)
    ours = record["results"]
    assert [r.get("error") for r in ours] == [None] * 6
    assert [r["success"] for r in ours] == [r.success for r in reference] == [False, True, False] * 2
    assert [ours[i]["unexpected_count"] for i in (0, 3)] == [reference[i].result["unexpected_count"] for i in (0, 3)]
    assert record["rows_quarantined"] == 2  # the day in 2025, and the time after 23:00 UTC


def test_set_members_match_dates_timestamps_and_float32_values_as_stored(tmp_path, dask: DaskCluster) -> None:
    """Sets of ISO text on dates and timestamps, and of 39.1 on a float32 column (stored as 39.0999985):
    every value of every row was judged outside them, every row quarantined. Loaded by the catalogue, typed
    as ingest types them and judged on the workers, only the row outside each set is."""
    dataset = with_columns(
        [
            {"name": "id", "type": "int64", "nullable": False},
            {"name": "day", "type": "date"},
            {"name": "at", "type": "timestamp"},
            {"name": "length", "type": "float32"},
            {"name": "sensor", "type": "string"},
        ]
    )
    landed = pd.DataFrame(
        {
            "id": ["1", "2", "3", "4"],
            "day": ["2007-11-10", "2007-11-11", "2008-01-01", "2009-05-05"],
            "at": ["2007-11-10T10:00:00"] * 3 + ["2007-11-10T11:00:00"],
            "length": ["39.1", "40.1", "40.1", "41.7"],
            "sensor": ["a", "a", "b", "b"],
        }
    )
    table, reasons = coerce_frame(landed, dataset)
    assert reasons.isna().all() and table.schema.field("length").type == pa.float32()
    days = ["2007-11-10", "2007-11-11", "2008-01-01"]
    expectations = [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "day", "value_set": days}},
        {
            "type": "expect_column_values_to_be_in_set",
            "kwargs": {"column": "at", "value_set": ["2007-11-10T11:00:00+01:00"]},
        },
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "length", "value_set": [39.1, 40.1]}},
        {"type": "expect_column_values_to_not_be_in_set", "kwargs": {"column": "length", "value_set": [41.7]}},
        {
            "type": "expect_column_pair_values_to_be_in_set",
            "kwargs": {
                "column_A": "day",
                "column_B": "length",
                "value_pairs_set": [[days[0], 39.1], [days[1], 40.1], [days[2], 40.1]],
            },
        },
    ]
    (tmp_path / "readings.json").write_text(json.dumps({"name": "readings", "expectations": expectations}))
    suite = load_suite(tmp_path / "readings.json", dataset, tmp_path / "readings.yaml")
    store = ObjectStore(site="kajaani", root=str(tmp_path / "store"))
    publish_raw_tables(store, [table])
    record = validate_dataset(store, dask.get_client(), dataset, suite, "r1", every_run_over)
    assert [(r["unexpected_count"], r["error"]) for r in record["results"]] == [(1, None)] * len(expectations)
    assert record["rows_quarantined"] == 1  # id 4, outside every set


def test_dates_past_2262_keep_their_unit_for_gx() -> None:
    """pyarrow's nanosecond coercion wrapped a date past 2262 without a word: 9999-12-31, a common open end,
    was judged, and shown in quarantine samples, as 1816-03-29. A column whose values all fit still goes to
    GX in ns (where GX vectorises), whichever other column does not."""
    far, near = dt.date(9999, 12, 31), dt.date(2024, 1, 2)
    dates = pa.table({"until": pa.array([far, near], pa.date32())})
    assert pandas_for_gx(dates)["until"].tolist() == [pd.Timestamp(far), pd.Timestamp(near)]
    mixed = dates.append_column("at", pa.array([dt.datetime(2024, 1, 2, 12)] * 2, pa.timestamp("us")))
    frame = pandas_for_gx(mixed.append_column("day", pa.array([near, None], pa.date32())))
    assert frame["until"].tolist() == [pd.Timestamp(far), pd.Timestamp(near)]
    assert dict(frame.dtypes.astype(str)) == {
        "until": "datetime64[ms]",
        "at": "datetime64[ns]",
        "day": "datetime64[ns]",
    }


def test_set_members_past_2262_match_no_value_of_a_file_read_in_ns(tmp_path, dask: DaskCluster) -> None:
    """A member past 2262 (9999-12-31, an open end; 2300-01-01) failed every part whose values all lie in
    1677-2262, which GX gets in ns: "Out of bounds nanosecond timestamp". It matches no value there, in a
    set or not in it; the counts summed over parts are GX's on the whole table, read in its own units."""
    dataset = with_columns(
        [
            {"name": "id", "type": "int64", "nullable": False},
            {"name": "until", "type": "date"},
            {"name": "valid_to", "type": "timestamp"},
        ]
    )
    end, far, later = dt.datetime(2024, 12, 31), dt.datetime(9999, 12, 31), dt.datetime(2025, 6, 30)
    tables = [
        pa.table(
            {"id": [0, 1], "until": [end.date(), later.date()], "valid_to": pa.array([end, later], pa.timestamp("us"))}
        ),
        pa.table(
            {"id": [2, 3], "until": [far.date(), end.date()], "valid_to": pa.array([far, end], pa.timestamp("us"))}
        ),
    ]

    def expectations(day: Callable[[str], Any], instant: Callable[[str], Any]) -> list[dict]:
        in_set, not_in_set = "expect_column_values_to_be_in_set", "expect_column_values_to_not_be_in_set"
        pair = {"column_A": "until", "column_B": "valid_to"}
        return [
            {"type": in_set, "kwargs": {"column": "until", "value_set": [day("2024-12-31"), day("9999-12-31")]}},
            {"type": not_in_set, "kwargs": {"column": "valid_to", "value_set": [instant("9999-12-31T00:00:00")]}},
            {
                "type": in_set,
                "kwargs": {
                    "column": "valid_to",
                    "value_set": [instant("2300-01-01T00:00:00"), instant("2024-12-31T00:00:00")],
                },
            },
            {
                "type": "expect_column_pair_values_to_be_in_set",
                "kwargs": {
                    **pair,
                    "value_pairs_set": [
                        [day("9999-12-31"), instant("9999-12-31T00:00:00")],
                        [day("2024-12-31"), instant("2024-12-31T00:00:00")],
                    ],
                },
            },
        ]

    (tmp_path / "readings.json").write_text(json.dumps({"name": "readings", "expectations": expectations(str, str)}))
    suite = load_suite(tmp_path / "readings.json", dataset, tmp_path / "readings.yaml")
    store = ObjectStore(site="kajaani", root=str(tmp_path / "store"))
    publish_raw_tables(store, tables)
    record = validate_dataset(store, dask.get_client(), dataset, suite, "r1", every_run_over)
    whole = pandas_for_gx(pa.concat_tables(tables))
    assert str(whole.dtypes["valid_to"]) == "datetime64[us]"  # 9999 among them: every member is a value there
    reference = gx_whole_table(whole, expectations(pd.Timestamp, pd.Timestamp))
    ours = record["results"]
    assert [r["error"] for r in ours] == [None] * 4
    assert [r["unexpected_count"] for r in ours] == [r.result["unexpected_count"] for r in reference] == [1, 1, 2, 1]
    assert [r["success"] for r in ours] == [r.success for r in reference] == [False] * 4
    assert ours[1]["sample"] == ["9999-12-31 00:00:00"]  # as stored, not wrapped


def test_a_suite_gx_refuses_fails_with_its_message(tmp_path, dask: DaskCluster) -> None:
    """GX's pydantic error, pickled back from the worker, could not even print ("<exception str() failed>")."""
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    publish_raw(store, partitions())
    expectation = {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "sensor", "value_set": "ab"}}
    with pytest.raises(RuntimeError) as err:
        validate_dataset(
            store, dask.get_client(), DATASET, {"name": "readings", "expectations": [expectation]}, "r1", every_run_over
        )
    assert "value_set" in str(err.value) and "not a valid list" in str(err.value)


def test_an_expectation_gx_cannot_judge_fails_with_its_error(tmp_path, dask: DaskCluster) -> None:
    """GX reports a metric that raised (here a broken regex) under the metric's id, with no counts: that is
    a failure with GX's reason, never a pass with nothing unexpected."""
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    frames = partitions()
    publish_raw(store, frames)
    expectation = {"type": "expect_column_values_to_match_regex", "kwargs": {"column": "sensor", "regex": "([a-z"}}
    record = validate_dataset(
        store, dask.get_client(), DATASET, {"name": "readings", "expectations": [expectation]}, "r1", every_run_over
    )
    (result,) = record["results"]
    (reference,) = gx_whole_table(pd.concat(frames, ignore_index=True), [expectation])
    assert result["success"] is False is reference.success
    assert "regular expression" in result["error"]
    assert record["rows_quarantined"] == 0  # no row is blamed for a broken expectation


def test_values_of_pii_columns_never_leave_the_quarantine(tmp_path, dask: DaskCluster) -> None:
    """Results go to the UI, the data docs and the manifest (copied to other sites): no PII value in them."""
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    publish_raw(store, partitions())
    columns = [c.model_copy(update={"pii": c.name == "sensor"}) for c in DATASET.table.columns]
    personal = DATASET.model_copy(update={"table": DATASET.table.model_copy(update={"columns": columns})})
    expectations = [
        {"type": "expect_column_values_to_be_in_set", "kwargs": {"column": "sensor", "value_set": ["a"]}},
        {"type": "expect_column_max_to_be_between", "kwargs": {"column": "value", "max_value": 100}},
    ]
    suite = {"name": "r", "expectations": expectations}
    record = validate_dataset(store, dask.get_client(), personal, suite, "r1", every_run_over)
    sensor, value = record["results"]
    assert sensor["unexpected_count"] == 150 and sensor["sample"] == ["5 value(s) hidden: PII"]
    assert value["observed"] == 500.0  # not PII: shown
    assert record["rows_quarantined"] == 150  # the rows themselves stay in the quarantine, at the home site
    samples = [v["partial"]["counts"][0]["sample"] for v in store.read_json(record["part_verdicts"])]
    assert any(samples) and all(set(s) <= {"hidden: PII"} for s in samples)  # the counts kept for later runs


def test_errors_about_pii_columns_hide_the_values_they_quote() -> None:
    """A parser's error can quote the value it choked on; what went wrong stays readable."""
    columns = [c.model_copy(update={"pii": c.name == "sensor"}) for c in DATASET.table.columns]
    personal = DATASET.model_copy(update={"table": DATASET.table.model_copy(update={"columns": columns})})
    error = "could not convert string to float: 'jane@example.org' (row \"7\")"
    results = [
        {"type": "expect_column_values_to_match_regex", "kwargs": {"column": c}, "sample": [], "error": error}
        for c in ("sensor", "value")
    ]
    on_pii, other = hide_personal_values(results, personal)
    assert on_pii["error"] == "could not convert string to float: 'hidden: PII' (row 'hidden: PII')"
    assert other["error"] == error


GLOBAL_CASES = [
    {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "id"}},
    {"type": "expect_column_values_to_be_unique", "kwargs": {"column": "sensor"}},
    {"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["id", "sensor"]}},
    {
        "type": "expect_column_unique_value_count_to_be_between",
        "kwargs": {"column": "sensor", "min_value": 2, "max_value": 2},
    },
    {
        "type": "expect_column_unique_value_count_to_be_between",
        "kwargs": {"column": "id", "min_value": 1, "max_value": 10},
    },
    {"type": "expect_column_proportion_of_unique_values_to_be_between", "kwargs": {"column": "id", "min_value": 0.99}},
    {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "value", "min_value": 40, "max_value": 60}},
    {"type": "expect_column_max_to_be_between", "kwargs": {"column": "value", "max_value": 100}},
    {"type": "expect_column_min_to_be_between", "kwargs": {"column": "value", "min_value": 0}},
    {"type": "expect_column_sum_to_be_between", "kwargs": {"column": "value", "min_value": 0}},
    {"type": "expect_column_stdev_to_be_between", "kwargs": {"column": "value", "min_value": 1, "max_value": 1000}},
    {"type": "expect_column_median_to_be_between", "kwargs": {"column": "value", "min_value": 10, "max_value": 40}},
    {"type": "expect_column_median_to_be_between", "kwargs": {"column": "value", "min_value": 100, "max_value": 200}},
    {"type": "expect_column_values_to_be_increasing", "kwargs": {"column": "id"}},
    {"type": "expect_column_values_to_be_increasing", "kwargs": {"column": "value"}},
    {"type": "expect_column_values_to_be_decreasing", "kwargs": {"column": "id"}},
    {"type": "expect_column_values_to_be_increasing", "kwargs": {"column": "at"}},  # ordered, no numeric step
    {"type": "expect_column_values_to_be_increasing", "kwargs": {"column": "at", "strictly": True}},
    {"type": "expect_column_values_to_be_decreasing", "kwargs": {"column": "at"}},
    {
        "type": "expect_column_value_z_scores_to_be_less_than",
        "kwargs": {"column": "value", "threshold": 3, "double_sided": True},
    },
    {
        "type": "expect_column_value_z_scores_to_be_less_than",
        "kwargs": {"column": "value", "threshold": 1.5, "double_sided": True},
    },
    {  # double-sided, GX takes the threshold's size
        "type": "expect_column_value_z_scores_to_be_less_than",
        "kwargs": {"column": "value", "threshold": -3, "double_sided": True},
    },
]


def test_non_decomposable_expectations_agree_with_gx_on_the_whole_table(dask: DaskCluster) -> None:
    dask.get_client()  # the judgement runs on the real cluster
    frames = partitions()
    frames[2].loc[5, "id"] = 150  # a duplicate id across files, and an id out of order
    whole = pd.concat(frames, ignore_index=True)
    whole["at"] = pd.Timestamp("2026-01-01") + pd.to_timedelta(whole["id"], unit="min")
    whole.loc[7, "value"] = np.nan  # a null: an element, and missing
    ours = judge_global(dd.from_pandas(whole, npartitions=3, sort=False), GLOBAL_CASES)
    reference = gx_whole_table(whole, GLOBAL_CASES)
    verdicts = [
        (e["type"], e["kwargs"], o["success"], r.success) for e, o, r in zip(GLOBAL_CASES, ours, reference, strict=True)
    ]
    assert [v[2] for v in verdicts] == [v[3] for v in verdicts], verdicts
    assert {v[2] for v in verdicts} == {True, False}  # the cases exercise both outcomes
    unique_id = ours[0]
    assert unique_id["unexpected_count"] == reference[0].result["unexpected_count"] == 2
    z_scores = ours[-1], reference[-1].result
    counted = ("element_count", "missing_count", "unexpected_count")
    assert [z_scores[0][k] for k in counted] == [z_scores[1][k] for k in counted] == [300, 1, 20]


PARQUET_CASES = [
    {"type": "expect_column_median_to_be_between", "kwargs": {"column": "x", "min_value": 2374, "max_value": 2624}},
    {
        "type": "expect_column_quantile_values_to_be_between",
        "kwargs": {
            "column": "x",
            "quantile_ranges": {"quantiles": [0.1, 0.9], "value_ranges": [[450, 550], [4450, 4550]]},
        },
    },
    {"type": "expect_column_max_to_be_between", "kwargs": {"column": "day", "max_value": "2030-01-01T00:00:00"}},
    {"type": "expect_column_min_to_be_between", "kwargs": {"column": "day", "min_value": "2026-06-01T00:00:00"}},
    {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "at", "min_value": "2026-01-01T00:00:00"}},
    {"type": "expect_column_values_to_be_increasing", "kwargs": {"column": "x", "mostly": 0.99}},
    {"type": "expect_column_values_to_be_increasing", "kwargs": {"column": "x"}},
    {"type": "expect_compound_columns_to_be_unique", "kwargs": {"column_list": ["g", "h"]}},
    {
        "type": "expect_compound_columns_to_be_unique",
        "kwargs": {"column_list": ["g", "h"], "ignore_row_if": "any_value_is_missing"},
    },
]


def test_dataset_expectations_read_from_parquet_agree_with_gx(tmp_path, dask: DaskCluster) -> None:
    """As the validated step reads them: files of unequal size (a trend split by month, say), dates as
    Arrow dates, bounds on dates written as text, partly-null compound keys, a few steps out of order."""
    import pyarrow.parquet as pq

    dask.get_client()
    files = []
    for i, (start, stop) in enumerate([(0, 1000), (1000, 1500), (1500, 5000)]):
        x = np.arange(start, stop, dtype=np.float64)
        x[[10, 20]] = x[[20, 10]]  # two rows swapped: one step out of order
        g = np.where(np.arange(len(x)) % 3 == 0, None, "a")  # null or "a"; h: null or a small number
        h = np.where(np.arange(len(x)) % 5 == 0, np.nan, np.arange(len(x)) % 7)
        frame = pd.DataFrame({"x": x, "g": g, "h": h})
        frame["day"] = pd.Timestamp("2026-01-01") + pd.to_timedelta(np.arange(len(x)) % 300, unit="D")
        frame["at"] = frame["day"] + pd.to_timedelta(start, unit="h")
        table = pa.Table.from_pandas(frame, preserve_index=False)
        table = table.set_column(3, "day", table.column("day").cast(pa.date32()))
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(table, files[-1])
    ours = judge_global(dd.read_parquet(files), PARQUET_CASES)
    whole = pa.concat_tables(pq.read_table(f) for f in files).to_pandas(date_as_object=False)
    reference = gx_whole_table(whole, PARQUET_CASES)
    for expectation, mine, theirs in zip(PARQUET_CASES, ours, reference, strict=True):
        assert mine["success"] is bool(theirs.success), (expectation, mine, theirs.result)
        if "unexpected_count" in theirs.result:
            assert mine["unexpected_count"] == theirs.result["unexpected_count"], (expectation, mine)
    assert ours[0]["observed"] == whole["x"].median() == 2499.5  # exact, though no file holds the middle
    assert {r["success"] for r in ours} == {True, False}


def test_statistics_of_large_integers_and_far_dates(tmp_path, dask: DaskCluster) -> None:
    """Dask sums int64 per partition and wraps around: epoch microseconds gave a negative mean and every row
    an outlier. A date past 2262 (the usual open end, 9999-12-31) failed the step when cast to ns."""
    import pyarrow.parquet as pq

    dask.get_client()
    stamps = 1_700_000_000_000_000 + np.arange(10_000, dtype=np.int64) * 1_000_000
    files = []
    for i, part in enumerate(np.array_split(stamps, 2)):
        at = pa.array(part, pa.timestamp("us")).to_pylist()[:-1] + [dt.datetime(9999, 12, 31) if i else None]
        until = pa.array([d and d.date() for d in at], pa.date32())
        table = pa.table({"us": part, "until": until, "at": pa.array(at, pa.timestamp("us"))})
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(table, files[-1])
    mean = float(stamps.mean())
    integer_cases = [
        {
            "type": "expect_column_mean_to_be_between",
            "kwargs": {"column": "us", "min_value": mean - 1, "max_value": mean + 1},
        },
        {
            "type": "expect_column_value_z_scores_to_be_less_than",
            "kwargs": {"column": "us", "threshold": 3, "double_sided": True},
        },
    ]
    far_cases = [
        {"type": "expect_column_max_to_be_between", "kwargs": {"column": "until", "max_value": "2100-01-01"}},
        {"type": "expect_column_min_to_be_between", "kwargs": {"column": "until", "min_value": "2023-01-01"}},
        {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "at", "min_value": "2023-01-01T00:00:00"}},
    ]
    ours = judge_global(dd.read_parquet(files), integer_cases + far_cases)
    reference = gx_whole_table(pd.DataFrame({"us": stamps}), integer_cases)
    assert [o["success"] for o in ours[:2]] == [r.success for r in reference] == [True, True]
    assert ours[1]["unexpected_count"] == reference[1].result["unexpected_count"] == 0
    assert [o["success"] for o in ours[2:]] == [False, True, True]
    assert ours[2]["observed"] == pd.Timestamp("9999-12-31")
    assert ours[4]["observed"] > pd.Timestamp("2024-01-01")  # the rest lie in 2023: pulled up by the one dated 9999


def big_id_cases() -> list[dict]:
    """Every kind of dataset statistic, and set membership, on ids past 2**53 with a null among them."""
    exact = {"column": "ref"}
    return [
        {"type": "expect_column_values_to_be_unique", "kwargs": exact},
        {"type": "expect_column_unique_value_count_to_be_between", "kwargs": {**exact, "min_value": 3, "max_value": 3}},
        {"type": "expect_column_proportion_of_unique_values_to_be_between", "kwargs": {**exact, "min_value": 1}},
        {"type": "expect_column_values_to_be_increasing", "kwargs": {**exact, "strictly": True}},
        {"type": "expect_column_values_to_be_decreasing", "kwargs": {**exact, "strictly": True}},
        {"type": "expect_column_min_to_be_between", "kwargs": {**exact, "min_value": BIG + 1}},
        {"type": "expect_column_max_to_be_between", "kwargs": {**exact, "max_value": BIG + 3}},
        {"type": "expect_column_sum_to_be_between", "kwargs": {**exact, "min_value": 3 * BIG + 6}},
        {"type": "expect_column_mean_to_be_between", "kwargs": {**exact, "min_value": BIG}},
        {"type": "expect_column_stdev_to_be_between", "kwargs": {**exact, "max_value": 10}},
        {"type": "expect_column_median_to_be_between", "kwargs": {**exact, "min_value": BIG, "max_value": BIG + 4}},
        {
            "type": "expect_column_quantile_values_to_be_between",
            "kwargs": {**exact, "quantile_ranges": {"quantiles": [0, 0.5, 1], "value_ranges": [[BIG, BIG + 4]] * 3}},
        },
        {
            "type": "expect_column_value_z_scores_to_be_less_than",
            "kwargs": {**exact, "threshold": 3, "double_sided": True},
        },
        {"type": "expect_column_values_to_be_in_set", "kwargs": {**exact, "value_set": [BIG + 1, BIG + 2, BIG + 3]}},
    ]


def test_statistics_of_ids_past_2_53_with_a_null_agree_with_gx(tmp_path, dask: DaskCluster) -> None:
    """Dask read a file's integer column with a null as float64: ids past 2**53 collided (false duplicates,
    too few distinct values, steps out of order) and min, max and sum came back rounded."""
    columns = [{"name": "id", "type": "int64", "nullable": False}, {"name": "ref", "type": "int64"}]
    store = ObjectStore(site="kajaani", root=str(tmp_path))
    tables = [
        pa.table({"id": pa.array(ids, pa.int64()), "ref": pa.array(refs, pa.int64())})
        for ids, refs in [([1, 2], [BIG + 3, BIG + 2]), ([3, 4], [BIG + 1, None])]
    ]
    publish_raw_tables(store, tables)
    suite = {"name": "readings", "expectations": big_id_cases()}
    record = validate_dataset(store, dask.get_client(), with_columns(columns), suite, "r1", every_run_over)
    reference = gx_whole_table(pandas_for_gx(pa.concat_tables(tables)), big_id_cases())
    ours = record["results"]
    assert [r["success"] for r in ours] == [r.success for r in reference]
    assert {r["success"] for r in ours} == {True, False}
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.get("unexpected_count") == theirs.result.get("unexpected_count"), mine
    assert [r["observed"] for r in ours[1:3]] == [r.result["observed_value"] for r in reference[1:3]] == [3, 1]
    for mine, theirs in zip(ours[5:8], reference[5:8], strict=True):
        assert mine["observed"] == int(theirs.result["observed_value"]), mine  # exact: Python compares int and float
    assert ours[11]["observed"] == [BIG + 1, BIG + 2, BIG + 3] == reference[11].result["observed_value"]["values"]


def test_median_and_quantiles_at_an_exact_bound_agree_with_gx(dask: DaskCluster) -> None:
    """low + t * (high - low) made the median of 0.1 and 0.5 0.30000000000000004 (pandas: 0.3), failing a
    bound of exactly 0.3 that GX passes."""
    dask.get_client()
    at_bound = {"quantiles": [0.5], "value_ranges": [[0.3, 0.3]]}
    cases = [
        {"type": "expect_column_median_to_be_between", "kwargs": {"column": "x", "min_value": 0.3, "max_value": 0.3}},
        *(
            {
                "type": "expect_column_quantile_values_to_be_between",
                "kwargs": {"column": "x", "allow_relative_error": method, "quantile_ranges": at_bound},
            }
            for method in ("linear", "midpoint")
        ),
    ]
    whole = pd.DataFrame({"x": [0.1, 0.5]})
    ours = judge_global(dd.from_pandas(whole, npartitions=2, sort=False), cases)
    assert [o["success"] for o in ours] == [r.success for r in gx_whole_table(whole, cases)] == [True] * 3


def test_quantiles_within_gx_tolerance_of_a_bound_agree_with_gx(dask: DaskCluster) -> None:
    """GX passes a quantile within a relative 1e-4 of a bound: a 99th percentile of 250.01 meets "at most
    250" (and "at least 250.02"); compared exactly it failed. 249.9 is beyond the tolerance."""
    dask.get_client()
    cases = [
        {
            "type": "expect_column_quantile_values_to_be_between",
            "kwargs": {"column": "x", "quantile_ranges": {"quantiles": [0.99], "value_ranges": [bounds]}},
        }
        for bounds in ([None, 250], [250.02, None], [None, 249.9])
    ]
    whole = pd.DataFrame({"x": [*np.arange(200.0, 250.0), *[250.01] * 5, *[100.0] * 45]})
    ours = judge_global(dd.from_pandas(whole, npartitions=2, sort=False), cases)
    assert [o["success"] for o in ours] == [r.success for r in gx_whole_table(whole, cases)] == [True, True, False]
    assert ours[0]["observed"] == [250.01]


def test_statistics_of_float32_columns_agree_with_gx_at_bounds_as_written(dask: DaskCluster) -> None:
    """GX compares pandas' float32 statistics with the bounds in float32 (NumPy 2): a max of 37.2 meets "at
    most 37.2". Compared in float64 (37.20000076293945) it failed, as did the min, median, mean, sum and
    deviation at their bounds; the mean and deviation also came from Dask in float64."""
    dask.get_client()
    whole = pd.DataFrame(
        {
            "temp": np.array([36.6, 37.2, 36.9, 37.2, 36.6, np.nan], np.float32),
            "f": np.array([0.7, np.nan, 0.0, np.nan, np.nan, np.nan], np.float32),  # summed alike in any order
        }
    )

    def between(statistic: str, column: str, low: float | None, high: float | None) -> dict:
        bounds = {"min_value": low, "max_value": high}
        kwargs = {"column": column} | {k: v for k, v in bounds.items() if v is not None}
        return {"type": f"expect_column_{statistic}_to_be_between", "kwargs": kwargs}

    deviation = float(whole["f"].std())  # as GX shows it: 0.4949747323989868
    cases = [
        between("max", "temp", None, 37.2),
        between("max", "temp", None, 37.19),
        between("min", "temp", 36.6, 36.6),
        between("median", "temp", 36.9, 36.9),
        between("mean", "f", 0.35, 0.35),
        between("sum", "f", 0.7, 0.7),
        between("stdev", "f", deviation, deviation),
    ]
    ours = judge_global(dd.from_pandas(whole, npartitions=2, sort=False), cases)
    reference = gx_whole_table(whole, cases)
    verdicts = [(e["kwargs"], o["success"], r.success) for e, o, r in zip(cases, ours, reference, strict=True)]
    assert [v[1] for v in verdicts] == [v[2] for v in verdicts] == [True, False, *[True] * 5], verdicts
    assert type(ours[0]["observed"]) is float and ours[0]["observed"] == 37.20000076293945  # shown as Python's


def random_parts(rng: np.random.Generator) -> list[pd.Series]:
    """A column in one to three files: floats of any scale with nulls, float32, or few distinct integers."""
    kind, sizes = rng.integers(3), rng.choice([1, 2, 5, 50, 3_000], rng.integers(1, 4))
    if kind == 0:
        return [
            pd.Series(np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n) * 10.0 ** rng.integers(-3, 4)))
            for n in sizes
        ]
    if kind == 1:
        return [pd.Series(rng.random(n).astype(np.float32)) for n in sizes]
    return [pd.Series(rng.integers(-5, 5, n)) for n in sizes]


def test_median_and_quantiles_agree_with_pandas_to_the_last_bit() -> None:
    """Against pandas on the whole column, nulls dropped as GX drops them, for every interpolation."""
    rng = np.random.default_rng(0)
    with dask.config.set(scheduler="sync"):
        for _ in range(8):
            parts = random_parts(rng)
            whole = pd.concat(parts, ignore_index=True).dropna()
            levels = sorted({0.0, 0.5, 1.0, *np.round(rng.random(4), 3).tolist()})
            if whole.empty:
                continue
            cases = [{"type": "expect_column_median_to_be_between", "kwargs": {"column": "x", "min_value": 0}}]
            cases += [
                {
                    "type": "expect_column_quantile_values_to_be_between",
                    "kwargs": {
                        "column": "x",
                        "allow_relative_error": method,
                        "quantile_ranges": {"quantiles": levels, "value_ranges": [[None, None]] * len(levels)},
                    },
                }
                for method in QUANTILE_METHODS
            ]
            frame = dd.concat([dd.from_pandas(part.to_frame("x"), npartitions=1) for part in parts])
            median, *quantiles = judge_global(frame, cases)
            assert median["observed"] == whole.median(), whole.to_numpy()
            for method, found in zip(QUANTILE_METHODS, quantiles, strict=True):
                assert found["observed"] == whole.quantile(levels, interpolation=method).tolist(), method


def test_data_docs_show_the_observed_quantiles_and_shares() -> None:
    """GX's renderer shows "--" for quantiles not given as {quantiles, values}, and for NumPy numbers."""
    from aifactory_assets.data_docs import render_data_docs

    ranges = {"quantiles": [0.1, 0.9], "value_ranges": [[1, 2], [3, 4]]}
    common = {"severity": "critical", "scope": "dataset", "success": True}
    results = [
        {
            "type": "expect_column_quantile_values_to_be_between",
            "kwargs": {"column": "x", "quantile_ranges": ranges},
            "observed": [np.float64(1.5), np.float64(3.25)],
            **common,
        },
        {
            "type": "expect_column_proportion_of_unique_values_to_be_between",
            "kwargs": {"column": "x", "min_value": 0.5},
            "observed": np.float64(0.8765),
            **common,
        },
    ]
    page = render_data_docs("readings", results, "r1")
    assert "3.25" in page and "0.8765" in page


def test_data_docs_show_a_hidden_quantile_as_hidden() -> None:
    """A quantile of a PII column is hidden as one text, which GX's renderer failed on ('str' object has no
    attribute 'get', logged, not raised), showing "--" as if nothing was measured."""
    from aifactory_assets.data_docs import render_data_docs

    ranges = {"quantiles": [0.25, 0.75], "value_ranges": [[0, 50], [50, 100]]}
    result = {"type": "expect_column_quantile_values_to_be_between", "kwargs": {"column": "age"}, "success": True}
    result |= {"severity": "critical", "scope": "dataset", "observed": "hidden: PII"}
    result["kwargs"]["quantile_ranges"] = ranges
    page = render_data_docs("patients", [result], "r1")
    assert page.count("hidden: PII") == 2  # one per quantile


def test_data_docs_show_what_gx_models_refuse() -> None:
    """The catalogue takes a z-score expectation without `double_sided` (we default it, as GX does) and text
    bounds for a text column's min, which GX's models refuse: the whole page failed, and with it every
    validated run after its record was published."""
    from aifactory_assets.data_docs import render_data_docs

    common = {"severity": "critical", "scope": "dataset", "success": True}
    results = [
        {
            "type": "expect_column_value_z_scores_to_be_less_than",
            "label": "expect_column_value_z_scores_to_be_less_than(x)",
            "kwargs": {"column": "x", "threshold": 4},
            "element_count": 10,
            "missing_count": 0,
            "unexpected_count": 0,
            **common,
        },
        {
            "type": "expect_column_min_to_be_between",
            "label": "expect_column_min_to_be_between(species)",
            "kwargs": {"column": "species", "min_value": "Adelie"},
            "observed": "Adelie",
            **common,
        },
    ]
    results[0] |= {"sample": ["</body><script>alert(1)</script>"]}  # a landed value, shown as a sample
    page = render_data_docs("penguins", results, "r1")
    assert "z-score" in page.lower() or "z_score" in page  # GX's own rendering of the first
    appendix = page[page.index("beyond what GX") :]
    assert "expect_column_min_to_be_between(species)" in appendix and "passed" in appendix
    assert "<script>alert" not in page and page.count("</body>") == 1 and appendix.rstrip().endswith("</html>")
