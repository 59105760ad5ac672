"""The training loop shared by the adaptation protocols (eval/protocols/adaptation.py).

AdamW with linear warmup + cosine decay (pretrain/schedules.py), layer-wise lr decay through
pretrain/optim.py's param groups (full fine-tuning, RETFound's 0.65), optional class-balanced
sampling, optional bf16 autocast (CPU and GPU), early stopping on val AUROC (the best epoch's
weights are restored), tqdm progress, and a checkpoint after every epoch so that a rerun of the
same run directory continues where a killed run stopped (`result.json` marks a finished run).

Why epochs have a floor (`min_epoch_samples`): with 1 % of the labels an epoch is a single batch;
drawing at least that many samples per epoch gives small label sets enough optimizer steps.
Each epoch's sampling and dropout use a generator seeded by (seed, epoch), so a resumed run draws
exactly what the uninterrupted run would have drawn.

A checkpoint that cannot be read or written stops the run with `FinetuneCheckpointError` naming
the file and the reason (the CLI exits 2): a raw torch error would not say which of the many run
directories holds the bad file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from eval.adapters import AdaptedModel
from eval.metrics import point_metrics
from eval.protocols.base import EvalError
from pretrain.checkpoint import unreadable_reason
from pretrain.io import atomic_open
from pretrain.optim import apply_lr_wd, check_param_groups, param_groups_lrd
from pretrain.schedules import cosine_schedule

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
_CHECKPOINT_KEYS = (
    "digest",
    "epoch",
    "trainable",
    "optimizer",
    "best_state",
    "best_score",
    "best_epoch",
    "bad",
    "seconds",
    "history",
    "stopped",
)


class FinetuneCheckpointError(EvalError):
    """A fine-tune checkpoint that cannot be read or written, named with the reason."""


@dataclass(frozen=True)
class TrainSettings:
    lr: float
    epochs: int = 20
    batch_size: int = 32
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    min_lr: float = 1e-6
    layer_decay: float = 1.0
    patience: int = 5
    min_epoch_samples: int = 64
    balanced: bool = True
    bf16: bool = False
    num_workers: int = 0
    seed: int = 0
    device: str = "cpu"

    def digest(self, extra: dict[str, Any]) -> str:
        """What a run depends on: a checkpoint of other settings or data is not resumed."""
        doc = json.dumps({**asdict(self), **extra}, sort_keys=True, default=str)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]


@dataclass
class TrainOutcome:
    best_epoch: int
    epochs_run: int
    best_val_auroc: float
    train_seconds: float
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)


class ImageRows(Dataset):
    """Rows `indices` of a preprocessed dataset with their targets. With `cache` (a dict shared by
    every run on that dataset) each image is transformed once: the eval transform is
    deterministic, so a cached tensor is exactly what the dataset would give again."""

    def __init__(
        self,
        dataset: Dataset,
        indices: np.ndarray,
        targets: np.ndarray,
        cache: dict[int, Tensor] | None = None,
    ):
        self.dataset, self.indices, self.targets = dataset, np.asarray(indices), np.asarray(targets)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        index = int(self.indices[i])
        image = None if self.cache is None else self.cache.get(index)
        if image is None:
            image = self.dataset[index][0]
            if self.cache is not None:
                self.cache[index] = image
        return image, torch.as_tensor(self.targets[i])


def _epoch_order(targets: np.ndarray, count: int, balanced: bool, gen: torch.Generator) -> Tensor:
    """Indices of one epoch: class-balanced draws with replacement, or shuffled passes."""
    n = len(targets)
    if balanced and targets.ndim == 1:
        counts = np.bincount(targets)
        weights = torch.from_numpy(1.0 / counts[targets]).double()
        return torch.multinomial(weights, count, replacement=True, generator=gen)
    passes = [torch.randperm(n, generator=gen) for _ in range(math.ceil(count / n))]
    return torch.cat(passes)[:count]


def loss_fn(logits: Tensor, targets: Tensor, multilabel: bool) -> Tensor:
    logits = logits.float()
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    return F.cross_entropy(logits, targets.long())


@torch.inference_mode()
def predict(
    model: AdaptedModel,
    data: ImageRows,
    settings: TrainSettings,
    multilabel: bool,
    desc: str = "predict",
) -> np.ndarray:
    """(n, C) probabilities (softmax, or sigmoid for multi-label) in row order."""
    model.eval()
    device = torch.device(settings.device)
    loader = DataLoader(data, batch_size=settings.batch_size * 4, num_workers=settings.num_workers)
    out = []
    for images, _ in tqdm(loader, desc=desc, leave=False, unit="batch"):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
            logits = model(images.to(device)).float()
        out.append(torch.sigmoid(logits) if multilabel else logits.softmax(dim=-1))
    return torch.cat(out).double().cpu().numpy()


def _val_score(labels: np.ndarray, probs: np.ndarray) -> float:
    auroc = point_metrics(labels, probs)["auroc"]
    return float(auroc) if np.isfinite(auroc) else -math.inf


def _save(state: dict[str, Any], path: Path) -> None:
    """Atomic write; a failure (disk full, permissions) names the file and leaves no temp file."""
    try:
        with atomic_open(path) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError
        raise FinetuneCheckpointError(f"{path}: cannot write checkpoint ({exc})") from exc


def _load(path: Path, device: torch.device) -> dict[str, Any]:
    """The checkpoint at `path`, or FinetuneCheckpointError naming it and why it is unusable."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # zip/pickle/EOF/OS errors vary
        raise FinetuneCheckpointError(
            f"{path}: unreadable fine-tune checkpoint: {unreadable_reason(path, exc)}; "
            "delete it to rerun this run from epoch 0"
        ) from exc
    if not isinstance(ckpt, dict):
        raise FinetuneCheckpointError(
            f"{path}: not a fine-tune checkpoint (holds a {type(ckpt).__name__}); "
            "delete it to rerun this run from epoch 0"
        )
    return ckpt


