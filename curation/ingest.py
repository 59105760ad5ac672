"""Raw images (DICOM, PNG/JPEG/TIFF/BMP, MedMNIST .npz) -> lossless shards + manifest + rejections.

Output is a pure function of inputs and settings: inputs are planned in sorted order, workers
decode/encode them in that order and one writer fills `shard-NNNNNN.tar`, so any worker count and
any kill/re-run sequence give the same manifest. Shards appear only complete (temp name + rename);
after each rename its records go to OUT/.parts/shard-N.jsonl (rebuilt from the tar if a kill came
first) and rejections are appended to OUT/.parts/rejected.jsonl. A re-run skips inputs whose samples
are all committed or that were rejected, resumes a half-committed input after its committed
samples, and rebuilds manifest.jsonl / rejected.jsonl at the end.
Test hook for kill-and-rerun tests: see _ShardSink.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pretrain.config import load_config, save_config, split_overrides
from pretrain.data import readers, shards
from pretrain.data.dicom import resolve_patient_salt
from pretrain.data.readers import NPZ_SPLITS, UnreadableImageError

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "ingest.yaml"
TEST_EXIT_ENV = "MEDSSL_INGEST_TEST_EXIT_AFTER"
# Settings that do not change the output, so a re-run may differ in them.
VOLATILE_KEYS = ("workers", "progress", "npz_chunk", "patient_salt")


class IngestError(RuntimeError):
    """The command cannot run as asked (bad SRC, OUT from another ingest, ...)."""


USER_ERRORS = (IngestError,)


@dataclass(frozen=True)
class Unit:
    """One piece of work: a file (all its frames), a chunk of a .npz split, or a planned rejection."""

    kind: str  # "file" | "npz" | "reject"
    path: str
    base: str  # source name of the input; rejections are reported under it
    split: str | None = None
    start: int = 0
    stop: int = 0
    split_size: int = 0
    modality: str = "OT"
    reason: str = ""

    def source(self, index: int, n: int) -> str:
        """`x.npz:split:i`, `dir/file` or, for multi-frame files, `dir/file#i`."""
        if self.kind == "npz":
            return f"{self.base}:{index}"
        return self.base if n == 1 else f"{self.base}#{index}"

    def count(self, n_in_source: int) -> int:  # samples of this unit (a file: all its frames)
        return self.stop - self.start if self.kind == "npz" else n_in_source


# ----------------------------------------------------------------------------------- planning
def _npz_units(path: Path, base: str, splits: tuple[str, ...], cfg: DictConfig) -> list[Unit]:
    try:
        shapes = readers.npz_split_shapes(path, splits)
    except UnreadableImageError as exc:
        return [Unit("reject", str(path), base, reason=_reason(exc, path))]
    modality = readers.npz_modality(path, OmegaConf.to_container(cfg.npz_modality))
    units: list[Unit] = []
    for split, shape in shapes.items():
        if isinstance(shape, str):
            units.append(Unit("reject", str(path), f"{base}:{split}", reason=_reason(shape, path)))
            continue
        # Bound a work unit to ~4 MB of pixels: large images get smaller chunks.
        chunk = max(1, min(int(cfg.npz_chunk), (4 << 20) // max(1, int(np.prod(shape[1:])))))
        for start in range(0, shape[0], chunk):
            stop = min(shape[0], start + chunk)
            units.append(
                Unit("npz", str(path), f"{base}:{split}", split, start, stop, shape[0], modality)
            )
    return units


def _files(root: Path, exclude: Path | None) -> list[tuple[str, Path]]:
    """(source name, path) of a SRC: `root/rel/path` for folders (hidden entries and the output
    folder skipped), sorted."""
    if not root.is_dir():
        return [(root.name, root)]
    found = (
        p for p in root.rglob("*") if p.is_file() and not (exclude and p.is_relative_to(exclude))
    )
    visible = (p for p in found if not any(s.startswith(".") for s in p.relative_to(root).parts))
    return sorted((f"{root.name}/{p.relative_to(root).as_posix()}", p) for p in visible)


def plan_inputs(sources: list[str], cfg: DictConfig, exclude: Path | None = None) -> list[Unit]:
    """Every input in deterministic order: SRC order, then sorted relative paths."""
    units: list[Unit] = []
    for text in sources:
        if ".npz:" in text:
            file_part, split = text.rsplit(":", 1)
            if split not in NPZ_SPLITS or not Path(file_part).is_file():
                raise IngestError(f"{text}: no such file, or split not one of {NPZ_SPLITS}")
            units += _npz_units(Path(file_part), Path(file_part).name, (split,), cfg)
            continue
        if not Path(text).exists():
            raise IngestError(f"{text}: no such file or directory")
        for base, path in _files(Path(text), exclude):
            try:
                kind = readers.sniff(path)
            except OSError as exc:
                units.append(Unit("reject", str(path), base, reason=f"cannot open: {exc.strerror}"))
                continue
            if kind == "npz":
                units += _npz_units(path, base, NPZ_SPLITS, cfg)
            else:
                units.append(Unit("file", str(path), base))
    unique: dict[tuple[str, int], Unit] = {}
    for unit in units:  # the same SRC given twice is ingested once; two files, one name: refused
        other = unique.setdefault((unit.base, unit.start), unit)
        if other.path != unit.path:
            raise IngestError(
                f"two inputs get the source name {unit.base!r}: {other.path}, {unit.path}"
            )
    return list(unique.values())


# ------------------------------------------------------------------------------------ workers
def _reason(exc: Exception | str, path: str | Path) -> str:
    """The error message without the absolute path prefix (the source already names the input)."""
    text = str(exc)
    return text.removeprefix(f"{path}: ")


def _encode(unit: Unit, image: readers.DecodedImage) -> dict:
    """Manifest record = key, source, sha256, the reader's record, split, label (+ shard later)."""
    rec = image.record
    source = unit.source(rec["index_in_source"], rec["n_in_source"])
    key = hashlib.sha256(source.encode()).hexdigest()[:32]
    full = {"key": key, "source": source, "sha256": shards.pixel_sha256(image.pixels), **rec}
    full.update(split=rec.get("split"), label=rec.get("label"))
    return shards.encode_sample(key, image.pixels, full)


