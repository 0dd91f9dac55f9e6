"""Thin command-line entry points: `adarevd <command>`.

Importing this package asks PyTorch's CPU allocator for transparent huge pages on large tensors
(unless the caller set THP_MEM_ALLOC_ENABLE): at 720p about half of CPU inference time was spent
faulting in fresh 4 KiB pages; see benchmarks/cpu_huge_pages.py. It must happen before torch's first
allocation, hence here, at the edge, before any job imports torch.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
