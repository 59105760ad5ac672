"""Image readers: raster files (PNG/JPEG/TIFF/BMP), DICOM (see dicom.py) and MedMNIST .npz.

Files are recognised by their first bytes, not their name, because real collections hold PNGs called
.jpg and DICOMs without an extension. Every reader returns *stored* values in their original dtype
(16-bit stays 16-bit) plus a PHI-free record; intensity mapping happens later (windowing.py).
"""

from __future__ import annotations

import functools
import logging
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    from pretrain.privacy import SiteKey

logger = logging.getLogger(__name__)

NPZ_SPLITS = ("train", "val", "test")
# DICOM first: many DICOM files carry a TIFF header in their 128-byte preamble (dual-personality).
_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"DICM", 128, "dicom"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"\xff\xd8\xff", 0, "jpeg"),
    (b"II*\x00", 0, "tiff"),
    (b"MM\x00*", 0, "tiff"),
    (b"II+\x00", 0, "tiff"),
    (b"MM\x00+", 0, "tiff"),
    (b"BM", 0, "bmp"),
    (b"PK\x03\x04", 0, "npz"),
    (b"PK\x05\x06", 0, "npz"),
)
RASTER_KINDS = ("png", "jpeg", "tiff", "bmp")


class UnreadableImageError(ValueError):
    """A file that cannot be turned into images; the message names the file and the reason."""


@dataclass
class DecodedImage:
    pixels: np.ndarray  # stored values, H×W or H×W×C, original dtype
    record: dict[str, Any]  # PHI-free description, see make_record


def make_record(
    pixels: np.ndarray,
    *,
    modality: str,
    photometric: str,
    bits: int,
    index_in_source: int = 0,
    n_in_source: int = 1,
    patient: str | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    window_center: float | None = None,
    window_width: float | None = None,
    window_preset: str | None = None,
    invert: bool = False,
    **extra_pixel: Any,
) -> dict[str, Any]:
    """The one record layout shared by all readers (others read these names)."""
    return {
        "modality": modality,
        "photometric": photometric,
        "bits": int(bits),
        "channels": 1 if pixels.ndim == 2 else int(pixels.shape[2]),
        "height": int(pixels.shape[0]),
        "width": int(pixels.shape[1]),
        "index_in_source": int(index_in_source),
        "n_in_source": int(n_in_source),
        "patient": patient,
        "pixel": {
            "slope": float(slope),
            "intercept": float(intercept),
            "window_center": None if window_center is None else float(window_center),
            "window_width": None if window_width is None else float(window_width),
            "window_preset": window_preset,
            "invert": bool(invert),
            **extra_pixel,
        },
    }


def sniff(path: str | Path) -> str:
    """Content kind of a file from its magic bytes:
    png|jpeg|tiff|bmp|npz|dicom|nifti (also gzipped)|empty|unknown."""
    with open(path, "rb") as f:
        head = f.read(132)
    if not head:
        return "empty"
    for magic, offset, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    from pretrain.data.volumes import is_nifti

    return "nifti" if is_nifti(path) else "unknown"


def _palette_to_array(im: Image.Image) -> np.ndarray:
    rgb = np.asarray(im.convert("RGB"))
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
        return np.ascontiguousarray(rgb[..., 0])  # grey palette: keep one channel
    return rgb


def _pil_to_array(im: Image.Image, path: Path) -> np.ndarray:
    mode = im.mode
    if mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)  # native byte order whatever the file's
    if mode == "I":
        arr = np.asarray(im)
        if arr.size and arr.min() >= 0 and arr.max() <= 65535:
            return arr.astype(np.uint16)
        return arr.astype(np.int32)
    if mode == "F":
        return np.asarray(im, dtype=np.float32)
    if mode in ("1", "L", "LA", "La"):  # alpha is not image content
        return np.asarray(im.convert("L"))
    if mode in ("P", "PA"):
        return _palette_to_array(im)
    if mode in ("RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"))
    raise UnreadableImageError(f"{path}: unsupported image mode {mode!r}")


def read_raster(path: str | Path, *, modality: str = "OT") -> list[DecodedImage]:
    """All frames/pages of a PNG/JPEG/TIFF/BMP file as stored values."""
    path = Path(path)
    out: list[DecodedImage] = []
    try:
        with Image.open(path) as im:
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            for index in range(n_frames):
                im.seek(index)
                im.load()
                frame = ImageOps.exif_transpose(im) if n_frames == 1 else im
                arr = np.ascontiguousarray(_pil_to_array(frame, path))
                if arr.size == 0:
                    raise UnreadableImageError(f"{path}: image has no pixels")
                bits = 8 if arr.dtype == np.uint8 else 8 * arr.dtype.itemsize
                photometric = "RGB" if arr.ndim == 3 else "MONOCHROME2"
                record = make_record(
                    arr,
                    modality=modality,
                    photometric=photometric,
                    bits=bits,
                    index_in_source=index,
                    n_in_source=n_frames,
                )
                out.append(DecodedImage(arr, record))
    except UnreadableImageError:
        raise
    except UnidentifiedImageError as exc:
        raise UnreadableImageError(
            f"{path}: not a decodable image ({exc.__class__.__name__})"
        ) from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(f"{path}: corrupt or truncated image: {exc}") from exc
    return out


