"""The adaptation part of report.md: method x label fraction table and the AUROC against
trainable-parameters plot (kept apart so eval/report.py stays about the probes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def adaptation_blocks(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The protocols of `doc` that train through the backbone (finetune, lora, ...)."""
    return {n: b for n, b in doc["protocols"].items() if "adaptation" in b}


def plot_adaptation(doc: dict[str, Any], path: Path) -> Path:
    """Test AUROC against trainable parameters: one colour per method, one marker per label
    fraction, a gray line per fraction through the methods in order of size, and the frozen
    linear probe's headline AUROC as a reference line when it ran."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    markers = ["v", "s", "o", "D", "^", "P"]
    blocks = adaptation_blocks(doc)
    points = [
        (name, m["params"]["fraction"], m["trainable_params"], m["auroc"])
        for name, b in blocks.items()
        for m in b["settings"].values()
        if m.get("auroc") is not None
    ]
    fractions = sorted({p[1] for p in points})
    for j, fraction in enumerate(fractions):
        line = sorted((x, y) for _, f, x, y in points if f == fraction)
        ax.plot(*zip(*line), color="gray", alpha=0.4, lw=1)
        ax.scatter([], [], color="gray", marker=markers[j % len(markers)], label=f"{fraction:.0%}")
    for i, name in enumerate(blocks):
        color = plt.cm.tab10(i % 10)
        for _, fraction, x, y in (p for p in points if p[0] == name):
            marker = markers[fractions.index(fraction) % len(markers)]
            ax.scatter(x, y, color=color, marker=marker, zorder=3)
        ax.scatter([], [], color=color, marker="o", label=name)
    linear = doc["protocols"].get("linear")
    if linear is not None and linear["settings"][linear["best"]].get("auroc") is not None:
        auroc = linear["settings"][linear["best"]]["auroc"]
        ax.axhline(auroc, color="black", ls="--", lw=1, label="frozen linear probe (100 %)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters, head included (log)")
    ax.set_ylabel("test AUROC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", title="labels / method", title_fontsize=7)
    ax.set_title(
        f"Adaptation on {doc['data']['dataset']}: test AUROC vs trainable parameters", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def adaptation_table(doc: dict[str, Any]) -> list[str]:
    """Method x label fraction: AUROC, balanced accuracy, trainable params (share), train time."""
    from eval.report import _fmt  # report.py imports this module: import at call time

    rows = []
    for name, block in adaptation_blocks(doc).items():
        for m in block["settings"].values():
            p = m["params"]
            rows.append(
                (
                    name,
                    f"{p['fraction']:.0%}",
                    "/".join(str(n) for n in p["n_labels"]),
                    _fmt(m, "auroc"),
                    _fmt(m, "balanced_accuracy"),
                    f"{m['trainable_params']:,} ({100 * m['trainable_share']:.2f} %)",
                    f"{m['train_seconds']:.0f}",
                )
            )
    header = (
        "method",
        "labels",
        "n labels (per seed)",
        "test AUROC",
        "test balanced accuracy",
        "trainable params (share of backbone)",
        "train s (per run)",
    )
    from eval.report import _table  # report.py imports this module: import at call time

    return _table(rows, header)


def adaptation_section(doc: dict[str, Any], plots: dict[str, str]) -> list[str]:
    """Markdown lines of the adaptation section (none when no adaptation protocol ran)."""
    if not adaptation_blocks(doc):
        return []
    lines = [
        "",
        f"## Adaptation on {doc['data']['dataset']} (method x label fraction)",
        "",
        "Each run trains through the backbone (frozen except what the method trains; the head "
        "counts as trainable), early-stopped on val AUROC; below 100 % of the labels the "
        "metrics average the seeds (± their spread). Trainable share = trainable parameters / "
        "backbone parameters.",
        "",
        *adaptation_table(doc),
    ]
    if "adaptation" in plots:
        lines += ["", f"![AUROC vs trainable parameters]({plots['adaptation']})"]
    return lines
