"""Few-shot classification with SimpleShot (Wang et al. 2019): nearest class prototype.

Features are centred on the mean training feature and L2-normalised ("CL2N"); an episode draws n
images per class from train, averages them into one prototype per class and classifies every test
image by its squared Euclidean distance to the prototypes (scores: softmax(-d^2 / 2T), so the
prediction is the nearest prototype). For each n in `fewshot.shots`, `fewshot.episodes` episodes;
metrics are the mean over episodes (`_std`: their spread), and the bootstrap interval is that of
the episode-averaged metric under test-set resampling. A shot count larger than the smallest
class is skipped with a warning.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from eval.protocols import register
from eval.protocols.base import EvalContext, EvalError, ProtocolResult

logger = logging.getLogger(__name__)


def cl2n(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    centred = torch.from_numpy(np.asarray(x, dtype=np.float32) - mean.astype(np.float32))
    return torch.nn.functional.normalize(centred, dim=1).numpy()


def episode_supports(
    labels: np.ndarray, shots: int, episodes: int, rng: np.random.Generator
) -> np.ndarray:
    """(episodes, K, shots) training indices: `shots` distinct images of every class."""
    classes = np.unique(labels)
    members = [np.flatnonzero(labels == c) for c in classes]
    out = np.empty((episodes, len(classes), shots), dtype=np.int64)
    for e in range(episodes):
        for i, m in enumerate(members):
            out[e, i] = rng.choice(m, size=shots, replace=False)
    return out


def prototype_scores(
    train_x: np.ndarray,
    test_x: np.ndarray,
    supports: np.ndarray,
    temperature: float,
) -> np.ndarray:
    """(episodes, n_test, K) softmax(-||test - prototype||^2 / 2T) scores."""
    protos = torch.from_numpy(train_x[supports].mean(axis=2))  # (E, K, D)
    test = torch.from_numpy(test_x)
    d2 = (
        (test**2).sum(1)[None, :, None]
        - 2 * torch.einsum("nd,ekd->enk", test, protos)
        + (protos**2).sum(2)[:, None, :]
    )
    return torch.softmax(-d2.double() / (2 * temperature), dim=2).numpy()


@register("fewshot", "SimpleShot nearest-prototype classification, n-shot episodes")
def run(ctx: EvalContext) -> ProtocolResult:
    if ctx.multilabel:
        raise EvalError("fewshot needs single-label classes (n images per class); not multi-label")
    cfg = ctx.cfg.fewshot
    labels = ctx.train.labels
    classes = np.unique(labels)
    if len(classes) < ctx.num_classes:
        logger.warning(
            "fewshot: classes %s have no train image; they are never predicted",
            sorted(set(range(ctx.num_classes)) - set(classes.tolist())),
        )
    smallest = int(np.bincount(labels)[classes].min())
    raw_train = ctx.train.variant(str(cfg.features))
    mean = raw_train.mean(axis=0)
    train_x, test_x = cl2n(raw_train, mean), cl2n(ctx.test.variant(str(cfg.features)), mean)
    settings, skipped = {}, []
    for shots in [int(s) for s in cfg.shots]:
        if shots > smallest:
            skipped.append(shots)
            continue
        rng = np.random.default_rng([ctx.seed, shots])
        supports = episode_supports(labels, shots, int(cfg.episodes), rng)
        episode_scores = prototype_scores(train_x, test_x, supports, float(cfg.temperature))
        full = np.zeros((*episode_scores.shape[:2], ctx.num_classes))
        full[:, :, classes] = episode_scores
        settings[f"{shots}-shot"] = {
            **ctx.test_metrics(list(full)),
            "params": {
                "shots": shots,
                "episodes": int(cfg.episodes),
                "features": ctx.train.resolve(str(cfg.features)),
            },
        }
    if skipped:
        logger.warning(
            "fewshot: %s-shot skipped: the smallest train class has %d images", skipped, smallest
        )
    if not settings:
        raise EvalError(f"fewshot: every shot count exceeds the smallest class ({smallest} images)")
    best = list(settings)[-1]
    return ProtocolResult(
        name="fewshot",
        settings=settings,
        best=best,
        selection="the largest shot count (few-shot reports every n; no selection)",
        extras={"skipped_shots": skipped},
    )
