"""`adarevd ingest`, `adarevd synth` and `adarevd assemble`: the data-plane commands."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tqdm import tqdm

from adarevd.errors import InvalidInput
from pipeline.assemble import AssembleOptions, assemble
from pipeline.formats import video
from pipeline.formats.sink import ShardLimits
from pipeline.ingest.pairs import PairsConfig, ingest_pairs
from pipeline.ingest.run import IngestConfig, ingest
from pipeline.store.storage import Store, parse_storage_options
from pipeline.synth.blur import BlurSpec
from pipeline.synth.pairs import ClipConfig, SynthConfig, write_clip, write_pairs
from pipeline.synth.scenes import SAMPLE_IMAGES

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


def add_take_over(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--take-over",
        action="store_true",
        help="take the output over from a run that holds its lease (only when you know that run died on "
        "another machine; one on this machine, or silent for 120 s, is taken over without it)",
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
    i.add_argument(
        "--jpeg-quality", "--quality", dest="quality", type=int, default=95, help="1..100 (default: %(default)s)"
    )
    i.add_argument(
        "--prefix",
        default="frames",
        help="shard name prefix (default: %(default)s); another one adds shards beside an earlier ingest's",
    )
    i.add_argument("--max-frames-per-shard", type=int, default=1000, help="(default: %(default)s)")
    i.add_argument("--max-shard-bytes", type=byte_size, default="512M", help="e.g. 512M, 1G (default: 512M)")
    i.add_argument("--fps", type=float, default=None, help="frame rate of image folders (sets pts_ms)")
    i.add_argument(
        "--threads", "--workers", dest="workers", type=int, default=0, help="encode threads (default: one per CPU)"
    )
    i.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier ingest of this --prefix in OUTPUT (other prefixes' shards and rows stay)",
    )
    add_take_over(i)
    add_storage_option(i)
    i.set_defaults(run=cmd_ingest)

    s = sub.add_parser(
        "synth",
        help="synthetic paired blur shards (blur.png, sharp.png, json) and/or a blurry video clip",
        description="Blur crops of scikit-image's sample images with a moving camera and a moving object, "
        "averaged in linear light (the GoPro recipe); ground truth = the middle sub-frame. Same seed, same bytes.",
    )
    s.add_argument("--output", help="folder URL for paired shards pairs-000000.tar ... + _index.parquet")
    s.add_argument("--count", type=int, default=64, help="pairs to make (default: %(default)s)")
    s.add_argument("--size", type=frame_size, default=(256, 256), help="WIDTHxHEIGHT (default: 256x256)")
    s.add_argument("--seed", type=int, default=0, help="pair i uses seed + i (default: %(default)s)")
    s.add_argument("--sub-frames", type=int, default=15, help="N sub-frames averaged per frame (default: 15)")
    s.add_argument("--max-pan", type=float, default=32.0, help="camera travel per frame, pixels (default: 32)")
    s.add_argument("--noise", type=float, default=0.0, help="Gaussian noise sigma on the blurry frame, 0..1")
    s.add_argument(
        "--jpeg-quality", "--jpeg", dest="jpeg", type=int, default=None, help="JPEG-compress the blurry frame (1..100)"
    )
    s.add_argument("--patch-size", type=int, default=64, help="tile size of the per-patch PSNR grid")
    s.add_argument("--scenes", default=",".join(SAMPLE_IMAGES), help="comma-separated scikit-image samples")
    s.add_argument("--max-frames-per-shard", type=int, default=1000)
    s.add_argument("--overwrite", action="store_true", help="replace an earlier set of pairs in --output")
    s.add_argument("--video", type=Path, help="also write a blurry clip (.mp4 H.264, .mkv lossless FFV1, .avi MJPG)")
    s.add_argument("--video-sharp", type=Path, help="and its sharp ground truth here")
    s.add_argument("--video-frames", type=int, default=48, help="clip length in frames (default: 48)")
    s.add_argument("--video-size", type=frame_size, default=(240, 320), help="clip WIDTHxHEIGHT (default: 320x240)")
    s.add_argument("--fps", type=float, default=12.0, help="clip frame rate (default: 12)")
    s.add_argument("--video-scene", default="astronaut", choices=SAMPLE_IMAGES, help="clip scene")
    add_take_over(s)
    add_storage_option(s)
    s.set_defaults(run=cmd_synth)

    pp = sub.add_parser(
        "ingest-pairs",
        help="a paired dataset (GoPro's blur/ + sharp/ per sequence) -> paired shards for eval, calibrate, train",
        description="Every folder below ROOT that holds both --blur-dir and --sharp-dir is a sequence; its "
        "frames pair by file name. Writes blur.png + sharp.png per sample, as shards and an index, to OUTPUT.",
    )
    pp.add_argument("root", metavar="ROOT", help="the dataset's folder (any fsspec URL), e.g. GOPRO_Large/test")
    pp.add_argument("--output", required=True, help="output folder URL")
    pp.add_argument("--blur-dir", default="blur", help="the blurry frames' folder name (default: %(default)s)")
    pp.add_argument("--sharp-dir", default="sharp", help="the sharp frames' folder name (default: %(default)s)")
    pp.add_argument("--prefix", default="pairs", help="shard name prefix (default: %(default)s)")
    pp.add_argument("--max-frames-per-shard", type=int, default=1000, help="(default: %(default)s)")
    pp.add_argument("--overwrite", action="store_true", help="replace an earlier ingest of this --prefix in OUTPUT")
    add_storage_option(pp)
    pp.set_defaults(run=cmd_ingest_pairs)

    a = sub.add_parser("assemble", help="the frames of one video, from output (or ingested) shards, into a video file")
    a.add_argument("input", help="folder URL of shards (adarevd deblur output, or adarevd ingest output)")
    a.add_argument("--video", required=True, help="video_id (the key prefix: <video_id>_<frame>)")
    a.add_argument(
        "--output",
        "--to",
        dest="to",
        required=True,
        help="video file (path or URL): .mkv (lossless FFV1 by default), .mp4 (H.264 by default), .avi (MJPG)",
    )
    add_encoding_options(a)
    a.add_argument("--source", help="the source video (path or URL): checks the frame count and copies its audio")
    a.add_argument("--image-member", help="the image member, when a sample has several")
    a.add_argument(
        "--constant-rate", action="store_true", help="write at the nominal fps even where the source's timing varies"
    )
    a.add_argument("--overwrite", action="store_true", help="replace the --output file if it exists")
    add_storage_option(a)
    a.set_defaults(run=cmd_assemble)


def add_encoding_options(parser: argparse.ArgumentParser) -> None:
    """--codec, --crf, --preset, --pix-fmt: how frames become a video (`formats.video.Encoding`)."""
    parser.add_argument(
        "--codec", choices=sorted(video.CODECS), help="default: from the suffix (.mkv ffv1, .mp4 h264, .avi mjpg)"
    )
    parser.add_argument("--crf", type=int, help="h264/hevc quality, 0 (best) .. 51 (default: 14)")
    parser.add_argument("--preset", help="h264/hevc speed preset, ultrafast .. veryslow (default: slow)")
    parser.add_argument("--pix-fmt", help="output pixel format, e.g. yuv444p or yuv420p10le (default: the codec's)")


def encoding_from(args: argparse.Namespace) -> video.Encoding:
    return video.Encoding(codec=args.codec, crf=args.crf, preset=args.preset, pix_fmt=args.pix_fmt)


def frame_size(text: str) -> tuple[int, int]:
    """'320x240' -> (240, 320): (height, width)."""
    match = re.fullmatch(r"(\d+)[xX](\d+)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 320x240, got {text!r}")
    return int(match.group(2)), int(match.group(1))


def cmd_assemble(args: argparse.Namespace) -> int:
    store = Store(args.input, parse_storage_options(args.storage_option))
    source = args.source
    options = AssembleOptions(
        encoding=encoding_from(args),
        source=source,
        image=args.image_member,
        constant_rate=args.constant_rate,
        overwrite=args.overwrite,
    )
    done = assemble(store, args.video, args.to, options)
    audio = f", audio from {source}" if source else ""
    timing = "; variable frame rate: each frame at its source timestamp" if done.variable_rate else ""
    print(f"wrote {args.to}: {done.frames} frames of {args.video}{audio}{timing}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    if args.output is None and args.video is None:
        raise InvalidInput("nothing to do: give --output (paired shards) and/or --video (a blurry clip)")
    spec = BlurSpec(sub_frames=args.sub_frames, max_pan=args.max_pan, noise_sigma=args.noise)
    if args.output is not None:
        config = SynthConfig(
            count=args.count,
            size=args.size,
            seed=args.seed,
            scenes=tuple(n.strip() for n in args.scenes.split(",") if n.strip()),
            spec=spec,
            jpeg_quality=args.jpeg,
            patch_size=args.patch_size,
            limits=ShardLimits(max_samples=args.max_frames_per_shard),
        )
        store = Store(args.output, parse_storage_options(args.storage_option))
        with tqdm(total=config.count, unit=" pairs", desc="synth", file=sys.stderr, disable=None) as bar:
            shards = write_pairs(store, config, progress=bar.update, overwrite=args.overwrite, take_over=args.take_over)
        print(f"wrote {config.count} pairs in {len(shards)} shard(s) and _index.parquet to {args.output}")
    if args.video is not None:
        clip = ClipConfig(args.video_scene, args.video_frames, args.fps, args.video_size, args.seed, spec)
        count = write_clip(args.video, clip, args.video_sharp)
        print(
            f"wrote a {count}-frame blurry clip to {args.video}"
            + (f" (sharp: {args.video_sharp})" if args.video_sharp else "")
        )
    return 0


def cmd_ingest_pairs(args: argparse.Namespace) -> int:
    options = parse_storage_options(args.storage_option)
    config = PairsConfig(
        blur_dir=args.blur_dir,
        sharp_dir=args.sharp_dir,
        prefix=args.prefix,
        limits=ShardLimits(max_samples=args.max_frames_per_shard),
    )
    with tqdm(unit=" pairs", desc="ingest-pairs", file=sys.stderr, disable=None) as bar:
        report = ingest_pairs(
            Store(args.root, options), Store(args.output, options), config, bar.update, overwrite=args.overwrite
        )
    print(f"wrote {report.pairs} pairs in {len(report.shards)} shard(s) and _index.parquet to {args.output}")
    for path, why in list(report.left_out.items())[:10]:
        print(f"left out {path}: {why}")
    if len(report.left_out) > 10:
        print(f"left out {len(report.left_out) - 10} more")
    print(f"next: adarevd eval {args.output} --weights ... (or calibrate / train)")
    return 0


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
        take_over=args.take_over,
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
