"""Reading a deblur output's manifests and quarantine indexes (pyarrow only: no Ray, no torch)."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.deblur.shard import MANIFEST_DIR, MANIFEST_SCHEMA, QUARANTINE_DIR
from pipeline.store.storage import Store

PATCH_COLUMNS = ("patch_ys", "patch_xs", "patch_size", "patch_depths")
STATS_COLUMNS = tuple(name for name in MANIFEST_SCHEMA.names if name not in PATCH_COLUMNS)


def read_manifests(output: Store, columns: Sequence[str] | None = None) -> tuple[pa.Table, list[str]]:
    """Every committed manifest as one table (`columns` of it; those an older manifest lacks are
    null), and the shard errors recorded in their metadata."""
    schema = pa.schema([MANIFEST_SCHEMA.field(c) for c in columns or MANIFEST_SCHEMA.names])
    tables, errors = [], []
    for _, data in output.read_many(output.glob(f"{MANIFEST_DIR}/**/*.parquet")):  # many at a time
        table, found = parse_columns(data, schema)
        errors += found
        tables.append(table)
    return (pa.concat_tables(tables) if tables else schema.empty_table()), errors


def read_columns(output: Store, name: str, schema: pa.Schema) -> tuple[pa.Table, list[str]]:
    """One manifest file: the columns of `schema` (null where the file lacks one) and its shard errors."""
    return parse_columns(output.read_bytes(name), schema)


def parse_columns(data: bytes, schema: pa.Schema) -> tuple[pa.Table, list[str]]:
    file = pq.ParquetFile(io.BytesIO(data))
    present = [c for c in schema.names if c in file.schema_arrow.names]
    table = file.read(columns=present)
    for column in schema:
        if column.name not in present:
            table = table.append_column(column, pa.nulls(table.num_rows, column.type))
    errors = json.loads((file.schema_arrow.metadata or {}).get(b"adarevd.shard_errors", b"[]"))
    return table.select(schema.names).cast(schema), errors


def read_quarantine(output: Store) -> list[dict[str, Any]]:
    """Every quarantine row (shard, key, reason), in shard and key order."""
    rows = []
    for _, data in output.read_many(output.glob(f"{QUARANTINE_DIR}/**/*.parquet")):
        rows += pq.read_table(io.BytesIO(data)).to_pylist()
    return sorted(rows, key=lambda r: (r["shard"], r["key"]))


def exit_histogram(column: pa.ChunkedArray, n: int) -> np.ndarray:
    """Patches per depth 0..n summed over every frame's histogram, without a Python loop over frames."""
    lists = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(lengths) and (lengths == n + 1).all():
        return values.reshape(-1, n + 1).sum(axis=0)
    total = np.zeros(n + 1, np.int64)
    position = np.concatenate([np.arange(k) for k in lengths if k]) if len(values) else np.zeros(0, np.int64)
    np.add.at(total, np.minimum(position, n), values)
    return total
