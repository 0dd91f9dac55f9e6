"""Whether an output may take a run: a resume must not skip another input's shards nor mix other
weights or options (`check_resume`); a folder of another dataset's shards is not overwritten
(`refuse_foreign`).

A done shard's manifest records its input shard (place, size, sha256) and `DeblurJob.made_with`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import pyarrow.parquet as pq

from adarevd.errors import AlreadyExists, InvalidInput
from pipeline.deblur.shard import (
    MADE_WITH_KEY,
    MANIFEST_DIR,
    RUN_FILE,
    SOURCE_DIGEST_KEY,
    SOURCE_KEY,
    SOURCE_VERSION_KEY,
    output_names,
)
from pipeline.store.digests import Digest, digest_of
from pipeline.store.lease import UNFINISHED
from pipeline.store.storage import FileStat, Store, redact

FOOTER_READ = 64 << 10  # bytes read from a manifest's end: its Parquet footer, with the records
HASH_THREADS = 4  # input shards read at once to check they did not change


@dataclass(frozen=True)
class _DoneShard:
    """What a done shard's manifest recorded of its input, and that input shard now."""

    shard: str
    here: str  # where this run reads the input shard
    came_from: str  # "" in a manifest from before the record
    digest: Digest | None
    version: str  # "" in a manifest from before the record
    made_with: dict[str, Any]
    now: FileStat | None  # None when there is no digest to compare it with

    @property
    def elsewhere(self) -> bool:
        return bool(self.came_from) and self.came_from != self.here

    @property
    def resized(self) -> bool:
        """The input shard's size is not the recorded one (so it is another file)."""
        return self.digest is not None and self.now is not None and self.now.size != self.digest.size

    @property
    def rewritten(self) -> bool:
        """The input shard, where it was read, was written again since (its bytes may be the same)."""
        return (
            bool(self.version)
            and not self.elsewhere
            and not self.resized
            and self.now is not None
            and (self.now.version != self.version)
        )


def footer_metadata(output: Store, name: str, tail: bytes) -> dict[str, str]:
    """The key-value metadata of a Parquet file from its last bytes (the whole file read where its
    footer is longer than `tail`)."""
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise InvalidInput(
            f"{redact(output.url_of(name))}: not a Parquet file (a damaged manifest); remove it to redo its shard"
        )
    length = int.from_bytes(tail[-8:-4], "little")
    footer = b"PAR1" + tail[-(length + 8) :] if length + 8 <= len(tail) else output.read_bytes(name)
    raw = pq.read_schema(io.BytesIO(footer)).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}


def _done_shards(output: Store, source: Store, done: list[str]) -> list[_DoneShard]:
    manifests = [output_names(shard)[1] for shard in done]
    records = [footer_metadata(output, name, tail) for name, tail in output.read_many(manifests, tail=FOOTER_READ)]
    digests = [Digest(**json.loads(r[SOURCE_DIGEST_KEY])) if r.get(SOURCE_DIGEST_KEY) else None for r in records]
    measured = [shard for shard, digest in zip(done, digests, strict=True) if digest]
    stats = dict(zip(measured, source.stats(measured), strict=True))
    return [
        _DoneShard(
            shard,
            source.file_location(shard),
            record.get(SOURCE_KEY, ""),
            digest,
            record.get(SOURCE_VERSION_KEY, ""),
            json.loads(record.get(MADE_WITH_KEY, "{}")),
            stats.get(shard),
        )
        for shard, record, digest in zip(done, records, digests, strict=True)
    ]


