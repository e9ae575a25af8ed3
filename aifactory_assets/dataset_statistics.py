"""Expectations that do not decompose per partition, judged over the whole dataset with Dask reductions.

Uniqueness, distinct counts, median and quantiles, order and z-scores need every row at once; running GX
per partition would give wrong answers. Each expectation becomes one lazy statistic; all are computed in
one `dask.compute` so the data is read once. Median and quantiles use Dask's approximate quantiles
(exact on a single partition); the result says so.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

Statistic = Any  # a lazy Dask value, or a tuple of them


def _between(value: float | None, kwargs: dict[str, Any]) -> bool:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    strict_low, strict_high = kwargs.get("strict_min", False), kwargs.get("strict_max", False)
    above = low is None or (value > low if strict_low else value >= low)
    below = high is None or (value < high if strict_high else value <= high)
    return bool(above and below)


def _out_of_order(earlier: Any, later: Any, decreasing: bool, strictly: bool) -> Any:
    """Comparisons, not differences: dates, timestamps and text have an order but no numeric step."""
    if decreasing:
        earlier, later = later, earlier
    return later <= earlier if strictly else later < earlier


def _order_violations(part: pd.Series, decreasing: bool, strictly: bool) -> pd.DataFrame:
    """Per partition: first and last non-null value, and violations inside the partition."""
    values = part.dropna().to_numpy()
    bad = int(np.count_nonzero(_out_of_order(values[:-1], values[1:], decreasing, strictly)))
    first, last = (values[0], values[-1]) if len(values) else (None, None)
    return pd.DataFrame({"first": [first], "last": [last], "bad": [bad]}, dtype=object)


def _statistic(frame: dd.DataFrame, kind: str, kwargs: dict[str, Any]) -> Statistic:
    column = kwargs.get("column")
    series = frame[column] if column else None
    if kind == "expect_column_values_to_be_unique":
        counts = series.dropna().value_counts(split_out=True)
        return series.count(), series.isna().sum(), counts[counts > 1].sum()
    if kind == "expect_compound_columns_to_be_unique":
        sizes = frame.groupby(kwargs["column_list"], dropna=False).size(split_out=True)
        return frame.shape[0], 0, sizes[sizes > 1].sum()
    if kind == "expect_column_unique_value_count_to_be_between":
        return series.nunique()
    if kind == "expect_column_proportion_of_unique_values_to_be_between":
        return series.nunique(), series.count()
    if kind == "expect_column_median_to_be_between":
        return series.dropna().quantile(0.5)
    if kind == "expect_column_quantile_values_to_be_between":
        return series.dropna().quantile(kwargs["quantile_ranges"]["quantiles"])
    if kind in ("expect_column_values_to_be_increasing", "expect_column_values_to_be_decreasing"):
        decreasing = kind.endswith("decreasing")
        meta = pd.DataFrame({"first": [], "last": [], "bad": []}, dtype=object)
        return series.map_partitions(_order_violations, decreasing, kwargs.get("strictly", False), meta=meta)
    if kind == "expect_column_value_z_scores_to_be_less_than":
        return series.mean(), series.std(), series.count()
    reducer = {"mean": "mean", "stdev": "std", "min": "min", "max": "max", "sum": "sum"}
    return getattr(series, reducer[kind.removeprefix("expect_column_").removesuffix("_to_be_between")])()


def _ordered(partials: pd.DataFrame, kwargs: dict[str, Any], decreasing: bool) -> tuple[int, int]:
    """Combine per-partition order checks in partition order: (violations, rows judged)."""
    bad, previous = int(partials["bad"].sum()), None
    for first, last in zip(partials["first"], partials["last"], strict=True):
        if first is None:
            continue
        if previous is not None:
            bad += int(_out_of_order(previous, first, decreasing, bool(kwargs.get("strictly"))))
        previous = last
    return bad, len(partials)


def _verdict(kind: str, kwargs: dict[str, Any], value: Any) -> dict[str, Any]:
    """Turn a computed statistic into a GX-shaped result: success, observed value, row counts if any."""
    mostly = kwargs.get("mostly")
    if kind in ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"):
        judged, missing, unexpected = (int(v) for v in value)
        element = judged + missing if kind == "expect_column_values_to_be_unique" else judged
        share_ok = 1.0 if judged == 0 else (judged - unexpected) / judged
        success = unexpected == 0 if mostly is None else share_ok >= mostly
        return {
            "success": success,
            "element_count": element,
            "missing_count": missing,
            "unexpected_count": unexpected,
            "observed": f"{unexpected} rows share a value",
        }
    if kind == "expect_column_proportion_of_unique_values_to_be_between":
        distinct, count = value
        observed = float(distinct) / count if count else 0.0
        return {"success": _between(observed, kwargs), "observed": observed}
    if kind == "expect_column_quantile_values_to_be_between":
        ranges = kwargs["quantile_ranges"]["value_ranges"]
        observed = [float(v) for v in np.atleast_1d(value)]
        success = all(
            _between(v, {"min_value": lo, "max_value": hi}) for v, (lo, hi) in zip(observed, ranges, strict=True)
        )
        return {"success": success, "observed": observed, "approximate": True}
    if kind in ("expect_column_values_to_be_increasing", "expect_column_values_to_be_decreasing"):
        unexpected, _ = _ordered(value, kwargs, kind.endswith("decreasing"))
        return {
            "success": unexpected == 0,
            "unexpected_count": unexpected,
            "observed": f"{unexpected} steps out of order",
        }
    if kind == "expect_column_value_z_scores_to_be_less_than":
        return {}  # needs a second pass: see judge_global
    observed = value.item() if hasattr(value, "item") else value
    result = {"success": _between(observed, kwargs), "observed": observed}
    if kind in ("expect_column_median_to_be_between",):
        result["approximate"] = True
    return result


def _z_scores(frame: dd.DataFrame, kwargs: dict[str, Any], moments: tuple[float, float, int]) -> dict[str, Any]:
    mean, std, count = moments
    if not std or np.isnan(std):
        return {"success": True, "element_count": int(count), "unexpected_count": 0, "observed": "zero variance"}
    z = (frame[kwargs["column"]] - mean) / std
    z = z.abs() if kwargs.get("double_sided", True) else z
    unexpected = int((z >= kwargs["threshold"]).sum().compute())
    mostly = kwargs.get("mostly")
    share_ok = 1.0 if count == 0 else (count - unexpected) / count
    success = unexpected == 0 if mostly is None else share_ok >= mostly
    return {
        "success": success,
        "element_count": int(count),
        "unexpected_count": unexpected,
        "observed": f"{unexpected} rows with |z| >= {kwargs['threshold']}",
    }


def judge_global(frame: dd.DataFrame, expectations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per expectation (in order), all statistics computed in one pass over `frame`."""
    lazy = [_statistic(frame, e["type"], e.get("kwargs", {})) for e in expectations]
    values = dask.compute(*lazy)
    results = []
    for expectation, value in zip(expectations, values, strict=True):
        kind, kwargs = expectation["type"], expectation.get("kwargs", {})
        if kind == "expect_column_value_z_scores_to_be_less_than":
            results.append(_z_scores(frame, kwargs, value))
        else:
            results.append(_verdict(kind, kwargs, value))
    return results
