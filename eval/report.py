"""metrics.json, metrics.jsonl, report.md and PNG plots of one evaluation run.

metrics.json (schema_version 1):
{
  "schema_version": 1, "created": ISO-8601 time,
  "command": the command line, every path in it as `<path:PSEUDONYM>` (pretrain.provenance),
  "backbone": {"path" (pseudonymised as in "command"), "fingerprint" (sha256 of weights+meta),
               "arch", "num_features", "source"},
  "preprocessing": {"description", ...: what the images went through before the backbone},
  "data": {"dataset", "num_classes", "task": "multiclass"|"multilabel", "ordinal",
           "train"|"val"|"test": {"spec" (pseudonymised), "n", "class_counts"} (val: null when
           not given),
           "confidence_intervals": how the _ci95 were computed},
  "protocols": {PROTOCOL: {
      "best": headline setting name, "selection": how it was chosen,
      "settings": {SETTING: {
          "accuracy", "balanced_accuracy", "auroc", "f1_macro"            (floats, 0..1)
          "<metric>_ci95": [low, high] | null,     "kappa_quadratic"(+_ci95): ordinal only,
          "<metric>_std": spread over seeds/episodes (repeated-run protocols only),
          "auroc_per_label": [..] (multi-label only), "n", "n_groups",
          "val_<select_metric>": the selection score (when selected on val), "params": {...}}},
      "confusion_matrix": [[true x predicted counts]] of the best setting (single-label),
      ...protocol extras (linear: n_heads...; logreg: val_grid; label_efficiency: curve;
         adaptation protocols: "adaptation": {"method", "description", "trainable_params",
         "backbone_params", "head_params", "trainable_share"}, and per setting METHOD@FRACTION
         the same counts plus "train_seconds" (mean per run) and "val_auroc")}},
  "baselines": {"raw": {"preprocessing", "protocols": {...same layout...}}} (raw_baseline set),
  "skipped": {PROTOCOL: why} (an `all` suite member that does not apply, e.g. few-shot on
             multi-label targets),
  "reference": {"dataset", "rows": [{"model", "source", "auroc", "accuracy"}], "sources"} | null,
  "timing_s": {"features": s, PROTOCOL: s, ...}
}
metrics.jsonl: one line per (backbone, protocol, setting) with the same metric fields.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from eval.adaptation_report import adaptation_blocks, adaptation_section, plot_adaptation  # noqa: E402
from eval.metrics import confusion_matrix  # noqa: E402
from eval.protocols.base import EvalContext, ProtocolResult  # noqa: E402
from pretrain.io import atomic_write
from pretrain.privacy import pseudonymised_path

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_REFERENCE = Path(__file__).parent / "configs" / "medmnist_reference.yaml"
TABLE_METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1_macro")


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null means "undefined here" (e.g. one class only)
    return value


def protocol_json(result: ProtocolResult, ctx: EvalContext) -> dict[str, Any]:
    doc = result.to_json()
    if result.best_scores is not None and not ctx.multilabel:
        doc["confusion_matrix"] = confusion_matrix(ctx.test.labels, result.best_scores)
    return doc


def _class_counts(labels: np.ndarray, k: int) -> list[int]:
    if labels.ndim == 2:
        return labels.sum(axis=0).astype(int).tolist()
    return np.bincount(labels, minlength=k).tolist()


def data_json(ctx: EvalContext) -> dict[str, Any]:
    splits = {}
    for name in ("train", "val", "test"):
        fs = getattr(ctx, name)
        splits[name] = (
            None
            if fs is None
            else {
                "spec": pseudonymised_path(ctx.specs[name]),
                "n": len(fs),
                "class_counts": _class_counts(fs.labels, ctx.num_classes),
            }
        )
    unit = "patients" if ctx.test.patients is not None else "images"
    return {
        "dataset": ctx.dataset_name,
        "num_classes": ctx.num_classes,
        "task": "multilabel" if ctx.multilabel else "multiclass",
        "ordinal": ctx.ordinal,
        **splits,
        "confidence_intervals": (
            f"percentile bootstrap over test {unit}, {ctx.cfg.bootstrap.resamples} resamples, "
            f"{1 - ctx.cfg.bootstrap.alpha:.0%}"
        ),
    }


def load_reference(path: str | Path | None, dataset: str) -> dict[str, Any] | None:
    """Reference rows for `dataset` from the YAML (default: the shipped MedMNIST v2 numbers)."""
    ref_path = Path(path) if path else DEFAULT_REFERENCE
    if not ref_path.is_file():
        raise FileNotFoundError(f"reference YAML not found: {ref_path}")
    doc = OmegaConf.to_container(OmegaConf.load(ref_path), resolve=True)
    rows = (doc.get("datasets") or {}).get(dataset)
    if not rows:
        return None
    return {
        "dataset": dataset,
        "file": str(ref_path),
        "rows": rows,
        "sources": doc.get("sources", {}),
    }


def write_metrics(doc: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = atomic_write(out_dir / "metrics.json", json.dumps(_json_safe(doc), indent=2) + "\n")
    with open(out_dir / "metrics.jsonl", "w") as f:
        groups = [("backbone", doc["protocols"])]
        groups += [(name, b["protocols"]) for name, b in doc.get("baselines", {}).items()]
        for backbone, protocols in groups:
            for protocol, block in protocols.items():
                for setting, metrics in block["settings"].items():
                    line = {
                        "backbone": backbone,
                        "protocol": protocol,
                        "setting": setting,
                        "best": setting == block["best"],
                        **metrics,
                    }
                    f.write(json.dumps(_json_safe(line)) + "\n")
    return path


# -- plots ------------------------------------------------------------------------------------
def plot_confusion(matrix: list[list[int]], title: str, path: Path) -> Path:
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(m), 1.0 + 0.6 * len(m)))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(
            j,
            i,
            str(v),
            ha="center",
            va="center",
            color="white" if v > m.max() / 2 else "black",
            fontsize=8,
        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(len(m)))
    ax.set_yticks(range(len(m)))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_label_efficiency(curve: dict[str, list[dict]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("accuracy", "auroc")):
        for method, points in curve.items():
            x = [p["fraction"] * 100 for p in points]
            y = [p[metric] for p in points]
            err = [p.get(f"{metric}_std") or 0.0 for p in points]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        ticks = sorted({p["fraction"] * 100 for points in curve.values() for p in points})
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("training labels used")
        ax.set_ylabel(f"test {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Label efficiency (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_embedding(ctx: EvalContext, path: Path) -> tuple[Path, str]:
    """2-D t-SNE (or PCA) of the test features coloured by label (first label if multi-label)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    cfg = ctx.cfg.embedding
    x = ctx.test.variant(str(cfg.features))
    labels = ctx.test.labels if not ctx.multilabel else ctx.test.labels[:, 0]
    rng = np.random.default_rng(ctx.seed)
    if len(x) > int(cfg.max_points):
        keep = np.sort(rng.choice(len(x), int(cfg.max_points), replace=False))
        x, labels = x[keep], labels[keep]
    x = x - x.mean(axis=0)
    n_comp = min(50, x.shape[1], len(x))
    reduced = PCA(n_components=n_comp, random_state=ctx.seed).fit_transform(x)
    method = str(cfg.method)
    if method == "tsne" and len(x) > 5:
        perplexity = float(min(30, (len(x) - 1) / 3))
        xy = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=ctx.seed
        ).fit_transform(reduced)
    elif method in ("pca", "tsne"):
        method, xy = "pca", reduced[:, :2] if n_comp >= 2 else np.c_[reduced, np.zeros(len(x))]
    else:
        raise ValueError(f"embedding.method must be tsne or pca, got {method!r}")
    fig, ax = plt.subplots(figsize=(5, 4.5))
    sc = ax.scatter(
        xy[:, 0],
        xy[:, 1],
        c=labels,
        cmap="tab10",
        s=8,
        alpha=0.8,
        vmin=0,
        vmax=max(9, int(labels.max())),
    )
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=sc.cmap(sc.norm(c)), label=str(c))
        for c in np.unique(labels)
    ]
    ax.legend(handles=handles, title="label", fontsize=7, loc="best")
    ax.set_title(f"test features ({cfg.features}), {method.upper()}, n={len(x)}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path, method


# -- markdown ---------------------------------------------------------------------------------
def _fmt(m: dict[str, Any], metric: str) -> str:
    value = m.get(metric)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{value:.3f}"
    ci = m.get(f"{metric}_ci95")
    if ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    std = m.get(f"{metric}_std")
    if std is not None:
        text += f" ±{std:.3f}"
    return text


def _metric_columns(ordinal: bool) -> tuple[str, ...]:
    return (*TABLE_METRICS, "kappa_quadratic") if ordinal else TABLE_METRICS


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(doc: dict[str, Any], plots: dict[str, str]) -> str:
    data, cols = doc["data"], _metric_columns(doc["data"]["ordinal"])
    bb = doc["backbone"]
    lines = [
        "# medssl evaluation report",
        "",
        f"- created: {doc['created']}",
        f"- command: `{doc['command']}`",
        f"- backbone: `{bb['path']}` (arch {bb.get('arch')}, {bb.get('num_features')} features, "
        f"fingerprint `{bb['fingerprint'][:16]}`)",
        f"- preprocessing: {doc['preprocessing']['description']}",
        f"- data: {data['dataset']}, {data['num_classes']} classes, {data['task']}"
        f"{', ordinal grades (quadratic kappa)' if data['ordinal'] else ''}",
    ]
    for split in ("train", "val", "test"):
        s = data[split]
        lines.append(
            f"  - {split}: "
            + (
                "not given"
                if s is None
                else f"`{s['spec']}`, n={s['n']}, class counts {s['class_counts']}"
            )
        )
    code = (bb.get("provenance") or {}).get("code") or {}
    if code:
        lines.append(
            f"- backbone trained by {code.get('package')} {code.get('version')} at commit "
            f"{code.get('git_commit') or 'unknown'}; pretraining manifest sha256 "
            + ", ".join(f"`{m}`" for m in bb.get("pretraining_manifests") or [])
        )
    overlap = doc.get("pretraining_overlap") or {}
    found = {k: v for k, v in overlap.items() if k in ("train", "val", "test") and v}
    if found:
        lines.append(
            "- **WARNING: eval images appear in the backbone's pretraining data** (pixel sha256): "
            + ", ".join(f"{n} {split} image(s)" for split, n in found.items())
            + "; those scores are optimistic"
        )
    elif overlap.get("checked"):
        lines.append("- pretraining overlap: no val/test image in the pretraining data")
    elif overlap:
        lines.append(f"- pretraining overlap not checked: {overlap.get('reason')}")
    lines += [
        f"- intervals: {data['confidence_intervals']}",
        "",
        "## Summary (best setting of each protocol)",
        "",
    ]
    rows = []
    for source, protocols in [("backbone", doc["protocols"])] + [
        (name, b["protocols"]) for name, b in doc.get("baselines", {}).items()
    ]:
        for name, block in protocols.items():
            m = block["settings"][block["best"]]
            rows.append((source, name, block["best"], *[_fmt(m, c) for c in cols]))
    lines += _table(rows, ("backbone", "protocol", "setting", *cols))
    for name, why in (doc.get("skipped") or {}).items():
        lines.append(f"\nSkipped {name}: {why}")
    ref = doc.get("reference")
    lines += ["", "## Reference comparison", ""]
    if ref is None:
        lines.append(f"No reference numbers for dataset '{data['dataset']}'.")
    else:
        rrows = [
            (r["model"], r.get("source", ""), *(_ref_value(r, m) for m in ("auroc", "accuracy")))
            for r in ref["rows"]
        ]
        for source, protocols in [("ours", doc["protocols"])] + [
            (name, b["protocols"]) for name, b in doc.get("baselines", {}).items()
        ]:
            for name, block in protocols.items():
                m = block["settings"][block["best"]]
                rrows.append(
                    (
                        f"**{source}: {name} ({block['best']})**",
                        "this run",
                        _fmt(m, "auroc"),
                        _fmt(m, "accuracy"),
                    )
                )
        lines += _table(rrows, ("model", "source", "test AUROC", "test accuracy"))
        lines += [""] + [f"- {k}: {v}" for k, v in ref.get("sources", {}).items()]
    for name, block in doc["protocols"].items():
        lines += [
            "",
            f"## {name}",
            "",
            f"Headline: **{block['best']}** ({block['selection']}).",
            "",
        ]
        settings = block["settings"]
        val_key = next((k for k in next(iter(settings.values())) if k.startswith("val_")), None)
        header = ("setting", *cols) + ((val_key,) if val_key else ())
        srows = []
        for sname, m in settings.items():
            label = f"**{sname}**" if sname == block["best"] else sname
            extra = (f"{m[val_key]:.3f}",) if val_key and m.get(val_key) is not None else ()
            srows.append((label, *[_fmt(m, c) for c in cols], *extra))
        lines += _table(srows, header)
        if f"confusion_{name}" in plots:
            lines += ["", f"![confusion matrix]({plots[f'confusion_{name}']})"]
        if name == "label_efficiency" and "label_efficiency" in plots:
            lines += ["", f"![label efficiency]({plots['label_efficiency']})"]
    lines += adaptation_section(doc, plots)
    if "embedding" in plots:
        lines += [
            "",
            "## Embedding of the test features",
            "",
            f"![embedding]({plots['embedding']})",
        ]
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in doc.get("timing_s", {}).items())
    lines += ["", f"Timing: {timing}", ""]
    return "\n".join(lines)


