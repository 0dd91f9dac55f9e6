"""`adarevd train encoder|decoders|classifier`, `adarevd calibrate` and `adarevd eval`.

train DATA_URL --output W.safetensors   one stage on paired shards; `--workers N` runs N Ray Train
                                        workers (embedded local Ray, or `--address`); `--checkpoints
                                        URL` makes it resumable (re-run the same command)
calibrate VAL_URL --weights W --output W2  the cheapest exit table within --budget-db of full depth
eval PAIRED_URL [--weights W] [--json F]   PSNR/SSIM of input, full depth and adaptive output
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

import adarevd
from adarevd.calibration import with_exit_table
from adarevd.training import DEBLUR_LOSSES
from adarevd.weights import CONFIG_KEY, read_state_dict
from jobs import signals
from jobs.data import add_storage_option
from jobs.models import CliError, add_weights_option, model_from
from pipeline.cluster.address import ADDRESS_HELP, ray_address
from pipeline.store.storage import Store, parse_storage_options
from pipeline.train import evaluate
from pipeline.train.trainer import KINDS, Progress, TrainSpec, publish_weights, train

CALIBRATION_KEY = "adarevd.calibration"


def cmd_train(args: argparse.Namespace) -> int:
    spec = TrainSpec(
        kind=args.kind,
        data=args.data,
        output=args.output,
        checkpoints=args.checkpoints,
        preset=args.model or "adarevd-tiny",
        weights=tuple(args.weights),
        iterations=args.iterations,
        batch=args.batch,
        crop=args.crop,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        seed=args.seed,
        reversible=not args.plain,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        ema_warmup=args.ema_warmup,
        psnr_thresholds=tuple(args.psnr_thresholds) if args.psnr_thresholds else None,
        loss_function=args.loss,
        storage_options=parse_storage_options(args.storage_option),
    )
    if args.workers == 1 and args.address in (None, "local"):
        from pipeline.train.ray_train import format_progress

        def show(p: Progress) -> None:
            print(format_progress(p, spec.kind), flush=True)

        # One worker trains in this process, on the GPU when one is asked for.
        if args.gpus_per_worker > 0 and not torch.cuda.is_available():
            raise CliError(
                f"--gpus-per-worker {args.gpus_per_worker:g}: torch {torch.__version__} sees no CUDA "
                "device here; leave it out to train on the CPU"
            )
        device = torch.device("cuda" if args.gpus_per_worker > 0 else "cpu")
        result = train(spec, device=device, on_progress=show)
    else:
        from pipeline.deblur.ray.driver import ensure_ray
        from pipeline.train.ray_train import TrainResources, fit

        where = ray_address(args.address)
        print(f"ray: {where.describe()}")
        ensure_ray(where.address, args.num_cpus, where.source)
        signals.again()
        result = fit(spec, TrainResources(args.workers, args.cpus_per_worker, args.gpus_per_worker))
    assert result is not None
    resumed = f" (resumed at step {result.resumed_from})" if result.resumed_from else ""
    print(
        f"train {spec.kind}: {result.steps} steps{resumed} in {result.seconds:.0f} s, final loss {result.loss:.4f}; "
        f"wrote {args.output}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    model, source, _ = model_from(args, torch.device("cpu"))
    store = Store(args.data, parse_storage_options(args.storage_option))
    with tqdm(desc="eval", unit="frame", disable=None) as bar:
        result = evaluate.evaluate(model, evaluate.frames_of(store, args.limit), progress=bar.update)
    result = {"data": store.url, "weights": source} | result
    for name in ("psnr_input", "psnr_full_depth", "psnr_output", "ssim_input", "ssim_output", "mean_depth"):
        print(f"{name:16s} {result[name]}")
    print(f"{'gain_db':16s} {result['gain_db']}  (adaptive vs full depth: {result['adaptive_vs_full_db']} dB)")
    for c, row in result["by_class"].items():
        print(
            f"class {c}: {row['frames']} frames, input {row['psnr_input']} -> {row['psnr_output']} dB, "
            f"depth {row['mean_depth']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.budget_db < 0:
        raise CliError(f"--budget-db must be >= 0, got {args.budget_db}")
    if not args.output.endswith(".safetensors"):
        raise CliError(f"--output must name a .safetensors file, got {args.output}")
    model, source, files = model_from(args, torch.device("cpu"))
    store = Store(args.data, parse_storage_options(args.storage_option))
    with tqdm(desc="calibrate", unit="frame", disable=None) as bar:
        frames = evaluate.frames_of(store, args.limit)
        found = evaluate.calibrate(model, frames, args.budget_db, progress=bar.update)
    print(f"patches per class {found.patches_per_class}")
    for c, gains in enumerate(found.gain_per_column):
        print(f"class {c}: gain after 1..N columns {list(gains)} dB")
    print(
        f"exit table {model.config.exit_table} -> {found.exit_table}: mean depth {found.mean_depth}, "
        f"PSNR loss vs the best table {found.psnr_loss_db} dB (budget {found.budget_db})"
    )
    calibrated = with_exit_table(model, found.exit_table)
    metadata = {k: v for k, v in read_state_dict(files[0])[1].items() if k.startswith("adarevd.")}
    metadata[CALIBRATION_KEY] = json.dumps(asdict(found) | {"data": store.url, "weights": source})
    metadata.pop(CONFIG_KEY, None)  # save_weights writes the new config
    publish_weights(calibrated, args.output, parse_storage_options(args.storage_option), metadata)
    print(f"wrote {args.output}")
    return 0


def _model_options(p: argparse.ArgumentParser) -> None:
    presets = sorted(adarevd.PRESETS)
    p.add_argument("--model", choices=presets, help="preset (default: the weights file's own model, else adarevd-tiny)")
    add_weights_option(p, "the bundled adarevd-tiny")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train one stage on paired shards, on Ray Train with --workers N")
    t.add_argument(
        "kind",
        choices=KINDS,
        help="encoder: pre-train the encoder as a plain deblurrer; decoders: "
        "stage 1 (columns, heads); classifier: stage 2",
    )
    t.add_argument("data", help="folder URL of paired shards (adarevd synth)")
    t.add_argument("--output", required=True, help="weights to write (.safetensors, any fsspec URL)")
    t.add_argument("--checkpoints", help="folder URL for checkpoints; a re-run of the same command resumes there")
    t.add_argument(
        "--model",
        default="adarevd-tiny",
        choices=sorted(adarevd.PRESETS),
        help="preset when no project weights give the config (default: %(default)s)",
    )
    add_weights_option(t, "none; decoders and classifier start from a trained encoder's file")
    t.add_argument("--iterations", type=int, default=1000)
    t.add_argument("--batch", type=int, default=8, help="crops per worker per step (default: %(default)s)")
    t.add_argument("--crop", type=int, help="crop size (default: 96; classifier: the model's patch size)")
    t.add_argument("--lr", type=float, help="default: 1e-3 (encoder, decoders), 3e-4 (classifier)")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--grad-clip", type=float, help="clip the gradient norm (default: none; classifier 0.01)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EMA decay min(0.999, (1+n)/(10+n)) after n steps (default); off: 0.999 always",
    )
    t.add_argument("--plain", action="store_true", help="plain autograd instead of the reversible backward")
    t.add_argument(
        "--loss",
        choices=DEBLUR_LOSSES,
        default="l1_fft",
        help="encoder, decoders: l1_fft (the authors' L1 + FFT loss, default) or psnr (each crop's -PSNR: "
        "mild blur counts as much as strong; the bundled weights tune their decoders on it after l1_fft)",
    )
    t.add_argument(
        "--psnr-thresholds",
        type=float,
        nargs="+",
        help="classifier: PSNR class boundaries, K-1 increasing values (default: the model's, 20 25 30 35 40)",
    )
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--workers", type=int, default=1, help="Ray Train workers (default: 1, in this process)")
    t.add_argument("--cpus-per-worker", type=float, default=1.0)
    t.add_argument("--gpus-per-worker", type=float, default=0.0)
    t.add_argument("--address", help=ADDRESS_HELP)
    t.add_argument("--num-cpus", type=float, help="CPUs of the embedded local Ray (default: all)")
    add_storage_option(t)
    t.set_defaults(run=cmd_train)

    c = sub.add_parser("calibrate", help="propose the exit table that meets a PSNR-loss budget at least compute")
    c.add_argument("data", help="folder URL of paired validation shards")
    _model_options(c)
    c.add_argument("--output", required=True, help="weights with the new exit table (.safetensors)")
    c.add_argument(
        "--budget-db",
        type=float,
        default=0.05,
        help="mean frame PSNR loss allowed vs the best table that harms no class",
    )
    c.add_argument("--limit", type=int, help="use only the first N pairs")
    add_storage_option(c)
    c.set_defaults(run=cmd_calibrate)

    e = sub.add_parser("eval", help="PSNR/SSIM of input, full depth and adaptive output on paired shards")
    e.add_argument("data", help="folder URL of paired shards")
    _model_options(e)
    e.add_argument("--json", help="write the numbers to this JSON file")
    e.add_argument("--limit", type=int, help="use only the first N pairs")
    add_storage_option(e)
    e.set_defaults(run=cmd_eval)
