"""Backbones: plain-timm export round trips, multi-crop sizes, loader errors, feature sizes."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from omegaconf import OmegaConf
from timm.layers import GluMlp

from pretrain.backbones import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    BackboneError,
    backbone_timm_kwargs,
    build_backbone,
    export_backbone,
    load_backbone,
    resolve_backbone_config,
    swiglu_mlp_ratio,
    vit_intermediate_features,
)

ROUND_TRIP_CASES = {
    "vit_tiny_p4_28_gray": dict(arch="vit_tiny", patch_size=4, img_size=28, in_chans=1),
    "vit_tiny_p4_28_rgb": dict(arch="vit_tiny", patch_size=4, img_size=28, in_chans=3),
    "vit_small_p16_224_reg_ls": dict(
        arch="vit_small", patch_size=16, img_size=224, reg_tokens=4, layerscale=1e-5
    ),
    "vit_tiny_swiglu": dict(arch="vit_tiny", patch_size=8, img_size=32, swiglu=True, reg_tokens=1),
    "resnet18_gray": dict(arch="resnet18", img_size=28, in_chans=1),
    "vit_tiny_p4_6_blocks": dict(arch="vit_tiny", patch_size=4, img_size=28, in_chans=1, depth=6),
    "vit_tiny_convstem_p8_32_gray": dict(
        arch="vit_tiny_convstem", patch_size=8, img_size=32, in_chans=1, layerscale=0.1
    ),
}


def _input(cfg: dict, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"], generator=g)


def _perturb(model: torch.nn.Module) -> None:
    """Non-default values everywhere (LayerScale, BN stats, norms), so a lost tensor shows up."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(0.02 * torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("name", list(ROUND_TRIP_CASES))
def test_export_loads_into_plain_timm_with_identical_outputs(tmp_path, name):
    cfg = ROUND_TRIP_CASES[name]
    model = build_backbone(OmegaConf.create(cfg)).eval()
    _perturb(model)
    x = _input(cfg)
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (2, model.num_features)
    mean = [0.5] * cfg.get("in_chans", 3)
    export_backbone(
        model, tmp_path, meta={"source": "dinov2 teacher step 1000", "mean": mean, "std": 0.25}
    )
    assert not list(tmp_path.glob("*.tmp"))

    # exactly what a user with plain timm does: one call, no renaming
    plain = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    assert plain.num_classes == 0 and plain.pretrained_cfg["input_size"][0] == cfg.get(
        "in_chans", 3
    )
    assert "tag" not in plain.pretrained_cfg  # not timm's ImageNet weights
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), expected, atol=1e-6, rtol=0)

    loaded, meta = load_backbone(tmp_path)
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=0)
    assert meta["arch"] == cfg["arch"] and meta["img_size"] == cfg["img_size"]
    assert meta["in_chans"] == cfg.get("in_chans", 3)
    assert meta["num_features"] == model.num_features
    if cfg["arch"].startswith("vit"):
        assert len(loaded.blocks) == len(plain.blocks) == cfg.get("depth", 12)
    assert meta["source"] == "dinov2 teacher step 1000"
    assert meta["mean"] == mean and meta["std"] == [0.25] * len(mean)
    assert plain.pretrained_cfg["mean"] == mean  # timm's data config sees our normalisation
    # a loaded backbone re-exports to the same files
    export_backbone(loaded, tmp_path / "again", meta=meta)
    assert (tmp_path / "again" / CONFIG_FILENAME).read_text() == (
        tmp_path / CONFIG_FILENAME
    ).read_text()


def test_swiglu_uses_dinov2_hidden_size():
    # DINOv2: hidden = round_up_8(int(4 * dim * 2 / 3)); timm's packed fc1 holds 2 * hidden
    for dim, hidden in ((192, 512), (384, 1024), (768, 2048), (1024, 2736)):
        ratio = json.loads(json.dumps(swiglu_mlp_ratio(dim)))
        assert int(dim * ratio) == 2 * hidden
    model = build_backbone(dict(arch="vit_tiny", patch_size=4, img_size=28, swiglu=True))
    mlp = model.blocks[0].mlp
    assert isinstance(mlp, GluMlp) and isinstance(mlp.act, torch.nn.SiLU)
    assert mlp.fc1.out_features == 1024 and mlp.fc2.in_features == 512


def test_layerscale_and_registers_present():
    model = build_backbone(
        dict(arch="vit_tiny", patch_size=4, img_size=28, reg_tokens=3, layerscale=1e-5)
    )
    assert model.reg_token.shape == (1, 3, 192)
    assert torch.all(model.blocks[0].ls1.gamma == 1e-5)
    plain = build_backbone(dict(arch="vit_tiny", patch_size=4, img_size=28))
    assert plain.reg_token is None and isinstance(plain.blocks[0].ls1, torch.nn.Identity)


