"""Synthetic whole-slide images for the tiling tests: shared microscopy images on a white
background, written as pyramidal TIFFs with resolution tags (tifffile), with the tissue
area known to the pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageFilter


def tissue_texture(medssl_data: Path, height: int, width: int) -> np.ndarray:
    """The shared IHC image (512 x 512), repeated with alternate copies mirrored, so tiles differ."""
    ihc = np.asarray(Image.open(medssl_data / "images" / "ihc.png").convert("RGB"))
    block = np.concatenate([ihc, ihc[:, ::-1]], axis=1)
    block = np.concatenate([block, block[::-1]], axis=0)
    reps = (-(-height // block.shape[0]), -(-width // block.shape[1]), 1)
    return np.tile(block, reps)[:height, :width]


def blank_slide(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Glass: near-white with a little noise (values 249-255), as scanned background is."""
    rng = np.random.default_rng(seed)
    return (255 - rng.integers(0, 7, size=(height, width, 1), dtype=np.uint8)).repeat(3, axis=2)


def disk(height: int, width: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.ogrid[:height, :width]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def write_pyramid(
    path: Path,
    level0: np.ndarray,
    mpp: float | None,
    downsamples: tuple[int, ...] = (1, 4, 16),
    *,
    tiled: bool = True,
    subifds: bool = False,
) -> None:
    """A pyramidal TIFF: levels as consecutive pages (what OpenSlide's generic TIFF reads), or
    in SubIFDs of an OME-TIFF (what it does not); resolution tags in pixels per centimetre."""
    image = Image.fromarray(level0)
    levels = [level0 if d == 1 else np.asarray(image.reduce(d)) for d in downsamples]
    opts = dict(photometric="rgb", compression="zlib", compressionargs={"level": 1})
    if tiled:
        opts["tile"] = (256, 256)

    def res(d: int) -> dict:
        if mpp is None:
            return {}
        per_cm = 1e4 / (mpp * d)
        return dict(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")

    with tifffile.TiffWriter(path, ome=subifds) as tw:
        if subifds:
            meta = {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if mpp else {}
            tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **res(1), **opts)
            for d, level in zip(downsamples[1:], levels[1:]):
                tw.write(level, subfiletype=1, **res(d), **opts)
        else:
            for i, (d, level) in enumerate(zip(downsamples, levels)):
                tw.write(level, subfiletype=0 if i == 0 else 1, metadata=None, **res(d), **opts)


def blurred(region: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(region).filter(ImageFilter.GaussianBlur(radius)))
