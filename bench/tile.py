"""Slide tiling throughput with 1 and 2 workers on the same synthetic slides, into fresh temp folders.

The slides are built like the tests' (tests/slides.py): the shared IHC image on glass in a pyramidal
TIFF at 0.25 um/px (levels 1, 4, 16), tiled at 0.5 um/px, 256 px (every tile resampled). Prints one
JSON line per setting (slides/s, tiles/s), the speed-up over the first setting, and whether every
setting wrote the same manifest.

    .venv/bin/python bench/tile.py [--slides 4] [--side 8192] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.tile import DEFAULT_CONFIG, tile  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.privacy import SALT_ENV  # noqa: E402
from tests.slides import blank_slide, disk, tissue_texture, write_pyramid  # noqa: E402


def build_slides(root: Path, n: int, side: int, data: Path) -> list[Path]:
    h, w = side * 2 // 3, side
    texture = tissue_texture(data, h, w)
    paths = []
    for i in range(n):
        tissue = disk(h, w, h // 2, w // 2 + (i - n // 2) * side // 16, int(h * 0.4))
        level0 = blank_slide(h, w, seed=i)
        np.copyto(level0, texture, where=tissue[..., None])
        path = root / f"slide-{i:03d}.tif"
        write_pyramid(path, level0, 0.25)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--side", type=int, default=8192, help="level-0 width of a slide")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault(SALT_ENV, "bench-tile-site-key")
    data = Path(os.environ.get("MEDSSL_DATA", REPO.parent / "shared" / "data"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        slides = build_slides(root, args.slides, args.side, data)
        print(
            json.dumps(
                {"built_slides": len(slides), "seconds": round(time.perf_counter() - started, 1)}
            )
        )
        first, manifests = None, set()
        for workers in args.workers:
            out = root / f"out-{workers}"
            cfg = load_config(DEFAULT_CONFIG, None, [f"workers={workers}", "progress=false"])
            cfg.src, cfg.out = [str(p) for p in slides], str(out)
            started = time.perf_counter()
            summary = tile(cfg)
            seconds = time.perf_counter() - started
            manifests.add(hashlib.sha256((out / "manifest.jsonl").read_bytes()).hexdigest())
            first = first or seconds
            print(
                json.dumps(
                    {
                        "workers": workers,
                        "slides_per_s": round(len(slides) / seconds, 3),
                        "tiles_per_s": round(summary["tiles"] / seconds, 1),
                        "tiles": summary["tiles"],
                        "seconds": round(seconds, 2),
                        "speedup": round(first / seconds, 2),
                    }
                )
            )
        print(json.dumps({"same_manifest": len(manifests) == 1}))


if __name__ == "__main__":
    main()
