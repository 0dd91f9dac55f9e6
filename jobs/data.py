"""`adarevd ingest` and `adarevd synth`: the data-plane commands."""

from __future__ import annotations

import argparse
import re
import sys

from tqdm import tqdm

from pipeline.ingest import IngestConfig, ingest
from pipeline.sink import ShardLimits
from pipeline.storage import Store, parse_storage_options

SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def byte_size(text: str) -> int:
    """'512M', '1GiB', '2000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 512M or 1G, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def add_storage_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec option for every URL (repeatable; dotted keys nest: client_kwargs.endpoint_url=http://...)",
    )


def add_parsers(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser(
        "ingest",
        help="videos, image folders and shards -> WebDataset frame shards + _index.parquet",
        description="Decode videos (mp4, mkv, avi, ...), image folders (one folder = one frame sequence) and "
        "existing .tar shards from any fsspec URL (local, s3://, gs://, memory://; globs and {000..009} "
        "patterns) into shards <prefix>-000000.tar ... and an index, under OUTPUT.",
    )
    i.add_argument("sources", nargs="+", metavar="SRC", help="file, folder, glob or brace pattern (any fsspec URL)")
    i.add_argument("--output", required=True, help="output folder URL")
    i.add_argument("--format", default="png", choices=["png", "jpg"], help="image member (default: lossless png)")
    i.add_argument("--quality", type=int, default=95, help="JPEG quality 1..100 (default: %(default)s)")
    i.add_argument("--prefix", default="frames", help="shard name prefix (default: %(default)s)")
    i.add_argument("--max-frames-per-shard", type=int, default=1000, help="(default: %(default)s)")
    i.add_argument("--max-shard-bytes", type=byte_size, default="512M", help="e.g. 512M, 1G (default: 512M)")
    i.add_argument("--fps", type=float, default=None, help="frame rate of image folders (sets pts_ms)")
    i.add_argument("--workers", type=int, default=0, help="encode threads (default: one per CPU)")
    i.add_argument("--overwrite", action="store_true", help="replace an earlier ingest in OUTPUT")
    add_storage_option(i)
    i.set_defaults(run=cmd_ingest)


def cmd_ingest(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_option)
    config = IngestConfig(
        image_format=args.format,
        quality=args.quality,
        prefix=args.prefix,
        limits=ShardLimits(args.max_frames_per_shard, args.max_shard_bytes),
        fps=args.fps,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    with tqdm(unit=" frames", desc="ingest", file=sys.stderr, disable=None) as bar:
        summary = ingest(args.sources, Store(args.output, options), config, options=options, progress=bar.update)
    for line in summary.lines():
        print(line)
    if summary.frames == 0:
        print("adarevd ingest: nothing could be ingested (see the reasons above)", file=sys.stderr)
        return 1
    print(f"wrote {len(summary.shards)} shard(s) and _index.parquet to {args.output}")
    return 0
