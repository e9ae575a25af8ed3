"""Expectations that do not decompose per partition, judged over the whole dataset with Dask reductions.

Uniqueness, distinct counts, median and quantiles, order and z-scores need every row at once; running GX
per partition would give wrong answers. Each expectation becomes one lazy statistic; all are computed in
one `dask.compute` so the data is read once. Median and quantiles are exact: a first pass brackets each
wanted rank from per-partition quantile grids, a second pass per rank counts the values below and at the
bracket's ends and collects the few inside it (see `exact_quantiles`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa

from aifactory_assets.catalog import utc_instant

Statistic = Any  # a lazy Dask value, or a tuple of them


def between(value: Any, kwargs: dict[str, Any]) -> bool:
    if pd.isna(value):  # None, NaN, NaT, and pandas' NA (the min of an all-null column of nullable integers)
        return False
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    if isinstance(value, (dt.date, np.datetime64)):  # a date or timestamp: bounds are written as text, as GX reads them
        value, low, high = (None if v is None else utc_instant(v) for v in (value, low, high))
    strict_low, strict_high = kwargs.get("strict_min", False), kwargs.get("strict_max", False)
    above = low is None or (value > low if strict_low else value >= low)
    below = high is None or (value < high if strict_high else value <= high)
    return bool(above and below)


def _temporal(dtype: Any) -> bool:
    kind = dtype.pyarrow_dtype if isinstance(dtype, pd.ArrowDtype) else None
    return pd.api.types.is_datetime64_any_dtype(dtype) or (
        kind is not None and (pa.types.is_date(kind) or pa.types.is_timestamp(kind))
    )


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
    return pd.DataFrame(
        {"first": [first], "last": [last], "bad": [bad], "count": [len(values)], "rows": [len(part)]}, dtype=object
    )


def _statistic(frame: dd.DataFrame, kind: str, kwargs: dict[str, Any]) -> Statistic:
    column = kwargs.get("column")
    series = frame[column] if column else None
    if kind == "expect_column_values_to_be_unique":
        counts = series.dropna().value_counts(split_out=True)
        return series.count(), series.isna().sum(), counts[counts > 1].sum()
    if kind == "expect_compound_columns_to_be_unique":
        # As GX: rows whose listed values are all (or, if asked, any) missing are not judged; GX's other
        # values are refused as the catalogue loads (IGNORE_ROW_IF).
        columns = kwargs["column_list"]
        ignore = {"all_values_are_missing": "all", "any_value_is_missing": "any", "never": None}[
            kwargs.get("ignore_row_if", "all_values_are_missing")
        ]
        judged = frame[columns].dropna(how=ignore) if ignore else frame[columns]
        sizes = judged.groupby(columns, dropna=False).size(split_out=True)
        return judged.shape[0], frame.shape[0] - judged.shape[0], sizes[sizes > 1].sum()
    if kind == "expect_column_unique_value_count_to_be_between":
        return series.nunique()
    if kind == "expect_column_proportion_of_unique_values_to_be_between":
        return series.nunique(), series.count()
    if kind in QUANTILE_KINDS:
        return series.map_partitions(_grid, meta=pd.DataFrame({"n": [], "grid": []}, dtype=object))
    if kind in ("expect_column_values_to_be_increasing", "expect_column_values_to_be_decreasing"):
        decreasing = kind.endswith("decreasing")
        meta = pd.DataFrame({"first": [], "last": [], "bad": [], "count": [], "rows": []}, dtype=object)
        return series.map_partitions(_order_violations, decreasing, kwargs.get("strictly", False), meta=meta)
    if kind == "expect_column_value_z_scores_to_be_less_than":
        return _floats(series).mean(), _floats(series).std(), series.count(), series.size
    reducer = {"mean": "mean", "stdev": "std", "min": "min", "max": "max", "sum": "sum"}
    name = reducer[kind.removeprefix("expect_column_").removesuffix("_to_be_between")]
    if _temporal(series.dtype):  # dates and timestamps: as datetime64 (Dask cannot reduce Arrow dates), in raw's
        series = series.astype("datetime64[us]")  # unit: in ns, a date past 2262 (9999-12-31) fails the step
        if name == "mean":  # in us as floats: an int64 sum of us since 1970 overflows past a few thousand values
            return series.dropna().astype("int64").astype("float64").mean()
    return getattr(_floats(series) if name in ("mean", "std") else series, name)()


def _floats(series: dd.Series) -> dd.Series:
    """Integers as floats for a mean or a deviation, as pandas (and so GX) sums them: Dask sums int64 per
    partition and wraps around (10,000 epoch microseconds gave a negative mean)."""
    if not pd.api.types.is_integer_dtype(series.dtype):
        return series
    return series.astype("float64[pyarrow]" if isinstance(series.dtype, pd.ArrowDtype) else "float64")


QUANTILE_KINDS = ("expect_column_median_to_be_between", "expect_column_quantile_values_to_be_between")
GRID = np.linspace(0.0, 1.0, 1_025)  # per partition: its values' quantiles at these levels


def _grid(part: pd.Series) -> pd.DataFrame:
    values = np.sort(part.dropna().to_numpy())
    grid = values[np.round(GRID * (len(values) - 1)).astype(np.int64)] if len(values) else values
    return pd.DataFrame({"n": [len(values)], "grid": [grid]}, dtype=object)


def _bracket(grids: pd.DataFrame, rank: int) -> tuple[float, float]:
    """Values below and above which the value of `rank` (0-based, among all non-null values) must lie,
    estimated from the grids: each grid value stands for about n/1,024 values of its partition, so the
    estimate of a value's rank is off by at most the sum of those, which the bracket adds on each side."""
    parts = [(int(n), g) for n, g in zip(grids["n"], grids["grid"], strict=True) if n]
    candidates = np.unique(np.concatenate([g for _, g in parts]))
    below = sum(n * np.searchsorted(g, candidates, side="left") / len(g) for n, g in parts)
    margin = sum(n / (len(GRID) - 1) + 1 for n, _ in parts)
    under, over = candidates[below <= rank - margin], candidates[below >= rank + 1 + margin]
    return (under[-1] if len(under) else -np.inf), (over[0] if len(over) else np.inf)


