"""The catalogue: factory sites and sector datasets, declared in YAML and checked before anything runs.

Every error names the file and the field, so a data engineer can fix a catalogue entry without reading
Python. Adding a dataset is adding `datasets/<name>.yaml` and its suite; no code changes.
"""

from __future__ import annotations

import codecs
import datetime as dt
import difflib
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dagster as dg
import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

log = dg.get_dagster_logger(__name__)
PANDAS_FORMATS = ("ISO8601", "mixed")  # what pandas.to_datetime (ingest's parser) takes besides strptime formats
ColumnType = Literal["string", "int32", "int64", "float32", "float64", "bool", "date", "timestamp"]
IDENTIFIER = r"^[a-z][a-z0-9_]*$"


def dagster_accepts(**spec: Any) -> None:
    """What Dagster checks of an asset (owners, tag values), checked by Dagster itself while the catalogue
    loads: a value it refuses later would stop the whole code location, naming an asset, not the file."""
    try:
        dg.AssetSpec(key="catalogue", **spec)
    except dg.DagsterInvalidDefinitionError as exc:
        raise ValueError(str(exc).replace(" for asset 'AssetKey(['catalogue'])'", "")) from None


# Expectations that hold or fail per row, so per-partition results can be summed (see validation.py).
ROW_EXPECTATIONS = frozenset(
    {
        "expect_column_values_to_not_be_null",
        "expect_column_values_to_be_null",
        "expect_column_values_to_be_between",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_not_be_in_set",
        "expect_column_values_to_match_regex",
        "expect_column_values_to_not_match_regex",
        "expect_column_values_to_match_strftime_format",
        "expect_column_value_lengths_to_be_between",
        "expect_column_value_lengths_to_equal",
        "expect_column_pair_values_a_to_be_greater_than_b",
        "expect_column_pair_values_to_be_equal",
        "expect_column_pair_values_to_be_in_set",
        "expect_multicolumn_sum_to_equal",
        "expect_select_column_values_to_be_unique_within_record",
    }
)
# Expectations about the whole table, judged once on the totals (see validation.py).
TABLE_EXPECTATIONS = frozenset(
    {
        "expect_table_row_count_to_be_between",
        "expect_table_row_count_to_equal",
        "expect_table_columns_to_match_set",
        "expect_table_columns_to_match_ordered_list",
        "expect_column_to_exist",
        "expect_table_column_count_to_equal",
    }
)
# Of those, the ones about the columns: the schema decides them (ingest enforces it), so they are judged as
# the catalogue loads too, where one that could never pass is refused.
COLUMN_EXPECTATIONS = frozenset(
    {
        "expect_table_columns_to_match_set",
        "expect_table_columns_to_match_ordered_list",
        "expect_column_to_exist",
        "expect_table_column_count_to_equal",
    }
)
# Expectations that do not decompose per partition: computed over the whole dataset with Dask reductions
# (see dataset_statistics.py). They judge the dataset; they do not quarantine rows.
GLOBAL_EXPECTATIONS = frozenset(
    {
        "expect_column_values_to_be_unique",
        "expect_compound_columns_to_be_unique",
        "expect_column_unique_value_count_to_be_between",
        "expect_column_proportion_of_unique_values_to_be_between",
        "expect_column_median_to_be_between",
        "expect_column_quantile_values_to_be_between",
        "expect_column_mean_to_be_between",
        "expect_column_stdev_to_be_between",
        "expect_column_min_to_be_between",
        "expect_column_max_to_be_between",
        "expect_column_sum_to_be_between",
        "expect_column_values_to_be_increasing",
        "expect_column_values_to_be_decreasing",
        "expect_column_value_z_scores_to_be_less_than",
    }
)
SUPPORTED_EXPECTATIONS = ROW_EXPECTATIONS | TABLE_EXPECTATIONS | GLOBAL_EXPECTATIONS
# Expectations on text: on another type GX judges the values as pandas prints them, which differs from file to
# file (a timestamp column prints as dates alone when every value in the file is midnight).
TEXT_EXPECTATIONS = frozenset(
    {
        "expect_column_values_to_match_regex",
        "expect_column_values_to_not_match_regex",
        "expect_column_values_to_match_strftime_format",
        "expect_column_value_lengths_to_be_between",
        "expect_column_value_lengths_to_equal",
    }
)
NUMBER_TYPES = frozenset({"int32", "int64", "float32", "float64"})
# The columns each statistic is computed for (dataset_statistics.py), as "needs <what> column": numbers, and
# for a mean also booleans (the share of true) and dates (an instant). Text has no mean: GX fails on it in
# every run. Min and max take any column (text compares as text).
STATISTIC_COLUMNS: dict[str, tuple[str, frozenset[str]]] = {
    **dict.fromkeys(
        (
            "expect_column_median_to_be_between",
            "expect_column_quantile_values_to_be_between",
            "expect_column_stdev_to_be_between",
            "expect_column_sum_to_be_between",
            "expect_column_value_z_scores_to_be_less_than",
        ),
        ("a number", NUMBER_TYPES),
    ),
    "expect_column_mean_to_be_between": (
        "a number, bool, date or timestamp",
        NUMBER_TYPES | {"bool", "date", "timestamp"},
    ),
}
STATISTICS_OF_VALUES = frozenset(
    f"expect_column_{s}_to_be_between" for s in ("median", "mean", "stdev", "min", "max", "sum")
)
SEVERITIES = ("critical", "warning", "info")  # GX 1.x's FailureSeverity; info is judged as warning
# The keys of an expectation as GX 1.x exports it (its ExpectationConfiguration schema; a test holds this to
# GX's): another, a typo such as `metadata`, would leave the expectation critical without a word.
EXPECTATION_KEYS = frozenset(
    {"type", "kwargs", "meta", "severity", "notes", "description", "id", "rendered_content", "expectation_context"}
)
# `meta` is GX's free-form metadata (owner, ticket): any key, but one this close to `severity` (`severty`,
# `Severity`) is its typo, which would leave the expectation critical without a word. `security` is not.
SEVERITY_TYPO_CUTOFF = 0.8
# How GX compares a column's values (pandas_for_gx): numbers of any width with each other, dates with timestamps
# (both datetime64). Values of two kinds never compare equal, and ordering them fails every part.
COMPARED_AS = {**dict.fromkeys(NUMBER_TYPES, "number"), "date": "instant", "timestamp": "instant"}
COMPARED_AS |= {"string": "text", "bool": "bool"}
# Row expectations that compare columns with each other, row by row.
COMPARING_COLUMNS = frozenset(
    {
        "expect_column_pair_values_a_to_be_greater_than_b",
        "expect_column_pair_values_to_be_equal",
        "expect_select_column_values_to_be_unique_within_record",
    }
)
BOUNDS = frozenset({"min_value", "max_value", "strict_min", "strict_max"})
# Bounded quantities that take whole numbers only: a count always, a column's values (and their min, max and
# sum) where the column holds integers. Strict bounds one apart admit none of them.
COUNT_BOUNDS = frozenset(
    {
        "expect_column_value_lengths_to_be_between",
        "expect_table_row_count_to_be_between",
        "expect_column_unique_value_count_to_be_between",
    }
)
VALUE_BOUNDS = frozenset(
    {"expect_column_values_to_be_between"} | {f"expect_column_{s}_to_be_between" for s in ("min", "max", "sum")}
)
# The arguments (required, optional) our own judgement of table and dataset expectations honours: GX never
# sees these, so a misspelled or unsupported one would otherwise be ignored without a word.
OWN_ARGUMENTS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "expect_column_values_to_be_unique": (frozenset({"column"}), frozenset({"mostly"})),
    "expect_compound_columns_to_be_unique": (frozenset({"column_list"}), frozenset({"ignore_row_if", "mostly"})),
    "expect_column_quantile_values_to_be_between": (
        frozenset({"column", "quantile_ranges"}),
        frozenset({"allow_relative_error"}),
    ),
    "expect_column_values_to_be_increasing": (frozenset({"column"}), frozenset({"strictly", "mostly"})),
    "expect_column_values_to_be_decreasing": (frozenset({"column"}), frozenset({"strictly", "mostly"})),
    "expect_column_value_z_scores_to_be_less_than": (
        frozenset({"column", "threshold"}),
        frozenset({"double_sided", "mostly"}),
    ),
    **{
        f"expect_column_{statistic}_to_be_between": (frozenset({"column"}), BOUNDS)
        for statistic in ("unique_value_count", "proportion_of_unique_values", "median", "mean", "stdev")
        + ("min", "max", "sum")
    },
    "expect_table_row_count_to_be_between": (frozenset(), BOUNDS),
    "expect_table_row_count_to_equal": (frozenset({"value"}), frozenset()),
    "expect_table_columns_to_match_set": (frozenset({"column_set"}), frozenset({"exact_match"})),
    "expect_table_columns_to_match_ordered_list": (frozenset({"column_list"}), frozenset()),
    "expect_column_to_exist": (frozenset({"column"}), frozenset({"column_index"})),
    "expect_table_column_count_to_equal": (frozenset({"value"}), frozenset()),
}
# The arguments GX 1.x's row expectations take (row conditions aside: refused, see check_arguments). GX
# checks them only when it runs, on every worker after the raw stage, naming neither the suite nor the
# expectation; checked here as the catalogue loads instead (a test holds this table to GX's own models).
PAIR = frozenset({"column_A", "column_B"})
ROW_ARGUMENTS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "expect_column_values_to_not_be_null": (frozenset({"column"}), frozenset({"mostly"})),
    "expect_column_values_to_be_null": (frozenset({"column"}), frozenset({"mostly"})),
    "expect_column_values_to_be_between": (frozenset({"column"}), BOUNDS | {"mostly"}),
    "expect_column_value_lengths_to_be_between": (frozenset({"column"}), BOUNDS | {"mostly"}),
    "expect_column_value_lengths_to_equal": (frozenset({"column", "value"}), frozenset({"mostly"})),
    "expect_column_values_to_be_in_set": (frozenset({"column", "value_set"}), frozenset({"mostly"})),
    "expect_column_values_to_not_be_in_set": (frozenset({"column", "value_set"}), frozenset({"mostly"})),
    "expect_column_values_to_match_regex": (frozenset({"column"}), frozenset({"regex", "mostly"})),
    "expect_column_values_to_not_match_regex": (frozenset({"column", "regex"}), frozenset({"mostly"})),
    "expect_column_values_to_match_strftime_format": (frozenset({"column", "strftime_format"}), frozenset({"mostly"})),
    "expect_column_pair_values_a_to_be_greater_than_b": (PAIR, frozenset({"ignore_row_if", "mostly", "or_equal"})),
    "expect_column_pair_values_to_be_equal": (PAIR, frozenset({"ignore_row_if", "mostly"})),
    "expect_column_pair_values_to_be_in_set": (PAIR | {"value_pairs_set"}, frozenset({"ignore_row_if", "mostly"})),
    "expect_multicolumn_sum_to_equal": (
        frozenset({"column_list", "sum_total"}),
        frozenset({"ignore_row_if", "mostly"}),
    ),
    "expect_select_column_values_to_be_unique_within_record": (
        frozenset({"column_list"}),
        frozenset({"ignore_row_if", "mostly"}),
    ),
}
ARGUMENTS = OWN_ARGUMENTS | ROW_ARGUMENTS
# The values of `ignore_row_if` GX permits: by the two values of a pair, or by all or any of a list's. We
# judge compound keys ourselves, and GX's model of uniqueness within a record takes any text (its engine
# then fails every part): so all are checked from this table as the catalogue loads (held to GX by a test).
IGNORE_ROW_IF = {
    kind: ("both_values_are_missing", "either_value_is_missing", "neither")
    if required >= PAIR
    else ("all_values_are_missing", "any_value_is_missing", "never")
    for kind, (required, optional) in ARGUMENTS.items()
    if "ignore_row_if" in optional
}
# Taken by every expectation GX judges, beside its own (result_format aside: aifactory sets it).
GX_SHARED_ARGUMENTS = frozenset({"catch_exceptions"})


