"""Shared fixtures. Set ADAREVD_TEST_DEVICE=cuda to run the model tests on a GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

import adarevd


@pytest.fixture(scope="session")
def device() -> torch.device:
    name = os.environ.get("ADAREVD_TEST_DEVICE", "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"ADAREVD_TEST_DEVICE={name} but CUDA is not available")
    return torch.device(name)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values (beta/gamma/alpha too) so no block is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            if name.split(".")[-1].startswith("alpha") and "ape" not in name:
                p.copy_(0.5 + noise.abs())  # keep the columns well conditioned
            else:
                p.copy_(noise + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))
    return model


@pytest.fixture
def tiny(device: torch.device) -> adarevd.AdaRevD:
    torch.manual_seed(0)
    return randomize(adarevd.build("adarevd-tiny")).to(device).eval()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """An embedded 2-CPU Ray for one test module (Ray is imported only by the modules that use it)."""
    import ray

    from pipeline.deblur.ray import driver

    driver.ensure_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS) on a free loopback port for the whole session."""
    from tests.s3server import S3Server

    server = S3Server(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def memory_store():
    """A fresh in-memory fsspec folder, cleared afterwards."""
    import uuid

    from fsspec.implementations.memory import MemoryFileSystem

    from pipeline.store.storage import Store

    name = f"memory://t{uuid.uuid4().hex[:8]}"
    yield Store(name)
    if MemoryFileSystem().exists(name):
        MemoryFileSystem().rm(name, recursive=True)
