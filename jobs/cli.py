"""`adarevd` command line: thin wrappers over the library.

adarevd restore [IMAGE|FOLDER ...] deblur images (default: the bundled demo image, bundled weights)
adarevd info WEIGHTS               config and provenance stored in a weights file
adarevd make-default-weights       re-train the bundled adarevd-tiny weights (recipe in default_weights)
adarevd make-demo-image            re-make the bundled demo image pair
adarevd ingest SRC... --output URL videos/images/shards -> WebDataset frame shards (jobs/data.py)
adarevd synth --output URL         synthetic paired blur shards (+ a blurry clip)
adarevd ingest-pairs ROOT --output URL   a paired dataset (GoPro) -> paired shards (jobs/data.py)
adarevd assemble URL --video ID --output FILE   one video from shards back into a file (jobs/data.py)
adarevd deblur [INPUT OUTPUT]      the distributed deblur job on Ray (jobs/deblur.py)
adarevd report [OUTPUT] --output DIR   run page + exit-depth pictures (jobs/report.py)
adarevd train KIND DATA --output W training stages on Ray Train; calibrate; eval (jobs/train.py)
adarevd submit SPEC [--address URL] a TOML job spec, here or on a cluster; adarevd jobs ... (jobs/submit.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import cv2
import numpy as np
import torch

import adarevd
from adarevd.errors import UserError
from adarevd.metrics import psnr
from adarevd.speed import autocast_dtype, compile_for_inference, precision_for, worth_compiling
from jobs import data, deblur, deblur_video, report, signals, submit, train
from jobs.data import add_storage_option
from jobs.models import (
    ASSETS,
    DEFAULT_WEIGHTS,
    CliError,
    add_blend_option,
    add_compile_option,
    add_precision_option,
    add_weights_option,
    exit_mode,
    model_from,
)
from pipeline.formats import images
from pipeline.formats.frames import PatchMap
from pipeline.report.exit_map import exit_map

DEMO_BLURRY, DEMO_SHARP = ASSETS / "demo_blurry.png", ASSETS / "demo_sharp.png"


def read_image(path: Path) -> torch.Tensor:
    """An image file, decoded as the deblur job decodes frames (`images.decode`: grey, RGBA, 16-bit
    and float become 8-bit RGB) -> (3, H, W) float RGB in [0, 1]."""
    try:
        bgr, _ = images.decode(path.read_bytes())
    except (OSError, images.ImageError) as e:
        raise CliError(f"{path}: cannot read it as an image ({e})") from None
    return torch.from_numpy(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).float().div(255)


def to_rgb8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 RGB."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def write_image(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(to_rgb8(image), cv2.COLOR_RGB2BGR)):
        raise CliError(f"{path}: could not write the image")


OUTPUT_SUFFIX = ".deblurred.png"  # beside `<stem>.depth.png`: never an input's own name


def restore_plan(inputs: Sequence[str], out_dir: Path) -> list[tuple[Path, Path]]:
    """(input image, output path) for files and folders given to `restore`: a folder's images (any
    depth, sorted) keep their place below it. Refused before any work: a missing input, a folder with
    no images, two inputs with one output name, an output that is an input."""
    plan: list[tuple[Path, Path]] = []
    for given in map(Path, inputs):
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in images.IMAGE_SUFFIXES)
            if not found:
                raise CliError(f"{given}: a folder with no images ({', '.join(sorted(images.IMAGE_SUFFIXES))})")
            plan += [(p, out_dir / p.relative_to(given).parent / (p.stem + OUTPUT_SUFFIX)) for p in found]
        elif given.is_file():
            plan.append((given, out_dir / (given.stem + OUTPUT_SUFFIX)))
        else:
            raise CliError(f"{given}: no such file or folder")
    seen: dict[Path, Path] = {}
    sources = {p.resolve() for p, _ in plan}
    for image, out in plan:
        for written in (out, depth_map_path(out)):
            if written.resolve() in sources:
                raise CliError(f"{written} would be written over the input of that name; give another --output")
            if written.resolve() in seen:
                raise CliError(
                    f"{seen[written.resolve()]} and {image} would both be written to {written}; restore them in "
                    "two runs (another --output each), or give their folder"
                )
            seen[written.resolve()] = image
    return plan


def pixels(path: Path) -> int:
    """An image's pixel count from its header (the pixels are not decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.width * image.height
    except OSError:
        return 0  # read_image names the file when its turn comes


def depth_map_path(out: Path) -> Path:
    """Where the exit-depth picture of the output `out` goes: `<stem>.depth.png` beside it."""
    return out.with_name(out.name.removesuffix(OUTPUT_SUFFIX) + ".depth.png")