def check_resume(output: Store, source: Store, done: list[str], made_with: Mapping[str, Any]) -> str | None:
    """Raise unless every done shard's manifest says it came from this run's input shard of its name,
    made as this run makes it: a resume must not skip another input's shard of the same name, nor mix
    outputs of other weights or options. A done shard's input is the recorded one when its size is the
    same, and its sha256 too where that is in doubt. In doubt: a shard that lies elsewhere than recorded
    (another folder's shard of the same name and size is no proof of a move), and one written again
    since it was read (its version changed). Each such shard is read. The same bytes at another place
    are a moved input, whose recorded place is returned. Manifests written before these records existed
    are checked for what they hold. The manifests' footers and the input stats are asked for many at a
    time."""
    records = _done_shards(output, source, done)
    doubtful = [r.shard for r in records if r.digest is not None and (r.rewritten or (r.elsewhere and not r.resized))]
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        rehashed = dict(zip(doubtful, pool.map(partial(_input_digest, source), doubtful), strict=True))
    changed = sum(r.resized or (r.shard in rehashed and rehashed[r.shard] != r.digest) for r in records)
    moved: str | None = None
    for record in records:
        manifest = output.url_of(output_names(record.shard)[1])
        if record.digest is not None:
            now = rehashed.get(record.shard)
            if record.resized or (now is not None and now != record.digest):
                redo = "" if record.elsewhere else ", or remove the manifests of the shards that changed to redo them"
                raise AlreadyExists(
                    f"{redact(manifest)}: {record.shard} was deblurred from {record.came_from} ({record.digest}); "
                    f"this run's {record.here} ({now or f'{record.now.size if record.now else None} bytes'}) is "
                    f"another file, and would be skipped as done{_how_many(changed, len(done))}; give another "
                    f"output folder{redo}"
                )
        elif record.elsewhere:
            raise AlreadyExists(
                f"{redact(manifest)}: {record.shard} was deblurred from {record.came_from}, not from this run's "
                f"{record.here}, and would be skipped as done; give another output folder"
            )
        moved = moved or (record.came_from if record.elsewhere else None)
        other = _differences(record.made_with, made_with)
        if other:
            raise InvalidInput(
                f"{redact(output.url)}: its shards were deblurred with {', '.join(other)}; resuming would mix "
                "the two in one output. Give another output folder, or the same options to resume"
            )
    return moved


def _differences(recorded: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    """`name 'then' (this run: 'now')` for each field both record and that differs; a table's fields
    (`model_config`) are named one by one. A field the manifest does not record (an older one) is not
    compared."""
    found = []
    for key, value in now.items():
        if key not in recorded or recorded[key] == value:
            continue
        if isinstance(value, Mapping) and isinstance(recorded[key], Mapping):
            found += _differences(recorded[key], value, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key} {recorded[key]!r} (this run: {value!r})")
    return found


def _how_many(changed: int, done: int) -> str:
    return f" ({changed} of the {done} done shards changed)" if changed > 1 else ""


def _input_digest(source: Store, shard: str) -> Digest:
    with source.open(shard) as stream:
        return digest_of(stream)


def refuse_foreign(output: Store, shards: list[str]) -> None:
    """Raise if `output` holds shards at the names these input shards write to while no deblur run has
    written it (no `_manifest/`, `_run.json` or `_lock/unfinished`, which a run that failed, stopped or died
    leaves): another dataset's shards, which the run would replace."""
    if not shards or any(output.exists(name) for name in (MANIFEST_DIR, RUN_FILE, UNFINISHED)):
        return
    there = set(output.glob("**/*.tar"))
    foreign = [shard for shard in shards if output_names(shard)[0] in there]
    if foreign:
        raise AlreadyExists(
            f"{redact(output.url_of(output_names(foreign[0])[0]))}: the output folder already holds this shard "
            f"({len(foreign)} of the {len(shards)} this run writes) but no deblur run's _manifest/ or {RUN_FILE}, so "
            "they are not deblurred output and the run would replace them; give an empty folder or an earlier "
            "deblur output"
        )


def space_short(source: Store, output: Store, todo: Sequence[str]) -> str:
    """A warning when the output's disk has less free space than the shards left to deblur take (the
    output takes about as much as its input); "" when it has enough, or is an object store."""
    free = output.free_bytes()
    if free is None or not todo:
        return ""
    needed = sum(stat.size for stat in source.stats(todo))
    if free >= needed:
        return ""
    return (
        f"{redact(output.url)}: {megabytes(free)} free on its disk; the {len(todo)} shard(s) left take "
        f"{megabytes(needed)} as input and about as much as output. The run stops when the disk is full; "
        "what it committed by then stays, and a re-run after freeing space goes on from there"
    )


def megabytes(size: int) -> str:
    """A size for a message: `412.3 MB`."""
    return f"{size / 1e6:,.1f} MB"
