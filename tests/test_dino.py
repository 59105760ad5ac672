"""DINO (v1) on the shared engine: the multi-crop loss against a hand computation, EMA teacher,
config checks before any work, exact resume after SIGKILL and the teacher export. The k-NN gain of
the CPU recipe is in tests/test_pretrain_runs.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.backbones import load_backbone
from pretrain.checkpoint import load_newest
from pretrain.config import ConfigError
from pretrain.methods import build_method
from pretrain.methods.base import StepState
from pretrain.methods.dino import DINO
from pretrain.train import run
from tests.conftest import run_killed, tiny_run_config

pytestmark = pytest.mark.usefixtures("one_thread")


def dino_config(npz, out, **extra):
    overrides = {
        "optim.base_lr": 1e-3,
        "dino.head_n_prototypes": 16,
        "dino.head_hidden_dim": 32,
        "dino.head_bottleneck_dim": 8,
        "dino.crops.global_crops_size": 16,
        "dino.crops.local_crops_size": 8,
        "dino.crops.local_crops_number": 2,
        "dino.teacher.momentum_teacher": 0.9,
    }
    return tiny_run_config("dino", npz, out, **{**overrides, **extra})


def _views(n: int = 3) -> dict:
    torch.manual_seed(1)
    return {
        "global_crops": [torch.rand(n, 1, 16, 16), torch.rand(n, 1, 16, 16)],
        "local_crops": [torch.rand(n, 1, 8, 8), torch.rand(n, 1, 8, 8)],
    }


def test_dino_loss_is_every_student_crop_against_every_other_teacher_crop(ramp_npz, tmp_path):
    torch.manual_seed(0)
    method = build_method(dino_config(ramp_npz, tmp_path))
    method.train()
    views = _views()
    state = StepState(1, 4, 0, 1, 0, torch.device("cpu"), 1e-3, 0.04, {"teacher_temp": 0.05})
    loss, terms = method.forward_loss((views, torch.zeros(3)), state)

    # by hand, one (student crop, teacher crop) pair at a time
    with torch.no_grad():
        teacher = [method.teacher.head(method.teacher.backbone(g)) for g in views["global_crops"]]
        targets = [F.softmax(t / 0.05, dim=-1) for t in teacher]  # the center starts at zero
        crops = views["global_crops"] + views["local_crops"]
        students = [method.student.head(method.student.backbone(c)) for c in crops]
        total, pairs = 0.0, 0
        for i, s in enumerate(students):
            for j, t in enumerate(targets):
                if i == j:  # a global crop is never its own target
                    continue
                total += -(t * F.log_softmax(s / 0.1, dim=-1)).sum(dim=-1).mean()
                pairs += 1
    assert pairs == 2 * 1 + 2 * 2
    assert loss.item() == pytest.approx(float(total / pairs), rel=1e-5)
    assert terms["dino"].item() == pytest.approx(loss.item())
    # the center moved to 0.1 x the mean teacher logit (center momentum 0.9)
    expected_center = 0.1 * torch.cat(teacher).mean(dim=0)
    assert torch.allclose(method.loss.center[0], expected_center, atol=1e-6)

    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    # prototypes of norm 1: DINO's norm_last_layer freezes the weight-norm gain
    gain = method.student.head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)


def test_dino_ema_step_by_hand(ramp_npz, tmp_path):
    torch.manual_seed(0)
    method = build_method(dino_config(ramp_npz, tmp_path))
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.teacher.parameters()]
    students = [p.detach().clone() for p in method.student.parameters()]
    state = StepState(1, 4, 0, 1, 0, torch.device("cpu"), 1e-3, 0.04, {"momentum": 0.75})
    method.on_after_step(state)
    for t0, s, t in zip(before, students, method.teacher.parameters(), strict=True):
        assert torch.allclose(t, 0.75 * t0 + 0.25 * s, atol=1e-6)


@pytest.mark.parametrize(
    "override, key",
    [
        ("dino.crops.local_crops_size=6", "dino.crops.local_crops_size"),
        ("dino.crops.global_crops_size=18", "dino.crops.global_crops_size"),
        ("dino.student_temp=0", "dino.student_temp"),
    ],
)
def test_dino_config_checks_name_the_key(override, key, ramp_npz, tmp_path):
    k, v = override.split("=")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        dino_config(ramp_npz, tmp_path, **{k: v})


def test_dino_resumes_exactly_after_sigkill_and_exports_the_teacher(ramp_npz, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(dino_config(ramp_npz, straight))
    run_killed(dino_config(ramp_npz, resumed), DINO, 3)
    assert load_newest(resumed / "checkpoints")[1]["step"] == 2  # killed before step 3 finished
    run(dino_config(ramp_npz, resumed))
    a, b = load_newest(straight / "checkpoints")[1], load_newest(resumed / "checkpoints")[1]
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    model, meta = load_backbone(resumed / "export")
    assert meta["method"] == "dino" and meta["step"] == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, a["model"][f"teacher.backbone.{key}"]), key
