"""Map-style datasets over every spec kind, for evaluation probes, curation embedding and small runs.

`open_dataset(spec)` gives a torch Dataset whose items are (image, label): image is the float32
C×H×W tensor in [0, 1] from `windowing.to_float_image` (then `transform(image)` if given), label is
an int (-1 when unknown). Every dataset also exposes, without decoding any pixels again:
`labels` (int64 array, -1 unknown), `num_classes`, `patients` (salted patient hash or None per item,
for patient-level splits) and `keys` (a stable name per item).

- npz (`file.npz:split`): the split is held in memory (MedMNIST is small). Multi-label files
  (ChestMNIST) get label -1, as in `readers.iter_npz`. 3D MedMNIST files give volumes.

Volumes (3D MedMNIST, volume shards; see volumes.py) come out as float32 1×D×H×W tensors.
- image folder: class subfolders give labels (sorted names -> 0..K-1); a flat folder has none.
  Every file is decoded once at indexing time (multi-frame DICOMs become one item per frame, and
  the records give patients, keyed under the site key); unreadable files are skipped with a
  warning naming the file's pseudonym and the reason, and listed in `skipped`. Keys are the
  pseudonyms `curation ingest ROOT` gives the same files, never paths. A file that becomes
  unreadable later raises naming it.
- shards: each tar's member offsets are indexed once (the JSON records are read, pixels are not);
  items are read by positional reads, so nothing is loaded into RAM up front.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pretrain.data.readers import (
    UnreadableImageError,
    load_npz_split,
    npz_holds_volumes,
    npz_label,
    npz_record,
    read_image_file,
)
from pretrain.data.shards import PIXEL_EXTS, decode_sample
from pretrain.data.specs import DatasetSpec, parse_spec
from pretrain.data.windowing import Window, to_float_image, to_float_volume
from pretrain.privacy import SiteKey, resolve_site_key

logger = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], Any]  # float C×H×W in [0, 1] -> whatever the model eats
_MAX_OPEN_SHARDS = 64
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def to_tensor_image(
    pixels: np.ndarray, record: dict[str, Any], window: Window = None
) -> torch.Tensor:
    """Stored pixels + record -> float32 C×H×W tensor in [0, 1] (the input of every transform);
    a volume (record["volume"]) gives 1×D×H×W."""
    if isinstance(record.get("volume"), dict):
        return torch.from_numpy(to_float_volume(pixels, record, window))[None].contiguous()
    return torch.from_numpy(to_float_image(pixels, record, window)).permute(2, 0, 1).contiguous()


def record_label(record: dict[str, Any], sample: dict[str, Any] | None = None) -> int:
    label = record.get("label")
    if label is None and sample is not None and "cls" in sample:
        label = int(sample["cls"])
    return -1 if label is None else int(label)


class _Base(Dataset):
    keys: list[str]
    labels: np.ndarray
    patients: list[str | None]
    num_classes: int

    def __init__(self, spec: DatasetSpec, transform: Transform | None, window: Window):
        self.spec, self.transform, self.window = spec, transform, window

    def __len__(self) -> int:
        return len(self.keys)

    def load(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """Stored pixels and record of item `index`."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Any, int]:
        pixels, record = self.load(index)
        img = to_tensor_image(pixels, record, self.window)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec}, n={len(self)}, num_classes={self.num_classes})"


