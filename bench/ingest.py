"""Ingest throughput with 1 and 2 workers on the same inputs, into fresh temp folders.

The inputs are the shared data's 2D MedMNIST files (PneumoniaMNIST, BreastMNIST, RetinaMNIST, every
split) plus a folder of `--dicom-copies` copies of each shared DICOM file (CT, MR, multi-frame MR,
ultrasound, NM: a file decode per input, as in a PACS export). Prints one JSON line per setting
(images/s), the speed-up over the first setting, and whether every setting wrote the same manifest
and the same shard bytes.

    .venv/bin/python bench/ingest.py [--workers 1 2] [--shard-size 256] [--dicom-copies 100]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.ingest import DEFAULT_CONFIG, ingest  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.data.shards import list_shards  # noqa: E402
from pretrain.privacy import SALT_ENV  # noqa: E402

logger = logging.getLogger(__name__)
NPZ = ("pneumoniamnist.npz", "breastmnist.npz", "retinamnist.npz")


def data_root() -> Path:
    return Path(os.environ.get("MEDSSL_DATA", REPO.parent / "shared" / "data"))


def dicom_folder(tmp: Path, copies: int) -> Path:
    """`copies` copies of every shared DICOM file (the licence texts stay out)."""
    folder = tmp / "dicom"
    folder.mkdir()
    files = [p for p in sorted((data_root() / "dicom").iterdir()) if p.suffix == ".dcm"]
    for i in range(copies):
        for src in files:
            shutil.copyfile(src, folder / f"{i:05d}_{src.name}")
    return folder


def bench(sources: list[str], workers: int, shard_size: int, out: Path) -> dict:
    cfg = load_config(
        DEFAULT_CONFIG,
        None,
        [f"workers={workers}", f"shard_size={shard_size}", "progress=false"],
    )
    cfg.src, cfg.out = sources, str(out)
    start = time.perf_counter()
    summary = ingest(cfg)
    seconds = time.perf_counter() - start
    return {
        "bench": "ingest",
        "workers": workers,
        "images": summary["ingested"],
        "rejected": summary["rejected"],
        "shards": summary["shards"],
        "seconds": round(seconds, 3),
        "images_per_s": round(summary["ingested"] / seconds, 1),
        "cpus": os.cpu_count(),
    }


def fingerprint(out: Path) -> str:
    h = hashlib.sha256((out / "manifest.jsonl").read_bytes())
    for shard in list_shards(out):
        h.update(shard.read_bytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--dicom-copies", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    os.environ.setdefault(SALT_ENV, "bench-site-key")  # public data: a fixed key
    import webdataset  # noqa: F401 - imported once here so no run pays for it

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        sources = [str(data_root() / name) for name in NPZ]
        sources.append(str(dicom_folder(Path(tmp), args.dicom_copies)))
        rows, prints = [], set()
        for workers in args.workers:
            out = Path(tmp) / f"w{workers}"
            rows.append(bench(sources, workers, args.shard_size, out))
            rows[-1]["speedup"] = round(rows[-1]["images_per_s"] / rows[0]["images_per_s"], 2)
            print(json.dumps(rows[-1]), flush=True)
            prints.add(fingerprint(out))
    print(json.dumps({"bench": "ingest", "same_manifest_and_shards": len(prints) == 1}))


if __name__ == "__main__":
    main()
