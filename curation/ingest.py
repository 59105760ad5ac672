"""Raw images (DICOM, PNG/JPEG/TIFF/BMP, MedMNIST .npz) -> lossless shards + manifest + rejections.

Output is a pure function of inputs and settings: inputs are planned in sorted order and cut into
blocks of `shard_size` expected samples (`plan_blocks`); block B becomes `shard-B.tar` (and
`shard-B_0001.tar`... when its files hold more frames than that), written by whichever worker
process or array task (`--task I --tasks N`) gets it, so any worker count, task count and kill/re-run
sequence give the same bytes. A block's shards appear only complete (temp name + rename), then its
commit record OUT/.parts/block-B.json (manifest lines and rejections). A re-run redoes exactly the
blocks without a record (or with a transient rejection to retry) and merges the records into
manifest.jsonl / rejected.jsonl; an array task writes no manifest, the run after the array does.

Privacy: every output names an input by its keyed pseudonym under the site key (`key`, and
`source` too unless `sources=keep`), never by its path; the one map from pseudonym to path is
OUT/private/sources.jsonl (mode 0600, or `private_dir=`), written before any work. Every record
and OUT/privacy.json carry the key's fingerprint, and a re-run with another key is refused.
Test hook for kill-and-rerun tests: see write_block.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
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
from pretrain.provenance import provenance

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "ingest.yaml"
TEST_EXIT_ENV = "MEDSSL_INGEST_TEST_EXIT_AFTER"
# Settings that do not change the output, so a re-run may differ in them.
VOLATILE_KEYS = ("workers", "progress", "npz_chunk", "private_dir", "patient_salt_file")
SOURCE_MODES = ("pseudonym", "keep")
PRIVACY_FILE = "privacy.json"
TRANSIENT = ("cannot open", "out of memory")  # reasons worth another try on the next run
PARTS = ".parts"  # the blocks' commit records


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
    """One piece of work: a file (all its frames), a chunk of a .npz split, a DICOM series (its
    single-frame files, one volume), or a planned rejection."""

    kind: str  # "file" | "npz" | "series" | "reject"
    path: str
    base: str  # source name of the input; rejections are reported under it
    split: str | None = None
    start: int = 0
    stop: int = 0
    split_size: int = 0
    modality: str = "OT"
    reason: str = ""
    nbytes: int = 0  # pixel bytes of one .npz image, or the file's size: orders the work
    paths: tuple[str, ...] = ()  # a series' slice files (path is the first)

    @property
    def cost(self) -> int:
        return self.nbytes * (self.stop - self.start if self.kind == "npz" else 1)

    def source(self, index: int, n: int) -> str:
        """`x.npz:split:i`, `dir/file` or, for multi-frame files, `dir/file#i`."""
        if self.kind == "npz":
            return f"{self.base}:{index}"
        return self.base if n == 1 else f"{self.base}#{index}"


# ----------------------------------------------------------------------------------- planning
def _npz_units(path: Path, base: str, splits: tuple[str, ...], cfg: DictConfig) -> list[Unit]:
    try:
        shapes = readers.npz_split_shapes(path, splits)
    except UnreadableImageError as exc:
        return [Unit("reject", str(path), base, reason=redact(str(exc), str(path), base))]
    modality = readers.npz_modality(path, OmegaConf.to_container(cfg.npz_modality))
    units: list[Unit] = []
    for split, shape in shapes.items():
        if isinstance(shape, str):
            reason = redact(shape, str(path), f"{base}:{split}")
            units.append(Unit("reject", str(path), f"{base}:{split}", reason=reason))
            continue
        # Bound a work unit to ~4 MB of pixels: large images get smaller chunks.
        nbytes = max(1, int(np.prod(shape[1:])))
        chunk = max(1, min(int(cfg.npz_chunk), (4 << 20) // nbytes))
        for start in range(0, shape[0], chunk):
            stop = min(shape[0], start + chunk)
            units.append(
                Unit(
                    "npz",
                    str(path),
                    f"{base}:{split}",
                    split,
                    start,
                    stop,
                    shape[0],
                    modality,
                    nbytes=nbytes,
                )
            )
    return units


def list_files(root: Path, exclude: Path | None) -> list[tuple[str, Path, str]]:
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


def group_series(units: list[Unit]) -> list[Unit]:
    """Single-frame DICOM files sharing a SeriesInstanceUID -> one "series" unit (a volume),
    named after its first file (`dir/first.dcm@series`); other files stay as they are. Reads
    headers only; a file whose header does not read stays a file unit (rejected when decoded)."""
    from pretrain.data.volumes import read_dicom_header, series_uid

    members: dict[str, list[Unit]] = {}
    for unit in units:
        if unit.kind != "file" or readers.sniff(unit.path) != "dicom":
            continue
        try:
            uid = series_uid(read_dicom_header(Path(unit.path)))
        except UnreadableImageError:
            continue
        if uid is not None:
            members.setdefault(uid, []).append(unit)
    grouped: dict[str, Unit] = {}
    for slices in members.values():
        if len(slices) < 2:
            continue
        first = slices[0]
        series = Unit(
            "series",
            first.path,
            f"{first.base}@series",
            nbytes=sum(u.nbytes for u in slices),
            paths=tuple(u.path for u in slices),
        )
        for unit in slices:
            grouped[unit.path] = series
    out, seen = [], set()
    for unit in units:
        series = grouped.get(unit.path) if unit.kind == "file" else None
        if series is None:
            out.append(unit)
        elif series.base not in seen:
            seen.add(series.base)
            out.append(series)
    return out


def plan_inputs(sources: list[str], cfg: DictConfig, exclude: Path | None = None) -> list[Unit]:
    """Every input in deterministic order: SRC order, then sorted relative paths (a DICOM series
    where its first file is, with `dicom.volumes`)."""
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
        for base, path, why in list_files(Path(text), exclude):
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
                units.append(Unit("file", str(path), base, nbytes=path.stat().st_size))
    if cfg.dicom.volumes:
        units = group_series(units)
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
def redact(text: str, path: str, base: str) -> str:
    """An error message with the input's path, source name and each part of them redacted: the
    pseudonym already names the input, and folder and file names can name a patient."""
    text = text.removeprefix(f"{path}: ")
    names = {path, base, *Path(path).parts, *base.replace(":", "/").split("/")}
    for name in sorted((n for n in names if len(n) >= 3), key=len, reverse=True):
        text = text.replace(name, "<input>")
    return text


def _reason(exc: Exception, unit: Unit) -> str:
    text = redact(str(exc), unit.path, unit.base)
    for path in unit.paths:  # any slice of a series
        text = redact(text, path, unit.base)
    return text


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


def _unit_samples(unit: Unit, opts: dict, naming: Naming) -> list[dict]:
    if unit.kind == "npz":
        images = readers.npz_images(
            unit.path, str(unit.split), unit.start, unit.stop, modality=unit.modality
        )
        if (
            len(images) != unit.stop - unit.start
            or images[0].record["n_in_source"] != unit.split_size
        ):
            raise UnreadableImageError(f"{unit.path}: changed while ingesting")
    elif unit.kind == "series":
        from pretrain.data.volumes import read_dicom_series

        dicom_opts = {k: v for k, v in opts.items() if k not in ("modality", "dicom_volumes")}
        images = [read_dicom_series(unit.paths, site_key=naming.site, **dicom_opts)]
    else:
        images = readers.read_image_file(unit.path, site_key=naming.site, **opts)
    return [_encode(unit, img, naming) for img in images]


# ------------------------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class Block:
    """The inputs of one shard index: `shard-NNNNNN.tar` (+ `shard-NNNNNN_0001.tar`... when its
    files hold more frames than shard_size). A pure function of the planned inputs and
    shard_size, so the output is the same for any number of workers or array tasks."""

    index: int
    units: tuple[Unit, ...]

    @property
    def cost(self) -> int:
        return sum(unit.cost for unit in self.units)


def plan_blocks(units: list[Unit], shard_size: int) -> list[Block]:
    """Consecutive units, shard_size expected samples a block (a file counts one, a .npz chunk its
    length, a rejection none); .npz chunks are cut at block edges."""
    blocks: list[Block] = []
    current: list[Unit] = []
    room = shard_size

    def close() -> None:
        nonlocal current, room
        blocks.append(Block(len(blocks), tuple(current)))
        current, room = [], shard_size

    for unit in units:
        while unit.kind == "npz" and unit.stop - unit.start > room:
            current.append(replace(unit, stop=unit.start + room))
            unit = replace(unit, start=unit.start + room)
            close()
        current.append(unit)
        room -= {"file": 1, "npz": unit.stop - unit.start}.get(unit.kind, 0)
        if room <= 0:
            close()
    if current:
        close()
    return blocks


def task_blocks(blocks: list[Block], task: int, tasks: int) -> list[Block]:
    """Array task `task` of `tasks`: a contiguous slice of the blocks (a pure function of both)."""
    bounds = np.linspace(0, len(blocks), tasks + 1).round().astype(int)
    return blocks[bounds[task] : bounds[task + 1]]


def _done_path(parts: Path, index: int) -> Path:
    return parts / f"block-{index:06d}.json"


def block_files(out: Path, index: int) -> list[Path]:
    """Shards and temp shards of block `index` (`shard-B.tar`, `shard-B_0001.tar.tmp`, ...)."""
    first = shards.shard_name(index)
    pieces = first.removesuffix(shards.SHARD_SUFFIX) + "_*"
    return sorted({*out.glob(first + "*"), *out.glob(pieces)})


def read_done(parts: Path, index: int) -> dict | None:
    """A block's commit record ({"shards", "records", "rejected"}), or None when it has none: never
    committed, cut by a kill, or its shards gone."""
    try:
        done = json.loads(_done_path(parts, index).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not isinstance(done, dict) or not {"shards", "records", "rejected"} <= done.keys():
        return None
    if not all((parts.parent / name).is_file() for name in done["shards"]):
        return None
    return done


def needs_work(done: dict | None) -> bool:
    """Uncommitted, or committed with a transient rejection that the next run tries again."""
    return done is None or any(is_transient(r["reason"]) for r in done["rejected"])


def is_transient(reason: str) -> bool:
    return reason.startswith(TRANSIENT)


def write_block(task: tuple[Block, dict, Naming, str, int]) -> tuple[int, int, list[dict]]:
    """Worker: decode and encode one block's inputs into its own shards, rename them, then write
    the block's commit record. Returns (block index, samples, rejections). Bad input is rejected,
    never raised; a failing disk raises.

    Test hook: $MEDSSL_INGEST_TEST_EXIT_AFTER="K" exits (75) after the K-th block of this process
    renamed its shards, before its commit record; "K,M" after M samples went into the next
    block's first temp shard."""
    block, opts, naming, out_dir, size = task
    out = Path(out_dir)
    for stale in block_files(out, block.index):  # from an attempt killed before its record
        stale.unlink()
    records: list[dict] = []
    rejected: list[dict] = []
    writer: shards.ShardWriter | None = None
    names: list[str] = []

    def commit() -> None:
        nonlocal writer
        assert writer is not None
        path = writer.commit()
        names.append(path.name)
        records.extend({**rec, "shard": path.name} for rec in writer.records)
        writer = None

    try:
        for unit in block.units:
            samples, reason = process_unit(unit, opts, naming)
            if reason is not None:
                rejected.append({"source": naming.shown(unit.base), "reason": reason})
            for sample in samples:
                if writer is None:
                    writer = shards.ShardWriter(out, block.index, len(names))
                writer.write(sample)
                if not names:
                    _test_hook(renamed=False, samples=len(writer))
                if len(writer) == size:
                    commit()
        if writer is not None:
            commit()
    finally:
        if writer is not None:
            writer.abort()
    _test_hook(renamed=True)
    done = {"shards": names, "records": records, "rejected": rejected}
    atomic_write(_done_path(out / PARTS, block.index), json.dumps(done) + "\n")
    return block.index, len(records), rejected