class CatalogError(ValueError):
    """A catalogue entry is wrong; the message names the file and the field."""

    def __init__(self, file: Path | str, field: str, message: str):
        self.file, self.field = str(file), field
        super().__init__(f"{file}: {field}: {message}")


class CatalogErrors(CatalogError):
    """Every wrong dataset file at once (each file's first error), so that fixing a catalogue is not a
    reload per error; `file` and `field` are the first's."""

    def __init__(self, errors: list[CatalogError]):
        self.errors, self.file, self.field = errors, errors[0].file, errors[0].field
        ValueError.__init__(self, "\n".join([f"{len(errors)} catalogue files are wrong:", *map(str, errors)]))


class _Model(BaseModel):
    """Strict: pydantic would otherwise read `true` as 1, 1 as true and "yes" as true, so a value written
    as one type would mean another without a word (an int still passes as a float)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


class Storage(_Model):
    """Facts about a site's object store; where it actually is comes from the environment."""

    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    description: str = ""


class Site(_Model):
    id: str = Field(pattern=IDENTIFIER, max_length=63)  # a Dagster tag value
    name: str
    city: str
    country: str = Field(pattern=r"^[A-Z]{2}$")
    host: str
    system: str
    timezone: str
    sectors: dict[str, str] = Field(min_length=1, description="sector id -> label")
    storage: Storage

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        """A place's zone: `localtime` and `posixrules` are whatever the host's files say, and `right/*`
        counts leap seconds, which no schedule or timestamp here does."""
        if value in ("localtime", "posixrules") or value.startswith("right/"):
            raise ValueError(f"{value!r} is not a place's time zone (host-dependent or leap-second clock)")
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: a folder of zones, e.g. 'Europe'
            raise ValueError(f"unknown IANA time zone {value!r}") from exc
        return value

    @field_validator("sectors")
    @classmethod
    def _sector_ids(cls, value: dict[str, str]) -> dict[str, str]:
        for sector in value:
            if not re.match(IDENTIFIER, sector) or len(sector) > 63:
                raise ValueError(f"sector id {sector!r} must be lower_snake_case, at most 63 characters (a tag)")
        return value


