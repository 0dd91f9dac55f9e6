"""Which Ray a command joins, and that address checked before `ray.init`: on a `HOST:PORT` where nothing
answers Ray waits for minutes with warnings about its GCS, and `auto` without a cluster or an
unreachable `ray://` ends in a traceback.

`--address` wins; without it `RAY_ADDRESS` is read, as Ray's own tools do (`ray job submit` sets it for
the job's command, which then joins the cluster it was submitted to); without either, or with
`--address local`, the command starts an embedded Ray on this machine."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from adarevd.errors import UserError

PROBE_S = 5.0  # how long a TCP connection to the address may take
WHAT_TO_GIVE = (
    "give the head's address as `ray start --head` prints it (HOST:6379), ray://HOST:10001 (Ray Client), or "
    "`auto` on a node of the cluster; `--address local` (or neither it nor RAY_ADDRESS) starts Ray on this machine"
)


ADDRESS_HELP = (
    "Ray cluster: auto, ray://HOST:10001 or HOST:6379; local: an embedded Ray on this machine "
    "(default: RAY_ADDRESS when set, else local)"
)


@dataclass(frozen=True)
class RayAddress:
    address: str | None  # for `ray.init`; None: an embedded local Ray
    source: str  # where it came from, for messages: "--address" or "RAY_ADDRESS"

    def describe(self) -> str:
        """A line for the summary: which Ray the command used."""
        if self.address is None:
            return "an embedded Ray on this machine"
        return f"the cluster at {self.address} ({self.source})"


def ray_address(given: str | None, environ: Mapping[str, str] = os.environ) -> RayAddress:
    """The Ray a command joins: `given` (--address), else RAY_ADDRESS, else an embedded one."""
    if given:
        return RayAddress(None if given == "local" else given, "--address")
    from_env = environ.get("RAY_ADDRESS", "").strip()
    return RayAddress(from_env if from_env and from_env != "local" else None, "RAY_ADDRESS")


class ClusterUnreachable(UserError, RuntimeError):
    """No Ray cluster answers at the address given; the message says what to give instead."""


def probe(address: str, timeout: float = PROBE_S, source: str = "--address") -> None:
    """Raise ClusterUnreachable unless a TCP connection to the address's HOST:PORT opens (`auto` and
    `local` are Ray's to resolve). `source`: where the address came from, for the message."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise ClusterUnreachable(
            f"{source} {address}: an http:// address is a dashboard's, for `adarevd submit` and `adarevd jobs`; "
            f"to run here against a cluster, {WHAT_TO_GIVE}"
        )
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterUnreachable(f"{source} {address}: expected HOST:PORT; {WHAT_TO_GIVE}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterUnreachable(f"{source} {address}: nothing answers there ({e}); {WHAT_TO_GIVE}") from None


def unreachable(address: str, error: ConnectionError, source: str = "--address") -> ClusterUnreachable:
    """What `ray.init(address=...)`'s ConnectionError means to the user."""
    return ClusterUnreachable(f"{source} {address}: {str(error).rstrip('.')}; {WHAT_TO_GIVE}")
