"""The shard format every stage reads and writes: lossless pixels plus a PHI-free JSON record.

One sample in a webdataset tar is:
- `KEY.png`: 8-bit or 16-bit PNG (grayscale or RGB) holding the *stored* pixel values, shifted by
  `record["pixel"]["offset"]` when the source was signed (int16 CT); or `KEY.npy` when a PNG cannot
  hold the values losslessly (16-bit RGB, 32-bit, float);
- `KEY.npz` for a volume (D×H×W stored values, `record["volume"]` set; see volumes.py): one
  compressed array `voxels` in its original dtype;
- `KEY.json`: the manifest record (key, source, sha256, modality, height, width, channels, bits,
  split, label, patient hash, pixel restore info);
- `KEY.cls`: the integer label, when known.

Modality values (e.g. Hounsfield units) come back exactly as `stored * slope + intercept`, so a
window can be chosen at training time instead of being baked in at ingest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".tar"


def shard_name(index: int, piece: int = 0) -> str:
    """`shard-000012.tar`; a writer whose shard overflowed continues in `shard-000012_0001.tar`
    (names sort in writing order)."""
    more = f"_{piece:04d}" if piece else ""
    return f"{SHARD_PREFIX}{index:06d}{more}{SHARD_SUFFIX}"


def pixel_sha256(pixels: np.ndarray) -> str:
    """Hash of decoded stored values, shape and dtype: equal iff the images are pixel-identical."""
    arr = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def encode_pixels(pixels: np.ndarray) -> tuple[str, bytes, dict[str, Any]]:
    """Choose the lossless container for `pixels` (H×W or H×W×C); return (ext, bytes, restore info)."""
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected H×W or H×W×C pixels, got shape {pixels.shape}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    info: dict[str, Any] = {"dtype": pixels.dtype.str, "offset": 0}
    dt = pixels.dtype
    stored: np.ndarray | None = None
    if dt == np.bool_:
        stored = pixels.astype(np.uint8)
    elif dt == np.uint8:
        stored = pixels
    elif pixels.ndim == 2 and dt == np.uint16:
        stored = pixels
    elif pixels.ndim == 2 and dt == np.int16:
        info["offset"] = -32768
        stored = (pixels.astype(np.int32) + 32768).astype(np.uint16)
    elif pixels.ndim == 2 and np.issubdtype(dt, np.integer):
        lo, hi = int(pixels.min()), int(pixels.max())
        if hi - lo <= 65535:
            info["offset"] = lo
            stored = (pixels.astype(np.int64) - lo).astype(np.uint16)
    if stored is None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(pixels), allow_pickle=False)
        return "npy", buf.getvalue(), info
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, format="PNG", compress_level=3)
    return "png", buf.getvalue(), info


PIXEL_EXTS = ("png", "npy", "npz")


def encode_voxels(voxels: np.ndarray) -> tuple[str, bytes, dict[str, Any]]:
    """A D×H×W volume as a compressed .npz holding `voxels` in its own dtype (lossless)."""
    if voxels.ndim != 3:
        raise ValueError(f"expected D×H×W voxels, got shape {voxels.shape}")
    buf = io.BytesIO()
    np.savez_compressed(buf, voxels=np.ascontiguousarray(voxels))
    return "npz", buf.getvalue(), {"dtype": voxels.dtype.str, "offset": 0}


def decode_pixels(ext: str, data: bytes, info: dict[str, Any]) -> np.ndarray:
    """Inverse of `encode_pixels` / `encode_voxels`: the stored values in their own dtype."""
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if ext == "npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return npz["voxels"]
    with Image.open(io.BytesIO(data)) as im:
        arr = np.array(im)
    dtype = np.dtype(info.get("dtype", arr.dtype.str))
    offset = int(info.get("offset", 0))
    if offset:
        arr = arr.astype(np.int64) + offset
    if dtype == np.bool_:
        return arr.astype(bool)
    return arr.astype(dtype, copy=False)


def encode_sample(key: str, pixels: np.ndarray, record: dict[str, Any]) -> dict[str, Any]:
    """Build the webdataset sample dict for `pixels`; fills record['pixel'] restore fields."""
    if "." in key:
        raise ValueError(f"sample key must not contain '.': {key!r}")
    volume = isinstance(record.get("volume"), dict)
    ext, data, info = encode_voxels(pixels) if volume else encode_pixels(pixels)
    record = dict(record)
    record["pixel"] = {**record.get("pixel", {}), **info}
    sample: dict[str, Any] = {"__key__": key, ext: data, "json": json.dumps(record).encode()}
    if record.get("label") is not None:
        sample["cls"] = str(record["label"]).encode()
    return sample


def decode_sample(sample: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw webdataset sample (bytes values) -> (stored pixels, record)."""
    record = sample["json"]
    if isinstance(record, (bytes, bytearray)):
        record = json.loads(record)
    for ext in PIXEL_EXTS:
        if ext in sample:
            return decode_pixels(ext, sample[ext], record.get("pixel", {})), record
    raise ValueError(f"sample {sample.get('__key__')!r} has no png/npy/npz member")


def modality_values(pixels: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """Stored values -> modality values (e.g. HU) by the modality LUT recorded at ingest."""
    px = record.get("pixel", {})
    slope = float(px.get("slope", 1.0))
    intercept = float(px.get("intercept", 0.0))
    if slope == 1.0 and intercept == 0.0:
        return pixels.astype(np.float64)
    return pixels.astype(np.float64) * slope + intercept


class ShardWriter:
    """Writes `shard-NNNNNN.tar` under a temporary name and renames it when complete.

    Readers list `*.tar` only, so a job killed mid-shard never exposes a half-written shard.
    Plain `tarfile` with mtime 0 and fixed owner: shards are byte-identical across runs, need no PAX
    header per member (webdataset's writer stamps float mtimes), and writing does not import torch.
    """

    def __init__(self, out_dir: str | Path, index: int, piece: int = 0):
        self.path = Path(out_dir) / shard_name(index, piece)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self._tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self.records: list[dict[str, Any]] = []

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        for ext in sorted(k for k in sample if not k.startswith("__")):
            data = sample[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "medssl"
            self._tar.addfile(info, io.BytesIO(data))
        self.records.append(json.loads(sample["json"]))

    def __len__(self) -> int:
        return len(self.records)

    def commit(self) -> Path:
        self._tar.close()
        with open(self.tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        self._tar.close()
        self.tmp_path.unlink(missing_ok=True)


def iter_shard_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """The JSON records of one shard, in order, without decoding pixels."""
    with tarfile.open(path) as tf:
        for member in tf:
            if member.isfile() and member.name.endswith(".json"):
                f = tf.extractfile(member)
                assert f is not None
                yield json.loads(f.read())


def list_shards(directory: str | Path) -> list[Path]:
    """Committed shards of a directory, sorted (temporary `.tar.tmp` files are ignored)."""
    return sorted(p for p in Path(directory).glob(f"*{SHARD_SUFFIX}") if p.is_file())
