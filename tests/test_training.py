from __future__ import annotations

import torch

import adarevd
from adarevd.training import EncoderPretrainer, Stage, StageConfig, deblur_loss, dihedral, freeze_all_but


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


def test_dihedral_gives_eight_distinct_views() -> None:
    x = torch.arange(9.0).reshape(1, 3, 3)
    views = {tuple(dihedral(x, k).flatten().tolist()) for k in range(8)}
    assert len(views) == 8
