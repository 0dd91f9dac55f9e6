"""`adarevd deblur [INPUT_URL OUTPUT_URL]`: the deblur job (pipeline/deblur/) from the shell.

Without arguments it runs on the bundled demo clip: ingests it into adarevd-out/demo-frames (once),
deblurs it on an embedded local Ray with the bundled weights into adarevd-out/deblurred, and prints
the summary.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pyarrow.compute as pc
import torch
from tqdm import tqdm

import adarevd
from adarevd.errors import InvalidInput
from jobs import signals
from jobs.data import add_storage_option, add_take_over
from jobs.models import (
    ASSETS,
    add_blend_option,
    add_compile_option,
    add_precision_option,
    add_weights_option,
    exit_mode,
    model_from,
)
from pipeline.cluster.address import ADDRESS_HELP, ray_address
from pipeline.deblur.job import RestoreOptions
from pipeline.deblur.resume import megabytes
from pipeline.deblur.run_record import RunSummary
from pipeline.formats.sink import ShardLimits
from pipeline.ingest.run import INDEX_NAME, IngestConfig, ingest, read_index
from pipeline.store.storage import StorageError, Store, absolute, parse_storage_options

if TYPE_CHECKING:
    from pipeline.deblur.ray import driver

DEMO_CLIP = ASSETS / "demo_clip.mp4"
DEMO_INPUT, DEMO_OUTPUT = "adarevd-out/demo-frames", "adarevd-out/deblurred"


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "deblur",
        help="deblur WebDataset shards on Ray (default: the bundled demo clip, bundled weights)",
        description="Deblur every frame of the shards under INPUT_URL into OUTPUT_URL: one output shard per "
        "input shard (same keys; other members copied byte for byte), _manifest/*.parquet, _quarantine/, "
        "_run.json. Shards whose manifest is already in OUTPUT_URL are skipped (resume).",
    )
    d.add_argument(
        "input",
        nargs="?",
        help="folder URL of input shards, or a pattern naming some (.../video-{000000..000099}.tar, "
        ".../*.tar; names stay relative to the folder before the first wildcard); default: the bundled "
        "demo clip, ingested",
    )
    d.add_argument("output", nargs="?", help=f"output folder URL (default: {DEMO_OUTPUT})")
    add_deblur_options(d)
    d.set_defaults(run=cmd_deblur)


def add_deblur_options(d: argparse.ArgumentParser) -> None:
    """The options of the deblur job (model, weights, cluster, routing, ...), for `deblur` and `deblur-video`."""
    d.add_argument(
        "--model",
        choices=sorted(adarevd.PRESETS),
        help="model preset (default: the weights file's own model; adarevd-tiny, which has bundled weights, "
        "without --weights; the others need --weights)",
    )
    add_weights_option(d, "the bundled adarevd-tiny")
    d.add_argument(
        "--exit",
        default="adaptive",
        type=exit_mode,
        help="'adaptive' (default: each patch exits at the depth its class is given) or a fixed depth 0..N",
    )
    d.add_argument(
        "--encoder-mode",
        default="frame",
        choices=["frame", "patch"],
        help="frame (default): the encoder sees the whole frame; patch: one patch at a time (less memory)",
    )
    add_precision_option(d)
    add_compile_option(d, "for inputs of 300 MB or more")
    add_blend_option(d)
    d.add_argument(
        "--max-frame-pixels",
        type=int,
        default=RestoreOptions.max_frame_pixels,
        help="frames with more pixels are encoded per patch in frame mode (default: 4K UHD; 0: no limit)",
    )
    d.add_argument("--image-member", help="the member to deblur (default: the one png/jpg/... member)")
    d.add_argument("--address", help=ADDRESS_HELP)
    d.add_argument("--num-cpus", type=float, help="CPUs of the embedded local Ray (default: all)")
    d.add_argument("--workers", type=int, default=0, help="restorer actors (default: as many as fit)")
    d.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs per restorer actor, also its torch threads (default 1)"
    )
    d.add_argument(
        "--gpus-per-worker",
        type=float,
        help="fractions are fine, e.g. 0.5; 0: CPUs only (default, with neither GPU option given: on a "
        "cluster with GPUs a GPU per restorer, depth-pools a quarter per encoder and pool actor; else 0)",
    )
    d.add_argument(
        "--worker-resource",
        help="custom node resource the model actors (restorers, encoders) need (1 each): pins them to nodes",
    )
    d.add_argument(
        "--routing",
        default="fused",
        choices=["fused", "depth-pools"],
        help="fused (default, measured fastest): each restorer runs every stage of its batch; depth-pools: "
        "encoder actors, then one pool of --workers actors per exit depth, sized by the exit mix",
    )
    d.add_argument("--encoders", type=int, default=1, help="depth-pools: encode+classify+stitch actors (default 1)")
    d.add_argument("--cpus-per-encoder", type=float, default=1.0, help="depth-pools: CPUs per encoder (default 1)")
    d.add_argument("--gpus-per-encoder", type=float, help="depth-pools (default: see --gpus-per-worker)")
    d.add_argument(
        "--frames-per-batch", type=int, default=0, help="frames pooled per call (default: 1 on CPU, 16 on GPU)"
    )
    d.add_argument(
        "--flush-timeout",
        type=float,
        default=0.0,
        help="send a partial batch once its first frame waited this many seconds (default: off, which keeps "
        "batches, and so the output bytes, independent of timing)",
    )
    d.add_argument("--max-frames", type=int, help="stop after this many frames (a preview; not marked done)")
    d.add_argument(
        "--stall-timeout",
        type=float,
        default=600.0,
        help="seconds without a finished frame before the run stops with a report of what waits on what (default: 600)",
    )
    d.add_argument(
        "--storage-retry", type=float, default=60.0, help="seconds to retry a store that does not answer (default: 60)"
    )
    d.add_argument("--quarantine-ok", action="store_true", help="exit 0 even if frames were quarantined")
    add_take_over(d)
    add_storage_option(d)


def demo_input() -> str:
    """Ingest the bundled clip once; later runs reuse the shards."""
    store = Store(DEMO_INPUT)
    if not store.exists(INDEX_NAME):
        # overwrite: an earlier demo ingest that was interrupted left shards but no index.
        config = IngestConfig(limits=ShardLimits(max_samples=16), overwrite=True)
        summary = ingest([str(DEMO_CLIP)], store, config)
        print(f"ingested the bundled demo clip: {summary.frames} frames, {len(summary.shards)} shards -> {DEMO_INPUT}")
    return DEMO_INPUT


def expected_frames(store: Store, shards: Sequence[str]) -> int | None:
    """The frames in `shards` by the ingest index beside them; None (no total for the progress bar)
    without an index, or when it does not list every one of them."""
    try:
        counts = pc.value_counts(read_index(store, ["shard"]).column("shard")).to_pylist()
    except (FileNotFoundError, OSError, StorageError):
        return None  # only the progress bar's total: the job itself reports an unreachable store
    per_shard = {count["values"]: count["counts"] for count in counts}
    if not all(shard in per_shard for shard in shards):
        return None
    return sum(per_shard[shard] for shard in shards)


def cmd_deblur(args: argparse.Namespace) -> int:
    if (args.input is None) != (args.output is None):
        raise InvalidInput("give both INPUT_URL and OUTPUT_URL, or neither (the bundled demo)")
    output_url = args.output or DEMO_OUTPUT
    model, weights = load_checked(args)
    job = job_from(args, args.input or demo_input(), output_url)
    started = time.perf_counter()
    with tqdm(unit=" frames", desc="deblur", file=sys.stderr, disable=None) as bar:
        summary = run_job(args, job, (model, weights), bar)
    print_summary(summary, output_url, time.perf_counter() - started)
    failed = summary.shard_errors or (summary.quarantined and not args.quarantine_ok)
    return 3 if failed else 0


def load_checked(args: argparse.Namespace) -> tuple[adarevd.AdaRevD, list[str]]:
    """The model of --model/--weights, checked against --exit, announced; and its local weight files."""
    model, source, weight_files = model_from(args, torch.device("cpu"))
    RestoreOptions(exit=args.exit).check_model(model.num_columns)
    print(
        f"model: {model.config.encoder} encoder, width {model.config.width}, {model.num_columns} columns; "
        f"weights: {source}; fingerprint {adarevd.fingerprint(model)[:12]}"
    )
    return model, weight_files


def job_from(args: argparse.Namespace, input_url: str, output_url: str) -> driver.DeblurJob:
    """The deblur job that the options in `args` describe."""
    from pipeline.deblur.ray import driver

    return driver.DeblurJob(
        input_url=input_url,
        output_url=output_url,
        restore=RestoreOptions(
            exit=args.exit,
            encoder_mode=args.encoder_mode,
            precision=args.precision,
            blend=args.blend,
            max_frame_pixels=args.max_frame_pixels,
            compile=args.compile,
        ),
        resources=driver.Resources(
            args.workers,
            args.cpus_per_worker,
            args.gpus_per_worker,
            worker_resource=args.worker_resource,
            encoders=args.encoders,
            cpus_per_encoder=args.cpus_per_encoder,
            gpus_per_encoder=args.gpus_per_encoder,
        ),
        routing=args.routing,
        frames_per_batch=args.frames_per_batch,
        flush_timeout_s=args.flush_timeout,
        image_member=args.image_member,
        max_frames=args.max_frames,
        stall_timeout_s=args.stall_timeout,
        take_over=args.take_over,
        storage_retry_s=args.storage_retry,
    )


def run_job(
    args: argparse.Namespace, job: driver.DeblurJob, model: tuple[adarevd.AdaRevD, list[str]], bar: tqdm
) -> RunSummary:
    """List the input (before Ray starts: a mistyped input stops at once), start or join Ray, run the job.
    `bar` counts the frames deblurred from its current position; its total grows by this run's frames."""
    from pipeline.deblur.ray import driver

    options = parse_storage_options(args.storage_option)
    listing = job.listing(options)
    where = ray_address(args.address)
    bar.write(f"ray: {where.describe()}", sys.stdout)
    driver.ensure_ray(where.address, args.num_cpus, where.source)
    signals.again()
    start = bar.n
    if (total := expected_frames(job.stores(options)[0], listing.shards)) is not None:
        bar.total = (bar.total or start) + total
        bar.refresh()

    def show(done: int, depths: list[int]) -> None:
        bar.set_postfix_str(f"patches by exit depth {depths}", refresh=False)
        bar.update(start + done - bar.n)

    return driver.run(
        job,
        model[0],
        weight_files=model[1],
        options=options,
        listing=listing,
        hooks=driver.Hooks(on_progress=show, on_warning=lambda line: bar.write(f"warning: {line}", sys.stderr)),
    )


