"""`adarevd ingest-pairs`: a GoPro-like folder tree -> paired shards that `adarevd eval` reads."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from jobs.cli import main
from pipeline.formats import images
from pipeline.store.storage import Store
from tests.media import read_samples


def frame(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    return cv2.GaussianBlur(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)


def write(path: Path, bgr: np.ndarray) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = images.encode(bgr, "jpg" if path.suffix == ".jpg" else "png")
    path.write_bytes(data)
    return data


def test_a_gopro_tree_becomes_paired_shards_that_eval_reads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "GOPRO_Large" / "test"
    written = {}
    for s, sequence in enumerate(("GOPR0384_11_00", "GOPR0385_11_01")):
        for i in range(1, 4):
            sharp = frame(10 * s + i)
            for kind, image in (("sharp", sharp), ("blur", cv2.blur(sharp, (5, 5))), ("blur_gamma", sharp)):
                written[sequence, kind, i] = write(root / sequence / kind / f"{i:06d}.png", image)
    write(root / "GOPR0384_11_00" / "blur" / "000009.png", frame(9))  # no sharp partner
    write(root / "GOPR0385_11_01" / "blur" / "000010.png", frame(10))
    write(root / "GOPR0385_11_01" / "sharp" / "000010.png", frame(10, h=32))  # another size
    write(root / "odd.v2" / "blur" / "a.jpg", frame(20))  # a JPEG pair, a dotted folder name
    write(root / "odd.v2" / "sharp" / "a.jpg", frame(20))
    out = tmp_path / "pairs"
    assert main(["ingest-pairs", str(root), "--output", str(out), "--max-frames-per-shard", "4"]) == 0
    said = capsys.readouterr().out
    assert f"wrote 7 pairs in 2 shard(s) and _index.parquet to {out}" in said
    assert "left out GOPR0384_11_00/blur/000009.png: no sharp/000009.png beside it" in said
    assert "left out GOPR0385_11_01/blur/000010.png: blur is 56x40, sharp is 56x32" in said
    samples = read_samples(Store(str(out)))
    assert sorted(samples) == [
        *(f"GOPR0384_11_00/{i:06d}" for i in range(1, 4)),
        *(f"GOPR0385_11_01/{i:06d}" for i in range(1, 4)),
        "odd_v2/a",
    ]
    first = samples["GOPR0384_11_00/000001"]
    assert first["blur.png"] == written["GOPR0384_11_00", "blur", 1]  # PNGs copied byte for byte
    assert first["sharp.png"] == written["GOPR0384_11_00", "sharp", 1]
    assert samples["odd_v2/a"]["blur.png"][:4] == b"\x89PNG"  # a JPEG stored losslessly as PNG
    # The second command of "evaluate on GoPro": eval reads the shards.
    report = tmp_path / "eval.json"
    assert main(["eval", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["frames"] == 7 and result["psnr_input"] < 80


def test_a_tree_without_pairs_says_which_folders_it_looked_for(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write(tmp_path / "data" / "seq" / "input" / "1.png", frame(1))
    write(tmp_path / "data" / "seq" / "target" / "1.png", frame(1))
    assert main(["ingest-pairs", str(tmp_path / "data"), "--output", str(tmp_path / "o")]) == 2
    assert "no folder below it has both blur/ and sharp/" in capsys.readouterr().err
    args = ["--blur-dir", "input", "--sharp-dir", "target"]
    assert main(["ingest-pairs", str(tmp_path / "data"), "--output", str(tmp_path / "o"), *args]) == 0
    assert list(read_samples(Store(str(tmp_path / "o")))) == ["seq/1"]
