"""Weighted k-NN, the DINO protocol (Caron et al. 2021, eval_knn.py).

L2-normalised features, cosine similarity to every training feature, the k most similar vote for
their label with weight exp(similarity / T), T = 0.07. The normalised votes are the class scores
(AUROC); their argmax the prediction. All k share one top-max(k) search: the k nearest are a
prefix of the sorted max(k) nearest. Search: FAISS IndexFlatIP (exact inner product) for large
CPU banks, torch matmul + topk otherwise (GPU when present).
"""

from __future__ import annotations

import logging

from eval.protocols import register
from eval.protocols.base import EvalContext, ProtocolResult, best_setting
from pretrain.components.knn import knn_scores

logger = logging.getLogger(__name__)


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
