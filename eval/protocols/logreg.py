"""L-BFGS logistic regression (scikit-learn) on frozen features, the CLIP / RETFound-style probe.

Features are standardised (fit on the training rows), C is chosen on val from `logreg.Cs` (warm
starts along the grid), then the model is refit on train+val with that C and reported on test.
Multi-label targets get one binary logistic regression per label (one-vs-rest).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from eval.featureset import FeatureSet
from eval.protocols import register
from eval.protocols.base import EvalContext, ProtocolResult, best_setting, expand_proba

logger = logging.getLogger(__name__)


def _model(c: float, cfg, multilabel: bool, warm: bool = False):
    clf = LogisticRegression(C=c, max_iter=int(cfg.max_iter), solver="lbfgs", warm_start=warm)
    if multilabel:
        clf = OneVsRestClassifier(clf)
    return make_pipeline(StandardScaler(), clf) if cfg.standardize else make_pipeline(clf)


def predict_scores(model, x: np.ndarray, num_classes: int, multilabel: bool) -> np.ndarray:
    proba = model.predict_proba(x)
    if multilabel:
        return proba
    return expand_proba(proba, model.classes_, num_classes)


def fit_logreg(x: np.ndarray, y: np.ndarray, c: float, cfg, multilabel: bool):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = _model(c, cfg, multilabel).fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        logger.info("logreg C=%g did not converge in %d iterations", c, cfg.max_iter)
    return model


def select_c(
    ctx: EvalContext, fit: FeatureSet, val: FeatureSet
) -> tuple[dict[str, tuple[float, float]], float]:
    """Val score of every C (ascending, warm-started); (scores by 'C=..', best C)."""
    cfg = ctx.cfg.logreg
    x_fit, x_val = fit.variant(str(cfg.features)), val.variant(str(cfg.features))
    cs = sorted(float(c) for c in cfg.Cs)
    multilabel = fit.multilabel
    if not multilabel and len(np.unique(fit.labels)) < 2:
        raise ValueError("logistic regression needs at least 2 classes in the training rows")
    model = _model(cs[0], cfg, multilabel, warm=not multilabel)
    scores: dict[str, tuple[float, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in cs:
            if multilabel:
                model = _model(c, cfg, multilabel)
            else:
                model.set_params(logisticregression__C=c)
            model.fit(x_fit, fit.labels)
            val_scores = predict_scores(model, x_val, ctx.num_classes, multilabel)
            scores[f"C={c:g}"] = ctx.selection_score(val.labels, val_scores)
    best = best_setting(scores)
    return scores, float(best.split("=", 1)[1])


def concat(a: FeatureSet, b: FeatureSet, variant: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([a.variant(variant), b.variant(variant)]),
        np.concatenate([a.labels, b.labels]),
    )


def logreg_probe(
    ctx: EvalContext, fit: FeatureSet, val: FeatureSet
) -> tuple[dict[str, tuple[float, float]], float, np.ndarray]:
    """(val score per C, chosen C, test scores of the train+val refit); computed once per run."""

    def compute():
        cfg = ctx.cfg.logreg
        val_scores, best_c = select_c(ctx, fit, val)
        x, y = concat(fit, val, str(cfg.features))
        model = fit_logreg(x, y, best_c, cfg, ctx.multilabel)
        x_test = ctx.test.variant(str(cfg.features))
        return val_scores, best_c, predict_scores(model, x_test, ctx.num_classes, ctx.multilabel)

    return ctx.memo(("logreg", fit, val), compute)


@register("logreg", "L-BFGS logistic regression, C chosen on val, refit on train+val")
def run(ctx: EvalContext) -> ProtocolResult:
    cfg = ctx.cfg.logreg
    fit, val, source = ctx.train_val()
    val_scores, best_c, scores = logreg_probe(ctx, fit, val)
    name = f"C={best_c:g}"
    setting = {
        **ctx.test_metrics(scores),
        f"val_{ctx.cfg.select_metric}": val_scores[name][0],
        "params": {
            "C": best_c,
            "features": ctx.train.resolve(str(cfg.features)),
            "refit": "train+val",
            "standardize": bool(cfg.standardize),
        },
    }
    return ProtocolResult(
        name="logreg",
        settings={name: setting},
        best=name,
        selection=f"highest {ctx.cfg.select_metric} on {source}, then refit on train+val",
        extras={"val_grid": {c: v[0] for c, v in val_scores.items()}},
        best_scores=scores,
    )
