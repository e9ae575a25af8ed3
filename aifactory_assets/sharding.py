"""The `shards` stage: dedup by key, split by a stable hash of the key, seeded shuffle, equal-row shards.

A range shuffle through the store (Arrow IPC staging files, `staging`), in three waves of Dask tasks, so
no process ever holds more than one bucket (about BUCKET_BYTES):
1. scatter (one task per validated part): hash the key; the hash decides the split (stable across
   versions: a record never changes split), the hash mixed with the seed decides the shuffle order; each
   row goes to the bucket of its split and of its order's range, one record batch per bucket in the
   part's staging file. Equal keys land in the same bucket.
2. gather (one task per bucket): its batch of every staging file; drop duplicate keys, the latest landed
   file and last row winning; sort by the seeded order. The buckets of a split, in range order, are the
   split globally shuffled.
3. shard (one task per shard): cut each split into shards whose row counts differ by at most one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from distributed import Client

from aifactory_assets.catalog import Dataset
from aifactory_assets.parquet_io import HashingFile, open_ranged, open_whole, read_footers, read_parquet
from aifactory_assets.schema import ROW, arrow_schema
from aifactory_assets.shard_layout import dictionary_columns, read_footer, row_group_rows, shard_name, take_rows
from aifactory_assets.staging import read_batches, read_sorted_rows, write_batches, write_sorted
from aifactory_assets.tasks import run_tasks
from aifactory_assets.validated_rows import read_validated_part
from resources.object_store import ObjectStore

SEQ, ORDER = "_seq", "_order"
BUCKET_BYTES = 64 * 2**20  # in-memory (Arrow) size of one bucket; a gather task peaks near four times that
DICTIONARY_BYTES = BUCKET_BYTES // 8  # the dictionaries one gather task may load, all parts' together
SAMPLER = {
    "split": "each key column in a canonical form taken from its Arrow type (integers, floats and booleans as "
    "NumPy arrays of their own type, timestamps as int64 microseconds since the epoch as stored, dates as "
    "ISO 'YYYY-MM-DD' text, text as Python str), the columns hashed together by "
    "pandas.util.hash_pandas_object(index=False) (siphash-2-4 of the UTF-8 bytes for text, its 64-bit mix "
    "for numbers), divided by 2**64 and cut by the cumulative split ratios (numpy.searchsorted, side right)",
    "shuffle": "rows in ascending order of z = key hash XOR s, where s is the first 8 bytes, big-endian, of "
    "sha256 of the seed's decimal text, put through splitmix64's finaliser alone (no gamma added): "
    "z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31 (mod 2**64)",
    "dedup": "by key among the validated rows, the record from the latest landed file (by when its bytes first "
    "landed under its name, then by name) and its last row wins",
    # What aifactory_assets.loader does with it per epoch (NumPy's Generator streams, the release in the
    # producer's libraries): how another reader can reproduce, or resume, a training run's order.
    "epoch": "the split's non-empty row groups in numpy.random.default_rng([seed, epoch]).permutation order, "
    "the rows of each in default_rng([seed, epoch, shard index, row group index]).permutation order (the "
    "default shuffle_block of 1); that stream cut into world_size equal contiguous slices, one per rank; a "
    "rank's batches, counted from the one a run starts or resumes in (start_sample // batch_size), to "
    "data-loader workers in turn: the i-th so counted to worker i % workers",
}


def hashed_form(column: pa.ChunkedArray) -> np.ndarray:
    """A key column as it is hashed, from its Arrow type alone: the unit or type pandas converts it to moved
    with its releases (timestamps in ns, then us; dates as objects or datetimes), and a hash of those would
    move records between splits. Dates as their ISO text, as `str(datetime.date)`, which they were hashed
    as from the first version."""
    if pa.types.is_timestamp(column.type):
        return column.cast(pa.timestamp("us")).cast(pa.int64()).to_numpy()
    if pa.types.is_date(column.type):
        return column.cast(pa.string()).to_numpy(zero_copy_only=False)
    return column.to_numpy(zero_copy_only=False)


def key_hash(table: pa.Table | pd.DataFrame, key: list[str]) -> np.ndarray:
    """The key's 64-bit hash per row (SAMPLER["split"]); a DataFrame is read as Arrow first."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    forms = {name: hashed_form(table.column(name)) for name in key}
    frame = pd.DataFrame({name: pd.Series(form, dtype=form.dtype, copy=False) for name, form in forms.items()})
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)


