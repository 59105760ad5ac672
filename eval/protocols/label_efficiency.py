"""Label efficiency: the linear / logistic-regression probes trained on 1 %, 10 %, 100 % of the
training labels (RETFound, UNI and REMEDIS report such curves).

Each fraction draws a stratified subset of the fit rows (at least one image per class) for each
seed; the selection set (--val, or the split of train) stays whole, as in those papers, so only the
training labels are scarce. Per (method, fraction): metrics averaged over seeds (`_std` their
spread, `_ci95` the bootstrap interval of the seed-averaged metric). A deterministic probe on the
full label set (logreg at 100 %) runs once.
"""

from __future__ import annotations

import logging

import numpy as np

from eval.protocols import register
from eval.protocols.base import EvalContext, EvalError, ProtocolResult, label_subset
from eval.protocols.linear import fit_and_select, full_features
from eval.protocols.logreg import logreg_probe

logger = logging.getLogger(__name__)
METHODS = ("logreg", "linear")


def _logreg_scores(ctx: EvalContext, fit, val) -> tuple[np.ndarray, str]:
    _, best_c, scores = logreg_probe(ctx, fit, val)
    return scores, f"C={best_c:g}"


def _linear_scores(ctx: EvalContext, fit, val, seed: int) -> tuple[np.ndarray, str]:
    grid, _, _, best = ctx.memo(
        ("linear", fit, val, seed), lambda: fit_and_select(ctx, fit, val, seed=seed, progress=False)
    )
    return grid.predict(full_features(ctx.test))[grid.names.index(best)], best


@register("label_efficiency", "linear/logreg probes on 1/10/100 % of the labels, several seeds")
def run(ctx: EvalContext) -> ProtocolResult:
    cfg = ctx.cfg.label_efficiency
    methods = [str(m) for m in cfg.methods]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise EvalError(f"label_efficiency.methods {unknown} unknown; choose from {METHODS}")
    fractions = sorted(float(f) for f in cfg.fractions)
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise EvalError(f"label_efficiency.fractions must lie in (0, 1], got {fractions}")
    fit, val, source = ctx.train_val()
    settings, curve = {}, {m: [] for m in methods}
    for method in methods:
        for fraction in fractions:
            seeds = [int(s) for s in cfg.seeds]
            if fraction >= 1.0 and method == "logreg":
                seeds = seeds[:1]  # same rows, deterministic fit: one run is all of them
            runs, chosen, n_labels = [], [], []
            for seed in seeds:
                subset = fit.subset(label_subset(fit, fraction, seed))
                if method == "logreg":
                    scores, pick = _logreg_scores(ctx, subset, val)
                else:
                    scores, pick = _linear_scores(ctx, subset, val, seed)
                runs.append(scores)
                chosen.append(pick)
                n_labels.append(len(subset))
            name = f"{method}@{fraction:.0%}"
            metrics = ctx.test_metrics(runs)
            settings[name] = {
                **metrics,
                "params": {
                    "method": method,
                    "fraction": fraction,
                    "seeds": seeds,
                    "n_labels": n_labels,
                    "selected": chosen,
                },
            }
            point = {"fraction": fraction, "n_labels": float(np.mean(n_labels))}
            for metric in ("accuracy", "balanced_accuracy", "auroc"):
                point[metric] = metrics[metric]
                point[f"{metric}_std"] = metrics.get(f"{metric}_std", 0.0)
                point[f"{metric}_ci95"] = metrics.get(f"{metric}_ci95")
            curve[method].append(point)
            logger.info(
                "label efficiency %s: accuracy %.3f auroc %.3f",
                name,
                metrics["accuracy"],
                metrics["auroc"],
            )
    best = f"{methods[0]}@{fractions[-1]:.0%}"
    return ProtocolResult(
        name="label_efficiency",
        settings=settings,
        best=best,
        selection=f"the largest fraction of the first method (selection within each run on {source})",
        extras={"curve": curve},
    )
