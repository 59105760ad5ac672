"""Volumes (CT/MR series, NIfTI, volumetric multi-frame DICOM, 3D MedMNIST) as one sample each.

A volume is a D×H×W array of *stored* values (int16 Hounsfield units stay int16, restored exactly
by the record's slope/intercept as for 2D) plus a record made by `make_record` with a `volume`
entry: `shape` [D, H, W], `spacing` [slice, row, column] in mm (null where the source does not say),
`orientation` (the row and column direction cosines, 6 floats, or NIfTI axis codes) and, for DICOM
series, `missing_slices` and `uneven_spacing` when the slice positions say so. Axis 0 is the slice
axis, ordered along the slice normal; H×W is each slice as a viewer shows it.

Why pydicom and not SimpleITK's series reader: the 2D path already reads DICOM with pydicom under
the PHI rules of dicom.py (whitelisted record, salted patient key, header values scrubbed from
errors, burned-in text policy), and a series here is those single-frame reads stacked along the
normal; SimpleITK would be a second decoder with its own error messages quoting file names.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data.readers import DecodedImage, UnreadableImageError, make_record

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Relative tolerance on slice gaps: a gap this much off the median is "uneven", ~2x is a missing slice.
SPACING_TOLERANCE = 0.01


def volume_record(
    voxels: np.ndarray,
    *,
    spacing: Sequence[float | None] | None = None,
    orientation: Any = None,
    **fields: Any,
) -> dict[str, Any]:
    """make_record's layout for a D×H×W volume, plus depth and the `volume` entry."""
    if voxels.ndim != 3:
        raise ValueError(f"a volume is D×H×W, got shape {voxels.shape}")
    record = make_record(voxels[0], **fields)
    spacing = [None, None, None] if spacing is None else list(spacing)
    record["depth"] = int(voxels.shape[0])
    record["volume"] = {
        "shape": [int(s) for s in voxels.shape],
        "spacing": [None if s is None else round(float(s), 6) for s in spacing],
        "orientation": orientation,
    }
    return record


