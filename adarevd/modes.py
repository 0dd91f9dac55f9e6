"""The model's modes, as plain types: torch-free, so that job configs and shard workers name them
without loading a model runtime."""

from __future__ import annotations

from typing import Literal

EncoderMode = Literal["frame", "patch"]  # encode each frame whole, or each patch apart (the paper's)
ExitMode = Literal["adaptive"] | int  # the classifier picks each patch's depth, or every patch runs N
EncoderKind = Literal["ufpnet", "nafnet"]
ClassifierInput = Literal["e3", "e4"]  # which encoder level the classifier reads
Blend = Literal["normalised", "reference"]  # a weighted mean over overlaps, or the reference's weights
Compile = Literal["auto", "on", "off"]  # torch.compile the model: by the work ahead, always, never
Precision = Literal["auto", "fp32", "bf16"]  # bf16 autocast: by the device (CUDA with bf16 tensor cores), always, never
