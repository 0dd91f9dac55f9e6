"""Credentials never leave the process that was given them: not in printed output, Ray's logs, the
output folder (shards, manifests, quarantine, _run.json, the lease), the report, or error messages."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from jobs.cli import main
from jobs.spec import SpecError, load_spec
from pipeline.formats.shards import Sample, encode_shard
from pipeline.store.storage import Store
from tests.deblur_setup import make_input
from tests.reliability.conftest import Entry
from tests.s3server import S3Server

pytestmark = [pytest.mark.reliability, pytest.mark.s3, pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def leaks(secret: str, *texts: bytes) -> bool:
    return any(secret.encode() in t for t in texts)


def test_credentials_stay_out_of_logs_outputs_and_errors(s3: S3Server, tmp_path: Path, ledger: Entry) -> None:
    prefix = f"s3://{s3.bucket}/secret-{time.time_ns()}"
    source, output = Store(f"{prefix}/in", s3.storage_options), Store(f"{prefix}/out", s3.storage_options)
    local = Store(str(tmp_path / "in"))
    make_input(tmp_path, local)
    for name in local.glob("*.tar"):
        source.commit_bytes(name, local.read_bytes(name))
    source.commit_bytes("bad.tar", encode_shard([Sample("bad_000000", {"png": b"not a png"})]))  # a quarantine
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    cli = [sys.executable, "-m", "jobs.cli"]
    run = subprocess.run(
        [*cli, "deblur", source.url, output.url, "--num-cpus", "2", "--frames-per-batch", "3", *s3.cli_options()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == 3, run.stderr.decode()[-2000:]  # 3: a frame was quarantined
    report = subprocess.run(
        [*cli, "report", output.url, "--to", str(tmp_path / "report"), *s3.cli_options()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr.decode()[-2000:]
    secrets = [s3.secret_key, s3.access_key]
    for secret in secrets:
        assert not leaks(secret, run.stdout, run.stderr, report.stdout, report.stderr)
    # Every object the job wrote (the lease is gone by now; it held host, pid and run id only).
    names = output.fs.find(output.root)
    assert any(n.endswith("_run.json") for n in names) and any("_quarantine" in n for n in names)
    written = [output.fs.cat_file(n) for n in names]
    pages = [p.read_bytes() for p in (tmp_path / "report").rglob("*") if p.is_file()]
    ray_logs = [
        p.read_bytes() for p in Path(ray_tmp).rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")
    ]
    assert ray_logs, "Ray's session logs should be there to search"
    for secret in secrets:
        assert not leaks(secret, *written), secret
        assert not leaks(secret, *pages), secret
        assert not leaks(secret, *ray_logs), secret
    # Error messages: an endpoint that does not answer, and a URL carrying user:password.
    down = [
        f"--storage-option=key={s3.access_key}",
        f"--storage-option=secret={s3.secret_key}",
        "--storage-option=client_kwargs.endpoint_url=http://127.0.0.1:9",
        "--storage-retry",
        "1",
    ]
    failed = subprocess.run(
        [*cli, "deblur", f"s3://{s3.bucket}/x", str(tmp_path / "o"), *down],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert failed.returncode == 2 and b"unreachable" in failed.stderr and b"Traceback" not in failed.stderr
    userinfo = subprocess.run(
        [*cli, "ingest", f"memory://{s3.access_key}:{s3.secret_key}@host/none.mp4", "--output", str(tmp_path / "i")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert userinfo.returncode != 0
    for secret in secrets:
        assert not leaks(secret, failed.stdout, failed.stderr), secret
        assert not leaks(s3.secret_key, userinfo.stdout, userinfo.stderr)
    ledger.faults = 2  # the unreachable endpoint and the URL with credentials


SPEC = """\
name = "deblur-archive"
kind = "deblur"
input = "s3://archive/frames"
output = "s3://archive/deblurred"

[storage]
endpoint_url = "http://127.0.0.1:8333"

[options]
"""


@pytest.mark.parametrize(
    ("added", "says"),
    [
        # each was accepted, and `adarevd submit` printed the secret or turned the value into a flag
        ('storage_option = "secret=hunter2"', "options.storage_option: secret=... looks like a secret"),
        ('storage_option = ["a=b", "--take-over"]', "'--take-over' starts with '-' and would read as a flag"),
        (
            'storage_option = "client_kwargs.endpoint_url=http://AKIA:hunter2@127.0.0.1:8333"',
            "a URL with a user name or password",
        ),
    ],
)
def test_specs_refuse_secrets_in_values_and_values_that_read_as_flags(
    tmp_path: Path, ledger: Entry, added: str, says: str
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(SPEC + added + "\n")
    with pytest.raises(SpecError) as refused:
        load_spec(path)
    assert says in str(refused.value) and "job.toml:10" in str(refused.value)
    assert "hunter2" not in str(refused.value)
    ledger.bad_inputs = 1


def test_a_spec_url_with_a_password_is_refused_without_showing_it(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(SPEC.replace("http://127.0.0.1:8333", "http://AKIA:hunter2@127.0.0.1:8333"))
    with pytest.raises(SpecError, match=r"storage.endpoint_url: a URL with a user name or password") as refused:
        load_spec(path)
    assert "hunter2" not in str(refused.value)


def test_an_object_store_url_with_credentials_is_refused_without_showing_them(
    tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    for argv in (
        ["deblur", "s3://AKIAEXAMPLE:hunter2@bucket/frames", str(tmp_path / "out")],
        ["ingest", str(tmp_path), "--output", "s3://AKIAEXAMPLE:hunter2@bucket/frames"],
    ):
        assert main(argv) == 2  # was: botocore's traceback, the secret in its bucket name
        printed = capsys.readouterr()
        said = printed.out + printed.err
        assert "s3://bucket/frames: a user name or password in an s3:// URL is not read" in said, said
        assert "hunter2" not in said and "AKIAEXAMPLE" not in said and "Traceback" not in said
    ledger.bad_inputs = 2
