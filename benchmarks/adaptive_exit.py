"""Adaptive exit vs full depth with the same weights, on frames with a mix of exit classes.

Early exit saves decoder work only. The decoder-stage speedup is compared with its ideal N / mean depth,
and the end-to-end speedup with its bound (T_enc + N*T_col) / (T_enc + mean_depth*T_col), where T_enc
(encode + classify + stitch) and T_col (one column over every patch) are measured in the same run.
The class mix is drawn uniformly over the classes (seeded) and mapped through the preset's exit table,
so the routing machinery is measured on a known mix, independent of what a classifier would pick.

    python -m benchmarks.adaptive_exit [--preset adarevd-b --width 16 --size 720 1280]
"""

from __future__ import annotations

import argparse

import torch

import adarevd
from benchmarks.common import timed, write


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="adarevd-b")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--encoder", default="nafnet")
    p.add_argument("--patch-size", type=int, default=128)
    p.add_argument("--size", type=int, nargs=2, default=(512, 768))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    torch.manual_seed(0)
    model = adarevd.build(args.preset, width=args.width, encoder=args.encoder, patch_size=args.patch_size).eval()
    n = model.num_columns
    images = torch.rand(1, 3, *args.size)
    with torch.no_grad():
        padded = model.pad(images)
        grid = model.grid(*padded.shape[-2:])
        patches = model.cut(model.encode(padded), grid)
        x, state = model.initial_state(patches)
        g = torch.Generator().manual_seed(1)
        classes = torch.randint(model.config.num_classes, (x.shape[0],), generator=g)
        table = torch.tensor(model.config.exit_table).clamp(0, n)
        mixed = table[classes]
        full = torch.full_like(mixed, n)

        def front() -> None:  # everything but the columns: encoder, cut, classifier, stitch
            feats = model.cut(model.encode(padded), grid)
            model.exit_depths(model.classify(feats))
            model.stitch(torch.zeros(x.shape[0], 3, grid.size_h, grid.size_w), grid)

        t_front = timed(front, args.repeats)
        t_full = timed(lambda: model.decode(x, state, full), args.repeats)
        t_mixed = timed(lambda: model.decode(x, state, mixed), args.repeats)
    mean_depth = mixed.float().mean().item()
    t_col = t_full / n
    decoder_speedup, decoder_ideal = t_full / t_mixed, n / mean_depth
    e2e_speedup = (t_front + t_full) / (t_front + t_mixed)
    e2e_bound = (t_front + n * t_col) / (t_front + mean_depth * t_col)
    write(
        "adaptive_exit",
        {
            "config": vars(args)
            | {"num_columns": n, "patches": int(x.shape[0]), "exit_table": model.config.exit_table},
            "depth_histogram": torch.bincount(mixed, minlength=n + 1).tolist(),
            "mean_depth": mean_depth,
            "seconds": {"encoder_classifier_stitch": t_front, "decoder_full": t_full, "decoder_adaptive": t_mixed},
            "decoder_speedup": decoder_speedup,
            "decoder_ideal": decoder_ideal,
            "decoder_ratio_to_ideal": decoder_speedup / decoder_ideal,
            "end_to_end_speedup": e2e_speedup,
            "end_to_end_bound": e2e_bound,
            "end_to_end_ratio_to_bound": e2e_speedup / e2e_bound,
            "goal": "ratios >= 0.9",
        },
    )


if __name__ == "__main__":
    main()
