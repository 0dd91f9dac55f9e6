"""`adarevd submit SPEC` and `adarevd jobs list|status|logs|stop`: job specs on a cluster (Ray Jobs API).

Without `--address`, `submit` runs the spec in this process. With `--address http://HEAD:8265` it
submits `adarevd run-spec SPEC` through the Ray Jobs API, with the spec file as the working directory
and the project's packages (`adarevd`, `pipeline`, `jobs`) as `py_modules`; the cluster's Python
needs the dependencies installed. Secrets are read from the environment of the machine that runs the
job, by the names the spec gives, never sent along.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adarevd.errors import InvalidInput
from jobs.models import CliError
from jobs.spec import check_options, load_spec, secret_environment, to_argv
from pipeline.store.scratch import scratch

PACKAGES = ("adarevd", "pipeline", "jobs")


@dataclass(frozen=True)
class Commands:
    """What submitting needs of the command line that holds it (passed in: no import back into it)."""

    main: Callable[[Sequence[str]], int]  # runs one `adarevd` command line
    long_options: Callable[[str], set[str]]  # the long options of `adarevd KIND`


ROOT = Path(__file__).resolve().parents[1]


def run_spec(path: str, commands: Commands, address: str | None = None) -> int:
    """Run a spec here: its command, with the secrets it names in the usual AWS_* environment. `address`:
    the Ray cluster of a command that takes `--address` (deblur, train), unless the spec gives one."""
    spec = load_spec(path)
    known = commands.long_options(spec.kind)
    check_options(spec, known)
    os.environ.update(secret_environment(spec))
    argv = to_argv(spec)
    if address and "--address" in known and "address" not in spec.options:
        argv += ["--address", address]
    print(f"job {spec.name}: adarevd {' '.join(argv)}", flush=True)
    return commands.main(argv)


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        return JobSubmissionClient(address)
    except ConnectionError as e:  # it asks the cluster for its version at once
        raise CliError(
            f"cannot reach the Ray Jobs API at {address} ({str(e).rstrip('.')}). Give the head's dashboard address "
            "(http://HEAD:8265, `ray start --head --dashboard-host 0.0.0.0`), and check that it is up and reachable "
            "from here; without --address, `adarevd submit` runs the spec on this machine"
        ) from None


def submit(path: str, address: str, commands: Commands) -> str:
    spec = load_spec(path)
    check_options(spec, commands.long_options(spec.kind))  # refused here, before anything is uploaded
    with scratch("job") as tmp:
        shutil.copy(path, Path(tmp) / "spec.toml")
        submission_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
        _client(address).submit_job(
            # `auto`: the job's command joins the cluster it was submitted to (Ray sets RAY_ADDRESS for it);
            # without it, deblur and train would start a Ray of their own on the node that runs the job.
            entrypoint="python -m jobs.cli run-spec spec.toml --address auto",
            submission_id=submission_id,
            runtime_env={"working_dir": tmp, "py_modules": [str(ROOT / p) for p in PACKAGES]},
            metadata={"name": spec.name, "kind": spec.kind, "priority": str(spec.priority)},
        )
    return submission_id


def cmd_submit(args: argparse.Namespace) -> int:
    if args.address is None:
        return run_spec(args.spec, args.commands)
    job = submit(args.spec, args.address, args.commands)
    print(
        f"submitted {job} to {args.address}; follow it with: adarevd jobs logs {job} --follow --address {args.address}"
    )
    return 0


def cmd_run_spec(args: argparse.Namespace) -> int:
    return run_spec(args.spec, args.commands, args.address)


def cmd_jobs(args: argparse.Namespace) -> int:
    client = _client(args.address)
    try:
        return _jobs(client, args)
    except RuntimeError as e:  # the Jobs API's answer to a request (an unknown job: 404)
        what = f"jobs {args.action}" + (f" {args.job}" if args.job else "")
        answer = str(e).rstrip(".")
        raise CliError(f"{args.address} answered `{what}` with: {answer}; see `adarevd jobs list`") from None


def _jobs(client: Any, args: argparse.Namespace) -> int:
    if args.action == "list":
        for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            meta = job.metadata or {}
            print(f"{job.submission_id or job.job_id}  {job.status}  {meta.get('kind', '-')}  {meta.get('name', '-')}")
        return 0
    if args.job is None:
        raise InvalidInput(f"adarevd jobs {args.action} needs a JOB id (see adarevd jobs list)")
    if args.action == "status":
        info = client.get_job_info(args.job)
        print(f"{args.job}: {info.status}" + (f" ({info.message})" if info.message else ""))
        return 0
    if args.action == "stop":
        # A stop while Ray still sets up the job's environment can leave its command running (Ray
        # 2.60): wait until the job has left PENDING.
        deadline = time.monotonic() + 120
        while str(client.get_job_status(args.job)).endswith("PENDING") and time.monotonic() < deadline:
            time.sleep(0.5)
        stopped = client.stop_job(args.job)
        print(f"{args.job}: {'stop requested' if stopped else 'not running'}")
        return 0
    if args.follow:

        async def follow() -> None:
            async for lines in client.tail_job_logs(args.job):
                print(lines, end="", flush=True)

        asyncio.run(follow())
    else:
        print(client.get_job_logs(args.job), end="")
    return 0


def wait_for(address: str, job: str, timeout_s: float = 300) -> str:
    """Poll until the job ends; returns its final status."""
    client = _client(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(client.get_job_status(job))
        if status.split(".")[-1] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status.split(".")[-1]
        time.sleep(1)
    raise TimeoutError(f"job {job} still running after {timeout_s} s")


def add_parsers(sub: argparse._SubParsersAction, commands: Commands) -> None:
    s = sub.add_parser("submit", help="run a job spec (TOML) here, or submit it to a cluster with --address")
    s.add_argument("spec", help="job spec file (.toml)")
    s.add_argument("--address", help="Ray dashboard of the cluster, e.g. http://HEAD:8265 (default: run here)")
    s.set_defaults(run=cmd_submit, commands=commands)

    r = sub.add_parser("run-spec", help="run a job spec in this process (what a submitted job runs)")
    r.add_argument("spec")
    r.add_argument("--address", help="Ray cluster for a deblur or train spec that names none (submit passes auto)")
    r.set_defaults(run=cmd_run_spec, commands=commands)

    j = sub.add_parser("jobs", help="jobs on a cluster: list, status, logs [--follow], stop")
    j.add_argument("action", choices=["list", "status", "logs", "stop"])
    j.add_argument("job", nargs="?", help="submission id (from submit or list)")
    j.add_argument("--address", required=True, help="Ray dashboard, e.g. http://HEAD:8265")
    j.add_argument("--follow", action="store_true", help="logs: keep printing until the job ends")
    j.set_defaults(run=cmd_jobs)
