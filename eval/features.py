"""Frozen-backbone features, extracted once and cached, plus the `raw` pixel pseudo-backbone.

Why a cache: every protocol (k-NN, 52 linear heads, logistic regression, few-shot, label-efficiency
seeds) reads the same frozen features, so the backbone runs once per (backbone, dataset, transform).
The cache key is the sha256 of
- the backbone's weights as loaded (every tensor's name, dtype, shape and bytes) and its
  architecture -- an export dir, its model.safetensors or a training checkpoint holding the same
  weights share entries, and any changed weight invalidates them;
- the dataset spec and the path, size and mtime of every file it reads;
- the preprocessing (the transform's repr, window, n_last_blocks) and FEATURE_FORMAT.

What is cached per image (ViTs): the final-normed CLS token of each of the last `n_last_blocks`
blocks and the average-pooled patch tokens of the last block (see eval/featureset.py).
Under torch.distributed each rank extracts every world_size-th image and the rows are gathered.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from eval.featureset import FeatureError, FeatureSet, center_on
from pretrain import distributed as du
from pretrain.data.specs import DatasetSpec, parse_spec
from pretrain.privacy import pseudonymised_path

logger = logging.getLogger(__name__)

FEATURE_FORMAT = 1
RAW_BACKBONE = "raw"
SLICES_PREFIX = "2.5d:"  # --backbone 2.5d:PATH: a 2D backbone over a volume's axial slices
__all__ = ["FeatureError", "FeatureExtractor", "FeatureSet", "center_on", "RAW_BACKBONE"]


ARCH_KEYS = (
    "arch",
    "img_size",
    "in_chans",
    "patch_size",
    "num_features",
    "reg_tokens",
    "layerscale",
    "swiglu",
    "qkv_bias",
    "dynamic_img_size",
)


def backbone_fingerprint(model: nn.Module, meta: dict[str, Any]) -> str:
    """sha256 of the architecture keys of `meta` and every weight (name, dtype, shape, bytes).

    Descriptive meta (source, step) is left out: the same weights loaded from an export, its
    safetensors file or a checkpoint share one fingerprint; preprocessing is keyed separately.
    """
    arch = {k: meta.get(k) for k in ARCH_KEYS}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dataset_fingerprint(spec: DatasetSpec) -> dict[str, Any]:
    """Spec plus (path, size, mtime) of every file it reads: a changed file changes the key."""
    if spec.kind == "npz":
        files = [spec.path]
    elif spec.kind == "shards":
        files = list(spec.shards)
    else:
        files = sorted(p for p in spec.path.rglob("*") if p.is_file())
    stats = []
    for path in files:
        st = path.stat()
        stats.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return {"spec": spec.spec, "kind": spec.kind, "split": spec.split, "files": stats}


def _multilabel_targets(spec: DatasetSpec, labels: np.ndarray) -> np.ndarray | None:
    """open_dataset gives -1 for multi-label .npz rows (ChestMNIST); read the (N, L) targets."""
    if spec.kind != "npz" or (labels >= 0).any():
        return None
    from pretrain.data.readers import load_npz_split

    _, targets = load_npz_split(spec.path, spec.split or "")
    if targets is None or targets.shape[1] < 2:
        return None
    return targets.astype(np.int64)


def _gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows extracted rank-strided (rank r has items r, r+W, ...) -> all `total` rows in order."""
    world = dist.get_world_size()
    per_rank = -(-total // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(local)] = local
    if dist.get_backend() == "nccl":
        padded = padded.cuda()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    stacked = torch.stack(parts, dim=1).reshape(per_rank * world, *local.shape[1:])
    return stacked[:total].cpu()


class SliceEncoder(nn.Module):
    """The 2.5D baseline: a frozen 2D backbone applied to every axial slice of a volume
    (B×1×D×H×W in [0, 1], slices already at the 2D model's size), features averaged over the
    slices. Channels are repeated and normalised here as the 2D model's export says."""

    pooled_only = True  # no per-block tokens: extract_tokens takes model(x) as the one level

    def __init__(self, model: nn.Module, in_chans: int, mean: list[float], std: list[float]):
        super().__init__()
        self.model, self.in_chans = model, int(in_chans)
        self.num_features = int(model.num_features)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = volumes.shape
        slices = volumes.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
        if c != self.in_chans:
            slices = slices.mean(1, keepdim=True).expand(-1, self.in_chans, -1, -1)
        features = self.model((slices - self.mean) / self.std)
        return features.view(b, d, -1).mean(dim=1)


def _distributed() -> bool:
    return du.is_dist() and du.world_size() > 1


@torch.inference_mode()
def extract_tokens(
    model: nn.Module,
    dataset: Dataset,
    *,
    n_last_blocks: int,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    desc: str = "features",
) -> tuple[np.ndarray, np.ndarray | None]:
    """(tokens (N, blocks, D), patch_mean (N, D) or None) of a frozen backbone over `dataset`."""
    from pretrain.backbones import vit_intermediate_features

    n_blocks = len(getattr(model, "blocks", ()))
    blocks = min(n_last_blocks, n_blocks) if n_blocks else 1
    pooled_only = getattr(model, "pooled_only", False)
    total = len(dataset)
    indices = list(range(total))
    if _distributed():
        indices = indices[dist.get_rank() :: dist.get_world_size()]
    loader = DataLoader(
        Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers, shuffle=False
    )
    model = model.to(device).eval()
    tokens, pooled = [], []
    for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        images = images.to(device, non_blocking=True)
        if pooled_only:
            pooled_features = model(images)
            outs = [(pooled_features, pooled_features[:, None])]
        else:
            outs = vit_intermediate_features(model, images, blocks)
        tokens.append(torch.stack([cls for cls, _ in outs], dim=1).float().cpu())
        pooled.append(outs[-1][1].float().mean(dim=1).cpu())
    dim = getattr(model, "num_features", 0)
    tok = torch.cat(tokens) if tokens else torch.zeros((0, blocks, dim))
    pool = torch.cat(pooled) if pooled else torch.zeros((0, dim))
    if _distributed():
        tok, pool = _gather_rows(tok, total), _gather_rows(pool, total)
    # a ResNet's pooled layer-4 tokens *are* its output: no separate avgpool variant
    return tok.numpy(), (pool.numpy() if n_blocks else None)


def raw_pixels(dataset: Dataset, img_size: int | None, desc: str = "raw pixels") -> np.ndarray:
    """Flattened [0, 1] pixels (N, 1, C*H*W), or voxels (N, 1, C*D*H*W) of volumes: the
    no-learning baseline every backbone must beat."""
    rows, shape = [], None
    for index in tqdm(range(len(dataset)), desc=desc, unit="img", leave=False):
        img, _ = dataset[index]
        if img_size is not None and img.ndim == 4:  # C×D×H×W volume
            img = F.interpolate(img[None], size=(img_size,) * 3, mode="trilinear")[0]
        elif img_size is not None:
            img = F.interpolate(
                img[None], size=(img_size, img_size), mode="bilinear", antialias=True
            )[0]
        if shape is None:
            shape = tuple(img.shape)
        elif tuple(img.shape) != shape:
            raise FeatureError(
                f"raw pixels need images of one size; item {index} is {tuple(img.shape)}, "
                f"the first was {shape} (set raw_img_size=N)"
            )
        rows.append(img.reshape(1, -1).numpy())
    if not rows:
        return np.zeros((0, 1, 0), dtype=np.float32)
    return np.stack(rows).astype(np.float32)


def stain_setting(cfg: Any) -> tuple[str, str] | None:
    """(method, reference image) of the config's `stain_norm`, checked before any work; None
    when off."""
    from pretrain.transforms import STAIN_METHODS

    method, reference = cfg.stain_norm.method, cfg.stain_norm.reference
    if method is None:
        return None
    if method not in STAIN_METHODS:
        raise FeatureError(
            f"stain_norm.method must be one of {STAIN_METHODS} or null, got {method!r}"
        )
    if not reference or not Path(str(reference)).is_file():
        raise FeatureError(
            f"stain_norm.method={method} needs stain_norm.reference=IMAGE (an RGB tile file)"
        )
    return str(method), str(reference)


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FeatureExtractor:
    """Loads the backbone once; gives the (cached) FeatureSet of any dataset spec."""

    def __init__(
        self,
        backbone: str,
        *,
        weights: str | None = None,
        cache_dir: str | Path | None,
        n_last_blocks: int = 4,
        batch_size: int = 256,
        num_workers: int = 0,
        device: str = "auto",
        window: Any = None,
        raw_img_size: int | None = None,
        raw_center: bool = True,
        stain_norm: tuple[str, str] | None = None,
    ):
        self.backbone = str(backbone)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.n_last_blocks, self.batch_size, self.num_workers = (
            n_last_blocks,
            batch_size,
            num_workers,
        )
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        self.raw_img_size, self.raw_center = raw_img_size, raw_center
        if self.is_raw:
            self.model, self.meta, self.transform = None, {"arch": RAW_BACKBONE}, None
            self.window = window
            self.fingerprint = RAW_BACKBONE
            self.output_variant = "n1"
        else:
            from pretrain.backbones import is_volume_backbone
            from pretrain.init_from import open_backbone
            from pretrain.transforms import eval_transform

            slices = self.backbone.startswith(SLICES_PREFIX)
            source = self.backbone[len(SLICES_PREFIX) :] if slices else self.backbone
            self.model, self.meta = open_backbone(source, weights)
            self.window = window if window is not None else self.meta.get("window")
            self.channels = self.meta.get("channels") or self.meta.get("in_chans") or "repeat"
            if slices:
                self.model, self.meta, self.transform = self._slice_encoder()
            elif is_volume_backbone(self.model):  # whole volume, resized to the cube it expects
                from pretrain.transforms3d import volume_eval_transform

                self.transform = volume_eval_transform(
                    int(self.meta["img_size"]), self.meta.get("mean"), self.meta.get("std")
                )
            else:
                self.transform = eval_transform(
                    int(self.meta["img_size"]),
                    self.channels,
                    self.meta.get("mean"),
                    self.meta.get("std"),
                )
            self.stain_norm = None
            if stain_norm is not None:  # (method, reference image path): pathology tiles
                from torchvision.transforms import v2

                from pretrain.transforms import stain_transform

                self.stain_norm = {
                    "method": stain_norm[0],
                    "reference_sha256": _sha256(stain_norm[1]),
                }
                self.transform = v2.Compose([stain_transform(*stain_norm), self.transform])
            self.fingerprint = backbone_fingerprint(self.model, self.meta)
            # what `model(x)` returns: timm ViTs exported with global_pool="avg" (MAE) pool patches
            pooled = getattr(self.model, "global_pool", None) == "avg"
            self.output_variant = "avgpool" if pooled and hasattr(self.model, "blocks") else "n1"
        logger.info(
            "backbone %s: fingerprint %s", pseudonymised_path(self.backbone), self.fingerprint[:16]
        )

    def _slice_encoder(self) -> tuple[nn.Module, dict[str, Any], nn.Module]:
        """(SliceEncoder, meta, transform) of the 2.5D baseline over the loaded 2D backbone."""
        from pretrain.backbones import is_volume_backbone
        from pretrain.transforms import default_mean_std
        from pretrain.transforms3d import slice_eval_transform

        if is_volume_backbone(self.model):
            raise FeatureError(f"{self.backbone}: 2.5d: needs a 2D backbone, this one is 3D")
        in_chans = int(self.meta.get("in_chans") or 3)
        default_mean, default_std = default_mean_std(in_chans)
        mean = list(self.meta.get("mean") or default_mean)
        std = list(self.meta.get("std") or default_std)
        model = SliceEncoder(self.model, in_chans, mean, std).eval()
        meta = {**self.meta, "arch": f"2.5D {self.meta.get('arch')}"}
        return model, meta, slice_eval_transform(int(self.meta["img_size"]))

    @property
    def is_raw(self) -> bool:
        return self.backbone == RAW_BACKBONE

    def preprocessing(self) -> dict[str, Any]:
        """What the images went through: stated in the report and part of the cache key."""
        if self.is_raw:
            size = "native size" if self.raw_img_size is None else f"resized to {self.raw_img_size}"
            centre = ", centred on the mean training image" if self.raw_center else ""
            return {
                "description": f"flattened pixels in [0, 1] ({size}, bilinear){centre}",
                "raw_img_size": self.raw_img_size,
                "raw_center": self.raw_center,
                "window": self.window,
            }
        return {
            "description": " ".join(repr(self.transform).split()),
            "img_size": self.meta.get("img_size"),
            "channels": self.channels,
            "mean": self.meta.get("mean"),
            "std": self.meta.get("std"),
            "window": self.window,
            "n_last_blocks": self.n_last_blocks,
            "stain_norm": self.stain_norm,
        }

    def cache_key(self, spec: DatasetSpec) -> str:
        doc = {
            "format": FEATURE_FORMAT,
            "backbone": self.fingerprint,
            "dataset": dataset_fingerprint(spec),
            # raw centring happens later, on the train mean: one cached entry serves both
            "preprocessing": {
                k: v
                for k, v in self.preprocessing().items()
                if k not in ("description", "raw_center") or not self.is_raw
            },
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def open(self, spec: str | DatasetSpec) -> Dataset:
        from pretrain.data.datasets import open_dataset

        return open_dataset(spec, transform=self.transform, window=self.window)

    def __call__(self, spec: str | DatasetSpec, dataset: Dataset | None = None) -> FeatureSet:
        parsed = spec if isinstance(spec, DatasetSpec) else parse_spec(spec)
        shown = pseudonymised_path(parsed.spec)  # logs and the cache name no path
        key = self.cache_key(parsed)
        cached = self._load(key)
        if cached is not None:
            logger.info("features of %s from cache %s", shown, key[:16])
            cached.output = self.output_variant
            return cached
        dataset = dataset if dataset is not None else self.open(parsed)
        labels = np.asarray(dataset.labels, dtype=np.int64)
        num_classes = int(dataset.num_classes)
        targets = _multilabel_targets(parsed, labels)
        if targets is not None:
            labels, num_classes = targets, targets.shape[1]
        desc = f"{'raw' if self.is_raw else 'features'} {shown}"
        if self.is_raw:
            tokens, pooled = raw_pixels(dataset, self.raw_img_size, desc), None
        else:
            tokens, pooled = extract_tokens(
                self.model,
                dataset,
                n_last_blocks=self.n_last_blocks,
                batch_size=self.batch_size,
                num_workers=self.num_workers,
                device=self.device,
                desc=desc,
            )
        keys = [str(k) for k in getattr(dataset, "keys", range(len(labels)))]
        patients = list(getattr(dataset, "patients", None) or [None] * len(labels))
        if all(p is None for p in patients):
            groups = None
        else:  # an image of unknown patient is its own group, never pooled with the others
            groups = np.asarray(
                [f"item:{k}" if p is None else str(p) for p, k in zip(patients, keys)]
            )
        features = FeatureSet(
            tokens=tokens,
            patch_mean=pooled,
            labels=labels,
            num_classes=num_classes,
            keys=np.asarray(keys, dtype=str),
            patients=groups,
            output=self.output_variant,
        )
        self._save(key, shown, features)
        return features

    def _paths(self, key: str) -> tuple[Path, Path] | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{key}.npz", self.cache_dir / f"{key}.json"

    def _load(self, key: str) -> FeatureSet | None:
        paths = self._paths(key)
        if paths is None or not paths[0].is_file():
            return None
        try:
            return FeatureSet.load(paths[0])
        except Exception as exc:  # a truncated cache file is rebuilt, not fatal
            logger.warning("feature cache %s unreadable (%s); extracting again", paths[0], exc)
            return None

    def _save(self, key: str, shown: str, features: FeatureSet) -> None:
        paths = self._paths(key)
        if paths is None or (_distributed() and dist.get_rank() != 0):
            return
        features.save(paths[0])
        info = {
            "backbone": pseudonymised_path(self.backbone),
            "fingerprint": self.fingerprint,
            "dataset": shown,
            "n": len(features),
            "preprocessing": self.preprocessing(),
        }
        paths[1].write_text(json.dumps(info, indent=2, default=str) + "\n")
        logger.info("cached features of %s in %s", shown, paths[0])
