"""Inference throughput of `restore`: the B preset at width 16 on 720p frames, full depth.

Modes measured side by side in one run: fp32; fp32 with channels_last; bf16 autocast; compile (fp32,
`adarevd.speed.compile_for_inference`: the path the deblur job and `adarevd restore` take on long runs;
its first call, which compiles, is reported apart). Each mode's achieved GFLOP/s (the FLOPs of one
restore, counted by torch's FlopCounterMode) is set against this machine's peak: a large fp32 matmul.
The NAFNet encoder is the default here: at width 16 the UFPNet encoder's kernel prior (a fixed-width
U-Net plus a per-pixel flow, about 1 TFLOP per 720p frame) dominates everything else; `--encoder ufpnet`
measures it anyway.

    python -m benchmarks.restore_throughput [--frames 3 --encoder nafnet --modes fp32 bf16 compile --device cuda]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import adarevd
from adarevd.speed import compile_for_inference
from benchmarks.common import timed, write

MODES = ("fp32", "channels_last", "bf16", "compile", "compile_bf16")


def prepare(mode: str, model: adarevd.AdaRevD) -> adarevd.AdaRevD:
    if mode == "channels_last":
        return model.to(memory_format=torch.channels_last)
    if mode.startswith("compile"):
        return compile_for_inference(model)
    return model


def peak_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """fp32 GFLOP/s of a size^3 matmul: what this device reaches on the densest work."""
    a, b = torch.rand(size, size, device=device), torch.rand(size, size, device=device)
    return 2 * size**3 / timed(lambda: a @ b, repeats=repeats) / 1e9


def count_flops(model: adarevd.AdaRevD, frame: torch.Tensor) -> float:
    """FLOPs of one full-depth restore of `frame` (convolutions, matmuls, FFT-free count)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.restore(frame, exit=model.num_columns)
    return float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--encoder", default="nafnet", choices=["nafnet", "ufpnet"])
    p.add_argument("--size", type=int, nargs=2, default=(720, 1280))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--preset", default="adarevd-b")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    frames = torch.rand(args.frames, 1, 3, *args.size, device=device)
    base = adarevd.build(args.preset, width=args.width, encoder=args.encoder, kernel_noise=False).eval().to(device)
    with torch.no_grad():  # heads start at zero (identity); give them weights so the modes' outputs differ
        for head in base.outputs:
            head[0].weight.normal_(0, 0.01)
    reference = None
    rows = {}
    for mode in args.modes:
        model = adarevd.AdaRevD(base.config).eval().to(device)
        model.load_state_dict(base.state_dict())
        model = prepare(mode, model)
        dtype = torch.bfloat16 if mode.endswith("bf16") else None
        if mode == "channels_last":
            frames_in = [f.contiguous(memory_format=torch.channels_last) for f in frames]
        else:
            frames_in = list(frames)

        def run(model: adarevd.AdaRevD = model, frames_in: list = frames_in, dtype: torch.dtype | None = dtype) -> list:
            return [model.restore(f, exit=model.num_columns, autocast_dtype=dtype).images for f in frames_in]

        first = time.perf_counter()
        run()  # the warm-up: compiling, for compile
        first = time.perf_counter() - first
        seconds = timed(run, repeats=1, warmup=0)
        out = run()[0]
        if reference is None:
            reference = out
        rows[mode] = {
            "seconds_per_frame": seconds / args.frames,
            "frames_per_second": args.frames / seconds,
            "max_abs_diff_vs_fp32": (out - reference).abs().max().item(),
            "first_call_seconds": first,
        }
        print(mode, rows[mode], flush=True)
    fp32 = rows.get("fp32", next(iter(rows.values())))["frames_per_second"]
    flops = count_flops(base, frames[0])
    peak = peak_gflops(device)
    for row in rows.values():
        row["speedup_vs_fp32"] = row["frames_per_second"] / fp32
        row["gflops_per_second"] = flops * row["frames_per_second"] / 1e9
        row["fraction_of_matmul_peak"] = row["gflops_per_second"] / peak
    limits = {"gflop_per_frame": flops / 1e9, "matmul_peak_gflops_per_second": peak}
    print(limits)
    name = f"restore_throughput_{args.encoder}" + ("" if args.preset == "adarevd-b" else f"_{args.preset}")
    name += "" if device.type == "cpu" else f"_{device.type}"
    write(name, {"config": vars(args), "limits": limits, "modes": rows})


if __name__ == "__main__":
    main()