_blocks_written = 0


def _test_hook(renamed: bool, samples: int = 0) -> None:
    """See write_block: called once a block's shards are renamed, and per sample written into its
    first temp shard."""
    global _blocks_written
    spec = os.environ.get(TEST_EXIT_ENV)
    if not spec:
        return
    k, _, m = spec.partition(",")
    if renamed:
        _blocks_written += 1
        if not m and _blocks_written == int(k):
            os._exit(75)
    elif m and _blocks_written == int(k) and samples == int(m):
        os._exit(75)


def process_unit(unit: Unit, opts: dict, naming: Naming) -> tuple[list[dict], str | None]:
    """Encoded samples of one unit, or ([], rejection reason). Never raises for bad input."""
    if unit.kind == "reject":
        return [], unit.reason  # written by the planner, already without names
    try:
        return _unit_samples(unit, opts, naming), None
    except UnreadableImageError as exc:
        return [], _reason(exc, unit)
    except MemoryError:
        return [], "out of memory while decoding"
    except OSError as exc:  # permissions, a file system that went away: worth another try
        return [], f"cannot open: {exc.strerror or type(exc).__name__}"
    except Exception as exc:  # an unforeseen decoder failure must not stop the other inputs
        return [], f"unexpected {type(exc).__name__}: {_reason(exc, unit)}"[:400]


