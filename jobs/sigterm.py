"""SIGTERM (`adarevd jobs stop`, Kubernetes, SLURM, `kill`) unwinds a command like Ctrl-C does: its
output lease is released, its scratch folders are removed, nothing partial is committed; the exit
status is 143 (128 + 15). A second SIGTERM kills it outright.

`ray.init` puts its own handler in place (it logs a stack dump and can end the driver in an abort),
so a command that starts Ray calls `again()` after it."""

from __future__ import annotations

import signal

EXIT_STATUS = 128 + signal.SIGTERM
_installed = False
_received = False


def install() -> None:
    """Handle SIGTERM in this process (call from the main thread of a command-line process only)."""
    global _installed
    signal.signal(signal.SIGTERM, _stop)
    _installed = True


def again() -> None:
    """Put the handler back if `install` put it there first (after something replaced it)."""
    if _installed:
        signal.signal(signal.SIGTERM, _stop)


def received() -> bool:
    """Whether SIGTERM came (a `SystemExit` may reach the top with another status: `ray.get` turns the
    one raised while it waits into `SystemExit(1)`)."""
    return _received


def _stop(_signum: int, _frame: object) -> None:
    global _received
    _received = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise SystemExit(EXIT_STATUS)
