"""Step g: write the curated set as shards + manifest.jsonl, keeping source keys and pixels.

Samples are copied byte for byte from the pool shards (lossless, no re-encoding); only the JSON
record gains a `curation` entry saying why the image is in the set (kept, retrieved by which seed
and with what similarity, from which cluster). A pool given as .npz or an image folder is
re-encoded with the shard format's encoder instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from curation.embed import Embedded
from pretrain.data.datasets import open_dataset
from pretrain.data.shards import ShardWriter, encode_sample

logger = logging.getLogger(__name__)


def _raw_sample(record: dict, fds: dict[str, int]) -> dict:
    path = record["shard"]
    if path not in fds:
        fds[path] = os.open(path, os.O_RDONLY)
    sample = {"__key__": record["key"]}
    for ext, (offset, size) in record["members"].items():
        sample[ext] = os.pread(fds[path], size, offset)
    return sample


def write_curated(
    cfg: DictConfig, pool: Embedded, rows: np.ndarray, reasons: dict[str, dict], out: Path
) -> int:
    """Write pool rows (in pool order) to out/shard-*.tar + out/manifest.jsonl; returns the count."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    size = max(1, int(cfg.write.shard_size))
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    needs_decode = any("shard" not in pool.records[int(r)] for r in rows)
    dataset = open_dataset(str(cfg.pool)) if needs_decode else None
    fds: dict[str, int] = {}
    writer: ShardWriter | None = None
    lines: list[str] = []
    try:
        for n, row in enumerate(tqdm(rows, desc="write curated", disable=not cfg.progress)):
            if n % size == 0:
                if writer is not None:
                    writer.commit()
                writer = ShardWriter(tmp, n // size)
            rec = pool.records[int(row)]
            why = reasons[str(int(row))]
            if dataset is None:
                sample = _raw_sample(rec, fds)
                record = json.loads(sample["json"])
            else:
                pixels, record = dataset.load(int(row))
                record = {**record, "key": rec["key"], "sha256": rec["sha256"]}
                sample = encode_sample(rec["key"].replace(".", "_"), pixels, record)
                record = json.loads(sample["json"])
            record["curation"] = why
            sample["json"] = json.dumps(record).encode()
            writer.write(sample)
            lines.append(json.dumps({**record, "shard": writer.path.name}) + "\n")
        if writer is not None:
            writer.commit()
    finally:
        for fd in fds.values():
            os.close(fd)
    (tmp / "manifest.jsonl").write_text("".join(lines))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    logger.info("wrote %d curated images to %s", len(rows), out)
    return len(rows)
