"""Weighted k-NN classification of features, the DINO protocol (Caron et al. 2021, eval_knn.py).

Shared by the pretraining monitor (online k-NN) and `python -m eval knn`, so both score a backbone
the same way. L2-normalised features, cosine similarity to every training feature, the k most
similar vote for their label with weight exp(similarity / T). All k share one top-max(k) search.

Example:
    >>> import numpy as np
    >>> train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    >>> scores = knn_scores(train, np.array([0, 0, 1]), np.array([[1.0, 0.05]]), ks=[2], num_classes=2)
    >>> scores[2].argmax(axis=1).tolist()
    [0]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

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
