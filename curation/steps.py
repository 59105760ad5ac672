"""Step results on disk, keyed on content: each step of `curation run` is skipped when its result
exists under the same key, the sha256 of (step name, its settings, the content of the datasets it
reads, the keys of the steps it reads). A killed run resumes where it stopped; changing one
threshold recomputes only the steps downstream of it; a pool rewritten in place under the same
path recomputes every step that reads it (no stale keep-masks).

Files are hashed once: `OUT/steps/hashes.json` remembers each file's sha256 by (size, mtime_ns),
as git's index does, so a rerun on unchanged data reads no file twice."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import ListConfig

from pretrain.config import plain
from pretrain.data.specs import parse_spec
from pretrain.io import atomic_open, atomic_write
from pretrain.privacy import resolve_site_key

logger = logging.getLogger(__name__)

TEST_EXIT_ENV = (
    "MEDSSL_CURATION_TEST_EXIT_AFTER"  # test hook: os._exit(75) after this step (a kill)
)
HASH_CHUNK = 1 << 22


def fingerprint(*parts: Any) -> str:
    """Short sha256 of JSON-able parts (configs resolved)."""
    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"dedup.threshold": 0.99, ...}: what a log line names when a setting changed."""
    tree = plain(tree)
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


class ContentHashes:
    """sha256 of files and datasets, cached by (path pseudonym, size, mtime_ns) in a JSON file.

    >>> import tempfile; d = Path(tempfile.mkdtemp()); (d / "a.bin").write_bytes(b"abc")
    3
    >>> ContentHashes(d / "hashes.json").file(d / "a.bin")[:12]
    'ba7816bf8f01'
    """

    def __init__(self, path: Path):
        self.path = path
        self.site = resolve_site_key()  # the cache names files by pseudonym, never by path
        try:
            self.known: dict[str, list] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            self.known = {}
        self.dirty = False

    def file(self, path: str | os.PathLike) -> str:
        p = Path(path).resolve()
        st = p.stat()
        name = self.site.pseudonym(str(p))
        got = self.known.get(name)
        if got and got[0] == st.st_size and got[1] == st.st_mtime_ns:
            return got[2]
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
        self.known[name] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def files(self, paths: Iterable[Path], root: Path | None = None) -> list[list[str]]:
        """[[name, sha256], ...]: names relative to `root` (else base names), so a moved copy of
        the same data keeps its key."""
        return [[str(p.relative_to(root)) if root else p.name, self.file(p)] for p in paths]

    def dataset(self, spec: str | os.PathLike) -> str:
        """sha256 of what a dataset spec holds: its shards and the manifest beside them, its .npz
        and split, or every file of its image folder (names relative to the folder)."""
        parsed = parse_spec(spec)
        if parsed.kind == "shards":
            dirs = sorted({p.parent for p in parsed.shards})
            manifests = [d / "manifest.jsonl" for d in dirs if (d / "manifest.jsonl").is_file()]
            parts: Any = ["shards", self.files(parsed.shards), [self.file(m) for m in manifests]]
        elif parsed.kind == "npz":
            parts = ["npz", parsed.split, self.file(parsed.path)]
        else:
            found = sorted(Path(d, f) for d, _, names in os.walk(parsed.path) for f in names)
            parts = ["folder", self.files(found, root=parsed.path)]
        self.save()
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def save(self) -> None:
        if self.dirty:
            atomic_write(self.path, json.dumps(self.known))
            self.dirty = False


class PartsMissing(RuntimeError):
    """An array step's merge found parts missing (their tasks did not run or failed)."""


class StopAfter(Exception):
    """Raised by Steps.run after the step named by `stop_after` (later runs resume)."""