def orthogonal_mid_slices(volume: np.ndarray, gap: int = 2) -> np.ndarray:
    """A D×H×W volume's three middle slices side by side (axial H×W | coronal D×W | sagittal
    D×H), each centred on a common height: what a reader checks first in a 3D dataset, and the
    2D stand-in of a volume where curation needs an image (thumbnails, copy detection)."""
    d, h, w = volume.shape
    views = [volume[d // 2], volume[:, h // 2, :], volume[:, :, w // 2]]
    height = max(v.shape[0] for v in views)
    padded = []
    for view in views:
        top = (height - view.shape[0]) // 2
        canvas = np.zeros((height, view.shape[1] + gap), dtype=view.dtype)
        canvas[top : top + view.shape[0], : view.shape[1]] = view
        padded.append(canvas)
    return np.concatenate(padded, axis=1)[:, :-gap]


# -------------------------------------------------------------------------------------- NIfTI
def is_nifti(path: str | Path) -> bool:
    """NIfTI-1/2 by content: magic at byte 344 (n+1/ni1) or 4 (n+2), also inside .nii.gz."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        opener = gzip.open if head == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            header = f.read(352)
    except (OSError, EOFError):
        return False
    return header[344:348] in (b"n+1\x00", b"ni1\x00") or header[4:8] == b"n+2\x00"


def read_nifti(path: str | Path, *, modality: str = "OT") -> list[DecodedImage]:
    """A NIfTI file as volumes: one per 3D image (a 4D series gives one per time point).

    Stored values and the header's scl_slope/scl_inter go to the record unchanged (lossless);
    axes become (slice, row, column) = (k, j, i) reversed from nibabel's (i, j, k), with spacing
    from the voxel sizes and orientation as nibabel's axis codes of the affine (e.g. "RAS")."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        proxy = img.dataobj
        stored = np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
        codes = "".join(nib.aff2axcodes(img.affine))
        slope = getattr(proxy, "slope", 1.0)
        inter = getattr(proxy, "inter", 0.0)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise UnreadableImageError(f"{path}: not a readable NIfTI file ({exc})") from exc
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if stored.ndim == 2:
        stored = stored[:, :, None]
    if stored.ndim == 5 and stored.shape[3] == 1:
        stored = stored[:, :, :, 0]
    if stored.ndim not in (3, 4) or stored.ndim == 4 and stored.shape[3] > 4096:
        raise UnreadableImageError(f"{path}: NIfTI image of shape {stored.shape} is not 3D or 4D")
    times = stored.shape[3] if stored.ndim == 4 else 1
    zooms += [1.0] * (3 - len(zooms))
    out = []
    for t in range(times):
        vol = stored[..., t] if stored.ndim == 4 else stored
        vol = np.ascontiguousarray(np.transpose(vol, (2, 1, 0)))
        if vol.dtype == np.float64:
            vol = vol.astype(np.float32) if np.array_equal(vol.astype(np.float32), vol) else vol
        record = volume_record(
            vol,
            spacing=zooms[::-1],
            orientation=codes,
            modality=modality,
            photometric="MONOCHROME2",
            bits=8 * vol.dtype.itemsize,
            index_in_source=t,
            n_in_source=times,
            slope=slope,
            intercept=inter,
        )
        out.append(DecodedImage(vol, record))
    return out


# -------------------------------------------------------------------------------------- DICOM
def _floats(value: Any, n: int) -> list[float] | None:
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n else None


def _functional(ds: Any, frame: int | None, sequence: str, keyword: str) -> Any:
    """An attribute of an enhanced multi-frame object: per-frame group first, then shared."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if frame < len(per_frame):
            groups.append(per_frame[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return ds.get(keyword)


def slice_geometry(ds: Any, frame: int | None = None) -> dict[str, Any]:
    """Position (3), orientation (6) and pixel spacing (2) of one slice, None where absent."""
    return {
        "position": _floats(
            _functional(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3
        ),
        "orientation": _floats(
            _functional(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
        ),
        "pixel_spacing": _floats(
            _functional(ds, frame, "PixelMeasuresSequence", "PixelSpacing"), 2
        ),
        "spacing_between": _floats(
            [_functional(ds, frame, "PixelMeasuresSequence", "SpacingBetweenSlices")], 1
        ),
    }


def order_slices(
    geometries: Sequence[dict[str, Any]],
) -> tuple[list[int], float | None, dict[str, Any]]:
    """(slice order along the normal, slice spacing, problems) from per-slice geometry.

    The normal is the cross product of the row and column direction cosines; each slice's
    position is projected on it. Spacing is the median gap; `missing_slices` counts the slices
    that gaps of about k×median leave out, `uneven_spacing` flags gaps off the median by more than
    SPACING_TOLERANCE otherwise; `duplicate_positions` counts slices at the same position."""
    n = len(geometries)
    orient = geometries[0]["orientation"] if n else None
    positions = [g["position"] for g in geometries]
    if n < 2 or orient is None or any(p is None for p in positions):
        return list(range(n)), None, {}
    row, col = np.asarray(orient[:3]), np.asarray(orient[3:])
    normal = np.cross(row, col)
    depth = np.asarray([float(np.dot(normal, p)) for p in positions])
    order = [int(i) for i in np.argsort(depth, kind="stable")]
    gaps = np.diff(depth[order])
    problems: dict[str, Any] = {}
    duplicates = int((np.abs(gaps) < 1e-4).sum())
    if duplicates:
        problems["duplicate_positions"] = duplicates
    gaps = gaps[np.abs(gaps) >= 1e-4]
    if not len(gaps):
        return order, None, problems
    spacing = float(np.median(gaps))
    steps = np.rint(gaps / spacing)
    off = np.abs(gaps - steps * spacing) > SPACING_TOLERANCE * spacing
    missing = int((steps[~off] - 1).clip(min=0).sum())  # a gap of k slices exactly: k-1 missing
    if missing:
        problems["missing_slices"] = missing
    if off.any():
        problems["uneven_spacing"] = True
    return order, spacing, problems


def read_dicom_header(path: Path) -> Any:
    """A DICOM header without pixels, pydicom's value-quoting warnings silenced (PHI)."""
    import pydicom

    from pretrain.data.dicom import _quiet_pydicom

    with _quiet_pydicom():
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise UnreadableImageError(
                f"{path}: corrupt or unreadable DICOM header ({type(exc).__name__})"
            ) from exc


def _stack(images: Sequence[DecodedImage], where: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Slices of one volume -> D×H×W stored values and the pixel fields they share.

    Slices with different rescale slope/intercept are stored as modality values (float32,
    slope 1, intercept 0), which keeps them exact in float64 arithmetic for integer inputs."""
    shapes = {img.pixels.shape for img in images}
    if len(shapes) != 1 or images[0].pixels.ndim != 2:
        raise UnreadableImageError(
            f"{where}: slices of different sizes or colour slices ({sorted(shapes)[:3]}) "
            "do not make one volume"
        )
    pixel = dict(images[0].record["pixel"])
    luts = {(img.record["pixel"]["slope"], img.record["pixel"]["intercept"]) for img in images}
    if len(luts) == 1:
        voxels = np.stack([img.pixels for img in images])
    else:
        voxels = np.stack(
            [
                img.pixels.astype(np.float64) * img.record["pixel"]["slope"]
                + img.record["pixel"]["intercept"]
                for img in images
            ]
        ).astype(np.float32)
        pixel.update(slope=1.0, intercept=0.0, per_slice_rescale_applied=True)
    return np.ascontiguousarray(voxels), pixel


def _volume_from_slices(
    images: Sequence[DecodedImage],
    geometries: Sequence[dict[str, Any]],
    where: str,
    *,
    index_in_source: int = 0,
    n_in_source: int = 1,
) -> DecodedImage:
    order, spacing, problems = order_slices(geometries)
    images = [images[i] for i in order]
    first = geometries[order[0]] if geometries else {}
    if spacing is None and first.get("spacing_between"):
        spacing = first["spacing_between"][0]
    voxels, pixel = _stack(images, where)
    rec = images[0].record
    row_spacing, col_spacing = (first.get("pixel_spacing") or [None, None])[:2]
    record = volume_record(
        voxels,
        spacing=[spacing, row_spacing, col_spacing],
        orientation=first.get("orientation"),
        modality=rec["modality"],
        photometric=rec["photometric"],
        bits=rec["bits"],
        index_in_source=index_in_source,
        n_in_source=n_in_source,
        patient=rec.get("patient"),
    )
    record["pixel"] = pixel
    record["volume"].update(problems)
    if problems:
        logger.warning("%s: volume assembled with %s", where, problems)
    return DecodedImage(voxels, record)


def is_volumetric_multiframe(ds: Any) -> bool:
    """A multi-frame object whose frames are slices of one volume (not a cine or a stack of
    projections): per-frame positions that differ, a SpacingBetweenSlices, or an enhanced
    object that says VolumetricProperties=VOLUME with MRAcquisitionType=3D."""
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if n_frames < 2 or int(ds.get("SamplesPerPixel") or 1) != 1:
        return False
    geometries = [slice_geometry(ds, i) for i in range(min(n_frames, 2))]
    positions = [g["position"] for g in geometries]
    if all(p is not None for p in positions) and positions[0] != positions[1]:
        return True
    if geometries[0]["spacing_between"]:
        return True
    return (
        str(ds.get("VolumetricProperties", "")).upper() == "VOLUME"
        and str(ds.get("MRAcquisitionType", "")).upper() == "3D"
    )


def read_dicom_volume(path: str | Path, **read_opts: Any) -> list[DecodedImage]:
    """A volumetric multi-frame DICOM as one volume (frames ordered by their positions); other
    files as dicom.read_dicom gives them (one 2D image per frame)."""
    from pretrain.data.dicom import read_dicom

    path = Path(path)
    frames = read_dicom(path, **read_opts)
    if len(frames) < 2:
        return frames
    ds = read_dicom_header(path)
    if not is_volumetric_multiframe(ds):
        return frames
    geometries = [slice_geometry(ds, i) for i in range(len(frames))]
    return [_volume_from_slices(frames, geometries, str(path))]


def series_uid(ds: Any) -> str | None:
    """SeriesInstanceUID of a single-frame slice that can join a series, else None."""
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if not uid or int(ds.get("NumberOfFrames") or 1) != 1:
        return None
    if "PixelData" not in ds and int(ds.get("Rows") or 0) == 0:
        return None
    return uid


def read_dicom_series(paths: Sequence[str | Path], **read_opts: Any) -> DecodedImage:
    """Single-frame DICOM files of one series -> one volume ordered along the slice normal.

    Raises UnreadableImageError when a slice cannot be decoded or the slices disagree in size."""
    from pretrain.data.dicom import read_dicom

    images, geometries = [], []
    for path in paths:
        decoded = read_dicom(Path(path), **read_opts)
        if len(decoded) != 1:
            raise UnreadableImageError(f"{path}: a series slice must hold one frame")
        images.append(decoded[0])
        geometries.append(slice_geometry(read_dicom_header(Path(path))))
    orientations = {tuple(np.round(g["orientation"], 4)) for g in geometries if g["orientation"]}
    if len(orientations) > 1:
        raise UnreadableImageError(
            f"{paths[0]}: the series' slices have {len(orientations)} orientations (a localiser "
            "or a multi-planar series): not one volume"
        )
    return _volume_from_slices(images, geometries, f"series of {len(paths)} slices")
