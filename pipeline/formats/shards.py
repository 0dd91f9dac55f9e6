"""WebDataset shards: a byte-reproducible writer, a safe streaming reader, and fsspec URLs for webdataset.

A sample is a key plus members (`{"png": b"...", "json": b"..."}`), stored as tar entries
`<key>.<member>`. The writer fixes everything a tar records besides names and bytes (mtime 0, uid/gid
0, no user/group names, mode 0644, members sorted), so the same samples always give the same bytes.
The reader streams a tar from any file object, groups entries by key the way webdataset does (key =
path up to the first dot of the file name), and refuses links, devices and paths that climb out
(`..`, absolute), naming the shard and the entry.
"""

from __future__ import annotations

import importlib
import io
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import fsspec

from adarevd.errors import InvalidInput, UserError

MAX_MEMBER_BYTES = 2**30  # one member (an image) of a shard; a compressed shard could expand without bound


class ShardError(UserError):
    """A shard that cannot be read as WebDataset (message names the shard, entry and what to do)."""


@dataclass(frozen=True)
class Sample:
    key: str
    members: Mapping[str, bytes]

    @property
    def nbytes(self) -> int:
        return sum(len(v) for v in self.members.values())


def split_name(name: str) -> tuple[str, str]:
    """'dir/abc_000001.blur.png' -> ('dir/abc_000001', 'blur.png'): webdataset's key convention."""
    folder, base = posixpath.split(name)
    stem, dot, member = base.partition(".")
    if not dot or not stem or not member:
        raise InvalidInput(f"{name!r} is not <key>.<member>")
    return posixpath.join(folder, stem) if folder else stem, member


def check_key(key: str) -> str:
    """Raise ValueError unless `key` is usable as a WebDataset key and as a relative output path."""
    if not key or key.startswith("/") or "\\" in key:
        raise InvalidInput(f"key {key!r} is empty, absolute or has a backslash")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidInput(f"key {key!r} has an empty, '.' or '..' path part")
    if "." in posixpath.basename(key):
        raise InvalidInput(f"key {key!r} has a dot; WebDataset would split the member name there")
    if any("\udc80" <= c <= "\udcff" for c in key):  # how tarfile decodes bytes that are not UTF-8
        raise InvalidInput(f"key {key!r} has bytes that are not UTF-8")
    if not key.isprintable():
        raise InvalidInput(f"key {key!r} has control characters")
    return key


class TarShardWriter:
    """Writes samples into one tar stream, reproducibly. Use as a context manager or call close()."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._tar = tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed by close()
        self.samples = 0

    def write(self, sample: Sample) -> int:
        check_key(sample.key)
        for member in sorted(sample.members):
            data = sample.members[member]
            info = tarfile.TarInfo(f"{sample.key}.{member}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        return sample.nbytes

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_shard(samples: list[Sample]) -> bytes:
    buffer = io.BytesIO()
    with TarShardWriter(buffer) as writer:
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def sample_meta(sample: Sample) -> dict[str, Any]:
    """The sample's `json` member as a dict; {} when it is missing or not a JSON object."""
    try:
        loaded = json.loads(sample.members.get("json") or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def iter_samples(
    stream: IO[bytes], shard: str, on_bad_entry: Callable[[ShardError], None] | None = None
) -> Iterator[Sample]:
    """Samples of one tar stream in file order. Raises ShardError (naming `shard`) on a corrupt or
    truncated tar, a link/device entry or an unsafe path. Samples that came before the fault have been
    yielded by then. A key that comes back after other keys yields a second sample (callers dedupe).
    With `on_bad_entry`, an entry that is refused for its name or type (never extracted) goes to it
    and reading goes on; a damaged tar still raises."""
    key: str | None = None
    members: dict[str, bytes] = {}
    tainted: str | None = None  # a key whose sample lost an entry: left out whole
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:  # plain, or gzip/bz2/xz-compressed
            for info in tar:
                if info.isdir():
                    continue
                try:
                    entry_key, member = split_name(info.name)
                    check_key(entry_key)
                    if not info.isfile():
                        raise ValueError("is a link or device; shards may hold files only")
                    if info.size > MAX_MEMBER_BYTES:
                        raise ValueError(f"holds {info.size} bytes, over the {MAX_MEMBER_BYTES} a member may hold")
                except ValueError as e:
                    # The sample before a bad entry is complete unless the bad entry belongs to it.
                    ours = key is not None and info.name.startswith(key + ".")
                    if key is not None and not ours:
                        yield Sample(key, members)
                    if on_bad_entry is None:
                        raise ShardError(f"{shard}: entry {info.name!r}: {e}") from None
                    left_out = f"; sample {key!r} is left out with it" if ours else ""
                    on_bad_entry(ShardError(f"{shard}: entry {info.name!r}: {e}; skipped{left_out}"))
                    tainted, key, members = (key if ours else None), None, {}
                    continue
                if entry_key == tainted:
                    continue
                tainted = None
                if entry_key != key:
                    if key is not None:
                        yield Sample(key, members)
                    key, members = entry_key, {}
                if member in members:
                    raise ShardError(f"{shard}: entry {info.name!r} appears twice")
                handle = tar.extractfile(info)
                assert handle is not None  # regular files always have data
                members[member] = handle.read()
    except (tarfile.TarError, EOFError) as e:
        # A sample cut off by the damage is not yielded: it may lack members.
        raise ShardError(f"{shard}: not a readable tar ({e}); re-create or re-copy this shard") from e
    if key is not None:
        yield Sample(key, members)


# --- webdataset on fsspec URLs ------------------------------------------------------------------------

FSSPEC_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "memory", "hf")


def use_fsspec_for_webdataset(storage_options: Mapping[str, Any] | None = None) -> None:
    """Let `webdataset.WebDataset("s3://...")` (and gs, az, memory) open shards through fsspec with these
    options. webdataset 1.0.2 has no s3 handler; it dispatches on `webdataset.gopen.gopen_schemes`."""
    gopen = importlib.import_module("webdataset.gopen")  # the module (the package also exports a function gopen)
    options = dict(storage_options or {})

    def open_with_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> IO[bytes]:
        return fsspec.open(url, mode, **options).open()

    for scheme in FSSPEC_SCHEMES:
        gopen.gopen_schemes[scheme] = open_with_fsspec