# ------------------------------------------------------------------------------ run and merge
def jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def check_site_key(out: Path, naming: Naming) -> None:
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


def check_same_settings(
    out: Path, cfg: DictConfig, volatile: tuple[str, ...] = VOLATILE_KEYS
) -> None:
    """A re-run resumes only the same run: other inputs or settings would mix two datasets."""
    if not (out / "config.yaml").exists() or not (out / ".parts").exists():
        return
    old = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    new = OmegaConf.to_container(cfg)
    for key in sorted((set(old) | set(new)) - set(volatile)):
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
        u.base: {"input": naming.key(u.base), "source": u.base, "path": u.path}
        | ({"paths": list(u.paths)} if u.paths else {})
        for u in units
    }
    path = folder / "sources.jsonl"
    private_jsonl(path, [*roots, *inputs.values()])
    return path


def _check_layout(parts: Path) -> None:
    """Refuse an OUT written before ingest committed by blocks (one part file per shard)."""
    if (parts / "rejected.jsonl").exists() or any(parts.glob("shard-*.jsonl")):
        raise IngestError(
            f"{parts.parent} was written by an earlier version of ingest (per-shard part files); "
            "use a new --out"
        )


def lock_output(out: Path, task: tuple[int, int] | None) -> list:
    """A whole run excludes every other run on OUT; array tasks exclude only their own twin."""
    wanted = [(out / ".lock", fcntl.LOCK_SH if task else fcntl.LOCK_EX)]
    if task:
        wanted.append((out / PARTS / f".lock-task-{task[0]}-of-{task[1]}", fcntl.LOCK_EX))
    held = []
    for path, mode in wanted:
        handle = open(path, "w")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except OSError as exc:
            raise IngestError(f"{out}: another ingest is writing here") from exc
        held.append(handle)
    return held


