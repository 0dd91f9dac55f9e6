"""A run that stops making progress fails with a report of what waits on what, on a real local Ray."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest

from pipeline.deblur.depth_pools import DepthGroup, EncodedBatch
from pipeline.deblur.job import ActorStartError
from pipeline.deblur.ray import driver
from pipeline.deblur.restorer import FrameRestorer
from pipeline.deblur.shard import output_names
from pipeline.formats.frames import FrameIn, FrameOut, Rejected
from pipeline.store.storage import Store
from tests.deblur_setup import Model, input_shards, routing_model
from tests.media import read_samples

pytestmark = pytest.mark.ray
STALL_S = 10.0  # also the actors' start-up budget: three of them load torch on 2 cores


class HangsOnFrame5(FrameRestorer):
    """Never answers for a batch with frame street_000005 (shard video-000001.tar)."""

    def __call__(self, frames: Sequence[FrameIn]) -> list[FrameOut | Rejected]:
        if any(f.key == "street_000005" for f in frames):
            time.sleep(3600)
        return super().__call__(frames)


class HangsAtDepth3(FrameRestorer):
    def decode_depth(self, group: DepthGroup) -> DepthGroup:
        if group.depth == 3:
            time.sleep(3600)
        return super().decode_depth(group)


def make_hanging_fused() -> HangsOnFrame5:
    return HangsOnFrame5(routing_model().model)


def make_hanging_pool() -> HangsAtDepth3:
    return HangsAtDepth3(routing_model().model)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Model]:
    return input_shards(tmp_path_factory, "stall-in")[0], routing_model()


def stall_job(source: Store, output: Path, **kw: object) -> driver.DeblurJob:
    return driver.DeblurJob(source.url, str(output), frames_per_batch=3, stall_timeout_s=STALL_S, **kw)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_restorer_that_never_answers_is_named_in_the_stall_report(
    local_ray: None, setup: tuple[Store, Model], tmp_path: Path
) -> None:
    source, model = setup
    job = stall_job(source, tmp_path / "out", resources=driver.Resources(workers=2, cpus_per_worker=0.5))
    start = time.monotonic()
    with pytest.raises(driver.StallError) as caught:
        driver.run(job, model.model, hooks=driver.Hooks(make_restorer=make_hanging_fused))
    assert time.monotonic() - start < 60
    report = str(caught.value)
    assert f"no frame finished for {STALL_S:.0f} s" in report
    line = next(line for line in report.splitlines() if "video-000001.tar" in line)
    assert re.search(
        r"0 frames done, waiting on adarevd-restorer-\w+-\d for batch street_000004\.\.street_000006", line
    ), report
    # The stuck shard is not done (the others may be: calls queued behind the hung one wait too). The
    # lease is free: a re-run (with a restorer that answers) takes the output at once and does the rest.
    output = Store(str(tmp_path / "out"))
    assert not output.exists(output_names("video-000001.tar")[1])
    done = [s for s in ("video-000000.tar", "images-000000.tar") if output.exists(output_names(s)[1])]
    again = driver.run(stall_job(source, tmp_path / "out"), model.model)
    assert (again.shards_skipped, len(again.reports), again.took_over) == (len(done), 3 - len(done), None)
    assert len(read_samples(output)) == 10


@pytest.mark.slow
def test_a_depth_pool_that_never_answers_is_named_in_the_stall_report(
    local_ray: None, setup: tuple[Store, Model], tmp_path: Path
) -> None:
    source, model = setup
    resources = driver.Resources(workers=2, cpus_per_worker=0.5, cpus_per_encoder=0.5)
    job = stall_job(source, tmp_path / "out", resources=resources, routing="depth-pools")
    with pytest.raises(driver.StallError) as caught:
        driver.run(job, model.model, hooks=driver.Hooks(make_restorer=make_hanging_pool))
    report = str(caught.value)
    waiting = [line for line in report.splitlines() if "waiting on" in line]
    assert waiting and all(
        re.search(r"waiting on depth-3 pool actor adarevd-restorer-\w+-\d for batch ", line) for line in waiting
    ), report


def test_actors_that_cannot_be_placed_are_reported_with_the_cluster_free_resources(
    local_ray: None, setup: tuple[Store, Model], tmp_path: Path
) -> None:
    source, model = setup
    job = stall_job(source, tmp_path / "out", resources=driver.Resources(workers=1, cpus_per_worker=64))
    job = dataclasses.replace(job, stall_timeout_s=3.0)
    with pytest.raises(driver.StallError, match=r"1 restorer actor\(s\) asking for 64 CPU .* within 3 s.*'CPU': 2.0"):
        driver.run(job, model.model)


def make_unreadable_weights() -> FrameRestorer:
    raise FileNotFoundError("/mnt/models/adarevd-b.safetensors: no such file on this node")


def test_an_actor_that_cannot_build_its_model_stops_the_run_at_once_with_its_reason(
    local_ray: None, setup: tuple[Store, Model], tmp_path: Path
) -> None:
    source, model = setup
    job = dataclasses.replace(stall_job(source, tmp_path / "out"), stall_timeout_s=300.0)
    start = time.monotonic()
    with pytest.raises(ActorStartError) as caught:
        driver.run(job, model.model, hooks=driver.Hooks(make_restorer=make_unreadable_weights))
    assert time.monotonic() - start < 120  # not the start-up budget of 300 s
    assert re.match(
        r"actor adarevd-restorer-\w+-\d failed to start: FileNotFoundError: /mnt/models/adarevd-b\.safetensors: "
        r"no such file on this node\. Each model actor builds the model itself",
        str(caught.value),
    ), caught.value
    output = Store(str(tmp_path / "out"))
    assert not output.glob("*.tar") and not output.glob("_manifest/*")


class DiesOnceThenCannotStart(FrameRestorer):
    """Its process dies on frame street_000005 the first time one comes (fused: restoring it; depth
    pools: encoding it); rebuilt after that by Ray's restart, it fails as a broken device would."""

    def __init__(self, crashed: str) -> None:
        if os.path.exists(crashed):
            raise RuntimeError("CUDA error: no CUDA-capable device is detected")
        super().__init__(routing_model().model)
        self.crashed = crashed

    def crash(self) -> None:
        if not os.path.exists(self.crashed):
            Path(self.crashed).touch()
            os._exit(1)

    def __call__(self, frames: Sequence[FrameIn]) -> list[FrameOut | Rejected]:
        if any(f.key == "street_000005" for f in frames):
            self.crash()
        return super().__call__(frames)

    def encode_by_depth(self, frames: Sequence[FrameIn]) -> list[EncodedBatch | DepthGroup]:
        if any(f.key == "street_000005" for f in frames):
            self.crash()
        return super().encode_by_depth(frames)