class Column(_Model):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    type: ColumnType
    nullable: bool = True
    pii: bool = False
    format: str | None = Field(default=None, description="strptime format for date/timestamp columns")
    description: str = ""

    @model_validator(mode="after")
    def _format_for_dates(self) -> Column:
        if self.format is not None and self.type not in ("date", "timestamp"):
            raise ValueError(f"format is for date and timestamp columns; {self.name!r} is {self.type}")
        return self

    @field_validator("format")
    @classmethod
    def _format_parses(cls, value: str | None) -> str | None:
        """A format the readers refuse would otherwise refuse every landed file, as if the data were bad."""
        if value is None or value in PANDAS_FORMATS:
            return value
        if "%" not in value:
            raise ValueError(f"{value!r} has no strptime directive (%Y, %m, %d, ...)")
        import pandas as pd  # what ingest parses with (schema.py); loaded lazily, as the code location need not

        try:
            pd.to_datetime(pd.Series([], dtype="str"), format=value)
        except ValueError as exc:
            raise ValueError(f"not a strptime format: {exc}") from None
        return value


class TableSchema(_Model):
    key: list[str] = Field(min_length=1)
    columns: list[Column] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _keys_never_null(cls, data: Any) -> Any:
        """A record without its key can be neither deduplicated nor split (and a null would turn an integer
        key into floats, which hash differently): key columns are not nullable, rows without a key go to
        quarantine, and declaring a key column nullable is an error."""
        if not isinstance(data, dict) or not isinstance(data.get("columns"), list):
            return data  # wrong types: pydantic names them
        key = data.get("key")
        keys = {k for k in key if isinstance(k, str)} if isinstance(key, list) else set()  # the rest: errors below
        columns = []
        for column in data["columns"]:
            if isinstance(column, dict) and isinstance(column.get("name"), str) and column["name"] in keys:
                if column.get("nullable") is True:
                    raise ValueError(f"key column {column['name']!r} cannot be nullable: a record needs its key")
                column = {"nullable": False, **column}  # one that is not a boolean is left for pydantic to refuse
            elif isinstance(column, Column) and column.name in keys:
                column = column.model_copy(update={"nullable": False})
            columns.append(column)
        return {**data, "columns": columns}

    @model_validator(mode="after")
    def _consistent(self) -> TableSchema:
        names = [c.name for c in self.columns]
        for name in names:
            if name.startswith("_"):
                raise ValueError(f"column {name!r}: names starting with '_' are reserved for provenance")
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"duplicate column(s) {duplicated}")
        missing = [k for k in self.key if k not in names]
        if missing:
            raise ValueError(f"key column(s) {missing} are not in schema.columns")
        return self

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]


def _ascii_compatible(encoding: str) -> bool:
    """ASCII's characters and bytes are each other's in `encoding` (a UTF-8 byte-order mark aside): b"\\n" is a
    line break, b"," a comma, both ways (idna decodes ASCII as it is, but cannot encode a line break)."""
    ascii_bytes = bytes(range(128))
    try:
        text = ascii_bytes.decode(encoding)
        return (
            text == ascii_bytes.decode("ascii") and text.encode(encoding).removeprefix(codecs.BOM_UTF8) == ascii_bytes
        )
    except (UnicodeError, LookupError):
        return False


class ReaderOptions(_Model):
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    encoding: str = "utf-8"
    null_values: list[str] = Field(default_factory=lambda: [""])

    @field_validator("delimiter")
    @classmethod
    def _one_byte(cls, value: str) -> str:
        """pyarrow splits on one byte: `¦` failed every run with a bare ValueError; a quote or a line break
        cannot separate fields."""
        if not value.isascii() or value in '"\r\n':
            raise ValueError(f"{value!r}: a delimiter is one ASCII character, not a quote or a line break")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        """Python's own name for the codec, so that `UTF8` and `utf_8` give one version id. The CSV reader
        finds lines, quotes and delimiters by their ASCII bytes (b"\\n"): a codec that writes ASCII otherwise
        (UTF-16 and -32, EBCDIC's cp037, UTF-7, idna, punycode) is refused."""
        try:
            codec = codecs.lookup(value)
        except LookupError:
            codec = None
        if codec is None or not getattr(codec, "_is_text_encoding", True):  # False for base64, zlib, rot13...
            raise ValueError(f"unknown text encoding {value!r} (a Python codec name, e.g. 'cp1252')")
        if not _ascii_compatible(codec.name):
            raise ValueError(
                f"{value!r} files are not read; convert them to UTF-8 (e.g. iconv -f {value} -t utf-8): the CSV "
                "reader finds line breaks, quotes and delimiters by their ASCII bytes, which it writes otherwise"
            )
        return codec.name


class Source(_Model):
    format: Literal["csv", "parquet", "jsonl"]
    landing: str = Field(description="glob under landing/<dataset>/, e.g. '*.csv'")
    options: ReaderOptions = ReaderOptions()
    extra_columns: Literal["refuse", "ignore"] = Field(
        default="refuse", description="a landed file with undeclared columns: refuse (quarantine) it, or drop them"
    )

    @field_validator("landing")
    @classmethod
    def _within_the_landing_zone(cls, value: str) -> str:
        """Matched against object keys, which are names, not paths: `landing/x/./a.csv` is not `a.csv`."""
        segments = value.split("/")
        if not value.strip() or value.startswith("/") or ".." in segments:
            raise ValueError(f"landing {value!r} must be a glob within landing/<dataset>/, e.g. '*.csv'")
        if "" in segments or "." in segments:
            raise ValueError(
                f"landing {value!r}: a '.' or empty segment (./, //, a trailing /) never matches an object key; "
                "write e.g. 'in/*.csv'"
            )
        if "\\" in value:
            raise ValueError(
                f"landing {value!r}: a backslash is no escape in a landing glob, it matches only keys with a "
                "backslash in their name; write [*] for a literal * and / between folders"
            )
        return value


