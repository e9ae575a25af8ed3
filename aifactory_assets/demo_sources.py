"""Loaders for the demo catalogue: real public data that ships inside PyPI packages already in the venv.

Each loader returns a DataFrame whose columns match `catalog/datasets/<name>.yaml` exactly (names and
order), so the demo can land files for a site without network access. Source packages are imported
inside each loader so that importing this module stays cheap and a missing extra only breaks its own
dataset. Column names are made valid identifiers (`^[A-Za-z_][A-Za-z0-9_]*$`); a 1-based `record_id`
is added where the data has no natural key. Date columns are pandas datetimes; the demo writer turns
them into ISO text (CSV, JSONL) or native values (Parquet).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pandas as pd


def _with_record_id(frame: pd.DataFrame) -> pd.DataFrame:
    """Prepend `record_id`, the 1-based row number in the package's data, as a stable key."""
    frame = frame.reset_index(drop=True)
    frame.insert(0, "record_id", pd.RangeIndex(1, len(frame) + 1).astype("int64"))
    return frame


def _identifier(name: str) -> str:
    """Turn a label such as 'od280/od315_of_diluted_wines' or 'mean radius' into a column name."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", name.strip()).strip("_")


def breast_cancer_wisconsin() -> pd.DataFrame:
    """UCI Breast Cancer Wisconsin (Diagnostic) from scikit-learn; 'mean radius' becomes 'mean_radius'."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame = frame.rename(columns=_identifier)
    return _with_record_id(frame)


def stock_prices() -> pd.DataFrame:
    """Monthly closing prices of five tech stocks from vega-datasets, keyed by (symbol, date)."""
    from vega_datasets import local_data

    frame = local_data.stocks()
    frame["date"] = pd.to_datetime(frame["date"])
    return frame[["symbol", "date", "price"]].reset_index(drop=True)


def wine_cultivars() -> pd.DataFrame:
    """UCI Wine from scikit-learn; the slash in 'od280/od315_of_diluted_wines' becomes '_'."""
    from sklearn.datasets import load_wine

    frame = load_wine(as_frame=True).frame
    frame = frame.rename(columns=_identifier)
    return _with_record_id(frame)


def auto_mpg() -> pd.DataFrame:
    """Auto MPG ('cars') from vega-datasets in lower_snake_case; name + year repeat, hence record_id."""
    from vega_datasets import local_data

    frame = local_data.cars()
    frame.columns = [c.lower() for c in frame.columns]
    frame["year"] = pd.to_datetime(frame["year"])
    return _with_record_id(frame)


def palmer_penguins() -> pd.DataFrame:
    """Palmer Archipelago penguins (the 'simple' table) from palmerpenguins; gaps stay as nulls."""
    from palmerpenguins import load_penguins

    return _with_record_id(load_penguins())


def seattle_weather() -> pd.DataFrame:
    """Daily Seattle weather 2012-2015 (NOAA, via vega-datasets), one row per date."""
    from vega_datasets import local_data

    frame = local_data.seattle_weather()
    frame["date"] = pd.to_datetime(frame["date"])
    return frame.reset_index(drop=True)


def iowa_electricity() -> pd.DataFrame:
    """Annual net generation in Iowa by source (EIA, via vega-datasets); `year` is a date (1 January)."""
    from vega_datasets import local_data

    frame = local_data.iowa_electricity()
    frame["year"] = pd.to_datetime(frame["year"])
    return frame.reset_index(drop=True)


DEMO_SOURCES: dict[str, Callable[[], pd.DataFrame]] = {
    "breast_cancer_wisconsin": breast_cancer_wisconsin,
    "stock_prices": stock_prices,
    "wine_cultivars": wine_cultivars,
    "auto_mpg": auto_mpg,
    "palmer_penguins": palmer_penguins,
    "seattle_weather": seattle_weather,
    "iowa_electricity": iowa_electricity,
}
