"""Continued pretraining (`init.from`): every key layout loads the source weights exactly, the
backbone computes the same function, mismatches fail clearly, heads-only warmup freezes the
backbone for N steps, a resumed run does not re-apply init.from, DINOv2 starts from a MAE export.

Sources are small timm ViTs whose state dicts are renamed to each layout's REAL key names
(facebookresearch/dinov2, facebookresearch/mae + RETFound, UNI/UNI2 = timm).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed

from pretrain.backbones import BackboneError, build_backbone, export_backbone, load_backbone
from pretrain.config import compose_config
from pretrain.engine import Engine
from pretrain.init_from import REPORT_FILENAME, initialise_from
from pretrain.methods import build_method
from pretrain.methods.mae import MAE
from pretrain.train import run
from pretrain.validation import validate
from tests.conftest import run_killed, tiny_run_config

VIT = {"arch": "vit_tiny", "patch_size": 4, "img_size": 16, "in_chans": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every tensor random (LayerScale, norms, tokens included), so a wrong map cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


class Holder(torch.nn.Module):
    """A method stand-in with a student and an EMA-teacher backbone (DINOv2's arrangement)."""

    def __init__(self, **cfg):
        super().__init__()
        self.student = build_backbone({**VIT, **cfg})
        self.teacher = build_backbone({**VIT, **cfg})
        self.head = torch.nn.Linear(192, 3)


def assert_same(target: torch.nn.Module, source_state: dict, skip=()):
    for key, value in target.state_dict().items():
        if key not in skip:
            assert torch.equal(value, source_state[key]), key


def assert_same_function(a: torch.nn.Module, b: torch.nn.Module, chans: int = 1):
    x = torch.randn(2, chans, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a.eval().forward_features(x), b.eval().forward_features(x))


def save(obj, path):
    if str(path).endswith(".safetensors"):
        safetensors.torch.save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return path


def test_timm_checkpoint_file_into_student_and_teacher(tmp_path):
    src = randomised(build_backbone(VIT), 0)
    state = {**src.state_dict(), "head.weight": torch.zeros(5, 192), "head.bias": torch.zeros(5)}
    holder = Holder()
    head_before = holder.head.weight.clone()
    report = initialise_from(
        holder, save(state, tmp_path / "vit.safetensors"), report_dir=tmp_path / "run"
    )
    for module in (holder.student, holder.teacher):  # the teacher starts equal to the student
        assert_same(module, src.state_dict())
    assert torch.equal(holder.head.weight, head_before)  # heads stay fresh
    assert report.layout == "timm" and sorted(report.dropped) == ["head.bias", "head.weight"]
    written = json.loads((tmp_path / "run" / REPORT_FILENAME).read_text())
    assert written["targets"] == ["student", "teacher"] and written["loaded"] == len(state) - 2


def test_dinov2_layout_registers_chunks_swiglu_prefixes(tmp_path):
    cfg = {"reg_tokens": 4, "layerscale": 1e-5, "swiglu": True}
    src = randomised(build_backbone({**VIT, **cfg}), 1)
    with torch.no_grad():
        src.pos_embed[:, 1:5] = 0  # DINOv2 registers have no position: rows 1..4 are zero
    sd = src.state_dict()
    dino = {}
    for key, value in sd.items():
        key = key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        if key.startswith("blocks."):
            i = int(key.split(".")[1])
            key = f"blocks.{i // 4}.{i}." + key.split(".", 2)[2]  # block_chunks=3 layout
        dino[{"reg_token": "register_tokens"}.get(key, key)] = value
    dino["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"][:, 5:]], dim=1)
    dino["mask_token"] = torch.randn(1, 192)
    full = {f"module.teacher.backbone.{k}": v for k, v in dino.items()}
    full.update({f"module.student.backbone.{k}": v + 1 for k, v in dino.items()})
    full["module.teacher.dino_head.mlp.0.weight"] = torch.zeros(8, 192)
    holder = Holder(**cfg)
    report = initialise_from(holder, save({"model": full, "iteration": 7}, tmp_path / "d.pth"))
    assert report.layout == "dinov2" and report.layout_detected
    assert report.container == ["model"] and report.namespace == "teacher.backbone."
    assert report.dropped == ["mask_token"] and not report.unknown
    assert_same(holder.teacher, sd)  # teacher weights, not the student's (+1)
    assert_same_function(holder.student, src)
    # a DINOv2 method also takes the trained iBOT mask token (kept beside its student backbone)
    model = {**VIT, **cfg}
    method = build_method(
        compose_config(
            None,
            [
                "method=dinov2",
                "data.train=unused.npz:train",
                "optim.max_steps=1",
                f"output_dir={tmp_path / 'out'}",
                *(f"model.{k}={v}" for k, v in model.items()),
                "dinov2.crops.global_crops_size=16",
                "dinov2.crops.local_crops_size=8",
                "dinov2.dino.head_n_prototypes=16",
                "dinov2.dino.head_hidden_dim=16",
                "dinov2.dino.head_bottleneck_dim=8",
            ],
        )
    )
    report = initialise_from(method, tmp_path / "d.pth")
    assert torch.equal(method.student.mask_token.mask_token, dino["mask_token"])
    assert "student.mask_token.mask_token" in report.adapted