@pytest.mark.parametrize("routing", ["fused", "depth-pools"])
def test_an_actor_that_cannot_be_rebuilt_after_a_crash_stops_the_run_with_its_reason(
    local_ray: None, setup: tuple[Store, Model], tmp_path: Path, routing: str
) -> None:
    """Ray holds such an actor dead for good. The run stops at once and says why (not a batch resent
    round the others until one fails with Ray's traceback, nor a run that quietly goes on short)."""
    source, model = setup
    resources = driver.Resources(workers=2, cpus_per_worker=0.5, cpus_per_encoder=0.5)
    job = stall_job(source, tmp_path / "out", resources=resources, routing=routing)
    job = dataclasses.replace(job, stall_timeout_s=300.0)
    crashed = tmp_path / "crashed"
    start = time.monotonic()
    with pytest.raises(ActorStartError) as caught:
        driver.run(job, model.model, hooks=driver.Hooks(make_restorer=partial(DiesOnceThenCannotStart, str(crashed))))
    assert crashed.exists() and time.monotonic() - start < 150  # not the stall budget of 300 s
    # Fused: the restorer dies; depth pools: the encoder actor, which encodes frame 5.
    assert re.match(
        r"actor adarevd-(restorer|encoder)-\w+-\d failed to restart: RuntimeError: CUDA error: no CUDA-capable "
        r"device is detected\. Each model actor builds the model itself .* The shards committed so far are kept",
        str(caught.value),
    ), caught.value
    output = Store(str(tmp_path / "out"))
    assert not output.exists(output_names("video-000001.tar")[1])  # the shard of frame 5 is not done
    done = [s for s in ("video-000000.tar", "images-000000.tar") if output.exists(output_names(s)[1])]
    again = driver.run(dataclasses.replace(job, stall_timeout_s=STALL_S), model.model)
    assert (again.shards_skipped, len(again.reports)) == (len(done), 3 - len(done))
    assert len(read_samples(output)) == 10
