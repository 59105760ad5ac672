"""DINOv2 losses, head, masking and EMA against hand computations on tiny tensors."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.components.heads import DINOHead
from pretrain.components.losses import (
    DINOLoss,
    dino_cross_entropy,
    gram_loss,
    ibot_masked_cross_entropy,
    iBOTPatchLoss,
    koleo_loss,
    sinkhorn_knopp,
)
from pretrain.components.masks import BlockMaskGenerator, sample_crop_masks


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _ce(target: list[float], logits: list[float], temp: float) -> float:
    """H(target, softmax(logits / temp)) with scalar math."""
    p = _softmax([x / temp for x in logits])
    return -sum(t * math.log(q) for t, q in zip(target, p))


# ------------------------------------------------------------------------------------------ DINO


def test_dino_uniform_student_gives_log_k():
    # log_softmax of all-zero logits is -log K, whatever the teacher: H = log K for every pair.
    teacher = torch.softmax(torch.randn(2, 4, 5), dim=-1)
    loss = dino_cross_entropy(torch.zeros(2, 4, 5), torch.zeros(3, 4, 5), teacher, 0.1)
    assert loss.item() == pytest.approx(math.log(5), abs=1e-6)


def test_dino_cross_entropy_matches_pair_loop_and_skips_same_view():
    torch.manual_seed(0)
    n_global, n_local, batch, k, temp = 2, 3, 2, 4, 0.1
    sg, sl = torch.randn(n_global, batch, k), torch.randn(n_local, batch, k)
    tp = torch.softmax(torch.randn(n_global, batch, k) / 0.05, dim=-1)
    terms = []
    for b in range(batch):
        for j in range(n_global):
            t = tp[j, b].tolist()
            for i in range(n_global):
                if i != j:  # a global crop is never compared with its own teacher view
                    terms.append(_ce(t, sg[i, b].tolist(), temp))
            for i in range(n_local):
                terms.append(_ce(t, sl[i, b].tolist(), temp))
    expected = sum(terms) / len(terms)  # DINOv2 divides by n_g(n_g-1) + n_l n_g pairs and B
    assert len(terms) == batch * (n_global * (n_global - 1) + n_local * n_global)
    got = dino_cross_entropy(sg, sl, tp, temp).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # The same-view pairs really are excluded: a loop that includes them gives another value.
    with_self = terms + [
        _ce(tp[j, b].tolist(), sg[j, b].tolist(), temp) for b in range(2) for j in range(2)
    ]
    assert got != pytest.approx(sum(with_self) / len(with_self), rel=1e-4)


def test_softmax_centering_and_center_update_by_hand():
    loss = DINOLoss(out_dim=3, student_temp=0.1, center_momentum=0.9)
    loss.center.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    probs = loss.teacher_probs(logits, teacher_temp=0.5)
    # row 0: (t - c) = [0, 2, 4] -> /0.5 = [0, 4, 8]; row 1: [2, 2, 2] -> uniform
    e = [1.0, math.exp(4), math.exp(8)]
    assert probs[0].tolist() == pytest.approx([v / sum(e) for v in e], rel=1e-6)
    assert probs[1].tolist() == pytest.approx([1 / 3] * 3, rel=1e-6)
    # teacher_probs starts the update, the loss (after the student pass) completes it
    assert loss.center[0].tolist() == [1.0, 0.0, -1.0]
    loss(None, torch.zeros(1, 2, 3), probs.view(1, 2, 3))
    # new center = 0.9 * [1, 0, -1] + 0.1 * batch mean [2, 2, 2]
    assert loss.center[0].tolist() == pytest.approx([1.1, 0.2, -0.7], rel=1e-6)
    # The probabilities used the *old* center (DINOv2 applies the update after the targets).
    loss.center.zero_()
    assert loss.softmax_center(logits, 0.5)[1, 0].item() == pytest.approx(
        _softmax([6.0, 4.0, 2.0])[0], rel=1e-6
    )


# ------------------------------------------------------------------------------ Sinkhorn-Knopp


def test_sinkhorn_one_iteration_by_hand():
    # Q = [[1, 3], [2, 4]] / 10 (K x N); rows -> 1/K, columns -> 1/N, times N (worked out on paper):
    # sample 0 -> [3/7, 4/7], sample 1 -> [9/17, 8/17].
    logits = torch.log(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    q = sinkhorn_knopp(logits, teacher_temp=1.0, n_iterations=1)
    assert q[0].tolist() == pytest.approx([3 / 7, 4 / 7], rel=1e-6)
    assert q[1].tolist() == pytest.approx([9 / 17, 8 / 17], rel=1e-6)


def test_sinkhorn_marginals():
    torch.manual_seed(0)
    n, k = 12, 4
    logits = torch.randn(n, k) * 0.5 + torch.tensor([2.0, 0.0, 0.0, -1.0])  # prototype 0 favoured
    q3 = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=3)
    assert torch.allclose(q3.sum(dim=1), torch.ones(n), atol=1e-5)  # each sample: an assignment
    plain = torch.softmax(logits / 0.1, dim=-1).sum(dim=0)
    # SK balances prototype usage towards N/K = 3 each, far more than a plain softmax does.
    assert (q3.sum(dim=0) - n / k).abs().max() < 0.5 * (plain - n / k).abs().max()
    q50 = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=50)
    assert torch.allclose(q50.sum(dim=0), torch.full((k,), n / k), atol=1e-3)
    assert torch.allclose(q50.sum(dim=1), torch.ones(n), atol=1e-5)


def _sk_worker(rank: int, world: int, port: int, logits: torch.Tensor, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        part = logits.chunk(world)[rank]
        q = sinkhorn_knopp(part, teacher_temp=0.1, n_iterations=3)
        center_loss = DINOLoss(out_dim=logits.shape[1])
        center_loss.update_center(part)
        ibot = iBOTPatchLoss(out_dim=logits.shape[1], centering="sinkhorn_knopp")
        q_ibot = ibot.teacher_probs(part[: 1 + 2 * rank], teacher_temp=0.1)  # 1 and 3 patches
        torch.save((q, center_loss.center.clone(), q_ibot), f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sinkhorn_and_centering_are_global_over_ranks(tmp_path):
    """Two gloo ranks holding half the rows each must give the single-process result."""
    torch.manual_seed(1)
    logits = torch.randn(8, 5)
    port = random.randint(20000, 40000)
    mp.start_processes(
        _sk_worker, args=(2, port, logits, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    out = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    full = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=3)
    assert torch.allclose(torch.cat([out[0][0], out[1][0]]), full, atol=1e-6)
    expected_center = 0.1 * logits.mean(dim=0, keepdim=True)
    assert torch.allclose(out[0][1], expected_center, atol=1e-6)
    assert torch.allclose(out[1][1], expected_center, atol=1e-6)
    # iBOT: 1 + 3 masked patches on the two ranks balance like the 4 patches on one process.
    ibot_full = sinkhorn_knopp(torch.cat([logits[:1], logits[4:7]]), 0.1, 3)
    assert torch.allclose(torch.cat([out[0][2], out[1][2]]), ibot_full, atol=1e-6)


# ------------------------------------------------------------------------------------ KoLeo


def test_koleo_on_known_points():
    # Square on the unit circle: every nearest neighbour at distance sqrt(2).
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo_loss(square).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # [1,0], [.8,.6], [0,1]: NN distances sqrt(.4), sqrt(.4), sqrt(.8); scale does not matter.
    pts = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]]) * torch.tensor([[3.0], [0.5], [7.0]])
    expected = -(2 * math.log(math.sqrt(0.4)) + math.log(math.sqrt(0.8))) / 3
    assert koleo_loss(pts).item() == pytest.approx(expected, abs=1e-6)


def test_koleo_gradient_spreads_points():
    pts = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.2]], requires_grad=True)
    before = koleo_loss(pts)
    before.backward()
    with torch.no_grad():
        moved = pts - 0.05 * pts.grad
    assert koleo_loss(moved).item() < before.item()


# ------------------------------------------------------------------------------------- iBOT


def test_ibot_masked_loss_by_hand():
    torch.manual_seed(0)
    masks = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    k, temp = 3, 0.1
    s = torch.randn(3, k)  # the 3 masked patches in row-major order
    t = torch.softmax(torch.randn(3, k), dim=-1)
    ce = [_ce(t[i].tolist(), s[i].tolist(), temp) for i in range(3)]
    # image 0: mean of its 2 patches; image 1: nothing (counts as 0); image 2: its 1 patch; / 3 images
    expected = ((ce[0] + ce[1]) / 2 + 0.0 + ce[2]) / 3
    got = ibot_masked_cross_entropy(s, t, masks, temp).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert iBOTPatchLoss(k, student_temp=temp)(s, t, masks).item() == pytest.approx(
        expected, rel=1e-5
    )
    # all-zero student logits: log K per patch -> (log K + log K) / 3
    zero = ibot_masked_cross_entropy(torch.zeros(3, k), t, masks, temp).item()
    assert zero == pytest.approx(2 * math.log(k) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="masked"):
        ibot_masked_cross_entropy(s[:2], t[:2], masks, temp)


def test_ibot_center_is_mean_over_masked_patches():
    """Teacher patch logits of 2 images x 3 patches; the masks pick 3 of the 6 patches, selected
    as the method selects them (row-major mask indices). Only those move the center."""
    patch_logits = torch.tensor(
        [[[1.0, 3.0], [100.0, 100.0], [3.0, 5.0]], [[-50.0, 9.0], [7.0, 1.0], [2.0, 4.0]]]
    )
    masks = torch.tensor([[True, False, True], [False, False, True]])
    indices = masks.flatten().nonzero().flatten()
    masked = patch_logits.flatten(0, 1).index_select(0, indices)
    loss = iBOTPatchLoss(out_dim=2, center_momentum=0.9)
    probs = loss.teacher_probs(masked, teacher_temp=0.07)
    loss(torch.zeros(3, 2), probs, masks)  # completes the center update
    # mean of the masked rows [1, 3], [3, 5], [2, 4] = [2, 4]; center = 0.1 * [2, 4]
    assert loss.center[0].tolist() == pytest.approx([0.2, 0.4], rel=1e-6)


# ------------------------------------------------------------------------------ head, masking


def test_gram_loss_by_hand():
    """Per image, the squared differences of all patch-pair cosines, averaged over B x P x P."""
    student = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # cosines 0, 1/sqrt2, 1/sqrt2
    teacher = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [3.0, 0.0]]])  # cosines -1, 1, -1
    r = 1 / math.sqrt(2)
    s_gram = [[1, 0, r], [0, 1, r], [r, r, 1]]
    t_gram = [[1, -1, 1], [-1, 1, -1], [1, -1, 1]]
    expected = sum((s_gram[i][j] - t_gram[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert gram_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    # remove_neg: the teacher's -1 entries become 0 (the student has none)
    t_pos = [[max(v, 0.0) for v in row] for row in t_gram]
    expected = sum((s_gram[i][j] - t_pos[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert gram_loss(student, teacher, remove_neg=True).item() == pytest.approx(expected, rel=1e-6)
    # images are compared one by one: a second image does not mix with the first
    two = gram_loss(torch.cat([student, student]), torch.cat([teacher, student]))
    assert two.item() == pytest.approx(gram_loss(student, teacher).item() / 2, rel=1e-6)
    with pytest.raises(ValueError, match="differ"):
        gram_loss(student, teacher[:, :2])


def test_dino_head_center_bottleneck_removes_what_all_images_share():
    """With center_bottleneck the head sees only how each row differs from the batch: a common
    offset of every input (all X-rays alike) changes nothing, and by hand the logits are the
    prototypes against the normalised, centred bottleneck."""
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=6, bottleneck_dim=4, n_layers=1, center_bottleneck=True)
    plain = DINOHead(8, out_dim=6, bottleneck_dim=4, n_layers=1)
    plain.load_state_dict(head.state_dict())
    x = torch.randn(5, 8)
    common = 50 * torch.randn(1, 8)
    assert torch.allclose(head(x + common), head(x), atol=1e-5)
    assert not torch.allclose(plain(x + common), plain(x), atol=1e-2)
    w, b = head.mlp.weight, head.mlp.bias
    z = x @ w.t() + b
    z = z - z.mean(dim=0, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True)
    prototypes = head.last_layer.weight  # weight-normalised rows, gain 1 at init
    assert torch.allclose(head(x), z @ prototypes.t(), atol=1e-6)


def test_dino_head_prototypes_are_weight_normalised():
    torch.manual_seed(0)
    head = DINOHead(in_dim=8, out_dim=16, hidden_dim=12, bottleneck_dim=4, n_layers=3)
    x = torch.randn(5, 8) * 100
    logits = head(x)
    assert logits.shape == (5, 16)
    # unit bottleneck . unit prototype rows (gain 1): cosine similarities
    assert logits.abs().max().item() <= 1.0 + 1e-5
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(16), atol=1e-5)
    names = [n for n, _ in head.named_parameters()]
    assert any(n.startswith("last_layer.") for n in names) and len(head.mlp) == 5


def test_block_mask_generator_masks_rectangles_within_budget():
    rng = random.Random(0)
    gen = BlockMaskGenerator(14, rng=rng)
    for n in (0, 10, 40, 98):
        mask = gen(n)
        assert mask.shape == (14, 14) and mask.dtype == np.bool_
        assert mask.sum() <= n
        if n >= 10:
            assert mask.sum() >= 0.5 * n  # the budget is mostly used
    # one block is a filled rectangle of at most the budget: its bounding box is fully masked
    for seed in range(5):
        one = np.zeros((8, 8), dtype=bool)
        added = BlockMaskGenerator(8, rng=random.Random(seed))._add_block(one, 12)
        rows, cols = np.nonzero(one)
        box = one[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and 1 <= added == one.sum() <= 12


def test_sample_crop_masks_spreads_ratios_over_half_the_crops():
    rng = random.Random(0)
    gen = BlockMaskGenerator(16, rng=rng)
    masks = sample_crop_masks(8, gen, (0.1, 0.5), 0.5, rng=rng)
    assert masks.shape == (8, 256) and masks.dtype == torch.bool
    counts = sorted(masks.sum(dim=1).tolist())
    assert counts[:4] == [0, 0, 0, 0]  # half the crops unmasked
    ratios = [c / 256 for c in counts[4:]]
    # bins [.1,.2], [.2,.3], [.3,.4], [.4,.5]: one masked crop per bin (never above its bin)
    for ratio, upper in zip(ratios, (0.2, 0.3, 0.4, 0.5)):
        assert ratio <= upper
    assert ratios[-1] > 0.3


# ------------------------------------------------------------------------------ EMA, method


def test_ema_update_by_hand():
    from pretrain.components.ema import ema_update_

    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    student = [torch.tensor([3.0, -2.0]), torch.tensor([[10.0]])]
    ema_update_(teacher, student, 0.9)
    assert teacher[0].tolist() == pytest.approx([1.2, 1.6])  # 0.9 * t + 0.1 * s
    assert teacher[1].item() == pytest.approx(1.0)
    ema_update_(teacher, student, 1.0)  # momentum 1: frozen teacher
    assert teacher[0].tolist() == pytest.approx([1.2, 1.6])


def _tiny_method(**dinov2):
    from omegaconf import OmegaConf

    from pretrain.config import compose_config
    from pretrain.methods import build_method

    overrides = [
        "data.train=unused",
        "output_dir=unused",
        "optim.max_steps=10",
        "data.channels=1",
        "model.arch=vit_tiny",
        "model.patch_size=7",
        "model.img_size=28",
        "model.in_chans=1",
        "model.layerscale=0.1",
        "dinov2.crops.global_crops_size=28",
        "dinov2.crops.local_crops_size=14",
        "dinov2.crops.local_crops_number=3",
        "dinov2.dino.head_n_prototypes=64",
        "dinov2.dino.head_hidden_dim=32",
        "dinov2.dino.head_bottleneck_dim=16",
        "dinov2.ibot.head_n_prototypes=48",
        "dinov2.ibot.head_hidden_dim=32",
        "dinov2.ibot.head_bottleneck_dim=16",
    ] + [f"dinov2.{k}={v}" for k, v in dinov2.items()]
    cfg = compose_config(None, overrides)
    torch.manual_seed(0)
    method = build_method(cfg)
    assert OmegaConf.select(cfg, "dinov2.dino.koleo_loss_weight") == 0.1  # DINOv2 default kept
    return method


def _loader_batch(method, n: int = 6):
    transform = method.build_transform()
    from torch.utils.data import default_collate

    images = torch.rand(n, 1, 28, 28)
    return default_collate([(transform(img), 0) for img in images])


def _state(method, step: int = 5):
    from pretrain.methods.base import StepState

    return StepState(step, 10, 0, 1, 0, torch.device("cpu"), 1e-3, 0.04, {"teacher_temp": 0.05})


def test_dinov2_step_one_forward_per_crop_size_and_gradients_only_in_student():
    method = _tiny_method()
    method.train()
    calls = {"patch_embed": 0, "student_head": 0, "teacher_head": 0}

    def count(name):
        def hook(*_):
            calls[name] += 1

        return hook

    method.student.backbone.patch_embed.register_forward_hook(count("patch_embed"))
    method.teacher.backbone.patch_embed.register_forward_hook(count("patch_embed"))
    method.student.dino_head.register_forward_hook(count("student_head"))
    method.teacher.dino_head.register_forward_hook(count("teacher_head"))
    batch = _loader_batch(method)
    loss, terms = method(batch, _state(method))
    # student: globals (2B) in one call, locals (3B) in one; teacher: globals once
    assert calls == {"patch_embed": 3, "student_head": 1, "teacher_head": 1}
    assert set(terms) == {"dino", "koleo", "ibot"} and torch.isfinite(loss)
    expected = terms["dino"] + 0.1 * 2 * terms["koleo"] + terms["ibot"]  # koleo logged per crop
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert method.student.mask_token.mask_token.grad is not None  # masked patches were used
    assert method.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_dinov2_param_groups_schedules_and_ema_step():
    from pretrain.optim import check_param_groups

    method = _tiny_method(**{"ibot.separate_head": "true", "freeze_last_layer_epochs": 2.0})
    groups = method.param_groups()
    check_param_groups(groups, method)  # every trainable parameter in exactly one group
    last = [g for g in groups if g["is_last_layer"]]
    assert {g["name"].split(".")[0] for g in last} == {"dino_head", "ibot_head"}
    patch = [
        g
        for g in groups
        if any(p is method.student.backbone.patch_embed.proj.weight for p in g["params"])
    ]
    cls = [g for g in groups if any(p is method.student.backbone.cls_token for p in g["params"])]
    assert patch[0]["lr_multiplier"] == pytest.approx(0.2 * cls[0]["lr_multiplier"])
    assert cls[0]["lr_multiplier"] == pytest.approx(0.9**13) and cls[0]["wd_multiplier"] == 0.0

    method.lr_schedule = np.linspace(1.0, 0.5, 20)
    sched = method.schedules(20, steps_per_epoch=3)
    assert sched["last_layer_lr"][:6].tolist() == [0.0] * 6  # 2 epochs x 3 steps frozen
    assert sched["last_layer_lr"][6:].tolist() == pytest.approx(
        np.linspace(1.0, 0.5, 20)[6:].tolist()
    )
    assert sched["momentum"][0] == pytest.approx(0.992) and sched["momentum"][-1] < 1.0
    assert sched["teacher_temp"][0] == pytest.approx(0.04) and sched["teacher_temp"][
        -1
    ] == pytest.approx(0.07)

    # EMA after a step: teacher = m * teacher + (1 - m) * student, the mask token has no twin
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in method.teacher.named_parameters()}
    student = dict(method.student.named_parameters())
    method.on_after_step(_state_with(method, momentum=0.75))
    for name, p in method.teacher.named_parameters():
        assert torch.allclose(p, 0.75 * before[name] + 0.25 * student[name], atol=1e-6), name
    assert "mask_token.mask_token" not in dict(method.teacher.named_parameters())
    assert method.backbone_for_export() is method.teacher.backbone


def _state_with(method, **values):
    from pretrain.methods.base import StepState

    return StepState(0, 10, 0, 1, 0, torch.device("cpu"), 1e-3, 0.04, values)


def test_dinov2_sinkhorn_variant_and_monitor():
    method = _tiny_method(centering="sinkhorn_knopp")
    batch = _loader_batch(method)
    loss, _ = method(batch, _state(method))
    assert torch.isfinite(loss)
    out = method.monitor_embeddings(batch)
    assert out["embeddings"].shape == (6, 192) and out["probs"].shape == (6, 64)
    assert torch.allclose(out["probs"].sum(dim=1), torch.ones(6), atol=1e-5)


def test_dinov2_gram_teacher_is_retaken_from_the_ema_teacher_on_schedule():
    gram = {"gram.loss_weight": 2.0, "gram.first_step": 2, "gram.update_every": 3}
    method = _tiny_method(**gram)
    teacher = method.teacher.backbone

    def gram_equals_teacher() -> bool:
        ours = dict(method.gram_backbone.named_parameters())
        return all(torch.equal(ours[n], p) for n, p in teacher.named_parameters())

    assert gram_equals_teacher()  # the initial teacher until first_step
    initial = {n: p.clone() for n, p in method.gram_backbone.named_parameters()}
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)  # every EMA step now moves the teacher away from the snapshot
    retaken = []
    for step in range(8):
        method.on_after_step(_step(method, step))
        if gram_equals_teacher():
            retaken.append(step + 1)
        if step == 0:
            snapshot = dict(method.gram_backbone.named_parameters())
            assert all(torch.equal(snapshot[n], v) for n, v in initial.items())
    assert retaken == [2, 5, 8]  # before steps first_step, first_step + 3, first_step + 6
    assert not any(p.requires_grad for p in method.gram_backbone.parameters())

    batch = _loader_batch(method)
    _, terms = method(batch, _step(method, 1))
    assert "gram" not in terms  # off before first_step
    loss, terms = method(batch, _step(method, 2))
    assert terms["gram"] > 0 and torch.isfinite(loss)
    expected = terms["dino"] + 0.1 * 2 * terms["koleo"] + terms["ibot"] + 2.0 * terms["gram"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in method.gram_backbone.parameters())


def _step(method, step: int):
    from pretrain.methods.base import StepState

    return StepState(step, 10, 0, 1, 0, torch.device("cpu"), 1e-3, 0.04, {"momentum": 0.5})


@pytest.mark.parametrize("gram", [False, True], ids=["plain", "gram"])
def test_dinov2_resumes_exactly_after_sigkill_with_masks_from_the_collate(gram, ramp_npz, tmp_path):
    """The iBOT masks are drawn in the loader's collate now: a run killed at step 3 and resumed
    must still draw the same masks and crops as the uninterrupted one. With Gram anchoring
    (retaken before steps 1 and 3), the resumed run also has the snapshot of the straight one."""
    from pretrain.checkpoint import load_newest
    from pretrain.methods.dinov2 import DINOv2
    from pretrain.train import run
    from tests.conftest import run_killed, tiny_run_config

    def config(out):
        overrides = {
            "dinov2.dino.head_n_prototypes": 16,
            "dinov2.dino.head_hidden_dim": 32,
            "dinov2.dino.head_bottleneck_dim": 8,
            "dinov2.crops.global_crops_size": 16,
            "dinov2.crops.local_crops_size": 8,
            "dinov2.crops.local_crops_number": 2,
        }
        if gram:
            overrides |= {
                "dinov2.gram.loss_weight": 1.0,
                "dinov2.gram.first_step": 1,
                "dinov2.gram.update_every": 2,
            }
        return tiny_run_config("dinov2", ramp_npz, out, **overrides)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(config(straight))
    run_killed(config(resumed), DINOv2, 3)
    assert load_newest(resumed / "checkpoints")[1]["step"] == 2
    run(config(resumed))
    a, b = load_newest(straight / "checkpoints")[1], load_newest(resumed / "checkpoints")[1]
    assert a["step"] == b["step"] == 4
    assert any(key.startswith("gram_backbone.") for key in a["model"]) == gram
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