class ShardSettings(_Model):
    target_bytes: int = Field(default=128 * 2**20, gt=0)
    target_rows: int | None = Field(default=None, gt=0)
    splits: dict[Literal["train", "val", "test"], float] = Field(
        default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1}
    )
    seed: int = Field(default=0, ge=0)
    retention: int = Field(default=3, ge=1)
    remainder: Literal["drop", "pad"] = Field(
        default="drop", description="when rows do not divide by ranks: drop the tail, or pad by wrapping around"
    )

    @model_validator(mode="after")
    def _one_target(self) -> ShardSettings:
        if self.target_rows is not None and "target_bytes" in self.model_fields_set:
            raise ValueError("set target_bytes or target_rows, not both")
        return self

    @field_validator("splits")
    @classmethod
    def _ratios(cls, value: dict[str, float]) -> dict[str, float]:
        # NaN passes every comparison unseen: a split silently empty, and NaN in the manifest
        finite = all(math.isfinite(r) and r > 0 for r in value.values())
        if not value or not finite or abs(sum(value.values()) - 1) > 1e-9:
            raise ValueError(f"split ratios must be positive, finite and sum to 1, got {value}")
        return value


class Origin(_Model):
    """Where the demo copy of a dataset comes from (a PyPI package), for the README and the demo loader."""

    package: str
    licence: str
    url: str = ""


class Dataset(_Model):
    name: str = Field(pattern=IDENTIFIER)
    sector: str
    site: str
    description: str
    owner: str
    source: Source
    table: TableSchema = Field(alias="schema")
    suite: str = Field(description="path of the GX 1.x suite JSON, relative to the catalogue root")
    shards: ShardSettings = ShardSettings()
    residency: list[str] = Field(default_factory=list, description="sites where copies may live")
    max_quarantined_fraction: float = Field(default=0.1, ge=0, le=1)
    origin: Origin | None = None

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str) -> str:
        if not (re.match(r"^team:\S+$", value) or re.match(r"^[^@\s]+@[^@\s]+\.[^@\s]+$", value)):
            raise ValueError("owner must be an email address or 'team:<name>'")
        dagster_accepts(owners=[value])
        return value

    @field_validator("name", "sector")
    @classmethod
    def _tag_value(cls, value: str, info: ValidationInfo) -> str:
        dagster_accepts(tags={"dataset" if info.field_name == "name" else "sector": value})  # the asset's tags
        return value


class Catalog(_Model):
    root: Path
    sites: dict[str, Site]
    datasets: dict[str, Dataset]
    suites: dict[str, dict[str, Any]] = Field(description="dataset name -> parsed GX suite JSON")

    def datasets_of(self, site: str) -> list[Dataset]:
        return [d for d in self.datasets.values() if d.site == site]


def default_catalog_root() -> Path:
    return Path(os.environ.get("AIFACTORY_CATALOG", Path(__file__).resolve().parent.parent / "catalog"))


_BOOL, _INT, _FLOAT = (f"tag:yaml.org,2002:{tag}" for tag in ("bool", "int", "float"))