def cmd_restore(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    out_dir = Path(args.output)
    plan = restore_plan(args.images, out_dir) if args.images else [(DEMO_BLURRY, out_dir / "demo_blurry.deblurred.png")]
    references = [Path(p) for p in args.reference] or ([DEMO_SHARP] if not args.images else [])
    if references and len(references) != len(plan):
        raise CliError(f"--reference needs one sharp image per input: {len(plan)} inputs, {len(references)} given")
    model, source, _ = model_from(args, device)
    n = model.num_columns
    compiled = worth_compiling(args.compile, sum(pixels(path) for path, _ in plan) if args.compile == "auto" else 0)
    if compiled:
        compile_for_inference(model)
    precision = precision_for(args.precision, device)
    how = ("compiled with torch.compile" if compiled else "eager") + ("; bf16 autocast" if precision == "bf16" else "")
    print(f"model {model.config.width}-wide {model.config.encoder} encoder, {n} columns ({how}); weights: {source}")
    print(f"{'image':<28} {'size':>11} {'time s':>7} {'mean depth':>10} {'saved':>6} {'exits 0..N':<20} psnr in -> out")
    totals = torch.zeros(n + 1, dtype=torch.long)
    for i, (path, out) in enumerate(plan):
        blurry = read_image(path).to(device)
        start = time.perf_counter()
        result = model.restore(
            blurry[None],
            exit=args.exit,
            encoder_mode=args.encoder_mode,
            blend=args.blend,
            autocast_dtype=autocast_dtype(precision),
        )
        seconds = time.perf_counter() - start
        write_image(out, result.images[0])
        grid = result.grid
        patches = PatchMap(grid.ys, grid.xs, grid.size_h, grid.size_w, tuple(result.depths[0].flatten().tolist()))
        picture = exit_map(to_rgb8(blurry), patches, n)
        cv2.imwrite(str(depth_map_path(out)), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        hist = torch.bincount(result.depths.flatten().cpu(), minlength=n + 1)
        totals += hist
        mean_depth = result.depths.float().mean().item()
        quality = ""
        if references:
            sharp = read_image(references[i]).to(device)[None]
            quality = f"{psnr(blurry[None], sharp).item():.2f} -> {psnr(result.images, sharp).item():.2f} dB"
        size = f"{blurry.shape[2]}x{blurry.shape[1]}"
        saved = f"{100 * (1 - mean_depth / n):.0f}%"
        print(
            f"{path.name:<28} {size:>11} {seconds:7.2f} {mean_depth:10.2f} {saved:>6} {hist.tolist()!s:<20} {quality}"
        )
    print(f"exit histogram (patches per depth 0..{n}): {totals.tolist()}")
    print(f"wrote {len(plan)} deblurred image(s) (*{OUTPUT_SUFFIX}) and exit-depth maps to {out_dir.resolve()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from adarevd.weights import read_state_dict

    tensors, metadata = read_state_dict(args.weights)
    print(f"{args.weights}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} values")
    for key, value in sorted(metadata.items()):
        print(f"{key}: {pretty_json(value)}")
    return 0


def pretty_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2)
    except json.JSONDecodeError:
        return text


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when there is one, else the CPU; a device this machine lacks is a CliError."""
    try:
        device = torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise CliError(f"--device {name}: not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()  # 0 without CUDA (a CPU build, or no card)
        if (device.index or 0) >= count:
            raise CliError(
                f"--device {name}: this machine has {count} CUDA device(s) visible to torch "
                f"{torch.__version__}; use --device cpu or auto"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise CliError(f"--device {name}: MPS is not available here; use --device cpu or auto")
    elif device.type not in ("cpu", "mps"):
        raise CliError(f"--device {name}: only cpu, cuda and mps are supported")
    return device


def cmd_make_default_weights(args: argparse.Namespace) -> int:
    from jobs.default_weights import RECIPES, make_default_weights

    recipe = dataclasses.replace(RECIPES[args.recipe], **recipe_overrides(args))
    device = resolve_device(args.device)
    print(f"recipe {args.recipe} on {device}: {recipe}")
    work = Path(args.work) if args.work else None
    metrics = make_default_weights(Path(args.output), recipe, device=str(device), work=work)
    print(f"wrote {args.output}: test {json.dumps(metrics)}")
    return 0


RECIPE_FIELDS = (
    "batch",
    "crop",
    "pretrain_iterations",
    "stage1_iterations",
    "tune_iterations",
    "stage2_iterations",
    "seed",
)


def recipe_overrides(args: argparse.Namespace) -> dict[str, int | bool]:
    fields = (*RECIPE_FIELDS, "ema_warmup")
    return {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}


def cmd_make_demo_image(args: argparse.Namespace) -> int:
    from jobs.default_weights import make_demo_image

    for path in make_demo_image(Path(args.directory)):
        print(f"wrote {path}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adarevd", description="AdaRevD deblurring at scale")
    p.add_argument("--version", action="version", version=f"adarevd {version('adarevd')}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("restore", help="deblur images (default: the bundled demo image with bundled weights)")
    r.add_argument(
        "images",
        nargs="*",
        help="image files (png, jpg, ...) and folders of them; default: the bundled demo image. Each is written "
        f"to --output as <name>{OUTPUT_SUFFIX}, a folder's images below their folder's place",
    )
    r.add_argument("--output", default="adarevd-out", help="output folder (default: %(default)s)")
    r.add_argument(
        "--model",
        choices=sorted(adarevd.PRESETS),
        help="preset (default: the weights file's own model; adarevd-tiny for the bundled weights)",
    )
    add_weights_option(r, "the bundled adarevd-tiny")
    r.add_argument("--exit", default="adaptive", type=exit_mode, help="'adaptive' or a fixed number of columns 0..N")
    r.add_argument("--encoder-mode", default="frame", choices=["frame", "patch"])
    add_blend_option(r)
    add_precision_option(r)
    add_storage_option(r)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    add_compile_option(r, "when the images hold 200 million pixels or more")
    r.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="IMAGE",
        help="the sharp image of an input, once per input in their order: prints PSNR",
    )
    r.set_defaults(run=cmd_restore)

    i = sub.add_parser("info", help="config and provenance stored in a weights file")
    i.add_argument("weights")
    i.set_defaults(run=cmd_info)

    w = sub.add_parser(
        "make-default-weights", help="re-train the bundled adarevd-tiny weights (about an hour on 2 cores)"
    )
    w.add_argument("--output", default=str(DEFAULT_WEIGHTS))
    w.add_argument("--recipe", default="cpu", choices=["cpu", "gpu"], help="preset (default: %(default)s)")
    w.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto (default: %(default)s)")
    w.add_argument(
        "--work",
        help="folder that keeps each finished stage: a re-run with it skips them and ends "
        "with the weights of an unbroken run (also after a change to the classifier's or later fields)",
    )
    for name in RECIPE_FIELDS:
        w.add_argument(f"--{name.replace('_', '-')}", type=int, help="override the recipe's value")
    w.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, help="override the recipe's EMA warm-up")
    w.set_defaults(run=cmd_make_default_weights)

    d = sub.add_parser("make-demo-image", help="re-make the bundled demo image pair")
    d.add_argument("--directory", default=str(ASSETS))
    d.set_defaults(run=cmd_make_demo_image)

    data.add_parsers(sub)
    deblur.add_parser(sub)
    deblur_video.add_parser(sub)
    report.add_parser(sub)
    train.add_parsers(sub)
    submit.add_parsers(sub, submit.Commands(main=main, long_options=long_options))
    return p


def long_options(kind: str) -> set[str]:
    """The long options of `adarevd KIND` (argparse lists a parser's options in `_actions` only)."""
    return {flag for action in _command(parser(), kind)._actions for flag in action.option_strings if flag[:2] == "--"}


def _command(top: argparse.ArgumentParser, kind: str) -> argparse.ArgumentParser:
    """The parser of `adarevd KIND`."""
    commands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[kind]


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, options and positional arguments in any order (`deblur IN --workers 2 OUT`):
    argparse's plain parse stops filling positionals at the first option, so a command's arguments
    are parsed again intermixed where that leaves any over."""
    argv = list(sys.argv[1:] if argv is None else argv)
    top = parser()
    args, left = top.parse_known_args(argv)
    if not left:
        return args
    try:
        mixed = _command(top, args.command).parse_intermixed_args(argv[argv.index(args.command) + 1 :])
    except TypeError:  # a command with commands of its own: argparse cannot intermix those
        return top.parse_args(argv)  # (the usual error for what is left over)
    return argparse.Namespace(**{**vars(args), **vars(mixed)})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.run(args)
    except UserError as e:  # anything else is a bug: its traceback is kept
        print(f"adarevd {args.command}: error: {e}", file=sys.stderr)
        return 2


def cli() -> int:
    """The `adarevd` process (the console script, `python -m jobs.cli`): `main` with Ctrl-C and SIGTERM
    handled (`jobs.signals`), and what it started on this machine stopped when it ends."""
    signals.install()
    signum = None
    try:
        return main()
    except (KeyboardInterrupt, SystemExit) as e:  # unwound: one line, no traceback
        signum = signals.received(e) or (signal.SIGINT if isinstance(e, KeyboardInterrupt) else None)
        if signum is None:
            raise
        return signals.say(signum)
    finally:
        signals.finish(signum)  # (stopped: exits here, with the signal's status)


if __name__ == "__main__":
    sys.exit(cli())
