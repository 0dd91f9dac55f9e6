"""`adarevd train` on Ray Train: 2 CPU workers (gloo) on two nodes of a cluster, with data, checkpoints
and output in S3, give exactly what 2 plain processes give."""

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
from safetensors.torch import load

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
def test_two_workers_on_two_nodes_with_everything_in_s3_match_two_plain_processes(s3: S3Server, tmp_path: Path) -> None:
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
    assert result.steps == 4 and result.resumed_from == 0
    store = Store(prefix, options)
    (tmp_path / "nodes.safetensors").write_bytes(store.read_bytes("nodes.safetensors"))
    history = json.loads(read_state_dict(tmp_path / "nodes.safetensors")[1][HISTORY_KEY])
    assert history[-1]["world"] == 2
    assert store.exists("ck/latest.json") and store.exists("ck/step-00000004")
    # The marks the workers looked for beside the output and in the checkpoints folder are gone.
    assert store.glob("*.seen-*") == [] and store.glob("ck/_seen-*") == []
    plain = TrainSpec(output=f"{prefix}/plain.safetensors", **common)
    mp.spawn(_rank, args=(plain, 29400 + (os.getpid() + 250) % 500), nprocs=2)
    train(TrainSpec(output=f"{prefix}/one.safetensors", **common))
    a, b, c = (load(store.read_bytes(f"{name}.safetensors")) for name in ("nodes", "plain", "one"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the second worker's data made a difference