def test_mae_pretrain_and_retfound_finetuned_layouts(tmp_path):
    src = randomised(build_backbone(VIT), 2)
    sd = src.state_dict()
    mae = {
        **sd,
        "mask_token": torch.zeros(1, 1, 64),
        "decoder_embed.weight": torch.zeros(64, 192),
        "decoder_pos_embed": torch.zeros(1, 17, 64),
        "decoder_blocks.0.norm1.weight": torch.ones(64),
        "decoder_norm.weight": torch.ones(64),
        "decoder_pred.weight": torch.zeros(16, 64),
    }
    holder = Holder()
    report = initialise_from(holder, save({"model": mae, "epoch": 799}, tmp_path / "mae.pth"))
    assert report.layout == "mae" and len(report.dropped) == 6 and not report.unknown
    assert_same(holder.student, sd)
    # RETFound fine-tuned: global-pool LayerNorm `fc_norm` instead of `norm`, a classifier head
    ret = {("fc_norm." + k[5:] if k.startswith("norm.") else k): v for k, v in sd.items()}
    ret["head.weight"] = torch.zeros(5, 192)
    holder = Holder()
    report = initialise_from(holder, save({"model": ret}, tmp_path / "ret.pth"), layout="mae")
    assert report.renamed == {"fc_norm.weight": "norm.weight", "fc_norm.bias": "norm.bias"}
    assert_same(holder.student, sd)


def test_uni2_layout_no_embed_class_registers_layerscale(tmp_path):
    """UNI2-h: timm ViT with reg tokens, LayerScale and pos_embed without prefix rows."""
    src = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=0,
        reg_tokens=4,
        no_embed_class=True,
        init_values=1e-5,
        dynamic_img_size=True,
    )
    randomised(src, 3)
    holder = Holder(reg_tokens=4, layerscale=1e-5)
    report = initialise_from(holder, save(src.state_dict(), tmp_path / "uni.bin"), layout="uni")
    assert "prefix rows 0 -> 5" in report.adapted["pos_embed"]
    assert_same(holder.student, src.state_dict(), skip={"pos_embed"})
    assert_same_function(holder.student, src)


def test_export_and_checkpoint_with_grid_resampling_and_rgb_to_gray(tmp_path):
    src = randomised(build_backbone({**VIT, "in_chans": 3, "img_size": 28}), 4)
    export_backbone(src, tmp_path / "export")
    sd = src.state_dict()
    holder = Holder()  # 16 px, gray
    report = initialise_from(holder, tmp_path / "export")
    assert report.kind == "medssl_export"
    assert report.adapted["pos_embed"] == "grid 7x7 -> 4x4 (bicubic)"
    assert "in_chans 3 -> 1" in report.adapted["patch_embed.proj.weight"]
    want = resample_abs_pos_embed(sd["pos_embed"], [4, 4], [7, 7], num_prefix_tokens=1)
    assert torch.equal(holder.student.pos_embed, want)
    torch.testing.assert_close(
        holder.student.patch_embed.proj.weight, sd["patch_embed.proj.weight"].sum(1, True)
    )
    assert_same(holder.student, sd, skip={"pos_embed", "patch_embed.proj.weight"})
    ckpt = {"format": 1, "step": 3, "backbone_state": sd, "model": {}}
    holder = Holder(in_chans=3, img_size=28)
    assert initialise_from(holder, save(ckpt, tmp_path / "ckpt.pt")).kind == "medssl_checkpoint"
    assert_same(holder.teacher, sd)


def test_architecture_mismatch_is_a_clear_error(tmp_path):
    tiny = build_backbone(VIT).state_dict()
    wide = {**tiny, "cls_token": torch.zeros(1, 1, 384)}  # e.g. a ViT-S cls token on a ViT-Ti
    with pytest.raises(
        BackboneError, match=r"'cls_token': source \(1, 1, 384\), model \(1, 1, 192\)"
    ):
        initialise_from(Holder(), save(wide, tmp_path / "s.pth"))
    patch8 = build_backbone({**VIT, "patch_size": 8}).state_dict()
    with pytest.raises(BackboneError, match=r"'patch_embed.proj.weight': source \(192, 1, 8, 8\)"):
        initialise_from(Holder(), save(patch8, tmp_path / "p8.pth"))
    cut = {k: v for k, v in tiny.items() if not k.startswith("blocks.11.")}
    with pytest.raises(BackboneError, match=r"not in the source.*blocks\.11\."):
        initialise_from(Holder(), save(cut, tmp_path / "cut.pth"))
    with pytest.raises(BackboneError, match="4 register tokens, the model none"):
        regs = build_backbone({**VIT, "reg_tokens": 4}).state_dict()
        initialise_from(Holder(), save(regs, tmp_path / "r.pth"))
    with pytest.raises(BackboneError, match="no state dict found"):
        initialise_from(Holder(), save({"epoch": 3}, tmp_path / "e.pth"))


