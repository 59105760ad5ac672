"""eval.metrics against scikit-learn, and the bootstrap's behaviour."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from eval.metrics import (
    MetricsError,
    bootstrap_weights,
    confusion_matrix,
    evaluate,
    point_metrics,
    weighted_metrics,
)


def _scores(rng: np.random.Generator, y: np.ndarray, k: int, signal: float, decimals: int = 1):
    """Noisy class scores with ties (rounded), rows summing to 1."""
    s = rng.random((len(y), k))
    s[np.arange(len(y)), y] += signal
    s = np.round(s, decimals) + 1e-3
    return s / s.sum(axis=1, keepdims=True)


def _sklearn(y: np.ndarray, s: np.ndarray, k: int) -> dict[str, float]:
    p = s.argmax(axis=1)
    auroc = skm.roc_auc_score(y, s[:, 1]) if k == 2 else skm.roc_auc_score(y, s, multi_class="ovr")
    return {
        "accuracy": skm.accuracy_score(y, p),
        "balanced_accuracy": skm.balanced_accuracy_score(y, p),
        "f1_macro": skm.f1_score(y, p, average="macro"),
        "auroc": auroc,
        "kappa_quadratic": skm.cohen_kappa_score(y, p, labels=np.arange(k), weights="quadratic"),
    }


@pytest.mark.parametrize("k", [2, 3, 5])
def test_point_metrics_match_sklearn(k):
    rng = np.random.default_rng(k)
    y = rng.integers(0, k, 300)
    s = _scores(rng, y, k, signal=0.4)
    ours = point_metrics(y, s, ordinal=True)
    for name, ref in _sklearn(y, s, k).items():
        assert ours[name] == pytest.approx(ref, abs=1e-12), name


@pytest.mark.parametrize("k", [2, 4])
def test_weighted_metrics_equal_sklearn_on_repeated_samples(k):
    """A bootstrap resample is a weight vector: metrics must equal sklearn on the repeated data,
    including a class that is absent from the resample's predictions (f1 / balanced accuracy)."""
    rng = np.random.default_rng(10 + k)
    y = rng.integers(0, k, 120)
    s = _scores(rng, y, k, signal=0.2)
    weights = rng.integers(0, 4, size=(5, len(y))).astype(np.float32)
    got = weighted_metrics(y, s, weights, ordinal=True)
    for row in range(len(weights)):
        idx = np.repeat(np.arange(len(y)), weights[row].astype(int))
        ref = _sklearn(y[idx], s[idx], k)
        for name, value in ref.items():
            assert got[name][row] == pytest.approx(value, abs=1e-6), (name, row)


def test_balanced_accuracy_and_f1_by_hand():
    y = np.array([0, 0, 0, 1])
    s = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.3, 0.7]])  # recall 2/3 and 1
    m = point_metrics(y, s)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)  # F1 class 0 = 4/5, class 1 = 2/3
    assert m["auroc"] == pytest.approx(2 / 3)  # positive 0.7 beats negatives 0.1, 0.2, not 0.8


def test_multilabel_per_label_and_mean_auroc():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=(200, 4))
    s = np.clip(y * 0.3 + rng.random((200, 4)) * 0.7, 0, 1)
    m = point_metrics(y, s)
    per_label = skm.roc_auc_score(y, s, average=None)
    np.testing.assert_allclose(m["auroc_per_label"], per_label, atol=1e-12)
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, s, average="macro"))
    pred = (s >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(1 - skm.hamming_loss(y, pred))
    bacc = np.mean([skm.balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(4)])
    assert m["balanced_accuracy"] == pytest.approx(bacc)


def test_bootstrap_intervals_contain_point_estimate_and_shrink_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1600):
        y = rng.integers(0, 3, n)
        s = _scores(rng, y, 3, signal=0.5, decimals=3)
        m = evaluate(y, s, ordinal=True, resamples=500, seed=1)
        for name in ("accuracy", "balanced_accuracy", "auroc", "f1_macro", "kappa_quadratic"):
            lo, hi = m[f"{name}_ci95"]
            assert lo <= m[name] <= hi, name
            assert lo < hi
        widths.append(m["accuracy_ci95"][1] - m["accuracy_ci95"][0])
    # the interval of a 16x larger test set is about 4x narrower
    assert 2.5 < widths[0] / widths[1] < 6.5


def test_bootstrap_accuracy_interval_matches_binomial_theory():
    n, acc = 400, 0.8
    y = np.zeros(n, dtype=int)
    s = np.tile([0.9, 0.1], (n, 1))
    s[: int(n * (1 - acc))] = [0.1, 0.9]  # 20 % wrong
    m = evaluate(y, s, resamples=2000, seed=0)
    half = 1.96 * np.sqrt(acc * (1 - acc) / n)
    lo, hi = m["accuracy_ci95"]
    assert lo == pytest.approx(acc - half, abs=0.012)
    assert hi == pytest.approx(acc + half, abs=0.012)
    assert m["auroc_ci95"] is None  # one class only: no AUROC, no interval


def test_patient_bootstrap_resamples_whole_patients():
    rng = np.random.default_rng(0)
    groups = np.array(["a", "a", "a", "b", "c", "c", "d"])
    w = bootstrap_weights(len(groups), 300, rng, groups)
    for g in np.unique(groups):
        cols = w[:, groups == g]
        assert (cols == cols[:, :1]).all()  # one count per patient
    assert np.allclose(w[:, [0, 3, 4, 6]].sum(axis=1), 4)  # 4 patients drawn per resample


def test_patient_bootstrap_is_wider_for_correlated_images():
    """Images of one patient share the outcome: resampling patients must widen the interval."""
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(40), 10)
    correct = np.repeat(rng.random(40) < 0.7, 10)
    y = np.zeros(len(patients), dtype=int)
    s = np.where(correct[:, None], [0.9, 0.1], [0.1, 0.9])
    by_image = evaluate(y, s, resamples=500, seed=0)["accuracy_ci95"]
    by_patient = evaluate(y, s, groups=patients, resamples=500, seed=0)
    assert by_patient["n_groups"] == 40
    width = by_patient["accuracy_ci95"][1] - by_patient["accuracy_ci95"][0]
    assert width > 2 * (by_image[1] - by_image[0])


def test_repeated_runs_average_and_spread():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    runs = [_scores(rng, y, 2, signal=sig, decimals=3) for sig in (0.1, 0.5, 0.9)]
    m = evaluate(y, runs, resamples=200, seed=0)
    singles = [point_metrics(y, r)["accuracy"] for r in runs]
    assert m["accuracy"] == pytest.approx(np.mean(singles))
    assert m["accuracy_std"] == pytest.approx(np.std(singles))
    same = evaluate(y, [runs[1], runs[1]], resamples=200, seed=0)
    alone = evaluate(y, runs[1], resamples=200, seed=0)
    assert same["accuracy_ci95"] == pytest.approx(alone["accuracy_ci95"])
    assert same["accuracy_std"] == 0.0


def test_confusion_matrix_counts():
    y = np.array([0, 1, 2, 2])
    s = np.eye(3)[[0, 2, 2, 1]]
    assert confusion_matrix(y, s) == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]


def test_bad_inputs_are_refused():
    with pytest.raises(MetricsError, match="scores"):
        point_metrics(np.array([0, 1]), np.ones((3, 2)))
    with pytest.raises(MetricsError, match="classes"):
        point_metrics(np.array([0, 3]), np.ones((2, 2)))
    with pytest.raises(MetricsError, match="0/1"):
        point_metrics(np.array([[0, 2]]), np.ones((1, 2)))
