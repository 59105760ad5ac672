"""Retrieval from seeds, hierarchical balanced sampling, and FAISS index choice."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from omegaconf import OmegaConf

from curation.descriptor import global_descriptor
from curation.hkmeans import (
    auto_clusters,
    balanced_sample,
    find_cap,
    hierarchical_kmeans,
    split_quota,
)
from curation.index import build_index, choose_kind, exact_scores, normalize_rows, search
from curation.plant import medmnist
from curation.retrieve import retrieve
from tests.test_curation_dedup import thumbs_of


@pytest.fixture(scope="module")
def mixed(medssl_data):
    """Descriptors of a mixed pool: 600 chest X-rays, 60 breast ultrasounds, 60 fundi."""
    parts = [
        ("xray", "pneumoniamnist", 600),
        ("us", "breastmnist", 60),
        ("fundus", "retinamnist", 60),
    ]
    emb, mod = [], []
    for name, file, n in parts:
        emb.append(global_descriptor(thumbs_of(medmnist(medssl_data, file, "train", n, seed=3))))
        mod += [name] * n
    return np.concatenate(emb), np.array(mod)


def test_find_cap_and_quota_by_hand():
    sizes = np.array([1, 5, 10])
    assert find_cap(sizes, 12) == 6  # 1 + 5 + 6 = 12
    assert find_cap(sizes, 11) == 5  # 1 + 5 + 5 = 11, 6 would give 12
    assert find_cap(sizes, 100) == 10
    q = split_quota(np.array([2, 9, 9, 9]), 20, np.random.default_rng(0))
    assert q.sum() == 20 and q[0] == 2 and sorted(q[1:].tolist()) == [6, 6, 6]
    q = split_quota(np.array([2, 9, 9, 9]), 21, np.random.default_rng(0))
    assert q.sum() == 21 and sorted(q[1:].tolist()) == [6, 6, 7]


def test_hierarchical_sampling_flattens_an_imbalanced_mixture(mixed):
    emb, mod = mixed
    levels = hierarchical_kmeans(emb, auto_clusters(len(emb), 3), resample_steps=10, seed=0)
    assert [len(lv.centroids) for lv in levels] == auto_clusters(len(emb), 3) == [72, 14, 2]
    picked, leaf = balanced_sample(levels, 180, seed=0)
    assert len(picked) == 180 and len(np.unique(picked)) == 180
    assert np.array_equal(leaf, levels[0].parent[picked])
    share_in = np.mean(mod != "xray")  # 120 / 720 = 0.17
    share_out = np.mean(mod[picked] != "xray")
    rng = np.random.default_rng(0)
    share_random = np.mean(mod[rng.choice(len(mod), 180, replace=False)] != "xray")
    assert share_out >= 0.4 > share_random + 0.1, (share_in, share_out, share_random)
    again, _ = balanced_sample(levels, 180, seed=0)
    assert np.array_equal(picked, again)  # reproducible from the seed


def test_chest_xray_seeds_retrieve_xrays(mixed, medssl_data):
    emb, mod = mixed
    seeds = global_descriptor(
        thumbs_of(medmnist(medssl_data, "pneumoniamnist", "test", 40, seed=4))
    )
    cfg = OmegaConf.create(
        {"sample_k": 4, "cluster": True, "n_clusters": 20, "min_seeds": 3, "per_cluster": 30}
    )
    reasons, info = retrieve(emb, seeds, cfg, {"kind": "flat"}, progress=False)
    rows = np.array(sorted(reasons))
    precision = np.mean(mod[rows] == "xray")
    assert len(rows) >= 100 and precision >= 0.95, (len(rows), precision)
    assert info["sample_based"] > 0 and info["cluster_based"] > 0
    by_knn = [r for r, why in reasons.items() if why["reason"] == "seed-knn"]
    assert all(0 <= reasons[r]["seed"] < 40 and reasons[r]["similarity"] > 0.5 for r in by_knn)


def test_index_kinds_agree_with_exact_search():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(600, 32))  # 600 groups of 5 close vectors: the 5-NN are the group
    x = normalize_rows(np.repeat(centres, 5, 0) + 0.15 * rng.normal(size=(3000, 32))).astype(
        np.float16
    )
    assert (
        choose_kind(10, "auto", flat_max=100) == "flat"
        and choose_kind(1000, "auto", flat_max=100) == "ivf"
    )
    assert choose_kind(30_000_000) == "ivfpq"
    with pytest.raises(ValueError, match="index kind"):
        choose_kind(10, "hnsw")
    flat_s, flat_i = search(build_index(x, kind="flat", progress=False), x[:200], 5, progress=False)
    assert np.all(flat_i[:, 0] == np.arange(200))
    for kind in ("ivf", "ivfpq", "ivfhnsw"):
        # ivfhnsw: 3000 // 64 = 46 lists of ~64 vectors (the default list size), 8 probed
        nlist, nprobe = (None, 8) if kind == "ivfhnsw" else (16, 16)
        index = build_index(x, kind=kind, nlist=nlist, nprobe=nprobe, progress=False)
        if kind == "ivfhnsw":
            assert faiss.extract_index_ivf(index).nlist == 46
        s, i = search(index, x[:200], 5, database=x, progress=False)  # PQ: re-scored exactly
        recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(i, flat_i)])
        assert recall >= 0.9, (kind, recall)
        assert np.allclose(s, flat_s, atol=2e-3 if kind != "ivfpq" else 0.05)
        exact = exact_scores(x, x, np.repeat(np.arange(200), 5), i.ravel())
        assert np.allclose(exact.reshape(200, 5)[:, 0], 1.0, atol=2e-3)


def test_copy_detection_index_is_exact_up_to_copy_flat_max_then_ivfhnsw():
    from curation.index import copy_index_cfg

    cfg = {
        "kind": "auto",
        "flat_max": 10**6,
        "nprobe": 16,
        "copy_flat_max": 1000,
        "copy_nprobe": 24,
    }
    assert copy_index_cfg(cfg, 1000) == {"kind": "flat", "flat_max": 10**6, "nprobe": 16}
    big = copy_index_cfg(cfg, 1001)
    assert big["kind"] == "ivfhnsw" and big["nprobe"] == 24 and big["nlist"] is None
    assert "copy_flat_max" not in big  # build_index takes the result as keyword arguments
