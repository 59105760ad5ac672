"""k-NN (DINO protocol) against an independent brute-force computation, and its protocol wiring."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eval.__main__ import DEFAULT_CONFIG
from eval.featureset import FeatureSet
from eval.protocols.base import EvalContext
from eval.protocols.knn import run as run_knn
from pretrain.components.knn import knn_scores
from pretrain.config import load_config


def brute_force_knn(train_x, train_y, test_x, k, temperature, num_classes):
    """Plain-Python DINO k-NN: one query at a time, cosine via explicit norms."""
    out = []
    for q in test_x:
        sims = []
        for i, t in enumerate(train_x):
            cos = float(np.dot(q, t) / (np.linalg.norm(q) * np.linalg.norm(t)))
            sims.append((cos, i))
        sims.sort(key=lambda p: -p[0])
        votes = [0.0] * num_classes
        total = 0.0
        for cos, i in sims[:k]:
            w = math.exp(cos / temperature)
            total += w
            if np.ndim(train_y[i]) == 0:
                votes[int(train_y[i])] += w
            else:
                for c, on in enumerate(train_y[i]):
                    votes[c] += w * on
        out.append([v / total for v in votes])
    return np.array(out)


def feature_set(x: np.ndarray, y: np.ndarray, k: int) -> FeatureSet:
    return FeatureSet(
        tokens=x[:, None, :].astype(np.float32),
        patch_mean=None,
        labels=y,
        num_classes=k,
        keys=np.array([str(i) for i in range(len(y))]),
        patients=None,
    )


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(60, 8)).astype(np.float32)
    train_y = rng.integers(0, 3, 60)
    test_x = rng.normal(size=(15, 8)).astype(np.float32)
    got = knn_scores(train_x, train_y, test_x, ks=[1, 5, 20], num_classes=3, temperature=0.07)
    for k in (1, 5, 20):
        ref = brute_force_knn(train_x, train_y, test_x, k, 0.07, 3)
        np.testing.assert_allclose(got[k], ref, rtol=1e-5, atol=1e-7)
    # a different temperature changes the weights, still equal to brute force
    got_t = knn_scores(train_x, train_y, test_x, ks=[5], num_classes=3, temperature=0.5)
    np.testing.assert_allclose(
        got_t[5], brute_force_knn(train_x, train_y, test_x, 5, 0.5, 3), rtol=1e-5
    )


def test_knn_multilabel_votes_match_brute_force():
    rng = np.random.default_rng(1)
    train_x = rng.normal(size=(40, 6)).astype(np.float32)
    train_y = rng.integers(0, 2, size=(40, 3))
    test_x = rng.normal(size=(10, 6)).astype(np.float32)
    got = knn_scores(train_x, train_y, test_x, ks=[7], num_classes=3)
    np.testing.assert_allclose(
        got[7], brute_force_knn(train_x, train_y, test_x, 7, 0.07, 3), rtol=1e-5
    )


def test_faiss_and_torch_backends_agree_and_k_is_capped():
    rng = np.random.default_rng(2)
    train_x = rng.normal(size=(300, 16)).astype(np.float32)
    train_y = rng.integers(0, 4, 300)
    test_x = rng.normal(size=(50, 16)).astype(np.float32)
    a = knn_scores(train_x, train_y, test_x, ks=[10, 500], num_classes=4, backend="torch")
    b = knn_scores(train_x, train_y, test_x, ks=[10, 500], num_classes=4, backend="faiss")
    for k in (10, 500):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)
    # k=500 > 300 training features: all of them vote
    np.testing.assert_allclose(
        a[500], brute_force_knn(train_x, train_y, test_x, 300, 0.07, 4), rtol=1e-5
    )


def _cfg(*overrides: str):
    return load_config(DEFAULT_CONFIG, None, ["bootstrap.resamples=200", *overrides])


def test_knn_protocol_selects_k_on_val_and_reports_every_k():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(2, 10)) * 2

    def sample(n):
        y = rng.integers(0, 2, n)
        return centres[y] + rng.normal(size=(n, 10)), y

    (xtr, ytr), (xv, yv), (xte, yte) = sample(200), sample(60), sample(100)
    ctx = EvalContext(
        _cfg("knn.ks=[1,10,50]"),
        train=feature_set(xtr, ytr, 2),
        val=feature_set(xv, yv, 2),
        test=feature_set(xte, yte, 2),
    )
    result = run_knn(ctx)
    assert list(result.settings) == ["k=1", "k=10", "k=50"]
    val_acc = {name: s["val_accuracy"] for name, s in result.settings.items()}
    assert val_acc[result.best] == max(val_acc.values())
    for metrics in result.settings.values():
        assert metrics["accuracy"] > 0.85  # separable clusters
        assert metrics["accuracy_ci95"][0] <= metrics["accuracy"] <= metrics["accuracy_ci95"][1]
    ref = brute_force_knn(xtr, ytr, xte, 10, 0.07, 2)
    assert result.settings["k=10"]["accuracy"] == pytest.approx(np.mean(ref.argmax(1) == yte))

    no_val = EvalContext(
        _cfg("knn.ks=[1,10]", "knn.default_k=10"),
        train=feature_set(xtr, ytr, 2),
        test=feature_set(xte, yte, 2),
    )
    assert run_knn(no_val).best == "k=10"


def _gather_worker(rank: int, world: int, port: int, queue) -> None:
    from eval.features import _gather_rows

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    total = 7
    mine = torch.tensor([[float(i), float(10 * i)] for i in range(rank, total, world)])
    queue.put((rank, _gather_rows(mine, total).numpy()))
    dist.destroy_process_group()


def test_features_gathered_across_ranks_in_dataset_order():
    """Rank r extracts items r, r+W, ...; the gather must restore 0..N-1 order (uneven shares)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # spawn would re-import torch and sklearn in each child
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)  # a crashed child fails, never hangs
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    expected = np.array([[i, 10 * i] for i in range(7)], dtype=np.float32)
    for rank in range(2):
        np.testing.assert_array_equal(results[rank], expected)
