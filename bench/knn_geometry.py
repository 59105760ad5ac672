"""Is an export's k-NN held back by the geometry of its features? k-NN under feature transforms.

    python bench/knn_geometry.py EXPORT --data FILE.npz [--k 20]

Extracts the class token (`n1`) and, for ViTs, the mean patch token of FILE.npz:train and :test,
and prints the test k-NN accuracy / AUROC (DINO's weighted vote, temperature 0.07, as
`python -m eval knn`) of the features as they are, centred, z-scored per dimension, PCA-whitened
(32 and 64 components) and with the top 1 or 3 principal components removed, all fitted on the
training split only; with the variance share of the largest dimensions and components. A few
dominant dimensions would show as a large top-dimension share and a k-NN that z-scoring lifts
(issue 17, seventh session).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.features import FeatureExtractor  # noqa: E402
from pretrain.components.knn import knn_scores  # noqa: E402


def knn(train: np.ndarray, labels: np.ndarray, test: np.ndarray, truth: np.ndarray, k: int):
    votes = knn_scores(
        train.astype(np.float32), labels, test.astype(np.float32), ks=[k], num_classes=2
    )[k]
    return float((votes.argmax(1) == truth).mean()), float(roc_auc_score(truth, votes[:, 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--data", required=True, help="an .npz with train and test splits")
    parser.add_argument("--k", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    extract = FeatureExtractor(args.export, cache_dir=None)
    train, test = extract(f"{args.data}:train"), extract(f"{args.data}:test")
    if len(np.unique(train.labels)) != 2:
        raise SystemExit(f"{args.data}: a binary task is needed for the AUROC")
    variants = ["n1"] + (["avgpool"] if train.patch_mean is not None else [])
    for name in variants:
        a, b = train.variant(name), test.variant(name)
        mu, sd = a.mean(0), a.std(0) + 1e-6
        var = np.sort(a.var(0))[::-1] / a.var(0).sum()
        _, s, vt = np.linalg.svd(a - mu, full_matrices=False)
        eig = s**2 / (s**2).sum()
        print(f"{name}: {a.shape[1]} dims; variance share of the top 5 dims {np.round(var[:5], 3)}")
        print(f"  top 5 principal components {np.round(eig[:5], 3)}")
        rows = {"as exported": (a, b), "centred": (a - mu, b - mu)}
        rows["z-scored"] = ((a - mu) / sd, (b - mu) / sd)
        for r in (32, 64):
            w = vt[:r].T / s[:r] * np.sqrt(len(a))
            rows[f"PCA-whitened, {r} components"] = ((a - mu) @ w, (b - mu) @ w)
        for drop in (1, 3):
            p = np.eye(a.shape[1]) - vt[:drop].T @ vt[:drop]
            rows[f"top {drop} components removed"] = ((a - mu) @ p, (b - mu) @ p)
        for label, (x, y) in rows.items():
            acc, auroc = knn(x, train.labels, y, test.labels, args.k)
            print(f"  {label:32s} k-NN acc {acc:.3f}  AUROC {auroc:.3f}")


if __name__ == "__main__":
    main()
