"""FAISS nearest-neighbour search and k-means over (memory-mapped, float16) embeddings.

Why one module: every curation step (copy detection, decontamination, retrieval, clustering) asks
the same two questions -- "who is near this vector?" and "which centroid owns it?" -- at sizes from
a few hundred test images to billions (DINOv2's LVD-142M). The index is chosen by size:

- `flat`  exact inner product, for pools up to `flat_max` vectors (default 1M: 1.5 GB at 384-d);
- `ivf`   inverted lists with float16 scalar-quantised vectors (half the memory, near-exact scores);
- `ivfpq` inverted lists with product quantisation (billion scale; scores approximate);
- `ivfhnsw` inverted lists of exact vectors, about `list_size` per list, found through an HNSW graph
  over the list centroids: a query costs about the same at every N (log N to find the lists, then
  nprobe x list_size comparisons), so a search of all N vectors grows as N log N. Copy detection
  (81 query views per image) uses it past `copy_flat_max` images (see `copy_index_cfg`).

Two jobs touch *every* vector: the k-NN graph of the whole pool (near duplicates) and the
assignment of every vector to one of many k-means centroids. Both run through `Cells`, an
inverted file scanned by matrix products: the database cut by k-means into cells of about
`list_size` rows, and the queries of each cell compared with its rows by one BLAS product rather
than one query at a time (`knn_graph`, `assign(..., approximate=True)`). A query costs N /
list_size comparisons to find its `nprobe` cells (one matrix product with the cell centroids)
plus nprobe x list_size in them: at 1M vectors 1,953 + 1,024, so the whole graph grows about as
N (1 + N / 2M). On the bench's 100k vectors it took 5.9 s where FAISS's HNSWFlat (M 16, efSearch
32) took 16.9 s at planted-duplicate recall 0.967 and `ivfhnsw` 38.6 s (the installed FAISS runs
its generic, non-SIMD build, which slows graph walks and list scans but not BLAS).

Vectors are L2-normalised, so inner product = cosine similarity. Inputs may be float16 memmaps:
they are converted to float32 in batches, never as a whole, so 10M x 384 float16 (7.7 GB) fits a
24 GiB machine. The GPU is used only when `faiss.get_num_gpus() > 0` (faiss-gpu installed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq", "ivfhnsw")


def batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = as_f32(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def gpu_enabled(use_gpu: bool | str = "auto") -> bool:
    if use_gpu is False or use_gpu == "false":
        return False
    available = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    if use_gpu is True and not available:
        logger.warning("index.gpu=true but faiss sees no GPU; using the CPU")
    return bool(available)


def choose_kind(
    n: int, kind: str = "auto", flat_max: int = 1_000_000, pq_min: int = 20_000_000
) -> str:
    """Exact search while it is affordable; compressed inverted lists beyond."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
    if kind != "auto":
        return kind
    if n <= flat_max:
        return "flat"
    return "ivf" if n < pq_min else "ivfpq"


COPY_KEYS = ("copy_flat_max", "copy_nprobe")  # index settings of copy detection only


def search_cfg(index_cfg: dict) -> dict:
    """`build_index` keyword arguments of the index section (without the copy-detection keys)."""
    return {k: v for k, v in index_cfg.items() if k not in COPY_KEYS}


