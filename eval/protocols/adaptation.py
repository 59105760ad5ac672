"""Adaptation protocols: `finetune`, `lora`, `adaptformer`, `bottleneck`, `prompt`.

Unlike the probes these train through the backbone, so they read images, not cached features:
the images come from `ctx.extractor.open(spec)` (the eval preprocessing stated in the report),
and the rows of each split are found through the FeatureSet keys, so the fit/val split and the
label subsets are exactly those of the probes (`ctx.train_val()`, `label_subset` as in
label_efficiency). Per label fraction (1 %, 10 %, 100 %) and seed one model is trained
(eval/finetune_loop.py), early-stopped on val AUROC, and scored on test; the metrics of a fraction
average its seeds with bootstrap intervals (`ctx.test_metrics`). Each run directory
OUT/adaptation/METHOD/FRACTION-seedS holds the adapter weights alone (adapter.safetensors +
adapter.json, reloadable with eval.adapters.load_adapter), the test scores and result.json; a
rerun reuses finished runs and resumes unfinished ones from their per-epoch checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from omegaconf import OmegaConf

from eval.adapters import METHODS, AdaptedModel, AdapterError, merged_backbone, save_adapter
from eval.featureset import FeatureSet
from eval.finetune_loop import (
    CHECKPOINT,
    RESULT,
    ImageRows,
    TrainSettings,
    predict,
    train_model,
)
from eval.protocols import register, thread_limit
from eval.protocols.base import EvalContext, EvalError, ProtocolResult, label_subset

logger = logging.getLogger(__name__)

SCORES = "test_scores.npy"
DESCRIPTIONS = {
    "finetune": "full fine-tuning, layer-wise lr decay and drop path (RETFound)",
    "lora": "LoRA on the q and v parts of the fused qkv projection",
    "adaptformer": "AdaptFormer: bottleneck parallel to each MLP, scale 0.1",
    "bottleneck": "Houlsby bottleneck adapters after attention and MLP",
    "prompt": "visual prompt tuning (VPT-shallow)",
}


class ImageSource:
    """Datasets of the eval specs, opened once, and the dataset rows of any FeatureSet."""

    def __init__(self, ctx: EvalContext):
        self.ctx = ctx
        self._open: dict[str, tuple[Any, dict[str, int], dict | None]] = {}

    def rows(self, fs: FeatureSet, split: str) -> ImageRows:
        spec = self.ctx.specs[split]
        if spec not in self._open:
            dataset = self.ctx.extractor.open(spec)
            index = {str(k): i for i, k in enumerate(dataset.keys)}
            image = dataset[0][0] if len(dataset) else torch.zeros(0)
            mb = len(dataset) * image.numel() * image.element_size() / 2**20
            cache = {} if mb <= float(self.ctx.cfg.adaptation.cache_mb) else None
            self._open[spec] = (dataset, index, cache)
        dataset, index, cache = self._open[spec]
        missing = [k for k in fs.keys if k not in index]
        if missing:
            raise EvalError(f"{spec}: items {missing[:3]} of the features are not in the dataset")
        return ImageRows(dataset, np.array([index[k] for k in fs.keys]), fs.labels, cache)


def _settings(ctx: EvalContext, method: str, seed: int) -> TrainSettings:
    a, m = ctx.cfg.adaptation, ctx.cfg[method]
    return TrainSettings(
        lr=float(m.lr),
        epochs=int(a.epochs),
        batch_size=int(a.batch_size),
        weight_decay=float(a.weight_decay),
        warmup_epochs=float(a.warmup_epochs),
        min_lr=float(a.min_lr),
        layer_decay=float(m.layer_decay) if method == "finetune" else 1.0,
        patience=int(a.patience),
        min_epoch_samples=int(a.min_epoch_samples),
        balanced=bool(a.balanced_sampling),
        bf16=bool(a.bf16),
        num_workers=int(ctx.cfg.num_workers),
        seed=seed,
        device=ctx.device,
    )


def _options(ctx: EvalContext, method: str) -> dict[str, Any]:
    """The method's size options (everything in its config section but the optimiser ones)."""
    section = OmegaConf.to_container(ctx.cfg[method], resolve=True)
    return {k: v for k, v in section.items() if k not in ("lr", "layer_decay", "export_merged")}