def assign_splits(hashes: np.ndarray, ratios: dict[str, float]) -> np.ndarray:
    """Split index per row, from the key's hash alone: stable across versions, independent of the seed."""
    unit = hashes.astype(np.float64) / float(2**64)
    return np.searchsorted(np.cumsum(list(ratios.values()))[:-1], unit, side="right").astype(np.int8)


def shuffle_order(hashes: np.ndarray, seed: int) -> np.ndarray:
    """Each row's place in the seeded shuffle. The seed is mixed in here (pandas ignores a hash key for
    numbers) and splitmix64's finaliser decorrelates the order from the split, so a split's rows spread
    evenly over its buckets."""
    z = hashes ^ np.uint64(int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:8], "big"))
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def scatter_part(
    part_url: str,
    excluded_url: str,
    seq: int,
    out_url: str,
    key_columns: list[str],
    dictionary_columns: list[str],
    ratios: dict[str, float],
    seed: int,
    ranges: list[int],
    storage_options: dict[str, Any],
) -> dict[int, tuple[int, int]]:
    """Runs on a worker: one validated part -> one staging file holding a record batch per bucket it
    touches; returns {bucket: (batch index in that file, rows)}."""
    table = read_validated_part(part_url, excluded_url, storage_options, read_dictionary=dictionary_columns)
    hashes = key_hash(table, key_columns)
    split = assign_splits(hashes, ratios).astype(np.int64)
    order = shuffle_order(hashes, seed)
    # Monotone in the order (uint64 -> float64 never reorders), so buckets in range order stay sorted.
    per_split = np.array(ranges, dtype=np.int64)[split]
    in_range = np.minimum((order.astype(np.float64) / 2.0**64 * per_split).astype(np.int64), per_split - 1)
    bucket = np.concatenate([[0], np.cumsum(ranges)[:-1]]).astype(np.int64)[split] + in_range
    table = table.append_column(ORDER, pa.array(order, pa.uint64()))
    table = table.append_column(SEQ, pa.array(np.full(table.num_rows, seq, np.int64)))
    # One reorder by bucket, then each bucket is a zero-copy slice (not one filter pass per bucket). The
    # narrowest integer type that holds every bucket: at 16 bits or fewer numpy's stable sort is a radix sort
    # (1.4 vs 22 ms on 560k rows). A part past 2 GiB of text is taken a piece at a time (`take_rows`), so
    # dictionaries are unified first: an IPC file holds one per column for all its batches.
    by_bucket = np.argsort(bucket.astype(np.min_scalar_type(sum(ranges) - 1)), kind="stable")
    table, bucket = take_rows(table.unify_dictionaries(), by_bucket), bucket[by_bucket]
    ids, starts, sizes = np.unique(bucket, return_index=True, return_counts=True)
    slices = [table.slice(start, size) for start, size in zip(starts.tolist(), sizes.tolist(), strict=True)]
    write_batches(out_url, table.schema, slices, storage_options)
    return {b: (i, n) for i, (b, n) in enumerate(zip(ids.tolist(), sizes.tolist(), strict=True))}


SAMPLE_ROWS = 65_536  # a gathered bucket's rows encoded as a shard is, to size the shards by bytes


