"""Rows streamed into a local Parquet file a chunk at a time, so that memory holds one chunk, not the
file: an archive's index has a row per frame (millions)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_ROWS = 16384  # rows a row group: about 15 MB of row dicts in memory at most


class ParquetRows:
    """`add` rows (dicts with `schema`'s names), or `add_table` whole tables, in order; `close` (or the
    end of a `with` block) finishes the file. The same rows give the same bytes."""

    def __init__(self, path: str, schema: pa.Schema, chunk: int = CHUNK_ROWS) -> None:
        self.schema, self.chunk = schema, chunk
        self.count = 0
        self._rows: list[dict[str, Any]] = []
        self._writer = pq.ParquetWriter(path, schema)

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        self.count += 1
        if len(self._rows) >= self.chunk:
            self._flush()

    def add_table(self, table: pa.Table) -> None:
        self._flush()
        if table.num_rows:
            self._writer.write_table(table.select(self.schema.names).cast(self.schema))
            self.count += table.num_rows

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def __enter__(self) -> ParquetRows:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self._writer.close()  # the file is dropped with its scratch folder