def _resume_from(ckpt: dict[str, Any], path: Path, model: AdaptedModel, optimizer) -> None:
    """Load a same-settings checkpoint's weights; one that does not fit names the file."""
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    try:
        if missing:
            raise KeyError(f"lacks {missing}")
        model.load_state_dict(ckpt["trainable"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise FinetuneCheckpointError(
            f"{path}: fine-tune checkpoint does not fit this run ({exc}); "
            "delete it to rerun this run from epoch 0"
        ) from exc


def _set_mode(model: AdaptedModel, full: bool) -> None:
    """Full fine-tuning trains the backbone (drop path active); otherwise the frozen backbone
    stays in eval mode and only the adapters and head are in training mode."""
    model.train()
    if not full:
        model.backbone.eval()
        model.adapters.train()


def train_model(
    model: AdaptedModel,
    train: ImageRows,
    val: ImageRows,
    settings: TrainSettings,
    *,
    multilabel: bool,
    run_dir: Path,
    digest: str,
    desc: str = "adapt",
) -> TrainOutcome:
    """Train `model`'s trainable parameters; restore the epoch with the best val AUROC."""
    device = torch.device(settings.device)
    model.to(device)
    full = model.method == "finetune"
    num_layers = len(model.backbone.blocks) if full else None
    groups = param_groups_lrd(
        model, base_wd=1.0, layer_decay=settings.layer_decay, num_layers=num_layers
    )
    check_param_groups(groups, model)
    optimizer = torch.optim.AdamW(groups, lr=0.0, weight_decay=0.0)
    epoch_samples = max(len(train), settings.min_epoch_samples)
    steps_per_epoch = math.ceil(epoch_samples / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    warmup = min(round(settings.warmup_epochs * steps_per_epoch), total)
    lrs = cosine_schedule(settings.lr, settings.min_lr, total, warmup_steps=warmup)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / CHECKPOINT
    start_epoch, best_score, best_epoch, bad, seconds = 0, -math.inf, -1, 0, 0.0
    best_state = {k: v.clone() for k, v in model.trainable_state().items()}
    history: list[dict[str, float]] = []
    stopped = False
    if ckpt_path.is_file():
        ckpt = _load(ckpt_path, device)
        if ckpt.get("digest") == digest:
            _resume_from(ckpt, ckpt_path, model, optimizer)
            best_state, best_score = ckpt["best_state"], float(ckpt["best_score"])
            start_epoch, best_epoch, bad = int(ckpt["epoch"]), int(ckpt["best_epoch"]), ckpt["bad"]
            seconds, history, stopped = float(ckpt["seconds"]), ckpt["history"], ckpt["stopped"]
            logger.info("%s: resuming after epoch %d from %s", desc, start_epoch, ckpt_path)
        else:
            logger.warning("%s: %s is from other settings; starting over", desc, ckpt_path)
    bar = tqdm(total=settings.epochs, initial=start_epoch, desc=desc, unit="epoch", leave=False)
    for epoch in range(start_epoch, settings.epochs):
        if stopped:
            break
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
        torch.manual_seed(settings.seed * 100_003 + epoch)  # dropout, drop path
        order = _epoch_order(train.targets, epoch_samples, settings.balanced, gen)
        loader = DataLoader(
            train,
            batch_size=settings.batch_size,
            sampler=order.tolist(),
            num_workers=settings.num_workers,
        )
        _set_mode(model, full)
        losses = []
        for step, (images, targets) in enumerate(loader):
            apply_lr_wd(
                optimizer, float(lrs[epoch * steps_per_epoch + step]), settings.weight_decay
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
                logits = model(images.to(device))
            loss = loss_fn(logits, targets.to(device), multilabel)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        score = _val_score(val.targets, predict(model, val, settings, multilabel, "val"))
        seconds += time.perf_counter() - start
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_auroc": score})
        if score > best_score:
            best_score, best_epoch, bad = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.trainable_state().items()}
        else:
            bad += 1
            stopped = bad >= settings.patience
        _save(
            {
                "digest": digest,
                "epoch": epoch + 1,
                "trainable": model.trainable_state(),
                "optimizer": optimizer.state_dict(),
                "best_state": best_state,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "bad": bad,
                "seconds": seconds,
                "history": history,
                "stopped": stopped,
            },
            ckpt_path,
        )
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_auroc=f"{score:.3f}")
    bar.close()
    model.load_state_dict(best_state, strict=False)
    return TrainOutcome(
        best_epoch=best_epoch,
        epochs_run=len(history),
        best_val_auroc=best_score,
        train_seconds=seconds,
        stopped_early=stopped,
        history=history,
    )
