"""Provenance: what produced an output, recorded in the output itself.

Every output a stage writes (ingest's summary.json, the curated set's summary, checkpoints,
exports, eval's metrics.json) carries one `provenance` record: the code version (git commit and
dirty flag when run from a checkout, package version), the sha256 of the merged config as saved
beside the output (`sha256sum config.yaml` checks it), the sha256 of the manifest of every dataset
it read, and the command line. Inputs are named by keyed pseudonyms under the site key, never by
path (a folder name can name a patient; pretrain.privacy); the command line has every path in it
replaced the same way, so two outputs that read the same file show the same pseudonym.

>>> record = dataset_digest("/no/such/set.npz:train", site=None)
Traceback (most recent call last):
...
pretrain.data.specs.DatasetSpecError: /no/such/set.npz:train: file not found: /no/such/set.npz
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shlex
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pretrain.data.specs import DatasetSpec, parse_spec
from pretrain.privacy import SiteKey, looks_like_path, pseudonymised_path, resolve_site_key

logger = logging.getLogger(__name__)

PACKAGE = "medssl"
MANIFEST_NAME = "manifest.jsonl"  # beside ingest's and curation's shards
_CHUNK = 1 << 20


def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """Package version, and the git commit + dirty flag when the code runs from a checkout
    (None when it does not: an installed wheel has no commit to report)."""
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "package": PACKAGE,
        "version": version,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
    }


def config_text(cfg: DictConfig) -> str:
    """The merged config as pretrain.config.save_config writes it."""
    return OmegaConf.to_yaml(cfg)


def config_sha256(cfg: DictConfig) -> str:
    """sha256 of the saved config.yaml's bytes."""
    return hashlib.sha256(config_text(cfg).encode()).hexdigest()


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (cached per path, size and mtime)."""
    st = os.stat(path)
    return _file_sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _listing_sha256(root: Path, files: Iterable[Path]) -> str:
    """sha256 of the sorted (relative name, size) list: cheap for terabytes of shards."""
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(f"{path.relative_to(root).as_posix()}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()


def manifest_of(spec: DatasetSpec) -> Path | None:
    """The file that lists a dataset's images: the .npz itself, or manifest.jsonl beside shards."""
    if spec.kind == "npz":
        return spec.path
    if spec.kind == "shards":
        candidate = spec.shards[0].parent / MANIFEST_NAME
        return candidate if candidate.is_file() else None
    return None


def dataset_digest(spec: str | DatasetSpec, *, site: SiteKey | None) -> dict[str, Any]:
    """What a run read from one dataset spec: kind, split, and the sha256 of its manifest (the
    .npz file, or manifest.jsonl beside shards), else of its file listing; `name` is the path's
    pseudonym under `site` (None: no name recorded)."""
    spec = spec if isinstance(spec, DatasetSpec) else parse_spec(spec)
    manifest = manifest_of(spec)
    record: dict[str, Any] = {"kind": spec.kind, "split": spec.split}
    if manifest is not None:
        record["manifest_sha256"] = file_sha256(manifest)
    elif spec.kind == "shards":
        record["listing_sha256"] = _listing_sha256(spec.shards[0].parent, spec.shards)
    else:
        files = (p for p in spec.path.rglob("*") if p.is_file())
        record["listing_sha256"] = _listing_sha256(spec.path, files)
    if site is not None:
        record["name"] = site.pseudonym(str(spec.path.resolve()))
    return record


def pseudonymised_args(args: Sequence[str], site: SiteKey) -> list[str]:
    """`args` with every path (a bare argument, the value of `key=value` / `--flag=value`, or an
    item of a list override `key=[a,b]`) replaced by `<path:PSEUDONYM>`."""
    out = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq and not looks_like_path(key) and value.startswith("[") and value.endswith("]"):
            items = [pseudonymised_path(v.strip(), site) for v in value[1:-1].split(",")]
            out.append(f"{key}=[{','.join(items)}]")
        elif eq and not looks_like_path(key):
            out.append(f"{key}={pseudonymised_path(value, site)}")
        else:
            out.append(pseudonymised_path(arg, site))
    return out


def pseudonymised_command(argv: Sequence[str], site: SiteKey) -> str:
    """The command line with its arguments pseudonymised (`pseudonymised_args`); the program
    itself is kept by its module or file name only."""
    prog = Path(argv[0])
    program = f"python -m {prog.parent.name}" if prog.name == "__main__.py" else prog.name
    return " ".join([program, *(shlex.quote(a) for a in pseudonymised_args(argv[1:], site))])


def provenance(
    cfg: DictConfig | None = None,
    *,
    inputs: Iterable[str | DatasetSpec] = (),
    argv: Sequence[str] | None = None,
    site: SiteKey | None = None,
) -> dict[str, Any]:
    """The provenance record of an output (see the module docstring).

    `argv`: default this process's (`python -m <stage> ...`); `site`: default the
    resolved site key (pretrain.privacy.resolve_site_key)."""
    site = site if site is not None else resolve_site_key()
    if argv is None:
        argv = list(sys.argv) or ["python"]
    return {
        "code": code_version(),
        "config_sha256": config_sha256(cfg) if cfg is not None else None,
        "inputs": [dataset_digest(s, site=site) for s in inputs],
        "command": pseudonymised_command(argv, site),
        "site_key_fingerprint": site.fingerprint(),
    }


def _manifest_records(path: Path) -> Iterable[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def data_summary(spec: str | DatasetSpec) -> dict[str, Any]:
    """What a model card says of its pretraining data: the image count, images per modality
    (from manifest.jsonl records), and the in -> out counts of each curation step when the data
    is a curated set (`python -m curation run`'s OUT/curated, its summary.json in OUT)."""
    spec = spec if isinstance(spec, DatasetSpec) else parse_spec(spec)
    out: dict[str, Any] = {"images": None, "modalities": {}, "curation": {}}
    manifest = manifest_of(spec)
    if spec.kind == "npz":
        with np.load(spec.path, allow_pickle=False) as npz:
            out["images"] = int(npz[f"{spec.split}_images"].shape[0])
    elif manifest is not None:
        modalities: Counter[str] = Counter()
        for record in _manifest_records(manifest):
            modalities[str(record.get("modality") or "unknown")] += 1
        out["images"], out["modalities"] = sum(modalities.values()), dict(modalities)
        summary = manifest.parent.parent / "summary.json"
        if summary.is_file():
            steps = json.loads(summary.read_text()).get("steps") or {}
            out["curation"] = {
                f"{name} (in -> out)": f"{s['in']} -> {s['out']}"
                for name, s in steps.items()
                if isinstance(s, dict) and "in" in s and "out" in s
            }
    return out