def copy_index_cfg(index_cfg: dict, n: int) -> dict:
    """The index of copy detection's stage 1 (N database views, 81 query views per image): exact
    (flat) up to `copy_flat_max` images, then `ivfhnsw`, whose cost per query does not grow with N
    (measured recall of planted copies and seconds per size: docs/benchmarks.md)."""
    cfg = search_cfg(index_cfg)
    if n <= int(index_cfg.get("copy_flat_max", 20_000)):
        return {**cfg, "kind": "flat"}
    return {
        **cfg,
        "kind": "ivfhnsw",
        "nlist": None,
        "nprobe": int(index_cfg.get("copy_nprobe", 16)),
    }


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) lists (FAISS guideline), at least 1 and at most N / 39 (training needs >= 39/list)."""
    return int(max(1, min(4 * math.sqrt(n), n // 39)))


def _pq_m(d: int, requested: int | None) -> int:
    if requested:
        if d % requested:
            raise ValueError(f"index.pq_m={requested} must divide the dimension {d}")
        return requested
    for m in (64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1):
        if d % m == 0 and d // m >= 4:
            return m
    return 1


def build_index(
    vectors: np.ndarray,
    *,
    kind: str = "auto",
    flat_max: int = 1_000_000,
    nlist: int | None = None,
    pq_m: int | None = None,
    nprobe: int = 16,
    use_gpu: bool | str = "auto",
    batch_size: int = 65536,
    seed: int = 0,
    progress: bool = True,
    list_size: int = 64,
) -> faiss.Index:
    """Inner-product index over the rows of `vectors` (normalised; any float dtype, memmaps ok)."""
    n, d = vectors.shape
    kind = choose_kind(n, kind, flat_max)
    if kind == "flat":
        index: faiss.Index = faiss.IndexFlatIP(d)
    else:
        if kind == "ivfhnsw":
            lists = nlist or max(1, min(n // list_size, n // 39))
            spec = f"IVF{lists}_HNSW32,Flat"
        else:
            lists = nlist or default_nlist(n)
            nbits = 8 if n >= 256 * 64 else 4  # 256 codes per sub-quantiser need enough points
            pq = f"PQ{_pq_m(d, pq_m)}x{nbits}"
            spec = f"IVF{lists},SQfp16" if kind == "ivf" else f"IVF{lists},{pq}"
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        n_train = min(n, max(64 * lists, 10_000))  # FAISS wants 39..256 points per list
        train = as_f32(vectors[np.sort(rng.choice(n, n_train, replace=False))])
        logger.info("training %s on %d of %d vectors", spec, n_train, n)
        index.train(train)
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(nprobe, lists)
        if kind == "ivfhnsw":  # the graph must return at least nprobe lists
            faiss.downcast_index(ivf.quantizer).hnsw.efSearch = max(64, 2 * nprobe)
    if gpu_enabled(use_gpu):
        try:
            index = faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError) as exc:  # e.g. a quantiser the GPU build lacks
            logger.warning("keeping the %s index on the CPU: %s", kind, exc)
    for s, e in tqdm(
        list(batches(n, batch_size)),
        desc=f"index add ({kind})",
        disable=not progress or n < 4 * batch_size,
    ):
        index.add(as_f32(vectors[s:e]))
    return index


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    database: np.ndarray | None = None,
    refine: int = 4,
    batch_size: int = 16384,
    progress: bool = True,
    desc: str = "search",
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows per query (similarity float32, index int64; -1 where fewer exist).

    With `database` (the indexed vectors, e.g. a memmap) and a product-quantised index, `refine`
    x k candidates are re-scored exactly, so thresholds keep their meaning at any scale."""
    n = len(queries)
    k = max(1, min(k, index.ntotal))
    approximate = database is not None and "PQ" in type(faiss.downcast_index(_cpu(index))).__name__
    kk = min(index.ntotal, k * refine) if approximate else k
    sims = np.empty((n, k), np.float32)
    ids = np.empty((n, k), np.int64)
    for s, e in tqdm(
        list(batches(n, batch_size)), desc=desc, disable=not progress or n <= batch_size
    ):
        q = as_f32(queries[s:e])
        d, i = index.search(q, kk)
        if approximate:
            rows = np.repeat(np.arange(e - s), kk)
            exact = exact_scores(q, database, rows, np.maximum(i.ravel(), 0)).reshape(e - s, kk)
            exact[i < 0] = -np.inf
            top = np.argsort(-exact, axis=1)[:, :k]
            d, i = np.take_along_axis(exact, top, 1), np.take_along_axis(i, top, 1)
        sims[s:e], ids[s:e] = d, i
    return sims, ids


def _cpu(index: faiss.Index) -> faiss.Index:
    ivf = faiss.try_extract_index_ivf(index) if hasattr(faiss, "try_extract_index_ivf") else None
    return ivf if ivf is not None else index


def exact_scores(
    a: np.ndarray, b: np.ndarray, rows: np.ndarray, cols: np.ndarray, batch_size: int = 262144
) -> np.ndarray:
    """Exact cosine of pairs (a[rows], b[cols]): re-scores approximate (PQ) search results."""
    out = np.empty(len(rows), np.float32)
    for s, e in batches(len(rows), batch_size):
        out[s:e] = np.einsum("ij,ij->i", as_f32(a[rows[s:e]]), as_f32(b[cols[s:e]]))
    return out


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    init_centroids: np.ndarray | None = None,
    nredo: int = 1,
    use_gpu: bool | str = "auto",
    spherical: bool = False,
) -> np.ndarray:
    """Euclidean k-means centroids (k, d) float32; FAISS trains on at most 256 points per centroid.
    `spherical`: unit-norm centroids (cosine k-means)."""
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k}, n={n}")
    rng = np.random.default_rng(seed)
    n_train = min(n, k * max_points_per_centroid)
    sample = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        gpu=gpu_enabled(use_gpu),
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,
        nredo=1 if init_centroids is not None else nredo,
        spherical=spherical,
        verbose=False,
    )
    km.train(
        as_f32(sample), init_centroids=None if init_centroids is None else as_f32(init_centroids)
    )
    return np.asarray(km.centroids, dtype=np.float32).reshape(k, d)