class _CatalogLoader(yaml.SafeLoader):
    """YAML 1.2's core schema for booleans and numbers. PyYAML reads YAML 1.1, where `on`, `yes` and `no`
    are booleans, `010` is 8 and `1:30` is 90: here they are text, which a boolean or number field refuses.
    Decimals with a leading zero are text too (8 in YAML 1.1, 10 in 1.2); `0o10` is octal."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_CatalogLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
YAML_1_2_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0o[0-7]+|0x[0-9a-fA-F]+)$")
_CatalogLoader.add_implicit_resolver(_INT, YAML_1_2_INT, list("-+0123456789"))
_CatalogLoader.add_implicit_resolver(  # a dot or an exponent, so that `010` is not read as 10.0 either
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+(?=[eE]))(?:[eE][-+]?[0-9]+)?"  # 1.5, .5, 1e3
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+.0123456789"),
)


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """An int as YAML 1.2 writes it; a `!!int` tag on anything else (`!!int 010`) is an error at its line."""
    text = loader.construct_scalar(node)
    if not YAML_1_2_INT.match(text):  # Python's int() also takes 1_000, 0b101, 0X1F and other scripts' digits
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a YAML 1.2 integer", node.start_mark)
    return int(text, 0)


_CatalogLoader.add_constructor(_INT, _construct_int)


def _refuse_repeated_keys(node: yaml.Node | None, file: Path, where: str = "", seen: set[int] | None = None) -> None:
    """YAML keeps the last of a key given twice without a word: a second `residency:` or `pii:` would win."""
    seen = set() if seen is None else seen
    if node is None or id(node) in seen:  # an alias: its node was checked where it was anchored
        return
    seen.add(id(node))
    children = list(enumerate(node.value)) if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Mark] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else "<key>"
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, name) in first:
                    a, b = first[(key.tag, name)], key.start_mark
                    raise CatalogError(
                        file,
                        f"{where}{name}",
                        f"given twice (line {a.line + 1}, column {a.column + 1} and line {b.line + 1}, column "
                        f"{b.column + 1}); YAML would keep the last without a word",
                    )
                first[(key.tag, name)] = key.start_mark
            children.append((name, value))
    for name, child in children:
        _refuse_repeated_keys(child, file, f"{where}{name}.", seen)


def _read_text(path: Path) -> str:
    """A catalogue or suite file's text; any reason it cannot be read (a folder named `x.yaml`, no
    permission) names the file, so that every wrong file is still listed at once."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CatalogError(path, "<file>", "does not exist") from None
    except OSError as exc:
        raise CatalogError(path, "<file>", f"cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CatalogError(path, "<file>", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def _read_yaml(path: Path) -> Any:
    text = _read_text(path)
    try:
        loader = _CatalogLoader(text)  # a character YAML does not allow is refused here already
        try:
            node = loader.get_single_node()
            _refuse_repeated_keys(node, path)
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise CatalogError(path, "<file>", f"not valid YAML: {exc}") from exc


def _parse(model: type[BaseModel], data: Any, path: Path, prefix: str = "") -> Any:
    """The entry as `model`, or the first of its errors: a misspelled field before the field it leaves
    missing, with the name it probably meant."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
        field = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "") or "<root>"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"].endswith("_type") and isinstance(err["input"], str | int | float | None):  # `on`: text
            message += f", got {err['input']!r}"
        if err["type"] == "extra_forbidden":
            known = _fields_at(model, [p for p in err["loc"][:-1] if isinstance(p, str)])
            message += _did_you_mean(str(err["loc"][-1]), known)
        raise CatalogError(path, field, message) from None


def _fields_at(model: type[BaseModel], names: list[str]) -> list[str]:
    """The fields (by their names in YAML) of the model nested in `model` under the fields `names`."""
    for name in names:
        field = next((f for n, f in model.model_fields.items() if name in (n, f.alias)), None)
        nested = _model_in(field.annotation) if field is not None else None
        if nested is None:
            return []
        model = nested
    return [f.alias or n for n, f in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds: itself, or in a list, a mapping's values or an optional."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in typing.get_args(annotation) if (m := _model_in(a)) is not None), None)


def load_sites(path: Path) -> dict[str, Site]:
    data = _read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("sites"), list):
        raise CatalogError(path, "sites", "expected a list of sites under 'sites:'")
    sites: dict[str, Site] = {}
    for i, entry in enumerate(data["sites"]):
        site = _parse(Site, entry, path, f"sites.{i}")
        if site.id in sites:
            raise CatalogError(path, f"sites.{i}.id", f"duplicate site id {site.id!r}")
        sites[site.id] = site
    return sites


class RepeatedKey(ValueError):
    """A key a JSON object gives twice."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs, refused where a key comes twice (`"mostly"` in one expectation, say)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise RepeatedKey(key)
        seen.add(key)
    return dict(pairs)


def load_suite(path: Path, dataset: Dataset, dataset_file: Path) -> dict[str, Any]:
    """Parse a GX 1.x suite JSON and check it against the dataset's schema (GX imported only to check row
    expectations: see check_with_gx)."""
    if not path.exists():
        raise CatalogError(dataset_file, "suite", f"suite file {path} does not exist")
    try:
        suite = json.loads(_read_text(path), object_pairs_hook=_unique_keys)
    except RepeatedKey as exc:
        raise CatalogError(path, exc.key, "given twice in one object; JSON keeps the last without a word") from None
    except json.JSONDecodeError as exc:
        raise CatalogError(path, "<file>", f"suite is not valid JSON: {exc}") from None
    if not isinstance(suite, dict) or not isinstance(suite.get("expectations"), list):
        raise CatalogError(path, "expectations", "a GX suite needs a list under 'expectations'")
    name = suite.setdefault("name", dataset.name)
    if not isinstance(name, str) or not re.match(IDENTIFIER, name):  # shown on the data docs page, as HTML
        raise CatalogError(path, "name", f"must be lower_snake_case, got {name!r}")
    columns, types = set(dataset.table.names), {c.name: c.type for c in dataset.table.columns}
    for i, exp in enumerate(suite["expectations"]):
        where = f"expectations.{i}"
        if not isinstance(exp, dict) or not isinstance(exp.get("type"), str):
            gx0 = isinstance(exp, dict) and "expectation_type" in exp
            renamed = " (GX 0.x's 'expectation_type' is 'type' in GX 1.x)" if gx0 else ""
            raise CatalogError(path, f"{where}.type", f"each expectation needs a 'type'{renamed}")
        if exp["type"] not in SUPPORTED_EXPECTATIONS:
            hint = _did_you_mean(str(exp["type"]), SUPPORTED_EXPECTATIONS)
            raise CatalogError(
                path, f"{where}.type", f"{exp['type']!r} is not a supported expectation for distributed runs{hint}"
            )
        check_keys_and_severity(path, where, exp)
        kwargs = exp.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise CatalogError(path, f"{where}.kwargs", "must be a mapping")
        check_arguments(path, where, exp["type"], kwargs)
        referenced = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
        referenced += kwargs.get("column_list", [])
        unknown = [c for c in referenced if c not in columns]
        if unknown:
            raise CatalogError(path, f"{where}.kwargs", f"column(s) {unknown} are not in the dataset's schema")
        check_types(path, where, exp["type"], kwargs, types)
        check_can_pass_and_fail(path, where, exp["type"], kwargs, types)
        if exp["type"] in ROW_EXPECTATIONS:
            check_compared_types(path, where, exp["type"], kwargs, types)
            exp["kwargs"] = kwargs = values_for_gx(path, where, exp["type"], kwargs, types)
            check_with_gx(path, where, exp, kwargs)
    return suite


def _did_you_mean(word: str, known: typing.Iterable[str]) -> str:
    meant = difflib.get_close_matches(word, sorted(known), n=1)
    return f"; did you mean {meant[0]!r}?" if meant else ""


def check_keys_and_severity(path: Path, where: str, exp: dict[str, Any]) -> None:
    """Only the keys GX 1.x writes, no misspelt `meta.severity`, and one severity: GX 1.x's own `severity`,
    or `meta.severity` (which aifactory read first). A top-level `critical` may be GX's default, written
    on export: `meta.severity` then decides; any other two differing would leave it unclear which was meant."""
    meta = exp.get("meta") or {}
    if not isinstance(meta, dict):
        raise CatalogError(path, f"{where}.meta", "must be a mapping")
    if unknown := sorted(exp.keys() - EXPECTATION_KEYS):
        hint = _did_you_mean(unknown[0], EXPECTATION_KEYS)
        raise CatalogError(
            path,
            f"{where}.{unknown[0]}",
            f"read by neither GX 1.x nor aifactory, which take {sorted(EXPECTATION_KEYS)}{hint}",
        )
    if typos := [k for k in meta if k != "severity" and _severity_typo(k)]:
        raise CatalogError(
            path, f"{where}.meta.{typos[0]}", "did you mean 'severity'? Only that spelling is read (else critical)"
        )
    for field, holder in ((where, exp), (f"{where}.meta", meta)):
        if "severity" in holder and holder["severity"] not in SEVERITIES:
            raise CatalogError(path, f"{field}.severity", f"must be one of {SEVERITIES}, got {holder['severity']!r}")
    top, inner = exp.get("severity"), meta.get("severity")
    if top not in (None, "critical") and inner is not None and top != inner:
        raise CatalogError(
            path,
            f"{where}.severity",
            f"{exp['severity']!r}, but meta.severity is {meta['severity']!r}: give one (GX writes severity "
            "itself, 'critical' unless set, which meta.severity overrides)",
        )


def _severity_typo(key: str) -> bool:
    """A `meta` key that reads as `severity` misspelt or in another case, which would go unread."""
    return bool(difflib.get_close_matches(key.lower(), ["severity"], n=1, cutoff=SEVERITY_TYPO_CUTOFF))


def severity(expectation: dict[str, Any]) -> str:
    """`meta.severity`, else GX 1.x's `severity`, else critical (load_suite refuses the two differing, but
    for a top-level `critical`: GX's default). GX's `info` is judged as `warning`: non-blocking, and shown
    in the warning check, as there is no check of its own."""
    chosen = (expectation.get("meta") or {}).get("severity") or expectation.get("severity") or "critical"
    return "warning" if chosen == "info" else chosen


def judged_suite(suite: dict[str, Any]) -> dict[str, Any]:
    """What of a suite judges rows: its name, and its expectations' types, arguments and severities. Notes
    and other `meta` shape no verdict: editing them must not judge every part again or make a new version."""
    return {
        "name": suite.get("name"),
        "expectations": [
            {
                "type": e["type"],
                "kwargs": e.get("kwargs") or {},
                "severity": severity(e),
            }
            for e in suite["expectations"]
        ],
    }


def check_arguments(path: Path, where: str, kind: str, kwargs: dict[str, Any]) -> None:
    """What can be checked without importing GX: argument names, column names as text, `mostly` as a share,
    regexes that compile, and no row conditions."""
    field = f"{where}.kwargs"
    conditions = [k for k in ("row_condition", "condition_parser") if k in kwargs]
    if conditions:
        raise CatalogError(path, f"{field}.{conditions[0]}", "row conditions are not supported in distributed runs")
    if "result_format" in kwargs:
        raise CatalogError(
            path, f"{field}.result_format", "set by aifactory (COMPLETE: the quarantine needs every failing row)"
        )
    required, optional = ARGUMENTS[kind]
    optional |= GX_SHARED_ARGUMENTS if kind in ROW_ARGUMENTS else frozenset()
    takes = sorted(required | optional)
    if extra := sorted(kwargs.keys() - required - optional):
        hint = _did_you_mean(extra[0], takes)
        raise CatalogError(path, f"{field}.{extra[0]}", f"not an argument of {kind}; it takes {takes}{hint}")
    if missing := sorted(required - kwargs.keys()):
        raise CatalogError(path, f"{field}.{missing[0]}", f"missing; {kind} takes {takes}")
    for name in ("column", "column_A", "column_B"):
        if name in kwargs and not isinstance(kwargs[name], str):
            raise CatalogError(path, f"{field}.{name}", "must be a column name")
    for name in ("column_list", "column_set"):
        if name in kwargs and not (isinstance(kwargs[name], list) and all(isinstance(c, str) for c in kwargs[name])):
            raise CatalogError(path, f"{field}.{name}", "must be a list of column names")
    if parameters := [name for name, value in kwargs.items() if isinstance(value, dict) and "$PARAMETER" in value]:
        raise CatalogError(
            path, f"{field}.{parameters[0]}", "suite parameters ($PARAMETER) are not supported: write the value"
        )
    ignore = kwargs.get("ignore_row_if")
    if kind in IGNORE_ROW_IF and ignore is not None and ignore not in IGNORE_ROW_IF[kind]:
        hint = _did_you_mean(str(ignore), IGNORE_ROW_IF[kind])
        raise CatalogError(
            path, f"{field}.ignore_row_if", f"must be one of {', '.join(IGNORE_ROW_IF[kind])}, got {ignore!r}{hint}"
        )
    if "value_set" in kwargs and not isinstance(kwargs["value_set"], list):
        raise CatalogError(path, f"{field}.value_set", "must be a list of values")
    mostly = kwargs.get("mostly")
    if mostly is not None and (isinstance(mostly, bool) or not isinstance(mostly, int | float) or not 0 <= mostly <= 1):
        raise CatalogError(path, f"{field}.mostly", f"must be a share between 0 and 1, got {mostly!r}")
    patterns = [("regex", kwargs["regex"])] if "regex" in kwargs else []
    patterns += [("regex_list", regex) for regex in kwargs.get("regex_list") or []]
    for name, regex in patterns:
        try:
            re.compile(regex)
        except (re.error, TypeError) as exc:
            raise CatalogError(path, f"{field}.{name}", f"{regex!r} is not a regular expression: {exc}") from None


def check_with_gx(path: Path, where: str, exp: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """A row expectation (with `kwargs` as GX will get them) against GX's own model of it (a bound's type, a
    set that is a list, pairs of two, its id and notes), built as the workers build it: what it refuses would
    fail every validated run. GX is imported here, not at the top: it adds about 2 s to the code location's
    load, paid only by catalogues with row expectations."""
    from great_expectations.compatibility.pydantic import ValidationError
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    kind = exp["type"]
    try:
        ExpectationConfiguration(**{**exp, "kwargs": kwargs}).to_domain_obj()
    except ValidationError as exc:
        errors = exc.errors()
        name = errors[0]["loc"][0]
        reasons = "; ".join(dict.fromkeys(e["msg"] for e in errors if e["loc"][0] == name))
        if name in kwargs or name == "__root__":
            given = repr(kwargs[name]) if name in kwargs else "these arguments"
            field = f"{where}.kwargs" if name == "__root__" else f"{where}.kwargs.{name}"
        else:  # a key of the expectation itself (rendered_content)
            given, field = repr(exp.get(name)), f"{where}.{name}"
        raise CatalogError(path, field, f"GX's {kind} refuses {given}: {reasons}") from None


def _is_number(value: Any) -> bool:
    """A number, not a boolean, nor NaN (which no value compares with)."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    return whole or (isinstance(value, float) and not math.isnan(value))


QUANTILE_METHODS = ("linear", "lower", "higher", "midpoint", "nearest")  # pandas' interpolations, as GX takes them


def check_types(path: Path, where: str, kind: str, kwargs: dict[str, Any], types: dict[str, str]) -> None:
    """The column's type against what the expectation judges, and the types of the arguments we judge
    ourselves (GX converts "100" to 100 where our comparison would fail the step)."""
    field, column = f"{where}.kwargs", kwargs.get("column")
    column_type = types.get(column) if isinstance(column, str) else None
    if kind in TEXT_EXPECTATIONS and column_type != "string":
        raise CatalogError(path, f"{field}.column", f"{kind} judges text; column {column!r} is {column_type}")
    if kind in STATISTIC_COLUMNS and column_type not in STATISTIC_COLUMNS[kind][1]:
        needs = STATISTIC_COLUMNS[kind][0]
        raise CatalogError(path, f"{field}.column", f"{kind} needs {needs} column; {column!r} is {column_type}")
    of_values = kind in STATISTICS_OF_VALUES  # a bound of the column's own kind; otherwise a count or share
    # Instants as ISO text, for the row `between` too: GX's model takes a number there, which fails every part.
    instants = column_type in ("date", "timestamp") and (of_values or kind == "expect_column_values_to_be_between")
    for name in ("min_value", "max_value"):
        value = kwargs.get(name)
        if value is None:
            continue
        if isinstance(value, float) and math.isnan(value):
            raise CatalogError(path, f"{field}.{name}", "NaN: no value compares with it, so it could never pass")
        if instants:
            if not (isinstance(value, str) and _is_iso_datetime(value)):
                raise CatalogError(path, f"{field}.{name}", f"must be an ISO 8601 date or timestamp, got {value!r}")
        elif kind not in OWN_ARGUMENTS:  # a row expectation's other bounds: against GX's model (check_with_gx)
            continue
        elif of_values and column_type == "string":  # min and max of text: compared as text
            if not isinstance(value, str):
                raise CatalogError(path, f"{field}.{name}", f"must be text, got {value!r}")
        elif not _is_number(value):
            raise CatalogError(path, f"{field}.{name}", f"must be a number, got {value!r}")
    if kind not in OWN_ARGUMENTS:
        return
    for name in ("strict_min", "strict_max", "exact_match", "strictly", "double_sided"):
        if name in kwargs and not isinstance(kwargs[name], bool):
            raise CatalogError(path, f"{field}.{name}", f"must be true or false, got {kwargs[name]!r}")
    if "value" in kwargs and not (isinstance(kwargs["value"], int) and not isinstance(kwargs["value"], bool)):
        raise CatalogError(path, f"{field}.value", f"must be a whole number, got {kwargs['value']!r}")
    method = kwargs.get("allow_relative_error")
    if method not in (None, False, *QUANTILE_METHODS):  # GX fails on another; a share (SQL's meaning) too
        raise CatalogError(
            path, f"{field}.allow_relative_error", f"must be one of {', '.join(QUANTILE_METHODS)}, got {method!r}"
        )
    if "threshold" in kwargs and not _is_number(kwargs["threshold"]):
        raise CatalogError(path, f"{field}.threshold", f"must be a number, got {kwargs['threshold']!r}")
    if "quantile_ranges" in kwargs:
        ranges = kwargs["quantile_ranges"]
        quantiles = ranges.get("quantiles") if isinstance(ranges, dict) else None
        bounds = ranges.get("value_ranges") if isinstance(ranges, dict) else None
        if not (
            isinstance(quantiles, list)
            and isinstance(bounds, list)
            and len(quantiles) == len(bounds)
            and all(_is_number(q) and 0 <= q <= 1 for q in quantiles)
            and all(isinstance(b, list) and len(b) == 2 and all(v is None or _is_number(v) for v in b) for b in bounds)
        ):
            raise CatalogError(
                path,
                f"{field}.quantile_ranges",
                "must be {quantiles: [shares between 0 and 1], value_ranges: [[low, high], ...]}, one range each",
            )


def judge_columns(kind: str, kwargs: dict[str, Any], columns: list[str]) -> tuple[bool, Any]:
    """A column expectation against the dataset's columns: whether it holds, and what it observed."""
    if kind == "expect_table_columns_to_match_set":
        wanted, have = set(kwargs["column_set"]), set(columns)
        return (have == wanted if kwargs.get("exact_match", True) else wanted <= have), sorted(have)
    if kind == "expect_table_columns_to_match_ordered_list":
        return columns == list(kwargs["column_list"]), columns
    if kind == "expect_column_to_exist":
        index = kwargs.get("column_index")
        return kwargs["column"] in columns and (index is None or columns.index(kwargs["column"]) == index), columns
    return len(columns) == kwargs["value"], len(columns)  # expect_table_column_count_to_equal


def check_can_pass_and_fail(path: Path, where: str, kind: str, kwargs: dict[str, Any], types: dict[str, str]) -> None:
    """An expectation that cannot fail checks nothing, and one that cannot pass fails every run."""
    field = f"{where}.kwargs"
    if "min_value" in ARGUMENTS[kind][1]:  # bounds, all optional
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        if low is None and high is None:
            raise CatalogError(path, field, f"{kind} with neither min_value nor max_value cannot fail")
        column_type = types.get(kwargs.get("column"))
        dates = column_type in ("date", "timestamp")  # lengths judge text only
        whole = kind in COUNT_BOUNDS or (kind in VALUE_BOUNDS and column_type in ("int32", "int64"))
        strict_min, strict_max = (kwargs.get(s) is True for s in ("strict_min", "strict_max"))
        try:
            low, high = (utc_instant(v) if dates else v for v in (low, high))
            bounded = low is not None and high is not None
            crossed = bounded and _admits_nothing(low, high, strict_min, strict_max, False)
            only_whole = bounded and not crossed and whole and _admits_nothing(low, high, strict_min, strict_max, True)
        except (TypeError, ValueError):  # a number against text, text that is no date: the type checks name it
            crossed = only_whole = False
        if crossed or only_whole:
            raise CatalogError(
                path,
                f"{field}.min_value",
                f"{kwargs['min_value']!r} against max_value {kwargs['max_value']!r}"
                f"{' (strict)' if strict_min or strict_max else ''}"
                f"{' on whole numbers' if only_whole else ''}: it can never pass",
            )
    if kind in COLUMN_EXPECTATIONS and not judge_columns(kind, kwargs, list(types))[0]:
        raise CatalogError(
            path, field, f"the schema gives every version the columns {list(types)}, so it can never pass"
        )


def _admits_nothing(low: Any, high: Any, strict_min: bool, strict_max: bool, whole: bool) -> bool:
    """No value lies within the bounds; for whole numbers, none between strict bounds one apart either."""
    if whole and all(isinstance(v, int | float) and math.isfinite(v) for v in (low, high)):
        first = math.floor(low) + 1 if strict_min else math.ceil(low)
        last = math.ceil(high) - 1 if strict_max else math.floor(high)
        return first > last
    return low > high or (low == high and (strict_min or strict_max))


def utc_instant(value: Any) -> Any:
    """A date or timestamp bound or member, written as ISO 8601 text, as the instant the column's values are
    compared with: naive, in UTC where a zone is given (timestamps are stored so). The statistics compare
    with it too; None stays None."""
    if value is None:
        return None
    instant = pd.Timestamp(value)
    return instant.tz_convert("UTC").tz_localize(None) if instant.tzinfo else instant


def values_for_gx(path: Path, where: str, kind: str, kwargs: dict[str, Any], types: dict[str, str]) -> dict[str, Any]:
    """A row expectation's values as GX compares them with its columns' values. Bounds and set members on a
    date or timestamp column, written as ISO text, become the instants the statistics compare min and max
    with (`utc_instant`), written as GX compares them with the column's naive datetime64 values: GX's model
    reads "2024-01-01" as a date and a bound with a zone as an aware datetime, which pandas cannot compare
    with them, failing every part (the workers turn set members into instants: see validation.py). A member
    of another type than its column's is refused: in a set, it judged every row wrong; not in it, none."""
    field, column = f"{where}.kwargs", kwargs.get("column")
    if kind == "expect_column_values_to_be_between" and COMPARED_AS[types[column]] == "instant":
        bounds = {name: kwargs[name] for name in ("min_value", "max_value") if kwargs.get(name) is not None}
        return {**kwargs, **{name: utc_instant(value).isoformat() for name, value in bounds.items()}}
    if isinstance(kwargs.get("value_set"), list):
        members = [_member(path, f"{field}.value_set.{i}", v, column, types) for i, v in enumerate(kwargs["value_set"])]
        return {**kwargs, "value_set": members}
    pairs = kwargs.get("value_pairs_set")
    if isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs):  # else GX names it
        columns = (kwargs["column_A"], kwargs["column_B"])
        members = [
            [_member(path, f"{field}.value_pairs_set.{i}.{j}", pair[j], columns[j], types) for j in (0, 1)]
            for i, pair in enumerate(pairs)
        ]
        return {**kwargs, "value_pairs_set": members}
    return kwargs


# The largest float32: a set member beyond it, compared in float32 on the workers, became infinity (numpy
# overflows without an error) and matched a stored infinity, where it can match no value at all.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _member(path: Path, field: str, value: Any, column: str, types: dict[str, str]) -> Any:
    """One member of a set, of its column's type; a date or timestamp as the instant GX compares. Null
    stands for a missing value (pairs compare them)."""
    column_type = types[column]
    if value is None:
        return None
    if COMPARED_AS[column_type] == "instant":
        if not (isinstance(value, str) and _is_iso_datetime(value)):
            raise CatalogError(path, field, f"must be an ISO 8601 {column_type}, as {column!r} holds, got {value!r}")
        instant = utc_instant(value)
        if column_type == "date" and instant.time() != dt.time():
            raise CatalogError(path, field, f"{value!r} has a time of day: it never matches a date of {column!r}")
        return instant.isoformat()
    if not _fits(value, column_type):
        raise CatalogError(path, field, f"{value!r} is no {column_type} value: it never matches one of {column!r}")
    if column_type == "float32" and FLOAT32_MAX < abs(value) < math.inf:  # infinity a float32 holds
        raise CatalogError(
            path, field, f"{value!r} is beyond float32's range (±{FLOAT32_MAX:.7g}): no value of {column!r} holds it"
        )
    return value


def _fits(value: Any, column_type: str) -> bool:
    """Whether `value` can equal a value of a column of `column_type` (other than a date or timestamp)."""
    kind = COMPARED_AS[column_type]
    if kind == "number":
        whole = column_type in ("int32", "int64")
        return _is_number(value) and (not whole or isinstance(value, int) or value.is_integer())
    return isinstance(value, str if kind == "text" else bool)


def check_compared_types(path: Path, where: str, kind: str, kwargs: dict[str, Any], types: dict[str, str]) -> None:
    """Columns GX compares with bounds, a total or each other, of types it can compare that way: text
    against number bounds, or a date against a number, failed every part; text and a number are never equal
    (a check that cannot fail); text sums to text."""
    field = f"{where}.kwargs"
    if kind == "expect_column_values_to_be_between" and types[kwargs["column"]] == "string":
        raise CatalogError(
            path,
            f"{field}.column",
            f"{kind} compares numbers, booleans, dates or timestamps; {kwargs['column']!r} is string",
        )
    if kind == "expect_multicolumn_sum_to_equal":
        if texts := [c for c in kwargs["column_list"] if COMPARED_AS[types[c]] not in ("number", "bool")]:
            raise CatalogError(
                path, f"{field}.column_list", f"{kind} sums numbers or booleans; {texts[0]!r} is {types[texts[0]]}"
            )
        if not _is_number(kwargs["sum_total"]):
            raise CatalogError(path, f"{field}.sum_total", f"must be a number, got {kwargs['sum_total']!r}")
    if kind in COMPARING_COLUMNS:
        compared = kwargs.get("column_list") or [kwargs["column_A"], kwargs["column_B"]]
        if len({COMPARED_AS[types[c]] for c in compared}) > 1:
            named = ", ".join(f"{c!r} is {types[c]}" for c in compared)
            raise CatalogError(path, field, f"{kind} compares values of one kind (numbers, text, ...); {named}")


def _is_iso_datetime(text: str) -> bool:
    """ISO 8601 as Python reads it and as the statistics read it: a week date ('2024-W01-1') is the one, not
    the other, and failed the validated step in every run."""
    try:
        dt.datetime.fromisoformat(text)
        utc_instant(text)
    except ValueError:
        return False
    return True


def load_catalog(root: Path | str | None = None) -> Catalog:
    root = Path(root) if root is not None else default_catalog_root()
    sites = load_sites(root / "sites.yaml")
    datasets: dict[str, Dataset] = {}
    files: dict[str, Path] = {}
    suites: dict[str, dict[str, Any]] = {}
    errors: list[CatalogError] = []
    for path in dataset_files(root / "datasets"):
        try:
            dataset, suite = load_dataset(path, root, sites)
            if dataset.name in datasets:
                raise CatalogError(
                    path, "name", f"duplicate dataset name {dataset.name!r} (also in {files[dataset.name]})"
                )
        except CatalogError as exc:
            errors.append(exc)
            continue
        datasets[dataset.name], files[dataset.name], suites[dataset.name] = dataset, path, suite
    if errors:
        raise errors[0] if len(errors) == 1 else CatalogErrors(errors)
    return Catalog(root=root, sites=sites, datasets=datasets, suites=suites)


def dataset_files(folder: Path) -> list[Path]:
    """The `.yaml` and `.yml` files (in any case: `x.YAML` too) of the datasets folder. Hidden files are not
    datasets: an editor's lock (`.#x.yaml`, a dangling link), macOS's `._x.yaml`. A catalogue without any
    is an error: a misnamed folder would otherwise load as no datasets at all, without a word."""
    if not folder.is_dir():
        raise CatalogError(folder, "<folder>", "does not exist; each dataset is a datasets/<name>.yaml file")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".yaml", ".yml") and not p.name.startswith("."))
    if not files:
        raise CatalogError(folder, "<folder>", "holds no dataset file (<name>.yaml or <name>.yml)")
    return files