class Steps:
    """`OUT/steps/NAME.json` (key, inputs, summary, small results) + `NAME.npz` (arrays).

    `run` is the one way a step is cached: it computes the step's key, returns the stored result
    when the key matches, else calls `compute` and stores what it returns."""

    def __init__(self, out: Path, stop_after: str | None = None, writer: bool = True):
        self.dir = out / "steps"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hashes = ContentHashes(self.dir / "hashes.json")
        self.stop_after = stop_after
        self.writer = writer  # False: the other ranks of a distributed step read, rank 0 writes
        self.keys: dict[str, str] = {}
        self.summaries: dict[str, dict] = {}

    def inputs(
        self,
        settings: Mapping[str, Any],
        datasets: Mapping[str, Any] | None = None,
        after: Iterable[str] = (),
    ) -> dict:
        """What decides a step's result: flattened settings, dataset content hashes, upstream keys."""
        return {
            "settings": _flat(dict(settings)),
            "datasets": {
                label: self._dataset_hash(spec) for label, spec in (datasets or {}).items()
            },
            "after": {name: self.keys[name] for name in after},
        }

    def key(
        self,
        name: str,
        settings: Mapping[str, Any],
        datasets: Mapping[str, Any] | None = None,
        after: Iterable[str] = (),
    ) -> tuple[str, dict]:
        """(key, inputs) of step `name`: what `run` caches under, and what names its parts."""
        inputs = self.inputs(settings, datasets, after)
        key = hashlib.sha256(
            json.dumps([name, inputs], sort_keys=True, default=str).encode()
        ).hexdigest()
        return key, inputs

    def _part_path(self, name: str, key: str, task: int, tasks: int) -> Path:
        return self.dir / "parts" / f"{name}-{key[:16]}" / f"part-{task:04d}-of-{tasks:04d}.npz"

    def save_part(
        self, name: str, key: str, task: int, tasks: int, arrays: dict[str, np.ndarray]
    ) -> Path:
        """Array task `task` of `tasks` of step `name` (under the step's key): its arrays."""
        path = self._part_path(name, key, task, tasks)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            np.savez(f, **arrays)
        return path

    def load_parts(self, name: str, key: str, tasks: int) -> list[dict[str, np.ndarray]]:
        """Every part of an array step, in task order; refuses, naming them, when some are missing
        (or were computed from other data or settings: another key)."""
        paths = [self._part_path(name, key, i, tasks) for i in range(tasks)]
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        if missing:
            listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise PartsMissing(
                f"step {name}: {len(missing)} of {tasks} array part(s) missing for these data and "
                f"settings (task {listed}; first: {paths[missing[0]]}). Run `python -m curation "
                f"run ... --step {name} --task I` for each (the same config), then again"
            )
        parts = []
        for path in paths:
            with np.load(path, allow_pickle=False) as z:
                parts.append({k: z[k] for k in z.files})
        return parts

    def _dataset_hash(self, spec: Any) -> Any:
        if isinstance(spec, list | tuple | ListConfig):
            return [self.hashes.dataset(str(s)) for s in spec]
        return self.hashes.dataset(str(spec))

    def run(
        self,
        name: str,
        compute: Callable[[], tuple[dict, dict | None, dict | None]],
        *,
        settings: Mapping[str, Any],
        datasets: Mapping[str, Any] | None = None,
        after: Iterable[str] = (),
    ) -> tuple[dict, dict[str, np.ndarray]]:
        """(json doc, arrays) of step `name`, computed only when its key changed.

        `compute() -> (summary, data, arrays)`; `datasets`: {label: dataset spec or list of specs}
        read by the step; `after`: names of the steps whose results it reads."""
        key, inputs = self.key(name, settings, datasets, after)
        got = self._load(name, key, inputs)
        if got is None:
            with Timer() as t:
                summary, data, arrays = compute()
            summary = {**summary, "seconds": summary.get("seconds", t.seconds)}
            doc = {"key": key, "inputs": inputs, "summary": summary, "data": data or {}}
            text = json.dumps(doc, default=_json_default)
            if self.writer:
                self._save(name, text, summary, arrays)
            # what a load would return, built in memory: re-reading the file raced with array
            # tasks of the same step rewriting it (CI under load: the file vanished in between)
            got = json.loads(text), dict(arrays or {})
        self.keys[name] = key
        if self.stop_after == name:
            raise StopAfter(name)
        return got

    def _load(self, name: str, key: str, inputs: dict) -> tuple[dict, dict[str, np.ndarray]] | None:
        path = self.dir / f"{name}.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            logger.warning("step %s: %s unreadable (%s): recomputing", name, path, exc)
            return None
        if doc.get("key") != key:
            logger.info("step %s: recomputing: %s", name, _why(doc.get("inputs") or {}, inputs))
            return None
        arrays: dict[str, np.ndarray] = {}
        if (self.dir / f"{name}.npz").is_file():
            with np.load(self.dir / f"{name}.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        if name not in self.summaries:
            logger.info("step %s: done before with the same data and settings, skipped", name)
            self.summaries[name] = {**doc["summary"], "cached": True}
        return doc, arrays

    def _save(
        self, name: str, text: str, summary: dict, arrays: dict[str, np.ndarray] | None
    ) -> None:
        """The step's arrays, then its JSON document `text` (whose presence means done)."""
        (self.dir / f"{name}.json").unlink(missing_ok=True)
        if arrays:
            with atomic_open(self.dir / f"{name}.npz") as f:
                np.savez(f, **arrays)
        atomic_write(self.dir / f"{name}.json", text)
        self.summaries[name] = {**summary, "cached": False}
        if os.environ.get(TEST_EXIT_ENV) == name:
            logger.warning("%s=%s: exiting as if killed", TEST_EXIT_ENV, name)
            os._exit(75)


def _why(old: dict, new: dict) -> str:
    """The reason a step runs again, for the log: which data, setting or upstream step changed."""
    reasons = []
    for label in sorted(set(old.get("datasets", {})) | set(new["datasets"])):
        if old.get("datasets", {}).get(label) != new["datasets"].get(label):
            reasons.append(f"{label} changed")
    was, now = old.get("settings", {}), new["settings"]
    changed = sorted(k for k in set(was) | set(now) if was.get(k, ...) != now.get(k, ...))
    if changed:
        shown = ", ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
        reasons.append(f"settings changed: {shown}")
    for step in sorted(set(old.get("after", {})) | set(new["after"])):
        if old.get("after", {}).get(step) != new["after"].get(step):
            reasons.append(f"step {step} changed")
    return "; ".join(reasons) or "stored by an older version"


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
