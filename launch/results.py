"""One table from many eval jobs: each cell's metrics.json (eval/report.py schema) -> a row.

Rows are (backbone, protocol) with the protocol's headline setting; written as results.json (the
rows), results.csv and results.md in the eval output directory.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from eval.report import load_reference
from pretrain.backbones import CONFIG_FILENAME, find_export, is_export_dir, refresh_model_card
from pretrain.privacy import pseudonymised_path

logger = logging.getLogger(__name__)

METRICS = ("accuracy", "balanced_accuracy", "auroc", "f1_macro")


def rows_from_metrics(doc: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """One row per protocol in one metrics.json: the headline (`best`) setting's metrics."""
    rows = []
    for protocol, result in sorted(doc.get("protocols", {}).items()):
        best = result["best"]
        setting = result["settings"][best]
        row: dict[str, Any] = {
            "backbone": label,
            "protocol": protocol,
            "setting": best,
            "dataset": doc.get("data", {}).get("dataset"),
            "n_test": setting.get("n"),
        }
        for metric in METRICS:
            row[metric] = setting.get(metric)
            ci = setting.get(f"{metric}_ci95")
            row[f"{metric}_ci95"] = list(ci) if ci else None
        rows.append(row)
    return rows


def _fmt(value: Any, ci: Any = None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    text = f"{value:.4f}"
    if ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def _add_to_model_card(backbone: str, rows: list[dict[str, Any]]) -> None:
    """The evaluation table goes into the model card of a medssl export (others are left alone)."""
    try:
        target = find_export(Path(backbone))
    except (FileNotFoundError, OSError):
        return
    if target.name == CONFIG_FILENAME and is_export_dir(target.parent):
        refresh_model_card(target.parent, rows)
        logger.info("model card %s now holds the evaluation table", target.parent / "README.md")


def by_dataset_table(rows: list[dict[str, Any]], datasets: list[str]) -> str:
    """One backbone per row, one dataset per column, for each protocol: AUROC / accuracy of the
    headline setting, then the published reference numbers of those datasets (the anchors a
    foundation model is judged against)."""
    text = "## By dataset (AUROC / accuracy)\n\n"
    header = "| backbone | " + " | ".join(datasets) + " |\n|" + "---|" * (1 + len(datasets)) + "\n"
    for protocol in dict.fromkeys(row["protocol"] for row in rows):
        cells: dict[str, dict[str, str]] = {}
        for row in rows:
            if row["protocol"] == protocol:
                value = f"{_fmt(row['auroc'])} / {_fmt(row['accuracy'])}"
                cells.setdefault(row["backbone"], {})[str(row["dataset"])] = value
        text += f"**{protocol}**\n\n" + header
        for backbone, values in cells.items():
            text += f"| {backbone} | " + " | ".join(values.get(d, "-") for d in datasets) + " |\n"
        text += "\n"
    references: dict[str, dict[str, str]] = {}
    for dataset in datasets:
        ref = load_reference(None, dataset)
        for ref_row in (ref or {}).get("rows", []):
            value = f"{_fmt(ref_row.get('auroc'))} / {_fmt(ref_row.get('accuracy'))}"
            references.setdefault(str(ref_row["model"]), {})[dataset] = value
    if references:
        text += "**reference** (eval/configs/medmnist_reference.yaml, its sources)\n\n" + header
        for model, values in references.items():
            text += f"| {model} | " + " | ".join(values.get(d, "-") for d in datasets) + " |\n"
        text += "\n"
    return text


def gather_eval_table(out: str | Path, cells: list[dict[str, str]]) -> dict[str, str]:
    """Read every cell's metrics.json (failing with the cell's name when one is missing)."""
    out = Path(out)
    rows: list[dict[str, Any]] = []
    missing = []
    for cell in cells:
        path = Path(cell["out"]) / "metrics.json"
        if not path.is_file():
            missing.append(f"{cell['label']}/{cell['protocol']} ({path})")
            continue
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        for row in rows_from_metrics(doc, cell["label"]):
            row["dataset"] = cell.get("dataset") or row["dataset"]
            row["backbone_path"] = pseudonymised_path(cell["backbone"])
            row["metrics_json"] = str(path)
            rows.append(row)
    if missing:
        raise FileNotFoundError("eval cells without metrics.json: " + "; ".join(missing))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    columns = ["backbone", "protocol", "setting", "dataset", "n_test", *METRICS]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row[c] for c in columns])
    datasets = list(dict.fromkeys(str(row["dataset"]) for row in rows))
    several = len(datasets) > 1
    lines = [
        "| "
        + ("dataset | " if several else "")
        + "backbone | protocol | setting | "
        + " | ".join(METRICS)
        + " |",
        "|" + "---|" * (3 + several + len(METRICS)),
    ]
    for row in rows:
        metrics = " | ".join(_fmt(row[m], row[f"{m}_ci95"]) for m in METRICS)
        first = f"{row['dataset']} | " if several else ""
        lines.append(
            f"| {first}{row['backbone']} | {row['protocol']} | {row['setting']} | {metrics} |"
        )
    summary = by_dataset_table(rows, datasets) if several else ""
    (out / "results.md").write_text(
        "# Evaluation results\n\n"
        + summary
        + "Headline setting of each protocol; [95 % bootstrap CI].\n\n"
        + "\n".join(lines)
        + "\n"
    )
    logger.info("gathered %d rows into %s", len(rows), out / "results.md")
    for cell in {c["backbone"]: c for c in cells}.values():  # labels are unique per backbone
        _add_to_model_card(cell["backbone"], [r for r in rows if r["backbone"] == cell["label"]])
    return {name: str(out / name) for name in ("results.json", "results.csv", "results.md")}
