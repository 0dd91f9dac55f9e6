"""Local scratch folders that outlive no process for long.

A process killed outright (SIGKILL, the OOM killer, a preempted node, Ray restarting an actor) runs no
`finally`, so its temporary folder stays: a partial output shard, a downloaded video, a training run's
checkpoints, each as large as what it holds. Scratch folders are named
`adarevd-<kind>-<host>-<pid>-<random>`, and the first scratch folder a process makes in a place
removes the folders there whose process, on this machine, is gone. A live process's folder is never
touched; a reused pid only makes a folder wait for the next sweep. `<host>` keeps a process from
judging folders made on another machine that shares the place (the pid would mean nothing there).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading

from pipeline.store.processes import alive

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_NAME = re.compile(r"adarevd-[a-z]+-([0-9a-f]{8})-(\d{1,9})-")
_swept: set[str] = set()
_sweeping = threading.Lock()


def scratch(kind: str, folder: str | None = None) -> tempfile.TemporaryDirectory[str]:
    """A temporary folder (a context manager, like `tempfile.TemporaryDirectory`) in `folder` (default:
    the system's), for one `kind` of work (lowercase letters: "deblur", "shard", "video", ...)."""
    if not kind.isalpha() or not kind.islower():
        raise ValueError(f"a scratch kind is lowercase letters, got {kind!r}")
    where = os.path.abspath(folder or tempfile.gettempdir())
    with _sweeping:
        if where not in _swept:
            _swept.add(where)
            remove_orphans(where)
    return tempfile.TemporaryDirectory(prefix=f"adarevd-{kind}-{HOST}-{os.getpid()}-", dir=where)


def pattern(kind: str, folder: str | None = None) -> str:
    """The glob pattern of every scratch folder of `kind` in `folder` (default: the system's)."""
    return os.path.join(folder or tempfile.gettempdir(), f"adarevd-{kind}-*")


def remove_orphans(folder: str | None = None) -> list[str]:
    """Remove the scratch folders in `folder` (default: the system's) of processes of this machine
    that are gone. Returns what was removed."""
    where = folder or tempfile.gettempdir()
    removed = []
    try:
        names = sorted(os.listdir(where))
    except FileNotFoundError:
        return []
    for name in names:
        match = _NAME.match(name)
        if match is None or match[1] != HOST or alive(int(match[2])):
            continue
        path = os.path.join(where, name)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed
