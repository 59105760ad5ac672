"""FeatureSet: frozen features and targets of one split, and the DINOv2 feature variants.

Cached per image (ViTs): the final-normed CLS token of each of the last `n_last_blocks` blocks and
the average-pooled patch tokens of the last block -- exactly what the DINOv2 linear heads and k-NN
need. Variants are named `n<blocks>[+avgpool]`: `n1` is the final CLS token, `n4+avgpool` the
concatenation of the last 4 CLS tokens and the pooled patch tokens (DINOv2 create_linear_input);
`avgpool` is the pooled patch tokens alone, and `auto` is whatever the backbone itself outputs
(`avgpool` for a ViT exported with timm's global_pool="avg", such as MAE's; `n1` otherwise), so a
probe measures the features a timm user of the export would get.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pretrain.io import atomic_open

logger = logging.getLogger(__name__)

_VARIANT = re.compile(r"^n(\d+)(\+avgpool)?$")
AUTO = "auto"
AVGPOOL = "avgpool"


class FeatureError(ValueError):
    """Features that cannot be produced (bad variant, images of unequal size for `raw`...)."""


@dataclass
class FeatureSet:
    """Features and targets of one split; rows align with the dataset's items."""

    tokens: np.ndarray  # (N, blocks, D): CLS tokens of the last blocks (raw: (N, 1, pixels))
    patch_mean: np.ndarray | None  # (N, D): average-pooled patch tokens of the last block
    labels: np.ndarray  # (N,) int64, -1 unknown; or (N, L) 0/1 multi-label targets
    num_classes: int
    keys: np.ndarray  # (N,) str
    patients: np.ndarray | None  # (N,) str patient hash, None when no patient is known
    output: str = "n1"  # the variant `auto` names: the backbone's own output (not cached)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def variants(self) -> list[str]:
        """Feature variants this set can build (blocks 1 and all cached; +avgpool if pooled)."""
        blocks = sorted({1, self.tokens.shape[1]})
        pooled = [False, True] if self.patch_mean is not None else [False]
        return [f"n{b}{'+avgpool' if p else ''}" for b in blocks for p in pooled]

    def resolve(self, name: str) -> str:
        """The concrete variant `name` stands for (`auto` -> the backbone's output)."""
        return self.output if name == AUTO else name

    def variant(self, name: str) -> np.ndarray:
        """(N, dim) float32 features of variant `name` (DINOv2 create_linear_input)."""
        name = self.resolve(name)
        if name == AVGPOOL:
            if self.patch_mean is None:
                raise FeatureError("feature variant 'avgpool': no patch tokens for this backbone")
            return np.ascontiguousarray(self.patch_mean, dtype=np.float32)
        match = _VARIANT.match(name)
        if match is None:
            raise FeatureError(
                f"feature variant {name!r} is not auto, avgpool or of the form n<blocks>[+avgpool]"
            )
        blocks, avgpool = int(match.group(1)), bool(match.group(2))
        if not 1 <= blocks <= self.tokens.shape[1]:
            raise FeatureError(
                f"feature variant {name!r} needs {blocks} blocks; {self.tokens.shape[1]} cached "
                "(raise n_last_blocks, or the backbone is not a ViT)"
            )
        parts = [self.tokens[:, -blocks:].reshape(len(self), -1)]
        if avgpool:
            if self.patch_mean is None:
                raise FeatureError(f"feature variant {name!r}: no patch tokens for this backbone")
            parts.append(self.patch_mean)
        return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)

    def subset(self, index: np.ndarray) -> FeatureSet:
        index = np.asarray(index)
        return replace(
            self,
            tokens=self.tokens[index],
            patch_mean=None if self.patch_mean is None else self.patch_mean[index],
            labels=self.labels[index],
            keys=self.keys[index],
            patients=None if self.patients is None else self.patients[index],
        )

    def labeled(self) -> FeatureSet:
        """Rows with a known label (multi-label rows are always known)."""
        if self.multilabel:
            return self
        known = self.labels >= 0
        if not known.all():
            logger.warning("%d of %d items have no label; left out", int((~known).sum()), len(self))
        return self.subset(np.flatnonzero(known))

    def save(self, path: Path) -> None:
        """Atomic .npz write (a killed run never leaves a half cache entry)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {
            "tokens": self.tokens,
            "labels": self.labels,
            "num_classes": np.asarray(self.num_classes),
            "keys": self.keys,
        }
        if self.patch_mean is not None:
            arrays["patch_mean"] = self.patch_mean
        if self.patients is not None:
            arrays["patients"] = self.patients
        with atomic_open(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> FeatureSet:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                tokens=z["tokens"],
                patch_mean=z["patch_mean"] if "patch_mean" in z.files else None,
                labels=z["labels"],
                num_classes=int(z["num_classes"]),
                keys=z["keys"],
                patients=z["patients"] if "patients" in z.files else None,
            )


def center_on(reference: FeatureSet, *sets: FeatureSet | None) -> list[FeatureSet | None]:
    """Subtract the reference set's mean feature from every set (raw pixels: all pixel vectors
    are positive, so their cosine similarity is dominated by the mean image)."""
    mean = reference.tokens.mean(axis=0, keepdims=True)
    return [None if fs is None else replace(fs, tokens=fs.tokens - mean) for fs in sets]