def _unit_samples(unit: Unit, skip: int, opts: dict) -> list[dict]:
    if unit.kind == "npz":
        start = unit.start + skip
        images = readers.npz_images(
            unit.path, str(unit.split), start, unit.stop, modality=unit.modality
        )
        if len(images) != unit.stop - start or images[0].record["n_in_source"] != unit.split_size:
            raise UnreadableImageError(f"{unit.path}: changed while ingesting")
    else:
        images = readers.read_image_file(unit.path, **opts)[skip:]
    return [_encode(unit, img) for img in images]


def process_unit(task: tuple[Unit, int, dict]) -> tuple[list[dict], str | None]:
    """Worker: (encoded samples, None) or ([], rejection reason). Never raises for bad input."""
    unit, skip, opts = task
    if unit.kind == "reject":
        return [], unit.reason
    try:
        return _unit_samples(unit, skip, opts), None
    except UnreadableImageError as exc:
        return [], _reason(exc, unit.path)
    except Exception as exc:  # an unforeseen decoder failure must not stop the other inputs
        return [], f"unexpected {type(exc).__name__}: {_reason(exc, unit.path)}"[:400]


# ------------------------------------------------------------------------------ resume state
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _committed_records(out: Path, parts: Path, shard_size: int) -> list[list[dict]]:
    """Manifest lines of every committed shard, in order; a missing or cut part file is rebuilt
    from its tar (the tar's JSON members are the source of truth)."""
    tars = shards.list_shards(out)
    if [p.name for p in tars] != [shards.shard_name(i) for i in range(len(tars))]:
        raise IngestError(f"{out}: shard files are not a contiguous shard-000000.. sequence")
    result: list[list[dict]] = []
    for index, shard in enumerate(tars):
        part = parts / f"{shard.stem}.jsonl"
        try:
            lines = [json.loads(line) for line in part.read_text().splitlines()]
        except (FileNotFoundError, json.JSONDecodeError):
            lines = [{**rec, "shard": shard.name} for rec in shards.iter_shard_records(shard)]
            _write_atomic(part, _jsonl(lines))
        if index < len(tars) - 1 and len(lines) != shard_size:
            raise IngestError(f"{out}: {shard.name} holds {len(lines)} samples, not shard_size="
                              f"{shard_size}; resume with the original shard_size or a new --out")  # fmt: skip
        result.append(lines)
    return result


def _load_rejections(path: Path) -> dict[str, str]:
    """Rejections logged by earlier runs; a line cut by a kill is dropped (that input is redone)."""
    good = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    _write_atomic(path, _jsonl(good))
    return {r["source"]: r["reason"] for r in good}


