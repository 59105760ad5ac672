"""SimCLR on the shared engine: NT-Xent by hand, gathered negatives over 2 gloo processes equal
one process, the LARS rule by hand, exact resume, export."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from pretrain import distributed as du
from pretrain.backbones import build_backbone, load_backbone
from pretrain.checkpoint import load_newest
from pretrain.components.heads import projection_head
from pretrain.components.losses import nt_xent_loss
from pretrain.engine import Engine, use_channels_last
from pretrain.lars import LARS
from pretrain.methods.simclr import SimCLR, zero_init_residual_
from pretrain.optim import build_optimizer, param_groups_lrd
from pretrain.train import run
from tests.conftest import run_killed, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nt_xent_against_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    t = 0.2
    views = [v / v.norm() for v in [*z1, *z2]]  # anchors 0..2 = view 1, 3..5 = view 2
    terms = []
    for a in range(6):
        positive = (a + 3) % 6
        denom = sum(math.exp(float(views[a] @ views[k]) / t) for k in range(6) if k != a)
        terms.append(-(float(views[a] @ views[positive]) / t - math.log(denom)))
    expected = sum(terms) / 6
    assert nt_xent_loss(z1, z2, t).item() == pytest.approx(expected, rel=1e-5)
    # identical views of 3 orthogonal images: each anchor has its positive at cosine 1 and 4
    # negatives at cosine 0 (its own copy in the other view is the positive, itself is excluded)
    eye = torch.eye(3)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 4))
    assert nt_xent_loss(eye, eye, t).item() == pytest.approx(expected, rel=1e-5)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _gather_worker(rank: int, world: int, port: int, z1: torch.Tensor, z2: torch.Tensor, out: str):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    du.init_distributed(du.detect_env(), torch.device("cpu"), "gloo")
    b = z1.shape[0] // world
    a = z1[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    c = z2[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    loss = nt_xent_loss(a, c, 0.1)
    loss.backward()
    torch.save({"loss": loss.detach(), "g1": a.grad, "g2": c.grad}, Path(out) / f"r{rank}.pt")
    du.cleanup_distributed()


def test_two_gloo_processes_with_gathered_negatives_equal_one_process(tmp_path):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    mp.spawn(_gather_worker, args=(2, _free_ports(1)[0], z1, z2, str(tmp_path)), nprocs=2)
    full1, full2 = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    reference = nt_xent_loss(full1, full2, 0.1)
    reference.backward()
    results = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(2)]
    # the global loss is the mean of the ranks' losses (each over its own anchors, all negatives)
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, reference.detach())
    assert not torch.allclose(results[0]["loss"], results[1]["loss"])
    for r, res in enumerate(results):
        rows = slice(4 * r, 4 * r + 4)
        # each rank's gradient sums all ranks' losses; DDP's average over 2 ranks gives the reference
        torch.testing.assert_close(res["g1"] / 2, full1.grad[rows])
        torch.testing.assert_close(res["g2"] / 2, full2.grad[rows])


def test_lars_update_rule_by_hand_and_no_adaptation_for_biases_and_norms():
    lin, norm = nn.Linear(3, 2), nn.LayerNorm(2)
    model = nn.Sequential(lin, norm)
    groups = param_groups_lrd(model, num_layers=0)
    opt = build_optimizer(
        groups,
        betas=(0.9, 0.999),
        fused=None,
        device=torch.device("cpu"),
        name="lars",
        lars_eta=0.001,
    )
    assert isinstance(opt, LARS)
    for group in opt.param_groups:
        assert group["lars_adapt"] == (group["wd_multiplier"] != 0)
        group["lr"], group["weight_decay"] = 0.5, 0.1 * group["wd_multiplier"]
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    buf_w, buf_b = torch.zeros_like(w0), torch.zeros_like(b0)
    w, b = w0.clone(), b0.clone()
    for _ in range(2):
        opt.zero_grad()
        model(torch.ones(4, 3)).pow(2).sum().backward()
        gw, gb = lin.weight.grad.clone(), lin.bias.grad.clone()
        opt.step()
        # weight: g + wd*w, trust = eta ||w|| / ||g + wd w||, v = m v + lr trust g', w -= v
        gw = gw + 0.1 * w
        trust = 0.001 * w.norm() / gw.norm()
        buf_w = 0.9 * buf_w + 0.5 * trust * gw
        w = w - buf_w
        buf_b = 0.9 * buf_b + 0.5 * gb  # bias: no decay, no trust ratio
        b = b - buf_b
        torch.testing.assert_close(lin.weight.detach(), w)
        torch.testing.assert_close(lin.bias.detach(), b)
    assert not torch.equal(lin.weight, w0)
    with pytest.raises(ValueError, match="adamw or lars"):
        build_optimizer(
            groups, betas=(0.9, 0.9), fused=None, device=torch.device("cpu"), name="sgd"
        )


def test_projection_head_v2_layout():
    head = projection_head(16, 32, 8, 3, bn=True)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert all(m.bias is None for m in linears)  # BN provides the shift
    assert not head[-1].affine  # last BN: no learned scale/shift


def simclr_config(npz, out, **extra):
    overrides = {
        "model.arch": "resnet18",
        "simclr.proj_hidden_dim": 32,
        "simclr.proj_out_dim": 16,
        "simclr.crop_scale": "[0.3,1.0]",
    }
    return tiny_run_config("simclr", npz, out, **{**overrides, **extra})


def test_simclr_resumes_exactly_after_sigkill_with_lars_and_exports_the_backbone(
    ramp_npz, tmp_path
):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(simclr_config(ramp_npz, straight))
    run_killed(simclr_config(ramp_npz, resumed), SimCLR, 2)
    run(simclr_config(ramp_npz, resumed))
    a, b = load_newest(straight / "checkpoints")[1], load_newest(resumed / "checkpoints")[1]
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # train.channels_last=auto trained the ResNet in NHWC (and resumed into it)
    conv = "backbone.layer1.0.conv1.weight"
    assert b["model"][conv].is_contiguous(memory_format=torch.channels_last)
    assert not b["model"][conv].is_contiguous()
    for pid, st in a["optimizer"]["state"].items():  # LARS momentum buffers too
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    model, meta = load_backbone(resumed / "export")
    assert meta["method"] == "simclr" and meta["step"] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, a["model"][f"backbone.{key}"]), key


def test_channels_last_auto_means_convnets_only():
    resnet = build_backbone({"arch": "resnet18", "img_size": 16, "in_chans": 1})
    vit = build_backbone({"arch": "vit_tiny", "patch_size": 4, "img_size": 16, "in_chans": 1})
    assert use_channels_last("auto", resnet) and not use_channels_last("auto", vit)
    assert use_channels_last(True, vit) and not use_channels_last(False, resnet)
    with pytest.raises(ValueError, match="train.channels_last"):
        use_channels_last("yes", resnet)


def test_heads_only_warmup_keeps_batchnorm_statistics_and_skips_backbone_grads(ramp_npz, tmp_path):
    """A frozen ResNet stays frozen: running BN statistics as loaded, no backbone gradient."""
    run(simclr_config(ramp_npz, tmp_path / "src", **{"optim.max_steps": 0}))
    cfg = simclr_config(
        ramp_npz,
        tmp_path / "run",
        **{"init.from": tmp_path / "src" / "export", "init.heads_only_steps": 2},
    )
    engine = Engine(cfg, device=torch.device("cpu"))
    backbone = engine.method.backbone
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    views = [torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    for _ in range(2):
        engine.train_step((views, torch.zeros(8)))
        for key, value in backbone.state_dict().items():  # weights and running_mean/var alike
            assert torch.equal(value, start[key]), key
        assert all(p.grad is None for p in backbone.parameters())
    engine.train_step((views, torch.zeros(8)))
    assert backbone.bn1.training and all(p.requires_grad for p in backbone.parameters())
    assert not torch.equal(backbone.bn1.running_mean, start["bn1.running_mean"])
    assert not torch.equal(backbone.conv1.weight, start["conv1.weight"])


def test_zero_init_residual_makes_every_block_start_as_the_identity():
    resnet = build_backbone({"arch": "resnet18", "img_size": 16, "in_chans": 1})
    assert zero_init_residual_(resnet) == 8
    x = torch.rand(2, 64, 8, 8)  # post-ReLU input of layer1
    for block in resnet.layer1:  # no downsample: out = relu(x + 0) = x
        torch.testing.assert_close(block.train()(x), x)
    assert zero_init_residual_(build_backbone({"arch": "resnet50", "img_size": 16})) == 16
    vit = build_backbone({"arch": "vit_tiny", "patch_size": 4, "img_size": 16, "in_chans": 1})
    assert zero_init_residual_(vit) == 0
