"""Training monitors: JSON-lines metrics, collapse detectors, online k-NN, curves.

Collapse is the failure SSL runs die of silently: the loss keeps looking fine while every image
maps to the same point. Three cheap signals catch its two forms:
- `emb_std_ratio`: std over the batch of L2-normalised embeddings, x sqrt(dim) (about 1 for
  well-spread embeddings, 0 when every image maps to the same point; SimSiam's monitor);
- `eff_rank`: exp(entropy of normalised singular values) of the embeddings (RankMe, Garrido et
  al. 2023): 1 when all embeddings lie on one line (dimensional collapse);
- `teacher_entropy` / `teacher_marginal_entropy` (methods with prototype outputs): mean entropy
  of the teacher's distributions and entropy of their batch mean, both divided by log K. Near 1
  per sample means uniform collapse, near 0 for the marginal means one prototype wins everything.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from pretrain import distributed as du
from pretrain.components.knn import knn_scores
from pretrain.io import atomic_open, atomic_write

logger = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
CURVES_FILENAME = "curves.png"


def _plain(value: Any) -> Any:
    """JSON-safe scalar: tensors/numpy to Python, non-finite floats to null (strict JSON)."""
    if isinstance(value, Tensor):
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    """Appends one JSON object per line; on resume drops lines past the checkpoint's step."""

    def __init__(self, path: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled or not self.path.exists():
            return
        keep = (
            []
            if resume_step is None
            else [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        )
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _plain(v) for k, v in record.items()})
        with open(self.path, "a") as f:
            f.write(line + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (killed mid-write) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: skipping unreadable metrics line %r", path, line[:80])
    return records


class MetricsAccumulator:
    """Sums step outputs on the device (no host sync) and averages them over steps and ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, result: Mapping[str, Any]) -> None:
        if result["skipped"]:
            return
        values = {"loss": result["loss"], **result["terms"]}
        if not result["overflow"]:  # an fp16 overflow step has an infinite gradient norm
            values["grad_norm"] = result["grad_norm"]
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
            self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, device: torch.device) -> dict[str, float]:
        """Means since the last flush. Collective under DDP: every rank calls it at the same step
        (skips and overflows are decided jointly, so every rank holds the same keys)."""
        keys = sorted(self.sums)
        out: dict[str, float] = {}
        if keys:
            sums = torch.stack([self.sums[k].to(device) for k in keys])
            sums = du.all_reduce_mean(sums).cpu()
            out = {k: float(sums[i]) / self.counts[k] for i, k in enumerate(keys)}
        self.sums, self.counts = {}, {}
        return out


@torch.no_grad()
def collapse_stats(embeddings: Tensor) -> dict[str, float]:
    """emb_std, emb_std_ratio (x sqrt(dim)) and eff_rank of a (B, D) batch of embeddings."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"collapse stats need (B>=2, D) embeddings, got {tuple(embeddings.shape)}")
    z = F.normalize(embeddings.float(), dim=1)
    std = z.std(dim=0).mean()
    singular = torch.linalg.svdvals(z)
    p = singular / singular.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {
        "emb_std": float(std),
        "emb_std_ratio": float(std * math.sqrt(z.shape[1])),
        "eff_rank": float(torch.exp(entropy)),
    }


@torch.no_grad()
def entropy_stats(probs: Tensor) -> dict[str, float]:
    """Normalised per-sample and marginal entropies of (B, K) probability rows."""
    p = probs.float().clamp_min(1e-12)
    log_k = math.log(p.shape[1])
    per_sample = -(p * p.log()).sum(dim=1).mean() / log_k
    marginal = p.mean(dim=0)
    return {
        "teacher_entropy": float(per_sample),
        "teacher_marginal_entropy": float(-(marginal * marginal.log()).sum() / log_k),
    }


class CollapseMonitor:
    """Turns method embeddings (and teacher probabilities) into stats and warnings."""

    def __init__(self, cfg: DictConfig):
        self.warn_std = float(cfg.collapse_warn_std)
        self.warn_rank = float(cfg.collapse_warn_rank)
        self.warn_uniform = float(cfg.collapse_warn_teacher_entropy)
        self.warned = 0

    def measure(self, output: Tensor | Mapping[str, Tensor] | None) -> dict[str, float]:
        if output is None:
            return {}
        if isinstance(output, Tensor):
            output = {"embeddings": output}
        stats: dict[str, float] = {}
        if output.get("embeddings") is not None:
            stats.update(collapse_stats(output["embeddings"]))
        if output.get("probs") is not None:
            stats.update(entropy_stats(output["probs"]))
        return stats

    def check(self, stats: Mapping[str, float], step: int) -> list[str]:
        """Warnings for collapsed representations (logged; the run goes on: it may recover)."""
        problems = []
        if stats.get("emb_std_ratio", math.inf) < self.warn_std:
            problems.append(
                f"std of normalised embeddings x sqrt(dim) = {stats['emb_std_ratio']:.4f} "
                f"< {self.warn_std}: embeddings are collapsing to one point"
            )
        if stats.get("eff_rank", math.inf) < self.warn_rank:
            problems.append(
                f"effective rank {stats['eff_rank']:.3f} < {self.warn_rank}: dimensional collapse"
            )
        if stats.get("teacher_entropy", 0.0) > self.warn_uniform:
            problems.append(
                f"teacher entropy {stats['teacher_entropy']:.4f} > {self.warn_uniform}: every teacher "
                "target is near uniform, the prototype loss teaches nothing (lower the teacher "
                "temperature, or use sinkhorn_knopp centering)"
            )
        if stats.get("teacher_marginal_entropy", 1.0) < 0.05:
            problems.append(
                f"teacher marginal entropy {stats['teacher_marginal_entropy']:.4f}: one prototype takes every image"
            )
        for problem in problems:
            logger.warning("step %d: possible collapse: %s", step, problem)
        self.warned += len(problems)
        return problems


class OnlineKNN:
    """Cosine k-NN top-1 accuracy of the export backbone on a small labelled set (DINO voting)."""

    def __init__(
        self,
        train_spec: str,
        test_spec: str,
        *,
        img_size: int,
        channels: int | str,
        window: Any,
        k: int,
        max_samples: int,
        batch_size: int,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ):
        from pretrain.data.datasets import open_dataset
        from pretrain.transforms import eval_transform

        transform = eval_transform(img_size, channels)
        self.k, self.device, self.autocast_dtype = k, device, autocast_dtype
        self.batch_size = batch_size
        self.splits: dict[str, tuple[torch.utils.data.Dataset, Tensor]] = {}
        for split, spec in (("train", train_spec), ("test", test_spec)):
            dataset = open_dataset(str(spec), transform=transform, window=window)
            labels = np.asarray(dataset.labels)
            index = np.flatnonzero(labels >= 0)
            if len(index) == 0:
                raise ValueError(f"monitor.knn_{split}={spec}: no labelled samples")
            if len(index) > max_samples:
                index = np.sort(np.random.default_rng(0).choice(index, max_samples, replace=False))
            subset = torch.utils.data.Subset(dataset, index.tolist())
            self.splits[split] = (subset, torch.from_numpy(labels[index]))
        logger.info(
            "online k-NN: %d train / %d test images, k=%d",
            len(self.splits["train"][1]),
            len(self.splits["test"][1]),
            k,
        )

    @torch.no_grad()
    def _features(self, features: Callable[[Tensor], Tensor], dataset) -> Tensor:
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, num_workers=0)
        feats = []
        for images, _ in loader:
            with torch.autocast(
                self.device.type,
                dtype=self.autocast_dtype or torch.float32,
                enabled=self.autocast_dtype is not None,
            ):
                feats.append(features(images.to(self.device)).float())
        return F.normalize(torch.cat(feats), dim=1)

    @torch.no_grad()
    def evaluate(self, method: nn.Module) -> dict[str, float]:
        """k-NN with `method.export_features` (the exported backbone, in eval mode)."""
        backbone = method.backbone_for_export()
        was_training = backbone.training
        backbone.eval()
        try:
            train_feats = self._features(method.export_features, self.splits["train"][0])
            test_feats = self._features(method.export_features, self.splits["test"][0])
        finally:
            backbone.train(was_training)
        top1 = knn_top1(
            train_feats,
            self.splits["train"][1].to(self.device),
            test_feats,
            self.splits["test"][1].to(self.device),
            self.k,
        )
        return {"knn_top1": top1}


@torch.no_grad()
def knn_top1(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of the DINO weighted k-NN vote, scored as `python -m eval knn` scores it."""
    train_y, test_y = train_labels.cpu().numpy(), test_labels.cpu().numpy()
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    scores = knn_scores(
        train_feats.float().cpu().numpy(),
        train_y,
        test_feats.float().cpu().numpy(),
        ks=[k],
        num_classes=num_classes,
        temperature=temperature,
    )[k]
    return float((scores.argmax(axis=1) == test_y).mean())


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """One panel per logged quantity against the step; written with the Agg backend."""
    records = read_metrics(metrics_path) if Path(metrics_path).exists() else []
    keys = sorted(
        {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}
    )
    if not records or not keys:
        logger.info("no metrics to plot in %s", metrics_path)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [
            (r["step"], r[key])
            for r in records
            if isinstance(r.get(key), (int, float)) and "step" in r
        ]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, lw=1.2, marker="." if len(xs) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out_path)
    with atomic_open(out) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return out
