"""Hierarchical k-means whose points are spread over ranks (torch.distributed), as
ssl-data-curation clusters 743M images on 16 nodes: each rank owns a contiguous slice of the
points, FAISS assigns them to the centroids that every rank holds, and the per-cluster sums are
all-reduced. The sums are exact integers (the values rounded to the 2^-24 grid, on which float16
embeddings lie exactly, summed in int64), and each row's nearest centroid is scored row by row, so
the centroids, and so every cluster, are bit-identical for any number of ranks, one included: a
run split over M ranks gives the clusters of one process.

Lloyd iterations from k points drawn with the seed (no subsampling, unlike FAISS's trainer), then
the resampling of Vo et al. 2024 (k-means again on the r points nearest each centroid, found
across ranks with ties broken by global row). Levels above the first cluster the centroids of the
level below, which every rank holds: they run on each rank alike, without communication.

    >>> import numpy as np
    >>> x = np.r_[np.zeros((5, 2)), np.ones((5, 2))].astype(np.float32)
    >>> labels, levels = hierarchical_kmeans_dist(x, [2, 1], niter=5, resample_steps=0, seed=0)
    >>> len(set(labels[:5].tolist())), len(set(labels.tolist())), levels[1].parent.tolist()
    (1, 2, [0, 0])
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist

from curation.hkmeans import Level
from curation.index import batches, nearest

logger = logging.getLogger(__name__)

SCALE = 2**24  # float16 values are multiples of 2^-24: exact on this grid
BATCH = 16384
CANDIDATES = 4  # FAISS's nearest centroids re-scored exactly


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum(t: torch.Tensor, spread: bool) -> torch.Tensor:
    if spread and _world()[1] > 1:
        dist.all_reduce(t)
    return t


def _gather(t: torch.Tensor, spread: bool) -> torch.Tensor:
    """Rank-major concatenation of equal-shaped tensors."""
    if not spread or _world()[1] == 1:
        return t[None]
    out = [torch.empty_like(t) for _ in range(_world()[1])]
    dist.all_gather(out, t)
    return torch.stack(out)


def _offsets(n_local: int, spread: bool) -> tuple[int, int]:
    """(first global row of this rank, global number of rows)."""
    sizes = _gather(torch.tensor([n_local], dtype=torch.int64), spread).ravel()
    rank = _world()[0] if spread else 0
    return int(sizes[:rank].sum()), int(sizes.sum())


def _fixed(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.rint(np.asarray(x, np.float64) * SCALE).astype(np.int64))


def assign_exact(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row and its squared distance, the same whatever other rows are
    searched with it: FAISS proposes CANDIDATES centroids (its BLAS path rounds differently with
    the batch shape), which are then scored in float64 row by row; ties go to the smaller id."""
    labels = np.empty(len(x), np.int64)
    dists = np.empty(len(x), np.float64)
    _, candidates = nearest(x, centroids, min(CANDIDATES, len(centroids)))
    for s, e in batches(len(x), 4096):
        ids = candidates[s:e]
        d = ((np.asarray(x[s:e], np.float64)[:, None, :] - centroids[ids]) ** 2).sum(-1)
        best = np.lexsort((ids, d), axis=1)[:, 0]
        labels[s:e] = ids[np.arange(e - s), best]
        dists[s:e] = d[np.arange(e - s), best]
    return labels, dists


def _init(x: np.ndarray, k: int, seed: int, spread: bool) -> np.ndarray:
    """k distinct global rows drawn with the seed; every rank adds the ones it owns."""
    first, n = _offsets(len(x), spread)
    rows = np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
    mine = rows[(rows >= first) & (rows < first + len(x))]
    out = torch.zeros(k, x.shape[1], dtype=torch.int64)
    out[np.searchsorted(rows, mine)] = _fixed(x[mine - first])
    return (_sum(out, spread).double() / SCALE).float().numpy()