def exact_quantiles(series: dd.Series, grids: pd.DataFrame, quantiles: list[float], method: str) -> list[Any]:
    """The quantiles pandas would give on the whole column, as numpy numbers (`method` as pandas'
    `interpolation`, or "median" for pandas' median, which takes the middle differently). Each rank needed
    is found inside its own bracket: the values below it and equal to either end are counted, and only
    those strictly inside (about 1/500 of the column) reach this process."""
    total = int(grids["n"].sum())
    if total == 0:
        return [float("nan")] * len(quantiles)
    positions = [q * (total - 1) for q in quantiles]
    ranks = sorted({int(f(p)) for p in positions for f in (np.floor, np.ceil)})
    values = series.dropna()
    found = {}
    for rank in ranks:
        for low, high in (_bracket(grids, rank), (-np.inf, np.inf)):  # the estimate; if it missed, everything
            inner = values[(values > low) & (values < high)]
            below, at_low, at_high, inside = dask.compute(
                (values < low).sum(), (values == low).sum(), (values == high).sum(), inner
            )
            below, at_low, at_high = int(below), int(at_low), int(at_high) if high != low else 0
            if below <= rank < below + at_low + len(inside) + at_high:
                break
        offset = rank - below
        if offset < at_low:
            found[rank] = low
        elif offset < at_low + len(inside):
            found[rank] = np.sort(inside.to_numpy())[offset - at_low]
        else:
            found[rank] = high
    return [_interpolate(found, p, method) for p in positions]


def _interpolate(at: dict[int, Any], position: float, method: str) -> Any:
    """As pandas computes it from the values at the ranks around `position`, to the last bit (a verdict at
    an exact bound turns on it): the median as numpy's mean of the middle value(s), quantiles by numpy's
    interpolation. Arithmetic on the values' own numpy types, as numpy's, and a numpy number back (a float32
    median stays float32, as GX compares it with its bounds)."""
    below, above = int(np.floor(position)), int(np.ceil(position))
    low, high = at[below], at[above]
    if method == "median":
        return np.mean(np.array([low] if below == above else [low, high]))
    if method == "nearest":
        return at[int(np.around(position))]
    if method in ("lower", "higher"):
        return low if method == "lower" else high
    weight = (above - below) / 2 if method == "midpoint" else position - below
    return _lerp(low, high, np.float64(weight))


def _lerp(low: Any, high: Any, weight: np.float64) -> Any:
    """numpy's linear interpolation: from the nearer end, so that a weight of 1 gives `high` exactly."""
    step = high - low
    return high - step * (1 - weight) if weight >= 0.5 else low + step * weight


def _ordered(partials: pd.DataFrame, kwargs: dict[str, Any], decreasing: bool) -> tuple[int, int]:
    """Combine per-partition order checks in partition order: (violations, non-null values judged)."""
    bad, previous = int(partials["bad"].sum()), None
    for first, last in zip(partials["first"], partials["last"], strict=True):
        if first is None:
            continue
        if previous is not None:
            bad += int(_out_of_order(previous, first, decreasing, bool(kwargs.get("strictly"))))
        previous = last
    return bad, int(partials["count"].sum())


def _python(value: Any) -> Any:
    """A numpy number as Python's, to show (and store as JSON); other values as they are."""
    return value.item() if hasattr(value, "item") else value


QUANTILE_RTOL = 1e-4  # GX's, mirrored from expect_column_quantile_values_to_be_between._quantile_is_in_range


def _quantile_in_range(value: Any, low: Any, high: Any) -> bool:
    """As GX judges a quantile: within its relative tolerance (and numpy's absolute one, 1e-8) of a bound
    counts as within the range, so that a 99th percentile of 250.01 passes a bound of 250."""
    near = any(bound is not None and bool(np.isclose(value, bound, rtol=QUANTILE_RTOL)) for bound in (low, high))
    return near or between(value, {"min_value": low, "max_value": high})