def _fresh_backbone(ctx: EvalContext, method: str) -> torch.nn.Module:
    """A private copy of the frozen backbone; full fine-tuning rebuilds it with drop path."""
    base = ctx.extractor.model
    rate = float(ctx.cfg.finetune.drop_path) if method == "finetune" else 0.0
    if rate <= 0:
        return copy.deepcopy(base).cpu()
    kwargs = base.timm_kwargs
    model = timm.create_model(**{**kwargs, "pretrained": False, "drop_path_rate": rate})
    model.load_state_dict(base.state_dict(), strict=True)
    model.timm_kwargs, model.medssl_config = kwargs, copy.deepcopy(base.medssl_config)
    return model


def _keys_digest(fs: FeatureSet) -> str:
    return hashlib.sha256("\0".join(fs.keys.tolist()).encode()).hexdigest()[:16]


def train_run(
    ctx: EvalContext,
    method: str,
    fit: ImageRows,
    val: ImageRows,
    test: ImageRows,
    *,
    seed: int,
    run_dir: Path,
    digest_extra: dict[str, Any],
) -> tuple[np.ndarray, dict[str, Any]]:
    """One trained model: (test scores, run info); a finished run directory is reused."""
    settings, options = _settings(ctx, method, seed), _options(ctx, method)
    head_input = str(ctx.cfg.adaptation.head_input)
    digest = settings.digest(
        {
            "method": method,
            "options": options,
            "backbone": ctx.extractor.fingerprint,
            "head_input": head_input,
            "drop_path": float(ctx.cfg.finetune.drop_path) if method == "finetune" else 0.0,
            **digest_extra,
        }
    )
    result_path, scores_path = run_dir / RESULT, run_dir / SCORES
    if result_path.is_file() and scores_path.is_file():
        info = json.loads(result_path.read_text())
        if info.get("digest") == digest:
            logger.info("%s: finished run reused from %s", method, run_dir)
            return np.load(scores_path), info
    torch.manual_seed(seed)  # adapter and head initialisation
    try:
        model = AdaptedModel(
            _fresh_backbone(ctx, method), method, options, ctx.num_classes, head_input
        )
    except AdapterError as exc:
        raise EvalError(f"{method}: {exc}") from exc
    outcome = train_model(
        model,
        fit,
        val,
        settings,
        multilabel=ctx.multilabel,
        run_dir=run_dir,
        digest=digest,
        desc=f"{method} {run_dir.name}",
    )
    scores = predict(model, test, settings, ctx.multilabel, "test")
    info = {
        "digest": digest,
        "method": method,
        "seed": seed,
        "n_labels": len(fit),
        **model.count(),
        "train_seconds": outcome.train_seconds,
        "best_epoch": outcome.best_epoch,
        "epochs_run": outcome.epochs_run,
        "stopped_early": outcome.stopped_early,
        "best_val_auroc": outcome.best_val_auroc,
        "history": outcome.history,
    }
    model.cpu()
    save_adapter(model, run_dir / "adapter", extra={"backbone_path": ctx.extractor.backbone})
    info["adapter_bytes"] = (run_dir / "adapter" / "adapter.safetensors").stat().st_size
    if method == "lora" and bool(ctx.cfg.lora.export_merged):
        from pretrain.backbones import export_backbone

        meta = {k: ctx.extractor.meta.get(k) for k in ("mean", "std", "window", "channels")}
        export_backbone(merged_backbone(model), run_dir / "merged_backbone", meta=meta)
    np.save(scores_path, scores)
    result_path.write_text(json.dumps(info, indent=2, default=str) + "\n")
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # result.json now marks the run finished
    return scores, info


