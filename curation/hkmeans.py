"""Automatic curation without seeds: hierarchical k-means with resampling + balanced sampling.

Vo et al. 2024 ("Automatic Data Curation for Self-Supervised Learning: A Clustering-Based
Approach"): plain k-means on a long-tailed pool spends its centroids on the dense head (e.g. the
thousands of near-identical chest X-rays of one scanner), so sampling per cluster stays imbalanced.
They (1) cluster hierarchically -- level t clusters the centroids of level t-1 -- and (2) after
each level's k-means, re-run k-means on the union of the r points closest to each centroid
("resampling"), which moves centroids towards a uniform cover of the data support. Then sampling
goes top-down: a cluster's quota is split among its children with one cap found by binary search
(`find_cap`: the largest c with sum(min(size_i, c)) <= quota), so small children give everything
and large ones give the same amount; leaves give random (or closest-to-centroid) members.

Pools up to `exact_max` vectors (100k) are clustered exactly, every level as above. Larger pools
run each level by parts, as Vo et al. split their 10M-cluster level (`_by_parts`): a coarse
k-means cuts the level into parts of about PART_CENTROIDS clusters, the resampled k-means runs
inside each part, and every point then goes to its nearest centroid of any part through
`assign(approximate=True)`. A part's k-means costs its points x 32 centroids, so an iteration
costs N x 32 instead of N x k distances: 1M vectors into 20k clusters take about a minute, where
one exact iteration alone took minutes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from curation.index import assign, kmeans

logger = logging.getLogger(__name__)


@dataclass
class Level:
    """One level: `centroids` (k, d) and `parent` = cluster id of every item of the level below."""

    centroids: np.ndarray
    parent: np.ndarray


def auto_clusters(n: int, levels: int, leaf_size: int = 10, branching: int = 5) -> list[int]:
    """Cluster counts per level: ~leaf_size points per leaf, then `branching` children per parent."""
    counts = []
    k = max(1, n // leaf_size)
    for _ in range(levels):
        counts.append(max(1, min(k, n)))
        k = max(1, k // branching)
    return counts


def _closest(labels: np.ndarray, dists: np.ndarray, k: int, r: int) -> np.ndarray:
    """Indices of the r points nearest to their centroid, in every cluster."""
    order = np.lexsort((dists, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, np.arange(k))
    rank = np.arange(len(order)) - starts[sorted_labels]
    return np.sort(order[rank < r])


# Pools up to this size: exact k-means at every level, as before. Measured on the bench's 100k
# vectors (2000/400/80 clusters): exact 22 s, by parts 3.7 s with a mean squared distance to the
# leaf centroid 5 % higher (0.2096 vs 0.1996); exact grows as N^2 (N x N / leaf size per iteration).
EXACT_MAX_POINTS = 100_000
PART_CENTROIDS = 32  # larger pools: levels of >= 2 x this many clusters run by parts of this many


def _resampled_kmeans(
    points: np.ndarray, k: int, r: int, *, resample_steps: int, niter: int, seed: int, nredo: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-means, then `resample_steps` k-means of the r points closest to each centroid (Vo et al.):
    (centroids, label and squared distance of every point)."""
    centroids = kmeans(points, k, niter=niter, seed=seed, nredo=nredo)
    labels, dists = assign(points, centroids)
    if r > 1 and k > 1:
        for step in range(resample_steps):
            subset = _closest(labels, dists, k, r)
            if len(subset) <= k:
                break
            centroids = kmeans(
                points[subset],
                k,
                niter=niter,
                seed=seed + 1000 * (step + 1),
                init_centroids=centroids,
            )
            labels, dists = assign(points, centroids)
    return centroids, labels, dists


def _share(sizes: np.ndarray, total: int) -> np.ndarray:
    """`total` (<= sizes.sum()) split in proportion to `sizes`, every share in 1..size."""
    exact = sizes * total / sizes.sum()
    share = np.minimum(np.maximum(np.floor(exact), sizes > 0), sizes).astype(np.int64)
    while left := total - int(share.sum()):
        room = share < sizes if left > 0 else share > 1
        order = np.argsort(share - exact if left > 0 else exact - share, kind="stable")
        pick = order[room[order]][: abs(left)]
        share[pick] += np.sign(left)
    return share


