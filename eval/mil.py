"""`python -m eval mil`: slide-level (bag-level) evaluation by multiple-instance learning.

    python -m eval mil --backbone EXPORT --bags TILES --labels CSV --out DIR
    python -m eval mil --backbone EXPORT --bags X.npz:train --test-bags X.npz:test --out DIR

A bag is a slide's tiles (`curation tile` shards: bags by the records' `slide`, grouped by their
`patient`; labels from a CSV `slide,label` whose slide column holds slide file names, resolved
through the tile run's private map, or slide pseudonyms) or, for a `.npz` split, a synthetic
MNIST-bags bag (Ilse et al. 2018: 10-30 images, a positive bag holds 1-3 images of
`positive_class`). Instance features are extracted once (the eval feature cache); then

- mean_pool: the mean instance feature, standardised, logistic regression (C by 3-fold CV);
- abmil: gated attention MIL (Ilse et al. 2018) on the cached features, optionally trained with
  CLAM's instance clustering loss (`abmil.instance_loss_weight`, Lu et al. 2021);
- prompt_mil: Prompt-MIL (Zhang et al. 2023): VPT prompt tokens in the frozen ViT
  (eval/adapters.py) trained end to end with an ABMIL head, through the backbone on the images.

abmil and prompt_mil keep the epoch of lowest loss on validation bags (CLAM's early stopping): a
patient-grouped `val_fraction` of each fold's training slides, or, for MNIST-bags, bags drawn from
held-out training images (training bags share images, so their validation bags must not).
Without --test-bags (slides only) every method is scored out-of-fold over a patient-grouped
stratified k-fold. AUROC, balanced accuracy, ... with percentile-bootstrap CIs over bags (by
patient). Writes
metrics.json, metrics.jsonl, report.md, auroc.png and, for slides, attention heatmaps over the
tile run's thumbnails.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, ListConfig
from tqdm import tqdm

from eval.features import FeatureError, FeatureExtractor, stain_setting
from eval.featureset import FeatureSet
from eval.metrics import evaluate
from pretrain.backbones import BackboneError
from pretrain.config import ConfigError, load_config, save_config
from pretrain.data.specs import DatasetSpecError, parse_spec
from pretrain.io import atomic_write
from pretrain.provenance import provenance

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "mil.yaml"
METHODS = ("mean_pool", "abmil", "prompt_mil")


class MILError(ValueError):
    """Bags or labels that cannot be evaluated (message names the input and the reason)."""


# ------------------------------------------------------------------------------------- bags
@dataclass
class Bags:
    """Bags over the rows of one instance table (a FeatureSet / dataset)."""

    rows: list[np.ndarray]  # instance rows of each bag
    labels: np.ndarray  # (B,) int
    groups: np.ndarray  # (B,) patient key (a bag of its own when unknown)
    names: list[str]  # slide pseudonyms, or bag-0007
    positives: list[np.ndarray] | None = None  # synthetic bags: which of `rows` are positive
    coords: list[np.ndarray] | None = None  # slide bags: (x, y) of each tile

    def __len__(self) -> int:
        return len(self.rows)


def synthetic_bags(
    instance_labels: np.ndarray,
    n_bags: int,
    bag_size: tuple[int, int],
    positives: tuple[int, int],
    positive_class: int,
    seed: int,
) -> Bags:
    """MNIST-bags: half the bags positive (1-3 instances of `positive_class`), every other
    instance drawn from the other classes; instances drawn with replacement across bags."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(instance_labels).ravel()
    pos_pool = np.flatnonzero(labels == positive_class)
    neg_pool = np.flatnonzero((labels != positive_class) & (labels >= 0))
    if len(pos_pool) < positives[1] or len(neg_pool) < bag_size[1]:
        raise MILError(
            f"synthetic bags need >= {positives[1]} images of class {positive_class} and "
            f">= {bag_size[1]} of other classes; the split has {len(pos_pool)} and {len(neg_pool)}"
        )
    rows, bag_labels, marks = [], [], []
    for b in range(n_bags):
        size = int(rng.integers(bag_size[0], bag_size[1] + 1))
        k = int(rng.integers(positives[0], positives[1] + 1)) if b % 2 else 0
        members = np.concatenate(
            [
                rng.choice(pos_pool, size=k, replace=False),
                rng.choice(neg_pool, size=size - k, replace=False),
            ]
        )
        order = rng.permutation(size)
        rows.append(members[order])
        marks.append((np.arange(size) < k)[order])
        bag_labels.append(int(k > 0))
    names = [f"bag-{b:04d}" for b in range(n_bags)]
    return Bags(rows, np.asarray(bag_labels), np.asarray(names), names, positives=marks)


