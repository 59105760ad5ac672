"""Are the evaluation images in the backbone's pretraining data? Checked by pixel sha256.

A backbone pretrained on its own test images scores too well, and nothing in the numbers shows
it. The export's provenance names each pretraining input by its manifest's sha256 (never its
path); the run folder the export sits in holds the config that read it, with its inputs as given
in the owner-only private/config.yaml (`data.train`). When that manifest is still on this machine
and its sha256 matches, every eval image (val and test) is looked up among the pretraining images'
pixel hashes: manifest.jsonl's `sha256` field for shards, hashed pixels for a .npz. The answer says
how many were found, or why it could not be checked (an export downloaded without its run folder, a
manifest since changed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from pretrain.data.datasets import open_dataset
from pretrain.data.shards import pixel_sha256
from pretrain.data.specs import DatasetSpec, DatasetSpecError, parse_spec
from pretrain.provenance import file_sha256, manifest_of

logger = logging.getLogger(__name__)


def _pixel_hashes(spec: DatasetSpec) -> list[str]:
    """One pixel sha256 per image, in order."""
    manifest = manifest_of(spec)
    if spec.kind == "shards" and manifest is not None:
        with open(manifest) as f:
            return [json.loads(line).get("sha256") for line in f if line.strip()]
    dataset = open_dataset(spec)
    return [pixel_sha256(dataset.load(i)[0]) for i in range(len(dataset))]


def _pretraining_spec(backbone: str, recorded: str) -> tuple[DatasetSpec | None, str]:
    """The pretraining dataset whose manifest sha256 is `recorded`, found through the run
    folder's config.yaml, or (None, why not)."""
    path = Path(backbone)
    run_dirs = [path, *path.parents][:3] if path.exists() else []
    for run_dir in run_dirs:
        # the config as given (owner-only); runs before it was kept saved data.train as given
        config = next(
            (
                c
                for c in (run_dir / "private" / "config.yaml", run_dir / "config.yaml")
                if c.is_file()
            ),
            None,
        )
        if config is None:
            continue
        train = OmegaConf.load(config).get("data", {}).get("train")
        try:
            spec = parse_spec(str(train))
        except DatasetSpecError:
            return None, "the run's data.train is no longer readable on this machine"
        manifest = manifest_of(spec)
        if manifest is None:
            return None, "the pretraining data has no manifest (an image folder)"
        if file_sha256(manifest) != recorded:
            return None, "the pretraining manifest changed since the backbone was trained"
        return spec, ""
    return None, "no run folder with config.yaml beside the export (e.g. a downloaded export)"


def pretraining_overlap(
    backbone: str, meta: dict[str, Any], eval_specs: dict[str, str | None]
) -> dict[str, Any]:
    """{"checked": bool, "reason": str, "manifest_sha256": str, "<split>": images found} for the
    eval splits in `eval_specs` (split name -> spec, None skipped)."""
    inputs = (meta.get("provenance") or {}).get("inputs") or []
    recorded = [i.get("manifest_sha256") for i in inputs if i.get("manifest_sha256")]
    if not recorded:
        return {"checked": False, "reason": "the backbone records no pretraining manifest"}
    spec, why = _pretraining_spec(backbone, recorded[0])
    if spec is None:
        return {"checked": False, "reason": why, "manifest_sha256": recorded[0]}
    seen = set(_pixel_hashes(spec)) - {None}
    result: dict[str, Any] = {"checked": True, "reason": "", "manifest_sha256": recorded[0]}
    for split, given in eval_specs.items():
        if given is None:
            continue
        found = sum(h in seen for h in _pixel_hashes(parse_spec(given)))
        result[split] = found
        if found:
            logger.warning(
                "%d %s image(s) appear in the backbone's pretraining data (pixel sha256): its "
                "%s scores are optimistic",
                found,
                split,
                split,
            )
    return result
