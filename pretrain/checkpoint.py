"""Training checkpoints: atomic writes, last-K retention, newest-first resume, RNG capture.

A run is never silently lost: when checkpoints exist but none can be read, resuming refuses
(`ResumeRefused`, exit 2) instead of starting at step 0, naming each file and why;
`train.resume=fresh` then starts over on purpose, moving the unreadable files to
output_dir/unreadable/. Pruning only ever removes checkpoints older than the one just written.

A checkpoint is a plain dict of tensors and builtin containers so that `torch.load(...,
weights_only=True)` reads it: no pickled classes, numpy arrays or config objects. It also carries
`backbone_state` + `backbone_config` (the layout `pretrain.backbones.load_backbone` reads), sharing
storage with the method state, so a checkpoint is directly usable for evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import random
import re
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from pretrain import distributed as du
from pretrain.config import plain
from pretrain.io import atomic_open

if TYPE_CHECKING:
    from pretrain.engine import Engine

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
UNREADABLE_DIR = "unreadable"  # output_dir/unreadable: where train.resume=fresh moves bad files
RESUME_MODES = ("auto", "fresh")
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^ckpt-(\d{8,})\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (unreadable, wrong format, other method)."""


class UnreadableCheckpoint(CheckpointError):
    """One checkpoint file that weights_only loading cannot use, with a short human reason."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


class ResumeRefused(CheckpointError):
    """Checkpoints exist that this run cannot continue from. Refused before any work (exit 2):
    starting at step 0 instead would let keep_last prune the run's history away."""


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(completed steps, path) of complete checkpoints, oldest first; temporary files ignored."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = []
    for path in d.iterdir():
        match = _NAME_RE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(state: dict[str, Any], ckpt_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write `ckpt-STEP.pt` via a temporary file + fsync + rename, then drop all but the last K.

    A job killed while writing leaves only a `.tmp` file, never a truncated checkpoint.
    """
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / checkpoint_name(step)
    tmp = d / f".{path.name}.tmp"
    with atomic_open(path, tmp_name=tmp.name) as f:
        torch.save(state, f)
    if keep_last > 0:
        # Only checkpoints older than this one compete for the keep_last - 1 other places: newer
        # files (unreadable leftovers a resume skipped) must never push the new one out.
        older = [old for s, old in list_checkpoints(d) if s < step]
        for old in older[: max(len(older) - (keep_last - 1), 0)]:
            old.unlink(missing_ok=True)
    for stale in d.glob(".ckpt-*.pt.tmp"):
        if stale != tmp:
            stale.unlink(missing_ok=True)
    return path


def _short(exc: BaseException, limit: int = 200) -> str:
    """The informative line of a torch.load error (weights_only ones are paragraphs long)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line.split(". ", 1)[0] or type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def unreadable_reason(path: str | Path, exc: BaseException) -> str:
    """Why `path` did not load, from its bytes as well as the error: "truncated", "empty file",
    "not a PyTorch checkpoint" tell an operator what happened (full disk, bad copy, wrong file)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        return f"cannot be read ({err})"
    if size == 0:
        return "empty file (0 bytes)"
    if head == _ZIP_MAGIC:
        if not is_zip:
            return f"truncated ({size} bytes; the zip archive has no end record)"
        if isinstance(exc, pickle.UnpicklingError):
            return f"holds objects weights_only loading refuses ({size} bytes): {_short(exc)}"
        return f"damaged zip archive ({size} bytes): {_short(exc)}"
    if isinstance(exc, EOFError):
        return f"truncated ({size} bytes; ended early)"
    return f"not a PyTorch checkpoint ({size} bytes, starts with {head!r}): {_short(exc)}"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's state, or UnreadableCheckpoint naming the file and the reason."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/EOF/OS errors vary
        raise UnreadableCheckpoint(path, unreadable_reason(path, exc)) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise UnreadableCheckpoint(
            path, f"not a medssl training checkpoint (no format {FORMAT_VERSION} dict)"
        )
    return state


def scan_newest(
    ckpt_dir: str | Path,
) -> tuple[tuple[Path, dict[str, Any]] | None, list[UnreadableCheckpoint]]:
    """(newest readable checkpoint or None, the unreadable ones newer than it), read newest first
    and stopping at the first readable one: older files are never loaded (each can be GBs)."""
    bad: list[UnreadableCheckpoint] = []
    for _, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return (path, load_checkpoint(path)), bad
        except UnreadableCheckpoint as exc:
            bad.append(exc)
    return None, bad


def load_newest(ckpt_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint; a corrupt one (disk full, bad copy) is logged and skipped."""
    found, bad = scan_newest(ckpt_dir)
    for exc in bad:
        logger.warning("skipping unreadable checkpoint %s", exc)
    return found


def _move_aside(path: Path, folder: Path) -> Path:
    """Move `path` into `folder` under a name no earlier move used (never overwrites)."""
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / path.name, 0
    while target.exists():
        n += 1
        target = folder / f"{path.name}.{n}"
    shutil.move(str(path), str(target))
    return target


def choose_resume(
    ckpt_dir: str | Path, mode: str, method: str
) -> tuple[Path, dict[str, Any]] | None:
    """Rank 0: the checkpoint this run continues from (None: step 0), or ResumeRefused.

    auto: the newest readable checkpoint (newer unreadable ones are skipped with a warning);
    refused when checkpoints exist but none is readable, or the newest is another method's.
    fresh: the same while a readable checkpoint exists (so a requeued `fresh` command resumes its
    own progress and never discards a run); when none is readable, the files are moved to
    output_dir/unreadable/ (out of reach of pruning and later resumes) and the run starts at 0.
    """
    if mode not in RESUME_MODES:
        raise ResumeRefused(f"train.resume must be one of {RESUME_MODES}, got {mode!r}")
    d = Path(ckpt_dir)
    aside = d.parent / UNREADABLE_DIR
    found, bad = scan_newest(d)
    if found is None:
        if not bad:
            return None
        if mode == "fresh":
            for exc in bad:
                target = _move_aside(exc.path, aside)
                logger.warning(
                    "train.resume=fresh: moved unreadable checkpoint %s (%s) to %s",
                    exc.path.name,
                    exc.reason,
                    target,
                )
            logger.warning("train.resume=fresh: no readable checkpoint; starting at step 0")
            return None
        listing = "".join(f"\n  {exc.path.name}: {exc.reason}" for exc in bad)
        raise ResumeRefused(
            f"{d}: {len(bad)} checkpoint(s) and none is readable, so the run cannot resume; "
            f"refusing to start over at step 0:{listing}\n"
            f"Restore a good copy, or rerun with train.resume=fresh to move them to {aside} and "
            "start at step 0."
        )
    path, state = found
    for exc in bad:
        logger.warning(
            "skipping unreadable checkpoint %s: %s; resuming from the older %s",
            exc.path.name,
            exc.reason,
            path.name,
        )
    if state.get("method") != method:
        raise ResumeRefused(
            f"{path} was written by method {state.get('method')!r}, not {method!r}: "
            "use another output_dir for another method"
        )
    if mode == "fresh":
        logger.info(
            "train.resume=fresh: %s is readable, so the run continues from it "
            "(a new run from step 0 needs another output_dir)",
            path.name,
        )
    return found


# ---- RNG states as weights_only-loadable containers -------------------------------------------


def capture_rng() -> dict[str, Any]:
    """python, numpy, torch CPU and every CUDA device generator, as tensors and tuples."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint has %d CUDA RNG states for %d devices; CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


# ---- one run directory: checkpoints + export, resume -------------------------------------------


@contextlib.contextmanager
def preserve_rng() -> Iterator[dict[str, Any]]:
    """Run side work (monitors, checkpoints) without moving any RNG the training uses; yields the
    states at entry, which is what a checkpoint taken inside the block must record."""
    state = capture_rng()
    try:
        yield state
    finally:
        restore_rng(state)


def gather_rng(state: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every rank's RNG states (`state`, default: now), in rank order (collective)."""
    state = capture_rng() if state is None else state
    if not du.is_dist():
        return [state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


@dataclass(frozen=True)
class ResumePoint:
    """Where a run starts: `path` (None: step 0) on every rank, its state on rank 0 (read once)."""

    path: str | None
    state: dict[str, Any] | None = None


def plan_resume(cfg: DictConfig, is_main: bool) -> ResumePoint:
    """Rank 0 chooses (`choose_resume`), every rank learns the choice; a refusal is raised on
    every rank, so a multi-process run stops together instead of hanging at a collective."""
    ckpt_dir = Path(cfg.output_dir) / CHECKPOINT_DIR
    found, error = None, None
    if is_main:
        try:
            found = choose_resume(ckpt_dir, str(cfg.train.resume), str(cfg.method))
        except ResumeRefused as exc:
            error = str(exc)
    shared = [str(found[0]) if found else None, error]
    if du.is_dist():
        dist.broadcast_object_list(shared, src=0)
    if shared[1] is not None:
        raise ResumeRefused(shared[1])
    return ResumePoint(shared[0], found[1] if found else None)


def _prefix_of(root: torch.nn.Module, target: torch.nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError("backbone_for_export() is not a submodule of the method")


class RunCheckpointer:
    """Checkpoints and exports of one run directory: every rank calls save/resume (they are
    collectives under DDP/FSDP), only rank 0 writes files."""

    def __init__(self, cfg: DictConfig, saved_cfg: DictConfig, engine: Engine, is_main: bool):
        """`saved_cfg`: the config as saved in output_dir (inputs by pseudonym), which
        checkpoints and exports record."""
        self.cfg, self.saved_cfg, self.engine, self.is_main = cfg, saved_cfg, engine, is_main
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / CHECKPOINT_DIR
        self.backbone_prefix = _prefix_of(engine.method, engine.method.backbone_for_export())
        self.last_saved = -1
        self.provenance: dict[str, Any] | None = None
        self.data: dict[str, Any] = {}
        if is_main:
            from pretrain.provenance import data_summary, provenance

            self.provenance = provenance(self.saved_cfg, inputs=[str(cfg.data.train)])
            self.data = {"inputs": self.provenance["inputs"], **data_summary(str(cfg.data.train))}

    def export_meta(self, step: int, source: str) -> dict[str, Any]:
        from pretrain.transforms import default_mean_std

        mean, std = default_mean_std(self.cfg.data.channels)
        return {
            "method": str(self.cfg.method),
            "step": step,
            "images_seen": step * self.engine.global_batch,
            "source": source,
            "mean": list(mean),
            "std": list(std),
            "window": plain(self.cfg.data.window),
            "provenance": self.provenance,
        }

    def export(self, backbone_state: dict[str, torch.Tensor], step: int, source: str) -> None:
        """Write output_dir/export via a temporary directory swapped in at the end."""
        if not self.is_main:
            return
        from pretrain.backbones import build_backbone, export_backbone
        from pretrain.model_card import model_card

        backbone = self.engine.method.backbone_for_export()
        if self.engine.fsdp:  # sharded: a weightless twin takes the gathered full state
            with torch.device("meta"):
                backbone = build_backbone({**plain(self.cfg.model), "drop_path_rate": 0.0})
            backbone.load_state_dict(backbone_state, strict=True, assign=True)
        final, tmp, old = (
            self.out / n for n in (EXPORT_DIR, EXPORT_DIR + ".tmp", EXPORT_DIR + ".old")
        )
        shutil.rmtree(tmp, ignore_errors=True)
        meta = {
            **self.export_meta(step, source),
            "pretraining_data": self.data,
            "card_tags": [str(t) for t in self.cfg.export.tags],
        }
        license = str(self.cfg.export.license)
        card = model_card(
            {**backbone.medssl_config, **meta},
            license=license,
            tags=meta["card_tags"],
            data=self.data,
        )
        export_backbone(backbone, tmp, meta=meta, license=license, card=card)
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def save(self, epoch: int, batch_in_epoch: int, rng: dict[str, Any] | None = None) -> None:
        """Checkpoint + export at the current step (collective: every rank calls it).

        epoch, batch_in_epoch: position of the next batch; rng: this rank's RNG states as the next
        step will find them (default: now).
        """
        engine, step = self.engine, self.engine.step
        model_state, optim_state = engine.state_dicts()
        rngs = gather_rng(rng)
        backbone = {
            k[len(self.backbone_prefix) :]: v
            for k, v in model_state.items()
            if k.startswith(self.backbone_prefix)
        }
        if self.is_main:
            state = {
                "format": FORMAT_VERSION,
                "step": step,
                "method": str(self.cfg.method),
                "model": model_state,
                "optimizer": optim_state,
                "scaler": engine.scaler.state_dict(),
                "counters": engine.counters(),
                "data": {
                    "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch,
                    "global_batch": engine.global_batch,
                    "world_size": engine.world_size,
                },
                "rng": rngs,
                "backbone_state": backbone,  # shares storage with "model": stored once
                "backbone_config": plain(self.cfg.model),
                "config": plain(self.saved_cfg),
                "meta": self.export_meta(step, f"{self.cfg.method} step {step}"),
                "provenance": self.provenance,
            }
            path = save_checkpoint(state, self.ckpt_dir, step, int(self.cfg.train.keep_last))
            logger.info("checkpoint %s", path)
        self.export(backbone, step, f"{self.cfg.method} teacher/backbone at step {step}")
        self.last_saved = step
        du.barrier()

    def resume(self, start: ResumePoint) -> tuple[int, int, dict[str, Any] | None]:
        """Load `start` (see `plan_resume`) into the engine; (epoch, batch_in_epoch, this rank's
        RNG), or (0, 0, None) when the run starts at step 0."""
        engine = self.engine
        if start.path is None:
            return 0, 0, None
        path = start.path
        ckpt = start.state if start.state is not None else load_checkpoint(start.path)
        if ckpt["method"] != str(self.cfg.method):
            raise CheckpointError(
                f"{path} was written by method {ckpt['method']!r}, not {self.cfg.method!r}"
            )
        engine.restore(ckpt["model"], ckpt["optimizer"], ckpt["scaler"], ckpt["counters"])
        data = ckpt["data"]
        epoch, batch = int(data["epoch"]), int(data["batch_in_epoch"])
        rng = None
        if (
            int(data["world_size"]) == engine.world_size
            and int(data["global_batch"]) == engine.global_batch
        ):
            rng = ckpt["rng"][engine.rank]
        else:
            batch = batch * int(data["global_batch"]) // engine.global_batch
            logger.warning(
                "resuming with world size %d (global batch %d) from %d (%d): data position rescaled, "
                "RNG streams reseeded; the run continues but not bit-exactly",
                engine.world_size,
                engine.global_batch,
                data["world_size"],
                data["global_batch"],
            )
        for key, (old, new) in _config_changes(ckpt.get("config", {}), plain(self.cfg)).items():
            logger.warning("config changed since the checkpoint: %s: %r -> %r", key, old, new)
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)", path, engine.step, epoch, batch
        )
        self.last_saved = engine.step
        return epoch, batch, rng


def _config_changes(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    changes = {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(_config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes[f"{prefix}{key}"] = (a, b)
    return changes
