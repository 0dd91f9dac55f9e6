"""Whether a process on this machine still exists (for leases and temporary folders left by the dead)."""

from __future__ import annotations

import psutil


def alive(pid: int) -> bool:
    """True while `pid` runs (anyone's process). A zombie is dead: it has ended and never runs again,
    its pid only waits for a parent to reap it, which a killed Ray worker's gone raylet never does."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's process