def ingest(cfg: DictConfig, task: tuple[int, int] | None = None) -> dict[str, Any]:
    """Run the ingest described by cfg (see configs/ingest.yaml); returns the summary.

    `task=(i, n)` does only array task i's blocks (of n) and writes no manifest: a run without
    `task` afterwards does what is left (nothing, when every task succeeded) and merges."""
    started, out = time.time(), Path(cfg.out)
    if cfg.sources not in SOURCE_MODES:
        raise IngestError(f"sources must be one of {SOURCE_MODES}, got {cfg.sources!r}")
    if cfg.dicom.burned_in not in BURNED_IN_POLICIES:
        raise IngestError(
            f"dicom.burned_in must be one of {BURNED_IN_POLICIES}, got {cfg.dicom.burned_in!r}"
        )
    if task is not None and not 0 <= task[0] < task[1]:
        raise IngestError(f"--task {task[0]} is not in 0..{task[1] - 1} (--tasks {task[1]})")
    naming = Naming(resolve_site_key(cfg.patient_salt_file, out=out), cfg.sources == "keep")
    units = plan_inputs(list(cfg.src), cfg, exclude=out)  # bad SRC: fail before touching OUT
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    locks = lock_output(out, task)
    _check_layout(parts)
    check_site_key(out, naming)
    shown = OmegaConf.merge(cfg, {"src": [naming.shown(src) for src in cfg.src]})
    check_same_settings(out, shown)
    save_config(shown, out)
    _write_private_map(cfg, units, naming)
    blocks = plan_blocks(units, int(cfg.shard_size))
    mine = task_blocks(blocks, *task) if task else blocks
    todo = [b for b in mine if needs_work(read_done(parts, b.index))]
    logger.info(
        "%d input unit(s) in %d block(s) (shards); this run: %d block(s), %d to do (site key %s)",
        len(units),
        len(blocks),
        len(mine),
        len(todo),
        naming.site.fingerprint(),
    )
    opts = {
        "modality": str(cfg.raster_modality),
        "burned_in": str(cfg.dicom.burned_in),
        "ct_window_preset": cfg.dicom.ct_window_preset,
        "use_window_tags": bool(cfg.dicom.use_window_tags),
        "dicom_volumes": bool(cfg.dicom.volumes),
    }
    work = [(block, opts, naming, str(out), int(cfg.shard_size)) for block in todo]
    bar = tqdm(total=len(todo), unit="shard", disable=not cfg.progress, desc="ingest")
    for _, samples, rejected in map_blocks(
        write_block, work, int(cfg.workers), [b.cost for b in todo]
    ):
        for rejection in rejected:
            logger.warning("rejected %s: %s", rejection["source"], rejection["reason"])
        bar.update(1)
        bar.set_postfix(samples=samples)
    bar.close()
    if task is not None:
        done = [read_done(parts, b.index) or {} for b in mine]
        summary = counts(done, started) | {"task": task[0], "tasks": task[1]}
    else:
        # of the config saved beside the output; inputs are raw files: no manifest to hash
        record = provenance(shown, site=naming.site)
        summary = _merge(out, blocks, [naming.shown(u.base) for u in units], started, record)
    for handle in locks:
        handle.close()
    return summary


