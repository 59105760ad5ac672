"""Steps b and c: exact duplicates by pixel hash, near duplicates by aligned copy matching.

Near duplicates follow DINOv2's copy-detection recipe -- a k-NN graph, edges above a threshold,
connected components, one image kept per component -- with the similarity replaced by one that
measures *copies* rather than *likeness* (see curation/descriptor.py): 81 crop views per image
query a FAISS index of whole-image views (stage 1, cheap, high recall), and the best candidates
are verified by multi-scale template matching (stage 2, precise). An edge needs both the copy
score >= `threshold` and the worst-patch NCC >= `local_threshold` (see descriptor.match_pairs).

`copy_pairs` is shared with decontamination (pool vs eval set). At scale it runs as array tasks:
`part=(i, n)` searches only slice i of the queries against the index of every image, and
`merge_pairs` joins the parts into exactly the pairs one process finds (a query's candidates do not
depend on the other queries, and a pair's verification does not depend on the other pairs).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from curation.descriptor import crop_views, full_views, match_pairs
from curation.index import batches, build_index, copy_index_cfg

logger = logging.getLogger(__name__)

SURE_VIEW = 0.97  # stage-1 view similarity of near-certain copies (few lookalikes reach it)
PREFILTER_MARGIN = (
    0.05  # half-resolution NCC of planted copies was at most 0.046 below full resolution
)


@dataclass
class Pairs:
    """Candidate pairs (a index, b index) with stage-1 view similarity and verified scores."""

    a: np.ndarray
    b: np.ndarray
    view: np.ndarray
    ncc: np.ndarray
    local: np.ndarray

    def copies(self, threshold: float, local_threshold: float) -> np.ndarray:
        return (self.ncc >= threshold) & (self.local >= local_threshold)

    def take(self, rows: np.ndarray) -> Pairs:
        return Pairs(*(getattr(self, f)[rows] for f in PAIR_FIELDS))

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}{f}": getattr(self, f) for f in PAIR_FIELDS}

    @classmethod
    def empty(cls) -> Pairs:
        return cls(
            *(np.zeros(0, np.int64) for _ in "ab"), *(np.zeros(0, np.float32) for _ in "vnl")
        )

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str = "") -> Pairs:
        return cls(*(arrays[f"{prefix}{f}"] for f in PAIR_FIELDS))


PAIR_FIELDS = ("a", "b", "view", "ncc", "local")


def part_rows(n: int, part: tuple[int, int] | None) -> range:
    """Rows of slice i of n (contiguous, a pure function of n and the part), or all rows."""
    if part is None:
        return range(n)
    i, parts = part
    return range(n * i // parts, n * (i + 1) // parts)


def merge_pairs(parts: list[Pairs], n_db: int) -> Pairs:
    """One row per (a, b), the one with the best view similarity, ordered by (a, b): the pairs a
    single process finds, from the pairs of its array tasks."""
    joined = Pairs(*(np.concatenate([getattr(p, f) for p in parts]) for f in PAIR_FIELDS))
    key = joined.a.astype(np.int64) * n_db + joined.b
    order = np.lexsort((-joined.view, key))
    first = np.r_[True, key[order][1:] != key[order][:-1]][: len(key)]
    return joined.take(order[first])


def _best_per_pair(
    q: np.ndarray, d: np.ndarray, s: np.ndarray, n_db: int
) -> tuple[np.ndarray, ...]:
    key = q.astype(np.int64) * n_db + d
    order = np.lexsort((-s, key))
    key, s = key[order], s[order]
    first = np.r_[True, key[1:] != key[:-1]][: len(key)]  # no candidates: nothing to keep
    return key[first] // n_db, key[first] % n_db, s[first]


def _top_per_query(q: np.ndarray, d: np.ndarray, s: np.ndarray, m: int) -> tuple[np.ndarray, ...]:
    """The m best candidates of every query, plus all with a view similarity >= SURE_VIEW (an
    image copied many times must stay linked to every copy, not only to the first m)."""
    order = np.lexsort((-s, q))
    q, d, s = q[order], d[order], s[order]
    rank = np.arange(len(q)) - np.searchsorted(q, q)
    keep = (rank < m) | (s >= SURE_VIEW)
    return q[keep], d[keep], s[keep]


def view_candidates(
    thumbs_q: np.ndarray,
    thumbs_db: np.ndarray,
    *,
    same: bool,
    neighbours: int,
    candidates: int,
    min_similarity: float,
    index_cfg: dict,
    part: tuple[int, int] | None = None,
    batch_size: int = 1024,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stage 1: (query idx, db idx, best view similarity) for db images near a crop of a query
    (the queries of slice `part` only, against every db image)."""
    n_db = len(thumbs_db)
    db = np.concatenate([full_views(thumbs_db[s:e]) for s, e in batches(n_db, 8192)])
    index = build_index(db, progress=progress, **copy_index_cfg(index_cfg, n_db))
    found: list[tuple[np.ndarray, ...]] = []
    rows = part_rows(len(thumbs_q), part)
    starts = range(rows.start, rows.stop, batch_size)
    for s in tqdm(starts, desc="copy candidates", disable=not progress):
        e = min(rows.stop, s + batch_size)
        views = crop_views(thumbs_q[s:e])
        b, v, dim = views.shape
        sims, ids = index.search(views.reshape(-1, dim), min(neighbours + 1, n_db))
        q = np.repeat(np.arange(s, e), v * sims.shape[1])
        d, sims = ids.ravel(), sims.ravel()
        keep = (d >= 0) & (sims >= min_similarity)
        if same:
            keep &= q != d
        q, d, sims = _best_per_pair(q[keep], d[keep], sims[keep], n_db)
        found.append(_top_per_query(q, d, sims, candidates))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    q, d, sims = (np.concatenate(parts) for parts in zip(*found))
    return q, d, sims.astype(np.float32)


