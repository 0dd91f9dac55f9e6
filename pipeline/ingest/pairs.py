"""`adarevd ingest-pairs`: a paired deblurring dataset on disk -> the paired shards that `eval`,
`calibrate` and `train` read (`blur.png` + `sharp.png` per sample).

The usual layout is GoPro's: one folder per sequence, each with `blur/` and `sharp/` holding frames of
the same names (`GOPRO_Large/test/GOPR0384_11_00/blur/000001.png`). Any pair of folder names works
(`--blur-dir input --sharp-dir target`). Every folder below the root that has both is a sequence; its
frames pair by file name. A frame without its partner, or with another size, is named and left out;
the rest is written. PNG members are copied byte for byte; other formats are decoded and stored as
PNG (lossless). Sequences and frames go in name order, so the same tree gives the same shards.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from adarevd.errors import InvalidInput, NotFound
from pipeline.formats import images
from pipeline.formats.sharded_run import ShardedOutput, ShardedRun
from pipeline.formats.shards import Sample, check_key
from pipeline.formats.sink import ShardLimits
from pipeline.ingest.run import INDEX_NAME
from pipeline.store.scratch import scratch
from pipeline.store.storage import Store


@dataclass(frozen=True, kw_only=True)
class PairsConfig:
    blur_dir: str = "blur"
    sharp_dir: str = "sharp"
    prefix: str = "pairs"
    limits: ShardLimits = field(default_factory=ShardLimits)

    def __post_init__(self) -> None:
        for name in (self.blur_dir, self.sharp_dir):
            if not name or "/" in name or name in (".", ".."):
                raise InvalidInput(f"--blur-dir / --sharp-dir take a folder name, got {name!r}")
        check_key(self.prefix)


@dataclass(frozen=True)
class Pair:
    key: str
    sequence: str  # the sequence folder, relative to the root
    name: str  # the frame's file name
    blur: str  # paths relative to the root
    sharp: str


@dataclass
class PairsReport:
    pairs: int = 0
    shards: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)  # path -> why


def find_pairs(root: Store, config: PairsConfig) -> tuple[list[Pair], dict[str, str]]:
    """Every (blur, sharp) frame pair below `root`, in name order, and what was left out and why."""
    files = [f for f in root.glob("**/*") if posixpath.splitext(f)[1].lower() in images.IMAGE_SUFFIXES]
    by_folder: dict[str, dict[str, str]] = {}
    for path in files:
        folder, name = posixpath.split(path)
        by_folder.setdefault(folder, {})[name] = path
    pairs: list[Pair] = []
    left_out: dict[str, str] = {}
    for folder in sorted(by_folder):
        parent, kind = posixpath.split(folder)
        if kind != config.blur_dir:
            continue
        sharp = by_folder.get(posixpath.join(parent, config.sharp_dir), {})
        blurry = by_folder[folder]
        for name in sorted(set(blurry) | set(sharp)):
            if name not in sharp:
                left_out[blurry[name]] = f"no {config.sharp_dir}/{name} beside it"
            elif name not in blurry:
                left_out[sharp[name]] = f"no {config.blur_dir}/{name} beside it"
            else:
                key = _key(parent, name)
                pairs.append(Pair(key, parent, name, blurry[name], sharp[name]))
    if not pairs:
        raise NotFound(
            f"{root.url}: no frame pairs: no folder below it has both {config.blur_dir}/ and {config.sharp_dir}/ "
            "with images of the same names; name the folders with --blur-dir and --sharp-dir"
        )
    keys = [p.key for p in pairs]
    if len(set(keys)) != len(keys):
        raise InvalidInput(f"{root.url}: two pairs make one key ({_first_repeat(keys)}); rename one of them")
    return pairs, left_out


def ingest_pairs(
    root: Store,
    output: Store,
    config: PairsConfig,
    progress: Callable[[int], None] | None = None,
    *,
    overwrite: bool = False,
) -> PairsReport:
    """Write the pairs under `root` to `output` as shards + an index (under `output`'s lease)."""
    pairs, left_out = find_pairs(root, config)
    report = PairsReport(left_out=left_out)
    spec = ShardedOutput(
        output=output,
        prefix=config.prefix,
        kind="pairs",
        limits=config.limits,
        overwrite=overwrite,
        earlier_index=INDEX_NAME,
    )
    rows = []
    with ShardedRun(spec) as run, scratch("index") as tmp:
        for pair in pairs:
            members = {}
            try:
                sizes = []
                for member, path in (("blur.png", pair.blur), ("sharp.png", pair.sharp)):
                    data, size = _png(root.read_bytes(path))
                    members[member] = data
                    sizes.append(size)
                if sizes[0] != sizes[1]:
                    raise ValueError(
                        f"{config.blur_dir} is {sizes[0][1]}x{sizes[0][0]}, {config.sharp_dir} "
                        f"is {sizes[1][1]}x{sizes[1][0]}"
                    )
            except (ValueError, images.ImageError) as e:
                report.left_out[pair.blur] = str(e)
                continue
            shard = run.add(Sample(pair.key, members))
            rows.append({"shard": shard, "key": pair.key, "sequence": pair.sequence, "name": pair.name})
            report.pairs += 1
            if progress:
                progress(1)
        local = os.path.join(tmp, INDEX_NAME)
        pq.write_table(pa.Table.from_pylist(rows), local)
        report.shards = run.finish(INDEX_NAME, local)
    return report


def _png(data: bytes) -> tuple[bytes, tuple[int, int]]:
    """The image as PNG bytes (a PNG as it is) and its (height, width)."""
    bgr, _ = images.decode(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data, bgr.shape[:2]
    return images.encode(bgr), bgr.shape[:2]


def _key(sequence: str, name: str) -> str:
    """`<sequence>/<frame>` with dots and other odd characters made `_` (a WebDataset key)."""
    stem = posixpath.splitext(name)[0]
    parts = [re.sub(r"[^A-Za-z0-9_-]+", "_", p) for p in [*sequence.split("/"), stem] if p]
    return check_key("/".join(parts))


def _first_repeat(keys: list[str]) -> str:
    seen: set[str] = set()
    return next(k for k in keys if k in seen or seen.add(k))  # type: ignore[func-returns-value]