def map_blocks(fn: Callable, work: list, workers: int, costs: list[int]) -> Iterator:
    """fn over `work` in `workers` processes, costliest first (so no worker is left with the big
    blocks at the end) and in any order; each block writes its own shards and commit record, so
    nothing serialises on one writer. One worker: in order, in this process."""
    if workers < 2 or len(work) < 2:
        yield from map(fn, work)
        return
    ctx = mp.get_context("forkserver")  # never fork a threaded parent; workers import us once
    ctx.set_forkserver_preload([__name__])
    order = sorted(range(len(work)), key=lambda i: -costs[i])
    with ctx.Pool(min(workers, len(work))) as pool:
        yield from pool.imap_unordered(fn, [work[i] for i in order])


def counts(done: list[dict], started: float) -> dict[str, Any]:
    return dict(
        ingested=sum(len(d.get("records", [])) for d in done),
        rejected=sum(len(d.get("rejected", [])) for d in done),
        seconds=round(time.time() - started, 3),
        shards=sum(len(d.get("shards", [])) for d in done),
    )


def _merge(
    out: Path, blocks: list[Block], names: list[str], started: float, record: dict[str, Any]
) -> dict[str, Any]:
    """manifest.jsonl, rejected.jsonl and summary.json from every block's commit record."""
    done = [read_done(out / PARTS, b.index) for b in blocks]
    missing = [b.index for b, d in zip(blocks, done) if d is None]
    if missing:  # a block that failed after its work was planned (e.g. its disk went away)
        raise IngestError(f"{out}: block(s) {missing[:10]} not committed; run the command again")
    atomic_write(out / "manifest.jsonl", "".join(jsonl(d["records"]) for d in done))
    reasons = {r["source"]: r["reason"] for d in done for r in d["rejected"]}
    ordered = list(dict.fromkeys(name for name in names if name in reasons))
    rejected = [{"source": name, "reason": reasons[name]} for name in ordered]
    atomic_write(out / "rejected.jsonl", jsonl(rejected))
    summary = counts(done, started) | {"rejected": len(rejected), "provenance": record}
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="*", help="files, folders, x.npz or x.npz:split; key=value")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest")
    parser.add_argument("--shard-size", type=int, help="samples per shard")
    parser.add_argument("--workers", type=int, help="decoding processes")
    parser.add_argument("--config", help="recipe YAML over curation/configs/ingest.yaml")
    parser.add_argument(
        "--task", type=int, help="array task I: only its slice of the shards, no manifest"
    )
    parser.add_argument("--tasks", type=int, help="number of array tasks (with --task)")


def _absolute(src: str) -> str:
    if ".npz:" in src:
        file_part, split = src.rsplit(":", 1)
        return f"{Path(file_part).resolve()}:{split}"
    return str(Path(src).resolve())


def run(args: argparse.Namespace) -> int:
    """`python -m curation ingest`: exit 0 when anything was ingested (or an array task ran)."""
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
    if (args.task is None) != (args.tasks is None):
        raise IngestError("--task I and --tasks N go together")
    task = None if args.task is None else (args.task, args.tasks)
    summary = ingest(cfg, task)
    print(json.dumps(summary), flush=True)
    if task is not None:
        return 0  # the run after the array decides whether anything was ingested
    if summary["ingested"] == 0:
        print(
            f"error: nothing could be ingested: {summary['rejected']} input(s) rejected, reasons "
            f"in {Path(cfg.out) / 'rejected.jsonl'}",
            file=sys.stderr,
        )
    return 0 if summary["ingested"] else 1
