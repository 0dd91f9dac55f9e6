"""CPU restore with and without transparent huge pages for PyTorch's large allocations.

THP_MEM_ALLOC_ENABLE=1 makes PyTorch's CPU allocator madvise large blocks as huge pages (this kernel's
THP mode is `madvise`), so fresh activations fault in 2 MiB at a time instead of 4 KiB. The `adarevd`
CLI turns it on (jobs/__init__.py). Each setting runs in fresh processes, alternating, same frame.

    python -m benchmarks.cpu_huge_pages [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from benchmarks.common import write

WORKER = """
import json, torch, adarevd
from benchmarks.common import timed
m = adarevd.build("adarevd-b", width=16, encoder="nafnet").eval()
x = torch.rand(1, 3, 720, 1280)
print(json.dumps({"seconds_per_frame": timed(lambda: m.restore(x, exit=4), repeats=1, warmup=1)}))
"""


def run(thp: bool) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if thp:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", WORKER], env=env, check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return json.loads(out.stdout.strip().splitlines()[-1]) | {
        "process_system_seconds": after.ru_stime - before.ru_stime,
        "process_user_seconds": after.ru_utime - before.ru_utime,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    thp_mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    rows = []
    for _ in range(args.rounds):
        for thp in (False, True):
            rows.append({"thp": thp, **run(thp)})
            print(rows[-1], flush=True)
    best = {thp: min(r["seconds_per_frame"] for r in rows if r["thp"] == thp) for thp in (False, True)}
    write(
        "cpu_huge_pages",
        {
            "config": {"preset": "adarevd-b", "width": 16, "encoder": "nafnet", "size": [720, 1280], "exit": 4},
            "kernel_thp_mode": thp_mode.read_text().strip() if thp_mode.exists() else None,
            "rows": rows,
            "speedup_with_huge_pages": best[False] / best[True],
        },
    )


if __name__ == "__main__":
    main()
