"""Scratch folders of killed processes are removed by the next process; nobody else's are touched."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.store.processes import alive
from pipeline.store.scratch import HOST, pattern, remove_orphans, scratch

DEMO_CLIP = Path(__file__).parents[1] / "adarevd" / "assets" / "demo_clip.mp4"


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_only_folders_of_gone_processes_of_this_machine_are_removed(tmp_path: Path) -> None:
    gone = tmp_path / f"adarevd-deblur-{HOST}-{dead_pid()}-abc"
    other_host = "0" * 8 if HOST != "0" * 8 else "1" * 8
    kept = [
        tmp_path / f"adarevd-shard-{HOST}-{os.getpid()}-def",  # alive: this process
        tmp_path / f"adarevd-video-{other_host}-{dead_pid()}-ghi",  # another machine
        tmp_path / "adarevd-deblur-notapid",
        tmp_path / f"tmp-{HOST}-{dead_pid()}-jkl",
    ]
    for folder in [gone, *kept]:
        folder.mkdir()
        (folder / "out.tar").write_bytes(b"partial")
    assert remove_orphans(str(tmp_path)) == [str(gone)]
    assert not gone.exists() and all(folder.exists() for folder in kept)


def test_a_folder_of_an_ended_process_not_yet_reaped_is_removed(tmp_path: Path) -> None:
    """A Ray worker killed with its raylet stays a zombie until someone reaps it: it is gone all the same."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # ends; not reaped until wait() below
    try:
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        folder = tmp_path / f"adarevd-deblur-{HOST}-{zombie.pid}-abc"
        folder.mkdir()
        assert not alive(zombie.pid) and remove_orphans(str(tmp_path)) == [str(folder)]
    finally:
        zombie.wait()
    assert alive(os.getpid())


def test_a_processs_first_scratch_folder_in_a_place_sweeps_it(tmp_path: Path) -> None:
    gone = tmp_path / f"adarevd-train-{HOST}-{dead_pid()}-abc"
    gone.mkdir()
    with scratch("weights", str(tmp_path)) as folder:
        assert not gone.exists()
        assert Path(folder).parent == tmp_path and glob.glob(pattern("weights", str(tmp_path))) == [folder]
    assert not Path(folder).exists()
    with pytest.raises(ValueError, match="lowercase letters"):
        scratch("deblur-2")


def test_an_ingest_killed_mid_shard_leaves_folders_the_next_ingest_removes(tmp_path: Path) -> None:
    temp, first = stopped_mid_shard(tmp_path, signal.SIGKILL)
    assert first.returncode == -signal.SIGKILL
    left = sorted(os.listdir(temp))
    assert any(name.startswith("adarevd-shard-") for name in left), left

    second = ingest(tmp_path, temp, "second")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err.decode()
    assert os.listdir(temp) == [], "the killed ingest's scratch folders (or the second's own) are still there"
    assert len(glob.glob(str(tmp_path / "second" / "frames-*.tar"))) == 1


def test_an_ingest_stopped_with_sigterm_removes_its_folders_and_commits_nothing_partial(tmp_path: Path) -> None:
    temp, first = stopped_mid_shard(tmp_path, signal.SIGTERM)
    assert first.returncode == 128 + signal.SIGTERM
    assert os.listdir(temp) == []
    output = tmp_path / "first"
    assert not glob.glob(str(output / "frames-*.tar")) and not (output / "_index.parquet").exists()


def ingest(tmp_path: Path, temp: Path, output: str) -> subprocess.Popen[bytes]:
    """`adarevd ingest` of three copies of the demo clip, with `temp` as its temporary folder."""
    sources = [shutil.copy(DEMO_CLIP, tmp_path / f"clip{i}.mp4") for i in range(3)]
    command = [sys.executable, "-m", "jobs.cli", "ingest", *map(str, sources), "--output", str(tmp_path / output)]
    env = os.environ | {"TMPDIR": str(temp)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stopped_mid_shard(tmp_path: Path, signum: int) -> tuple[Path, subprocess.Popen[bytes]]:
    """An ingest sent `signum` while its first shard is partly written; returns its temporary folder."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    first = ingest(tmp_path, temp, "first")
    deadline = time.monotonic() + 60
    partial: list[str] = []
    while not partial and first.poll() is None and time.monotonic() < deadline:
        partial = [p for p in glob.glob(os.path.join(pattern("shard", str(temp)), "*.tar")) if os.path.getsize(p)]
        time.sleep(0.005)
    assert partial, f"no partial shard seen before the ingest ended (rc {first.poll()})"
    first.send_signal(signum)
    first.wait(timeout=60)
    return temp, first
