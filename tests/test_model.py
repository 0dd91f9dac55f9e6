from __future__ import annotations

import math

import pytest
import torch

import adarevd
from adarevd.classifier import exit_depths, psnr_bucket, psnr_classes
from adarevd.metrics import psnr
from tests.conftest import randomize


@pytest.mark.parametrize("size", [(1, 1), (17, 23), (70, 90), (40, 200), (64, 64)])
def test_restore_shapes_for_odd_and_short_sizes_at_every_depth(tiny: adarevd.AdaRevD, size: tuple[int, int]) -> None:
    images = torch.rand(2, 3, *size, device=next(tiny.parameters()).device)
    for exit in ["adaptive", *range(tiny.num_columns + 1)]:
        out = tiny.restore(images, exit=exit)
        assert out.images.shape == images.shape
        assert out.images.min() >= 0 and out.images.max() <= 1
        assert out.depths.shape == (2, *out.grid.shape)
        if exit != "adaptive":
            assert torch.all(out.depths == exit)
    torch.testing.assert_close(tiny.restore(images, exit=0).images, images)


def test_adaptive_decode_equals_running_each_patch_at_its_own_depth(tiny: adarevd.AdaRevD) -> None:
    device = next(tiny.parameters()).device
    images = torch.rand(1, 3, 160, 208, device=device)
    with torch.no_grad():
        patches = tiny.cut(tiny.encode(tiny.pad(images)), tiny.grid(160, 208))
        x, state = tiny.initial_state(patches)
        n = x.shape[0]
        depths = torch.arange(n, device=device) % (tiny.num_columns + 1)
        mixed = tiny.decode(x, state, depths)
        for d in range(tiny.num_columns + 1):
            fixed = tiny.decode(x, state, torch.full_like(depths, d))
            torch.testing.assert_close(mixed[depths == d], fixed[depths == d], rtol=1e-5, atol=1e-6)
        # The step-wise API by hand gives the same residual at full depth.
        s = state
        for j in range(tiny.num_columns):
            s = tiny.run_column(j, x, s)
        torch.testing.assert_close(tiny.head(tiny.num_columns - 1, s), fixed, rtol=1e-5, atol=1e-6)


def test_frame_and_patch_mode_agree_on_a_single_patch(tiny: adarevd.AdaRevD) -> None:
    images = torch.rand(2, 3, 64, 48, device=next(tiny.parameters()).device)  # one patch; TLC window 96 covers it
    frame = tiny.restore(images, encoder_mode="frame")
    patch = tiny.restore(images, encoder_mode="patch")
    torch.testing.assert_close(frame.images, patch.images, rtol=1e-5, atol=1e-6)
    assert torch.equal(frame.depths, patch.depths)


def test_frame_and_patch_mode_differ_where_tlc_and_context_matter(tiny: adarevd.AdaRevD) -> None:
    images = torch.rand(1, 3, 192, 192, device=next(tiny.parameters()).device)
    frame = tiny.restore(images, encoder_mode="frame", exit=4).images
    patch = tiny.restore(images, encoder_mode="patch", exit=4).images
    assert (frame - patch).abs().max() > 1e-4


def test_tlc_changes_the_encoder_only_on_maps_larger_than_its_window() -> None:
    torch.manual_seed(3)
    local = randomize(adarevd.build("adarevd-tiny")).eval()
    plain = adarevd.build("adarevd-tiny", tlc_window=None).eval()
    plain.load_state_dict(local.state_dict())
    small, large = torch.rand(1, 3, 96, 96), torch.rand(1, 3, 192, 160)
    with torch.no_grad():
        for a, b in zip(local.encode(small), plain.encode(small), strict=True):
            torch.testing.assert_close(a, b)
        # e4 is pooled by a 6x6 window (96 / 16) on a 12x10 map: local means differ from the global one.
        assert (local.encode(large)[4] - plain.encode(large)[4]).abs().max() > 1e-2


def test_ufpnet_encoder_noise_is_seeded_and_can_be_turned_off() -> None:
    torch.manual_seed(0)
    model = adarevd.build("adarevd-tiny", encoder="ufpnet", encoder_blocks=(1, 1, 1, 1), kernel_noise=True)
    model = randomize(model, scale=0.05).eval()
    images = torch.rand(1, 3, 32, 32)

    def encode(seed: int) -> torch.Tensor:  # training's draw: torch's default generator
        torch.manual_seed(seed)
        return model.encode(images)[0]

    assert torch.equal(encode(1), encode(1))
    assert not torch.equal(encode(1), encode(2))
    assert torch.equal(model.encode(images, [7])[0], model.encode(images, [7])[0])
    assert not torch.equal(model.encode(images, [7])[0], model.encode(images, [8])[0])
    model.encoder.kernel_noise = False
    assert torch.equal(encode(1), encode(2))


