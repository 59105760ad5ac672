"""Weighted k-NN, the DINO protocol (Caron et al. 2021, eval_knn.py).

L2-normalised features, cosine similarity to every training feature, the k most similar vote for
their label with weight exp(similarity / T), T = 0.07. The normalised votes are the class scores
(AUROC); their argmax the prediction. All k share one top-max(k) search: the k nearest are a
prefix of the sorted max(k) nearest. Search: FAISS IndexFlatIP (exact inner product) for large
CPU banks, torch matmul + topk otherwise (GPU when present).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from eval.protocols import register
from eval.protocols.base import EvalContext, ProtocolResult, best_setting

logger = logging.getLogger(__name__)


def _normalise(x: np.ndarray) -> np.ndarray:
    t = F.normalize(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), dim=1)
    return t.numpy()


def search_torch(
    bank: np.ndarray, queries: np.ndarray, k: int, *, chunk_size: int = 1024, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices) of the k largest inner products, sorted descending."""
    bank_t = torch.from_numpy(bank).to(device)
    sims, idx = [], []
    for start in range(0, len(queries), chunk_size):
        q = torch.from_numpy(queries[start : start + chunk_size]).to(device)
        s, i = (q @ bank_t.T).topk(k, dim=1, largest=True, sorted=True)
        sims.append(s.cpu())
        idx.append(i.cpu())
    return torch.cat(sims).numpy(), torch.cat(idx).numpy()


def search_faiss(bank: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search with FAISS (on GPU when faiss-gpu and a GPU are present)."""
    import faiss

    index = faiss.IndexFlatIP(bank.shape[1])
    if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available():
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(np.ascontiguousarray(bank, dtype=np.float32))
    sims, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return sims, idx


def knn_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    ks: Sequence[int],
    num_classes: int,
    temperature: float = 0.07,
    backend: str = "torch",
    chunk_size: int = 1024,
    device: str = "cpu",
) -> dict[int, np.ndarray]:
    """{k: (n_test, num_classes) vote fractions}. train_y is (n,) class ids or (n, L) 0/1 targets."""
    if len(train_x) == 0:
        raise ValueError("k-NN needs at least one training feature")
    bank, queries = _normalise(train_x), _normalise(test_x)
    k_max = min(max(ks), len(bank))
    if backend == "faiss":
        sims, idx = search_faiss(bank, queries, k_max)
    elif backend == "torch":
        sims, idx = search_torch(bank, queries, k_max, chunk_size=chunk_size, device=device)
    else:
        raise ValueError(f"k-NN backend must be torch or faiss, got {backend!r}")
    out = {}
    for k in ks:
        kk = min(k, k_max)
        weights = np.exp(sims[:, :kk].astype(np.float64) / temperature)  # (n, k)
        if train_y.ndim == 2:  # multi-label: weighted fraction of neighbours with each label
            votes = np.einsum("nk,nkc->nc", weights, train_y[idx[:, :kk]].astype(np.float64))
        else:
            cells = np.arange(len(queries))[:, None] * num_classes + train_y[idx[:, :kk]]
            votes = np.bincount(
                cells.ravel(), weights=weights.ravel(), minlength=len(queries) * num_classes
            ).reshape(len(queries), num_classes)
        out[k] = votes / weights.sum(axis=1, keepdims=True)
    return out


def _backend(cfg, n_train: int, device: str) -> tuple[str, str]:
    backend = str(cfg.backend)
    if backend == "auto":
        backend = "faiss" if device == "cpu" and n_train >= int(cfg.faiss_min_train) else "torch"
    return backend, device


@register("knn", "DINO weighted k-NN on L2-normalised features, k in knn.ks")
def run(ctx: EvalContext) -> ProtocolResult:
    cfg = ctx.cfg.knn
    ks = [int(k) for k in cfg.ks]
    if len(ctx.train) < max(ks):
        logger.warning("k-NN: k > %d training images; those k use all of them", len(ctx.train))
    backend, device = _backend(cfg, len(ctx.train), ctx.device)
    train_x = ctx.train.variant(str(cfg.features))
    common = dict(
        ks=ks,
        num_classes=ctx.num_classes,
        temperature=float(cfg.temperature),
        backend=backend,
        chunk_size=int(cfg.chunk_size),
        device=device,
    )
    test_scores = knn_scores(
        train_x, ctx.train.labels, ctx.test.variant(str(cfg.features)), **common
    )
    val_scores: dict[str, tuple[float, float]] = {}
    if ctx.val is not None:
        by_k = knn_scores(train_x, ctx.train.labels, ctx.val.variant(str(cfg.features)), **common)
        val_scores = {f"k={k}": ctx.selection_score(ctx.val.labels, s) for k, s in by_k.items()}
    settings = {}
    for k, scores in test_scores.items():
        name = f"k={k}"
        settings[name] = {
            **ctx.test_metrics(scores),
            "params": {
                "k": k,
                "k_used": min(k, len(train_x)),
                "temperature": cfg.temperature,
                "features": ctx.train.resolve(str(cfg.features)),
            },
        }
        if name in val_scores:
            settings[name][f"val_{ctx.cfg.select_metric}"] = val_scores[name][0]
    if val_scores:
        best, selection = best_setting(val_scores), f"highest val {ctx.cfg.select_metric}"
    else:
        best, selection = f"k={int(cfg.default_k)}", "knn.default_k (no --val given)"
        if best not in settings:
            raise ValueError(f"knn.default_k={cfg.default_k} is not in knn.ks={ks}")
    return ProtocolResult(
        name="knn",
        settings=settings,
        best=best,
        selection=selection,
        extras={"backend": backend, "temperature": float(cfg.temperature)},
        best_scores=test_scores[int(best.split("=")[1])],
    )
