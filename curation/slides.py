"""Whole-slide images: one reader interface over OpenSlide and tifffile.

OpenSlide (openslide-python + the openslide-bin wheel) reads every vendor format it knows and
generic tiled pyramidal TIFF. It refuses stripped (untiled) TIFFs and sees only the first level
of an OME-TIFF whose pyramid lives in SubIFDs; for those, tifffile (+ zarr, for reading a region
without decoding the whole level) takes over.

Coordinates follow OpenSlide: `read_region((x, y), level, (w, h))` takes the top-left corner in
level-0 pixels and a size in pixels of `level`. Microns per pixel come from the format's
metadata (OpenSlide's `openslide.mpp-x/y`, TIFF resolution tags, OME PhysicalSizeX/Y).

    >>> slide = open_slide("case.svs")                        # doctest: +SKIP
    >>> slide.mpp, slide.level_downsamples                    # doctest: +SKIP
    (0.2525, (1.0, 4.0, 16.0))
    >>> tile = slide.read_region((4096, 2048), 0, (512, 512)) # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
_UNITS_PER_CM = {"CENTIMETER": 1.0, "INCH": 2.54, "MILLIMETER": 0.1, "MICROMETER": 1e-4}


class SlideError(RuntimeError):
    """A slide that cannot be read (message names the reason, never the path)."""


class Slide:
    """A pyramid: level sizes (width, height), downsamples from level 0, mpp (x, y) or None."""

    backend = ""
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: tuple[float, float] | None

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level not coarser than `downsample` (never upsampling a read)."""
        fits = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * 1.001]
        return max(fits, key=lambda i: self.level_downsamples[i]) if fits else 0

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """(h, w, 3) uint8 RGB; area outside the slide is white."""
        raise NotImplementedError

    def read_level(self, level: int) -> np.ndarray:
        """A whole (low-resolution) level as (h, w, 3) uint8 RGB."""
        w, h = self.level_dimensions[level]
        return self.read_region((0, 0), level, (w, h))

    def close(self) -> None:
        pass

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OpenSlideSlide(Slide):
    backend = "openslide"

    def __init__(self, path: Path):
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError) as exc:
            raise SlideError(f"OpenSlide cannot read it ({type(exc).__name__})") from exc
        self.level_dimensions = tuple(self._slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        props = self._slide.properties
        try:
            mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]))
            self.mpp = mpp if min(mpp) > 0 else None
        except (KeyError, ValueError):
            self.mpp = None

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region(location, level, size))
        # RGBA with alpha 0 outside the scanned area: composited over white
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(rgb, 0, 255).astype(np.uint8)

    def close(self) -> None:
        self._slide.close()


class TiffSlide(Slide):
    """tifffile's pyramid levels (SubIFDs or pages) read through zarr, region by region."""

    backend = "tifffile"

    def __init__(self, path: Path):
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(str(path))
            series = self._tif.series[0]
            levels = list(series.levels)
        except Exception as exc:  # tifffile raises many types for a broken file
            raise SlideError(f"tifffile cannot read it ({type(exc).__name__})") from exc
        self._axes = series.axes
        if self._axes not in ("YXS", "YX"):
            raise SlideError(f"unsupported TIFF axes {self._axes!r} (want YXS or YX)")
        self._arrays = [zarr.open(series.aszarr(level=i), mode="r") for i in range(len(levels))]
        dims = [(int(a.shape[1]), int(a.shape[0])) for a in self._arrays]
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple(dims[0][0] / d[0] for d in dims)
        self.mpp = _tiff_mpp(self._tif)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        ds = self.level_downsamples[level]
        x0, y0 = int(location[0] // ds), int(location[1] // ds)
        w, h = size
        lw, lh = self.level_dimensions[level]
        out = np.full((h, w, 3), 255, np.uint8)
        xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, lw), min(y0 + h, lh)
        if xa < xb and ya < yb:
            part = np.asarray(self._arrays[level][ya:yb, xa:xb])
            if part.ndim == 2:
                part = np.repeat(part[..., None], 3, axis=2)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = _to_uint8(part[..., :3])
        return out

    def close(self) -> None:
        self._tif.close()


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    raise SlideError(f"unsupported sample type {arr.dtype} (want 8 or 16 bit)")


def _tiff_mpp(tif) -> tuple[float, float] | None:
    """OME PhysicalSizeX/Y (micrometres) or the first page's resolution tags."""
    if tif.is_ome:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(e for e in root.iter() if e.tag.endswith("Pixels"))
            unit = pixels.get("PhysicalSizeXUnit", "µm")
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit)
            mpp = (float(pixels.get("PhysicalSizeX")), float(pixels.get("PhysicalSizeY")))
            if scale and min(mpp) > 0:
                return (mpp[0] * scale, mpp[1] * scale)
        except (ET.ParseError, StopIteration, TypeError, ValueError):
            pass
    page = tif.pages.first
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    xres, yres = tags.get("XResolution"), tags.get("YResolution")
    if unit is None or xres is None or yres is None:
        return None
    cm = _UNITS_PER_CM.get(getattr(unit.value, "name", str(unit.value)))
    try:
        per_unit = [n / d for n, d in (xres.value, yres.value)]
    except (TypeError, ZeroDivisionError):
        return None
    if cm is None or min(per_unit) <= 0:
        return None  # no unit ("NONE"): pixels per nothing
    return (cm * 1e4 / per_unit[0], cm * 1e4 / per_unit[1])


def open_slide(path: str | Path, backend: str = "auto") -> Slide:
    """OpenSlide first; tifffile for TIFFs OpenSlide refuses or reads with fewer pyramid levels.

    backend: auto | openslide | tifffile."""
    path = Path(path)
    if backend not in ("auto", "openslide", "tifffile"):
        raise ValueError(f"slide backend must be auto, openslide or tifffile, got {backend!r}")
    if backend == "tifffile":
        return TiffSlide(path)
    is_tiff = path.name.lower().endswith(TIFF_SUFFIXES)
    try:
        slide: Slide = OpenSlideSlide(path)
    except SlideError:
        if backend == "openslide" or not is_tiff:
            raise
        return TiffSlide(path)
    if backend == "auto" and is_tiff:
        try:
            other = TiffSlide(path)
        except SlideError:
            return slide
        if other.level_count > slide.level_count:  # an OME pyramid in SubIFDs
            slide.close()
            return other
        other.close()
    return slide
