"""summary.json and report.html: what each step did, and the pictures a person sets thresholds by.

- similarity.png: per pool image, the aligned-copy score of its best candidate (pool and eval
  sets), with the dedup and decontamination thresholds marked, and every verified pair as
  (aligned NCC, worst-patch NCC) with the two-threshold acceptance box;
- clusters.png: leaf-cluster sizes before and after balancing (sorted, log scale);
- duplicates.png (one row per group, keeper first), contaminants.png (pool image | eval image),
  retrieval.png (seed | its retrieved images), cluster_examples.png (one row per cluster).
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pretrain.privacy import pseudonymised_path  # noqa: E402
from pretrain.provenance import provenance  # noqa: E402

logger = logging.getLogger(__name__)

CELL = 64
GAP = 4


def image_grid(
    rows: list[list[np.ndarray]], path: Path, gap_after_first: bool = True
) -> Path | None:
    """Rows of 32x32x3 uint8 thumbnails -> one PNG (first column set apart)."""
    rows = [r for r in rows if len(r)]
    if not rows:
        return None
    width = max(len(r) for r in rows)
    extra = 3 * GAP if gap_after_first else 0
    canvas = Image.new("RGB", (width * (CELL + GAP) + extra, len(rows) * (CELL + GAP)), "white")
    for y, row in enumerate(rows):
        for x, thumb in enumerate(row):
            tile = Image.fromarray(np.asarray(thumb)).resize((CELL, CELL), Image.NEAREST)
            canvas.paste(tile, (x * (CELL + GAP) + (extra if x else 0), y * (CELL + GAP)))
    canvas.save(path)
    return path


def _similarity_plot(results: dict, summaries: dict, n: int, path: Path) -> Path:
    from curation.dedup import Pairs, best_match

    _, near = results["near"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    best, _ = best_match(n, Pairs(near["a"], near["b"], near["view"], near["ncc"], near["local"]))
    bins = np.linspace(0.5, 1.0, 101)
    ax1.hist(
        np.clip(best[best > -1], 0.5, 1), bins=bins, alpha=0.7, label="pool: best candidate in pool"
    )
    _, dec = results["decontam"]
    if len(dec["a"]):
        db = np.full(n, -1.0)
        np.maximum.at(db, dec["a"], dec["ncc"])
        ax1.hist(
            np.clip(db[db > -1], 0.5, 1),
            bins=bins,
            alpha=0.6,
            label="pool: best candidate in eval sets",
        )
    for name, colour in (("near", "red"), ("decontam", "purple")):
        if name in summaries and "threshold" in summaries[name]:
            ax1.axvline(
                summaries[name]["threshold"], color=colour, ls="--", label=f"{name} threshold"
            )
    ax1.set_yscale("symlog", linthresh=1)  # log-like counts; an empty pool (no candidates) is 0
    ax1.set_xlabel("copy score (joint-colour NCC after alignment)")
    ax1.set_ylabel("images")
    ax1.legend(fontsize=8)
    ax2.scatter(near["ncc"], near["local"], s=3, alpha=0.4, label="pool pairs")
    if len(dec["a"]):
        ax2.scatter(
            dec["ncc"], dec["local"], s=3, alpha=0.4, color="purple", label="pool-eval pairs"
        )
    for name, colour in (("near", "red"), ("decontam", "purple")):
        s = summaries.get(name, {})
        if "threshold" in s:
            ax2.axvline(s["threshold"], color=colour, ls="--")
            ax2.axhline(s["local_threshold"], color=colour, ls=":")
    ax2.set_xlim(0.8, 1.0)
    ax2.set_ylim(-1, 1.02)
    ax2.set_xlabel("copy score")
    ax2.set_ylabel("worst-patch NCC")
    ax2.set_title("verified candidate pairs (copies: upper right of the lines)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _cluster_plot(select: dict, path: Path) -> Path | None:
    leaf = select["candidate_leaf"]
    if not len(leaf) or leaf.max() < 0:
        return None
    chosen = np.isin(select["candidates"], select["rows"])
    before = np.sort(np.bincount(leaf))[::-1]
    after = np.bincount(leaf[chosen], minlength=leaf.max() + 1)[np.argsort(np.bincount(leaf))[::-1]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(before, label=f"before ({int(before.sum())} images)")
    ax.plot(after, label=f"after balancing ({int(after.sum())} images)")
    ax.set_yscale("symlog")
    ax.set_xlabel("leaf cluster (sorted by size before)")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _grids(cfg, results: dict, out: Path) -> dict[str, Path | None]:
    pool = results["pool"]
    k = int(cfg.report.examples)
    thumbs = pool.thumbs
    groups = [np.array(g) for g in results["exact_groups"]] + [
        np.array(g) for g in results["near"][0]["data"]["groups"]
    ]
    groups.sort(key=len, reverse=True)
    grids = {
        "duplicates": image_grid(
            [[thumbs[i] for i in g[:k]] for g in groups[:k]], out / "duplicates.png"
        )
    }
    eval_thumbs = {}
    for i, e in enumerate(results["evals"]):
        for j, r in enumerate(e.records):
            eval_thumbs[(pseudonymised_path(cfg.eval_sets[i]), r["key"])] = (i, j)
    rows = []
    for idx, why in list(results["decontam"][0]["data"]["removed"].items())[: 4 * k]:
        at = eval_thumbs.get((why["eval_set"], why["eval_key"]))
        if at is not None:
            rows.append([thumbs[int(idx)], results["evals"][at[0]].thumbs[at[1]]])
    pairs_per_row = 4
    packed = [sum(rows[i : i + pairs_per_row], []) for i in range(0, len(rows), pairs_per_row)]
    grids["contaminants"] = image_grid(packed[:k], out / "contaminants.png", gap_after_first=False)
    select_doc, select = results["select"]
    reasons = select_doc["data"]["reasons"]
    by_seed: dict[str, list[int]] = {}
    for row, why in reasons.items():
        if why.get("reason") == "seed-knn":
            by_seed.setdefault(why["seed"], []).append(int(row))
    seed_thumbs = {r["key"]: s.thumbs[j] for s in results["seeds"] for j, r in enumerate(s.records)}
    grids["retrieval"] = image_grid(
        [
            [seed_thumbs[s], *[thumbs[r] for r in rows_[: k - 1]]]
            for s, rows_ in list(by_seed.items())[:k]
        ],
        out / "retrieval.png",
    )
    leaf, cands = select["candidate_leaf"], select["candidates"]
    rows = []
    if len(leaf) and leaf.max() >= 0:
        sizes = np.bincount(leaf)
        for c in np.argsort(sizes)[::-1][
            np.linspace(0, np.count_nonzero(sizes) - 1, min(k, np.count_nonzero(sizes))).astype(int)
        ]:
            rows.append([thumbs[i] for i in cands[leaf == c][:k]])
    grids["cluster_examples"] = image_grid(
        rows, out / "cluster_examples.png", gap_after_first=False
    )
    return grids


CAPTIONS = {
    "similarity": "Copy scores. Left: best candidate per pool image, thresholds dashed. Right: every verified pair.",
    "clusters": "Leaf-cluster sizes before and after balancing.",
    "duplicates": "Duplicate groups, largest first: the keeper, then the images removed as its copies.",
    "contaminants": "Removed contaminants: pool image, then the eval image it copies (4 pairs per row).",
    "retrieval": "Retrieval: a seed image, then the pool images it retrieved (nearest first).",
    "cluster_examples": "Examples per leaf cluster, from the largest to the smallest cluster.",
}


def write_report(cfg, out: Path, summaries: dict, results: dict, saved_cfg=None) -> dict:
    """Write summary.json, report/*.png and report.html; returns the summary. `saved_cfg`: the
    config as saved beside the output (its sha256 goes into provenance; default `cfg`)."""
    fig_dir = out / "report"
    fig_dir.mkdir(parents=True, exist_ok=True)
    n = len(results["pool"])
    figures = {
        "similarity": _similarity_plot(results, summaries, n, fig_dir / "similarity.png"),
        "clusters": _cluster_plot(results["select"][1], fig_dir / "clusters.png"),
    }
    figures.update(_grids(cfg, results, fig_dir))
    summary = {
        "pool": n,
        "curated": summaries.get("write", {}).get("out"),
        "output_dir": str(out),
        "steps": summaries,
        "provenance": provenance(
            cfg if saved_cfg is None else saved_cfg,
            inputs=[str(cfg.pool), *[str(s) for s in cfg.eval_sets]],
        ),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{s.get('in', '')}</td><td>{s.get('out', '')}</td>"
        f"<td>{s.get('seconds', '')}</td><td><code>{html.escape(json.dumps({k: v for k, v in s.items() if k not in ('in', 'out', 'seconds', 'cluster_sizes')}, default=str)[:400])}</code></td></tr>"
        for name, s in summaries.items()
    )
    images = "".join(
        f"<h2>{name}</h2><p>{html.escape(CAPTIONS[name])}</p><img src='report/{path.name}'>"
        for name, path in figures.items()
        if path is not None
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>curation report</title>"
        f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}"
        f"code{{font-size:80%}}</style></head><body><h1>Curation report</h1>"
        f"<p>pool {n} images &rarr; curated {summary['curated']} ({html.escape(str(out))})</p>"
        f"<table><tr><th>step</th><th>in</th><th>out</th><th>seconds</th><th>details</th></tr>{rows}</table>"
        f"{images}</body></html>"
    )
    (out / "report.html").write_text(page)
    logger.info("report: %s", out / "report.html")
    return summary