def run_method(ctx: EvalContext, method: str) -> ProtocolResult:
    """Every label fraction x seed of one method; headline = the largest fraction."""
    if ctx.extractor is None or ctx.extractor.is_raw or ctx.extractor.model is None:
        raise EvalError(f"{method} trains through a backbone: --backbone raw has none")
    if ctx.out_dir is None:
        raise EvalError(f"{method} needs an output directory for its runs")
    a = ctx.cfg.adaptation
    fractions = sorted(float(f) for f in a.fractions)
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise EvalError(f"adaptation.fractions must lie in (0, 1], got {fractions}")
    fit, val, source = ctx.train_val()
    images = ImageSource(ctx)
    val_split = "val" if ctx.val is not None else "train"
    val_rows, test_rows = images.rows(val, val_split), images.rows(ctx.test, "test")
    settings: dict[str, dict[str, Any]] = {}
    points, best_scores, count = [], None, {}
    threads = int(a.threads) if a.threads is not None else int(ctx.cfg.threads)
    for fraction in fractions:
        seeds = [int(s) for s in a.seeds]
        seeds = seeds[: int(a.full_fraction_seeds)] if fraction >= 1.0 else seeds
        runs, infos = [], []
        for seed in seeds:
            subset = fit.subset(label_subset(fit, fraction, seed))
            run_dir = ctx.out_dir / "adaptation" / method / f"{fraction:g}-seed{seed}"
            with thread_limit(threads):
                scores, info = train_run(
                    ctx,
                    method,
                    images.rows(subset, "train"),
                    val_rows,
                    test_rows,
                    seed=seed,
                    run_dir=run_dir,
                    digest_extra={"fit": _keys_digest(subset), "val": _keys_digest(val)},
                )
            runs.append(scores)
            infos.append(info)
        count = {k: infos[0][k] for k in ("trainable_params", "backbone_params", "head_params")}
        count["trainable_share"] = infos[0]["trainable_share"]
        metrics = ctx.test_metrics(runs)
        seconds = [float(i["train_seconds"]) for i in infos]
        name = f"{method}@{fraction:.0%}"
        settings[name] = {
            **metrics,
            "val_auroc": float(np.mean([i["best_val_auroc"] for i in infos])),
            **count,
            "train_seconds": float(np.mean(seconds)),
            "params": {
                "method": method,
                "fraction": fraction,
                "seeds": seeds,
                "n_labels": [i["n_labels"] for i in infos],
                "lr": float(ctx.cfg[method].lr),
                "options": _options(ctx, method),
                "train_seconds": seconds,
                "best_epoch": [i["best_epoch"] for i in infos],
                "epochs_run": [i["epochs_run"] for i in infos],
                "history": [i["history"] for i in infos],  # per seed: epoch, loss, val_auroc
                "adapter_bytes": infos[0]["adapter_bytes"],
            },
        }
        points.append({"fraction": fraction, "auroc": metrics["auroc"], **count})
        best_scores = runs[0]
        logger.info(
            "%s: AUROC %.3f, balanced accuracy %.3f, %d trainable (%.2f %%), %.0f s per run",
            name,
            metrics["auroc"],
            metrics["balanced_accuracy"],
            count["trainable_params"],
            100 * count["trainable_share"],
            np.mean(seconds),
        )
    return ProtocolResult(
        name=method,
        settings=settings,
        best=f"{method}@{fractions[-1]:.0%}",
        selection=(f"the largest label fraction; each run early-stopped on val AUROC ({source})"),
        extras={"adaptation": {"method": method, "description": DESCRIPTIONS[method], **count}},
        best_scores=best_scores,
    )


def _make(method: str):
    def run(ctx: EvalContext) -> ProtocolResult:
        return run_method(ctx, method)

    run.__name__ = run.__qualname__ = f"run_{method}"
    run.__doc__ = DESCRIPTIONS[method]
    return register(method, DESCRIPTIONS[method])(run)


PROTOCOLS = {method: _make(method) for method in METHODS}
