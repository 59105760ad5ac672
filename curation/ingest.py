"""Raw images (DICOM, PNG/JPEG/TIFF/BMP, MedMNIST .npz) -> lossless shards + manifest + rejections.

Output is a pure function of inputs and settings: inputs are planned in sorted order, workers
decode/encode them in that order and one writer fills `shard-NNNNNN.tar`, so any worker count and
any kill/re-run sequence give the same manifest. Shards appear only complete (temp name + rename);
after each rename its records go to OUT/.parts/shard-N.jsonl (rebuilt from the tar if a kill came
first) and rejections are appended to OUT/.parts/rejected.jsonl. A re-run skips inputs whose samples
are all committed or that were rejected, resumes a half-committed input after its committed
samples, and rebuilds manifest.jsonl / rejected.jsonl at the end.

Privacy: every output names an input by its keyed pseudonym under the site key (`key`, and
`source` too unless `sources=keep`), never by its path; the one map from pseudonym to path is
OUT/private/sources.jsonl (mode 0600, or `private_dir=`), written before any work. Every record
and OUT/privacy.json carry the key's fingerprint, and a re-run with another key is refused.
Transient rejections (cannot open, out of memory) are retried by the next run of the command.
Test hook for kill-and-rerun tests: see _ShardSink.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
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
from pretrain.data.dicom import BURNED_IN_POLICIES
from pretrain.data.readers import NPZ_SPLITS, UnreadableImageError
from pretrain.io import atomic_write
from pretrain.privacy import SALT_ENV, PrivacyError, SiteKey, private_jsonl, resolve_site_key

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "ingest.yaml"
TEST_EXIT_ENV = "MEDSSL_INGEST_TEST_EXIT_AFTER"
# Settings that do not change the output, so a re-run may differ in them.
VOLATILE_KEYS = ("workers", "progress", "npz_chunk", "private_dir", "patient_salt_file")
SOURCE_MODES = ("pseudonym", "keep")
PRIVACY_FILE = "privacy.json"
TRANSIENT = ("cannot open", "out of memory")  # reasons worth another try on the next run


class IngestError(RuntimeError):
    """The command cannot run as asked (bad SRC, OUT from another ingest, ...)."""


USER_ERRORS = (IngestError, PrivacyError)


@dataclass(frozen=True)
class Naming:
    """How outputs name inputs: keyed pseudonyms, or (`keep`, public data) readable sources."""

    site: SiteKey
    keep: bool

    def key(self, source: str) -> str:
        return self.site.pseudonym(source)

    def shown(self, source: str) -> str:
        """The name an output may show: the source itself only with `sources=keep`."""
        return source if self.keep else self.key(source)


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
        return [Unit("reject", str(path), base, reason=_redact(str(exc), str(path), base))]
    modality = readers.npz_modality(path, OmegaConf.to_container(cfg.npz_modality))
    units: list[Unit] = []
    for split, shape in shapes.items():
        if isinstance(shape, str):
            reason = _redact(shape, str(path), f"{base}:{split}")
            units.append(Unit("reject", str(path), f"{base}:{split}", reason=reason))
            continue
        # Bound a work unit to ~4 MB of pixels: large images get smaller chunks.
        chunk = max(1, min(int(cfg.npz_chunk), (4 << 20) // max(1, int(np.prod(shape[1:])))))
        for start in range(0, shape[0], chunk):
            stop = min(shape[0], start + chunk)
            units.append(
                Unit("npz", str(path), f"{base}:{split}", split, start, stop, shape[0], modality)
            )
    return units


def _files(root: Path, exclude: Path | None) -> list[tuple[str, Path, str]]:
    """(source name, path, rejection reason or "") of a SRC: `root/rel/path` for folders, sorted.

    Hidden entries and the output folder are skipped; symbolic links to folders are not
    followed, and they, link loops and broken links get a reason instead of silence."""
    if not root.is_dir():
        return [(root.name, root, "")]
    found: list[tuple[str, Path, str]] = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        here = Path(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and here / d != exclude]
        for d in [d for d in dirs if (here / d).is_symlink()]:
            dirs.remove(d)
            found.append(
                (
                    here / d,
                    "symbolic link to a folder: not followed (give its target "
                    "as a SRC to ingest it)",
                )
            )
        for name in names:
            path = here / name
            if name.startswith("."):
                continue
            try:
                path.stat()
            except OSError as exc:
                loop = exc.errno == errno.ELOOP
                found.append(
                    (path, "symbolic link loop" if loop else f"cannot open: {exc.strerror}")
                )
                continue
            found.append((path, "" if path.is_file() else "not a regular file"))
    return sorted((f"{root.name}/{p.relative_to(root).as_posix()}", p, why) for p, why in found)


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
        for base, path, why in _files(Path(text), exclude):
            if why:
                units.append(Unit("reject", str(path), base, reason=why))
                continue
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
                "two inputs get the same source name (the same folder name given "
                "twice as SRC?); give their parent folder instead"
            )
    return list(unique.values())


# ------------------------------------------------------------------------------------ workers
def _redact(text: str, path: str, base: str) -> str:
    """An error message with the input's path, source name and each part of them redacted: the
    pseudonym already names the input, and folder and file names can name a patient."""
    text = text.removeprefix(f"{path}: ")
    names = {path, base, *Path(path).parts, *base.replace(":", "/").split("/")}
    for name in sorted((n for n in names if len(n) >= 3), key=len, reverse=True):
        text = text.replace(name, "<input>")
    return text


def _reason(exc: Exception, unit: Unit) -> str:
    return _redact(str(exc), unit.path, unit.base)


def _encode(unit: Unit, image: readers.DecodedImage, naming: Naming) -> dict:
    """Manifest record = key, source, input, key fingerprint, sha256, the reader's record, split,
    label (+ shard later)."""
    rec = image.record
    source = unit.source(rec["index_in_source"], rec["n_in_source"])
    key = naming.key(source)
    full = {
        "key": key,
        "source": naming.shown(source),
        "input": naming.key(unit.base),
        "key_fingerprint": naming.site.fingerprint(),
        "sha256": shards.pixel_sha256(image.pixels),
        **rec,
    }
    full.update(split=rec.get("split"), label=rec.get("label"))
    return shards.encode_sample(key, image.pixels, full)


def _unit_samples(unit: Unit, skip: int, opts: dict, naming: Naming) -> list[dict]:
    if unit.kind == "npz":
        start = unit.start + skip
        images = readers.npz_images(
            unit.path, str(unit.split), start, unit.stop, modality=unit.modality
        )
        if len(images) != unit.stop - start or images[0].record["n_in_source"] != unit.split_size:
            raise UnreadableImageError(f"{unit.path}: changed while ingesting")
    else:
        images = readers.read_image_file(unit.path, site_key=naming.site, **opts)[skip:]
    return [_encode(unit, img, naming) for img in images]


def process_unit(task: tuple[Unit, int, dict, Naming]) -> tuple[list[dict], str | None]:
    """Worker: (encoded samples, None) or ([], rejection reason). Never raises for bad input."""
    unit, skip, opts, naming = task
    if unit.kind == "reject":
        return [], unit.reason  # written by the planner, already without names
    try:
        return _unit_samples(unit, skip, opts, naming), None
    except UnreadableImageError as exc:
        return [], _reason(exc, unit)
    except MemoryError:
        return [], "out of memory while decoding"
    except OSError as exc:  # permissions, a file system that went away: worth another try
        return [], f"cannot open: {exc.strerror or type(exc).__name__}"
    except Exception as exc:  # an unforeseen decoder failure must not stop the other inputs
        return [], f"unexpected {type(exc).__name__}: {_reason(exc, unit)}"[:400]


# ------------------------------------------------------------------------------ resume state
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
            atomic_write(part, _jsonl(lines))
        if index < len(tars) - 1 and len(lines) != shard_size:
            raise IngestError(
                f"{out}: {shard.name} holds {len(lines)} samples, not shard_size="
                f"{shard_size}; resume with the original shard_size or a new --out"
            )
        result.append(lines)
    return result


def is_transient(reason: str) -> bool:
    return reason.startswith(TRANSIENT)


def _load_rejections(path: Path) -> dict[str, str]:
    """Lasting rejections logged by earlier runs (by shown name). A line cut by a kill is dropped
    and transient ones are forgotten: those inputs are tried again."""
    good = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not is_transient(record["reason"]):
            good.append(record)
    atomic_write(path, _jsonl(good))
    return {r["source"]: r["reason"] for r in good}


def resume_plan(
    units: list[Unit], committed: list[dict], rejected: dict[str, str], naming: Naming
) -> list[tuple[Unit, int]]:
    """(unit, samples to skip) for the work left, checking OUT holds nothing these inputs do not
    produce. Committed samples are found by key, so an input retried after a transient rejection
    may sit after inputs that follow it in SRC order."""
    at = {rec["key"]: i for i, rec in enumerate(committed)}
    tasks: list[tuple[Unit, int]] = []
    matched = 0
    for unit in units:
        if naming.shown(unit.base) in rejected:
            continue
        first = unit.start
        pos = at.get(naming.key(unit.source(first, 1)), at.get(naming.key(unit.source(first, 2))))
        if pos is None:
            tasks.append((unit, 0))
            continue
        n = int(committed[pos]["n_in_source"])
        take = 0
        while take < unit.count(n) and pos + take < len(committed):
            if committed[pos + take]["key"] != naming.key(unit.source(first + take, n)):
                break
            take += 1
        matched += take
        if take < unit.count(n):
            tasks.append((unit, take))
    if matched != len(committed):
        raise IngestError(
            f"OUT holds {len(committed) - matched} sample(s) these inputs do not produce; use the "
            "original SRC list, the same site key, or a new --out"
        )
    return tasks


def _check_same_key(out: Path, naming: Naming) -> None:
    """Refuse a re-run under another site key or source mode: one output, one kind of name."""
    path = out / PRIVACY_FILE
    mine = {
        "key_fingerprint": naming.site.fingerprint(),
        "sources": "keep" if naming.keep else "pseudonym",
    }
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("key_fingerprint") != mine["key_fingerprint"]:
            raise PrivacyError(
                f"{out} was ingested with the site key of fingerprint {old.get('key_fingerprint')}, "
                f"this run has {mine['key_fingerprint']} ({naming.site.origin}); use that key "
                "again or a new --out"
            )
        if old.get("sources") != mine["sources"]:
            raise IngestError(
                f"{out} was ingested with sources={old.get('sources')}; re-run with "
                "it or use a new --out"
            )
    atomic_write(path, json.dumps(mine, indent=2) + "\n")


def _check_same_settings(out: Path, cfg: DictConfig) -> None:
    """A re-run resumes only the same ingest: other inputs or settings would mix two datasets."""
    if not (out / "config.yaml").exists() or not (out / ".parts").exists():
        return
    old = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    new = OmegaConf.to_container(cfg)
    for key in sorted((set(old) | set(new)) - set(VOLATILE_KEYS)):
        if old.get(key) != new.get(key):
            values = "" if key == "src" else f" ({old.get(key)!r} vs {new.get(key)!r})"
            raise IngestError(
                f"{out} holds an ingest with different '{key}'{values}; re-run "
                "the original command or use a new --out"
            )


def _write_private_map(cfg: DictConfig, units: list[Unit], naming: Naming) -> Path:
    """OUT/private/sources.jsonl (mode 0600): the one place where pseudonyms meet paths."""
    folder = Path(cfg.private_dir) if cfg.private_dir else Path(cfg.out) / "private"
    roots = [{"src": naming.key(src), "path": src} for src in cfg.src]
    inputs = {
        u.base: {"input": naming.key(u.base), "source": u.base, "path": u.path} for u in units
    }
    path = folder / "sources.jsonl"
    private_jsonl(path, [*roots, *inputs.values()])
    return path


def ingest(cfg: DictConfig) -> dict[str, Any]:
    """Run the ingest described by cfg (see configs/ingest.yaml); returns the summary."""
    started, out = time.time(), Path(cfg.out)
    if cfg.sources not in SOURCE_MODES:
        raise IngestError(f"sources must be one of {SOURCE_MODES}, got {cfg.sources!r}")
    if cfg.dicom.burned_in not in BURNED_IN_POLICIES:
        raise IngestError(
            f"dicom.burned_in must be one of {BURNED_IN_POLICIES}, got {cfg.dicom.burned_in!r}"
        )
    naming = Naming(resolve_site_key(cfg.patient_salt_file, out=out), cfg.sources == "keep")
    units = plan_inputs(list(cfg.src), cfg, exclude=out)  # bad SRC: fail before touching OUT
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        raise IngestError(f"{out}: another ingest is writing here") from exc
    parts = out / ".parts"
    _check_same_key(out, naming)
    shown = OmegaConf.merge(cfg, {"src": [naming.shown(src) for src in cfg.src]})
    _check_same_settings(out, shown)
    save_config(shown, out)
    _write_private_map(cfg, units, naming)
    parts.mkdir(exist_ok=True)
    for stale in out.glob("*.tar.tmp"):  # half-written shard of a killed run
        stale.unlink()
    shard_lines = _committed_records(out, parts, int(cfg.shard_size))
    committed = [line for lines in shard_lines for line in lines]
    rejections = _load_rejections(parts / "rejected.jsonl")
    tasks = resume_plan(units, committed, rejections, naming)
    logger.info(
        "%d input unit(s), %d to do; %d sample(s) already committed in %s (site key %s)",
        len(units),
        len(tasks),
        len(committed),
        out,
        naming.site.fingerprint(),
    )
    opts = {
        "modality": str(cfg.raster_modality),
        "burned_in": str(cfg.dicom.burned_in),
        "ct_window_preset": cfg.dicom.ct_window_preset,
        "use_window_tags": bool(cfg.dicom.use_window_tags),
    }
    sink = _ShardSink(out, parts, int(cfg.shard_size), shard_lines)
    rejected_log = open(parts / "rejected.jsonl", "a")  # noqa: SIM115 - closed below
    results = _results([(unit, skip, opts, naming) for unit, skip in tasks], int(cfg.workers))
    try:
        bar = tqdm(total=len(tasks), unit="input", disable=not cfg.progress, desc="ingest")
        for (unit, _), (samples, reason) in zip(tasks, results):
            bar.update(1)
            if reason is not None:
                name = naming.shown(unit.base)
                logger.warning("rejected %s: %s", name, reason)
                rejections[name] = reason
                rejected_log.write(json.dumps({"source": name, "reason": reason}) + "\n")
                rejected_log.flush()
            for sample in samples:
                sink.add(sample)
        bar.close()
        sink.commit()
    finally:
        sink.abort()
        results.close()
        rejected_log.close()
    summary = _finish(out, [naming.shown(u.base) for u in units], shard_lines, rejections, started)
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
        atomic_write(self.parts / f"{path.stem}.jsonl", _jsonl(self.lines[-1]))
        self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _finish(
    out: Path,
    names: list[str],
    shard_lines: list[list[dict]],
    rejections: dict[str, str],
    started: float,
) -> dict[str, Any]:
    atomic_write(out / "manifest.jsonl", "".join(_jsonl(lines) for lines in shard_lines))
    ordered = list(dict.fromkeys(name for name in names if name in rejections))
    rejected = [{"source": base, "reason": rejections[base]} for base in ordered]
    atomic_write(out / "rejected.jsonl", _jsonl(rejected))
    ingested, seconds = sum(map(len, shard_lines)), round(time.time() - started, 3)
    summary = dict(
        ingested=ingested, rejected=len(rejected), seconds=seconds, shards=len(shard_lines)
    )
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
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
    if any(o.partition("=")[0].strip() == "patient_salt" for o in overrides):
        raise IngestError(
            "patient_salt= is not taken on the command line, where shell histories "
            f"and launch records keep it: set ${SALT_ENV} or patient_salt_file=PATH"
        )
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
        print(
            f"error: nothing could be ingested: {summary['rejected']} input(s) rejected, reasons "
            f"in {Path(cfg.out) / 'rejected.jsonl'}",
            file=sys.stderr,
        )
    return 0 if summary["ingested"] else 1
