"""Augmentations: crop shapes on small images, channel handling, gray stays gray, HED stain jitter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from pretrain.transforms import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    MultiCropTransform,
    RandomGrayIntensity,
    RandomHEDJitter,
    SimCLRTransform,
    ToChannels,
    build_pretrain_transform,
    eval_transform,
    mae_transform,
    modality_jitter,
)


@pytest.fixture(scope="module")
def gray28(medssl_data) -> torch.Tensor:
    with np.load(medssl_data / "pneumoniamnist.npz") as npz:
        return torch.from_numpy(npz["val_images"][0] / 255.0).float()[None]


@pytest.fixture(scope="module")
def ihc(medssl_data) -> torch.Tensor:
    with Image.open(medssl_data / "images" / "ihc.png") as im:
        arr = np.asarray(im.convert("RGB"))[:96, :96]
    return torch.from_numpy(arr / 255.0).float().permute(2, 0, 1).contiguous()


@pytest.mark.parametrize(("channels", "c"), [("repeat", 3), (1, 1)])
@pytest.mark.parametrize("preset", ["gray", "rgb", "pathology"])
def test_multicrop_shapes_on_28px_single_channel(gray28, channels, c, preset):
    torch.manual_seed(0)
    t = MultiCropTransform(24, 12, 4, preset=preset, channels=channels)
    out = t(gray28)
    assert [g.shape for g in out["global_crops"]] == [(c, 24, 24)] * 2
    assert [crop.shape for crop in out["local_crops"]] == [(c, 12, 12)] * 4
    assert all(
        x.dtype == torch.float32 and torch.isfinite(x).all()
        for x in out["global_crops"] + out["local_crops"]
    )
    batch = default_collate([out, t(gray28)])
    assert batch["global_crops"][0].shape == (2, c, 24, 24)
    assert batch["local_crops"][3].shape == (2, c, 12, 12)


@pytest.mark.parametrize("size", [28, 32, 64])
def test_small_sizes_for_every_method(gray28, size):
    for method in ("dinov2", "mae", "simclr"):
        t = build_pretrain_transform(method, global_size=size, local_size=size // 2, n_local=2)
        out = t(gray28)
        first = out["global_crops"][0] if method == "dinov2" else out if method == "mae" else out[0]
        assert first.shape == (3, size, size)
    views = SimCLRTransform(size, channels=1)(gray28)
    assert len(views) == 2 and not torch.equal(views[0], views[1])
    assert mae_transform(size, channels=1)(gray28).shape == (1, size, size)


def test_gray_preset_keeps_gray_images_gray(gray28):
    torch.manual_seed(1)
    rgb_gray = gray28.repeat(3, 1, 1)  # a grayscale image stored as RGB
    same = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # channel-blind normalisation
    t = MultiCropTransform(28, 12, 6, preset="gray", channels="repeat", **same)
    for _ in range(5):
        out = t(rgb_gray)
        for crop in out["global_crops"] + out["local_crops"]:  # vector kernels may differ by 1 ulp
            assert torch.allclose(crop[0], crop[1], rtol=0, atol=1e-6)
            assert torch.allclose(crop[1], crop[2], rtol=0, atol=1e-6)
    jitter = RandomGrayIntensity(p=1.0)
    changed = jitter(rgb_gray)
    assert torch.equal(changed[0], changed[2]) and not torch.equal(changed, rgb_gray)
    assert 0.0 <= float(changed.min()) and float(changed.max()) <= 1.0


def test_rgb_preset_does_change_colour(ihc):
    """The rgb preset's jitter changes hue balance, not only brightness: the ratio of the channel
    means moves (a no-op jitter, or a brightness-only one, leaves it as it was)."""
    jitter = v2.Compose(modality_jitter("rgb"))

    def red_green(x: torch.Tensor) -> float:
        means = x.mean(dim=(1, 2))
        return float(means[0] / means[1])

    before = red_green(ihc)
    shifts = []
    for seed in range(10):
        torch.manual_seed(seed)
        out = jitter(ihc)
        assert out.shape == ihc.shape
        shifts.append(abs(red_green(out) - before) / before)
    assert max(shifts) > 0.05, shifts  # some draws shift the colour balance by > 5 %


def test_hed_round_trip_and_jitter(ihc):
    np.testing.assert_allclose((RGB_FROM_HED @ HED_FROM_RGB).numpy(), np.eye(3), atol=1e-5)
    identity = RandomHEDJitter(sigma=0.0, p=1.0)(ihc)  # rgb -> HED -> rgb
    np.testing.assert_allclose(identity.numpy(), ihc.clamp(min=1e-6).numpy(), atol=1e-4)
    torch.manual_seed(0)
    jittered = RandomHEDJitter(sigma=0.05, p=1.0)(ihc)
    assert jittered.shape == ihc.shape and torch.isfinite(jittered).all()
    assert 0.0 <= float(jittered.min()) and float(jittered.max()) <= 1.0
    assert (jittered - ihc).abs().mean() > 1e-3
    with pytest.raises(ValueError, match="RGB"):
        RandomHEDJitter(p=1.0)(ihc[:1])


def test_channel_conversion():
    red = torch.zeros(3, 2, 2)
    red[0] = 1.0
    assert torch.allclose(ToChannels(1)(red), torch.full((1, 2, 2), 0.299))
    one = torch.rand(1, 4, 4)
    assert torch.equal(ToChannels("repeat")(one), one.repeat(3, 1, 1))
    with pytest.raises(ValueError, match="channels"):
        ToChannels(2)


def test_eval_transform_is_deterministic_and_normalised(gray28):
    t = eval_transform(64, channels=1)
    a, b = t(gray28), t(gray28)
    assert a.shape == (1, 64, 64) and torch.equal(a, b)
    flat = eval_transform(32, channels="repeat", mean=(0.5,) * 3, std=(0.25,) * 3)(
        torch.full((1, 28, 40), 0.75)
    )
    assert flat.shape == (3, 32, 32) and torch.allclose(flat, torch.ones_like(flat), atol=1e-5)
    imagenet = eval_transform(28)(torch.full((1, 28, 28), 0.485))
    assert abs(float(imagenet[0].mean())) < 1e-5  # ImageNet mean by default for 3 channels


@pytest.mark.parametrize("preset", ["gray", "rgb", "pathology"])
def test_jitter_strength_zero_leaves_intensities_alone_and_one_is_the_default(preset):
    torch.manual_seed(0)
    img = torch.rand(3, 16, 16)
    for module in modality_jitter(preset, 0.0):
        if isinstance(module, (RandomGrayIntensity, RandomHEDJitter, v2.RandomApply)):
            torch.testing.assert_close(module(img.clone()), img, atol=1e-5, rtol=0)
    gray = modality_jitter("gray", 1.0)[0]
    assert (gray.window, gray.brightness, gray.contrast) == (0.1, 0.4, 0.4)
    assert gray.gamma == pytest.approx((0.7, 1.5))
    with pytest.raises(ValueError, match="strength"):
        modality_jitter(preset, -1.0)


def test_multicrop_jitter_strength_scales_every_view():
    views = MultiCropTransform(32, 16, 2, preset="gray", jitter_strength=0.5)
    for view in (views.global1, views.global2, views.local):
        (jitter,) = [t for t in view.transforms if isinstance(t, RandomGrayIntensity)]
        assert (jitter.window, jitter.brightness, jitter.contrast) == pytest.approx(
            (0.05, 0.2, 0.2)
        )
