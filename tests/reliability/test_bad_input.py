"""The bad-input matrix through the real deblur job on a local Ray: each bad input becomes a quarantine
row or a shard error naming shard, key and reason; everything good finishes; nothing is written
outside the output prefix. Plus bad weights files and unknown options, which must be refused cleanly."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import adarevd
from jobs.cli import main
from pipeline.deblur.shard import output_names
from pipeline.formats.shards import iter_samples
from pipeline.store.storage import Store
from tests.reliability.bad_inputs import MAX_FRAME_PIXELS, build
from tests.reliability.conftest import Entry, audit

pytestmark = [pytest.mark.reliability, pytest.mark.ray]


def samples(store: Store, name: str) -> dict[str, dict[str, bytes]]:
    with store.open(name) as stream:
        return {s.key: dict(s.members) for s in iter_samples(stream, name)}


def rows(store: Store, name: str) -> list[dict]:
    return pq.read_table(io.BytesIO(store.read_bytes(name))).to_pylist()


def test_every_bad_input_is_named_and_the_rest_finishes(
    local_ray: None, tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    source, output = Store(str(tmp_path / "in")), Store(str(tmp_path / "out"))
    cases = build(source)
    assert (
        main(
            [
                "deblur",
                source.url,
                output.url,
                "--frames-per-batch",
                "2",
                "--workers",
                "2",
                "--cpus-per-worker",
                "0.5",
                "--max-frame-pixels",
                str(MAX_FRAME_PIXELS),
            ]
        )
        == 3
    )
    printed = capsys.readouterr().out
    record = json.loads(output.read_bytes("_run.json"))
    errors = record["shard_errors"]
    quarantine = {
        (r["shard"], r["key"], r["reason"]) for n in output.glob("_quarantine/*.parquet") for r in rows(output, n)
    }
    expected: set[str] = {f"good_{i:06d}" for i in range(4)}  # a-good.tar, and c-truncated.tar's first
    for case in cases:
        if case.outcome == "quarantined":
            assert any(s == case.shard and k == case.key and case.says in r for s, k, r in quarantine), case
            assert case.key in samples(output, output_names(case.shard)[2])  # original bytes kept
        elif case.outcome == "shard_error":
            assert any(case.shard in e and case.says in e for e in errors), case
            assert f"shard error: {case.shard}" in printed
        else:
            out = samples(output, output_names(case.shard)[0])
            assert case.key in out, case
            notes = {r["key"]: r["notes"] or "" for r in rows(output, output_names(case.shard)[1])}
            assert case.says in notes[case.key], (case, notes[case.key])
        if case.key:
            expected.add(case.key)
    assert samples(output, "a-good.tar").keys() == {f"good_{i:06d}" for i in range(3)}
    assert "good_000003" in samples(output, "c-truncated.tar")  # what came before the damage
    # A damaged tar is not done (a re-run after mending it redoes it); refused entries leave it done.
    for shard in ("b-corrupt.tar", "c-truncated.tar", "d-empty.tar"):
        assert not output.exists(output_names(shard)[1]), shard
    for shard in ("g-climb.tar", "h-absolute.tar", "i-symlink.tar", "j-device.tar", "k-bytes.tar"):
        assert output.exists(output_names(shard)[1]), shard
    # Nothing escaped the output prefix.
    assert not Path("/tmp/adarevd-absolute_000000.png").exists()
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert written == {"in", "out"} and not list(tmp_path.rglob("outside_000000*"))
    ledger.bad_inputs, ledger.frames = len(cases), len(expected)
    ledger.lost, ledger.duplicates = audit(output, expected)
    assert (ledger.lost, ledger.duplicates) == (0, 0)


class _RunsCode:
    def __reduce__(self):  # unpickling this would create the marker file
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/adarevd-reliability-pickle-ran")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_bad_weights_files_are_refused_before_any_work(
    tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "in"
    MARKER.unlink(missing_ok=True)
    evil = tmp_path / "evil.pth"
    with evil.open("wb") as handle:
        pickle.dump({"params": {"x": _RunsCode()}}, handle)
    wrong = tmp_path / "wrong.pth"  # the tiny config, but a tensor of another shape
    state = adarevd.build("adarevd-tiny").state_dict()
    name = next(iter(state))
    torch.save({"params": {**state, name: torch.zeros(3, 3)}}, wrong)
    refusals = [
        (evil, "weights_only"),
        (wrong, "encoder.intro.weight: file (3, 3) vs model (8, 3, 3, 3)"),
        (tmp_path / "none.pth", "none.pth does not exist"),
    ]
    for weights, says in refusals:
        code = main(["deblur", str(source), str(tmp_path / "out"), "--weights", str(weights)])
        err = capsys.readouterr().err
        assert code == 2 and says in err, (weights.name, err[-500:])
        assert "Traceback" not in err
    assert not MARKER.exists()  # the pickle's code never ran
    ledger.bad_inputs = 3


def test_unknown_options_and_spec_fields_are_refused(
    tmp_path: Path, ledger: Entry, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["deblur", "in", "out", "--frames-per-bach", "2"])
    assert exit_.value.code == 2 and "unrecognized arguments: --frames-per-bach" in capsys.readouterr().err
    spec = tmp_path / "job.toml"
    spec.write_text('name = "j"\nkind = "deblur"\ninput = "a"\noutput = "b"\n[options]\nframes_per_bach = 2\n')
    assert main(["submit", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "job.toml" in err and "frames_per_bach" in err
    ledger.bad_inputs = 2
