"""The distributed dataflow, one folder per stage: store/ and formats/ (bytes and what they are), ingest/,
synth/, deblur/ (with deblur/ray/), cluster/, report/, train/, and assemble (frames back into videos).

`from pipeline import Deblur`: the model as a Ray Data stage (`pipeline.deblur.stage`); loaded on first
use, so that importing `pipeline` loads no model runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.deblur.stage import Deblur

__all__ = ["Deblur"]


def __getattr__(name: str) -> Any:
    if name == "Deblur":
        from pipeline.deblur.stage import Deblur

        return Deblur
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