def copy_pairs(
    thumbs_q: np.ndarray,
    thumbs_db: np.ndarray | None,
    cfg,
    index_cfg: dict,
    *,
    res_q: np.ndarray | None = None,
    res_db: np.ndarray | None = None,
    part: tuple[int, int] | None = None,
    progress: bool = True,
) -> Pairs:
    """Verified candidate pairs; `thumbs_db=None` means within `thumbs_q` (pairs a < b).

    res_q/res_db: short side of every source image (pairs are compared at the lower one).
    part=(i, n): only the pairs found by slice i of the queries in each direction (merge_pairs)."""
    same = thumbs_db is None
    db = thumbs_q if same else thumbs_db
    if same:
        res_db = res_q
    opts = dict(
        neighbours=int(cfg.neighbours),
        candidates=int(cfg.candidates),
        min_similarity=float(cfg.candidate_min),
        index_cfg=index_cfg,
        part=part,
        progress=progress,
    )
    q, d, s = view_candidates(thumbs_q, db, same=same, **opts)
    if not same:  # a copy may also be a crop of the eval image: query the other way round
        d2, q2, s2 = view_candidates(db, thumbs_q, same=False, **opts)
        q, d, s = np.r_[q, q2], np.r_[d, d2], np.r_[s, s2]
    if same:
        q, d = np.minimum(q, d), np.maximum(q, d)
    q, d, s = _best_per_pair(q, d, s, len(db))
    logger.info("verifying %d candidate pairs by alignment", len(q))
    scores = {"ncc": np.zeros(len(q), np.float32), "local": np.zeros(len(q), np.float32)}
    for st, en in tqdm(list(batches(len(q), 4096)), desc="verify copies", disable=not progress):
        order = slice(st, en)
        got = match_pairs(
            np.asarray(thumbs_q[q[order]]),
            np.asarray(db[d[order]]),
            prefilter=float(cfg.threshold) - PREFILTER_MARGIN,
            res_a=None if res_q is None else res_q[q[order]],
            res_b=None if res_db is None else res_db[d[order]],
        )
        scores["ncc"][order], scores["local"][order] = got["ncc"], got["local"]
    return Pairs(q, d, s, scores["ncc"], scores["local"])


def exact_duplicates(hashes: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Keep mask and groups (keeper first) of identical pixel hashes; keeper = lowest `rank`."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        groups[h].append(i)
    keep = np.ones(len(hashes), bool)
    dup_groups = []
    for members in groups.values():
        if len(members) > 1:
            ordered = np.array(sorted(members, key=lambda i: rank[i]))
            keep[ordered[1:]] = False
            dup_groups.append(ordered)
    return keep, dup_groups


def keeper_rank(keys: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Deterministic preference: most pixels (the original rather than a downscaled copy), then key."""
    order = np.lexsort((keys.astype(str), -pixels.astype(np.int64)))
    rank = np.empty(len(keys), np.int64)
    rank[order] = np.arange(len(keys))
    return rank


def components(
    n: int, a: np.ndarray, b: np.ndarray, rank: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Connected components of the copy graph: keep mask and groups (keeper first, size > 1)."""
    graph = sp.coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = np.lexsort((rank, label))
    label_sorted = label[order]
    starts = np.r_[0, np.nonzero(label_sorted[1:] != label_sorted[:-1])[0] + 1, n]
    keep = np.zeros(n, bool)
    keep[order[starts[:-1]]] = True
    groups = [order[s:e] for s, e in zip(starts[:-1], starts[1:]) if e - s > 1]
    return keep, groups


def best_match(n: int, pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
    """Per image: highest verified NCC among its candidates (-1 if none) and its partner (-1)."""
    best = np.full(n, -1.0, np.float32)
    partner = np.full(n, -1, np.int64)
    for x, y in ((pairs.a, pairs.b), (pairs.b, pairs.a)):
        order = np.argsort(pairs.ncc, kind="stable")
        best[x[order]] = np.maximum(best[x[order]], pairs.ncc[order])
        better = pairs.ncc[order] >= best[x[order]]
        partner[x[order][better]] = y[order][better]
    return best, partner
