"""The resume records' reading, without Ray: a manifest's metadata from its footer alone."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.deblur.resume import footer_metadata
from pipeline.deblur.shard import done_shards, output_names
from pipeline.store.storage import Store


def parquet(metadata: dict[str, str], rows: int = 1000) -> bytes:
    table = pa.table({"key": [f"k{i:06d}" for i in range(rows)]}).replace_schema_metadata(metadata)
    data = io.BytesIO()
    pq.write_table(table, data)
    return data.getvalue()


def test_footer_metadata_from_the_tail_alone_or_the_whole_file_when_the_footer_is_longer(memory_store: Store) -> None:
    small, large = {"adarevd.source": "s3://b/x.tar"}, {"adarevd.source": "s3://b/x.tar", "pad": "p" * 50_000}
    for metadata in (small, large):
        memory_store.commit_bytes("m.parquet", data := parquet(metadata))
        assert footer_metadata(memory_store, "m.parquet", data[-4096:]) == metadata  # the large one: read whole
    with pytest.raises(ValueError, match=r"memory://.*/bad.parquet: not a Parquet file \(a damaged manifest\)"):
        footer_metadata(memory_store, "bad.parquet", b"truncated manifest bytes")


def test_done_shards_are_those_with_a_committed_manifest(memory_store: Store) -> None:
    shards = ["a.tar", "sub/b.tar", "c.tar"]
    for shard in shards[:2]:
        memory_store.commit_bytes(output_names(shard)[1], parquet({}, rows=1))
    memory_store.commit_bytes("c.tar", b"an output shard without its manifest is not done")
    assert done_shards(memory_store, shards) == {"a.tar", "sub/b.tar"}