def lloyd(
    x: np.ndarray, centroids: np.ndarray, niter: int, spread: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """niter Lloyd iterations from `centroids`; returns (centroids, labels, squared distances) of
    this rank's rows. An empty cluster keeps its centroid."""
    k, d = centroids.shape
    centroids = np.ascontiguousarray(centroids, np.float32)
    for _ in range(niter):
        labels, _ = assign_exact(x, centroids)
        sums = torch.zeros(k, d, dtype=torch.int64)
        counts = torch.zeros(k, dtype=torch.int64)
        for s, e in batches(len(x), BATCH):
            idx = torch.from_numpy(labels[s:e])
            sums.index_add_(0, idx, _fixed(x[s:e]))
            counts += torch.bincount(idx, minlength=k)
        sums, counts = _sum(sums, spread), _sum(counts, spread)
        full = counts > 0
        update = sums[full].double() / counts[full, None].double() / SCALE
        centroids = centroids.copy()
        centroids[full.numpy()] = update.float().numpy()
    labels, dists = assign_exact(x, centroids)
    return centroids, labels, dists


def _nearest_r(
    labels: np.ndarray, dists: np.ndarray, k: int, r: int, first: int, spread: bool
) -> np.ndarray:
    """Mask of this rank's rows among the r nearest to their centroid over all ranks, ties broken
    by the smaller global row."""
    rows = np.arange(len(labels), dtype=np.int64) + first
    order = np.lexsort((rows, dists, labels))
    lab = labels[order]
    rank_in = np.arange(len(order)) - np.searchsorted(lab, lab)
    top = order[rank_in < r]  # this rank's candidates: r per cluster at most
    cand_d = torch.full((k, r), float("inf"), dtype=torch.float64)
    cand_i = torch.full((k, r), np.iinfo(np.int64).max, dtype=torch.int64)
    slot = torch.from_numpy(rank_in[rank_in < r])
    cand_d[labels[top], slot] = torch.from_numpy(dists[top])
    cand_i[labels[top], slot] = torch.from_numpy(rows[top])
    all_d = _gather(cand_d, spread).permute(1, 0, 2).reshape(k, -1)
    all_i = _gather(cand_i, spread).permute(1, 0, 2).reshape(k, -1)
    # the r-th smallest (distance, row) of every cluster is its threshold
    key_order = np.lexsort((all_i.numpy(), all_d.numpy()), axis=1)[:, r - 1]
    thr_d = all_d.numpy()[np.arange(k), key_order]
    thr_i = all_i.numpy()[np.arange(k), key_order]
    td, ti = thr_d[labels], thr_i[labels]
    return (dists < td) | ((dists == td) & (rows <= ti))


def kmeans_level(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    resample_steps: int,
    r: int,
    seed: int,
    spread: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """One level: (centroids, labels of this rank's rows)."""
    first, n = _offsets(len(x), spread)
    k = max(1, min(int(k), n))
    centroids, labels, dists = lloyd(x, _init(x, k, seed, spread), niter, spread)
    if r > 1 and k > 1:
        for _ in range(resample_steps):
            subset = _nearest_r(labels, dists, k, r, first, spread)
            total = int(_sum(torch.tensor([int(subset.sum())]), spread))
            if total <= k:
                break
            centroids, _, _ = lloyd(x[subset], centroids, niter, spread)
            labels, dists = assign_exact(x, centroids)
    return centroids, labels


def hierarchical_kmeans_dist(
    x: np.ndarray,
    n_clusters: list[int],
    *,
    niter: int = 20,
    resample_steps: int = 10,
    sample_sizes: list[int] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, list[Level]]:
    """Levels bottom-up over this rank's rows `x` (the points of every rank together form the set,
    rank order = row order). Returns (leaf label of this rank's rows, the levels): `levels[0].parent`
    holds this rank's rows only; the levels above are the same on every rank."""
    spread = _world()[1] > 1
    _, n = _offsets(len(x), spread)
    levels: list[Level] = []
    points, local_labels = np.ascontiguousarray(x, dtype=np.float32), None
    for depth, k in enumerate(n_clusters):
        n_points = n if depth == 0 else len(points)
        k = max(1, min(int(k), n_points))
        r = sample_sizes[depth] if sample_sizes else max(1, n_points // k // 2)
        centroids, labels = kmeans_level(
            points,
            k,
            niter=niter,
            resample_steps=resample_steps,
            r=r,
            seed=seed + depth,
            spread=spread and depth == 0,
        )
        if depth == 0:
            local_labels = labels
        levels.append(Level(centroids=centroids, parent=labels))
        points = centroids
        logger.info("level %d: %d clusters (r=%d)", depth + 1, k, r)
    assert local_labels is not None
    return local_labels, levels


def gather_rows(values: np.ndarray) -> np.ndarray:
    """Every rank's rows in rank order (on every rank): the leaf labels for balanced sampling."""
    rank, world = _world()
    if world == 1:
        return values
    n = _gather(torch.tensor([len(values)], dtype=torch.int64), True).ravel()
    padded = torch.zeros(int(n.max()), dtype=torch.int64)
    padded[: len(values)] = torch.from_numpy(values.astype(np.int64))
    got = _gather(padded, True)
    return np.concatenate([got[i, : int(n[i])].numpy() for i in range(world)])
