"""Distributed hierarchical k-means: three gloo ranks, each holding a slice of the points, give
bit-for-bit the centroids and clusters of one process; the clusters are real clusters."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import adjusted_rand_score

from curation.dkmeans import gather_rows, hierarchical_kmeans_dist

COUNTS = [12, 3]
SLICES = [0, 170, 171, 400]  # uneven slices, one of a single row


def _points() -> tuple[np.ndarray, np.ndarray]:
    """400 points around 12 well-separated centres (float16, as curation stores embeddings)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 16)) * 4
    truth = rng.integers(0, 12, 400)
    x = centres[truth] + rng.normal(size=(400, 16)) * 0.3
    return x.astype(np.float16), truth


def _rank(rank: int, port: int, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    x, _ = _points()
    mine = x[SLICES[rank] : SLICES[rank + 1]]
    labels, levels = hierarchical_kmeans_dist(mine, COUNTS, niter=8, resample_steps=3, seed=5)
    every = gather_rows(labels)
    if rank == 0:
        np.savez(
            out, labels=every, c0=levels[0].centroids, c1=levels[1].centroids, p1=levels[1].parent
        )
    dist.destroy_process_group()


def test_three_ranks_give_the_clusters_of_one_process(tmp_path):
    x, truth = _points()
    labels, levels = hierarchical_kmeans_dist(x, COUNTS, niter=8, resample_steps=3, seed=5)
    # real clusters (random init, as FAISS's: a local optimum, far from chance's ARI of 0)
    assert adjusted_rand_score(truth, labels) > 0.6
    assert len(levels[0].centroids) == 12 and len(levels[1].centroids) == 3
    assert levels[1].parent.shape == (12,) and set(levels[1].parent.tolist()) <= {0, 1, 2}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ranks.npz")
    mp.start_processes(_rank, args=(port, out), nprocs=3, start_method="spawn", join=True)
    got = np.load(out)
    np.testing.assert_array_equal(got["labels"], labels)
    np.testing.assert_array_equal(got["c0"], levels[0].centroids)  # bit for bit
    np.testing.assert_array_equal(got["c1"], levels[1].centroids)
    np.testing.assert_array_equal(got["p1"], levels[1].parent)
