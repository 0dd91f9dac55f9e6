"""The authors' checkpoints load strictly: their key listings are in tests/data/upstream-keys/."""

from __future__ import annotations

import ast
import io
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

import adarevd
from adarevd.weights import WeightsError, read_state_dict

KEYS_DIR = Path(__file__).resolve().parent / "data" / "upstream-keys"
LISTINGS = {
    # listing: (preset, overrides, trainable parameters quoted in ADAREVD.md)
    "UFPNet_w64_n2": ("adarevd-s", {}, 118_248_932),
    "UFPNet_w64_n4": ("adarevd-b", {}, 152_449_386),
    "UFPNet_w64_n8": ("adarevd-l", {}, 220_850_294),
    "NAFNet_w64_n4": ("adarevd-b", {"encoder": "nafnet"}, 141_037_848),
}


def read_listing(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    path = KEYS_DIR / f"{name}.tsv"
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:]]
    return {key: (tuple(ast.literal_eval(shape)), kind) for key, shape, kind, _ in rows}


def layout(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    params = {k for k, _ in model.named_parameters()}
    return {k: (tuple(v.shape), "parameter" if k in params else "buffer") for k, v in model.state_dict().items()}


@pytest.mark.parametrize("listing", sorted(LISTINGS))
def test_every_preset_has_the_reference_keys_shapes_and_parameter_count(listing: str) -> None:
    preset, overrides, total = LISTINGS[listing]
    with torch.device("meta"):
        model = adarevd.build(preset, **overrides)
    want = read_listing(listing)
    have = layout(model)
    assert sorted(set(want) - set(have)) == []
    assert sorted(set(have) - set(want)) == []
    assert {k: v for k, v in have.items() if want[k] != v} == {}
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(math.prod(shape) for shape, kind in want.values() if kind == "parameter") == total


def random_state(listing: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) for k, (shape, _) in read_listing(listing).items()}


@pytest.mark.slow
@pytest.mark.parametrize("listing", sorted(LISTINGS))
def test_authors_files_load_strictly_main_plus_separate_classifier(tmp_path: Path, listing: str) -> None:
    preset, overrides, _ = LISTINGS[listing]
    state = random_state(listing)
    if "encoder.flow.kernel_size" in state:
        state["encoder.flow.kernel_size"] = torch.tensor([19.0])
    main = {k: v for k, v in state.items() if not k.startswith("ape.")}
    classifier = {k: v for k, v in state.items() if k.startswith("ape.")}
    # BasicSR layout with DDP prefixes for the main file; a bare dict for the classifier.
    torch.save({"params": {f"module.{k}": v for k, v in main.items()}}, tmp_path / "main.pth")
    torch.save(classifier, tmp_path / "classifier.pth")
    del main, classifier

    def empty_model() -> adarevd.AdaRevD:
        with torch.device("meta"):
            model = adarevd.build(preset, **overrides)
        return model.to_empty(device="cpu")  # no initialisation cost: every value comes from the files

    model = empty_model()
    report = adarevd.load_weights(model, tmp_path / "main.pth", tmp_path / "classifier.pth")
    assert report.loaded == len(state)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(WeightsError, match="missing keys") as err:
        adarevd.load_weights(empty_model(), tmp_path / "main.pth")
    assert "ape.0.weight" in str(err.value) and "classifier (ape.*) is missing" in str(err.value)


def test_mismatch_names_missing_unexpected_and_misshaped_keys(tmp_path: Path) -> None:
    model = adarevd.build("adarevd-tiny")
    state = dict(model.state_dict())
    state.pop("outputs.0.0.bias")
    state["subdenets.0.alpha0"] = torch.zeros(1, 3, 1, 1)
    state["decoder.extra.weight"] = torch.zeros(2)
    torch.save({"params": state}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as err:
        adarevd.load_weights(model, tmp_path / "bad.pth")
    text = str(err.value)
    assert "bad.pth" in text
    assert "outputs.0.0.bias" in text and "decoder.extra.weight" in text
    assert "subdenets.0.alpha0: file (1, 3, 1, 1) vs model (1, 64, 1, 1)" in text
    report = adarevd.load_weights(model, tmp_path / "bad.pth", strict=False)
    assert report.missing == ("outputs.0.0.bias",) and report.unexpected == ("decoder.extra.weight",)
    assert len(report.mismatched) == 1 and report.loaded == len(state) - 2


class _Boom:
    def __reduce__(self):  # a pickle that would run code when loaded
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    buf = io.BytesIO()
    pickle.dump({"params": {"x": _Boom()}}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(WeightsError, match="refused"):
        read_state_dict(path)


def test_garbage_and_missing_files_get_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match=r"junk\.pth"):
        read_state_dict(tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match=r"junk\.safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "nothing.pth")


def test_safetensors_round_trip_keeps_config_and_fingerprint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = adarevd.build("adarevd-tiny", num_columns=2, exit_table=(2, 2, 2, 1, 1, 0))
    path = tmp_path / "w.safetensors"
    adarevd.save_weights(model, path, metadata={"note": "test"})
    config = adarevd.read_config(path)
    assert config == model.config
    again = adarevd.AdaRevD(config)
    assert adarevd.fingerprint(again) != adarevd.fingerprint(model)
    adarevd.load_weights(again, path)
    assert adarevd.fingerprint(again) == adarevd.fingerprint(model)
    _, metadata = read_state_dict(path)
    assert metadata["note"] == "test"
