"""MAE on the shared engine: masking, the normalised-pixel loss by hand, exact resume, export."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from pretrain.backbones import load_backbone
from pretrain.checkpoint import load_newest
from pretrain.components.losses import mae_loss, patchify
from pretrain.components.masked_vit import vit_encode_visible as encode_visible
from pretrain.components.masks import random_masking
from pretrain.engine import Engine
from pretrain.methods.mae import MAE
from pretrain.train import run
from tests.conftest import run_killed, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def mae_config(npz, out, **extra):
    overrides = {
        "optim.base_lr": 1.5e-3,
        "mae.decoder_depth": 1,
        "mae.decoder_embed_dim": 32,
        "mae.decoder_num_heads": 2,
    }
    return tiny_run_config("mae", npz, out, **{**overrides, **extra})


def test_random_masking_removes_three_quarters_per_image_and_restores_order():
    torch.manual_seed(0)
    ids_keep, mask, ids_restore = random_masking(5, 16, 0.75, torch.device("cpu"))
    assert ids_keep.shape == (5, 4) and mask.shape == (5, 16)
    assert torch.equal(mask.sum(1), torch.full((5,), 12.0))
    for b in range(5):  # the kept ids are exactly the unmasked positions, each once
        assert sorted(ids_keep[b].tolist()) == mask[b].eq(0).nonzero().flatten().tolist()
    shuffled = torch.argsort(ids_restore, dim=1)  # ids_restore inverts the shuffle
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), torch.arange(16).expand(5, 16))
    assert not torch.equal(ids_keep[0], ids_keep[1])  # per-sample masks differ
    with pytest.raises(ValueError, match="keeps no patch"):
        random_masking(1, 3, 0.75, torch.device("cpu"))


def test_patchify_and_norm_pix_loss_against_a_hand_computation():
    img = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)  # 4 patches of 2x2
    patches = patchify(img, 2)
    assert patches[0, 0].tolist() == [0, 1, 4, 5] and patches[0, 3].tolist() == [10, 11, 14, 15]
    pred = torch.tensor([[[0.5, -1.0, 2.0, 0.0]] * 4])
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])  # only patches 0 and 3 count
    expected = []
    for k in (0, 3):
        values = patches[0, k].tolist()
        mean, var = statistics.mean(values), statistics.variance(values)  # unbiased, as MAE
        target = [(v - mean) / (var + 1e-6) ** 0.5 for v in values]
        expected.append(sum((p - t) ** 2 for p, t in zip(pred[0, k].tolist(), target)) / 4)
    got = mae_loss(pred, patches, mask, norm_pix=True)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    raw = sum(((pred[0, k] - patches[0, k]) ** 2).mean().item() for k in (0, 3)) / 2
    assert mae_loss(pred, patches, mask, norm_pix=False).item() == pytest.approx(raw, rel=1e-6)


def test_encoder_sees_only_kept_patches_and_matches_timm_when_nothing_is_masked(ramp_npz, tmp_path):
    cfg = mae_config(ramp_npz, tmp_path / "x")
    engine = Engine(cfg, device=torch.device("cpu"))
    method: MAE = engine.method
    images = torch.rand(2, 1, 16, 16)
    ids_keep, _, _ = random_masking(2, 16, 0.75, images.device)
    latent = encode_visible(method.encoder, images, ids_keep)
    assert latent.shape == (2, 1 + 4, 192)  # class token + 4 of 16 patches
    # keeping every patch in order reproduces timm's own forward_features
    full = encode_visible(method.encoder, images, torch.arange(16).expand(2, 16))
    torch.testing.assert_close(full, method.encoder.forward_features(images))
    # one engine step trains; the exported backbone is the encoder
    out = engine.train_step((images, torch.zeros(2)))
    assert torch.isfinite(out["loss"]) and out["terms"]["mask_ratio"].item() == 0.75
    assert method.backbone_for_export() is method.encoder


def test_mae_resumes_exactly_after_sigkill_and_exports_the_encoder(ramp_npz, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(mae_config(ramp_npz, straight))
    run_killed(mae_config(ramp_npz, resumed), MAE, 2)
    run(mae_config(ramp_npz, resumed))
    a, b = load_newest(straight / "checkpoints")[1], load_newest(resumed / "checkpoints")[1]
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    model, meta = load_backbone(resumed / "export")
    assert meta["method"] == "mae" and meta["step"] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, a["model"][f"encoder.{key}"]), key
    # mae.global_pool=avg (RETFound): the export's output is the mean of the normed patch tokens
    kwargs = json.loads((resumed / "export" / "config.json").read_text())["model_args"]
    assert kwargs["global_pool"] == "avg" and kwargs["fc_norm"] is False
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x)[:, 1:].mean(dim=1))
