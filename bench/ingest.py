"""Ingest throughput: the shared data (PneumoniaMNIST, all splits, + the DICOM folder) with 1 and 2
workers, into fresh temp folders. Prints one JSON line per setting (images/s) and checks that both
settings wrote the same manifest.

    .venv/bin/python bench/ingest.py [--workers 1 2] [--shard-size 1000]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.ingest import DEFAULT_CONFIG, ingest  # noqa: E402
from pretrain.config import load_config  # noqa: E402

logger = logging.getLogger(__name__)


def data_root() -> Path:
    return Path(os.environ.get("MEDSSL_DATA", REPO.parent / "shared" / "data"))


def bench(workers: int, shard_size: int, out: Path) -> dict:
    data = data_root()
    cfg = load_config(
        DEFAULT_CONFIG,
        None,
        [f"workers={workers}", f"shard_size={shard_size}", "progress=false", "patient_salt=bench"],
    )
    cfg.src = [str(data / "pneumoniamnist.npz"), str(data / "dicom")]
    cfg.out = str(out)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import webdataset  # noqa: F401 - imported once here so no run pays for it

    manifests = []
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        for workers in args.workers:
            out = Path(tmp) / f"w{workers}"
            print(json.dumps(bench(workers, args.shard_size, out)), flush=True)
            manifests.append((out / "manifest.jsonl").read_text())
    print(json.dumps({"bench": "ingest", "same_manifest": len(set(manifests)) == 1}))


if __name__ == "__main__":
    main()
