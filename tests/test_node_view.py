"""A node that does not see the run's input or output (`node_view.check_sees`): without Ray (two folders
stand for what the driver and another node see at one name), and a real node that lacks a folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.cluster.node_view import NodeCannotSee, Place, check_sees
from pipeline.ingest.run import ingest
from pipeline.store.lease import OutputLock
from pipeline.store.storage import Store
from pipeline.synth.pairs import SynthConfig, write_pairs
from tests.media import frames, write_video
from tests.s3server import free_port

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Place("a" * 8, "head-host", "10.0.0.1")
OTHER = Place("b" * 8, "gpu-host", "10.0.0.2")
HINT = "The driver runs on node 10.0.0.1 (head-host, aaaaaaaa); every node of the cluster must see the input"


def test_a_node_that_sees_the_input_shard_and_the_runs_lease_passes(tmp_path: Path) -> None:
    source, output = Store(str(tmp_path / "in")), Store(str(tmp_path / "out"))
    source.commit_bytes("video-000000.tar", b"a shard")
    lock = OutputLock(output, "run")
    lock.acquire()
    check_sees(source, output, "video-000000.tar", lock.fence(), OTHER, DRIVER)
    OutputLock(output, "next").acquire(take_over=True)  # a newer lease: seen too (the fence then stops it)
    check_sees(source, output, "video-000000.tar", lock.fence(), OTHER, DRIVER)


def test_a_node_without_the_input_shard_is_named_with_the_driver_and_what_to_give(tmp_path: Path) -> None:
    output = Store(str(tmp_path / "out"))
    lock = OutputLock(output, "run")
    lock.acquire()
    empty = Store(str(tmp_path / "in-as-this-node-sees-it"))
    with pytest.raises(NodeCannotSee) as raised:
        check_sees(empty, output, "video-000000.tar", lock.fence(), OTHER, DRIVER)
    message = str(raised.value)
    shard = f"{tmp_path}/in-as-this-node-sees-it/video-000000.tar"
    assert message.startswith(
        f"{shard}: node 10.0.0.2 (gpu-host, bbbbbbbb) does not see this input shard, which the driver "
        f"listed (removed since?). {HINT} and output as it does: a local path"
    )
    assert "localhost is each node's own machine" in message


def test_a_node_that_sees_another_output_folder_is_stopped_before_it_writes_there(tmp_path: Path) -> None:
    source = Store(str(tmp_path / "in"))
    source.commit_bytes("video-000000.tar", b"a shard")
    lock = OutputLock(Store(str(tmp_path / "out")), "run")
    lock.acquire()
    elsewhere = Store(str(tmp_path / "out-on-another-disk"))
    lost = r"out-on-another-disk: node 10.0.0.2 \(gpu-host, bbbbbbbb\) does not see this run's lease \(_lock/\) there"
    with pytest.raises(
        NodeCannotSee,
        match=lost + ", so it is not the output folder the driver writes. The driver runs on node 10.0.0.1",
    ):
        check_sees(source, elsewhere, "video-000000.tar", lock.fence(), OTHER, DRIVER)
    assert not (tmp_path / "out-on-another-disk").exists()  # nothing written there


def unshare_works() -> bool:
    try:
        return (
            subprocess.run(["unshare", "-m", "-p", "-f", "--mount-proc", "true"], capture_output=True).returncode == 0
        )
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def cluster_that_does_not_see(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A one-node `ray start` cluster in mount and pid namespaces of its own, where a temporary folder
    `hidden` is an empty tmpfs: a node whose disk lacks a folder that the driver (a process outside)
    sees. Yields its address and that folder."""
    if not unshare_works():
        pytest.skip("needs mount and pid namespaces (`unshare -m -p`, e.g. as root) for a node that sees other folders")
    hidden = tmp_path_factory.mktemp("hidden")
    ray, port, temp = Path(sys.executable).with_name("ray"), free_port(), f"/tmp/rv-{os.getpid()}"
    start = (
        f"mount -t tmpfs none {hidden} && exec {ray} start --head --port={port} --num-cpus=2 --block "
        f"--include-dashboard=false --disable-usage-stats --temp-dir={temp}"
    )
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    # --kill-child: once unshare is killed, so is the namespace's first process, and with it every one in it.
    node = subprocess.Popen(
        ["unshare", "-m", "-p", "-f", "--mount-proc", "--kill-child=SIGKILL", "sh", "-c", start],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        status = [str(ray), "status", f"--address=127.0.0.1:{port}"]
        while subprocess.run(status, env=env, capture_output=True).returncode != 0:
            assert node.poll() is None and time.monotonic() < deadline, "the namespaced Ray node did not start"
            time.sleep(1)
        yield f"127.0.0.1:{port}", hidden
    finally:
        node.kill()  # (unshare waits out a SIGTERM)
        node.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.ray
def test_a_cluster_node_that_does_not_see_a_local_input_or_output_stops_the_run_by_name(
    cluster_that_does_not_see: tuple[str, Path], tmp_path: Path
) -> None:
    address, hidden = cluster_that_does_not_see

    def deblur(source: Path, output: Path) -> str:
        return refused(
            "deblur", str(source), str(output), "--address", address, "--workers", "1", "--storage-retry", "5"
        )

    ingest([str(write_video(tmp_path / "v.mkv", frames(2)))], Store(str(hidden / "frames")))
    ingest([str(write_video(tmp_path / "v.mkv", frames(2)))], Store(str(tmp_path / "in")))
    # Before: the input's FileNotFoundError with a traceback of the shard worker; a local output on such a
    # node would have been written on its own disk, out of the driver's sight.
    err = deblur(hidden / "frames", tmp_path / "out")
    assert f"error: {hidden}/frames/frames-000000.tar: node " in err
    assert "does not see this input shard, which the driver listed (removed since?). The driver runs on node" in err
    assert "Traceback" not in err
    err = deblur(tmp_path / "in", hidden / "out")
    assert f"error: {hidden}/out: node " in err and "does not see this run's lease (_lock/) there" in err
    for output in (tmp_path / "out", hidden / "out"):  # nothing but the mark of an unfinished deblur
        assert sorted(str(p.relative_to(output)) for p in output.rglob("*")) == ["_lock", "_lock/unfinished"]


@pytest.mark.slow
@pytest.mark.ray
def test_training_on_a_cluster_node_that_does_not_see_the_data_or_the_output_stops_before_any_step(
    cluster_that_does_not_see: tuple[str, Path], tmp_path: Path
) -> None:
    address, hidden = cluster_that_does_not_see
    write_pairs(Store(str(hidden / "pairs")), SynthConfig(count=2, size=(72, 72)))
    write_pairs(Store(str(tmp_path / "pairs")), SynthConfig(count=2, size=(72, 72)))

    def train(data: Path, output: Path) -> str:
        return refused(
            "train",
            "encoder",
            str(data),
            "--output",
            str(output),
            "--iterations",
            "2",
            "--batch",
            "2",
            "--crop",
            "64",
            "--workers",
            "1",
            "--address",
            address,
        )

    def error(err: str) -> str:  # (Ray Train logs the worker's traceback too, forwarded by Ray)
        return next(line for line in err.splitlines() if line.startswith("adarevd train: error: "))

    err = train(hidden / "pairs", tmp_path / "w.safetensors")
    assert error(err).startswith(f"adarevd train: error: {hidden}/pairs/pairs-000000.tar: node ")
    assert "does not see the training data, which the driver lists. The driver runs on node" in error(err)
    # Before: the weights were written on that node's disk, and the driver failed to find them at the end.
    err = train(tmp_path / "pairs", hidden / "w.safetensors")
    assert error(err).startswith(f"adarevd train: error: {hidden}/w.safetensors.seen-")
    assert "does not see the mark the driver wrote beside the output" in error(err)
    assert list(hidden.glob("w.safetensors*")) == []  # no weights, no mark left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]


def refused(*argv: str) -> str:
    """Run `adarevd ARGV`, which must exit with 2; its stderr."""
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *argv], cwd=ROOT, env=env, capture_output=True, timeout=300
    )
    err = done.stderr.decode()
    assert done.returncode == 2, err[-3000:]
    return err
