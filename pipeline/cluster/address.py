"""`--address`, checked before `ray.init`: on a `HOST:PORT` where nothing answers Ray waits for minutes
with warnings about its GCS, and `auto` without a cluster or an unreachable `ray://` ends in a traceback."""

from __future__ import annotations

import socket

from adarevd.errors import UserError

PROBE_S = 5.0  # how long a TCP connection to the address may take
WHAT_TO_GIVE = (
    "give the head's address as `ray start --head` prints it (HOST:6379), ray://HOST:10001 (Ray Client), or "
    "`auto` on a node of the cluster; without --address the job starts Ray on this machine"
)


class ClusterUnreachable(UserError, RuntimeError):
    """No Ray cluster answers at the address given; the message says what to give instead."""


def probe(address: str, timeout: float = PROBE_S) -> None:
    """Raise ClusterUnreachable unless a TCP connection to the address's HOST:PORT opens (`auto` and
    `local` are Ray's to resolve)."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise ClusterUnreachable(
            f"--address {address}: an http:// address is a dashboard's, for `adarevd submit` and `adarevd jobs`; "
            f"to run here against a cluster, {WHAT_TO_GIVE}"
        )
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterUnreachable(f"--address {address}: expected HOST:PORT; {WHAT_TO_GIVE}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterUnreachable(f"--address {address}: nothing answers there ({e}); {WHAT_TO_GIVE}") from None


def unreachable(address: str, error: ConnectionError) -> ClusterUnreachable:
    """What `ray.init(address=...)`'s ConnectionError means to the user."""
    return ClusterUnreachable(f"--address {address}: {str(error).rstrip('.')}; {WHAT_TO_GIVE}")
