"""`adarevd train` on Ray Train: 2 CPU workers (gloo) give exactly what 2 plain processes give, on one
node and on two nodes of a cluster with data, checkpoints and output in S3."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ray.cluster_utils import Cluster
from safetensors.torch import load, load_file

from adarevd.weights import read_state_dict
from pipeline.deblur.ray import driver
from pipeline.formats.images import encode
from pipeline.formats.shards import Sample, encode_shard
from pipeline.formats.sink import ShardLimits
from pipeline.store.storage import Store
from pipeline.synth.pairs import SynthConfig, write_pairs
from pipeline.train.pair_stream import PairDataError
from pipeline.train.ray_train import TrainResources, fit
from pipeline.train.trainer import HISTORY_KEY, TrainSpec, train
from tests.s3server import S3Server

pytestmark = pytest.mark.ray


def _rank(rank: int, spec: TrainSpec, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        train(spec, rank, 2)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ray_train_workers_match_two_plain_processes(tmp_path: Path) -> None:
    data = str(tmp_path / "pairs")
    write_pairs(Store(data), SynthConfig(count=4, size=(72, 72), limits=ShardLimits(max_samples=2)))
    common = dict(kind="encoder", data=data, iterations=4, batch=2, crop=64, log_every=2)
    on_ray = TrainSpec(output=str(tmp_path / "ray.safetensors"), checkpoints=str(tmp_path / "ck"), **common)
    driver.ensure_ray(None, num_cpus=2)
    try:
        result = fit(on_ray, TrainResources(workers=2, cpus_per_worker=1))
    finally:
        ray.shutdown()
    assert result.steps == 4 and result.resumed_from == 0
    history = json.loads(read_state_dict(tmp_path / "ray.safetensors")[1][HISTORY_KEY])
    assert history[-1]["world"] == 2
    assert (tmp_path / "ck" / "latest.json").exists()
    # The marks the workers looked for beside the output and in the checkpoints folder are gone.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "pairs", "ray.safetensors"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest.json", "step-00000004"]

    plain = TrainSpec(output=str(tmp_path / "plain.safetensors"), **common)
    mp.spawn(_rank, args=(plain, 29400 + os.getpid() % 500), nprocs=2)
    a, b = load_file(str(tmp_path / "ray.safetensors")), load_file(str(tmp_path / "plain.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    single = TrainSpec(output=str(tmp_path / "one.safetensors"), **common)
    train(single)
    c = load_file(str(tmp_path / "one.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the second worker's data made a difference


@pytest.mark.slow
def test_a_workers_error_is_raised_as_itself_and_missing_data_before_any_worker(tmp_path: Path) -> None:
    # Before: both came out as Ray Train's WorkerGroupError, a traceback with the message inside.
    spec = TrainSpec(
        kind="encoder",
        data=str(tmp_path / "none"),
        output=str(tmp_path / "w.safetensors"),
        iterations=2,
        batch=2,
        crop=64,
    )
    pair = Sample("a_000000", {"blur.png": encode(np.zeros((72, 72, 3), np.uint8))})  # no sharp.png
    Store(str(tmp_path / "bad")).commit_bytes("pairs-000000.tar", encode_shard([pair]))
    driver.ensure_ray(None, num_cpus=2)
    try:
        with pytest.raises(PairDataError, match=r"none: no \*\.tar shards; make paired shards"):
            fit(spec, TrainResources(workers=2))
        with pytest.raises(PairDataError, match=r"pairs-000000\.tar: sample 'a_000000'"):
            fit(replace(spec, data=str(tmp_path / "bad")), TrainResources(workers=1))
    finally:
        ray.shutdown()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no weights, no mark left


@pytest.mark.s3
@pytest.mark.slow
def test_two_workers_on_two_nodes_with_everything_in_s3_match_two_plain_processes(s3: S3Server) -> None:
    """Each worker node has one CPU and the head none, so the two workers can only run one a node."""
    prefix = f"s3://{s3.bucket}/train-{time.time_ns()}"
    options = s3.storage_options
    write_pairs(
        Store(f"{prefix}/pairs", options), SynthConfig(count=4, size=(72, 72), limits=ShardLimits(max_samples=2))
    )
    common = dict(
        kind="encoder", data=f"{prefix}/pairs", iterations=4, batch=2, crop=64, log_every=2, storage_options=options
    )
    on_nodes = TrainSpec(output=f"{prefix}/nodes.safetensors", checkpoints=f"{prefix}/ck", **common)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="WARNING")
        assert len({n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")}) == 2
        result = fit(on_nodes, TrainResources(workers=2, cpus_per_worker=1))
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result.steps == 4
    store = Store(prefix, options)
    assert store.exists("ck/latest.json")
    assert store.glob("*.seen-*") == [] and store.glob("ck/_seen-*") == []
    plain = TrainSpec(output=f"{prefix}/plain.safetensors", **common)
    mp.spawn(_rank, args=(plain, 29400 + (os.getpid() + 250) % 500), nprocs=2)
    a, b = (load(store.read_bytes(name)) for name in ("nodes.safetensors", "plain.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
