"""Schedules, lr scaling and optimizer param groups against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf

from pretrain.engine import build_engine_schedules, resolve_total_steps
from pretrain.optim import (
    apply_lr_wd,
    build_optimizer,
    check_param_groups,
    param_groups_lrd,
    vit_layer_id,
)
from pretrain.schedules import (
    constant_schedule,
    cosine_schedule,
    freeze_first,
    linear_schedule,
    lr_scale,
    steps_from_epochs,
    value_at,
    warmup_then_constant,
)


def test_cosine_schedule_matches_dinov2_cosine_scheduler_by_hand():
    # freeze 1, warmup 2 (linspace 0.1 -> 1.0 inclusive), then cosine over the 4 remaining steps.
    s = cosine_schedule(1.0, 0.0, 7, warmup_steps=2, start_warmup=0.1, freeze_steps=1)
    cos = [0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    np.testing.assert_allclose(s, [0.0, 0.1, 1.0, *cos], rtol=0, atol=1e-12)
    assert cos == pytest.approx([1.0, 0.853553390593, 0.5, 0.146446609407])


def test_cosine_schedule_without_warmup_starts_at_base_and_decreases_towards_final():
    s = cosine_schedule(0.04, 0.4, 100)
    assert len(s) == 100 and s[0] == pytest.approx(0.04, abs=1e-15)
    assert np.all(np.diff(s) > 0) and s[-1] < 0.4 and s[-1] == pytest.approx(0.4, abs=1e-3)


def test_cosine_schedule_refuses_warmup_longer_than_run():
    with pytest.raises(ValueError, match="exceed total_steps"):
        cosine_schedule(1.0, 0.0, 5, warmup_steps=6)
    assert len(cosine_schedule(1.0, 0.0, 0)) == 0


def test_linear_constant_freeze_and_teacher_temperature_warmup():
    np.testing.assert_allclose(linear_schedule(0.04, 0.07, 4), [0.04, 0.05, 0.06, 0.07])
    np.testing.assert_array_equal(constant_schedule(0.5, 3), [0.5, 0.5, 0.5])
    base = np.array([1.0, 2.0, 3.0, 4.0])
    frozen = freeze_first(base, 2)
    np.testing.assert_array_equal(frozen, [0.0, 0.0, 3.0, 4.0])
    np.testing.assert_array_equal(base, [1.0, 2.0, 3.0, 4.0])  # input untouched
    np.testing.assert_allclose(
        warmup_then_constant(0.04, 0.07, 3, 5), [0.04, 0.055, 0.07, 0.07, 0.07]
    )
    np.testing.assert_allclose(warmup_then_constant(0.04, 0.07, 9, 2), [0.04, 0.07])  # capped


def test_value_at_clamps_past_the_end():
    s = np.array([3.0, 2.0, 1.0])
    assert value_at(s, 0) == 3.0 and value_at(s, 2) == 1.0 and value_at(s, 50) == 1.0
    with pytest.raises(ValueError):
        value_at(np.array([]), 0)


def test_lr_scaling_rules_and_steps_from_epochs():
    assert lr_scale(256, 1024, "sqrt") == pytest.approx(0.5)
    assert lr_scale(256, 1024, "linear") == pytest.approx(0.25)
    assert lr_scale(256, 1024, "none") == 1.0
    with pytest.raises(ValueError, match="lr_scaling"):
        lr_scale(256, 1024, "cubic")
    assert steps_from_epochs(1.5, 10) == 15 and steps_from_epochs(0.0, 10) == 0


def _optim_cfg(**kw):
    base = dict(
        max_steps=-1,
        epochs=2,
        base_lr=0.004,
        lr_reference_batch=1024,
        lr_scaling="sqrt",
        min_lr=1e-6,
        warmup_steps=None,
        warmup_epochs=1.0,
        weight_decay=0.04,
        weight_decay_end=0.4,
    )
    return OmegaConf.create({**base, **kw})


def test_engine_schedules_keep_the_same_lr_when_world_size_changes_global_batch_fixed():
    # 4 ranks x 64 and 2 ranks x 128 are the same global batch: same lr; 8 x 64 is twice the batch.
    cfg = _optim_cfg()
    total = resolve_total_steps(cfg, 10)
    assert total == 20
    a = build_engine_schedules(cfg, total, 10, 4 * 64)
    b = build_engine_schedules(cfg, total, 10, 2 * 128)
    c = build_engine_schedules(cfg, total, 10, 8 * 64)
    np.testing.assert_array_equal(a["lr"], b["lr"])
    assert a["lr"].max() == pytest.approx(0.004 * 0.5)  # sqrt(256 / 1024)
    assert c["lr"].max() == pytest.approx(0.004 * math.sqrt(0.5))
    assert a["lr"][9] == a["lr"].max() and a["lr"][0] == 0.0  # warmup_epochs=1 -> 10 steps
    assert a["wd"][0] == pytest.approx(0.04, abs=1e-15) and a["wd"][-1] == pytest.approx(
        0.4, abs=0.01
    )
    # explicit max_steps overrides epochs; warmup_steps overrides warmup_epochs
    cfg2 = _optim_cfg(max_steps=7, warmup_steps=2)
    assert resolve_total_steps(cfg2, 10) == 7
    s2 = build_engine_schedules(cfg2, 7, 10, 1024)
    assert s2["lr"][1] == pytest.approx(0.004) and s2["lr"][0] == 0.0


def _vit():
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, depth=3, num_classes=0, reg_tokens=1
    )


def test_vit_layer_ids_from_timm_names():
    assert vit_layer_id("cls_token", 12) == 0
    assert vit_layer_id("patch_embed.proj.weight", 12) == 0
    assert vit_layer_id("backbone.blocks.0.attn.qkv.weight", 12) == 1
    assert vit_layer_id("blocks.11.mlp.fc2.bias", 12) == 12
    assert vit_layer_id("norm.weight", 12) == 13
    assert vit_layer_id("dino_head.last_layer.weight", 12) == 13


def test_param_groups_layer_decay_and_no_weight_decay_rules():
    model = _vit()
    groups = param_groups_lrd(model, 1.0, 0.5, 0.2)
    check_param_groups(groups, model)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    L = 3

    def group(name):
        return by_param[id(named[name])]

    # block i -> 0.5 ** (L + 1 - (i + 1)); embeddings 0.5 ** (L + 1); patch_embed also x 0.2
    assert group("blocks.0.attn.qkv.weight")["lr_multiplier"] == pytest.approx(0.5**3)
    assert group("blocks.2.mlp.fc1.weight")["lr_multiplier"] == pytest.approx(0.5**1)
    assert group("norm.weight")["lr_multiplier"] == pytest.approx(1.0)
    assert group("pos_embed")["lr_multiplier"] == pytest.approx(0.5 ** (L + 1))
    assert group("patch_embed.proj.weight")["lr_multiplier"] == pytest.approx(0.2 * 0.5 ** (L + 1))
    # weight decay only on >1-D weights that are not tokens / position embeddings
    assert group("blocks.1.attn.qkv.weight")["wd_multiplier"] == 1.0
    assert group("patch_embed.proj.weight")["wd_multiplier"] == 1.0
    for name in (
        "blocks.1.attn.qkv.bias",
        "blocks.1.norm1.weight",
        "norm.bias",
        "pos_embed",
        "cls_token",
        "reg_token",
    ):
        assert group(name)["wd_multiplier"] == 0.0, name
    assert not any(g["is_last_layer"] for g in groups)


def test_param_groups_last_layer_flag_and_missing_param_detection():
    head = torch.nn.Sequential()
    head.add_module("mlp", torch.nn.Linear(4, 4))
    head.add_module("last_layer", torch.nn.Linear(4, 8, bias=False))
    groups = param_groups_lrd(head, num_layers=0)
    flagged = [g for g in groups if g["is_last_layer"]]
    assert len(flagged) == 1 and flagged[0]["params"][0] is head.last_layer.weight
    with pytest.raises(ValueError, match="no optimizer group"):
        check_param_groups(groups[:1], head)


def test_apply_lr_wd_uses_multipliers_and_last_layer_lr():
    head = torch.nn.Sequential()
    head.add_module("mlp", torch.nn.Linear(4, 4))
    head.add_module("last_layer", torch.nn.Linear(4, 8, bias=False))
    groups = param_groups_lrd(head, 1.0, 1.0, 1.0, lr_multiplier=0.5, num_layers=0)
    opt = build_optimizer(groups, betas=(0.9, 0.999), fused=None, device=torch.device("cpu"))
    apply_lr_wd(opt, lr=0.1, wd=0.05, last_layer_lr=0.0)
    for g in opt.param_groups:
        expected_lr = 0.0 if g["is_last_layer"] else 0.1 * 0.5
        assert g["lr"] == pytest.approx(expected_lr)
        assert g["weight_decay"] == pytest.approx(0.05 * g["wd_multiplier"])
    assert opt.defaults["fused"] is True  # fused AdamW on CPU too (much faster than foreach)
