"""Step e: retrieve pool images like the seed (curated target-domain) images, as in LVD-142M.

DINOv2 builds its pretraining set by retrieval from curated seeds: *sample-based* retrieval takes
the k (=4) nearest pool images of every seed image, which follows large seed sets closely;
*cluster-based* retrieval k-means the pool and takes up to M images from every cluster that holds
more than q seed images, which grows small seed sets into whole regions of the pool (e.g. every
chest X-ray cluster, not only the X-rays nearest to the seeds). Every retrieved image records why:
the seed that found it and its similarity, or its cluster.
"""

from __future__ import annotations

import logging

import numpy as np

from curation.index import assign, build_index, kmeans, normalize_rows, search, search_cfg

logger = logging.getLogger(__name__)


def sample_based(
    pool_emb: np.ndarray, seed_emb: np.ndarray, k: int, index_cfg: dict, *, progress: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool row, seed row, cosine) for the k nearest pool images of every seed."""
    if len(pool_emb) == 0 or len(seed_emb) == 0 or k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    index = build_index(pool_emb, progress=progress, **search_cfg(index_cfg))
    sims, ids = search(
        index,
        normalize_rows(seed_emb),
        k,
        database=pool_emb,
        progress=progress,
        desc="seed retrieval",
    )
    seeds = np.repeat(np.arange(len(seed_emb)), ids.shape[1])
    ids, sims = ids.ravel(), sims.ravel()
    ok = ids >= 0
    return ids[ok], seeds[ok], sims[ok]


def cluster_based(
    pool_emb: np.ndarray,
    seed_emb: np.ndarray,
    *,
    n_clusters: int | None,
    min_seeds: int,
    per_cluster: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(pool rows, their cluster ids, info) from clusters holding more than `min_seeds` seeds."""
    n = len(pool_emb)
    if n == 0 or len(seed_emb) == 0:
        return (
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            {"n_clusters": 0, "selected_clusters": []},
        )
    k = int(n_clusters or max(1, round(np.sqrt(n))))
    k = min(k, n)
    x = normalize_rows(pool_emb)
    centroids = kmeans(x, k, seed=seed)
    labels, _ = assign(x, centroids)
    seed_labels, _ = assign(normalize_rows(seed_emb), centroids)
    seeds_per = np.bincount(seed_labels, minlength=k)
    chosen = np.nonzero(seeds_per > min_seeds)[0]
    rng = np.random.default_rng(seed)
    rows, clusters = [], []
    for c in chosen:
        members = np.nonzero(labels == c)[0]
        take = (
            members
            if len(members) <= per_cluster
            else np.sort(rng.choice(members, per_cluster, replace=False))
        )
        rows.append(take)
        clusters.append(np.full(len(take), c, np.int64))
    info = {
        "n_clusters": k,
        "selected_clusters": [int(c) for c in chosen],
        "seeds_per_cluster": {int(c): int(seeds_per[c]) for c in chosen},
        "cluster_sizes": np.bincount(labels, minlength=k).tolist(),
    }
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), info
    return np.concatenate(rows), np.concatenate(clusters), info


def retrieve(
    pool_emb: np.ndarray,
    seed_emb: np.ndarray,
    cfg,
    index_cfg: dict,
    *,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[int, dict], dict]:
    """Union of both retrievals: {pool row: reason} (sample-based wins when both found it), info."""
    reasons: dict[int, dict] = {}
    rows, seeds, sims = sample_based(
        pool_emb, seed_emb, int(cfg.sample_k), index_cfg, progress=progress
    )
    order = np.argsort(-sims, kind="stable")
    for r, s, v in zip(rows[order], seeds[order], sims[order]):
        reasons.setdefault(
            int(r), {"reason": "seed-knn", "seed": int(s), "similarity": round(float(v), 4)}
        )
    n_sample = len(reasons)
    info: dict = {"sample_based": n_sample}
    if cfg.cluster:
        crow, cid, cinfo = cluster_based(
            pool_emb,
            seed_emb,
            n_clusters=cfg.n_clusters,
            min_seeds=int(cfg.min_seeds),
            per_cluster=int(cfg.per_cluster),
            seed=seed,
        )
        for r, c in zip(crow, cid):
            reasons.setdefault(int(r), {"reason": "seed-cluster", "cluster": int(c)})
        info.update(cluster_based=len(crow), **cinfo)
    info["retrieved"] = len(reasons)
    logger.info("retrieved %d pool images (%d by seed k-NN)", len(reasons), n_sample)
    return reasons, info
