"""Evaluation speed: k-NN search (FAISS vs torch) and the linear grid (52 heads vs one head).

    .venv/bin/python bench/eval.py                      # 100k x 384 bank, 10k queries, k=200
    .venv/bin/python bench/eval.py --n-test 2000 --threads 2

Prints seconds per backend and the 52-head/1-head cost ratio (goal: <= 1.5x). Features are
random unit vectors; the k-NN answers of both backends are compared, not just timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

# the repo root must come before bench/, whose eval.py would otherwise shadow the eval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.protocols import thread_limit  # noqa: E402
from eval.protocols.linear import train_linear_grid  # noqa: E402
from pretrain.components.knn import knn_scores  # noqa: E402


def _timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_knn(n_train: int, n_test: int, dim: int, classes: int, k: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((n_train, dim), dtype=np.float32)
    labels = rng.integers(0, classes, n_train)
    queries = rng.standard_normal((n_test, dim), dtype=np.float32)
    results, answers = {}, {}
    backends = [("torch-cpu", "torch", "cpu"), ("faiss-cpu", "faiss", "cpu")]
    if torch.cuda.is_available():
        backends.append(("torch-cuda", "torch", "cuda"))
    for name, backend, device in backends:
        seconds, scores = _timed(
            lambda b=backend, d=device: knn_scores(
                bank,
                labels,
                queries,
                ks=[10, 20, 100, k],
                num_classes=classes,
                backend=b,
                device=d,
            )
        )
        results[f"knn_{name}_s"] = round(seconds, 3)
        answers[name] = scores[20].argmax(axis=1)
    ref = answers["torch-cpu"]
    for name, pred in answers.items():
        results[f"knn_{name}_agree_with_torch"] = float(np.mean(pred == ref))
    return results


def bench_linear(n: int, dim: int, blocks: int, classes: int, epochs: int) -> dict[str, float]:
    """DINOv2 grid: (1 or `blocks` CLS) x (with/without pooled patches) x 13 lrs = 52 heads."""
    rng = np.random.default_rng(1)
    width = (blocks + 1) * dim
    x = rng.standard_normal((n, width), dtype=np.float32)
    y = rng.integers(0, classes, n)
    lrs13 = np.array([1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1])
    variant_masks = np.zeros((4, width), dtype=bool)
    variant_masks[0, (blocks - 1) * dim : blocks * dim] = True  # n1
    variant_masks[1, (blocks - 1) * dim :] = True  # n1+avgpool
    variant_masks[2, : blocks * dim] = True  # n4
    variant_masks[3, :] = True  # n4+avgpool
    masks52 = np.repeat(variant_masks, len(lrs13), axis=0)
    lrs52 = np.tile(lrs13, 4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = dict(num_outputs=classes, epochs=epochs, batch_size=128, device=device, progress=False)
    one, _ = _timed(
        lambda: train_linear_grid(x, y, masks=masks52[-1:], lrs=lrs52[-1:], **common), repeat=2
    )
    grid, _ = _timed(lambda: train_linear_grid(x, y, masks=masks52, lrs=lrs52, **common), repeat=2)
    return {
        "linear_device": device,
        "linear_1_head_s": round(one, 3),
        "linear_52_heads_s": round(grid, 3),
        "linear_52_over_1": round(grid / one, 2),
        "linear_52_sequential_estimate_s": round(52 * one, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=100_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--linear-n", type=int, default=10_000)
    parser.add_argument("--linear-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="0: library defaults")
    args = parser.parse_args()
    with thread_limit(args.threads):
        report = {
            "threads": torch.get_num_threads(),
            "n_train": args.n_train,
            "n_test": args.n_test,
            "dim": args.dim,
            **bench_knn(args.n_train, args.n_test, args.dim, args.classes, args.k),
            **bench_linear(args.linear_n, args.dim, 4, args.classes, args.linear_epochs),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
