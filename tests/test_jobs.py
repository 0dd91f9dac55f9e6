"""Job specs (TOML) and `adarevd submit` / `adarevd jobs`: here, and on a real `ray start` cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray.job_submission import JobSubmissionClient

from jobs.cli import long_options, main
from jobs.spec import SpecError, load_spec, secret_environment, to_argv
from jobs.submit import Commands, submit, wait_for
from pipeline.ingest.run import ingest
from pipeline.store.storage import Store
from tests.media import frames, write_video
from tests.s3server import free_port

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """\
name = "deblur-archive"
kind = "deblur"
input = "s3://archive/frames"
output = "s3://archive/deblurred"

[resources]
workers = 2
gpus_per_worker = 0.5

[storage]
endpoint_url = "http://127.0.0.1:8333"
key_env = "ARCHIVE_KEY"
secret_env = "ARCHIVE_SECRET"

[options]
frames_per_batch = 16
quarantine_ok = true
"""


def test_a_spec_becomes_the_command_line_and_secrets_stay_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(write(tmp_path, GOOD))
    argv = to_argv(spec)
    assert argv == [
        "deblur",
        "s3://archive/frames",
        "s3://archive/deblurred",
        "--workers",
        "2",
        "--gpus-per-worker",
        "0.5",
        "--frames-per-batch",
        "16",
        "--quarantine-ok",
        "--storage-option=client_kwargs.endpoint_url=http://127.0.0.1:8333",
    ]
    with pytest.raises(SpecError, match="key_env names \\$ARCHIVE_KEY, which is not set here"):
        secret_environment(spec)
    monkeypatch.setenv("ARCHIVE_KEY", "AKIA-test")
    monkeypatch.setenv("ARCHIVE_SECRET", "s3cr3t-value")
    assert secret_environment(spec) == {"AWS_ACCESS_KEY_ID": "AKIA-test", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"}
    assert "s3cr3t" not in " ".join(argv)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (GOOD.replace("workers = 2", 'workers = "two"'), ":7: resources.workers: expected integer, got 'two'"),
        (GOOD.replace('kind = "deblur"', 'kind = "paint"'), ":2: kind: 'paint' is not one of"),
        (GOOD.replace("[options]", "bogus = 1\n[options]"), ":15: storage.bogus: unknown field"),
        ("bogus = 1\n" + GOOD, ":1: bogus: unknown field"),
        (GOOD.replace("secret_env", "secret"), ":13: storage.secret: secrets only by environment-variable name"),
        (GOOD + 'aws_secret = "abc"\n', ":18: options.aws_secret: looks like a secret"),
        (GOOD.replace('input = "s3://archive/frames"\n', ""), "kind 'deblur' needs 'input'"),
        ('name = "x"\nkind = "synth"\noutput = [\n', "not valid TOML"),
        (GOOD.replace('name = "deblur-archive"', 'name = "../up"'), ":1: name: use letters"),
    ],
)
def test_bad_specs_name_the_line_and_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpecError) as error:
        load_spec(write(tmp_path, text))
    assert message in str(error.value) and "job.toml" in str(error.value)


def test_submit_without_address_runs_here(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write(
        tmp_path, f'name = "s"\nkind = "synth"\noutput = "{tmp_path}/pairs"\n[options]\ncount = 2\nsize = "32x32"\n'
    )
    assert main(["submit", str(spec)]) == 0
    assert (tmp_path / "pairs" / "pairs-000000.tar").exists()
    clip = Path(__file__).parent.parent / "adarevd" / "assets" / "demo_clip.mp4"
    ingest = write(
        tmp_path,
        f'name = "i"\nkind = "ingest"\ninput = "{clip}"\noutput = "{tmp_path}/frames"\n'
        f"[options]\nmax_frames_per_shard = 20\n",
        "ingest.toml",
    )
    assert main(["submit", str(ingest)]) == 0
    assert sorted(p.name for p in (tmp_path / "frames").glob("*.tar")) == [f"frames-00000{i}.tar" for i in range(3)]
    assert main(["submit", str(write(tmp_path, "kind = 1\n", "bad.toml"))]) == 2
    assert "bad.toml:1: kind: expected string" in capsys.readouterr().err


def running_specs() -> list[str]:
    """Processes on this machine running a job spec (Linux /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "jobs.cli run-spec" in text:
            found.append(text)
    return found


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """`ray start --head` (dashboard on loopback, a Ray Client server) plus one worker node; yields the
    dashboard URL, the head's address and its Ray Client address."""
    ray = str(Path(sys.executable).with_name("ray"))
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    port, dashboard, client = free_port(), free_port(), free_port()
    temp = f"/tmp/rj-{os.getpid()}"
    head = [
        ray,
        "start",
        "--head",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        "--num-cpus=1",
        "--include-dashboard=true",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
    ]
    subprocess.run(head, check=True, env=env, cwd=ROOT, capture_output=True)
    try:
        worker = [
            ray,
            "start",
            f"--address=127.0.0.1:{port}",
            "--num-cpus=1",
            "--disable-usage-stats",
            '--resources={"adarevd_worker": 1}',
        ]
        subprocess.run(worker, check=True, env=env, cwd=ROOT, capture_output=True)
        yield f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{port}", f"ray://127.0.0.1:{client}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


@pytest.mark.ray
def test_a_jobs_address_that_does_not_answer_is_named_with_what_to_give(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there once it is closed
    for argv in (["jobs", "list"], ["submit", str(write(tmp_path, GOOD))]):
        assert main([*argv, "--address", address]) == 2
        err = capsys.readouterr().err
        assert f"cannot reach the Ray Jobs API at {address} (Failed to connect to Ray" in err, err
        assert "Give the head's dashboard address (http://HEAD:8265" in err


@pytest.mark.slow
def test_jobs_on_a_real_cluster(head: tuple[str, str, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cluster = head[0]
    quick = write(
        tmp_path, f'name = "quick"\nkind = "synth"\noutput = "{tmp_path}/pairs"\n[options]\ncount = 3\nsize = "32x32"\n'
    )
    assert main(["submit", str(quick), "--address", cluster]) == 0
    job = capsys.readouterr().out.split()[1]
    assert job.startswith("quick-") and wait_for(cluster, job) == "SUCCEEDED"
    assert (tmp_path / "pairs" / "pairs-000000.tar").exists()
    assert main(["jobs", "logs", job, "--address", cluster]) == 0
    assert "wrote 3 pairs" in capsys.readouterr().out
    assert main(["jobs", "status", job, "--address", cluster]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "status", "no-such-job", "--address", cluster]) == 2
    err = capsys.readouterr().err
    assert f"adarevd jobs: error: {cluster} answered `jobs status no-such-job` with: Request failed with status" in err
    assert "Traceback" not in err

    slow = write(
        tmp_path, f'name = "slow"\nkind = "synth"\noutput = "{tmp_path}/many"\n[options]\ncount = 100000\n', "slow.toml"
    )
    assert main(["submit", str(slow), "--address", cluster]) == 0
    slow_job = capsys.readouterr().out.split()[1]
    client = JobSubmissionClient(cluster)
    deadline = time.monotonic() + 120
    # Stop it once it runs (a stop while Ray still sets up the job's environment can leave it running).
    while "job slow:" not in client.get_job_logs(slow_job) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert main(["jobs", "stop", slow_job, "--address", cluster]) == 0
    assert wait_for(cluster, slow_job) == "STOPPED"
    time.sleep(1)
    assert not running_specs()
    assert main(["jobs", "list", "--address", cluster]) == 0
    listing = capsys.readouterr().out
    assert f"{job}  SUCCEEDED  synth  quick" in listing and f"{slow_job}  STOPPED  synth  slow" in listing


def test_train_and_eval_specs_run_here(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs"
    synth = write(tmp_path, f'name = "p"\nkind = "synth"\noutput = "{pairs}"\n[options]\ncount = 2\nsize = "72x72"\n')
    assert main(["submit", str(synth)]) == 0
    weights = tmp_path / "enc.safetensors"
    train = write(
        tmp_path,
        f'name = "t"\nkind = "train"\nstage = "encoder"\ninput = "{pairs}"\noutput = "{weights}"\n'
        "[options]\niterations = 2\nbatch = 2\ncrop = 64\n",
        "train.toml",
    )
    assert to_argv(load_spec(train))[:5] == ["train", "encoder", str(pairs), "--output", str(weights)]
    assert main(["submit", str(train)]) == 0 and weights.exists()
    report = tmp_path / "eval.json"
    evaluate = write(
        tmp_path,
        f'name = "e"\nkind = "eval"\ninput = "{pairs}"\nweights = ["{weights}"]\n[options]\njson = "{report}"\n',
        "eval.toml",
    )
    assert main(["submit", str(evaluate)]) == 0
    assert json.loads(report.read_text())["frames"] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_deblur_on_a_ray_start_cluster_by_its_address(head: tuple[str, str, str], tmp_path: Path) -> None:
    """`adarevd deblur --address HOST:PORT` (the address `ray start --head` prints) and `ray://HOST:PORT`
    (Ray Client: the driver's calls go through the head) run on that cluster and give the same bytes."""
    shards = tmp_path / "in"
    ingest([str(write_video(tmp_path / "v.mkv", frames(3)))], Store(str(shards)))
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    for name, address in (("gcs", head[1]), ("client", head[2])):
        command = [
            sys.executable,
            "-m",
            "jobs.cli",
            "deblur",
            str(shards),
            str(tmp_path / name),
            "--address",
            address,
            "--workers",
            "1",
        ]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        assert "frames: 3 in" in done.stdout.decode()
        assert json.loads((tmp_path / name / "_run.json").read_text())["frames"] == 3
    shard = "frames-000000.tar"
    assert (tmp_path / "client" / shard).read_bytes() == (tmp_path / "gcs" / shard).read_bytes()


@pytest.mark.slow
@pytest.mark.ray
def test_a_deblur_spec_submitted_to_a_cluster_runs_on_the_cluster(head: tuple[str, str, str], tmp_path: Path) -> None:
    """The submitted command joins the cluster (`run-spec --address auto`): its restorer needs a resource
    that only the cluster's worker node has. (Before, it started a Ray of its own on the node that ran
    the job, where that actor could never be placed: the run failed after --stall-timeout.)"""
    shards = tmp_path / "in"
    ingest([str(write_video(tmp_path / "v.mkv", frames(3)))], Store(str(shards)))
    text = (
        f'name = "deblur-here"\nkind = "deblur"\ninput = "{shards}"\noutput = "{tmp_path}/out"\n'
        '[resources]\nworkers = 1\n[options]\nworker_resource = "adarevd_worker"\nstall_timeout = 60\n'
    )
    spec = write(tmp_path, text)
    job = submit(str(spec), head[0], Commands(main=main, long_options=long_options))
    assert wait_for(head[0], job, timeout_s=240) == "SUCCEEDED", JobSubmissionClient(head[0]).get_job_logs(job)[-3000:]
    record = json.loads((tmp_path / "out" / "_run.json").read_text())
    assert record["frames"] == 3 and sum(record["worker_nodes"].values()) == 1
