from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import adarevd
from adarevd.train_state import load_stage_state, stage_state
from adarevd.training import (
    EncoderPretrainer,
    Stage,
    StageConfig,
    deblur_loss,
    dihedral,
    ema_with_warmup,
    freeze_all_but,
    make_deterministic,
    psnr_loss,
)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_stage1_step_changes_columns_only_and_stage2_the_classifier_only() -> None:
    torch.manual_seed(0)
    model = adarevd.build("adarevd-tiny", num_columns=2, exit_table=(2, 2, 2, 1, 1, 1))
    blurry, sharp = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    freeze_all_but(model, model.conv_features, model.subdenets, model.outputs)
    before = snapshot(model)
    Stage(model, model.parameters(), StageConfig(iterations=10)).train_step(blurry, sharp)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("subdenets.") for k in changed) and "outputs.1.0.weight" in changed
    assert not any(k.startswith(("encoder.", "ape.")) for k in changed)

    freeze_all_but(model, model.ape)
    Stage(model, model.parameters(), StageConfig(iterations=10, lr=3e-4)).classifier_step(blurry, sharp)
    changed = {k for k, v in snapshot(model).items() if not torch.equal(after[k], v)}
    assert changed and all(k.startswith("ape.") for k in changed)


def test_pretrainer_starts_as_identity_and_loss_is_zero_on_sharp_input() -> None:
    pre = EncoderPretrainer(adarevd.PRESETS["adarevd-tiny"])
    images = torch.rand(2, 3, 40, 56)
    (out,) = pre(images)
    torch.testing.assert_close(out, images)
    assert deblur_loss([images], images).item() == 0
    # Mean over two outputs, the second with an L1 of 0.1 plus a positive spectral term.
    assert deblur_loss([images, images + 0.1], images).item() > 0.05


def test_psnr_loss_is_minus_each_crops_psnr_capped_at_50_db() -> None:
    sharp = torch.rand(2, 3, 16, 16)
    assert psnr_loss([sharp], sharp).item() == pytest.approx(-50.0)  # the cap, not -inf
    # Crop 0 off by 0.1 everywhere (20 dB), crop 1 untouched (the cap): their mean, negated.
    off = sharp.clone()
    off[0] += 0.1
    assert psnr_loss([off], sharp).item() == pytest.approx(-(20.0 + 50.0) / 2, abs=1e-2)
    # Every crop counts alike in dB: the same error costs a crop that was sharp most, unlike L1.
    mild = sharp + 0.01
    assert psnr_loss([mild], sharp) - psnr_loss([sharp], sharp) > 9.9


def test_a_stage_on_the_psnr_loss_moves_the_columns(device: torch.device) -> None:
    torch.manual_seed(0)
    model = adarevd.AdaRevD(adarevd.PRESETS["adarevd-tiny"]).to(device)
    freeze_all_but(model, model.conv_features, model.subdenets, model.outputs)
    before = snapshot(model)
    stage = Stage(model, model.parameters(), StageConfig(iterations=2, loss="psnr"))
    blurry, sharp = torch.rand(2, 3, 64, 64, device=device), torch.rand(2, 3, 64, 64, device=device)
    losses = [stage.train_step(blurry, sharp, reversible=False) for _ in range(2)]
    assert all(-50 < loss < 0 for loss in losses)
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert any(k.startswith("outputs.") for k in changed) and not any(k.startswith("encoder.") for k in changed)


def test_dihedral_gives_eight_distinct_views() -> None:
    x = torch.arange(9.0).reshape(1, 3, 3)
    views = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8


def test_a_checkpoint_carries_the_random_state_that_the_kernel_noise_draws_from(device: torch.device) -> None:
    """UFPNet's kernel noise draws on the model's device (the CUDA generator on a GPU): a stage resumed
    from `stage_state` after other draws continues bit for bit as the unbroken one."""
    make_deterministic(device)  # what the training jobs do first: deterministic kernels on CUDA
    config = replace(adarevd.PRESETS["adarevd-tiny"], encoder="ufpnet", kernel_noise=True)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.rand(2, 3, 32, 32, generator=g).to(device), torch.rand(2, 3, 32, 32, generator=g).to(device))
        for _ in range(4)
    ]

    def stage() -> Stage:
        torch.manual_seed(0)
        pre = EncoderPretrainer(config).to(device)
        return Stage(pre, pre.parameters(), StageConfig(iterations=4))

    torch.manual_seed(5)
    unbroken = stage()
    for blurry, sharp in batches:
        unbroken.train_step(blurry, sharp)

    torch.manual_seed(5)
    first = stage()
    for blurry, sharp in batches[:2]:
        first.train_step(blurry, sharp)
    members = stage_state(first, step=2)
    torch.randn(1000, device=device), torch.randn(1000)  # what else the process drew meanwhile
    resumed = stage()
    load_stage_state(resumed, members)
    for blurry, sharp in batches[2:]:
        resumed.train_step(blurry, sharp)
    assert all(torch.equal(a, b) for a, b in zip(unbroken.model.parameters(), resumed.model.parameters(), strict=True))
    assert ("cuda_rng" in json.loads(members["state.json"])) == (device.type == "cuda")


def test_the_warmed_up_ema_follows_the_weights_early_and_settles_at_its_decay() -> None:
    update = ema_with_warmup(0.999)
    averaged, current = [torch.zeros(3)], [torch.ones(3)]
    update(averaged, current, torch.tensor(1))  # after the first (copying) update: decay 2/11
    torch.testing.assert_close(averaged[0], torch.full((3,), 9 / 11))
    late = [torch.zeros(3)]
    update(late, current, torch.tensor(100_000))  # long after the warm-up: the plain 0.999
    torch.testing.assert_close(late[0], torch.full((3,), 0.001))
    # In a stage: after 20 steps the warmed-up EMA sits near the weights, the plain one near the start.
    torch.manual_seed(0)
    pre = EncoderPretrainer(adarevd.PRESETS["adarevd-tiny"])
    stages = {
        warm: Stage(pre, pre.parameters(), StageConfig(iterations=20, lr=1e-2, ema_warmup=warm))
        for warm in (True, False)
    }
    start = {k: v.clone() for k, v in pre.state_dict().items()}
    blurry, sharp = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    for _ in range(20):
        stages[True].train_step(blurry, sharp)
        stages[False].ema.update_parameters(pre)  # the same weights, averaged the plain way

    def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return sum(float((a[k].float() - b[k].float()).abs().sum()) for k in a)

    now = pre.state_dict()
    warm, plain = (stages[w].averaged().state_dict() for w in (True, False))
    assert distance(warm, now) < 0.5 * distance(plain, now)
    assert distance(plain, start) < distance(warm, start)
