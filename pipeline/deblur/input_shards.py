"""Which input shards a deblur run reads: every `.tar` (or gzip-compressed `.tar.gz`, `.tgz`) under a
folder URL, or the shards a pattern names.

A pattern is a URL ending in `.tar`, with wildcards or WebDataset's brace ranges, or none (one shard):
`s3://archive/frames/video-{000000..000099}.tar`, `s3://archive/frames/*/video-*.tar`. The folder
before the first wildcard is the input's root: shard names (and so output names) are relative to it,
as they are under a folder URL. A brace expansion that names no shard stops the run before anything
starts, naming what is missing: a mistyped range must not quietly deblur a different archive.
A folder's shards under a hidden or underscore name (`_x.tar`, `.cache/y.tar`) are not read, and are
listed as passed over, so a run says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from braceexpand import braceexpand

from adarevd.errors import InvalidInput, NotFound
from pipeline.store.storage import Store, redact

WILDCARDS = "*?[{"
MAX_NAMED = 5  # missing names quoted in an error
SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what a folder run reads; output shards are plain .tar
RUN_FOLDERS = {"_manifest", "_quarantine", "_tmp", "_lock"}  # a deblur output's own, inside the input


@dataclass(frozen=True)
class Listing:
    shards: list[str]  # what the run reads, sorted
    passed_over: dict[str, str] = field(default_factory=dict)  # name -> why it is not read


def shard_stem(name: str) -> str:
    """`a/s-000001` for `a/s-000001.tar`, `.tar.gz` or `.tgz`: the name its output shard takes."""
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def split_input(url: str) -> tuple[str, str | None]:
    """(root folder URL, the pattern relative to it; None for a folder URL). A URL ending in `.tar` is
    a pattern (or one shard); any other is a folder, whatever characters its names hold."""
    if not url.rstrip("/").endswith(".tar"):
        return url, None
    first = min((i for i, c in enumerate(url) if c in WILDCARDS), default=len(url))
    cut = url.rfind("/", 0, first)
    if cut == -1 and "://" not in url:
        return ".", url  # shards in the working directory
    root = url[:cut] if cut > 0 else ""
    if root.rstrip("/") == "" or root.rstrip("/").endswith(":"):  # '/', 's3:/', 'file://'
        raise InvalidInput(
            f"{redact(url)}: a shard pattern starts with the folder (or bucket) its shards are in; its "
            "first wildcard or brace comes after that"
        )
    return root, url[cut + 1 :]


def list_shards(source: Store, pattern: str | None = None) -> list[str]:
    """Shard names relative to `source`, sorted: every shard below it (`list_folder`), or those
    `pattern` names."""
    return list_folder(source).shards if pattern is None else _named(source, pattern)


def list_folder(source: Store) -> Listing:
    """Every `.tar`, `.tar.gz` and `.tgz` file below `source`. Passed over, with the reason: those under a
    hidden or underscore name (a user's private files; a deblur output's own are not named), and
    entries that are not files (a folder named `x.tar`). Two shards of one stem are refused."""
    found, others = source.glob_files("**/*.t*")  # one listing for .tar, .tar.gz and .tgz
    files = {name for name in found if name.endswith(SUFFIXES)}
    passed_over = {name: "not a file" for name in others if name.endswith(SUFFIXES)}
    for name in sorted(files):
        parts = name.split("/")
        if any(part.startswith(("_", ".")) for part in parts):
            files.discard(name)
            if not RUN_FOLDERS & set(parts):
                passed_over[name] = "a hidden or _ name"
    shards = sorted(files)
    passed_over = dict(sorted(passed_over.items()))
    if not shards:
        there = "no .tar, .tar.gz or .tgz shards found" if source.exists("") else "no such folder"
        first = next(iter(passed_over.items()), None)
        under = f" ({len(passed_over)} not read, e.g. {first[0]}: {first[1]})" if first else ""
        raise NotFound(f"{redact(source.url)}: {there}{under}; run `adarevd ingest` first, or mend the URL")
    stems: dict[str, str] = {}
    for name in shards:
        if (other := stems.setdefault(shard_stem(name), name)) != name:
            raise InvalidInput(
                f"{redact(source.url_of(name))} and {other} would both be written as {shard_stem(name)}.tar; "
                "keep one of them in the input folder"
            )
    return Listing(shards, passed_over)


def _named(source: Store, pattern: str) -> list[str]:
    found: set[str] = set()
    missing: list[str] = []
    for name in braceexpand(pattern):
        if not name.endswith(".tar"):
            raise InvalidInput(f"{redact(source.url_of(name))}: a shard pattern must name .tar files")
        matched = _matches(source, name)
        found.update(matched)
        if not matched:
            missing.append(name)
    if missing:
        more = len(missing) - MAX_NAMED
        named = ", ".join(missing[:MAX_NAMED]) + (f" and {more} more" if more > 0 else "")
        raise NotFound(
            f"{redact(source.url)}: {len(missing)} of the shards {pattern} names do not exist ({named}); "
            "mend the pattern, or give the folder URL to take every shard in it"
        )
    return sorted(found)


def without_output(shards: list[str], source: Store, output: Store) -> list[str]:
    """`shards` (names in `source`) less those in the output folder, where it lies inside the input folder
    (`frames/` and `frames/deblurred/`: a re-run must not take the results for input). Raises if an
    output shard would be written over an input shard, as when the two folders are one."""
    (protocol, src), (out_protocol, out) = source.location(), output.location()
    if protocol != out_protocol:
        return shards
    inside = _relative(out, src)
    if inside:
        shards = [name for name in shards if not name.startswith(inside + "/")]
    names = set(shards)
    clash = [name for name in shards if _relative(f"{out}/{name}", src) in names]
    if clash:
        raise InvalidInput(
            f"{redact(output.url_of(clash[0]))}: the deblurred shard would be written over an input shard "
            f"({len(clash)} of {len(shards)} would be); give an output folder that is not the input folder, "
            f"e.g. {redact(source.url)}-deblurred"
        )
    return shards


def _relative(path: str, folder: str) -> str | None:
    """`path` relative to `folder` ('' for the folder itself), or None if it lies outside."""
    if path == folder:
        return ""
    prefix = folder.rstrip("/") + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


def _matches(source: Store, name: str) -> list[str]:
    """The shards one brace expansion names: a glob's matches (but a run's own `_*`/`.*` files), or the
    name if it exists."""
    if any(c in name for c in "*?["):
        return _inputs(source.glob(name))
    return [name] if source.exists(name) else []


def _inputs(names: list[str]) -> list[str]:
    """Without a run's own files (`_manifest/`, `_quarantine/`, `.tmp`...), should the input hold any."""
    return [name for name in names if not name.startswith(("_", "."))]