class NpzDataset(_Base):
    def __init__(
        self, spec: DatasetSpec, transform: Transform | None = None, window: Window = None
    ):
        super().__init__(spec, transform, window)
        assert spec.split is not None
        self.images, labels = load_npz_split(spec.path, spec.split)
        n = len(self.images)
        if labels is not None and labels.shape[1] != 1:
            logger.warning(
                "%s: multi-label file (%d labels per image); labels set to -1",
                spec,
                labels.shape[1],
            )
        self.labels = np.array(
            [-1 if (v := npz_label(labels, i)) is None else v for i in range(n)], dtype=np.int64
        )
        self.num_classes = _npz_num_classes(spec.path, self.labels)
        self.patients = [None] * n
        self.keys = [f"{spec.path.stem}-{spec.split}-{i:06d}" for i in range(n)]

    def load(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        pixels = self.images[index]
        return pixels, npz_record(pixels, npz_holds_volumes(self.images.shape))


def _npz_num_classes(path: Path, labels: np.ndarray) -> int:
    """Classes over all splits: a small val split may miss the highest class."""
    highest = int(labels.max(initial=-1))
    with np.load(path, allow_pickle=False) as npz:
        for name in npz.files:
            if name.endswith("_labels") and npz[name].ndim == 2 and npz[name].shape[1] == 1:
                highest = max(highest, int(npz[name].astype(np.int64).max(initial=-1)))
    return highest + 1


class FolderDataset(_Base):
    def __init__(
        self,
        spec: DatasetSpec,
        transform: Transform | None = None,
        window: Window = None,
        *,
        site_key: SiteKey | None = None,
    ):
        super().__init__(spec, transform, window)
        # keys, patients and log lines name inputs under the site key, never by path: a folder
        # or file name can name a patient (the same keys as `curation ingest ROOT` gives)
        self.site_key = site_key if site_key is not None else resolve_site_key()
        root = spec.path
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        class_dirs = [d for d in class_dirs if any(_files(d))]
        if class_dirs:
            self.classes = [d.name for d in class_dirs]
            files = [(f, c) for c, d in enumerate(class_dirs) for f in _files(d)]
            loose = [f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")]
            if loose:
                logger.warning("%d file(s) beside the class folders ignored", len(loose))
        else:
            self.classes = []
            files = [
                (f, -1)
                for f in sorted(root.iterdir())
                if f.is_file() and not f.name.startswith(".")
            ]
        self.items: list[tuple[Path, int]] = []
        labels: list[int] = []
        self.keys, self.patients, self.skipped = [], [], []
        for path, label in tqdm(
            files, desc="indexing images", unit="file", disable=len(files) < 1000
        ):
            source = f"{root.name}/{path.relative_to(root).as_posix()}"
            try:
                decoded = read_image_file(path, site_key=self.site_key)
            except UnreadableImageError as exc:
                reason = str(exc).replace(str(path), "<input>")
                logger.warning(
                    "skipping unreadable image %s: %s", self.site_key.pseudonym(source), reason
                )
                self.skipped.append(path)
                continue
            for frame, image in enumerate(decoded):
                self.items.append((path, frame))
                labels.append(label)
                self.patients.append(image.record.get("patient"))
                name = source if len(decoded) == 1 else f"{source}#{frame}"
                self.keys.append(self.site_key.pseudonym(name))
        if not self.items:
            raise UnreadableImageError(f"{root}: no readable images ({len(self.skipped)} skipped)")
        self.labels = np.array(labels, dtype=np.int64)
        self.num_classes = len(self.classes)
        self._cache: tuple[Path, list] | None = None  # last file: multi-frame DICOMs decode once

    def load(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        path, frame = self.items[index]
        if self._cache is None or self._cache[0] != path:
            try:
                self._cache = (path, read_image_file(path, site_key=self.site_key))
            except (UnreadableImageError, OSError) as exc:  # changed since indexing
                reason = str(exc).replace(str(path), "<input>")
                raise UnreadableImageError(f"{self.keys[index]}: {reason}") from None
        decoded = self._cache[1]
        if frame >= len(decoded):
            raise UnreadableImageError(
                f"{self.keys[index]}: has {len(decoded)} frame(s) now, indexed {frame + 1}"
            )
        record = decoded[frame].record
        if record.get("patient"):  # which key made it: decontamination refuses to mix keys
            record = {**record, "key_fingerprint": self.site_key.fingerprint()}
        return decoded[frame].pixels, record


def _files(directory: Path):
    return (
        f
        for f in sorted(directory.rglob("*"))
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(directory).parts)
    )


def index_shard(path: Path) -> list[tuple[str, dict[str, tuple[int, int]], dict[str, Any] | None]]:
    """(key, {ext: (data offset, size)}, record) per sample of one tar, in order; webdataset keys.

    A damaged tar is logged and gives the samples before the damage; a sample whose pixels are
    corrupt raises at `__getitem__`, naming shard and key."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    records: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(path) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                match = _MEMBER_NAME.match(member.name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
                if ext == "json":
                    f = tf.extractfile(member)
                    assert f is not None
                    records[key] = json.loads(f.read())
    except (tarfile.TarError, OSError, ValueError) as exc:
        logger.warning("%s: shard damaged (%s); keeping the samples read before it", path, exc)
    # a truncated tar can end inside a member: keep samples that lie wholly within the file
    size = os.path.getsize(path)
    whole = {k: m for k, m in samples.items() if all(o + n <= size for o, n in m.values())}
    if len(whole) < len(samples):
        logger.warning(
            "%s: shard truncated, %d sample(s) incomplete and skipped",
            path,
            len(samples) - len(whole),
        )
    return [(k, members, records.get(k)) for k, members in whole.items()]


class ShardDataset(_Base):
    def __init__(
        self, spec: DatasetSpec, transform: Transform | None = None, window: Window = None
    ):
        super().__init__(spec, transform, window)
        self.shards = list(spec.shards)
        self.items: list[tuple[int, dict[str, tuple[int, int]]]] = []
        self.keys, self.patients = [], []
        labels: list[int] = []
        for shard_index, path in enumerate(
            tqdm(self.shards, desc="indexing shards", unit="shard", disable=len(self.shards) < 20)
        ):
            for key, members, record in index_shard(path):
                if record is None or not (set(PIXEL_EXTS) & members.keys()):
                    logger.warning("%s: sample %r lacks json or pixels; skipped", path, key)
                    continue
                self.items.append((shard_index, members))
                self.keys.append(str(record.get("key", key)))
                self.patients.append(record.get("patient"))
                labels.append(record_label(record))
        self.labels = np.array(labels, dtype=np.int64)
        self.num_classes = int(self.labels.max(initial=-1)) + 1
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _fd(self, shard_index: int) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: own descriptors
            self._fds, self._pid = {}, os.getpid()
        if shard_index not in self._fds:
            if len(self._fds) >= _MAX_OPEN_SHARDS:
                self.close()
            self._fds[shard_index] = os.open(self.shards[shard_index], os.O_RDONLY)
        return self._fds[shard_index]

    def load(self, index: int) -> tuple[np.ndarray, dict[str, Any]]:
        shard_index, members = self.items[index]
        fd = self._fd(shard_index)
        sample: dict[str, Any] = {"__key__": self.keys[index]}
        for ext, (offset, size) in members.items():
            sample[ext] = os.pread(fd, size, offset)
        try:
            return decode_sample(sample)
        except Exception as exc:
            raise UnreadableImageError(
                f"{self.shards[shard_index]}: sample {self.keys[index]!r} does not decode: {exc}"
            ) from exc

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def open_dataset(
    spec: str | os.PathLike | DatasetSpec,
    transform: Transform | None = None,
    window: Window = None,
    **kwargs: Any,
) -> Dataset:
    """Map-style dataset for any spec; see the module docstring for the item layout.

    kwargs: `site_key` (pretrain.privacy.SiteKey) naming a folder's files and DICOM patients
    (default: the resolved site key; see FolderDataset).
    """
    parsed = spec if isinstance(spec, DatasetSpec) else parse_spec(spec)
    if parsed.kind == "npz":
        return NpzDataset(parsed, transform, window)
    if parsed.kind == "folder":
        return FolderDataset(parsed, transform, window, **kwargs)
    return ShardDataset(parsed, transform, window)
