"""Large-pool paths of curation/index.py and curation/hkmeans.py, forced on small sets: the k-NN
graph through cells, approximate assignment to many centroids, hierarchical k-means by parts."""

from __future__ import annotations

import numpy as np
import pytest

import curation.index as index
from curation.hkmeans import _share, balanced_sample, hierarchical_kmeans
from curation.index import assign, knn_graph, normalize_rows


def clustered(n: int, dim: int, n_clusters: int, seed: int, spread: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    return normalize_rows(
        centres[rng.integers(0, n_clusters, n)] + spread * rng.normal(size=(n, dim))
    )


@pytest.fixture
def cell_calls(monkeypatch):
    """Counts the searches that went through cells: a forced path that silently fell back to exact
    search would pass the agreement checks without testing anything."""
    calls = []
    real = index.cell_search

    def spy(*args, **kwargs):
        calls.append(kwargs["cells"])
        return real(*args, **kwargs)

    monkeypatch.setattr(index, "cell_search", spy)
    return calls


def test_approximate_assignment_agrees_with_exact(cell_calls):
    x = clustered(12_000, 32, 300, seed=0).astype(np.float16)
    centroids = index.kmeans(x, 1000, niter=5, seed=0)  # 1000 centroids: 125 cells of ~8
    exact_label, exact_dist = assign(x, centroids)
    label, dist = assign(x, centroids, approximate=True)
    assert len(cell_calls) == 1 and len(cell_calls[0].centroids) == 125
    agree = np.mean(label == exact_label)
    assert agree >= 0.95, agree
    # the distance reported is the true one to the centroid chosen, never below the exact nearest
    true = ((x.astype(np.float32) - centroids[label]) ** 2).sum(1)
    assert np.allclose(dist, true, atol=1e-4)
    assert np.all(dist >= exact_dist - 1e-2)
    assert dist.mean() <= 1.02 * exact_dist.mean()


def test_cell_graph_finds_the_duplicates_exact_search_finds(cell_calls):
    rng = np.random.default_rng(1)
    x = clustered(8_000, 64, 80, seed=1)
    planted = rng.choice(len(x), 80, replace=False)  # 1 %: a source plus a little noise
    x[planted] = normalize_rows(x[rng.choice(len(x), 80)] + 0.01 * rng.normal(size=(80, 64)))
    x = x.astype(np.float16)
    sims, ids = knn_graph(x, 8, progress=False)  # 8,000 <= flat_max: exact
    fast_sims, fast_ids = knn_graph(x, 8, flat_max=0, list_size=100, nprobe=2, progress=False)
    assert len(cell_calls) == 1 and len(cell_calls[0].centroids) == 80

    def edges(s, i):
        keep = (s >= 0.95) & (i != np.arange(len(x))[:, None])
        a, b = np.repeat(np.arange(len(x)), i.shape[1])[keep.ravel()], i[keep]
        return set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))

    exact, fast = edges(sims, ids), edges(fast_sims, fast_ids)
    assert len(exact) >= 75  # the planted pairs (sources drawn twice share an edge)
    assert len(exact & fast) / len(exact) >= 0.99 and fast <= exact
    assert np.array_equal(fast_ids[:, 0], np.arange(len(x)))  # every row finds itself first
    both = ids[:, 1] == fast_ids[:, 1]
    assert np.allclose(sims[both, 1], fast_sims[both, 1], atol=1e-5)  # scores stay exact


def test_share_is_proportional_with_one_cluster_per_nonempty_part():
    assert _share(np.array([5, 1, 0, 10]), 8).tolist() == [2, 1, 0, 5]
    assert _share(np.array([5, 1, 0, 10]), 3).tolist() == [1, 1, 0, 1]
    assert _share(np.array([5, 1, 0, 10]), 16).tolist() == [5, 1, 0, 10]
    assert _share(np.array([3, 3, 3]), 4).sum() == 4


def test_hierarchical_kmeans_by_parts_keeps_levels_consistent():
    x = clustered(4_000, 32, 200, seed=2).astype(np.float16)
    counts = [400, 80, 8]  # 400 and 80 run by parts (>= 64 clusters), 8 exactly
    levels = hierarchical_kmeans(x, counts, resample_steps=3, niter=10, exact_max=0)
    exact = hierarchical_kmeans(x, counts, resample_steps=3, niter=10)
    assert [len(lv.centroids) for lv in levels] == counts
    below = [len(x), *counts[:-1]]
    for lv, k, n_below in zip(levels, counts, below):
        assert lv.parent.shape == (n_below,) and 0 <= lv.parent.min() and lv.parent.max() < k
    # parents are the nearest centroid of the level above, for nearly every item
    for lv, items in zip(levels, [x, levels[0].centroids, levels[1].centroids]):
        nearest, _ = assign(items, lv.centroids)
        assert np.mean(nearest == lv.parent) >= 0.95
    xf = x.astype(np.float32)

    def cost(lv):
        return ((xf - lv.centroids[lv.parent]) ** 2).sum(1).mean()

    assert cost(levels[0]) <= 1.1 * cost(exact[0]), (cost(levels[0]), cost(exact[0]))
    picked, leaf = balanced_sample(levels, 500, seed=0)
    assert len(np.unique(picked)) == 500 and np.array_equal(leaf, levels[0].parent[picked])


def test_small_pools_stay_exact():
    x = clustered(2_000, 32, 50, seed=3)
    default = hierarchical_kmeans(x, [100, 20, 4], resample_steps=2, niter=5)
    exact = hierarchical_kmeans(x, [100, 20, 4], resample_steps=2, niter=5, exact_max=10**9)
    parts = hierarchical_kmeans(x, [100, 20, 4], resample_steps=2, niter=5, exact_max=0)
    for a, b in zip(default, exact):
        assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.parent, b.parent)
    assert not np.array_equal(default[0].centroids, parts[0].centroids)
