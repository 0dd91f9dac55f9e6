"""A deblur run's bookkeeping on a large output in S3: what the driver does before its first shard and
after its last, with the requests made many at a time vs one shard at a time.

Before its first shard, a run finds the done shards and checks them for a resume; after its last, it
sums every manifest into `_run.json`. On an archive of thousands of shards those are thousands of
requests, and each costs the store's round trip. Two contenders on the same output, in one run:

- per shard (as before): a HEAD per shard for "done?", the first done manifest's footer for the
  resume check, then every manifest read one after another for the totals;
- ours: one listing of `_manifest/` for "done?", every done manifest's footer and every input
  shard's size and version (`check_resume`, which now checks all of them), then the totals, 64 files a
  request batch (`Store.read_many`).

The store is SeaweedFS on loopback, reached through a proxy that holds each request for
`--latency-ms` (a cloud bucket answers in about 10-50 ms; loopback in under 5); `--latency-ms 0`
measures the bare loopback. Ours runs twice: with the Store's S3 connection pool and with botocore's
default of 10. Also, per commit of a small object (every output a shard writes is one):
`Store.commit_bytes` against the requests it made before. Manifests have `--frames` rows each, with
patch lists as a 320x240 frame has them.

    python -m benchmarks.output_bookkeeping [--shards 1000 --frames 64 --latency-ms 20]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import write
from pipeline.deblur.manifests import read_columns
from pipeline.deblur.ray.driver import output_totals
from pipeline.deblur.resume import check_resume
from pipeline.deblur.shard import (
    MADE_WITH_KEY,
    MANIFEST_SCHEMA,
    SOURCE_DIGEST_KEY,
    SOURCE_KEY,
    SOURCE_VERSION_KEY,
    done_shards,
    output_names,
)
from pipeline.formats.shards import Sample, encode_shard
from pipeline.store.digests import digest_of
from pipeline.store.storage import Store
from tests.s3server import S3Server, free_port

MADE_WITH = {"exit": "adaptive", "fingerprint": "bench"}
BOTOCORE_CONNECTIONS = 10  # botocore's own default pool, against pipeline.store.storage.S3_CONNECTIONS


class DelayProxy:
    """A TCP proxy on loopback that holds every chunk a client sends for `delay_s` (a round trip)."""

    def __init__(self, target_port: int, delay_s: float) -> None:
        self.port, self._target, self._delay = free_port(), target_port, delay_s
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()
        self._ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_until_complete(server.serve_forever())

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        await asyncio.gather(self._pipe(reader, up_writer, self._delay), self._pipe(up_reader, writer, 0.0))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def fill(source: Store, output: Store, shards: int, frames: int) -> tuple[list[str], int]:
    """`shards` small input shards and, for each, a manifest of `frames` rows with its resume records."""
    tar = encode_shard([Sample(f"clip_{i:06d}", {"png": bytes(200)}) for i in range(4)])
    digest = json.dumps(asdict(digest_of(io.BytesIO(tar))))
    patches = {"patch_ys": [0, 0, 0, 112, 112, 112], "patch_xs": [0, 96, 192, 0, 96, 192]}
    row = {name: None for name in MANIFEST_SCHEMA.names} | patches
    row |= {"depth_histogram": [0, 2, 1, 2, 1], "patch_size": [128] * 6, "patch_depths": [1, 3, 1, 3, 2, 4]}
    names = [f"frames-{i:06d}.tar" for i in range(shards)]
    source.fs.pipe({source.path(name): tar for name in names})
    manifests = {}
    for name, stat in zip(names, source.stats(names), strict=True):
        rows = [row | {"shard": name, "key": f"clip_{j:06d}", "output_sha256": f"{j:064x}"} for j in range(frames)]
        records = {SOURCE_KEY: source.file_location(name), SOURCE_DIGEST_KEY: digest, SOURCE_VERSION_KEY: stat.version}
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA).replace_schema_metadata(
            records | {MADE_WITH_KEY: json.dumps(MADE_WITH)}
        )
        data = io.BytesIO()
        pq.write_table(table, data)
        manifests[output.path(output_names(name)[1])] = data.getvalue()
    output.fs.pipe(manifests)
    return names, len(data.getvalue())


def per_shard(source: Store, output: Store, shards: list[str]) -> tuple[float, float, int]:
    start = time.perf_counter()
    done = [s for s in shards if output.exists(output_names(s)[1])]
    pq.read_schema(io.BytesIO(output.read_bytes(output_names(done[0])[1])))  # the first done one only
    begin = time.perf_counter() - start
    start = time.perf_counter()
    schema = pa.schema([MANIFEST_SCHEMA.field("depth_histogram")])
    frames = sum(read_columns(output, name, schema)[0].num_rows for name in output.glob("_manifest/**/*.parquet"))
    return begin, time.perf_counter() - start, frames


def ours(source: Store, output: Store, shards: list[str]) -> tuple[float, float, int]:
    start = time.perf_counter()
    finished = done_shards(output, shards)
    check_resume(output, source, [s for s in shards if s in finished], MADE_WITH)
    begin = time.perf_counter() - start
    start = time.perf_counter()
    frames = output_totals(output, 4)["frames"]
    return begin, time.perf_counter() - start, frames


def commits(store: Store, old_way: bool, count: int = 30) -> float:
    """Seconds per commit of a small object: `Store.commit_bytes`, or the requests it made before (a
    `makedirs` before the write and before the move, which s3fs turns into a bucket check, and a check
    for a retried move before every move)."""
    fs, start = store.fs, time.perf_counter()
    for i in range(count):
        name, tmp = store.path(f"commits/{old_way}-{i}.bin"), store.path(f"_tmp/{old_way}-{i}.part")
        if not old_way:
            store.commit_bytes(f"commits/{old_way}-{i}.bin", bytes(1000))
            continue
        fs.makedirs(tmp.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(tmp, bytes(1000))
        fs.makedirs(name.rsplit("/", 1)[0], exist_ok=True)
        if fs.exists(tmp):
            fs.cp_file(tmp, name)
            fs.rm_file(tmp)
    return (time.perf_counter() - start) / count


def through(server: S3Server, port: int, url: str, connections: int | None = None) -> Store:
    """`url` reached through the proxy on `port`; `connections`: botocore's pool (None: the Store's default)."""
    options: dict[str, Any] = server.storage_options
    options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": f"http://127.0.0.1:{port}"}
    if connections:
        options["config_kwargs"] = {"max_pool_connections": connections}
    return Store(url, options)  # another endpoint: another cached filesystem instance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=64, help="manifest rows per shard")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[20.0, 0.0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        server = S3Server(Path(work) / "s3").start()
        try:
            prefix = f"s3://{server.bucket}/bookkeeping"
            direct = Store(f"{prefix}/in", server.storage_options), Store(f"{prefix}/out", server.storage_options)
            started = time.perf_counter()
            shards, manifest_bytes = fill(*direct, args.shards, args.frames)
            print(f"filled {args.shards} shards + manifests in {time.perf_counter() - started:.1f} s")
            rows = []
            for latency in args.latency_ms:
                proxy = DelayProxy(server.port, latency / 1000)
                stores = [through(server, proxy.port, store.url) for store in direct]
                contenders: dict[str, Callable[[Store, Store, list[str]], tuple[float, float, int]]] = {
                    "per_shard": per_shard,
                    "ours": ours,
                }
                times = {name: fn(*stores, shards) for name, fn in contenders.items()}
                botocore = [through(server, proxy.port, store.url, BOTOCORE_CONNECTIONS) for store in direct]
                times["ours_10_connections"] = ours(*botocore, shards)  # before S3_CONNECTIONS was the default
                assert {t[2] for t in times.values()} == {args.shards * args.frames}, times  # both read every row
                row = {
                    "latency_ms": latency,
                    **{
                        f"{name}_{phase}_s": round(t[i], 3)
                        for name, t in times.items()
                        for i, phase in enumerate(("start", "end"))
                    },
                    "start_speedup": round(times["per_shard"][0] / times["ours"][0], 2),
                    "end_speedup": round(times["per_shard"][1] / times["ours"][1], 2),
                    "connections_speedup": [
                        round(times["ours_10_connections"][i] / times["ours"][i], 2) for i in (0, 1)
                    ],
                    "commit_ms_before": round(commits(stores[1], old_way=True) * 1000, 1),
                    "commit_ms_ours": round(commits(stores[1], old_way=False) * 1000, 1),
                }
                print(row)
                rows.append(row)
        finally:
            server.stop()
    write(
        "output_bookkeeping",
        {"shards": args.shards, "frames_per_shard": args.frames, "runs": rows, "manifest_bytes": manifest_bytes},
    )


if __name__ == "__main__":
    main()
