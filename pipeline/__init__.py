"""The distributed dataflow, one folder per stage: store/ and formats/ (bytes and what they are), ingest/,
synth/, deblur/ (with deblur/ray/), cluster/, report/, train/, and assemble (frames back into videos).

`from pipeline import Deblur`: the model as a Ray Data stage (`pipeline.deblur.stage`);
`from pipeline import load_model`: a model with weights from files or any fsspec URL. Both load on
first use, so that importing `pipeline` loads no model runtime."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.deblur.stage import Deblur
    from pipeline.store.weights_cache import load_model

__all__ = ["Deblur", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "Deblur":
        from pipeline.deblur.stage import Deblur

        return Deblur
    if name == "load_model":
        from pipeline.store.weights_cache import load_model

        return load_model
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
