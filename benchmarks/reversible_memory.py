"""Peak training memory of the reversible columns vs plain autograd, for 1, 2, 4 and 8 columns.

Each configuration runs in a fresh process: one training step (forward over every column, loss over
every output, backward) on random crops. On CUDA the peak is torch.cuda.max_memory_allocated; on CPU it
is the growth of the process's peak resident set (ru_maxrss) over the level measured just before the
step, which counts activations, gradients and the recomputation workspace alike. The CPU workers run
with a fixed glibc mmap threshold: by default glibc raises the threshold after large frees and then
serves large tensors from its heap, where freed memory stays resident and the peak RSS overstates
the peak of live tensors.

    python -m benchmarks.reversible_memory [--width 16 --size 128 --batch 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

import adarevd
from benchmarks.common import write

COLUMNS = (1, 2, 4, 8)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(columns: int, reversible: bool, width: int, size: int, batch: int) -> dict[str, float]:
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = adarevd.build("adarevd-tiny", width=width, num_columns=columns, exit_table=(columns,) * 6).to(device)
    model.train()
    images = torch.rand(batch, 3, size, size, device=device)
    target = torch.rand_like(images)
    with torch.no_grad():
        model.encode(model.pad(images))  # touch the encoder once so its workspace is in the baseline
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mib()
    outputs = model(images, reversible=reversible)
    loss = sum((o - target).abs().mean() for o in outputs)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mib()
    return {"peak_mib": peak - base}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--worker", nargs=2, metavar=("COLUMNS", "MODE"))
    args = p.parse_args()
    if args.worker:
        columns, mode = int(args.worker[0]), args.worker[1]
        print(json.dumps(worker(columns, mode == "reversible", args.width, args.size, args.batch)))
        return
    rows = []
    for columns in COLUMNS:
        for mode in ("plain", "reversible"):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.reversible_memory",
                "--worker",
                str(columns),
                mode,
                "--width",
                str(args.width),
                "--size",
                str(args.size),
                "--batch",
                str(args.batch),
            ]
            env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}
            out = (
                subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
            )
            rows.append({"columns": columns, "mode": mode, **json.loads(out)})
            print(rows[-1], flush=True)
    peak = {(r["columns"], r["mode"]): r["peak_mib"] for r in rows}
    write(
        "reversible_memory",
        {
            "config": {
                "width": args.width,
                "size": args.size,
                "batch": args.batch,
                "device": "cuda" if torch.cuda.is_available() else "cpu",
            },
            "rows": rows,
            "reversible_peak_8_over_1": peak[(8, "reversible")] / peak[(1, "reversible")],
            "plain_peak_8_over_1": peak[(8, "plain")] / peak[(1, "plain")],
            "goal": "reversible_peak_8_over_1 <= 1.3",
        },
    )


if __name__ == "__main__":
    main()
