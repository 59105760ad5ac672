"""Step results on disk: each step of `curation run` is skipped when its result exists with the
same fingerprint (its settings + the fingerprints of the steps it reads), so a killed run resumes
where it stopped and changing one threshold recomputes only the steps downstream of it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

TEST_EXIT_ENV = (
    "MEDSSL_CURATION_TEST_EXIT_AFTER"  # test hook: os._exit(75) after this step (a kill)
)


def fingerprint(*parts: Any) -> str:
    def plain(x: Any) -> Any:
        return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) else x

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Steps:
    """`OUT/steps/NAME.json` (fingerprint, summary, small results) + `NAME.npz` (arrays)."""

    def __init__(self, out: Path):
        self.dir = out / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.summaries: dict[str, dict] = {}

    def load(self, name: str, fp: str) -> tuple[dict, dict[str, np.ndarray]] | None:
        path = self.dir / f"{name}.json"
        if not path.is_file():
            return None
        doc = json.loads(path.read_text())
        if doc.get("fingerprint") != fp:
            logger.info("step %s: settings or inputs changed, recomputing", name)
            return None
        arrays: dict[str, np.ndarray] = {}
        if (self.dir / f"{name}.npz").is_file():
            with np.load(self.dir / f"{name}.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        logger.info("step %s: done before, skipped", name)
        self.summaries.setdefault(name, {**doc["summary"], "cached": True})
        return doc, arrays

    def save(self, name: str, fp: str, summary: dict, data: dict | None = None,
             arrays: dict[str, np.ndarray] | None = None) -> None:  # fmt: skip
        if arrays:
            tmp = self.dir / f"{name}.tmp.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, self.dir / f"{name}.npz")
        doc = {"fingerprint": fp, "summary": summary, "data": data or {}}
        tmp_json = self.dir / f"{name}.json.tmp"
        tmp_json.write_text(json.dumps(doc, default=_json_default))
        os.replace(tmp_json, self.dir / f"{name}.json")  # written last: its presence means done
        self.summaries[name] = {**summary, "cached": False}
        if os.environ.get(TEST_EXIT_ENV) == name:
            logger.warning("%s=%s: exiting as if killed", TEST_EXIT_ENV, name)
            os._exit(75)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(time.perf_counter() - self.start, 3)
