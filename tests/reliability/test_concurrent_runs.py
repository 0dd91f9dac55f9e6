"""Two runs on one output: the lease in `_lock/` lets exactly one write it; a dead or silent holder is
taken over; a holder that lost its lease notices. On local folders and the real S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pipeline.deblur.ray import driver
from pipeline.deblur.restorer import FrameRestorer
from pipeline.deblur.resume import refuse_foreign
from pipeline.deblur.shard import MANIFEST_DIR
from pipeline.formats.frames import FrameIn, FrameOut, Rejected
from pipeline.store.lease import LOCK_DIR, UNFINISHED, LockLost, OutputLock, OutputLocked
from pipeline.store.storage import Store
from tests.deblur_setup import bundled_model, make_input, tar_bytes
from tests.media import read_samples
from tests.reliability.conftest import Entry, audit
from tests.s3server import S3Server

pytestmark = pytest.mark.reliability
ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def race(store: Store, runs: int) -> list[str]:
    """`runs` threads try to take the output at once; returns the run ids that got it."""
    winners: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(runs)

    def attempt(i: int) -> None:
        lock = OutputLock(store, f"run{i}")
        start.wait()
        try:
            lock.acquire()
            winners.append(lock.run_id)
        except OutputLocked:
            pass
        except BaseException as e:  # anything else is a failure of the test
            errors.append(e)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return winners


def test_one_of_many_simultaneous_runs_gets_the_output(tmp_path: Path, ledger: Entry) -> None:
    for attempt in range(5):
        assert len(race(Store(str(tmp_path / f"out{attempt}")), 8)) == 1
    ledger.faults = 5 * 7  # runs turned away


@pytest.mark.s3
def test_one_of_many_simultaneous_runs_gets_an_s3_output(s3: S3Server, ledger: Entry) -> None:
    for attempt in range(3):
        store = Store(f"s3://{s3.bucket}/lock-race-{attempt}-{os.getpid()}", s3.storage_options)
        assert len(race(store, 6)) == 1  # If-None-Match on the create
    ledger.faults = 3 * 5


def test_a_live_holder_keeps_the_output_and_a_gone_one_is_replaced(tmp_path: Path) -> None:
    store, clock = Store(str(tmp_path / "out")), Clock()
    first = OutputLock(store, "first", stale_after_s=60, clock=clock)
    first.acquire()
    with pytest.raises(OutputLocked, match=r"is being written by run first \(host .*, pid \d+.*--take-over"):
        OutputLock(store, "second", stale_after_s=60, clock=clock).acquire()
    clock.now += 30
    first.beat()
    clock.now += 59  # 59 s since the last beat: still alive
    with pytest.raises(OutputLocked):
        OutputLock(store, "second", stale_after_s=60, clock=clock).acquire()
    clock.now += 2  # 61 s: its heartbeat stopped
    second = OutputLock(store, "second", stale_after_s=60, clock=clock)
    second.acquire()
    assert "run first" in (second.took_over or "") and "heartbeat stopped" in second.took_over
    with pytest.raises(LockLost, match="taken over by run second"):
        first.beat()  # the old holder finds out at its next beat
    first.release()  # and removes nothing of the new holder's
    third = OutputLock(store, "third", clock=clock)
    with pytest.raises(OutputLocked, match="run second"):
        third.acquire()
    second.release()
    assert store.glob(f"{LOCK_DIR}/*") == []
    third.acquire()  # a released output is free at once
    third.release()


def test_a_fence_lets_a_run_commit_only_while_it_holds_the_lease(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    first = OutputLock(store, "first")
    first.acquire()
    fence = first.fence()
    fence.check(store)  # held: commit
    second = OutputLock(store, "second")
    second.acquire(take_over=True)
    with pytest.raises(LockLost, match=r"out was taken over by run second .*; this run stops"):
        fence.check(store)
    second_fence = second.fence()
    second_fence.check(store)
    second.release()  # (also removes the generation it replaced)
    with pytest.raises(LockLost, match=r"_lock/00000002\.json: this run's lease is gone \(the run ended"):
        second_fence.check(store)  # a shard worker that outlives its stopped run commits nothing
    with pytest.raises(LockLost, match="lease is gone"):
        fence.check(store)


def mark_test(store: Store, tree: Callable[[], list[str]]) -> None:
    with pytest.raises(RuntimeError, match="mid-run"), OutputLock(store, "failed").held() as lock:
        lock.mark_unfinished()
        store.commit_bytes("video-000000.tar", b"a deblurred shard, its manifest not yet written")
        raise RuntimeError("mid-run")
    assert tree() == [UNFINISHED, "video-000000.tar"]  # the lease given back, the output marked as ours
    refuse_foreign(store, ["video-000000.tar"])  # so a re-run resumes it instead of refusing it as foreign
    with OutputLock(store, "resumed").held() as lock:
        lock.mark_unfinished()
        assert store.read_bytes(UNFINISHED) == b'{"run_id": "resumed"}'
        store.commit_bytes("_run.json", b"{}")
    assert tree() == ["_run.json", "video-000000.tar"]  # finished: no lease, no mark, no _tmp/


def test_a_failed_deblur_marks_its_output_and_a_finished_one_leaves_no_lease(tmp_path: Path) -> None:
    out = tmp_path / "out"
    mark_test(Store(str(out)), lambda: sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()))
    assert sorted(p.name for p in out.iterdir()) == ["_run.json", "video-000000.tar"]  # no empty folders


@pytest.mark.s3
def test_a_failed_deblur_marks_its_s3_output_and_a_finished_one_leaves_no_lease(s3: S3Server) -> None:
    store = Store(f"s3://{s3.bucket}/mark-{os.getpid()}", s3.storage_options)

    def tree() -> list[str]:
        store.fs.invalidate_cache()
        return sorted(path[len(store.root) + 1 :] for path in store.fs.find(store.root))

    mark_test(store, tree)
    assert store.glob("*") == ["_run.json", "video-000000.tar"]  # no folder entries left (SeaweedFS has them)


def test_an_unreadable_lease_is_named_not_guessed(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    store.commit_bytes(f"{LOCK_DIR}/00000001.json", b"{not json")
    with pytest.raises(OutputLocked, match=r"00000001\.json: an unreadable lease .* remove _lock/ and re-run"):
        OutputLock(store, "next").acquire()


def test_a_holder_whose_process_died_on_this_host_is_replaced_at_once(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    code = (
        f"from pipeline.store.lease import OutputLock; from pipeline.store.storage import Store; "
        f"OutputLock(Store({str(store.url)!r}), 'crashed').acquire()"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)  # exits holding it (never released)
    lock = OutputLock(store, "next")
    lock.acquire()
    assert "run crashed" in (lock.took_over or "") and "process is gone" in lock.took_over
    forced = OutputLock(store, "forced")
    forced.acquire(take_over=True)  # a live holder, but the user says it is dead
    assert "--take-over" in (forced.took_over or "")


def test_two_deblur_commands_at_once_on_one_output(tmp_path: Path, ledger: Entry) -> None:
    source = Store(str(tmp_path / "in"))
    make_input(tmp_path, source)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="rt-", dir="/tmp")}
    command = [
        sys.executable,
        "-m",
        "jobs.cli",
        "deblur",
        source.url,
        str(out),
        "--num-cpus",
        "1",
        "--workers",
        "1",
        "--frames-per-batch",
        "3",
    ]
    runs = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)
    ]
    results = [(p.wait(300), p.stdout.read().decode(), p.stderr.read().decode()) for p in runs]  # type: ignore[union-attr]
    codes = sorted(code for code, _, _ in results)
    refused = next((err for code, _, err in results if code == 2), "")
    # Either one was refused while the other ran, or they did not overlap at all (the second found
    # every shard done). Never both writing.
    if codes == [0, 2]:
        assert "is being written by run" in refused and "Traceback" not in refused
    else:
        assert codes == [0, 0] and any("nothing to do" in out_ for _, out_, _ in results), results
    # And for certain: while another live run holds the output, a run is refused and writes nothing.
    reference = tmp_path / "reference"
    holder = OutputLock(Store(str(reference)), "holder")
    holder.acquire()
    blocked = subprocess.run([*command[:5], str(reference), *command[6:]], cwd=ROOT, env=env, capture_output=True)
    assert blocked.returncode == 2 and b"is being written by run holder" in blocked.stderr
    assert [p for p in reference.rglob("*") if p.is_file() and LOCK_DIR not in p.parts] == []  # only the lease
    holder.release()
    subprocess.run([*command[:5], str(reference), *command[6:]], cwd=ROOT, env=env, check=True, capture_output=True)
    assert tar_bytes(Store(str(out))) == tar_bytes(Store(str(reference)))
    assert not (out / LOCK_DIR).exists() or not list((out / LOCK_DIR).iterdir())
    keys = set(read_samples(source))
    ledger.faults, ledger.frames = 2, len(keys)
    ledger.lost, ledger.duplicates = audit(Store(str(out)), keys)
    assert (ledger.lost, ledger.duplicates) == (0, 0)


class SlowRestorer(FrameRestorer):
    """The bundled model, a second per batch slower: commits come a second or more apart."""

    def __call__(self, frames: Sequence[FrameIn]) -> list[FrameOut | Rejected]:
        time.sleep(1.0)
        return super().__call__(frames)


def make_slow_restorer() -> SlowRestorer:
    return SlowRestorer(bundled_model().model)


@pytest.mark.ray
def test_a_deblur_taken_over_mid_run_commits_no_further_shard(local_ray: None, tmp_path: Path, ledger: Entry) -> None:
    """A user's --take-over of a deblur that was still running: from then on the old run's shard workers
    commit nothing (they check the lease before each commit), not only once its driver's next heartbeat
    (30 s later) finds out; the old run stops naming the new holder and leaves the new lease alone."""
    source, output = Store(str(tmp_path / "in")), Store(str(tmp_path / "out"))
    make_input(tmp_path, source)  # 3 shards; one restorer: after the first commit, the next is >= 1 s away
    job = driver.DeblurJob(
        source.url,
        output.url,
        frames_per_batch=3,
        stall_timeout_s=120,
        resources=driver.Resources(workers=1, cpus_per_worker=1),
    )
    thief = OutputLock(output, "thief")
    committed: list[str] = []

    def take_over_after_the_first_shard(_: int, __: list[int]) -> None:
        if not committed and (done := output.glob(f"{MANIFEST_DIR}/*.parquet")):
            thief.acquire(take_over=True)
            committed.extend([*done, *output.glob("*.tar")])

    with pytest.raises(LockLost, match=r"out was taken over by run thief \(host .*\); this run stops"):
        driver.run(
            job,
            bundled_model().model,
            hooks=driver.Hooks(make_restorer=make_slow_restorer, on_progress=take_over_after_the_first_shard),
        )
    assert len(committed) == 2  # one manifest and its shard, when the thief took over
    assert sorted([*output.glob(f"{MANIFEST_DIR}/*.parquet"), *output.glob("*.tar")]) == sorted(committed)
    assert sorted(output.glob(f"{LOCK_DIR}/0*")) == ["_lock/00000002.beat", "_lock/00000002.json"]  # the thief's
    thief.release()
    resumed = driver.run(job, bundled_model().model)  # the thief gave up: the rest is done, once
    assert (resumed.shards_total, resumed.shards_skipped) == (3, 1)
    keys = set(read_samples(source))
    ledger.faults, ledger.frames = 1, len(keys)
    ledger.lost, ledger.duplicates = audit(output, keys)
    assert (ledger.lost, ledger.duplicates) == (0, 0)