def print_summary(summary: RunSummary, output_url: str, wall: float, *, standalone: bool = True) -> None:
    frames = summary.frames
    if summary.took_over:
        print(f"took the output over from {summary.took_over}")
    if summary.parts_cleared[0]:
        files, size = summary.parts_cleared
        print(f"cleared {files} partial files ({megabytes(size)}) that stopped runs left in {output_url}/_tmp")
    if summary.input_moved_from:
        print(
            f"resuming: the done shards were deblurred from another place (the first: {summary.input_moved_from}); "
            "the input here has the same bytes"
        )
    histogram = summary.histogram
    patches = sum(histogram)
    actors = f"workers: {summary.workers}"
    if summary.encoders:
        actors = f"encoders: {summary.encoders}, depth-pool actors: {summary.workers}"
    if summary.devices:
        actors += " (model on " + ", ".join(f"{d}: {n}" for d, n in sorted(summary.devices.items())) + ")"
    if summary.reports:
        actors += "; compiled with torch.compile" if summary.compiled else "; eager (--compile on to compile)"
        if len(summary.precisions) > 1:  # auto on cards with and without bf16 tensor cores
            bf16, total = summary.precisions.get("bf16", 0), sum(summary.precisions.values())
            actors += f"; bf16 autocast on {bf16} of {total} actors (their cards differ: --precision pins one)"
        elif "bf16" in summary.precisions:
            actors += "; bf16 autocast"
    print(
        f"shards: {len(summary.reports)} processed, {summary.shards_skipped} already done, "
        f"{summary.shards_total} in all; {actors}"
    )
    print(
        f"frames: {frames} in {summary.seconds:.1f} s ({frames / max(summary.seconds, 1e-9):.2f} frames/s; "
        f"{wall:.1f} s with Ray start-up)"
    )
    if sum(histogram):  # none when every shard was done already, or every frame quarantined
        print("exit depth   " + " ".join(f"{d:>7}" for d in range(len(histogram))))
        print("patches      " + " ".join(f"{n:>7}" for n in histogram))
        print("share        " + " ".join(f"{100 * n / patches:>6.1f}%" for n in histogram))
    if summary.pool_plans:
        plans = " -> ".join("/".join(map(str, p)) for p in summary.pool_plans[-4:])
        print(f"depth pools (actors for depth 1..{len(histogram) - 1}; 0: borrows another's): {plans}")
    if summary.inputs_passed_over:
        passed = summary.inputs_passed_over
        shown = "; ".join(f"{name}: {why}" for name, why in list(passed.items())[:3])
        more = f"; {len(passed) - 3} more" if len(passed) > 3 else ""
        print(
            f"not read: {len(passed)} input entries ({shown}{more}; all in _run.json); rename a hidden shard, "
            "or name it in a shard pattern, to deblur it"
        )
    if summary.shared_keys.get("count"):
        shared = summary.shared_keys
        key, shards = next(iter(shared["examples"].items()))
        print(
            f"warning: {shared['count']} key(s) are in more than one shard (e.g. {key!r} in {' and '.join(shards)}; "
            "more in _run.json); each copy is deblurred, but the report and `assemble` find frames by key: "
            "give every frame its own key"
        )
    if summary.quarantined:
        print(f"quarantined: {summary.quarantined} frame(s); see {output_url}/_quarantine/ (original bytes + reasons)")
    for error in summary.shard_errors:
        print(f"shard error: {error}")
    if not summary.reports and summary.shards_skipped and standalone:
        print("nothing to do: every shard is already done here (resume); remove the output or choose another to redo")
    print(f"output: {absolute(output_url)} (shards, _manifest/, _run.json)")
    if standalone:
        quoted = shlex.quote(output_url)
        report = "adarevd report" if output_url == DEMO_OUTPUT else f"adarevd report {quoted} --output REPORT_DIR"
        print(f"pictures and a run page: {report}")