# Below this a shard target is probably a unit slip (`target_bytes: 128` meant as MiB): a file per few rows.
# Warned, not refused: tests and small sites may mean it.
SMALL_TARGET_BYTES = 2**20


def load_dataset(path: Path, root: Path, sites: dict[str, Site]) -> tuple[Dataset, dict[str, Any]]:
    """One dataset file and its suite, checked against the sites."""
    dataset = _parse(Dataset, _read_yaml(path), path)
    shards = dataset.shards
    if shards.target_rows is None and shards.target_bytes < SMALL_TARGET_BYTES:
        log.warning(
            f"{path}: shards.target_bytes: {shards.target_bytes} bytes is below 1 MiB, a shard file per few rows "
            f"(target_bytes counts bytes; 128 MiB is {128 * 2**20})"
        )
    site = sites.get(dataset.site)
    if site is None:
        raise CatalogError(path, "site", f"unknown site {dataset.site!r}; known: {sorted(sites)}")
    if dataset.sector not in site.sectors:
        raise CatalogError(
            path,
            "sector",
            f"site {site.id!r} does not serve sector {dataset.sector!r}; it serves {sorted(site.sectors)}",
        )
    for i, other in enumerate(dataset.residency):
        if other not in sites:
            raise CatalogError(path, f"residency.{i}", f"unknown site {other!r}")
    if dataset.residency and dataset.site not in dataset.residency:
        raise CatalogError(path, "residency", f"must include the dataset's home site {dataset.site!r}")
    if Path(dataset.suite).is_absolute() or Path(os.path.normpath(dataset.suite)).parts[:1] == ("..",):
        raise CatalogError(path, "suite", f"{dataset.suite!r} must be a path within the catalogue root {root}")
    return dataset, load_suite(root / dataset.suite, dataset, path)
