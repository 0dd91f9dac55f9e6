"""Ctrl-C (SIGINT) and SIGTERM (`adarevd jobs stop`, Kubernetes, SLURM, `kill`) stop a command at any
moment. It unwinds: its output lease is released, nothing partial is committed, and one line says
so. The exit status is 130 or 143 (128 + the signal), as shells report it.

Then `finish` stops what the command started on this machine: the local Ray it runs and any process
left below this one (the raylet's agents outlive it otherwise), and the scratch folders of processes
that are gone (a Ray worker killed mid-shard leaves its own).

A second signal while it unwinds does not cut the unwinding short, which would orphan Ray's
processes: it goes straight to `finish` and exits.

`ray.init` puts its own SIGTERM handler in place (it exits with status 15), so a command that starts
Ray calls `again()` after it, and a `SystemExit(15)` that reaches the top is taken for SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from contextlib import suppress
from types import FrameType

import psutil

from pipeline.store.scratch import remove_orphans

STATUS = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}
NAME = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
SHUTDOWN_WAIT_S = 5.0  # how long processes below this one get to end on their own before a kill
_installed = False
_received: int | None = None  # the first signal, once it came
_said = False  # its line was printed


def install() -> None:
    """Handle both signals in this process (the main thread of a command-line process only)."""
    global _installed
    signal.signal(signal.SIGINT, _first)
    signal.signal(signal.SIGTERM, _first)
    _installed = True


def again() -> None:
    """Put the handlers back if `install` put them there first (after `ray.init` replaced one)."""
    if _installed:
        handler = _second if _received else _first
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def received(error: BaseException | None = None) -> int | None:
    """The signal that stopped this command, if one did. `error`: the exception that reached the top
    (`ray.get` turns the SystemExit raised while it waits into `SystemExit(1)`; Ray's own SIGTERM
    handler, in place while `ray.init` runs, raises `SystemExit(15)`)."""
    if _received is None and isinstance(error, SystemExit) and error.code == signal.SIGTERM:
        return signal.SIGTERM
    return _received


def say(signum: int) -> int:
    """Print the one line of a stopped command (once) and return its exit status."""
    global _said
    if not _said:
        _said = True
        print(f"adarevd: stopped ({NAME[signum]}); what was committed is kept", file=sys.stderr, flush=True)
    return STATUS[signum]


def finish(stopped_by: int | None = None) -> None:
    """Stop what this command started on this machine: Ray (when this process runs it), any process
    still below this one, and the scratch folders of gone processes. `stopped_by`: the signal that
    stopped the command; then Ray's processes are ended without `ray.shutdown` (it sets SIGTERM's
    handler back to the default midway, so a second SIGTERM would orphan them), and the process exits
    with the signal's status. Signals meanwhile go to `_second`."""
    below = _below()
    ray = sys.modules.get("ray")
    if stopped_by is None and ray is not None and ray.is_initialized():
        with suppress(Exception):
            ray.shutdown()
        again()
    _end(below + _below(), terminate=stopped_by is not None)
    remove_orphans(tempfile.gettempdir())
    if stopped_by is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STATUS[stopped_by])


def _first(signum: int, _frame: FrameType | None) -> None:
    global _received
    _received = signum
    signal.signal(signal.SIGINT, _second)
    signal.signal(signal.SIGTERM, _second)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(STATUS[signum])


def _second(_signum: int, _frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    status = say(_received or signal.SIGTERM)
    _end(_below(), wait_s=0.0)
    remove_orphans(tempfile.gettempdir())
    os._exit(status)


def _below() -> list[psutil.Process]:
    with suppress(psutil.Error):
        return psutil.Process().children(recursive=True)
    return []


def _end(processes: list[psutil.Process], *, terminate: bool = False, wait_s: float = SHUTDOWN_WAIT_S) -> None:
    """Let `processes` end within `wait_s` (`terminate`: sent SIGTERM first), then kill the ones left."""
    alive = list({p.pid: p for p in processes}.values())
    for process in alive if terminate else ():
        with suppress(psutil.Error):
            process.terminate()
    if wait_s:
        _, alive = psutil.wait_procs(alive, timeout=wait_s)
    for process in alive:
        with suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=SHUTDOWN_WAIT_S)