def resume_plan(
    units: list[Unit], committed: list[dict], rejected: dict[str, str]
) -> list[tuple[Unit, int, bool]]:
    """(unit, samples to skip, must_reject) for the work left, checking OUT matches these inputs."""
    tasks: list[tuple[Unit, int, bool]] = []
    pos = 0
    for unit in units:
        if unit.base in rejected:
            continue
        if pos >= len(committed):
            tasks.append((unit, 0, False))
            continue
        rec, first = committed[pos], unit.start
        n = int(rec["n_in_source"])
        if rec["index_in_source"] != first or rec["source"] != unit.source(first, n):
            tasks.append((unit, 0, True))  # before committed samples yet not in them: was rejected
            continue
        take = min(unit.count(n), len(committed) - pos)
        if committed[pos + take - 1]["source"] != unit.source(first + take - 1, n):
            raise IngestError(f"OUT does not match the inputs at {unit.base!r} (inputs changed?)")
        pos += take
        if take < unit.count(n):
            tasks.append((unit, take, False))
    if pos != len(committed):
        raise IngestError(
            f"OUT holds samples these inputs do not produce (first: {committed[pos]['source']!r}); "
            "use the original SRC list or a new --out"
        )
    return tasks


def _check_same_settings(out: Path, cfg: DictConfig) -> None:
    """A re-run resumes only the same ingest: other inputs or settings would mix two datasets."""
    if not (out / "config.yaml").exists() or not (out / ".parts").exists():
        return
    old = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    new = OmegaConf.to_container(cfg)
    for key in sorted((set(old) | set(new)) - set(VOLATILE_KEYS)):
        if old.get(key) != new.get(key):
            raise IngestError(f"{out} holds an ingest with different '{key}' ({old.get(key)!r} vs "
                              f"{new.get(key)!r}); re-run the original command or use a new --out")  # fmt: skip


def ingest(cfg: DictConfig) -> dict[str, Any]:
    """Run the ingest described by cfg (see configs/ingest.yaml); returns the summary."""
    started, out = time.time(), Path(cfg.out)
    units = plan_inputs(list(cfg.src), cfg, exclude=out)  # bad SRC: fail before touching OUT
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        raise IngestError(f"{out}: another ingest is writing here") from exc
    parts = out / ".parts"
    _check_same_settings(out, cfg)
    salt = resolve_patient_salt(cfg.patient_salt, out)
    save_config(OmegaConf.merge(cfg, {"patient_salt": None}), out)  # the salt stays out of outputs
    parts.mkdir(exist_ok=True)
    for stale in out.glob("*.tar.tmp"):  # half-written shard of a killed run
        stale.unlink()
    shard_lines = _committed_records(out, parts, int(cfg.shard_size))
    committed = [line for lines in shard_lines for line in lines]
    rejections = _load_rejections(parts / "rejected.jsonl")
    tasks = resume_plan(units, committed, rejections)
    logger.info("%d input unit(s), %d to do; %d sample(s) already committed in %s",
                len(units), len(tasks), len(committed), out)  # fmt: skip
    opts = {"patient_salt": salt, "modality": str(cfg.raster_modality),
            "ct_window_preset": cfg.dicom.ct_window_preset,
            "use_window_tags": bool(cfg.dicom.use_window_tags)}  # fmt: skip
    sink = _ShardSink(out, parts, int(cfg.shard_size), shard_lines)
    rejected_log = open(parts / "rejected.jsonl", "a")  # noqa: SIM115 - closed below
    results = _results([(unit, skip, opts) for unit, skip, _ in tasks], int(cfg.workers))
    try:
        bar = tqdm(total=len(tasks), unit="input", disable=not cfg.progress, desc="ingest")
        for (unit, _, must_reject), (samples, reason) in zip(tasks, results):
            bar.update(1)
            if must_reject and samples:
                raise IngestError(f"OUT does not match the inputs at {unit.base!r} (changed?)")
            if reason is not None:
                logger.warning("rejected %s: %s", unit.base, reason)
                rejections[unit.base] = reason
                rejected_log.write(json.dumps({"source": unit.base, "reason": reason}) + "\n")
                rejected_log.flush()
            for sample in samples:
                sink.add(sample)
        bar.close()
        sink.commit()
    finally:
        sink.abort()
        results.close()
        rejected_log.close()
    summary = _finish(out, units, shard_lines, rejections, started)
    lock.close()
    return summary