@pytest.mark.parametrize("encoder_mode", ["frame", "patch"])
def test_ufpnet_restores_a_frame_to_the_same_bytes_in_any_batch_and_after_any_draw(encoder_mode: str) -> None:
    torch.manual_seed(0)
    config = {
        "encoder": "ufpnet",
        "encoder_blocks": (1, 1, 1, 1),
        "kernel_noise": True,
        "patch_size": 48,
        "overlap": 16,
    }
    model = randomize(adarevd.build("adarevd-tiny", **config), scale=0.05).eval()
    frames = torch.rand(3, 3, 48, 64)

    def restore(images: torch.Tensor) -> torch.Tensor:
        return model.restore(images, exit=2, encoder_mode=encoder_mode, encoder_batch=3).images

    alone = restore(frames[1:2])
    torch.rand(1000)  # whatever else the process drew meanwhile
    assert torch.equal(restore(frames[1:2]), alone)  # a re-run: the same bytes
    together = restore(frames)  # another batch (and, in patch mode, other encoder chunks)
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=1e-6)  # float sums of another batch size
    turned = restore(frames.flip(0))  # the frame at another place in the batch
    torch.testing.assert_close(turned[1:2], alone, rtol=0, atol=1e-6)
    # The features, where the noise acts: the same bytes after other draws, and not the noise-free ones.
    padded = model.pad(frames[1:2])
    grid = model.grid(*padded.shape[-2:])
    features = model.encode_patches(padded, grid, encoder_mode, batch=3)
    torch.rand(1000)
    again = model.encode_patches(padded, grid, encoder_mode, 3)
    assert all(torch.equal(a, b) for a, b in zip(again, features, strict=True))
    model.encoder.kernel_noise = False  # (random weights this small pass little of the kernels on)
    assert not torch.equal(model.encode_patches(padded, grid, encoder_mode, 3)[0], features[0])


def test_training_forward_leaves_the_encoder_frozen(tiny: adarevd.AdaRevD) -> None:
    tiny.train()
    assert not tiny.encoder.training and tiny.subdenets[0].training
    images = torch.rand(2, 3, 48, 48, device=next(tiny.parameters()).device)
    outputs = tiny(images)
    assert len(outputs) == tiny.num_columns and all(o.shape == images.shape for o in outputs)
    sum(o.mean() for o in outputs).backward()
    assert all(p.grad is None for p in tiny.encoder.parameters())
    assert tiny.conv_features[0].grad is not None and tiny.subdenets[0].alpha3.grad is not None


def test_bf16_autocast_restore_is_close_to_fp32(tiny: adarevd.AdaRevD) -> None:
    images = torch.rand(1, 3, 80, 96, device=next(tiny.parameters()).device)
    full = tiny.restore(images, exit=4).images
    half = tiny.restore(images, exit=4, autocast_dtype=torch.bfloat16).images
    assert (full - half).abs().mean() < 0.02


def test_the_classifier_runs_in_fp32_under_autocast(tiny: adarevd.AdaRevD) -> None:
    """A patch's exit depth must not move with the columns' precision: the classifier ignores autocast."""
    images = torch.rand(1, 3, 80, 96, device=next(tiny.parameters()).device)
    padded = tiny.pad(images)
    features = tiny.encode_patches(padded, tiny.grid(*padded.shape[-2:]))
    plain = tiny.classify(features)
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        under = tiny.classify(features)
        half = tiny.classify([f.bfloat16() for f in features])  # what a bf16 encoder hands it
    assert under.dtype == torch.float32 and torch.equal(under, plain)
    assert half.dtype == torch.float32


def test_channels_last_gives_the_same_result(tiny: adarevd.AdaRevD) -> None:
    images = torch.rand(1, 3, 80, 96, device=next(tiny.parameters()).device)
    plain = tiny.restore(images).images
    tiny.to(memory_format=torch.channels_last)
    fast = tiny.restore(images.contiguous(memory_format=torch.channels_last)).images
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)  # other conv kernels, other summation order


def test_restore_rejects_bad_arguments(tiny: adarevd.AdaRevD) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.restore(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="exit must be"):
        tiny.restore(torch.rand(1, 3, 32, 32), exit=9)
    with pytest.raises(ValueError, match="encoder_mode"):
        tiny.restore(torch.rand(1, 3, 32, 32), encoder_mode="tiles")  # type: ignore[arg-type]


def test_psnr_buckets_count_thresholds_strictly_exceeded() -> None:
    values = torch.tensor([19.9, 20.0, 20.1, 35.0, 40.0, 40.1, math.inf])
    assert psnr_bucket(values, (20, 25, 30, 35, 40)).tolist() == [0, 0, 1, 3, 4, 5, 5]
    sharp = torch.rand(2, 3, 16, 16)
    assert psnr_classes(sharp, sharp, (20, 25, 30, 35, 40)).tolist() == [5, 5]  # 80 dB: the 1e-8 floor
    blurry = sharp + 0.1  # MSE 0.01 -> 20 dB, not above 20
    assert psnr(blurry, sharp).sub(20).abs().max() < 1e-3
    assert psnr_classes(blurry + 0.001, sharp, (20, 25, 30, 35, 40)).tolist() == [0, 0]


def test_exit_table_maps_classes_to_depths_capped_at_the_column_count() -> None:
    logits = torch.eye(6)
    assert exit_depths(logits, (7, 6, 5, 2, 2, 0), 4).tolist() == [4, 4, 4, 2, 2, 0]


def test_e4_classifier_with_eight_classes_realblur_r_style() -> None:
    model = adarevd.build(
        "adarevd-tiny",
        classifier_input="e4",
        num_classes=8,
        exit_table=(6, 6, 6, 6, 5, 3, 2, 2),
        psnr_thresholds=(20, 25, 30, 35, 40, 45, 50),
    )
    randomize(model).eval()
    assert model.ape[1].alpha.shape == (1, 8)
    out = model.restore(torch.rand(1, 3, 80, 100))
    assert out.depths.shape == (1, *out.grid.shape)
    assert int(out.depths.max()) <= model.num_columns  # table values above N mean all columns


def test_build_rejects_unknown_presets_and_fields() -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        adarevd.build("adarevd-xl")
    with pytest.raises(ValueError, match="unknown AdaRevD config field"):
        adarevd.build("adarevd-tiny", depth=3)
    with pytest.raises(ValueError, match="exit_table needs 6"):
        adarevd.build("adarevd-tiny", exit_table=(1, 2))