def read_image_file(
    path: str | Path,
    *,
    site_key: SiteKey | None = None,
    modality: str = "OT",
    ct_window_preset: str | None = "mediastinum",
    use_window_tags: bool = True,
    burned_in: str = "reject",
    dicom_volumes: bool = False,
) -> list[DecodedImage]:
    """Read a DICOM, NIfTI or raster image file (all frames), choosing the decoder by content.

    NIfTI files give D×H×W volumes (see volumes.py); so does a volumetric multi-frame DICOM when
    `dicom_volumes` (else one 2D image per frame). modality: recorded for raster and NIfTI
    files, which carry none. ct_window_preset: window recorded for
    CT DICOMs without window tags (None: percentile stretch at float time). use_window_tags: record
    DICOM WindowCenter/WindowWidth when present. site_key, burned_in: see dicom.read_dicom.
    """
    path = Path(path)
    if not path.is_file():
        raise UnreadableImageError(f"{path}: not a file")
    kind = sniff(path)
    if kind == "empty":
        raise UnreadableImageError(f"{path}: empty file (0 bytes)")
    if kind == "nifti":
        from pretrain.data.volumes import read_nifti

        return read_nifti(path, modality=modality)
    if kind == "dicom":
        from pretrain.data.dicom import read_dicom
        from pretrain.data.volumes import read_dicom_volume

        return (read_dicom_volume if dicom_volumes else read_dicom)(
            path,
            site_key=site_key,
            ct_window_preset=ct_window_preset,
            use_window_tags=use_window_tags,
            burned_in=burned_in,
        )
    if kind in RASTER_KINDS:
        return read_raster(path, modality=modality)
    if kind == "npz":
        raise UnreadableImageError(f"{path}: is a zip/.npz archive, not an image (use iter_npz)")
    raise UnreadableImageError(
        f"{path}: unrecognised content (not PNG, JPEG, TIFF, BMP, NIfTI or DICOM with a 'DICM' "
        "header)"
    )


def npz_header(path: str | Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of a .npz without loading it (for planning big inputs)."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(shape), dtype


def npz_keys(path: str | Path) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]


# MedMNIST files carry no modality; DICOM codes for the known ones (OP/OPT: ophthalmic photo/OCT,
# SM: slide microscopy, XC: external camera, DX: radiograph).
MEDMNIST_MODALITY = {
    "breastmnist": "US",
    "pneumoniamnist": "DX",
    "chestmnist": "DX",
    "retinamnist": "OP",
    "octmnist": "OPT",
    "dermamnist": "XC",
    "pathmnist": "SM",
    "bloodmnist": "SM",
    "tissuemnist": "SM",
    "organamnist": "CT",
    "organcmnist": "CT",
    "organsmnist": "CT",
    "adrenalmnist3d": "CT",
    "organmnist3d": "CT",
    "nodulemnist3d": "CT",
    "fracturemnist3d": "CT",
    "vesselmnist3d": "MR",
}


def npz_modality(path: str | Path, extra: dict[str, str] | None = None) -> str:
    """Modality of a MedMNIST-style file from its name (`pathmnist_224.npz` -> SM), else OT."""
    stem = Path(path).stem
    mapping = {**MEDMNIST_MODALITY, **(extra or {})}
    base = re.sub(r"_(28|64|128|224)$", "", stem.lower())
    return str(mapping.get(stem, mapping.get(base, "OT")))


def npz_split_shapes(path: str | Path, splits: tuple[str, ...]) -> dict[str, tuple[int, ...] | str]:
    """Per split present: its images' shape, or why it cannot be ingested (without loading it)."""
    try:
        keys = npz_keys(path)
    except Exception as exc:
        raise UnreadableImageError(f"{path}: cannot read as .npz: {exc}") from exc
    present = [s for s in splits if f"{s}_images" in keys]
    if not present:
        wanted = ", ".join(f"{s}_images" for s in splits)
        raise UnreadableImageError(f"{path}: no {wanted} array (not MedMNIST-style)")
    sizes: dict[str, tuple[int, ...] | str] = {}
    for split in present:
        try:
            shape, _ = npz_header(path, f"{split}_images")
            check_npz_images_shape(path, split, shape)
            sizes[split] = shape if shape[0] else f"{path}: '{split}_images' is empty"
        except UnreadableImageError as exc:
            sizes[split] = str(exc)
        except Exception as exc:
            sizes[split] = f"{path}: corrupt .npz: {exc}"
    return sizes