def _slide_labels(path: Path, tiles_dir: Path) -> dict[str, int]:
    """{slide pseudonym: label} from a CSV `slide,label`: file names through the tile run's
    private map (OUT/private/sources.jsonl), or pseudonyms as they are."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise MILError(f"--labels {path}: cannot read it ({exc.strerror})") from exc
    if not rows or not {"slide", "label"} <= set(rows[0]):
        raise MILError(f"--labels {path}: needs a header with columns 'slide' and 'label'")
    names: dict[str, str] = {}
    private = tiles_dir / "private" / "sources.jsonl"
    if private.is_file():
        for line in private.read_text().splitlines():
            entry = json.loads(line)
            slide = entry.get("slide", entry["input"])
            for alias in (Path(entry["path"]).name, entry["source"], entry["input"]):
                names[alias] = slide
    out: dict[str, int] = {}
    for row in rows:
        slide = row["slide"].strip()
        try:
            out[names.get(slide, slide)] = int(row["label"])
        except ValueError as exc:
            raise MILError(f"--labels {path}: label {row['label']!r} is not an integer") from exc
    return out


def slide_bags(tiles_dir: Path, keys: np.ndarray, labels_csv: Path) -> Bags:
    """Bags = slides of a `curation tile` output, in the order of the feature rows `keys`."""
    manifest = tiles_dir / "manifest.jsonl"
    if not manifest.is_file():
        raise MILError(f"--bags {tiles_dir}: no manifest.jsonl (not a `curation tile` output)")
    records = {}
    for line in manifest.read_text().splitlines():
        r = json.loads(line)
        records[r["key"]] = r
    if not records or any("slide" not in r for r in records.values()):
        raise MILError(f"--bags {tiles_dir}: records have no 'slide' (tile shards are needed)")
    labels = _slide_labels(labels_csv, tiles_dir)
    by_slide: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        by_slide.setdefault(records[str(key)]["slide"], []).append(row)
    missing = sorted(s for s in by_slide if s not in labels)
    if missing:
        logger.warning("%d slide(s) without a label are left out", len(missing))
    slides = sorted(s for s in by_slide if s in labels)
    if not slides:
        raise MILError(f"--labels {labels_csv}: no slide of {tiles_dir} has a label")
    rows = [np.asarray(by_slide[s]) for s in slides]
    first = [records[str(keys[r[0]])] for r in rows]
    return Bags(
        rows=rows,
        labels=np.asarray([labels[s] for s in slides]),
        groups=np.asarray([rec.get("patient") or rec["slide"] for rec in first]),
        names=slides,
        coords=[
            np.asarray([(records[str(keys[i])]["x"], records[str(keys[i])]["y"]) for i in r])
            for r in rows
        ],
    )


# ------------------------------------------------------------------------------------ models
class GatedAttentionMIL(nn.Module):
    """Ilse et al. 2018: a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))), z = sum_k a_k h_k,
    logits = classifier(z). Takes one bag (n, dim); returns (logits (classes,), attention (n,)).

    >>> head = GatedAttentionMIL(dim=192, hidden=128, num_classes=2)
    >>> logits, attention = head(torch.randn(17, 192))
    >>> logits.shape, attention.shape
    (torch.Size([2]), torch.Size([17]))
    """

    def __init__(self, dim: int, hidden: int = 128, num_classes: int = 2, dropout: float = 0.25):
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))
        attention = torch.softmax(self.w(self.dropout(gate)).squeeze(-1), dim=0)
        return self.classifier(attention @ h), attention


def _fit_mean_pool(x: np.ndarray, y: np.ndarray, Cs: list[float], seed: int):
    """Standardised logistic regression, C by stratified 3-fold CV (log loss) on the training bags."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model(c: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))

    smallest = int(np.bincount(y).min())
    if smallest < 2:  # too few bags to choose C: the grid's middle value
        return model(sorted(Cs)[len(Cs) // 2]).fit(x, y)
    cv = StratifiedKFold(min(3, smallest), shuffle=True, random_state=seed)
    loss = [cross_val_score(model(c), x, y, cv=cv, scoring="neg_log_loss").mean() for c in Cs]
    return model(Cs[int(np.argmax(loss))]).fit(x, y)


class _Standardise:
    """Feature-wise standardisation fitted on the training bags' instances."""

    def __init__(self, x: np.ndarray):
        self.mean = x.mean(0)
        self.std = x.std(0) + 1e-6

    def __call__(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x - self.mean) / self.std).astype(np.float32))