def as_shard(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A staged table's rows as a shard holds them: the catalogue's columns (no shuffle columns), types."""
    return table.select(schema.names).cast(schema)


def shard_writer(sink: Any, schema: pa.Schema) -> pq.ParquetWriter:
    """Every page with a CRC32, which readers check as they read (the loader's verify="pages")."""
    return pq.ParquetWriter(
        sink,
        schema,
        compression="zstd",
        write_statistics=True,
        use_dictionary=dictionary_columns(schema),
        write_page_checksum=True,
    )


def encoded_bytes(table: pa.Table, schema: pa.Schema, group_rows: int) -> int:
    """What `table` takes written as a shard is, in row groups of `group_rows`: shuffled rows compress
    worse than the landed order (1.5x for the benchmark's sequential ids), and small row groups worse
    than large ones, so the validated parts' size misjudged the shards."""
    sink = pa.BufferOutputStream()
    with shard_writer(sink, schema) as writer:
        writer.write_table(as_shard(table, schema), group_rows)
    return sink.tell()


@dataclass(frozen=True)
class Gathered:
    """A gathered bucket: its rows, and a sample's bytes as a shard, which sizes a split's shards."""

    rows: int  # kept, after deduplication
    sample_rows: int
    sample_bytes: int  # `sample_rows` of them encoded as a shard


def gather_bucket(
    fragments: list[tuple[str, int]],
    out_url: str,
    group_rows: int,
    key_columns: list[str],
    storage_options: dict[str, Any],
    schema: pa.Schema,
    sample_rows: int,
) -> Gathered:
    """Runs on a worker: one bucket's batches of the staging files -> deduplicated, sorted by the seeded
    order; measures what its first `sample_rows` take as a shard (in row groups of `group_rows`)."""
    table = pa.concat_tables([read_batches(url, [index], storage_options) for url, index in fragments])
    order = table.column(ORDER).to_numpy()
    sorting = np.argsort(order)  # distinct orders have one sorted order, whatever the sort (33 vs 59 ms)
    ranked = order[sorting]
    ties = bool((ranked[1:] == ranked[:-1]).any())  # equal keys have equal order hashes
    if ties:  # latest wins: per key, the latest (file, row) last
        seq, row = (table.column(c).to_numpy() for c in (SEQ, ROW))
        sorting = np.lexsort((row, seq, order))
    # The one full copy (a piece at a time past 2 GiB of text), of the files' dictionaries unified into one,
    # as write_sorted needs.
    table = take_rows(table.unify_dictionaries(), sorting)
    if ties:  # keep the last of each key
        frame = table.select(key_columns).to_pandas()
        table = table.filter(pa.array(~frame.duplicated(keep="last").to_numpy()))
    kept = table.drop_columns([SEQ])
    write_sorted(out_url, kept, storage_options)
    sample = kept.slice(0, sample_rows)
    return Gathered(kept.num_rows, sample.num_rows, encoded_bytes(sample, schema, group_rows) if sample.num_rows else 0)


def write_shard(
    slices: list[tuple[str, int, int]],
    url: str,
    group_rows: int,
    storage_options: dict[str, Any],
    schema: pa.Schema,
    tmp_folder: str,
) -> dict[str, Any]:
    """Runs on a worker: stream row ranges of sorted buckets into one shard, one range in memory at a time,
    in whole row groups across the buckets' ranges (a range's last rows wait for the next range's), hashing
    the bytes on their way out (no temporary copy; only the footer is read back, for its own hash,
    which readers check on every open: page CRCs do not cover it). Into the version's folder, invisible
    until its manifest is committed, and there only once whole (`open_whole`, from the run's staging)."""
    with open_whole(url, storage_options, tmp_folder) as f:
        out = HashingFile(f)
        with shard_writer(out, schema) as writer:
            held = schema.empty_table()
            for part, lo, hi in slices:
                held = pa.concat_tables([held, as_shard(read_sorted_rows(part, lo, hi, storage_options), schema)])
                whole = held.num_rows - held.num_rows % group_rows
                if whole:  # never a row group of no rows
                    writer.write_table(held.slice(0, whole), group_rows)
                held = held.slice(whole)
            if held.num_rows:
                writer.write_table(held, group_rows)
    meta = writer.writer.metadata  # the footer it wrote (how pyarrow's own metadata_collector gets it)
    with open_ranged(url, storage_options) as f:
        footer = read_footer(f)
    return {
        "rows": meta.num_rows,
        "bytes": out.size,
        "sha256": out.digest.hexdigest(),
        "footer_sha256": hashlib.sha256(footer).hexdigest(),
        "row_groups": [meta.row_group(i).num_rows for i in range(meta.num_row_groups)],
    }


@dataclass(frozen=True)
class PartsMeasure:
    """What the shuffle plans with, learnt from the validated parts before it starts."""

    in_memory: int  # bytes the parts' rows take as Arrow tables
    rows: int  # the parts' rows (before their delete files)
    dictionary_columns: list[str]  # text the shuffle carries as dictionaries


def text_for_dictionaries(sample: pa.Table, parts: int, key_columns: list[str]) -> list[str]:
    """Text columns the shuffle carries as dictionaries: every row is moved twice (scatter, gather), and a
    dictionary moves as int32 codes (about 80 ms less per part of 560k rows, mostly `_source`, one value per
    part). A staging file holds its part's whole dictionary and a gather reads a batch of every file, so
    only columns whose distinct values, times the parts, stay under DICTIONARY_BYTES qualify (categories,
    not free text). The key stays as it is: its hash must not depend on how it was read."""
    text = (pa.types.is_string, pa.types.is_large_string)
    return [
        field.name
        for field in sample.schema
        if any(test(field.type) for test in text)
        and field.name not in key_columns
        and pc.unique(sample.column(field.name)).nbytes * parts <= DICTIONARY_BYTES
    ]


def uncompressed_bytes(meta: pq.FileMetaData) -> int:
    """A part's pages uncompressed, from its footer: about what its plain-encoded columns take in memory."""
    return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))