def mae_config(npz, out, **extra):
    overrides = {
        "optim.base_lr": 1.5e-3,
        "mae.decoder_depth": 1,
        "mae.decoder_embed_dim": 32,
        "mae.decoder_num_heads": 2,
    }
    return tiny_run_config("mae", npz, out, **{**overrides, **extra})


def test_heads_only_warmup_freezes_the_backbone_for_n_steps(ramp_npz, tmp_path):
    src = tmp_path / "src"
    run(mae_config(ramp_npz, src, **{"optim.max_steps": 0}))
    cfg = mae_config(
        ramp_npz, tmp_path / "run", **{"init.from": src / "export", "init.heads_only_steps": 2}
    )
    engine = Engine(cfg, device=torch.device("cpu"))
    method: MAE = engine.method
    start = {k: v.clone() for k, v in method.encoder.state_dict().items()}
    assert_same(method.encoder, load_backbone(src / "export")[0].state_dict())
    decoder = method.decoder.pred.weight.clone()
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        out = engine.train_step((images, torch.zeros(8)))
        assert out["state"].values["backbone_frozen"] == 1.0
        assert_same(method.encoder, start)  # bit-identical: no grad, no decay, no Adam state
    assert not torch.equal(method.decoder.pred.weight, decoder)  # the head trained meanwhile
    assert all(p not in engine.optimizer.state for p in method.encoder.parameters())
    out = engine.train_step((images, torch.zeros(8)))
    assert out["state"].values["backbone_frozen"] == 0.0
    assert not torch.equal(
        method.encoder.blocks[0].attn.qkv.weight, start["blocks.0.attn.qkv.weight"]
    )


def test_resume_does_not_reapply_init_from(ramp_npz, tmp_path):
    src = tmp_path / "src"
    run(mae_config(ramp_npz, src, **{"optim.max_steps": 0}))
    cfg = mae_config(ramp_npz, tmp_path / "run", **{"init.from": src / "export"})
    run_killed(cfg, MAE, 3)
    # the source is gone: a resumed run that re-applied init.from would fail to read it
    (src / "export" / "model.safetensors").write_bytes(b"not weights")
    run(cfg)
    model, meta = load_backbone(tmp_path / "run" / "export")
    assert meta["step"] == 4


def test_dinov2_run_started_from_a_mae_export_trains_and_exports(ramp_npz, tmp_path):
    mae_out = tmp_path / "mae"
    run(mae_config(ramp_npz, mae_out, **{"optim.max_steps": 1}))
    mae_encoder = load_backbone(mae_out / "export")[0].state_dict()
    out = tmp_path / "dino"
    overrides = {
        "method": "dinov2",
        "output_dir": str(out),
        "data.train": f"{ramp_npz}:train",
        "data.batch_size": 8,
        "data.num_workers": 0,
        "data.channels": 1,
        "model.arch": "vit_tiny",
        "model.patch_size": 4,
        "model.img_size": 16,
        "model.in_chans": 1,
        "optim.max_steps": 3,
        "optim.warmup_steps": 1,
        "train.precision": "fp32",
        "train.progress": False,
        "monitor.plot": False,
        "train.log_every": 1,
        "dinov2.dino.head_n_prototypes": 32,
        "dinov2.dino.head_hidden_dim": 64,
        "dinov2.dino.head_bottleneck_dim": 32,
        "dinov2.crops.global_crops_size": 16,
        "dinov2.crops.local_crops_size": 8,
        "dinov2.crops.local_crops_number": 2,
        "dinov2.freeze_last_layer_epochs": 0.0,
        "init.from": str(mae_out / "export"),
        "init.heads_only_steps": 1,
    }
    cfg = compose_config(None, [f"{k}={v}" for k, v in overrides.items()])
    validate(cfg)
    run(cfg)
    report = json.loads((out / REPORT_FILENAME).read_text())
    assert report["targets"] == ["student.backbone", "teacher.backbone"]
    model, meta = load_backbone(out / "export")
    assert meta["method"] == "dinov2" and meta["step"] == 3
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, mae_encoder[k])]
    assert changed  # trained after the heads-only step (teacher EMA of the student)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["backbone_frozen"] for line in lines] == [1.0, 0.0, 0.0]


def test_rgb_resnet_checkpoint_into_a_gray_simclr_backbone(tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    state = src.state_dict()  # timm resnet18 names; `fc.*` is the ImageNet classifier
    target = build_backbone({"arch": "resnet18", "img_size": 28, "in_chans": 1})
    report = initialise_from(target, save({"state_dict": state}, tmp_path / "r18.pth"))
    assert sorted(report.dropped) == ["fc.bias", "fc.weight"] and not report.unknown
    torch.testing.assert_close(target.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert_same(target, state, skip={"conv1.weight"})
