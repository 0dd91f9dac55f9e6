"""Thin command-line entry points: `adarevd <command>`.

Importing this package quiets OpenCV's console warnings and asks PyTorch's CPU allocator for
transparent huge pages on large tensors (unless the caller set THP_MEM_ALLOC_ENABLE): at 720p about
half of CPU inference time was spent faulting in fresh 4 KiB pages; see benchmarks/cpu_huge_pages.py.
It must happen before torch's first allocation, hence here, at the edge, before any job imports torch.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# Our messages name the file and the reason for every video or image that cannot be read; OpenCV's and
# FFmpeg's own console warnings about the same files ("moov atom not found") would only repeat them.
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET
