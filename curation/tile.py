"""Whole-slide images -> tissue tiles at a fixed microns per pixel, as ingest's shards + manifest.

    python -m curation tile SLIDE|FOLDER [...] --out DIR [mpp=0.5] [tile_size=256] [overlap=0]

Per slide (curation/slides.py reads it, OpenSlide or tifffile): a tissue mask on a low-resolution
level (curation/tissue.py, CLAM's segmentation), a grid of `tile_size` tiles at `mpp` over level 0,
each tile read from the finest level not finer than needed and resampled (Lanczos) when no level
has the exact scale, then the quality checks (tissue fraction, pen marks, blur), each counted.

Output, as ingest's: shards of lossless RGB tiles whose records add `slide` (the keyed pseudonym of
the slide's file name: the same in every run), `x`, `y` (level-0 pixels of the top-left corner), `mpp`, `tile_size`,
`tissue_fraction` and `level`; `patient` is the slide's pseudonym, or its patient's key when
`patients_csv=` maps slides to patients (the key for leakage checks and patient-level splits);
slides.jsonl (one summary line per slide), thumbnails/SLIDE.png (tissue mask and tiles drawn
on the slide), rejected.jsonl, summary.json, config.yaml. Slides are ingest's blocks: slide i writes
`shard-i*.tar` and then its commit record .parts/block-i.json, so a re-run tiles only the slides
without one, any worker or array-task count gives the same bytes, and a second run does nothing.
Test hook: $MEDSSL_TILE_TEST_EXIT_AFTER=K exits (75) after the K-th slide of a process committed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from curation import ingest
from curation.slides import Slide, SlideError, open_slide
from curation.tissue import QCParams, TissueParams, check_tile, tile_grid, tissue_fractions
from curation.tissue import tissue_mask as segment
from pretrain.config import load_config, save_config, split_overrides
from pretrain.data import shards
from pretrain.data.readers import make_record
from pretrain.io import atomic_write
from pretrain.privacy import SALT_ENV, PrivacyError, private_jsonl, resolve_site_key
from pretrain.provenance import provenance

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tile.yaml"
TEST_EXIT_ENV = "MEDSSL_TILE_TEST_EXIT_AFTER"
VOLATILE_KEYS = ("workers", "progress", "private_dir", "patient_salt_file")
QC_REASONS = ("tissue", "pen", "blur")
MODALITY = "SM"  # DICOM's slide microscopy


class TileError(RuntimeError):
    """The command cannot run as asked (bad SRC, bad settings, OUT from another run)."""


USER_ERRORS = (TileError, PrivacyError, ingest.IngestError)


class SlideRefused(Exception):
    """This slide cannot be tiled as asked (no mpp, non-square pixels, not in patients_csv)."""


@dataclass(frozen=True)
class SlideUnit:
    index: int  # the slide's block: shard-INDEX*.tar, .parts/block-INDEX.json
    path: str
    base: str  # source name (SRC folder name / relative path)
    patient: str | None  # patient id from patients_csv (private; only its key is written)
    reason: str = ""  # planned rejection


# ----------------------------------------------------------------------------------- planning
def _read_patients(path: str | None) -> dict[str, str] | None:
    if not path:
        return None
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise TileError(f"patients_csv: cannot read it ({exc.strerror})") from exc
    if not rows or not {"slide", "patient"} <= set(rows[0]):
        raise TileError("patients_csv needs a header with columns 'slide' and 'patient'")
    return {row["slide"].strip(): row["patient"].strip() for row in rows}


def plan_slides(cfg: DictConfig, exclude: Path | None = None) -> list[SlideUnit]:
    """Every slide in deterministic order (SRC order, then sorted relative paths); files in a
    folder count when their extension is in `extensions`, a file named on its own always."""
    patients = _read_patients(cfg.patients_csv)
    extensions = tuple(e.lower() for e in cfg.extensions)
    found: list[tuple[str, str, str]] = []
    for text in cfg.src:
        root = Path(text)
        if not root.exists():
            raise TileError(f"{text}: no such file or directory")
        for base, path, why in ingest.list_files(root, exclude):
            if root.is_dir() and not why and not path.name.lower().endswith(extensions):
                continue  # an .mrxs slide's data files, notes, ...
            found.append((base, str(path), why))
    units: list[SlideUnit] = []
    seen: set[str] = set()
    names: dict[str, str] = {}
    for base, path, why in found:
        if base in seen:
            continue
        seen.add(base)
        other = names.setdefault(Path(path).name, base)
        if other != base:  # the file name is the slide's identity across runs
            raise TileError(
                "two slides have the same file name in different folders; a slide is known "
                "by its file name (its key must match in every run, e.g. of an eval set)"
            )
        patient = None
        if patients is not None and not why:
            patient = patients.get(Path(path).name) or patients.get(base)
            if patient is None:
                why = "not in patients_csv (its slide column lists file names)"
        units.append(SlideUnit(len(units), path, base, patient, why))
    return units


# ------------------------------------------------------------------------------------- tiling
@dataclass(frozen=True)
class Settings:
    mpp: float
    mpp_override: float | None
    tile_size: int
    overlap: int
    backend: str
    mask_downsample: float
    tissue: TissueParams
    qc: QCParams
    thumbnail_size: int
    shard_size: int

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
        t = cfg.tissue
        return cls(
            mpp=float(cfg.mpp),
            mpp_override=None if cfg.mpp_override is None else float(cfg.mpp_override),
            tile_size=int(cfg.tile_size),
            overlap=int(cfg.overlap),
            backend=str(cfg.backend),
            mask_downsample=float(t.mask_downsample),
            tissue=TissueParams(
                saturation_threshold=t.saturation_threshold,
                median_blur=int(t.median_blur),
                close=int(t.close),
                open=int(t.open),
                min_object_mm2=float(t.min_object_mm2),
                min_hole_mm2=float(t.min_hole_mm2),
            ),
            qc=QCParams(
                min_tissue_fraction=float(cfg.qc.min_tissue_fraction),
                min_blur_variance=float(cfg.qc.min_blur_variance),
                max_pen_fraction=float(cfg.qc.max_pen_fraction),
            ),
            thumbnail_size=int(cfg.thumbnail_size),
            shard_size=int(cfg.shard_size),
        )


def slide_mpp(slide: Slide, override: float | None) -> tuple[float, str]:
    """Microns per level-0 pixel and where it came from; square pixels only."""
    if slide.mpp is None:
        if override is None:
            raise SlideRefused(
                "no microns-per-pixel metadata; give mpp_override= (microns per level-0 pixel)"
            )
        return override, "override"
    mx, my = slide.mpp
    if abs(mx - my) > 0.02 * max(mx, my):
        raise SlideRefused(f"non-square pixels ({mx:.4f} x {my:.4f} um)")
    return (mx + my) / 2, "metadata"


def low_resolution(slide: Slide, downsample: float) -> tuple[np.ndarray, float]:
    """The slide at about `downsample` (level-0 pixels per pixel): the best pyramid level,
    reduced further in row strips when the pyramid has no level that coarse."""
    level = slide.best_level_for_downsample(downsample)
    level_ds = slide.level_downsamples[level]
    factor = max(1, int(downsample / level_ds))
    if factor == 1:
        return slide.read_level(level), level_ds
    width, height = slide.level_dimensions[level]
    strip = factor * max(1, 4096 // factor)
    rows = []
    for y in range(0, height - factor + 1, strip):
        h = min(strip, (height - y) // factor * factor)
        part = slide.read_region((0, int(round(y * level_ds))), level, (width, h))
        rows.append(np.asarray(Image.fromarray(part).reduce(factor)))
    return np.concatenate(rows, axis=0), level_ds * factor


def slide_key(unit: SlideUnit, naming: ingest.Naming) -> str:
    """The slide's pseudonym, from its file name: the same in every run and folder layout, so
    an eval set tiled on its own matches the pool's tiles of that slide."""
    return naming.key("slide:" + Path(unit.path).name)


def _tile_record(
    tile: np.ndarray, unit: SlideUnit, naming: ingest.Naming, meta: dict[str, Any]
) -> dict:
    source = f"{unit.base}@{meta['x']},{meta['y']}"
    key = naming.key(source)
    slide = slide_key(unit, naming)
    patient = naming.site.patient(unit.patient) if unit.patient is not None else slide
    record = {
        "key": key,
        "source": naming.shown(source),
        "input": slide,
        "key_fingerprint": naming.site.fingerprint(),
        "sha256": shards.pixel_sha256(tile),
        **make_record(
            tile,
            modality=MODALITY,
            photometric="RGB",
            bits=8,
            index_in_source=meta.pop("index"),
            n_in_source=meta.pop("grid"),
            patient=patient,
        ),
        "split": None,
        "label": None,
        "slide": slide,
        **meta,
    }
    return shards.encode_sample(key, tile, record)


def tile_slide(
    unit: SlideUnit, settings: Settings, naming: ingest.Naming, emit
) -> tuple[dict[str, Any], Thumbnail]:
    """Tile one slide, passing each kept tile's sample to `emit`. Returns the slide's summary
    and what its thumbnail shows."""
    started = time.time()
    with open_slide(unit.path, settings.backend) as slide:
        mpp0, mpp_from = slide_mpp(slide, settings.mpp_override)
        low, low_ds = low_resolution(slide, settings.mask_downsample)
        mask = segment(low, mpp0 * low_ds, settings.tissue)
        scale = settings.mpp / mpp0  # level-0 pixels per tile pixel
        level = slide.best_level_for_downsample(scale)
        level_ds = slide.level_downsamples[level]
        read = max(1, int(round(settings.tile_size * scale / level_ds)))
        extent = read * level_ds  # level-0 pixels a tile covers
        step = (settings.tile_size - settings.overlap) * extent / settings.tile_size
        width, height = slide.dimensions
        corners = tile_grid(width, height, extent, step)
        fractions = tissue_fractions(mask, low_ds, corners, extent)
        counts = dict.fromkeys(QC_REASONS, 0)
        counts["tissue"] = int((fractions < settings.qc.min_tissue_fraction).sum())
        tile_mpp = mpp0 * extent / settings.tile_size
        drawn: list[tuple[int, int, float, str | None]] = []
        kept = 0
        for index in np.flatnonzero(fractions >= settings.qc.min_tissue_fraction):
            x, y = corners[index]
            tile = slide.read_region((x, y), level, (read, read))
            if read != settings.tile_size:
                size = (settings.tile_size, settings.tile_size)
                tile = np.asarray(Image.fromarray(tile).resize(size, Image.Resampling.LANCZOS))
            reason = check_tile(tile, float(fractions[index]), settings.qc)
            drawn.append((x, y, float(fractions[index]), reason))
            if reason is not None:
                counts[reason] += 1
                continue
            meta = {
                "index": int(index),
                "grid": len(corners),
                "x": x,
                "y": y,
                "mpp": round(tile_mpp, 6),
                "tile_size": settings.tile_size,
                "tissue_fraction": round(float(fractions[index]), 4),
                "level": level,
            }
            emit(_tile_record(tile, unit, naming, meta))
            kept += 1
        summary = {
            "slide": slide_key(unit, naming),
            "source": naming.shown(unit.base),
            "patient": naming.site.patient(unit.patient)
            if unit.patient is not None
            else slide_key(unit, naming),
            "backend": slide.backend,
            "levels": slide.level_count,
            "width": width,
            "height": height,
            "slide_mpp": round(mpp0, 6),
            "mpp_from": mpp_from,
            "tile_mpp": round(tile_mpp, 6),
            "read_level": level,
            "resampled": read != settings.tile_size,
            "mask_downsample": round(low_ds, 4),
            "tissue_mm2": round(float(mask.sum()) * (mpp0 * low_ds) ** 2 / 1e6, 4),
            "grid": len(corners),
            "kept": kept,
            "rejected": counts,
            "seconds": round(time.time() - started, 3),
        }
        longest = max(width, height) / max(1, settings.thumbnail_size)
        image, image_ds = low_resolution(slide, max(longest, 1.0))
        shrink = settings.thumbnail_size / max(image.shape[:2])
        if shrink < 1:
            size = (max(1, round(image.shape[1] * shrink)), max(1, round(image.shape[0] * shrink)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
            image_ds /= shrink
    return summary, Thumbnail(image, image_ds, mask, low_ds, drawn, extent)


@dataclass
class Thumbnail:
    """A slide's low-resolution image (`image_ds` level-0 pixels per pixel), its tissue mask
    (`mask_ds`) and (x, y, tissue fraction, QC reason) of each tile read, `extent` wide."""

    image: np.ndarray
    image_ds: float
    mask: np.ndarray
    mask_ds: float
    tiles: list[tuple[int, int, float, str | None]]
    extent: float

    def save(self, path: Path) -> None:
        """The image with the tissue mask's outline (blue), kept tiles (green) and tiles
        refused by a quality check (red: pen, orange: blur)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        h, w = self.image.shape[:2]
        fig, ax = plt.subplots(figsize=(w / 100, h / 100), dpi=100)
        ax.imshow(self.image, extent=(0, w, h, 0))
        if self.mask.any() and not self.mask.all():
            r = self.mask_ds / self.image_ds  # mask pixels -> image pixels
            mh, mw = self.mask.shape
            ax.contour(
                self.mask,
                levels=[0.5],
                colors="#1f77b4",
                linewidths=1.0,
                extent=(0, mw * r, 0, mh * r),
                origin="upper",
            )
        colours = {None: "#2ca02c", "pen": "#d62728", "blur": "#ff7f0e"}
        side = self.extent / self.image_ds
        for x, y, _, reason in self.tiles:
            corner = (x / self.image_ds, y / self.image_ds)
            edge = colours.get(reason, "#7f7f7f")
            ax.add_patch(Rectangle(corner, side, side, fill=False, edgecolor=edge, linewidth=0.6))
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
        fig.subplots_adjust(0, 0, 1, 1)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write(path, buf.getvalue())


def write_slide(
    task: tuple[SlideUnit, Settings, ingest.Naming, str],
) -> tuple[int, int, list[dict]]:
    """Worker: one slide's shards, thumbnail and commit record. Bad slides are rejected (with a
    reason that names no path), never raised; a failing disk raises."""
    unit, settings, naming, out_dir = task
    out = Path(out_dir)
    for stale in ingest.block_files(out, unit.index):  # from an attempt killed before its record
        stale.unlink()
    records: list[dict] = []
    names: list[str] = []
    writer: shards.ShardWriter | None = None

    def emit(sample: dict) -> None:
        nonlocal writer
        if writer is None:
            writer = shards.ShardWriter(out, unit.index, len(names))
        writer.write(sample)
        if len(writer) == settings.shard_size:
            commit()

    def commit() -> None:
        nonlocal writer
        assert writer is not None
        path = writer.commit()
        names.append(path.name)
        records.extend({**rec, "shard": path.name} for rec in writer.records)
        writer = None

    rejected: list[dict] = []
    summary = None
    try:
        if unit.reason:
            raise SlideRefused(unit.reason)
        summary, thumbnail = tile_slide(unit, settings, naming, emit)
        if writer is not None:
            commit()
        thumb = Path("thumbnails") / f"{summary['slide']}.png"
        thumbnail.save(out / thumb)
        summary["thumbnail"] = thumb.as_posix()
    except (SlideRefused, SlideError) as exc:
        rejected.append({"source": naming.shown(unit.base), "reason": redact(str(exc), unit)})
    except MemoryError:
        rejected.append({"source": naming.shown(unit.base), "reason": "out of memory while tiling"})
    except OSError as exc:
        reason = f"cannot open: {exc.strerror or type(exc).__name__}"
        rejected.append({"source": naming.shown(unit.base), "reason": reason})
    finally:
        if writer is not None:
            writer.abort()
    if rejected:  # nothing half-done stays behind
        for name in names:
            (out / name).unlink(missing_ok=True)
        names, records = [], []
    done = {"shards": names, "records": records, "rejected": rejected, "slide": summary}
    atomic_write(out / ingest.PARTS / f"block-{unit.index:06d}.json", json.dumps(done) + "\n")
    _test_hook()
    return unit.index, len(records), rejected


def redact(text: str, unit: SlideUnit) -> str:
    return ingest.redact(text, unit.path, unit.base)


_slides_written = 0


def _test_hook() -> None:
    global _slides_written
    spec = os.environ.get(TEST_EXIT_ENV)
    if spec:
        _slides_written += 1
        if _slides_written == int(spec):
            os._exit(75)


# ------------------------------------------------------------------------------ run and merge
def check_settings(cfg: DictConfig) -> None:
    """Every setting checked before any slide is opened."""
    if float(cfg.mpp) <= 0:
        raise TileError(f"mpp must be > 0 microns per pixel, got {cfg.mpp}")
    if cfg.mpp_override is not None and float(cfg.mpp_override) <= 0:
        raise TileError(f"mpp_override must be > 0, got {cfg.mpp_override}")
    if int(cfg.tile_size) < 8:
        raise TileError(f"tile_size must be >= 8 pixels, got {cfg.tile_size}")
    if not 0 <= int(cfg.overlap) < int(cfg.tile_size):
        raise TileError(f"overlap must be in [0, tile_size), got {cfg.overlap}")
    if cfg.backend not in ("auto", "openslide", "tifffile"):
        raise TileError(f"backend must be auto, openslide or tifffile, got {cfg.backend!r}")
    if cfg.sources not in ingest.SOURCE_MODES:
        raise TileError(f"sources must be one of {ingest.SOURCE_MODES}, got {cfg.sources!r}")
    if not 0 <= float(cfg.qc.min_tissue_fraction) <= 1:
        raise TileError(
            f"qc.min_tissue_fraction must be in [0, 1], got {cfg.qc.min_tissue_fraction}"
        )
    if int(cfg.shard_size) < 1:
        raise TileError(f"shard_size must be >= 1, got {cfg.shard_size}")
    if float(cfg.tissue.mask_downsample) < 1:
        raise TileError(f"tissue.mask_downsample must be >= 1, got {cfg.tissue.mask_downsample}")


def tile(cfg: DictConfig, task: tuple[int, int] | None = None) -> dict[str, Any]:
    """Run the tiling described by cfg (configs/tile.yaml); returns the summary. `task=(i, n)`:
    only array task i's slides, no manifest (a run without `task` afterwards merges)."""
    started, out = time.time(), Path(cfg.out)
    check_settings(cfg)
    if task is not None and not 0 <= task[0] < task[1]:
        raise TileError(f"--task {task[0]} is not in 0..{task[1] - 1} (--tasks {task[1]})")
    naming = ingest.Naming(resolve_site_key(cfg.patient_salt_file, out=out), cfg.sources == "keep")
    units = plan_slides(cfg, exclude=out)  # bad SRC: fail before touching OUT
    if not units:
        raise TileError("no slides found in SRC (see `extensions` for the file types looked for)")
    parts = out / ingest.PARTS
    parts.mkdir(parents=True, exist_ok=True)
    locks = ingest.lock_output(out, task)
    ingest.check_site_key(out, naming)
    shown = OmegaConf.merge(
        cfg,
        {
            "src": [naming.shown(s) for s in cfg.src],
            "patients_csv": naming.key(cfg.patients_csv) if cfg.patients_csv else None,
        },
    )
    ingest.check_same_settings(out, shown, VOLATILE_KEYS)
    save_config(shown, out)
    private = Path(cfg.private_dir) if cfg.private_dir else out / "private"
    private_jsonl(
        private / "sources.jsonl",
        [
            {
                "input": naming.key(u.base),
                "slide": slide_key(u, naming),
                "source": u.base,
                "path": u.path,
            }
            for u in units
        ],
    )
    mine = ingest.task_blocks(units, *task) if task else units
    todo = [u for u in mine if ingest.needs_work(ingest.read_done(parts, u.index))]
    logger.info(
        "%d slide(s); this run: %d, %d to tile (site key %s)",
        len(units),
        len(mine),
        len(todo),
        naming.site.fingerprint(),
    )
    settings = Settings.from_config(cfg)
    work = [(u, settings, naming, str(out)) for u in todo]
    costs = [Path(u.path).stat().st_size if not u.reason else 0 for u in todo]
    bar = tqdm(total=len(todo), unit="slide", disable=not cfg.progress, desc="tile")
    for _, tiles, rejected in ingest.map_blocks(write_slide, work, int(cfg.workers), costs):
        for rejection in rejected:
            logger.warning("refused slide %s: %s", rejection["source"], rejection["reason"])
        bar.update(1)
        bar.set_postfix(tiles=tiles)
    bar.close()
    if task is not None:
        done = [ingest.read_done(parts, u.index) or {} for u in mine]
        summary = ingest.counts(done, started) | {"task": task[0], "tasks": task[1]}
    else:
        summary = _merge(out, units, naming, started, provenance(shown, site=naming.site))
    for handle in locks:
        handle.close()
    return summary


def _merge(
    out: Path,
    units: list[SlideUnit],
    naming: ingest.Naming,
    started: float,
    record: dict[str, Any],
) -> dict[str, Any]:
    """manifest.jsonl, slides.jsonl, rejected.jsonl and summary.json from the commit records."""
    done = [ingest.read_done(out / ingest.PARTS, u.index) for u in units]
    missing = [u.index for u, d in zip(units, done) if d is None]
    if missing:
        raise TileError(f"{out}: slide(s) {missing[:10]} not committed; run the command again")
    atomic_write(out / "manifest.jsonl", "".join(ingest.jsonl(d["records"]) for d in done))
    slides = [d["slide"] for d in done if d.get("slide")]
    atomic_write(out / "slides.jsonl", ingest.jsonl(slides))
    rejected = [r for d in done for r in d["rejected"]]
    atomic_write(out / "rejected.jsonl", ingest.jsonl(rejected))
    qc = {reason: sum(s["rejected"][reason] for s in slides) for reason in QC_REASONS}
    summary = ingest.counts(done, started) | {
        "slides": len(slides),
        "slides_refused": len(rejected),
        "tiles_rejected": qc,
        "tissue_mm2": round(sum(s["tissue_mm2"] for s in slides), 4),
        "provenance": record,
    }
    summary["tiles"] = summary.pop("ingested")
    summary.pop("rejected")
    atomic_write(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", nargs="*", help="slide files or folders; key=value overrides")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest")
    parser.add_argument("--workers", type=int, help="slides tiled in parallel")
    parser.add_argument("--config", help="recipe YAML over curation/configs/tile.yaml")
    parser.add_argument("--task", type=int, help="array task I: only its slides, no manifest")
    parser.add_argument("--tasks", type=int, help="number of array tasks (with --task)")


def run(args: argparse.Namespace) -> int:
    """`python -m curation tile`: exit 0 when any tile was written (or an array task ran)."""
    overrides, sources = split_overrides(args.src)
    if any(o.partition("=")[0].strip() == "patient_salt" for o in overrides):
        raise TileError(
            "patient_salt= is not taken on the command line, where shell histories "
            f"and launch records keep it: set ${SALT_ENV} or patient_salt_file=PATH"
        )
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    cfg = load_config(DEFAULT_CONFIG, args.config, overrides)
    cfg.src = [str(Path(s).resolve()) for s in (sources or list(cfg.src))]
    cfg.out = str(Path(args.out).resolve())
    if cfg.patients_csv:
        cfg.patients_csv = str(Path(cfg.patients_csv).resolve())
    if not cfg.src:
        raise TileError("no SRC given (slide files or folders)")
    if (args.task is None) != (args.tasks is None):
        raise TileError("--task I and --tasks N go together")
    task = None if args.task is None else (args.task, args.tasks)
    summary = tile(cfg, task)
    print(json.dumps(summary), flush=True)
    if task is not None:
        return 0
    if summary["tiles"] == 0:
        print(
            f"error: no tiles written: {summary['slides_refused']} slide(s) refused, reasons "
            f"in {Path(cfg.out) / 'rejected.jsonl'}",
            file=sys.stderr,
        )
    return 0 if summary["tiles"] else 1
