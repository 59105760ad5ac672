"""What every protocol shares: the evaluation context (features of each split, task, metrics
settings) and the result layout that report.py turns into metrics.json and report.md."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from sklearn.model_selection import (
    GroupShuffleSplit,
    ShuffleSplit,
    StratifiedGroupKFold,
    StratifiedShuffleSplit,
)

from eval.features import FeatureExtractor
from eval.featureset import FeatureSet, center_on
from eval.metrics import evaluate, point_metrics
from pretrain.data.specs import parse_spec
from pretrain.privacy import path_pseudonym

logger = logging.getLogger(__name__)

SELECT_METRICS = ("accuracy", "balanced_accuracy", "auroc")
# MedMNIST v2's public datasets (any size: `_64`, `_128`, `_224`): shown by name in reports
PUBLIC_DATASET = re.compile(
    r"(path|chest|derma|oct|pneumonia|retina|breast|blood|tissue|organa|organc|organs)mnist"
    r"(_\d+)?|(organ|nodule|adrenal|fracture|vessel|synapse)mnist3d(_\d+)?"
)


class EvalError(ValueError):
    """An evaluation that must not run (mismatched classes, unlabeled test set...)."""


@dataclass
class ProtocolResult:
    """Test metrics per setting (e.g. per k, per head); `best` names the headline setting."""

    name: str
    settings: dict[str, dict[str, Any]]
    best: str
    selection: str  # how `best` was chosen, in words
    extras: dict[str, Any] = field(default_factory=dict)  # JSON-able (grids, curves)
    best_scores: np.ndarray | None = None  # test scores of `best` (confusion matrix; not in JSON)

    def to_json(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "selection": self.selection,
            "settings": self.settings,
            **self.extras,
        }


def dataset_name(spec: str) -> str:
    """The name a dataset goes by in reports, reference lookup and launch's eval folders.

    A public MedMNIST file keeps its name (`breastmnist.npz:train` -> `breastmnist`,
    `adrenalmnist3d_64.npz` -> `adrenalmnist3d_64`); any other dataset is `data-` and the keyed
    pseudonym of its file or shard folder, since a folder or file name can name a patient. From
    the text alone, so the launcher can name datasets that later jobs will write."""
    text = str(spec)
    if ".npz:" in text:
        text = text.rsplit(":", 1)[0]
    path = Path(text)
    if text.endswith(".tar"):
        path = path.parent  # shards are named after their directory
    name = path.name.split(".")[0].lower()
    if PUBLIC_DATASET.fullmatch(name):
        return name
    return "data-" + path_pseudonym(path)


class EvalContext:
    """Features of train/val/test from one backbone, checked for consistent classes.

    Build it with `EvalContext.from_specs` (extracts or loads cached features) or directly from
    FeatureSets (tests, callers that hold features already).
    """

    def __init__(
        self,
        cfg: DictConfig,
        *,
        train: FeatureSet,
        test: FeatureSet,
        val: FeatureSet | None = None,
        specs: dict[str, str | None] | None = None,
        dataset_name: str = "features",
        extractor: FeatureExtractor | None = None,
        out_dir: str | Path | None = None,
    ):
        self.cfg = cfg
        self.extractor = extractor
        self.specs = specs or {
            "train": "train",
            "val": None if val is None else "val",
            "test": "test",
        }
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.train, self.test = train.labeled(), test.labeled()
        self.val = None if val is None else val.labeled()
        self._check()
        if extractor is not None and extractor.is_raw and extractor.raw_center:
            self.train, self.val, self.test = center_on(self.train, self.train, self.val, self.test)
        self.dataset_name = dataset_name
        self.ordinal = (
            bool(cfg.ordinal)
            if cfg.ordinal is not None
            else (dataset_name in [str(s).lower() for s in cfg.ordinal_datasets])
        )
        if self.ordinal and self.multilabel:
            raise EvalError("ordinal=true needs single-label targets, not multi-label")
        self._split: tuple[FeatureSet, FeatureSet, str] | None = None
        self._memo: dict[str, Any] = {}

    @classmethod
    def from_specs(
        cls,
        cfg: DictConfig,
        extractor: FeatureExtractor,
        *,
        train: str,
        test: str,
        val: str | None = None,
        out_dir: str | Path | None = None,
    ) -> EvalContext:
        """Features of each dataset spec from `extractor` (cached); the dataset is named after
        the train file (breastmnist.npz:train -> breastmnist) for ordinal and reference lookup."""
        specs = {"train": train, "val": val, "test": test}
        parsed = {k: parse_spec(v) for k, v in specs.items() if v is not None}
        return cls(
            cfg,
            train=extractor(parsed["train"]),
            test=extractor(parsed["test"]),
            val=extractor(parsed["val"]) if "val" in parsed else None,
            specs=specs,
            dataset_name=dataset_name(train),
            extractor=extractor,
            out_dir=out_dir,
        )

    # -- checks ---------------------------------------------------------------------------------
    def _check(self) -> None:
        splits = {"train": self.train, "test": self.test}
        if self.val is not None:
            splits["val"] = self.val
        for name, fs in splits.items():
            if len(fs) == 0:
                raise EvalError(f"{name} split {self.specs[name]} has no labeled images")
        k = self.train.num_classes
        for name, fs in splits.items():
            if fs.multilabel != self.train.multilabel:
                raise EvalError(
                    f"{name} ({self.specs[name]}) is {'multi' if fs.multilabel else 'single'}-label "
                    f"but train ({self.specs['train']}) is not"
                )
            if fs.num_classes != k:
                raise EvalError(
                    f"class count mismatch: train ({self.specs['train']}) has {k} classes, "
                    f"{name} ({self.specs[name]}) has {fs.num_classes}"
                )
            if not fs.multilabel and fs.labels.max() >= k:
                raise EvalError(
                    f"{name} ({self.specs[name]}) has label {fs.labels.max()} >= {k} classes"
                )
            if fs.tokens.shape[1:] != self.train.tokens.shape[1:]:
                raise EvalError(
                    f"{name} ({self.specs[name]}) features have shape {fs.tokens.shape[1:]}, "
                    f"train ({self.specs['train']}) {self.train.tokens.shape[1:]}: "
                    "images of another size or channel count?"
                )
        if k < 2:
            raise EvalError(f"train ({self.specs['train']}) has {k} class(es); need at least 2")
        if not self.multilabel:
            missing = sorted(set(range(k)) - set(np.unique(self.train.labels).tolist()))
            if missing:
                logger.warning("classes %s have no training image: never predicted", missing)

    # -- task -----------------------------------------------------------------------------------
    @property
    def multilabel(self) -> bool:
        return self.train.multilabel

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)

    @property
    def device(self) -> str:
        """Where protocols compute (config `device`; auto: cuda when present)."""
        device = str(self.cfg.device)
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return device

    def train_val(self) -> tuple[FeatureSet, FeatureSet, str]:
        """(fit set, selection set, where the selection set comes from)."""
        if self.val is not None:
            return self.train, self.val, "the --val split"  # by role: a path can name a patient
        if self._split is None:
            fit_idx, val_idx = split_indices(self.train, float(self.cfg.val_fraction), self.seed)
            self._split = (
                self.train.subset(fit_idx),
                self.train.subset(val_idx),
                f"stratified {self.cfg.val_fraction:g} split of train (seed {self.seed})",
            )
        return self._split

    def memo(self, parts: tuple, compute: Callable[[], Any]) -> Any:
        """Compute once per run: `all` fits the same probe twice (linear, then label_efficiency
        at 100 % with seed 0); FeatureSets in `parts` are keyed by their rows and labels."""
        h = hashlib.sha256()
        for part in parts:
            if isinstance(part, FeatureSet):
                h.update("\0".join(part.keys.tolist()).encode())
                h.update(np.ascontiguousarray(part.labels).tobytes())
            else:
                h.update(repr(part).encode())
        key = h.hexdigest()
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # -- metrics --------------------------------------------------------------------------------
    def test_metrics(self, scores: np.ndarray | list[np.ndarray]) -> dict[str, Any]:
        """Test metrics with bootstrap CIs (by patient when known); same resamples everywhere."""
        return evaluate(
            self.test.labels,
            scores,
            ordinal=self.ordinal,
            groups=self.test.patients,
            resamples=int(self.cfg.bootstrap.resamples),
            seed=self.seed,
            alpha=float(self.cfg.bootstrap.alpha),
        )

    def selection_score(self, labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
        """(val `select_metric`, tie-breaker) used to pick among settings; NaN counts as worst.

        Small medical val sets tie often (many heads at the same accuracy); the tie-breaker is val
        AUROC (accuracy when AUROC is the metric), then the first setting in grid order.
        """
        name = str(self.cfg.select_metric)
        if name not in SELECT_METRICS:
            raise EvalError(f"select_metric must be one of {SELECT_METRICS}, got {name!r}")
        metrics = point_metrics(labels, scores)
        second = "accuracy" if name == "auroc" else "auroc"
        return tuple(  # type: ignore[return-value]
            float(metrics[m]) if np.isfinite(metrics[m]) else -np.inf for m in (name, second)
        )


def split_indices(fs: FeatureSet, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (and patient-grouped when patients are known) fit/val split of a train set."""
    if not 0.0 < fraction < 1.0:
        raise EvalError(f"val_fraction must be in (0, 1), got {fraction}")
    index = np.arange(len(fs))
    strat = None if fs.multilabel else fs.labels
    if strat is not None:
        counts = np.bincount(strat)
        if (counts[counts > 0] < 2).any():
            logger.warning("a class has < 2 train images: the val split is not stratified")
            strat = None
    try:
        if fs.patients is not None and strat is not None:
            n_splits = max(2, round(1.0 / fraction))
            splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            fit, val = next(splitter.split(index, strat, fs.patients))
        elif fs.patients is not None:
            splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
            fit, val = next(splitter.split(index, groups=fs.patients))
        elif strat is not None:
            splitter = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
            fit, val = next(splitter.split(index, strat))
        else:
            splitter = ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
            fit, val = next(splitter.split(index))
    except ValueError as exc:  # too few images or groups to stratify
        logger.warning("stratified val split impossible (%s); using a random split", exc)
        fit, val = next(
            ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(index)
        )
    if len(fit) == 0 or len(val) == 0:
        raise EvalError(f"train has {len(fs)} images: too few to split off a val set; pass --val")
    return np.sort(fit), np.sort(val)


