"""Linear probes, the DINOv2 protocol: a grid of linear heads trained at once on frozen features.

Grid = feature variants (last 1 or `n_last_blocks` CLS tokens, with or without the average-pooled
patch tokens of the last block) x learning rates: 4 x 13 = 52 heads by default. Every head reads
the one concatenated feature vector through a column mask, so the whole grid is one matmul per step
over cached features (no backbone pass); a masked weight gets zero gradient and stays zero, so each
head is exactly the head trained alone on its variant (tests/test_eval_linear.py checks this).
SGD with momentum 0.9 and no weight decay, lr scaled by batch_size / 256 and cosine-annealed to 0,
weights initialised N(0, 0.01) and biases 0, as DINOv2's LinearClassifier. The head with the best
val `select_metric` (accuracy by default, as DINOv2; balanced_accuracy for skewed classes) is the
headline; every head's test metrics are reported too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from eval.featureset import FeatureSet
from eval.protocols import register
from eval.protocols.base import EvalContext, ProtocolResult, best_setting

logger = logging.getLogger(__name__)


@dataclass
class LinearGrid:
    """Trained heads: weights (F, H, C) (zero outside each head's mask) and biases (H, C)."""

    names: list[str]
    weight: torch.Tensor
    bias: torch.Tensor
    multilabel: bool

    @torch.no_grad()
    def predict(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """(H, n, C) probabilities of every head (softmax, or sigmoid for multi-label)."""
        w = self.weight.reshape(self.weight.shape[0], -1).cpu()
        out = []
        for start in range(0, len(features), batch_size):
            x = torch.from_numpy(features[start : start + batch_size])
            logits = (x @ w).reshape(len(x), *self.bias.shape) + self.bias.cpu()
            out.append(torch.sigmoid(logits) if self.multilabel else logits.softmax(dim=-1))
        return torch.cat(out).permute(1, 0, 2).double().numpy()


def full_features(fs: FeatureSet) -> np.ndarray:
    """All cached blocks' CLS tokens (+ pooled patch tokens): the vector every head masks."""
    blocks = fs.tokens.shape[1]
    return fs.variant(f"n{blocks}{'+avgpool' if fs.patch_mean is not None else ''}")


def variant_masks(fs: FeatureSet, variants: Sequence[str]) -> np.ndarray:
    """(V, F) bool: the columns of each variant within full_features(fs), in the same order."""
    blocks, dim = fs.tokens.shape[1], fs.tokens.shape[2]
    width = blocks * dim + (0 if fs.patch_mean is None else fs.patch_mean.shape[1])
    masks = np.zeros((len(variants), width), dtype=bool)
    for row, name in enumerate(variants):
        fs.variant(name)  # validates the name against what is cached
        n = int(name[1:].split("+")[0])
        masks[row, (blocks - n) * dim : blocks * dim] = True
        if name.endswith("+avgpool"):
            masks[row, blocks * dim :] = True
    return masks


@torch.no_grad()
def train_linear_grid(
    features: np.ndarray,
    targets: np.ndarray,
    *,
    masks: np.ndarray,
    lrs: np.ndarray,
    num_outputs: int,
    epochs: int = 100,
    batch_size: int = 128,
    lr_scale_batch: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    init_std: float = 0.01,
    seed: int = 0,
    device: str = "cpu",
    names: Sequence[str] | None = None,
    progress: bool = True,
) -> LinearGrid:
    """Train H = len(lrs) heads at once; head h sees the columns masks[h] with learning rate lrs[h].

    targets: (n,) class ids (cross-entropy) or (n, L) 0/1 (binary cross-entropy per label).
    """
    masks = np.asarray(masks, dtype=bool)
    lrs = np.asarray(lrs, dtype=np.float64)
    if masks.ndim != 2 or masks.shape != (len(lrs), features.shape[1]):
        raise ValueError(f"masks {masks.shape} must be (heads={len(lrs)}, {features.shape[1]})")
    multilabel = targets.ndim == 2
    n, dim = features.shape
    heads, c = len(lrs), num_outputs
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(device)
    y_all = torch.from_numpy(targets).to(device)
    y_all = y_all.float() if multilabel else y_all.long()
    mask = torch.from_numpy(masks.T.copy()).to(device).unsqueeze(-1).float()  # (F, H, 1)
    # every head starts from the same N(0, init_std) draw, restricted to its columns
    init = torch.randn((dim, 1, c), generator=gen) * init_std
    weight = (init.to(device) * mask).contiguous()
    bias = torch.zeros((heads, c), device=device)
    buf_w, buf_b = torch.zeros_like(weight), torch.zeros_like(bias)
    base_lr = torch.from_numpy(lrs * batch_size / lr_scale_batch).float().to(device)
    targets_all = y_all if multilabel else F.one_hot(y_all, c).float()  # (n, C)
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    bar = tqdm(total=total, desc=f"linear grid ({heads} heads)", leave=False, disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x, t = x_all[idx], targets_all[idx]
            b = len(x)
            logits = (x @ weight.view(dim, heads * c)).view(b, heads, c) + bias
            # d(mean loss)/d(logits), by hand: one small autograd-free step for all heads
            if multilabel:  # binary cross-entropy averaged over batch and labels
                d_logits = (torch.sigmoid(logits) - t[:, None, :]) / (b * c)
            else:  # cross-entropy averaged over the batch
                d_logits = (logits.softmax(dim=-1) - t[:, None, :]) / b
            grad_w = (x.T @ d_logits.view(b, heads * c)).view(dim, heads, c) * mask
            grad_b = d_logits.sum(dim=0)
            if weight_decay:
                grad_w += weight_decay * weight
                grad_b += weight_decay * bias
            # torch.optim.SGD(momentum, dampening=0) with one cosine-annealed lr per head
            lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            buf_w.mul_(momentum).add_(grad_w)
            buf_b.mul_(momentum).add_(grad_b)
            weight.sub_(lr[None, :, None] * buf_w)
            bias.sub_(lr[:, None] * buf_b)
            step += 1
            bar.update()
    bar.close()
    names = list(names) if names is not None else [f"head{h}" for h in range(heads)]
    return LinearGrid(names, weight, bias, multilabel)


def grid_heads(ctx: EvalContext, fs: FeatureSet) -> tuple[list[str], list[str], np.ndarray]:
    """(head names, their variants, their lrs) for the configured grid, restricted to what is cached."""
    cfg = ctx.cfg.linear
    blocks = sorted({min(int(b), fs.tokens.shape[1]) for b in cfg.n_last_blocks})
    pools = [bool(p) for p in cfg.avgpool if not p or fs.patch_mean is not None]
    variants = [f"n{b}{'+avgpool' if p else ''}" for b in blocks for p in sorted(set(pools))]
    names, head_variants, lrs = [], [], []
    for variant in variants:
        for lr in cfg.lrs:
            names.append(f"{variant} lr={float(lr):g}")
            head_variants.append(variant)
            lrs.append(float(lr))
    return names, head_variants, np.asarray(lrs)


def fit_and_select(
    ctx: EvalContext, fit: FeatureSet, val: FeatureSet, *, seed: int, progress: bool = True
) -> tuple[LinearGrid, np.ndarray, dict[str, tuple[float, float]], str]:
    """Train the grid on `fit`, score every head on `val`; (grid, masks, val scores, best head)."""
    cfg = ctx.cfg.linear
    names, head_variants, lrs = grid_heads(ctx, fit)
    masks = variant_masks(fit, head_variants)
    grid = train_linear_grid(
        full_features(fit),
        fit.labels,
        masks=masks,
        lrs=lrs,
        num_outputs=ctx.num_classes,
        epochs=int(cfg.epochs),
        batch_size=int(cfg.batch_size),
        lr_scale_batch=int(cfg.lr_scale_batch),
        momentum=float(cfg.momentum),
        weight_decay=float(cfg.weight_decay),
        init_std=float(cfg.init_std),
        seed=seed,
        device=ctx.device,
        names=names,
        progress=progress,
    )
    val_probs = grid.predict(full_features(val))
    val_scores = {name: ctx.selection_score(val.labels, p) for name, p in zip(names, val_probs)}
    return grid, masks, val_scores, best_setting(val_scores)


@register("linear", "DINOv2 linear-probe grid (blocks x avgpool x lr) chosen on val")
def run(ctx: EvalContext) -> ProtocolResult:
    fit, val, source = ctx.train_val()
    grid, _, val_scores, best = ctx.memo(
        ("linear", fit, val, ctx.seed), lambda: fit_and_select(ctx, fit, val, seed=ctx.seed)
    )
    test_probs = grid.predict(full_features(ctx.test))
    names, head_variants, lrs = grid_heads(ctx, fit)
    settings = {}
    for h, name in enumerate(names):
        settings[name] = {
            **ctx.test_metrics(test_probs[h]),
            f"val_{ctx.cfg.select_metric}": val_scores[name][0],
            "params": {
                "features": head_variants[h],
                "lr": float(lrs[h]),
                "lr_scaled": float(lrs[h])
                * ctx.cfg.linear.batch_size
                / ctx.cfg.linear.lr_scale_batch,
            },
        }
    return ProtocolResult(
        name="linear",
        settings=settings,
        best=best,
        selection=f"highest {ctx.cfg.select_metric} on {source} ({len(names)} heads)",
        extras={
            "n_heads": len(names),
            "epochs": int(ctx.cfg.linear.epochs),
            "n_fit": len(fit),
            "n_val": len(val),
        },
        best_scores=test_probs[names.index(best)],
    )
