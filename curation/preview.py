"""`python -m curation preview DIR`: look at what an ingest produced before training on it.

Draws an evenly spaced sample of the shards as an image grid (a volume as its three orthogonal
middle slices; each image through to_float_image with
its recorded window, so what you see is what the loader gives by default) and counts samples per
modality, split and label, printed and written as JSON beside the PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.shards import decode_sample, iter_shard_records, list_shards
from pretrain.data.volumes import orthogonal_mid_slices
from pretrain.data.windowing import to_float_image, to_float_volume

logger = logging.getLogger(__name__)


class PreviewError(ValueError):
    """Nothing to preview (no shards/manifest) or a bad argument."""


USER_ERRORS = (PreviewError,)


def load_manifest(directory: Path) -> list[dict[str, Any]]:
    """manifest.jsonl when present, else the JSON members of the shards (e.g. curated shards)."""
    manifest = directory / "manifest.jsonl"
    if manifest.is_file():
        return [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    records = []
    for shard in list_shards(directory):
        records += [{**rec, "shard": shard.name} for rec in iter_shard_records(shard)]
    return records


def count_samples(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-modality, per-split, per-label and per-(modality, split, label) counts."""

    def key(value: Any) -> str:
        return "none" if value is None else str(value)

    return {
        "total": len(records),
        "modality": dict(sorted(Counter(key(r.get("modality")) for r in records).items())),
        "split": dict(sorted(Counter(key(r.get("split")) for r in records).items())),
        "label": dict(sorted(Counter(key(r.get("label")) for r in records).items())),
        "modality/split/label": dict(
            sorted(
                Counter(
                    f"{key(r.get('modality'))}/{key(r.get('split'))}/{key(r.get('label'))}"
                    for r in records
                ).items()
            )
        ),
    }


def read_samples(directory: Path, records: list[dict[str, Any]]) -> list[tuple[np.ndarray, dict]]:
    """Decode the given records' samples from their shards (each shard opened once)."""
    wanted: dict[str, set[str]] = {}
    for rec in records:
        wanted.setdefault(rec["shard"], set()).add(rec["key"])
    decoded: dict[str, tuple[np.ndarray, dict]] = {}
    for shard, keys in wanted.items():
        samples: dict[str, dict[str, Any]] = {}
        with tarfile.open(directory / shard) as tf:
            for member in tf:
                key, _, ext = member.name.partition(".")
                if key in keys and member.isfile():
                    samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(member).read()
        for key, sample in samples.items():
            decoded[key] = decode_sample(sample)
    return [decoded[rec["key"]] for rec in records if rec["key"] in decoded]


def make_grid(samples: list[tuple[np.ndarray, dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, math.ceil(math.sqrt(len(samples))))
    rows = max(1, math.ceil(len(samples) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (pixels, record) in zip(axes.flat, samples):
        if isinstance(record.get("volume"), dict):
            image = orthogonal_mid_slices(to_float_volume(pixels, record))[:, :, None]
        else:
            image = to_float_image(pixels, record)
        ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=1)
        label = "" if record.get("label") is None else f" y={record['label']}"
        split = "" if record.get("split") is None else f" {record['split']}"
        ax.set_title(f"{record.get('modality')}{split}{label}", fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def preview(directory: str | Path, out: str | Path | None = None, n: int = 64) -> dict[str, Any]:
    """Write the grid PNG and counts JSON; return the counts."""
    directory = Path(directory)
    records = load_manifest(directory)
    if not records:
        raise PreviewError(f"{directory}: no manifest.jsonl and no shards to preview")
    if n < 1:
        raise PreviewError(f"--n must be >= 1, got {n}")
    out_png = Path(out) if out else directory / "preview.png"
    picks = np.unique(
        np.linspace(0, len(records) - 1, num=min(n, len(records))).round().astype(int)
    )
    make_grid(read_samples(directory, [records[i] for i in picks]), out_png)
    counts = count_samples(records)
    counts_path = out_png.with_suffix(".json")
    counts_path.write_text(json.dumps(counts, indent=2) + "\n")
    logger.info("wrote %s and %s", out_png, counts_path)
    return counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="folder with shards (and manifest.jsonl)")
    parser.add_argument(
        "--out", help="grid PNG path (default DIR/preview.png); counts go beside it"
    )
    parser.add_argument("--n", type=int, default=64, help="number of images in the grid")


def run(args: argparse.Namespace) -> int:
    counts = preview(args.dir, args.out, args.n)
    print(json.dumps(counts, indent=2))
    return 0
