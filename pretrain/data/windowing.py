"""Stored pixels + PHI-free record -> float image in [0, 1], the one place display/training intensity is chosen.

Shards keep stored values (e.g. raw CT integers) so the window is a training-time choice, not an ingest-time
loss. This module applies, in order: the modality LUT (slope/intercept -> e.g. Hounsfield units), a VOI
window (DICOM PS3.3 C.11.2.1.2.1 linear function, the one viewers use) or a min-max/percentile stretch, and
MONOCHROME1 inversion (so bright always means "more signal" for the model).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# Common CT presets in Hounsfield units: (center, width).
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
PERCENTILES = (0.5, 99.5)

Window = str | tuple[float, float] | None


def _modality_float(pixels: np.ndarray, px: Mapping[str, Any]) -> np.ndarray:
    slope = 1.0 if px.get("slope") is None else float(px["slope"])
    intercept = 0.0 if px.get("intercept") is None else float(px["intercept"])
    values = pixels.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def apply_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI function mapped to [0, 1]: 0 below c-0.5-(w-1)/2, 1 above c-0.5+(w-1)/2."""
    if width < 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    if width == 1:
        return (values > center - 0.5).astype(np.float32)
    out = (values - np.float32(center - 0.5)) / np.float32(width - 1) + np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def _stretch(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(values, dtype=np.float32)
    out = (values - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def _resolve_window(window: Window, px: Mapping[str, Any]) -> tuple[float, float] | None:
    if isinstance(window, str):
        if window not in WINDOW_PRESETS:
            raise ValueError(
                f"unknown window {window!r}; use one of {sorted(WINDOW_PRESETS)}, 'minmax', "
                "a (center, width) pair, or None"
            )
        return WINDOW_PRESETS[window]
    if isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"window must be (center, width), got {window!r}")
        return float(window[0]), float(window[1])
    center, width = px.get("window_center"), px.get("window_width")
    if center is not None and width is not None and float(width) >= 1:
        return float(center), float(width)
    return None


def to_float_image(
    pixels: np.ndarray, record: Mapping[str, Any], window: Window = None
) -> np.ndarray:
    """Float32 H×W×C image in [0, 1] (C = 1 or 3) from stored pixels and their record.

    window: None (record's window if any, else /255 for 8-bit and a 0.5-99.5 percentile stretch
    otherwise), a preset name (lung, mediastinum, bone, brain), "minmax", or (center, width) in
    modality units (HU for CT).
    """
    px: Mapping[str, Any] = record.get("pixel", {}) or {}
    arr = np.asarray(pixels)
    if arr.ndim == 3 and arr.shape[2] == 4:  # RGBA: alpha is not image content
        arr = arr[:, :, :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
        raise ValueError(f"expected H×W or H×W×(1|3) pixels, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * np.uint8(255)
    values = _modality_float(arr, px)
    if window == "minmax":
        out = _stretch(values, float(values.min()), float(values.max()))
    else:
        center_width = _resolve_window(window, px)
        if center_width is not None:
            out = apply_window(values, *center_width)
        elif arr.dtype == np.uint8 and not _has_rescale(px):
            out = values / np.float32(255.0)
        else:
            lo, hi = np.percentile(values, PERCENTILES)
            out = _stretch(values, float(lo), float(hi))
    if px.get("invert") or record.get("photometric") == "MONOCHROME1":
        out = np.float32(1.0) - out
    if out.ndim == 2:
        out = out[:, :, None]
    return np.ascontiguousarray(out, dtype=np.float32)


def to_float_volume(
    voxels: np.ndarray, record: Mapping[str, Any], window: Window = None
) -> np.ndarray:
    """Float32 D×H×W volume in [0, 1], by `to_float_image`'s rules over the whole volume (one
    window or one percentile stretch for every slice, so slices stay comparable)."""
    arr = np.asarray(voxels)
    if arr.ndim != 3:
        raise ValueError(f"expected D×H×W voxels, got shape {arr.shape}")
    d, h, w = arr.shape
    flat = to_float_image(arr.reshape(d * h, w), record, window)
    return flat.reshape(d, h, w)


def _has_rescale(px: Mapping[str, Any]) -> bool:
    slope, intercept = px.get("slope"), px.get("intercept")
    return (slope is not None and float(slope) != 1.0) or (
        intercept is not None and float(intercept) != 0.0
    )
