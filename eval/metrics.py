"""Classification metrics with bootstrap confidence intervals, computed for many resamples at once.

Why hand-vectorised instead of calling scikit-learn in a loop: every protocol setting (52 linear
heads, 6 shot counts x 100 episodes...) needs 1,000 bootstrap resamples, and 50,000+ sklearn calls
take minutes. A bootstrap resample is a vector of integer sample weights (how often each test image
was drawn), so every metric is written once as a *weighted* metric over a (B, n) weight matrix:
row 0 of an all-ones matrix is the point estimate, rows of multinomial counts are the resamples.
tests/test_eval_metrics.py checks each metric against scikit-learn (on repeated samples).

Definitions (multi-class, K classes, predictions = argmax of the scores):
- accuracy, balanced_accuracy (mean recall over classes present in y_true), f1_macro (over classes
  present in y_true or the predictions) -- the scikit-learn definitions;
- auroc: K == 2 -> AUROC of the class-1 score; K > 2 -> macro one-vs-rest AUROC over the classes
  present in y_true (ties count 1/2, as the trapezoidal ROC);
- kappa_quadratic (ordinal labels only): Cohen's kappa with quadratic weights over grades 0..K-1.
Multi-label targets (n, L) in {0, 1} (prediction = score >= 0.5): per-label accuracy, balanced
accuracy, F1 and AUROC, averaged over labels (accuracy is then 1 - Hamming loss); `auroc_per_label`
lists the per-label AUROCs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)

CORE_METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1_macro")
BOOTSTRAP_ELEMENTS = 2_000_000  # resamples x test size per vectorised chunk (bounds memory)


class MetricsError(ValueError):
    """Labels and scores that cannot be scored together; the message says why."""


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def weighted_auroc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of `scores` for binary `positive` under each row of `weights` (B, n) -> (B,).

    Weighted Mann-Whitney statistic: sum over (pos i, neg j) of w_i w_j [s_i > s_j] (+1/2 on ties),
    divided by W_pos W_neg. One sort serves all B rows; NaN where a row has no positive or negative.
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    pos = positive[order].astype(bool)[:, None]
    w = np.ascontiguousarray(weights.T)[order]  # (n, B): row ops are contiguous, hence fast
    w_pos, w_neg = w * pos, w * ~pos
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    if len(starts) < len(s):  # ties: pool the weights of equal scores
        w_pos = np.add.reduceat(w_pos, starts, axis=0)
        w_neg = np.add.reduceat(w_neg, starts, axis=0)
    cum_neg = np.cumsum(w_neg, axis=0)
    # negatives strictly below each score group, plus half of the tied ones
    numerator = (w_pos * (cum_neg - 0.5 * w_neg)).sum(axis=0)
    return _safe_div(numerator, w_pos.sum(axis=0) * w_neg.sum(axis=0))


def _confusions(y_true: np.ndarray, y_pred: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """Weighted confusion matrices (B, K, K): rows true class, columns predicted class."""
    rows = weights.shape[0]
    index = (np.arange(rows)[:, None] * (k * k) + (y_true * k + y_pred)[None, :]).ravel()
    counts = np.bincount(index, weights=weights.ravel(), minlength=rows * k * k)
    return counts.reshape(rows, k, k)


def _multiclass(
    y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray, ordinal: bool
) -> dict[str, np.ndarray]:
    k = scores.shape[1]
    y_pred = scores.argmax(axis=1)
    conf = _confusions(y_true, y_pred, k, weights)
    total = conf.sum(axis=(1, 2))
    tp = np.diagonal(conf, axis1=1, axis2=2)
    true_count = conf.sum(axis=2)
    pred_count = conf.sum(axis=1)
    out = {"accuracy": _safe_div(tp.sum(axis=1), total)}
    recall = _safe_div(tp, true_count)
    present = true_count > 0
    out["balanced_accuracy"] = _safe_div(
        np.where(present, recall, 0.0).sum(axis=1), present.sum(axis=1)
    )
    f1_den = true_count + pred_count  # 2TP + FP + FN
    f1 = _safe_div(2 * tp, f1_den)
    seen = f1_den > 0
    out["f1_macro"] = _safe_div(np.where(seen, f1, 0.0).sum(axis=1), seen.sum(axis=1))
    if k == 2:
        out["auroc"] = weighted_auroc(y_true == 1, scores[:, 1], weights)
    else:
        classes = [c for c in range(k) if (y_true == c).any()]
        if len(classes) < k:
            logger.warning("macro AUROC over the %d/%d classes present in y_true", len(classes), k)
        per_class = np.stack([weighted_auroc(y_true == c, scores[:, c], weights) for c in classes])
        # a resample that lost a class has no macro AUROC comparable to the full-data one: NaN
        out["auroc"] = per_class.mean(axis=0)
    if ordinal:
        grade = np.arange(k, dtype=np.float64)
        penalty = (grade[:, None] - grade[None, :]) ** 2
        expected = true_count[:, :, None] * pred_count[:, None, :] / total[:, None, None]
        observed_cost = (penalty * conf).sum(axis=(1, 2))
        expected_cost = (penalty * expected).sum(axis=(1, 2))
        out["kappa_quadratic"] = 1.0 - _safe_div(observed_cost, expected_cost)
    return out


def _multilabel(
    y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> dict[str, np.ndarray]:
    n_labels = y_true.shape[1]
    acc, bacc, f1, auroc = [], [], [], []
    for j in range(n_labels):
        scores_j = np.stack([1.0 - scores[:, j], scores[:, j]], axis=1)
        m = _multiclass(y_true[:, j].astype(np.int64), scores_j, weights, ordinal=False)
        acc.append(m["accuracy"])
        bacc.append(m["balanced_accuracy"])
        f1.append(m["f1_macro"])
        auroc.append(m["auroc"])
    per_label = np.stack(auroc, axis=1)  # (B, L); NaN for a label without positives/negatives
    return {
        "accuracy": np.mean(acc, axis=0),
        "balanced_accuracy": _nanmean_rows(np.stack(bacc, axis=1)),
        "f1_macro": _nanmean_rows(np.stack(f1, axis=1)),
        "auroc": _nanmean_rows(per_label),
        "auroc_per_label": per_label,
    }


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Row means over the finite entries; NaN for a row with none (no warning)."""
    finite = np.isfinite(values)
    return _safe_div(np.where(finite, values, 0.0).sum(axis=1), finite.sum(axis=1))


