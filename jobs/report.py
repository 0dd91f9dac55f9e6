"""`adarevd report OUTPUT_URL --output DIR`: the run page and sampled exit-depth pictures of a deblur output."""

from __future__ import annotations

import argparse
from pathlib import Path

from adarevd.errors import InvalidInput
from jobs.data import add_storage_option
from jobs.deblur import DEMO_OUTPUT
from pipeline.report.page import write_report
from pipeline.store.storage import Store, parse_storage_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "report",
        help="an HTML run page (opens offline) and blurry | deblurred | exit-depth pictures of a deblur output",
        description="Reads the manifests, quarantine and _run.json under OUTPUT_URL, the deblurred frames and "
        "(for the pictures) the blurry input frames, and writes DIR/index.html and DIR/frames/*.png.",
    )
    r.add_argument("output", nargs="?", default=DEMO_OUTPUT, help=f"deblur output folder URL (default: {DEMO_OUTPUT})")
    r.add_argument(
        "--output",
        "--to",
        dest="to",
        default="adarevd-out/report",
        help="local folder for the report (default: %(default)s)",
    )
    r.add_argument("--samples", type=int, default=6, help="frames to picture, spread over key order (default: 6)")
    r.add_argument("--key", action="append", default=[], help="also picture this frame (repeatable)")
    r.add_argument("--input", help="input shards' folder URL (default: the one recorded in _run.json)")
    add_storage_option(r)
    r.set_defaults(run=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    if args.samples < 0:
        raise InvalidInput(f"--samples must be >= 0, got {args.samples}")
    output = Store(args.output, parse_storage_options(args.storage_option))
    report = write_report(output, Path(args.to), samples=args.samples, keys=args.key, input_url=args.input)
    for warning in report.warnings:
        print(f"warning: {warning}")
    print(
        f"wrote {report.page.resolve()} and {len(report.pictures)} frame picture(s) in {report.page.parent / 'frames'}"
    )
    return 0