def _as_pandas_gives(value: Any, dtype: Any) -> Any:
    """A mean or deviation in the column's own float type, as pandas gives it to GX, which compares it with
    the bounds in that type (NumPy 2): Dask gives float64, in which a float32 column's mean of 0.35 is
    0.3499999940395355, below a bound of 0.35."""
    return dtype.type(value) if isinstance(dtype, np.dtype) and dtype.kind == "f" else value


def _verdict(kind: str, kwargs: dict[str, Any], value: Any, dtype: Any) -> dict[str, Any]:
    """Turn a computed statistic of a column of `dtype` (None: of no one column) into a GX-shaped result:
    success, observed value, row counts if any. Compared as computed, as GX compares pandas' numpy numbers
    (a float32 max of 37.2 passes a bound of 37.2); shown as Python's."""
    mostly = kwargs.get("mostly")
    if kind in ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"):
        judged, missing, unexpected = (int(v) for v in value)
        element = judged + missing
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
        return {"success": between(observed, kwargs), "observed": observed}
    if kind == "expect_column_quantile_values_to_be_between":
        ranges = kwargs["quantile_ranges"]["value_ranges"]
        observed = [_python(v) for v in value]  # as GX: pandas' quantiles as a list of Python numbers
        success = all(_quantile_in_range(v, low, high) for v, (low, high) in zip(observed, ranges, strict=True))
        return {"success": success, "observed": observed}
    if kind in ("expect_column_values_to_be_increasing", "expect_column_values_to_be_decreasing"):
        unexpected, judged = _ordered(value, kwargs, kind.endswith("decreasing"))
        share_ok = 1.0 if judged == 0 else (judged - unexpected) / judged
        rows = int(value["rows"].sum())
        return {
            "success": unexpected == 0 if mostly is None else share_ok >= mostly,
            "element_count": rows,
            "missing_count": rows - judged,
            "unexpected_count": unexpected,
            "observed": f"{unexpected} steps out of order",
        }
    if kind == "expect_column_value_z_scores_to_be_less_than":
        return {}  # needs a second pass: see judge_global
    if kind == "expect_column_mean_to_be_between" and _temporal(dtype):  # computed in us since the epoch
        value = pd.Timestamp(int(value), unit="us") if value == value else None
    elif kind in ("expect_column_mean_to_be_between", "expect_column_stdev_to_be_between"):
        value = _as_pandas_gives(value, dtype)
    return {"success": between(value, kwargs), "observed": _python(value)}


def _z_scores(frame: dd.DataFrame, kwargs: dict[str, Any], moments: tuple[float, float, int, int]) -> dict[str, Any]:
    """As GX counts them: every row an element, nulls missing, `mostly` on the rest; double-sided, the
    threshold's size is what counts (GX takes its absolute value)."""
    mean, std, count, rows = moments
    counts = {"element_count": int(rows), "missing_count": int(rows - count)}
    if not std or np.isnan(std):
        return {"success": True, **counts, "unexpected_count": 0, "observed": "zero variance"}
    double_sided = kwargs.get("double_sided", True)
    threshold = abs(kwargs["threshold"]) if double_sided else kwargs["threshold"]
    z = (frame[kwargs["column"]] - mean) / std
    unexpected = int(((z.abs() if double_sided else z) >= threshold).sum().compute())
    mostly = kwargs.get("mostly")
    share_ok = 1.0 if count == 0 else (count - unexpected) / count
    success = unexpected == 0 if mostly is None else share_ok >= mostly
    return {
        "success": success,
        **counts,
        "unexpected_count": unexpected,
        "observed": f"{unexpected} rows with {'|z|' if double_sided else 'z'} >= {threshold}",
    }


def judge_global(frame: dd.DataFrame, expectations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per expectation (in order), all statistics computed in one pass over `frame`."""
    lazy = [_statistic(frame, e["type"], e.get("kwargs", {})) for e in expectations]
    values = dask.compute(*lazy)
    results = []
    for expectation, value in zip(expectations, values, strict=True):
        kind, kwargs = expectation["type"], expectation.get("kwargs", {})
        dtype = frame[kwargs["column"]].dtype if "column" in kwargs else None
        if kind == "expect_column_value_z_scores_to_be_less_than":
            results.append(_z_scores(frame, kwargs, value))
        elif kind in QUANTILE_KINDS:  # as GX asks pandas: its median; quantiles the nearest by default
            median = kind == "expect_column_median_to_be_between"
            levels = [0.5] if median else kwargs["quantile_ranges"]["quantiles"]
            method = "median" if median else kwargs.get("allow_relative_error") or "nearest"
            observed = exact_quantiles(frame[kwargs["column"]], value, levels, method)
            results.append(_verdict(kind, kwargs, observed[0] if median else observed, dtype))
        else:
            results.append(_verdict(kind, kwargs, value, dtype))
    return results