def measure_parts(store: ObjectStore, parts: list[str], key_columns: list[str]) -> PartsMeasure:
    """Row counts come from the footers; the in-memory size per row and the text columns' distinct values
    are measured on the largest part by rows (footers understate memory: dictionary-encoded strings expand),
    and each part is taken as at least what its footer's pages hold uncompressed: a part of fewer, wider rows
    (documents beside short records) would otherwise count at the largest part's bytes per row."""
    found = read_footers([store.url(p) for p in parts], store.storage_options)
    rows = {p: meta.num_rows for p, meta in zip(parts, found, strict=True)}
    total = sum(rows.values())
    sample = max(rows, key=rows.get, default=None)
    if sample is None or total == 0:
        return PartsMeasure(0, 0, [])
    table = read_parquet(store.url(sample), store.storage_options)
    row_bytes = table.nbytes / table.num_rows
    in_memory = int(sum(max(meta.num_rows * row_bytes, uncompressed_bytes(meta)) for meta in found))
    return PartsMeasure(in_memory, total, text_for_dictionaries(table, len(parts), key_columns))


def plan_shards(part_rows: list[tuple[str, int]], shards: int) -> list[list[tuple[str, int, int]]]:
    """Cut the concatenation of sorted parts into `shards` ranges whose sizes differ by at most one (none
    for an empty split)."""
    total = sum(n for _, n in part_rows)
    bounds = [0] + [(i * total) // shards for i in range(1, shards + 1)]
    plans: list[list[tuple[str, int, int]]] = []
    for start, stop in zip(bounds, bounds[1:], strict=False):
        plan, offset = [], 0
        for part, n in part_rows:
            lo, hi = max(start - offset, 0), min(stop - offset, n)
            if lo < hi:
                plan.append((part, lo, hi))
            offset += n
        plans.append(plan)
    return plans


def shard_count(rows: int, bytes_per_row: float, dataset: Dataset) -> int:
    """Shards of `target_rows`, or of about `target_bytes` on disk, estimated from samples of the split's
    gathered buckets written as shards; never more shards than rows (a target below a file's own overhead
    of a few KB would make empty ones), and none for an empty split: a file of no rows makes Hugging Face's
    `load_dataset` fail for the whole version."""
    settings = dataset.shards
    if settings.target_rows:
        return math.ceil(rows / settings.target_rows)
    return min(rows, max(1, math.ceil(rows * bytes_per_row / settings.target_bytes)))


def shard_dataset(
    store: ObjectStore,
    client: Client,
    dataset: Dataset,
    parts: list[str],
    excluded: list[str],
    part_seqs: list[int],
    version_prefix: str,
    staging_prefix: str,
) -> dict[str, Any]:
    """Write every split's shards under `version_prefix`; returns per-split shard entries and counts."""
    options = store.storage_options
    key, ratios = dataset.table.key, dataset.shards.splits
    measured = measure_parts(store, parts, key)
    ranges = [max(1, math.ceil(ratio * measured.in_memory / BUCKET_BYTES)) for ratio in ratios.values()]
    first_bucket = np.concatenate([[0], np.cumsum(ranges)]).tolist()
    scattered_urls = [store.url(f"{staging_prefix}/scattered/part-{seq:05d}.arrow") for seq in part_seqs]
    scattered = run_tasks(
        client,
        scatter_part,
        [store.url(p) for p in parts],
        [store.url(p) for p in excluded],
        part_seqs,  # each part's landed file, in landing order: later files win on duplicate keys
        scattered_urls,
        key_columns=key,
        dictionary_columns=measured.dictionary_columns,
        ratios=ratios,
        seed=dataset.shards.seed,
        ranges=ranges,
        storage_options=options,
    )
    rows_in = sum(n for batches in scattered for _, n in batches.values())
    row_bytes = measured.in_memory / max(measured.rows, 1)  # caps row groups of wide rows (shard_layout)
    by_bucket: dict[int, list[tuple[str, int]]] = {}
    split_rows = [0] * len(ratios)  # before deduplication: what the row groups are sized from, nearly
    split_of = np.searchsorted(first_bucket, np.arange(first_bucket[-1]), side="right") - 1
    for url, batches in zip(scattered_urls, scattered, strict=True):
        for b, (index, n) in batches.items():
            by_bucket.setdefault(b, []).append((url, index))
            split_rows[split_of[b]] += n
    ordered = sorted(by_bucket)
    sorted_urls = {b: store.url(f"{staging_prefix}/sorted/bucket-{b:05d}.arrow") for b in ordered}
    schema = arrow_schema(dataset)
    gathered = run_tasks(
        client,
        gather_bucket,
        [by_bucket[b] for b in ordered],
        [sorted_urls[b] for b in ordered],
        [row_group_rows(split_rows[split_of[b]], row_bytes) for b in ordered],
        key_columns=key,
        storage_options=options,
        schema=schema,
        sample_rows=0 if dataset.shards.target_rows else SAMPLE_ROWS,  # shards cut by rows need no sample
    )
    # Every bucket is gathered: the scattered files (as large as the data, uncompressed on a local disk) go
    # now rather than at the commit, so the shuffle never holds two copies of the data while shards are written.
    store.delete(f"{staging_prefix}/scattered")
    by_sorted = dict(zip(ordered, gathered, strict=True))
    # Every split's shards in one wave, so no worker idles while a small split finishes.
    shards: dict[str, list[tuple[str, list[tuple[str, int, int]], int]]] = {}
    for index, split in enumerate(ratios):
        mine = [b for b in ordered if split_of[b] == index]
        part_rows = [(sorted_urls[b], by_sorted[b].rows) for b in mine]
        rows = sum(n for _, n in part_rows)
        sampled = sum(by_sorted[b].sample_rows for b in mine)
        bytes_per_row = sum(by_sorted[b].sample_bytes for b in mine) / max(sampled, 1)
        count = shard_count(rows, bytes_per_row, dataset)
        plans = plan_shards(part_rows, count)
        group_rows = row_group_rows(rows, row_bytes)
        shards[split] = [(shard_name(split, i, count), plan, group_rows) for i, plan in enumerate(plans)]
    jobs = [job for split_jobs in shards.values() for job in split_jobs]
    written = iter(
        run_tasks(
            client,
            write_shard,
            [plan for _, plan, _ in jobs],
            [store.url(f"{version_prefix}/{name}") for name, _, _ in jobs],
            [group_rows for _, _, group_rows in jobs],
            storage_options=options,
            schema=schema,
            tmp_folder=store.url(f"{staging_prefix}/writing"),
        )
    )
    splits: dict[str, Any] = {}
    for split, split_jobs in shards.items():
        entries = [{"path": name, **next(written)} for name, _, _ in split_jobs]
        splits[split] = {
            "rows": sum(e["rows"] for e in entries),
            "bytes": sum(e["bytes"] for e in entries),
            "shards": entries,
        }
    rows_kept = sum(g.rows for g in gathered)
    return {"rows_in": rows_in, "duplicates_dropped": rows_in - rows_kept, "splits": splits}
