"""Inference throughput of `restore`: the B preset at width 16 on 720p frames, full depth.

Modes measured side by side in one run: fp32; fp32 with channels_last; bf16 autocast; torch.compile of
the encoder, columns, heads and classifier (fp32). The NAFNet encoder is the default here: at width 16
the UFPNet encoder's kernel prior (a fixed-width U-Net plus a per-pixel flow, about 1 TFLOP per 720p
frame) dominates everything else; `--encoder ufpnet` measures it anyway.

    python -m benchmarks.restore_throughput [--frames 3 --encoder nafnet --modes fp32 bf16 compile]
"""

from __future__ import annotations

import argparse

import torch

import adarevd
from benchmarks.common import timed, write

MODES = ("fp32", "channels_last", "bf16", "compile")


def prepare(mode: str, model: adarevd.AdaRevD) -> adarevd.AdaRevD:
    if mode == "channels_last":
        return model.to(memory_format=torch.channels_last)
    if mode == "compile":
        model.encoder.compile()
        for module in (*model.subdenets, *model.outputs, model.ape):
            module.compile(dynamic=True)
    return model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--encoder", default="nafnet", choices=["nafnet", "ufpnet"])
    p.add_argument("--size", type=int, nargs=2, default=(720, 1280))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = p.parse_args()
    torch.manual_seed(0)
    frames = torch.rand(args.frames, 1, 3, *args.size)
    base = adarevd.build("adarevd-b", width=16, encoder=args.encoder, kernel_noise=False).eval()
    with torch.no_grad():  # heads start at zero (identity); give them weights so the modes' outputs differ
        for head in base.outputs:
            head[0].weight.normal_(0, 0.01)
    reference = None
    rows = {}
    for mode in args.modes:
        model = adarevd.AdaRevD(base.config).eval()
        model.load_state_dict(base.state_dict())
        model = prepare(mode, model)
        dtype = torch.bfloat16 if mode == "bf16" else None
        if mode == "channels_last":
            frames_in = [f.contiguous(memory_format=torch.channels_last) for f in frames]
        else:
            frames_in = list(frames)

        def run(model: adarevd.AdaRevD = model, frames_in: list = frames_in, dtype: torch.dtype | None = dtype) -> list:
            return [model.restore(f, exit=model.num_columns, autocast_dtype=dtype).images for f in frames_in]

        seconds = timed(run, repeats=1, warmup=1)
        out = run()[0]
        if reference is None:
            reference = out
        rows[mode] = {
            "seconds_per_frame": seconds / args.frames,
            "frames_per_second": args.frames / seconds,
            "max_abs_diff_vs_fp32": (out - reference).abs().max().item(),
        }
        print(mode, rows[mode], flush=True)
    fp32 = rows.get("fp32", next(iter(rows.values())))["frames_per_second"]
    for row in rows.values():
        row["speedup_vs_fp32"] = row["frames_per_second"] / fp32
    write(f"restore_throughput_{args.encoder}", {"config": vars(args), "modes": rows})


if __name__ == "__main__":
    main()
