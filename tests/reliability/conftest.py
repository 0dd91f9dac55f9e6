"""The reliability suite's ledger: every test records the faults it injected, the bad inputs it tried,
and the frames it lost or duplicated (counted from the output, never assumed); the totals are printed
at the end of the run (and written as JSON to $ADAREVD_RELIABILITY_JSON when set) for
docs/RELIABILITY.md."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass

import pytest

from pipeline.formats.shards import iter_samples
from pipeline.store.storage import Store


@dataclass
class Entry:
    test: str
    faults: int = 0  # faults injected (kills, outages, concurrent runs)
    bad_inputs: int = 0  # bad inputs tried
    frames: int = 0  # good frames the input holds
    lost: int = 0  # good frames in neither the output nor the quarantine
    duplicates: int = 0  # extra copies of a key in the output (+ quarantine)


LEDGER: list[Entry] = []


def audit(output: Store, expected: set[str]) -> tuple[int, int]:
    """(lost, duplicates) of an output: each expected key must be in an output shard or in the
    quarantine; a key more than once among the output shards is a duplicate. (The quarantine may
    hold a key twice: an undecodable sample and a later sample with its key are two inputs.)"""
    seen: dict[str, Counter[str]] = {}
    for folder in ("", "_quarantine/"):
        seen[folder] = Counter()
        for name in output.glob(f"{folder}*.tar"):
            with output.open(name) as stream:
                seen[folder].update(sample.key for sample in iter_samples(stream, name))
    lost = expected - set(seen[""]) - set(seen["_quarantine/"])
    return len(lost), sum(n - 1 for n in seen[""].values())


@pytest.fixture
def ledger(request: pytest.FixtureRequest) -> Entry:
    entry = Entry(request.node.name)
    LEDGER.append(entry)
    return entry


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not LEDGER:
        return
    write = terminalreporter.write_line
    write("")
    write(f"{'reliability ledger':<72} {'faults':>6} {'bad in':>6} {'frames':>6} {'lost':>5} {'dups':>5}")
    for e in LEDGER:
        write(f"{e.test[:72]:<72} {e.faults:>6} {e.bad_inputs:>6} {e.frames:>6} {e.lost:>5} {e.duplicates:>5}")
    total = Entry(
        "total", *(sum(getattr(e, f) for e in LEDGER) for f in ("faults", "bad_inputs", "frames", "lost", "duplicates"))
    )
    write(
        f"{'total':<72} {total.faults:>6} {total.bad_inputs:>6} {total.frames:>6} {total.lost:>5} {total.duplicates:>5}"
    )
    if path := os.environ.get("ADAREVD_RELIABILITY_JSON"):
        with open(path, "w") as handle:
            json.dump({"tests": [asdict(e) for e in LEDGER], "total": asdict(total)}, handle, indent=2)