def check_inputs(y_true: np.ndarray, scores: np.ndarray) -> str:
    """Validate shapes; return the task: "multiclass" (y (n,)) or "multilabel" (y (n, L))."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    if scores.ndim != 2 or len(scores) != len(y_true):
        raise MetricsError(f"scores must be (n, classes) with n={len(y_true)}, got {scores.shape}")
    if len(y_true) == 0:
        raise MetricsError("no samples to score")
    if y_true.ndim == 2:
        if y_true.shape != scores.shape:
            raise MetricsError(f"multi-label targets {y_true.shape} vs scores {scores.shape}")
        if not np.isin(y_true, (0, 1)).all():
            raise MetricsError("multi-label targets must be 0/1")
        return "multilabel"
    if y_true.ndim != 1:
        raise MetricsError(f"labels must be (n,) or (n, L), got {y_true.shape}")
    if y_true.min() < 0 or y_true.max() >= scores.shape[1]:
        raise MetricsError(
            f"labels span {y_true.min()}..{y_true.max()} but scores have {scores.shape[1]} classes"
        )
    return "multiclass"


def weighted_metrics(
    y_true: np.ndarray, scores: np.ndarray, weights: np.ndarray, *, ordinal: bool = False
) -> dict[str, np.ndarray]:
    """Every metric under each weight row: dict of (B,) arrays (auroc_per_label: (B, L))."""
    task = check_inputs(y_true, scores)
    weights = np.atleast_2d(np.asarray(weights))
    if weights.dtype not in (np.float32, np.float64):
        weights = weights.astype(np.float64)
    if task == "multilabel":
        return _multilabel(np.asarray(y_true), np.asarray(scores, dtype=np.float64), weights)
    return _multiclass(
        np.asarray(y_true, dtype=np.int64), np.asarray(scores, dtype=np.float64), weights, ordinal
    )


def point_metrics(y_true: np.ndarray, scores: np.ndarray, *, ordinal: bool = False) -> dict:
    """Metrics on the full test set: {name: float} (auroc_per_label: list)."""
    raw = weighted_metrics(y_true, scores, np.ones((1, len(y_true))), ordinal=ordinal)
    return {k: (v[0].tolist() if v.ndim > 1 else float(v[0])) for k, v in raw.items()}


def bootstrap_weights(
    n: int, resamples: int, rng: np.random.Generator, groups: np.ndarray | None = None
) -> np.ndarray:
    """(resamples, n) draw counts. With `groups` (patient keys) whole patients are resampled,
    because images of one patient are not independent: each image gets its patient's count."""
    if groups is None:
        return _draw_counts(n, resamples, rng)
    _, group_index = np.unique(np.asarray(groups), return_inverse=True)
    counts = _draw_counts(int(group_index.max()) + 1, resamples, rng)
    return counts[:, group_index]


