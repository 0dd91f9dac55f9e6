"""Waiting on Ray, and saying what for: the basis of the driver's stall report.

A shard worker blocks in `ray.get` on its actors. When an answer takes longer than `patience`
seconds, `patient_get` tells `on_wait` what it is waiting on (an actor's name and the work it was
given), and clears it once the answer comes; the driver's stall report lists these. A fast answer
costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError

OnWait = Callable[[str | None], None]


def patient_get(ref: Any, what: Callable[[], str], on_wait: OnWait | None, patience: float) -> Any:
    if on_wait is None:
        return ray.get(ref)
    try:
        return ray.get(ref, timeout=patience)
    except GetTimeoutError:
        on_wait(what())
    try:
        return ray.get(ref)
    finally:
        on_wait(None)


def batch_label(keys: list[str]) -> str:
    """A batch by its keys: 'k1' or 'k1..k9 (9 frames)'."""
    if len(keys) == 1:
        return keys[0]
    return f"{keys[0]}..{keys[-1]} ({len(keys)} frames)" if keys else "an empty batch"