GRAPH_FLAT_MAX = 20_000  # knn_graph: exact (flat) search up to this many vectors, then cells
GRAPH_LIST_SIZE = 512  # knn_graph cells: database rows per cell ...
GRAPH_NPROBE = 2  # ... and cells searched per query
# approximate assignment: centroids per cell and cells searched per row. Measured on the 1M bench
# (20k leaf centroids): 8 / 16 agree with exact on 99.6 % of the rows (mean distance +0.4 %) in
# 35 s; 16 / 16 99.3 % (+1.7 %) in 29 s; 16 / 8 98.6 % (+4.7 %) in 16 s; exact takes ~70 s.
ASSIGN_LIST_SIZE = 8
ASSIGN_NPROBE = 16
CELL_TRAIN_POINTS = 32  # the cells' k-means trains on at most this many points per cell
BLOCK = 1 << 23  # floats gathered or scored per step (32 MB)


def assign(
    x: np.ndarray, centroids: np.ndarray, batch_size: int = 65536, *, approximate: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of every row: (cluster id int64, squared distance float32).
    `approximate`: see `nearest`."""
    dists, ids = nearest(x, centroids, 1, approximate=approximate, batch_size=batch_size)
    return ids[:, 0], dists[:, 0]


def nearest(
    x: np.ndarray,
    centroids: np.ndarray,
    k: int,
    *,
    approximate: bool = False,
    batch_size: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest centroids (L2) of every row: (squared distances float32, ids int64), nearest first.

    `approximate`, for tens of thousands of centroids (the exact assignment of a million rows to
    50k centroids takes minutes): the rows are cut into cells by a k-means of their own (one cell
    per ASSIGN_LIST_SIZE centroids), every centroid joins the cell nearest to it, and a row
    searches the centroids of its ASSIGN_NPROBE nearest cells. Cells come from the rows, not from
    the centroids: a mean of many unrelated centroids would say little about where a row belongs."""
    k = min(k, len(centroids))
    if approximate and len(centroids) > ASSIGN_LIST_SIZE * ASSIGN_NPROBE:
        coarse = kmeans(
            x,
            min(len(x), len(centroids) // ASSIGN_LIST_SIZE),
            niter=10,
            max_points_per_centroid=CELL_TRAIN_POINTS,
            spherical=True,
        )
        return cell_search(
            x,
            centroids,
            k,
            cells=make_cells(centroids, coarse),
            nprobe=ASSIGN_NPROBE,
            l2=True,
            progress=False,
        )
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(as_f32(centroids))
    dists = np.empty((len(x), k), np.float32)
    ids = np.empty((len(x), k), np.int64)
    for s, e in batches(len(x), batch_size):
        dists[s:e], ids[s:e] = index.search(as_f32(x[s:e]), k)
    return dists, ids


@dataclass
class Cells:
    """Database rows grouped by their nearest cell centroid: an inverted file that is scanned by
    matrix products, one per cell and block of the queries that search it, rather than one query
    at a time."""

    centroids: np.ndarray  # (cells, d) float32
    probes: np.ndarray  # (n, nprobe) nearest cells of every database row, its own cell first
    order: np.ndarray  # database rows sorted by cell; cell c holds order[bounds[c]:bounds[c + 1]]
    bounds: np.ndarray


def _group(labels: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by label and where each label starts (bounds[g]:bounds[g + 1])."""
    order = np.argsort(labels, kind="stable")
    return order, np.searchsorted(labels[order], np.arange(n_groups + 1))


def make_cells(database: np.ndarray, centroids: np.ndarray, nprobe: int = 1) -> Cells:
    """Cells of `database` around `centroids`, keeping the `nprobe` nearest cells of every row
    (for searching the database against itself)."""
    probes = nearest(database, centroids, nprobe)[1]
    order, bounds = _group(probes[:, 0], len(centroids))
    return Cells(centroids, probes, order, bounds)


def build_cells(database: np.ndarray, list_size: int, nprobe: int = 1, *, seed: int = 0) -> Cells:
    """About len(database) / list_size cells of unit vectors from a spherical k-means of a
    subsample (CELL_TRAIN_POINTS per cell: cells need to be compact, not optimal). Spherical:
    Euclidean centroids of unrelated clusters shrink towards the origin and become hubs (one cell
    of 18k rows where 512 were asked, on the bench's 1M vectors); unit centroids stay balanced."""
    centroids = kmeans(
        database,
        max(1, len(database) // list_size),
        niter=10,
        seed=seed,
        max_points_per_centroid=CELL_TRAIN_POINTS,
        spherical=True,
    )
    return make_cells(database, centroids, nprobe)


def _topk(score: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest scores of every row, largest first, with their ids."""
    top = np.argpartition(-score, k - 1, axis=1)[:, :k]
    rank = np.argsort(-np.take_along_axis(score, top, 1), axis=1, kind="stable")
    top = np.take_along_axis(top, rank, 1)
    return np.take_along_axis(score, top, 1), np.take_along_axis(ids, top, 1)


def cell_search(
    queries: np.ndarray,
    database: np.ndarray,
    k: int,
    *,
    cells: Cells,
    nprobe: int,
    query_probes: np.ndarray | None = None,
    l2: bool = False,
    progress: bool = True,
    desc: str = "cell search",
) -> tuple[np.ndarray, np.ndarray]:
    """k best database rows of every query among the rows of its `nprobe` nearest cells:
    (inner products, largest first, or with `l2` squared distances, smallest first; ids, -1
    where fewer exist). `query_probes`: the queries' cells when known (`cells.probes` when the
    database searches itself). Scores are exact; only rows in farther cells are missed."""
    (n, dim), n_cells = queries.shape, len(cells.centroids)
    if query_probes is None:
        query_probes = nearest(queries, cells.centroids, nprobe)[1]
    probes = query_probes[:, :nprobe]
    order, bounds = _group(probes.ravel(), n_cells)
    metric, sign = (faiss.METRIC_L2, -1) if l2 else (faiss.METRIC_INNER_PRODUCT, 1)
    best = np.full((n, k), -np.inf, np.float32)  # l2: minus the distance, larger is nearer
    ids = np.full((n, k), -1, np.int64)
    for c in tqdm(np.nonzero(np.diff(bounds))[0], desc=desc, disable=not progress):
        rows = order[bounds[c] : bounds[c + 1]] // probes.shape[1]  # the queries searching c
        members = np.sort(cells.order[cells.bounds[c] : cells.bounds[c + 1]])
        for ms, me in batches(len(members), max(1, BLOCK // dim)):
            cols = members[ms:me]
            d = as_f32(database[cols])
            for s, e in batches(len(rows), max(1, BLOCK // dim)):
                r = rows[s:e]
                got_s, got_i = faiss.knn(as_f32(queries[r]), d, min(k, len(cols)), metric=metric)
                best[r], ids[r] = _topk(
                    np.concatenate([best[r], sign * got_s], 1),
                    np.concatenate([ids[r], cols[got_i]], 1),
                    k,
                )
    return sign * best, ids


def knn_graph(
    x: np.ndarray,
    k: int,
    *,
    flat_max: int = GRAPH_FLAT_MAX,
    list_size: int = GRAPH_LIST_SIZE,
    nprobe: int = GRAPH_NPROBE,
    seed: int = 0,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows of every row of `x` (itself included): (cosine, largest first; ids).

    Exact up to `flat_max` rows. Beyond, through `Cells`: a row is compared with the rows of its
    `nprobe` nearest cells of ~`list_size` rows (scores exact, farther rows missed). Near
    duplicates almost always share a cell: all 1,001 planted-duplicate edges of a 1,000-row
    sample of the 1M bench were found (`python bench/curation.py speed`)."""
    if len(x) <= flat_max:
        index = build_index(x, kind="flat", progress=progress)
        return search(index, x, k, progress=progress, desc="k-NN graph")
    cells = build_cells(x, list_size, nprobe, seed=seed)
    return cell_search(
        x,
        x,
        k,
        cells=cells,
        nprobe=nprobe,
        query_probes=cells.probes,
        progress=progress,
        desc="k-NN graph",
    )