def _draw_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of n items is drawn in each of `resamples` draws of n with replacement."""
    draws = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    counts = np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n)
    return counts.astype(np.float32)  # exact small counts; sums err ~1e-7 relative: fine for a CI


def _interval(values: np.ndarray, alpha: float) -> list[float] | None:
    finite = values[np.isfinite(values)]
    if finite.size < 0.5 * values.size:  # mostly undefined (e.g. one class): no honest interval
        return None
    lo, hi = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)]


def evaluate(
    y_true: np.ndarray,
    scores: np.ndarray | Sequence[np.ndarray],
    *,
    ordinal: bool = False,
    groups: np.ndarray | None = None,
    resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Metrics with percentile-bootstrap `<metric>_ci95` intervals over the test set.

    `scores` may be a list of score arrays from repeated runs (seeds, few-shot episodes): the point
    estimate is then the mean over runs, `<metric>_std` their spread, and each bootstrap resample
    scores every run on the same resampled test set, so the interval is that of the run-averaged
    metric. The same `seed` gives every setting the same resamples (paired comparison).
    """
    runs = (
        [np.asarray(scores)] if isinstance(scores, np.ndarray) else [np.asarray(s) for s in scores]
    )
    if not runs:
        raise MetricsError("no scores given")
    y_true = np.asarray(y_true)
    for run in runs:
        check_inputs(y_true, run)
    per_run = [point_metrics(y_true, run, ordinal=ordinal) for run in runs]
    result: dict = {}
    for name in per_run[0]:
        values = [r[name] for r in per_run]
        if name == "auroc_per_label":
            result[name] = _nanmean_rows(np.asarray(values, dtype=float).T).tolist()
            continue
        arr = np.asarray(values, dtype=float)
        finite = arr[np.isfinite(arr)]
        result[name] = float(finite.mean()) if finite.size else float("nan")
        if len(runs) > 1:
            result[f"{name}_std"] = float(finite.std()) if finite.size else None
    if resamples > 0:
        rng = np.random.default_rng(seed)
        collected: dict[str, list[np.ndarray]] = {}
        chunk_size = max(1, BOOTSTRAP_ELEMENTS // len(y_true))
        for start in range(0, resamples, chunk_size):
            w = bootstrap_weights(len(y_true), min(chunk_size, resamples - start), rng, groups)
            chunk: dict[str, list[np.ndarray]] = {}
            for run in runs:
                for name, vals in weighted_metrics(y_true, run, w, ordinal=ordinal).items():
                    if name != "auroc_per_label":
                        chunk.setdefault(name, []).append(vals)
            for name, vals in chunk.items():
                with np.errstate(invalid="ignore"):
                    collected.setdefault(name, []).append(np.mean(vals, axis=0))
        for name, parts in collected.items():
            result[f"{name}_ci95"] = _interval(np.concatenate(parts), alpha)
    result["n"] = int(len(y_true))
    result["n_groups"] = None if groups is None else int(len(np.unique(groups)))
    return result


def confusion_matrix(y_true: np.ndarray, scores: np.ndarray) -> list[list[int]]:
    """Counts (true x predicted) for the report; multi-class targets only."""
    k = np.asarray(scores).shape[1]
    pred = np.asarray(scores).argmax(axis=1)
    conf = _confusions(np.asarray(y_true, dtype=np.int64), pred, k, np.ones((1, len(pred))))
    return conf[0].astype(int).tolist()