def label_subset(fs: FeatureSet, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified `fraction` of the labels, at least one image per present class
    (multi-label: a random fraction holding each label's both values where the data has them)."""
    rng = np.random.default_rng(seed)
    if fraction >= 1.0:
        return np.arange(len(fs))
    if fs.multilabel:  # random rows, topped up until every label has a positive and a negative
        order = rng.permutation(len(fs))
        size = max(1, round(fraction * len(fs)))
        chosen, rest = list(order[:size]), list(order[size:])
        for column in range(fs.labels.shape[1]):
            for value in (0, 1):
                if not (fs.labels[chosen, column] == value).any():
                    extra = next((i for i in rest if fs.labels[i, column] == value), None)
                    if extra is not None:
                        chosen.append(extra)
                        rest.remove(extra)
        return np.sort(np.asarray(chosen))
    chosen = []
    for c in np.unique(fs.labels):
        members = np.flatnonzero(fs.labels == c)
        size = max(1, round(fraction * len(members)))
        chosen.append(rng.choice(members, size=size, replace=False))
    return np.sort(np.concatenate(chosen))


def expand_proba(proba: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities over the classes a model saw -> all `num_classes` columns (0 elsewhere)."""
    out = np.zeros((len(proba), num_classes), dtype=np.float64)
    out[:, np.asarray(classes, dtype=int)] = proba
    return out


def best_setting(scores: dict[str, tuple[float, ...]]) -> str:
    """The first setting (in grid order) with the highest val score tuple."""
    names = list(scores)
    best = names[0]
    for name in names[1:]:
        if scores[name] > scores[best]:
            best = name
    return best
