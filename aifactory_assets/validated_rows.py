"""What the validated stage passes on: each raw part's rows, less those its quarantine part names.

Validation writes the few rows that fail (to quarantine), never a second copy of the many that pass: the
quarantine part works as a delete file (Iceberg's position deletes, Delta Lake's deletion vectors). A raw
part holds one landed file, and `_row` numbers that file's rows, so `_row` alone names a row.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from aifactory_assets.parquet_io import read_parquet
from aifactory_assets.schema import ROW


def read_validated_part(
    part_url: str, quarantine_url: str, storage_options: dict[str, Any], read_dictionary: list[str] | None = None
) -> pa.Table:
    table = read_parquet(part_url, storage_options, read_dictionary=read_dictionary)
    excluded = read_parquet(quarantine_url, storage_options, columns=[ROW]).column(ROW)
    if len(excluded) == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table.column(ROW), value_set=excluded.combine_chunks())))