def test_multicrop_sizes_share_one_vit():
    model = build_backbone(
        dict(arch="vit_tiny", patch_size=4, img_size=28, in_chans=1, reg_tokens=2)
    ).eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 1, 28, 28)).shape == (2, 1 + 2 + 49, 192)
        assert model.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, 1 + 2 + 16, 192)
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 192)
    p14 = build_backbone(dict(arch="vit_tiny", patch_size=14, img_size=224)).eval()
    with torch.no_grad():
        assert p14.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 1 + 256, 192)
        assert p14.forward_features(torch.randn(1, 3, 98, 98)).shape == (1, 1 + 49, 192)
    # the conv-stem ViT: a 32 px global crop is 4 x 4 tokens of 8 px, a 16 px local crop 2 x 2
    stem = build_backbone(dict(arch="vit_tiny_convstem", patch_size=8, img_size=32, in_chans=1))
    with torch.no_grad():
        assert stem.eval().forward_features(torch.randn(2, 1, 32, 32)).shape == (2, 1 + 16, 192)
        assert stem.forward_features(torch.randn(2, 1, 16, 16)).shape == (2, 1 + 4, 192)
    fixed = build_backbone(dict(arch="vit_tiny", patch_size=4, img_size=28, dynamic_img_size=False))
    with pytest.raises(
        AssertionError
    ):  # timm refuses other sizes: the flag is what makes crops work
        fixed(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize(
    "arch,dim",
    [
        ("vit_tiny", 192),
        ("vit_small", 384),
        ("vit_base", 768),
        ("vit_large", 1024),
        ("resnet18", 512),
        ("resnet50", 2048),
    ],
)
def test_num_features_per_arch(arch, dim):
    with torch.device("meta"):
        model = build_backbone(dict(arch=arch))
    assert model.num_features == dim
    if arch == "vit_large":
        assert len(model.blocks) == 24 and model.blocks[0].attn.num_heads == 16


def test_resnet50_state_dict_loads_into_timm_strictly():
    with torch.device("meta"):
        model = build_backbone(dict(arch="resnet50", in_chans=1))
        plain = timm.create_model(**backbone_timm_kwargs(model))
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)


def test_intermediate_features_for_linear_probe():
    model = build_backbone(dict(arch="vit_tiny", patch_size=4, img_size=28, reg_tokens=2)).eval()
    _perturb(model)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        feats = vit_intermediate_features(model, x, 4)
        pooled = model(x)
    assert len(feats) == 4
    for cls, patches in feats:
        assert cls.shape == (2, 192) and patches.shape == (2, 49, 192)
    torch.testing.assert_close(feats[-1][0], pooled)  # last block, normed cls == pooled output
    assert not torch.allclose(feats[0][0], feats[-1][0])
    with pytest.raises(ValueError, match="n_last_blocks"):
        vit_intermediate_features(model, x, 13)
    resnet = build_backbone(dict(arch="resnet18")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        [(cls, patches)] = vit_intermediate_features(resnet, x, 1)
        torch.testing.assert_close(cls, resnet(x), atol=1e-6, rtol=0)
    assert cls.shape == (2, 512) and patches.shape == (2, 4, 512)
    with pytest.raises(ValueError, match="not a ViT"):
        vit_intermediate_features(resnet, x, 2)


def test_load_from_checkpoint_and_run_dir(tmp_path):
    cfg = dict(arch="vit_tiny", patch_size=4, img_size=28, in_chans=1, layerscale=1e-5)
    model = build_backbone(cfg).eval()
    _perturb(model)
    x = _input(cfg)
    with torch.no_grad():
        expected = model(x)
    ddp_state = {f"module.{k}": v for k, v in model.state_dict().items()}
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(
        {"teacher_backbone": ddp_state, "backbone_config": cfg, "step": 7, "meta": {"mean": [0.3]}},
        ckpt,
    )
    loaded, meta = load_backbone(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=0)
    assert meta["source"] == "teacher of last.pt step 7" and meta["mean"] == [0.3]
    assert meta["num_features"] == 192

    # a run dir: the newest export inside wins over checkpoints
    export_backbone(loaded, tmp_path / "run" / "export", meta={"source": "export"})
    again, meta = load_backbone(tmp_path / "run")
    assert meta["source"] == "export"
    with torch.no_grad():
        torch.testing.assert_close(again(x), expected, atol=1e-6, rtol=0)
    _, meta = load_backbone(tmp_path / "run" / "export" / WEIGHTS_FILENAME)
    assert meta["source"] == "export"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_backbone(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_backbone(tmp_path / "empty")

    model = build_backbone(dict(arch="vit_tiny", patch_size=4, img_size=28))
    export_backbone(model, tmp_path / "good")
    weights, meta_file = tmp_path / "good" / WEIGHTS_FILENAME, tmp_path / "good" / CONFIG_FILENAME

    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(BackboneError, match=f"{weights}.*corrupt"):
        load_backbone(tmp_path / "good")
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILENAME):
        load_backbone(tmp_path / "good")
    weights.write_bytes(blob)

    doc = json.loads(meta_file.read_text())
    doc["model_args"]["patch_size"] = 7  # weights are for patch 4
    meta_file.write_text(json.dumps(doc))
    with pytest.raises(BackboneError, match=f"{weights} does not match.*{meta_file}"):
        load_backbone(meta_file)
    meta_file.write_text("{not json")
    with pytest.raises(BackboneError, match=str(meta_file)):
        load_backbone(meta_file)

    bad_ckpt = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad_ckpt)
    with pytest.raises(BackboneError, match="bad.pt.*backbone_config"):
        load_backbone(bad_ckpt)


def test_config_and_export_refuse_bad_input(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone config key"):
        resolve_backbone_config({"archh": "vit_small"})
    with pytest.raises(BackboneError, match="unknown arch"):
        build_backbone({"arch": "vit_huge"})
    with pytest.raises(BackboneError, match="multiple of patch_size"):
        build_backbone({"arch": "vit_tiny", "patch_size": 16, "img_size": 28})
    with pytest.raises(BackboneError, match="multiple of its stem's stride 4"):
        resolve_backbone_config({"arch": "vit_tiny_convstem", "patch_size": 6, "img_size": 30})
    model = build_backbone(dict(arch="vit_tiny", patch_size=4, img_size=28))
    with pytest.raises(BackboneError, match="contradicts"):
        export_backbone(model, tmp_path, meta={"img_size": 64})
    with pytest.raises(BackboneError, match="3 channels"):
        export_backbone(model, tmp_path, meta={"mean": [0.1, 0.2]})
    assert not (tmp_path / CONFIG_FILENAME).exists()