def _by_parts(
    points: np.ndarray, k: int, r: int, *, resample_steps: int, niter: int, seed: int, nredo: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_resampled_kmeans` inside each part of a coarse k-means (k / PART_CENTROIDS parts, clusters
    shared in proportion to the points), then every point to its nearest centroid of any part
    (approximately): kept in its own part, 7 % of the points of the 1M bench sat farther from
    their centroid than from one of a neighbouring part (mean squared distance 0.248 vs 0.210).

    The coarse k-means is spherical: Euclidean means of unrelated clusters shrink towards the
    origin and draw in whole regions (one part held 7,331 of the 20k level-2 points of the 1M
    bench), and a part's k-means costs its points x its clusters, both proportional to its size."""
    n_parts = k // PART_CENTROIDS
    part, _ = assign(points, kmeans(points, n_parts, niter=niter, seed=seed, spherical=True))
    members = _members(part, n_parts)
    shares = _share(np.array([len(m) for m in members]), k)
    fits = [
        _resampled_kmeans(
            points[rows],
            int(share),
            r,
            resample_steps=resample_steps,
            niter=niter,
            seed=seed + p,
            nredo=nredo,
        )
        for p, (rows, share) in enumerate(zip(members, shares))
        if share
    ]
    centroids = np.concatenate([c for c, _, _ in fits])
    labels, dists = assign(points, centroids, approximate=True)
    return centroids, labels, dists


def hierarchical_kmeans(
    x: np.ndarray,
    n_clusters: list[int],
    *,
    resample_steps: int = 10,
    sample_sizes: list[int] | None = None,
    niter: int = 20,
    seed: int = 0,
    exact_max: int = EXACT_MAX_POINTS,
) -> list[Level]:
    """Levels bottom-up; `x` are the (normalised) embeddings of the pool (any float dtype,
    memmaps ok: only parts are converted to float32). Past `exact_max` points, levels of at
    least 2 x PART_CENTROIDS clusters run by parts."""
    levels: list[Level] = []
    by_parts = len(x) > exact_max
    points = x
    for depth, k in enumerate(n_clusters):
        k = max(1, min(int(k), len(points)))
        r = sample_sizes[depth] if sample_sizes else max(1, len(points) // k // 2)
        fit = _by_parts if by_parts and k >= 2 * PART_CENTROIDS else _resampled_kmeans
        centroids, labels, _ = fit(
            points,
            k,
            r,
            resample_steps=resample_steps,
            niter=niter,
            seed=seed + depth,
            # upper levels cluster few points: restarts are cheap and make them less seed-dependent
            nredo=1 if depth == 0 else 10,
        )
        sizes = np.bincount(labels, minlength=k)
        logger.info(
            "level %d: %d clusters%s, sizes min %d median %d max %d (r=%d)",
            depth + 1,
            k,
            f" in {k // PART_CENTROIDS} parts" if fit is _by_parts else "",
            sizes.min(),
            int(np.median(sizes)),
            sizes.max(),
            r,
        )
        levels.append(Level(centroids=centroids, parent=labels))
        points = centroids
    return levels


def find_cap(sizes: np.ndarray, target: int) -> int:
    """Largest c with sum(min(sizes, c)) <= target (all of sizes.max() when everything fits)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    if sizes.sum() <= target:
        return int(sizes.max(initial=0))
    lo, hi = 0, int(sizes.max())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.minimum(sizes, mid).sum() <= target:
            lo = mid
        else:
            hi = mid
    return lo


def split_quota(sizes: np.ndarray, target: int, rng: np.random.Generator) -> np.ndarray:
    """Per-child quotas summing to min(target, sum(sizes)), as equal as the sizes allow."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.sum() <= target:
        return sizes.copy()
    cap = find_cap(sizes, target)
    quota = np.minimum(sizes, cap)
    remainder = target - int(quota.sum())
    if remainder:
        larger = np.nonzero(sizes > cap)[0]
        quota[rng.choice(larger, remainder, replace=False)] += 1
    return quota


def _members(parent: np.ndarray, k: int) -> list[np.ndarray]:
    order = np.argsort(parent, kind="stable")
    bounds = np.searchsorted(parent[order], np.arange(k + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(k)]


def balanced_sample(
    levels: list[Level],
    target_size: int,
    *,
    seed: int = 0,
    strategy: str = "random",
    x: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-down balanced sampling; returns (sorted point indices, their leaf cluster ids).

    strategy "random" draws leaf members at random; "closest" takes those nearest their leaf
    centroid (needs `x`).
    """
    if strategy not in ("random", "closest"):
        raise ValueError(f"balance.strategy must be random|closest, got {strategy!r}")
    rng = np.random.default_rng(seed)
    children = [_members(lv.parent, len(lv.centroids)) for lv in levels]
    # number of points under every cluster of every level
    counts = [np.bincount(levels[0].parent, minlength=len(levels[0].centroids))]
    for depth in range(1, len(levels)):
        counts.append(
            np.bincount(
                levels[depth].parent, weights=counts[-1], minlength=len(levels[depth].centroids)
            ).astype(np.int64)
        )
    top = len(levels) - 1
    quotas = split_quota(counts[top], target_size, rng)
    frontier = [(top, c, int(q)) for c, q in enumerate(quotas) if q > 0]
    picked: list[np.ndarray] = []
    leaves: list[np.ndarray] = []
    while frontier:
        depth, cluster, quota = frontier.pop()
        members = children[depth][cluster]
        if depth == 0:
            if strategy == "random":
                chosen = rng.choice(members, quota, replace=False)
            else:
                d = np.linalg.norm(x[members] - levels[0].centroids[cluster], axis=1)
                chosen = members[np.argsort(d, kind="stable")[:quota]]
            picked.append(chosen)
            leaves.append(np.full(len(chosen), cluster, np.int64))
            continue
        sub = split_quota(counts[depth - 1][members], quota, rng)
        frontier.extend((depth - 1, int(c), int(q)) for c, q in zip(members, sub) if q > 0)
    if not picked:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    idx = np.concatenate(picked)
    leaf = np.concatenate(leaves)
    order = np.argsort(idx)
    return idx[order], leaf[order]