def _ref_value(row: dict[str, Any], metric: str) -> str:
    """A reference number, or "-" where the source does not give it."""
    value = row.get(metric)
    return "-" if value is None else f"{value:.3f}"


def write_report(
    doc: dict[str, Any],
    results: dict[str, ProtocolResult],
    ctx: EvalContext,
    out_dir: Path,
) -> Path:
    """Plots + report.md (metrics.json must already be in `doc`)."""
    plots: dict[str, str] = {}
    for name, result in results.items():
        matrix = doc["protocols"][name].get("confusion_matrix")
        if matrix is not None:
            title = f"{name} ({result.best}) on test"
            plots[f"confusion_{name}"] = plot_confusion(
                matrix, title, out_dir / f"confusion_{name}.png"
            ).name
        if name == "label_efficiency":
            plot_label_efficiency(result.extras["curve"], out_dir / "label_efficiency.png")
            plots["label_efficiency"] = "label_efficiency.png"
    if adaptation_blocks(doc):
        plots["adaptation"] = plot_adaptation(_json_safe(doc), out_dir / "adaptation.png").name
    try:
        path, _ = plot_embedding(ctx, out_dir / "embedding.png")
        plots["embedding"] = path.name
    except ValueError as exc:
        logger.warning("embedding plot skipped: %s", exc)
    report = out_dir / "report.md"
    report.write_text(render_markdown(_json_safe(doc), plots))
    return report
