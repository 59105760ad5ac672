"""Dataset specs: the one string every command accepts where it names a dataset.

- webdataset shards: a brace pattern `dir/shard-{000000..000009}.tar`, one `.tar`, or a directory
  holding `.tar` shards;
- an image folder: class subfolders give labels (sorted names -> 0..K-1), a flat folder has none;
- a MedMNIST-style `.npz` with a split suffix: `file.npz:train|val|test`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.data.shards import list_shards

NPZ_SPLITS = ("train", "val", "test")


class DatasetSpecError(ValueError):
    """A dataset spec that names nothing usable; the message says which and why."""


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # "shards" | "folder" | "npz"
    path: Path  # the directory, the npz file, or the first shard
    spec: str  # the string the user gave
    shards: tuple[Path, ...] = field(default_factory=tuple)
    split: str | None = None

    def __str__(self) -> str:
        return self.spec


def _expand_braces(pattern: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(pattern))


def _check_npz(path: Path, split: str, spec: str) -> None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            key = f"{split}_images"
            if key not in npz.files:
                raise DatasetSpecError(
                    f"{spec}: {path.name} has no '{key}' array (has: {', '.join(npz.files)})"
                )
            arr = npz[key]
    except DatasetSpecError:
        raise
    except Exception as exc:
        raise DatasetSpecError(f"{spec}: cannot read {path} as .npz: {exc}") from exc
    volumes = (arr.ndim == 4 and arr.shape[-1] not in (1, 3)) or (
        arr.ndim == 5 and arr.shape[-1] == 1
    )
    if arr.ndim not in (3, 4) and not volumes:
        raise DatasetSpecError(f"{spec}: {path.name} '{key}' has unsupported shape {arr.shape}")


def parse_spec(spec: str | os.PathLike) -> DatasetSpec:
    """Validate a dataset spec string and say what it names; raises DatasetSpecError."""
    text = str(spec)
    if not text:
        raise DatasetSpecError("empty dataset spec")
    # file.npz:split
    if ".npz:" in text:
        file_part, split = text.rsplit(":", 1)
        path = Path(file_part)
        if split not in NPZ_SPLITS:
            raise DatasetSpecError(
                f"{text}: split must be one of {'|'.join(NPZ_SPLITS)}, got '{split}'"
            )
        if not path.is_file():
            raise DatasetSpecError(f"{text}: file not found: {path}")
        _check_npz(path, split, text)
        return DatasetSpec("npz", path, text, split=split)
    if text.endswith(".npz"):
        raise DatasetSpecError(f"{text}: a .npz spec needs a split suffix, e.g. {text}:train")
    if "{" in text and text.endswith(".tar"):
        shards = tuple(Path(p) for p in _expand_braces(text))
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            raise DatasetSpecError(f"{text}: {len(missing)} shard(s) missing, first: {missing[0]}")
        return DatasetSpec("shards", shards[0], text, shards=shards)
    path = Path(text)
    if text.endswith(".tar"):
        if not path.is_file():
            raise DatasetSpecError(f"{text}: shard not found")
        return DatasetSpec("shards", path, text, shards=(path,))
    if not path.exists():
        raise DatasetSpecError(f"{text}: no such file or directory")
    if not path.is_dir():
        raise DatasetSpecError(
            f"{text}: not a dataset (expected shards, an image folder, or file.npz:split)"
        )
    shards = tuple(list_shards(path))
    if shards:
        return DatasetSpec("shards", path, text, shards=shards)
    return DatasetSpec("folder", path, text)


def holds_volumes(spec: DatasetSpec) -> bool | None:
    """Whether a dataset gives volumes (3D MedMNIST, volume shards), from the npz header or the
    first shard record; None when that cannot be told without decoding (image folders)."""
    if spec.kind == "npz":
        from pretrain.data.readers import npz_header, npz_holds_volumes

        shape, _ = npz_header(spec.path, f"{spec.split}_images")
        return npz_holds_volumes(shape)
    if spec.kind == "shards":
        from pretrain.data.shards import iter_shard_records

        for record in iter_shard_records(spec.shards[0]):
            return isinstance(record.get("volume"), dict)
    return None