def instance_loss(
    head: GatedAttentionMIL, h: torch.Tensor, attention: torch.Tensor, label: int, k: int
) -> torch.Tensor:
    """CLAM's instance clustering (Lu et al. 2021) for a binary bag, through the bag classifier.

    ABMIL's bag logits are the attention-weighted mean of `head.classifier` applied to each
    instance, so the same classifier scores instances. In a positive bag the k instances of
    highest attention are taken as positive and the k of lowest as negative (CLAM's in-class
    rule); in a negative bag the k of highest attention are negative (its out-of-class rule: the
    hardest negatives). Attention picks the instances and gets no gradient from this loss.

    >>> head = GatedAttentionMIL(dim=8, hidden=4)
    >>> h = torch.randn(12, 8)
    >>> loss = instance_loss(head, h, head(h)[1], label=1, k=2)
    >>> loss.shape
    torch.Size([])
    """
    k = min(k, len(h) // 2) if label == 1 else min(k, len(h))
    if k == 0:  # a one-instance positive bag: nothing to take as positive and negative at once
        return h.new_zeros(())
    order = torch.argsort(attention.detach(), descending=True)
    if label == 1:
        chosen = torch.cat([order[:k], order[len(order) - k :]])
        targets = torch.cat([torch.ones(k), torch.zeros(k)]).long()
    else:
        chosen, targets = order[:k], torch.zeros(k, dtype=torch.long)
    return nn.functional.cross_entropy(head.classifier(h[chosen]), targets)


def _bag_loss(head: GatedAttentionMIL, inputs: list[torch.Tensor], labels: np.ndarray) -> float:
    head.eval()
    with torch.no_grad():
        logits = torch.stack([head(x)[0] for x in inputs])
    return float(nn.functional.cross_entropy(logits, torch.as_tensor(labels)))


def _grid(value: Any) -> list[float]:
    """A config value that is one number or a list of numbers to choose from."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    return [float(v) for v in values]


def _train_abmil(
    feats: np.ndarray,
    bags: Bags,
    train: np.ndarray,
    validation: tuple[Bags, np.ndarray],
    opts: DictConfig,
    num_classes: int,
    seed: int,
) -> tuple[GatedAttentionMIL, _Standardise, int, dict[str, float]]:
    """Gated ABMIL on cached features, one head per (lr, weight_decay) of the grid. With validation
    bags each head keeps its epoch of lowest validation loss (CLAM's early stopping) and the head of
    lowest validation loss wins (the way mean_pool's C is chosen); without them the grid's first
    values are used. Returns (head, standardisation, epochs kept, the chosen lr / weight_decay)."""
    scale = _Standardise(feats[np.concatenate([bags.rows[b] for b in train])])
    inputs = {b: scale(feats[bags.rows[b]]) for b in train}
    val_bags, val = validation
    val_inputs = [scale(feats[val_bags.rows[b]]) for b in val]
    grid = [(lr, wd) for lr in _grid(opts.lr) for wd in _grid(opts.weight_decay)]
    if not val_inputs:
        grid = grid[:1]
    inst_weight, inst_k = float(opts.instance_loss_weight), int(opts.instance_k)
    best: tuple[float, GatedAttentionMIL, int, dict[str, float]] | None = None
    for lr, wd in grid:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        head = GatedAttentionMIL(feats.shape[1], int(opts.hidden), num_classes, float(opts.dropout))
        optim = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=wd)
        lowest, best_state, kept = float("inf"), None, int(opts.epochs)
        for epoch in range(int(opts.epochs)):
            head.train()
            for b in rng.permutation(train):
                logits, attention = head(inputs[b])
                loss = nn.functional.cross_entropy(logits[None], torch.tensor([bags.labels[b]]))
                if inst_weight > 0:  # CLAM: 0.7 x bag loss + 0.3 x instance loss
                    inst = instance_loss(head, inputs[b], attention, int(bags.labels[b]), inst_k)
                    loss = (1 - inst_weight) * loss + inst_weight * inst
                optim.zero_grad()
                loss.backward()
                optim.step()
            if val_inputs:
                loss = _bag_loss(head, val_inputs, val_bags.labels[val])
                if loss < lowest:
                    lowest, best_state, kept = loss, copy.deepcopy(head.state_dict()), epoch + 1
        if best_state is not None:
            head.load_state_dict(best_state)
        if best is None or lowest < best[0]:
            best = (lowest, head, kept, {"lr": lr, "weight_decay": wd})
    assert best is not None
    _, head, kept, chosen = best
    return head.eval(), scale, kept, chosen


def _prompt_model(backbone: nn.Module, opts: DictConfig, num_classes: int, seed: int):
    """The frozen ViT with VPT prompts (eval/adapters.py) and an ABMIL head over its features."""
    from eval.adapters import AdaptedModel

    torch.manual_seed(seed)
    adapted = AdaptedModel(backbone, "prompt", {"tokens": int(opts.tokens)}, num_outputs=1)
    adapted.head.requires_grad_(False)  # the ABMIL head classifies, not the adapter's own
    dim = int(backbone.num_features)
    head = GatedAttentionMIL(dim, int(opts.hidden), num_classes, float(opts.dropout))
    return adapted, head


def _images(dataset, rows: np.ndarray) -> torch.Tensor:
    return torch.stack([dataset[int(i)][0] for i in rows])


def _train_prompt_mil(
    backbone: nn.Module,
    dataset,
    bags: Bags,
    train: np.ndarray,
    validation: tuple[Bags, np.ndarray],
    opts: DictConfig,
    num_classes: int,
    seed: int,
    device: torch.device,
):
    """Prompts + ABMIL head trained through the frozen ViT; the epoch of lowest validation loss
    is kept when validation bags are given. Returns (adapted ViT, head, epochs kept)."""
    adapted, head = _prompt_model(backbone, opts, num_classes, seed)
    adapted.to(device)
    head.to(device)
    params = [adapted.prompts, *head.parameters()]
    optim = torch.optim.AdamW(params, lr=float(opts.lr), weight_decay=float(opts.weight_decay))
    rng = np.random.default_rng(seed)
    cap = int(opts.max_instances)
    val_bags, val = validation
    best, best_state, kept = float("inf"), None, int(opts.epochs)
    for epoch in range(int(opts.epochs)):
        adapted.backbone.eval()  # frozen: no dropout/drop-path noise in the backbone
        head.train()
        for b in tqdm(rng.permutation(train), desc="prompt-mil", unit="bag", leave=False):
            rows = bags.rows[b]
            if len(rows) > cap:
                rows = rng.choice(rows, size=cap, replace=False)
            features = adapted.features(_images(dataset, rows).to(device))
            logits, _ = head(features)
            target = torch.tensor([bags.labels[b]], device=device)
            loss = nn.functional.cross_entropy(logits[None], target)
            optim.zero_grad()
            loss.backward()
            optim.step()
        if len(val):
            probs, _ = _prompt_predict(adapted, head, dataset, val_bags, val, device)
            loss = float(
                nn.functional.nll_loss(
                    torch.log(torch.from_numpy(probs).clamp_min(1e-12)),
                    torch.as_tensor(val_bags.labels[val]),
                )
            )
            if loss < best:
                state = {"prompts": adapted.prompts.detach().clone(), "head": head.state_dict()}
                best, best_state, kept = loss, copy.deepcopy(state), epoch + 1
    if best_state is not None:
        with torch.no_grad():
            adapted.prompts.copy_(best_state["prompts"])
        head.load_state_dict(best_state["head"])
    return adapted, head, kept


@torch.no_grad()
def _prompt_predict(adapted, head, dataset, bags: Bags, test: np.ndarray, device) -> tuple:
    head.eval()
    probs, attention = [], []
    for b in test:
        feats = torch.cat(
            [
                adapted.features(_images(dataset, part).to(device))
                for part in np.array_split(bags.rows[b], max(1, len(bags.rows[b]) // 128))
            ]
        )
        logits, att = head(feats)
        probs.append(torch.softmax(logits, -1).cpu().numpy())
        attention.append(att.cpu().numpy())
    return np.stack(probs), attention


# ------------------------------------------------------------------------------------- runs
def _splits(bags: Bags, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedGroupKFold

    smallest = int(np.bincount(bags.labels).min())
    if smallest < folds:
        raise MILError(
            f"{folds}-fold CV needs >= {folds} bags of every label; the least has {smallest}"
        )
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(bags)), bags.labels, bags.groups))


def _hold_out(
    bags: Bags, train: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) bags of `train`: a patient-grouped stratified `fraction`; no validation
    when there are too few bags of a label to hold one out."""
    from sklearn.model_selection import StratifiedGroupKFold

    parts = int(round(1 / fraction)) if fraction > 0 else 0
    counts = np.bincount(bags.labels[train])
    if parts < 2 or counts.min() < parts:
        return train, np.zeros(0, np.int64)
    cv = StratifiedGroupKFold(n_splits=parts, shuffle=True, random_state=seed)
    fit, held = next(cv.split(np.zeros(len(train)), bags.labels[train], bags.groups[train]))
    return train[fit], train[held]


def run_method(
    method: str,
    cfg: DictConfig,
    feats: tuple[np.ndarray, np.ndarray],
    bags: tuple[Bags, Bags],
    splits: list[tuple[np.ndarray, np.ndarray]] | None,
    extractor: FeatureExtractor,
    datasets: tuple[Any, Any],
    num_classes: int,
    val_bags: Bags | None,
    seed: int,
) -> dict[str, Any]:
    """Scores of every test bag (out-of-fold without a test set), the attention maps, the
    trainable parameter count and the epochs kept per fold.

    `val_bags` (synthetic bags from held-out training images) stop abmil and prompt_mil early;
    without them (slides) each fold holds out `val_fraction` of its training bags by patient."""
    started = time.time()
    train_feats, test_feats = feats
    train_bags, test_bags = bags
    device = extractor.device
    plans = splits or [(np.arange(len(train_bags)), np.arange(len(test_bags)))]
    scores = np.zeros((len(test_bags), num_classes))
    attention: list[np.ndarray | None] = [None] * len(test_bags)
    trainable = 0
    epochs_kept: list[int] = []
    selected: list[dict[str, float]] = []
    for fold, (train, test) in enumerate(plans):
        fold_seed = seed + fold
        validation: tuple[Bags, np.ndarray] = (train_bags, np.zeros(0, np.int64))
        if method != "mean_pool":
            if val_bags is not None:
                validation = (val_bags, np.arange(len(val_bags)))
            else:
                train, held = _hold_out(train_bags, train, float(cfg.val_fraction), fold_seed)
                validation = (train_bags, held)
        if method == "mean_pool":
            x = np.stack([train_feats[train_bags.rows[b]].mean(0) for b in train])
            model = _fit_mean_pool(x, train_bags.labels[train], list(cfg.mean_pool.Cs), fold_seed)
            xt = np.stack([test_feats[test_bags.rows[b]].mean(0) for b in test])
            scores[test] = model.predict_proba(xt)
            trainable = int(model[-1].coef_.size + model[-1].intercept_.size)
        elif method == "abmil":
            head, scale, kept, chosen = _train_abmil(
                train_feats, train_bags, train, validation, cfg.abmil, num_classes, fold_seed
            )
            epochs_kept.append(kept)
            selected.append(chosen)
            with torch.no_grad():
                for b in test:
                    logits, att = head(scale(test_feats[test_bags.rows[b]]))
                    scores[b] = torch.softmax(logits, -1).numpy()
                    attention[b] = att.numpy()
            trainable = sum(p.numel() for p in head.parameters())
        elif method == "prompt_mil":
            adapted, head, kept = _train_prompt_mil(
                extractor.model,
                datasets[0],
                train_bags,
                train,
                validation,
                cfg.prompt_mil,
                num_classes,
                fold_seed,
                device,
            )
            epochs_kept.append(kept)
            probs, att = _prompt_predict(adapted, head, datasets[1], test_bags, test, device)
            scores[test] = probs
            for b, a in zip(test, att):
                attention[b] = a
            trainable = int(adapted.prompts.numel()) + sum(p.numel() for p in head.parameters())
            adapted.detach_hooks()
        else:
            raise MILError(f"unknown MIL method {method!r}; choose from {METHODS}")
        logger.info("%s fold %d/%d done", method, fold + 1, len(plans))
    return {
        "scores": scores,
        "attention": attention,
        "trainable": int(trainable),
        "epochs_kept": epochs_kept,
        "selected": selected,
        "seconds": time.time() - started,
    }


def _metrics(cfg: DictConfig, test_bags: Bags, runs: list[dict], backbone_params: int) -> dict:
    """Metrics of the runs' mean scores (one run per repeat), bootstrap CIs over test bags,
    `<metric>_std` over repeats when there are several."""
    result = evaluate(
        test_bags.labels,
        [r["scores"] for r in runs] if len(runs) > 1 else runs[0]["scores"],
        groups=test_bags.groups,
        resamples=int(cfg.bootstrap.resamples),
        seed=int(cfg.seed),
        alpha=float(cfg.bootstrap.alpha),
    )
    kept = [e for r in runs for e in r["epochs_kept"]]
    if kept:
        result["epochs_kept"] = kept  # per repeat and fold, by validation loss
    selected = [c for r in runs for c in r["selected"]]
    if selected:
        result["selected"] = selected  # abmil's (lr, weight_decay) per repeat and fold
    trainable = runs[0]["trainable"]
    result.update(
        repeats=len(runs),
        trainable_params=trainable,
        trainable_share=trainable / backbone_params,
        seconds=round(sum(r["seconds"] for r in runs), 2),
    )
    if test_bags.positives is not None and runs[0]["attention"][0] is not None:
        mass = [
            float(a[m].sum())
            for r in runs
            for a, m, y in zip(r["attention"], test_bags.positives, test_bags.labels)
            if y == 1
        ]
        result["attention_on_positive_instances"] = float(np.mean(mass))
        result["positive_instance_share"] = float(
            np.mean([m.mean() for m, y in zip(test_bags.positives, test_bags.labels) if y == 1])
        )
    return result


def _features(
    extractor: FeatureExtractor, spec: str, variant: str
) -> tuple[FeatureSet, np.ndarray]:
    fs = extractor(spec)
    return fs, fs.variant(variant)


def _is_tiles(spec: str) -> bool:
    return Path(str(parse_spec(spec).path)).is_dir()


def _synthetic(cfg: DictConfig, labels: np.ndarray, n_bags: int, seed: int) -> Bags:
    s = cfg.synthetic
    return synthetic_bags(
        labels,
        n_bags,
        (int(s.bag_size[0]), int(s.bag_size[1])),
        (int(s.positives[0]), int(s.positives[1])),
        int(s.positive_class),
        seed,
    )


def _build_bags(
    cfg: DictConfig,
    spec: str,
    fs: FeatureSet,
    labels_csv: str | None,
    seed: int,
    test: bool = False,
) -> tuple[Bags, Bags | None]:
    """(bags, validation bags): slides of a tile run, or MNIST-bags whose validation bags are
    drawn from `val_fraction` of the images, held out (training bags share images; these must
    not)."""
    if _is_tiles(spec):
        if not labels_csv:
            raise MILError(f"--bags {spec}: slide bags need --labels CSV (columns slide,label)")
        return slide_bags(Path(str(parse_spec(spec).path)), fs.keys, Path(labels_csv)), None
    n_bags = int(cfg.synthetic.n_bags)
    labels = np.asarray(fs.labels).ravel()
    fraction = float(cfg.val_fraction)
    if test or fraction <= 0:  # test bags: all of their split's images
        return _synthetic(cfg, labels, n_bags, seed), None
    held = np.random.default_rng(seed).random(len(labels)) < fraction
    fit_labels, val_labels = labels.copy(), labels.copy()
    fit_labels[held], val_labels[~held] = -1, -1  # -1: never drawn
    val_bags = _synthetic(cfg, val_labels, max(50, n_bags // 2), seed + 2)
    return _synthetic(cfg, fit_labels, n_bags, seed), val_bags


def run_mil(
    cfg: DictConfig,
    *,
    backbone: str,
    bags: str,
    out: str | Path,
    test_bags: str | None = None,
    labels: str | None = None,
    weights: str | None = None,
) -> dict[str, Any]:
    out = Path(out)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise MILError(f"unknown MIL method(s) {unknown}; choose from {METHODS}")
    if test_bags is None and int(cfg.folds) < 2:
        raise MILError(f"folds must be >= 2 without --test-bags, got {cfg.folds}")
    if test_bags is None and not _is_tiles(bags):
        raise MILError(
            f"--bags {bags}: synthetic bags share images, so cross-validation over them would "
            "test on training images; give --test-bags (bags of another split)"
        )
    if int(cfg.repeats) < 1:
        raise MILError(f"repeats must be >= 1, got {cfg.repeats}")
    for key in ("lr", "weight_decay"):
        try:
            values = _grid(cfg.abmil[key])
        except (TypeError, ValueError):
            values = []
        if not values or min(values) < 0 or (key == "lr" and min(values) == 0):
            raise MILError(
                f"abmil.{key} must be a number or a non-empty list of numbers "
                f"({'> 0' if key == 'lr' else '>= 0'}), got {cfg.abmil[key]}"
            )
    if not 0 <= float(cfg.abmil.instance_loss_weight) < 1 or int(cfg.abmil.instance_k) < 1:
        raise MILError(
            "abmil.instance_loss_weight must be in [0, 1) and abmil.instance_k >= 1, got "
            f"{cfg.abmil.instance_loss_weight} and {cfg.abmil.instance_k}"
        )
    if not 0 <= float(cfg.val_fraction) < 1:
        raise MILError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if backbone == "raw":
        raise MILError(
            "--backbone raw has no ViT for prompt_mil and no tokens to pool; give an export"
        )
    stain = stain_setting(cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out.parent / ".feature_cache"
    extractor = FeatureExtractor(
        backbone,
        weights=weights,
        cache_dir=cache,
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        device=str(cfg.device),
        stain_norm=stain,
    )
    if "prompt_mil" in cfg.methods and not hasattr(extractor.model, "blocks"):
        raise MILError("prompt_mil needs a ViT backbone; drop it from methods for this one")
    train_fs, train_x = _features(extractor, bags, str(cfg.features))
    seed = int(cfg.seed)
    if test_bags is not None:
        test_fs, test_x = _features(extractor, test_bags, str(cfg.features))
        test_set, _ = _build_bags(cfg, test_bags, test_fs, labels, seed + 1, test=True)
    datasets = (None, None)
    if "prompt_mil" in cfg.methods:
        datasets = (extractor.open(bags), extractor.open(test_bags) if test_bags else None)
        datasets = (datasets[0], datasets[1] if datasets[1] is not None else datasets[0])
    backbone_params = sum(p.numel() for p in extractor.model.parameters())
    runs: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    for repeat in range(int(cfg.repeats)):  # new training bags (or folds) and inits each time
        repeat_seed = seed + 1000 * repeat
        train_bags, val_bags = _build_bags(cfg, bags, train_fs, labels, repeat_seed)
        splits = None
        if test_bags is None:
            test_x, test_set = train_x, train_bags
            splits = _splits(train_bags, int(cfg.folds), repeat_seed)
        num_classes = int(max(train_bags.labels.max(), test_set.labels.max()) + 1)
        if num_classes != 2 and "abmil" in cfg.methods and cfg.abmil.instance_loss_weight > 0:
            raise MILError(
                f"abmil.instance_loss_weight needs binary bag labels (negative 0, positive 1); "
                f"these bags have {num_classes} classes"
            )
        for method in cfg.methods:
            logger.info("running %s (repeat %d/%d)", method, repeat + 1, int(cfg.repeats))
            runs[method].append(
                run_method(
                    method,
                    cfg,
                    (train_x, test_x),
                    (train_bags, test_set),
                    splits,
                    extractor,
                    datasets,
                    num_classes,
                    val_bags,
                    repeat_seed,
                )
            )
    results: dict[str, Any] = {}
    attention: dict[str, list] = {}
    for method in cfg.methods:
        results[method] = _metrics(cfg, test_set, runs[method], backbone_params)
        attention[method] = runs[method][0]["attention"]
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"method": method, **results[method]}) + "\n")
    doc = {
        "task": "mil",
        "backbone": {"fingerprint": extractor.fingerprint},  # paths only pseudonymised, below
        "bags": {
            "train": len(train_bags),
            "test": len(test_set),
            "protocol": "train/test" if test_bags else f"{cfg.folds}-fold CV by patient",
            "positive_bags": int((test_set.labels == 1).sum()),
            "instances_per_bag": [
                int(min(len(r) for r in test_set.rows)),
                int(max(len(r) for r in test_set.rows)),
            ],
        },
        "methods": results,
        "provenance": provenance(cfg, inputs=[bags, *([test_bags] if test_bags else [])]),
    }
    atomic_write(out / "metrics.json", json.dumps(doc, indent=2) + "\n")
    _plot_auroc(out / "auroc.png", results)
    heatmaps = (
        _heatmaps(out, bags, test_set, attention, int(cfg.heatmaps)) if test_set.coords else []
    )
    _report(out / "report.md", doc, heatmaps)
    return doc


def _plot_auroc(path: Path, results: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    values = [results[n]["auroc"] for n in names]
    cis = [results[n].get("auroc_ci95") or [v, v] for n, v in zip(names, values)]
    err = np.array(
        [[v - c[0] for v, c in zip(values, cis)], [c[1] - v for v, c in zip(values, cis)]]
    )
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.2))
    ax.bar(names, values, yerr=err, capsize=4, color="#4c72b0")
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("bag AUROC (95 % CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _heatmaps(
    out: Path, spec: str, bags: Bags, attention: dict[str, list], limit: int
) -> list[str]:
    """The attention of each tile over its slide's thumbnail (from the tile run), per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    tiles_dir = Path(str(parse_spec(spec).path))
    slides = {}
    if (tiles_dir / "slides.jsonl").is_file():
        for line in (tiles_dir / "slides.jsonl").read_text().splitlines():
            s = json.loads(line)
            slides[s["slide"]] = s
    written = []
    methods = [m for m, att in attention.items() if any(a is not None for a in att)]
    for b, name in enumerate(bags.names[:limit]):
        info = slides.get(name)
        if not info or not methods or not (tiles_dir / info.get("thumbnail", "")).is_file():
            continue
        thumb = np.asarray(Image.open(tiles_dir / info["thumbnail"]).convert("RGB"))
        scale = thumb.shape[1] / info["width"]
        side = 256 * info["tile_mpp"] / info["slide_mpp"] * scale
        fig, axes = plt.subplots(1, len(methods), figsize=(4 * len(methods), 4), squeeze=False)
        for ax, method in zip(axes[0], methods):
            att = attention[method][b]
            ax.imshow(thumb)
            rel = att / att.max()
            for (x, y), a in zip(bags.coords[b], rel):
                ax.add_patch(
                    matplotlib.patches.Rectangle(
                        (x * scale, y * scale), side, side, color=plt.cm.inferno(a), alpha=0.55
                    )
                )
            ax.set_title(f"{method} (label {bags.labels[b]})")
            ax.set_axis_off()
        fig.tight_layout()
        rel_path = f"heatmaps/{name}.png"
        (out / "heatmaps").mkdir(exist_ok=True)
        fig.savefig(out / rel_path, dpi=100)
        plt.close(fig)
        written.append(rel_path)
    return written


def _report(path: Path, doc: dict[str, Any], heatmaps: list[str]) -> None:
    bags = doc["bags"]
    lines = [
        "# MIL evaluation",
        "",
        f"Backbone `{doc['backbone']['fingerprint'][:16]}`; {bags['train']} training bags, "
        f"{bags['test']} test bags ({bags['positive_bags']} positive, "
        f"{bags['instances_per_bag'][0]}-{bags['instances_per_bag'][1]} instances), "
        f"{bags['protocol']}.",
        "",
        "| method | AUROC [95 % CI] | balanced acc. | trainable params (share of backbone) |",
        "|---|---|---|---|",
    ]
    for name, m in doc["methods"].items():
        ci = m.get("auroc_ci95")
        ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
        if m.get("auroc_std") is not None:
            ci_text += f" (sd {m['auroc_std']:.3f} over {m['repeats']} repeats)"
        lines.append(
            f"| {name} | {m['auroc']:.4f}{ci_text} | {m['balanced_accuracy']:.4f} | "
            f"{m['trainable_params']:,} ({100 * m['trainable_share']:.2f} %) |"
        )
    attn = {n: m for n, m in doc["methods"].items() if "attention_on_positive_instances" in m}
    if attn:
        lines += ["", "Attention mass on the positive instances of positive test bags:"]
        for n, m in attn.items():
            lines.append(
                f"- {n}: {m['attention_on_positive_instances']:.3f} (their share of the "
                f"instances: {m['positive_instance_share']:.3f})"
            )
    lines += ["", "![AUROC](auroc.png)", ""]
    lines += [f"![attention]({h})" for h in heatmaps]
    atomic_write(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------- CLI
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval mil",
        fromfile_prefix_chars="@",  # launch's private argument files
        description="Bag-level evaluation (slides or synthetic MNIST-bags) by mean pooling, "
        "ABMIL and Prompt-MIL over a frozen backbone.",
    )
    parser.add_argument("--backbone", required=True, help="export dir, run dir, local-dir:, timm:")
    parser.add_argument("--weights", help="weights file for --backbone timm:NAME")
    parser.add_argument("--bags", required=True, help="tile shards (bags = slides) or X.npz:SPLIT")
    parser.add_argument("--test-bags", help="held-out bags (else patient-grouped k-fold CV)")
    parser.add_argument("--labels", help="CSV slide,label for slide bags")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--config", help="recipe YAML over eval/configs/mil.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(DEFAULT_CONFIG, args.config, args.overrides)
        doc = run_mil(
            cfg,
            backbone=args.backbone,
            bags=args.bags,
            out=args.out,
            test_bags=args.test_bags,
            labels=args.labels,
            weights=args.weights,
        )
    except (
        ConfigError,
        DatasetSpecError,
        MILError,
        FeatureError,
        FileNotFoundError,
        BackboneError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({m: round(r["auroc"], 4) for m, r in doc["methods"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
