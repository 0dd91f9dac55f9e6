"""`adarevd train` on Ray Train: 2 CPU workers (gloo) give exactly what 2 plain processes give."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from adarevd.weights import read_state_dict
from pipeline import deblur
from pipeline.pairs import SynthConfig, write_pairs
from pipeline.sink import ShardLimits
from pipeline.storage import Store
from pipeline.train_ray import TrainResources, fit
from pipeline.trainer import HISTORY_KEY, TrainSpec, train

pytestmark = pytest.mark.ray


def _rank(rank: int, spec: TrainSpec, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        train(spec, rank, 2)
    finally:
        dist.destroy_process_group()


def test_two_ray_train_workers_match_two_plain_processes(tmp_path: Path) -> None:
    data = str(tmp_path / "pairs")
    write_pairs(Store(data), SynthConfig(count=4, size=(72, 72), limits=ShardLimits(max_samples=2)))
    common = dict(kind="encoder", data=data, iterations=4, batch=2, crop=64, log_every=2)
    on_ray = TrainSpec(output=str(tmp_path / "ray.safetensors"), checkpoints=str(tmp_path / "ck"), **common)
    deblur.ensure_ray(None, num_cpus=2)
    try:
        result = fit(on_ray, TrainResources(workers=2, cpus_per_worker=1))
    finally:
        ray.shutdown()
    assert result.steps == 4 and result.resumed_from == 0
    history = json.loads(read_state_dict(tmp_path / "ray.safetensors")[1][HISTORY_KEY])
    assert history[-1]["world"] == 2
    assert (tmp_path / "ck" / "latest.json").exists()

    plain = TrainSpec(output=str(tmp_path / "plain.safetensors"), **common)
    mp.spawn(_rank, args=(plain, 29400 + os.getpid() % 500), nprocs=2)
    a, b = load_file(str(tmp_path / "ray.safetensors")), load_file(str(tmp_path / "plain.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    single = TrainSpec(output=str(tmp_path / "one.safetensors"), **common)
    train(single)
    c = load_file(str(tmp_path / "one.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the second worker's data made a difference