def npz_holds_volumes(shape: tuple[int, ...]) -> bool:
    """N×D×H×W (3D MedMNIST) or N×D×H×W×1, as opposed to N×H×W[×1|3] images."""
    return (len(shape) == 4 and shape[-1] not in (1, 3)) or (len(shape) == 5 and shape[-1] == 1)


def check_npz_images_shape(path: str | Path, split: str, shape: tuple[int, ...]) -> None:
    """Refuse what is neither a stack of 2D images nor a stack of 3D volumes."""
    if len(shape) not in (3, 4) and not npz_holds_volumes(shape):
        raise UnreadableImageError(f"{path}: '{split}_images' has unsupported shape {shape}")


def load_npz_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images N×H×W[×C], labels N×K or None) of one MedMNIST split, validated."""
    path = Path(path)
    if split not in NPZ_SPLITS:
        raise UnreadableImageError(f"{path}: split must be one of {NPZ_SPLITS}, got {split!r}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            key = f"{split}_images"
            if key not in npz.files:
                raise UnreadableImageError(
                    f"{path}: no '{key}' array (has: {', '.join(npz.files) or 'nothing'})"
                )
            images = npz[key]
            check_npz_images_shape(path, split, images.shape)
            labels = npz[f"{split}_labels"] if f"{split}_labels" in npz.files else None
    except UnreadableImageError:
        raise
    except Exception as exc:  # zipfile/np.load raise many types for corrupt archives
        raise UnreadableImageError(f"{path}: cannot read as .npz: {exc}") from exc
    if (images.ndim == 4 or npz_holds_volumes(images.shape)) and images.shape[-1] == 1:
        images = images[..., 0]
    if labels is not None:
        labels = labels.reshape(len(labels), -1)
        if len(labels) != len(images):
            raise UnreadableImageError(
                f"{path}: {len(labels)} {split} labels for {len(images)} images"
            )
    return images, labels


def npz_label(labels: np.ndarray | None, index: int) -> int | None:
    """Single-label tasks give an int; multi-label rows (ChestMNIST) give None."""
    if labels is None or labels.shape[1] != 1:
        return None
    return int(labels[index, 0])


@functools.lru_cache(maxsize=1)
def _cached_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray | None]:
    images, labels = load_npz_split(path, split)
    images.flags.writeable = False  # shared by later calls: nobody may change it
    return images, labels


def npz_images(
    path: str | Path, split: str, start: int = 0, stop: int | None = None, *, modality: str = "OT"
) -> list[DecodedImage]:
    """Images [start, stop) of a split as DecodedImages whose records carry split and label.

    The last split read stays loaded, so reading a split chunk by chunk decompresses it once."""
    images, labels = _cached_split(str(path), split)
    volumes = npz_holds_volumes(images.shape)
    out = []
    for index in range(start, len(images) if stop is None else min(stop, len(images))):
        px = np.ascontiguousarray(images[index])
        record = npz_record(px, volumes, modality=modality, index=index, n=len(images))
        record.update(split=split, label=npz_label(labels, index))
        out.append(DecodedImage(px, record))
    return out


def npz_record(
    pixels: np.ndarray, volume: bool, *, modality: str = "OT", index: int = 0, n: int = 1
) -> dict[str, Any]:
    """The record of one MedMNIST image, or of one 3D MedMNIST volume (no spacing: MedMNIST
    resampled every volume to a cube)."""
    fields: dict[str, Any] = {
        "modality": modality,
        "bits": 8 * pixels.itemsize,
        "index_in_source": index,
        "n_in_source": n,
    }
    if volume:
        from pretrain.data.volumes import volume_record

        return volume_record(pixels, photometric="MONOCHROME2", **fields)
    return make_record(pixels, photometric="RGB" if pixels.ndim == 3 else "MONOCHROME2", **fields)


def iter_npz(path: str | Path, split: str) -> Iterator[tuple[np.ndarray, int | None]]:
    """(image, label) pairs of one split of a MedMNIST-style .npz (D×H×W arrays for 3D files)."""
    images, labels = load_npz_split(path, split)
    if labels is not None and labels.shape[1] != 1:
        logger.warning(
            "%s: %d labels per image (multi-label); labels left out", path, labels.shape[1]
        )
    for index in range(len(images)):
        yield np.ascontiguousarray(images[index]), npz_label(labels, index)