def _results(work: list, workers: int) -> Iterator[tuple[list[dict], str | None]]:
    """process_unit over `work` in input order. With a pool at most 4*workers units are in flight,
    so memory stays bounded when workers encode faster than the single writer writes."""
    if workers < 2 or len(work) < 2:
        yield from map(process_unit, work)
        return
    ctx = mp.get_context("forkserver")  # never fork a threaded parent; workers import us once
    ctx.set_forkserver_preload([__name__])
    pool, pending = ctx.Pool(workers), deque()
    try:
        for task in work:
            pending.append(pool.apply_async(process_unit, (task,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
    finally:
        pool.terminate()


class _ShardSink:
    """Fills shards in input order; after each rename the shard's lines go to its part file.

    Test hook: $MEDSSL_INGEST_TEST_EXIT_AFTER="K" exits (75) right after the K-th rename of this
    run, before its part file; "K,M" exits after M more samples went into the next, temp shard."""

    def __init__(self, out: Path, parts: Path, size: int, lines: list[list[dict]]):
        self.out, self.parts, self.size, self.lines = out, parts, size, lines
        self.writer: shards.ShardWriter | None = None
        k, _, m = os.environ.get(TEST_EXIT_ENV, "").partition(",")
        self.hook, self.commits = ((int(k), int(m) if m else -1) if k else None), 0

    def add(self, sample: dict) -> None:
        if self.writer is None:
            self.writer = shards.ShardWriter(self.out, len(self.lines))
        self.writer.write(sample)
        if self.hook and self.hook == (self.commits, len(self.writer)):
            os._exit(75)
        if len(self.writer) == self.size:
            self.commit()

    def commit(self) -> None:
        if self.writer is None:
            return
        path = self.writer.commit()
        self.commits += 1
        if self.hook and self.hook == (self.commits, -1):
            os._exit(75)
        self.lines.append([{**rec, "shard": path.name} for rec in self.writer.records])
        _write_atomic(self.parts / f"{path.stem}.jsonl", _jsonl(self.lines[-1]))
        self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _finish(out: Path, units: list[Unit], shard_lines: list[list[dict]],
            rejections: dict[str, str], started: float) -> dict[str, Any]:  # fmt: skip
    _write_atomic(out / "manifest.jsonl", "".join(_jsonl(lines) for lines in shard_lines))
    ordered = list(dict.fromkeys(u.base for u in units if u.base in rejections))
    rejected = [{"source": base, "reason": rejections[base]} for base in ordered]
    _write_atomic(out / "rejected.jsonl", _jsonl(rejected))
    ingested, seconds = sum(map(len, shard_lines)), round(time.time() - started, 3)
    summary = dict(
        ingested=ingested, rejected=len(rejected), seconds=seconds, shards=len(shard_lines)
    )
    _write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="*", help="files, folders, x.npz or x.npz:split; key=value")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest")
    parser.add_argument("--shard-size", type=int, help="samples per shard")
    parser.add_argument("--workers", type=int, help="decoding processes")
    parser.add_argument("--config", help="recipe YAML over curation/configs/ingest.yaml")


def _absolute(src: str) -> str:
    if ".npz:" in src:
        file_part, split = src.rsplit(":", 1)
        return f"{Path(file_part).resolve()}:{split}"
    return str(Path(src).resolve())


def run(args: argparse.Namespace) -> int:
    """`python -m curation ingest`: exit 0 when anything was ingested."""
    overrides, sources = split_overrides(args.src)
    flags = {"shard_size": args.shard_size, "workers": args.workers}
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    cfg = load_config(DEFAULT_CONFIG, args.config, overrides)
    cfg.src = [_absolute(s) for s in (sources or list(cfg.src))]
    cfg.out = str(Path(args.out).resolve())
    if not cfg.src:
        raise IngestError("no SRC given (files, folders, file.npz or file.npz:split)")
    if int(cfg.shard_size) < 1:
        raise IngestError(f"shard_size must be >= 1, got {cfg.shard_size}")
    summary = ingest(cfg)
    print(json.dumps(summary), flush=True)
    if summary["ingested"] == 0:
        print(f"error: nothing could be ingested from {' '.join(cfg.src)}: {summary['rejected']} "
              f"input(s) rejected, reasons in {Path(cfg.out) / 'rejected.jsonl'}", file=sys.stderr)  # fmt: skip
    return 0 if summary["ingested"] else 1
