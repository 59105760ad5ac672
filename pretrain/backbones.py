"""Backbones (timm ViTs, torchvision ResNets) and their export in plain-timm format.

Why plain timm: a pretrained medssl backbone must be usable by anyone with `timm` alone. The export
is a Hugging Face Hub model folder in timm's layout, written by timm's own `save_for_hf`
(config.json: architecture, model_args, pretrained_cfg; model.safetensors: plain timm keys), so
`timm.create_model("local-dir:EXPORT", pretrained=True)` loads it with no renaming and
`timm.models.push_to_hf_hub` or `huggingface-cli upload` takes it as is. config.json also holds a
`medssl` entry (method, step, windowing, provenance) that timm ignores. SwiGLU has no JSON-able switch in timm 1.0 (`mlp_layer`
takes a class), so SwiGLU ViTs are built from the registered `vit_giant_patch14_dinov2` entry,
whose only non-overridable choice is the packed SwiGLU MLP (DINOv2's); every dimension is
overridden explicitly. ResNets are torchvision models whose keys equal timm's `resnet18/50`.

Backbone config keys (the `model:` section of the pretraining YAML holds the same keys):
  arch             vit_tiny | vit_small | vit_base | vit_large | vit_tiny_convstem | resnet18 |
                   resnet50 (vit_tiny_convstem: ViT-tiny whose patch embedding is a ResNet stem)
  patch_size       ViT patch size (4, 8, 14, 16); img_size must be a multiple of it; for
                   vit_tiny_convstem a multiple of 4, the stem's stride
  img_size         global-crop size the position embedding is made for (28, 32, 64, 224...)
  in_chans         1 (grayscale) or 3
  depth            ViT blocks; null = the arch's (12 for tiny/small/base, 24 for large)
  reg_tokens       number of ViT register tokens (0 = none)
  layerscale       null, or LayerScale init value (e.g. 1e-5)
  swiglu           bool, SwiGLU MLP (DINOv2 hidden-size rule) instead of GELU MLP
  drop_path_rate   stochastic depth (ViT training only; not exported; ignored by torchvision ResNets)
  qkv_bias         bool
  dynamic_img_size bool, lets one ViT take global and local multi-crop sizes (pos-embed resampled)
  widen_factor     3D ResNet width multiplier (see backbones3d.py, which builds the volume archs
                   vit3d_* and resnet3d_* from MONAI and exports them for MONAI)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pretrain.io import atomic_write

logger = logging.getLogger(__name__)

WEIGHTS_FILENAME = "model.safetensors"  # the names timm and the Hub read
CONFIG_FILENAME = "config.json"
CARD_FILENAME = "README.md"  # the model card
FORMAT_VERSION = 2  # 1: backbone.json + backbone.safetensors (before the Hub layout)
# pretrained_cfg entries timm copies from the architecture's registered ImageNet weights: they
# describe weights these are not (tag, paper, licence, test-time size), so the export drops them.
_FOREIGN_PRETRAINED_KEYS = (
    "tag",
    "hf_hub_id",
    "url",
    "file",
    "source",
    "origin_url",
    "paper_ids",
    "paper_name",
    "notes",
    "test_input_size",
    "test_crop_pct",
    "test_pool_size",
    "pool_size",
    "license",
    "label_names",
)

BACKBONE_DEFAULTS: dict[str, Any] = {
    "arch": "vit_small",
    "patch_size": 16,
    "img_size": 224,
    "in_chans": 3,
    "depth": None,
    "reg_tokens": 0,
    "layerscale": None,
    "swiglu": False,
    "drop_path_rate": 0.0,
    "qkv_bias": True,
    "dynamic_img_size": True,
    "widen_factor": 1.0,
}
# name -> (embed_dim, depth, num_heads)
VIT_SIZES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_tiny_convstem": (192, 12, 3),
}
# ViTs whose patch embedding is a ResNet stem (7x7 conv stride 2 + GroupNorm + ReLU + 3x3 max-pool
# stride 2: stride 4) and a (patch_size / 4)-strided projection of its feature map: timm's
# registered hybrid (R+ViT-Ti), so the export is plain timm. Early convolutions (Xiao et al. 2021):
# on 28-32 px X-rays even a random stem's features beat a trained ViT-tiny/7's (docs/benchmarks.md,
# issue 17).
CONV_STEM_VITS = {"vit_tiny_convstem": ("vit_tiny_r_s16_p8_224", 4)}
RESNET_FEATURES = {"resnet18": 512, "resnet50": 2048}
VIT3D_ARCHS = ("vit3d_tiny", "vit3d_small", "vit3d_base")  # built by backbones3d (MONAI)


def is_volume_backbone(model_or_config: nn.Module | Mapping) -> bool:
    """A 3D backbone (takes B×C×D×H×W): by its config's arch or its `medssl_config`."""
    if isinstance(model_or_config, (Mapping, DictConfig)):
        c = model_or_config
    else:
        c = getattr(_unwrap(model_or_config), "medssl_config", None) or {}
    return str(c.get("arch", "")).startswith(("vit3d_", "resnet3d_"))


SWIGLU_MODEL_NAME = "vit_giant_patch14_dinov2"  # registered timm ViT with the packed SwiGLU MLP
ARCH_META_KEYS = ("arch", "img_size", "in_chans", "patch_size", "num_features")


class BackboneError(ValueError):
    """A backbone that cannot be built or loaded (bad config, missing/corrupt/mismatched files)."""


def resolve_backbone_config(cfg: Mapping | DictConfig) -> dict[str, Any]:
    """Fill defaults and validate, so a typo fails before a model (or a long job) is built."""
    given = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    unknown = sorted(set(given) - set(BACKBONE_DEFAULTS))
    if unknown:
        raise BackboneError(
            f"unknown backbone config key(s) {unknown}; known: {sorted(BACKBONE_DEFAULTS)}"
        )
    c = {**BACKBONE_DEFAULTS, **given}
    if c["arch"] not in VIT_SIZES and c["arch"] not in RESNET_FEATURES:
        from pretrain.backbones3d import VOLUME_ARCHS

        if c["arch"] not in VOLUME_ARCHS:
            raise BackboneError(
                f"unknown arch {c['arch']!r}; choose from "
                f"{[*VIT_SIZES, *RESNET_FEATURES, *VOLUME_ARCHS]}"
            )
    if not isinstance(c["widen_factor"], (int, float)) or not c["widen_factor"] > 0:
        raise BackboneError(f"backbone widen_factor must be > 0, got {c['widen_factor']!r}")
    c["widen_factor"] = float(c["widen_factor"])
    for key in ("patch_size", "img_size", "in_chans"):
        if not isinstance(c[key], int) or isinstance(c[key], bool) or c[key] < 1:
            raise BackboneError(f"backbone {key} must be a positive int, got {c[key]!r}")
    for key in ("swiglu", "qkv_bias", "dynamic_img_size"):
        if not isinstance(c[key], bool):
            raise BackboneError(f"backbone {key} must be true/false, got {c[key]!r}")
    if c["depth"] is not None and (
        not isinstance(c["depth"], int) or isinstance(c["depth"], bool) or c["depth"] < 1
    ):
        raise BackboneError(f"backbone depth must be null or a positive int, got {c['depth']!r}")
    if not isinstance(c["reg_tokens"], int) or c["reg_tokens"] < 0:
        raise BackboneError(f"backbone reg_tokens must be an int >= 0, got {c['reg_tokens']!r}")
    if c["layerscale"] is not None and not (
        isinstance(c["layerscale"], (int, float)) and c["layerscale"] > 0
    ):
        raise BackboneError(f"backbone layerscale must be null or > 0, got {c['layerscale']!r}")
    if c["layerscale"] is not None:
        c["layerscale"] = float(c["layerscale"])
    c["drop_path_rate"] = float(c["drop_path_rate"])
    if c["arch"] in (*VIT_SIZES, *VIT3D_ARCHS) and c["img_size"] % c["patch_size"]:
        raise BackboneError(
            f"img_size {c['img_size']} is not a multiple of patch_size {c['patch_size']}"
        )
    if c["arch"] in CONV_STEM_VITS:
        stride = CONV_STEM_VITS[c["arch"]][1]
        if c["patch_size"] % stride or c["swiglu"]:
            raise BackboneError(
                f"{c['arch']} needs patch_size a multiple of its stem's stride {stride} "
                f"(got {c['patch_size']}) and swiglu=false"
            )
    if c["arch"] in RESNET_FEATURES:
        if c["reg_tokens"] or c["layerscale"] is not None or c["swiglu"] or c["depth"]:
            logger.warning("%s ignores ViT-only keys depth/reg_tokens/layerscale/swiglu", c["arch"])
        if c["drop_path_rate"]:
            logger.warning("torchvision %s has no drop_path; drop_path_rate ignored", c["arch"])
    return c


def swiglu_mlp_ratio(embed_dim: int) -> float:
    """mlp_ratio giving timm's packed SwiGLU the DINOv2 hidden size: 2/3 * 4 * dim, rounded up to 8.

    +0.5 keeps `int(dim * ratio)` exact after float rounding and a JSON round trip.
    """
    hidden = (int(4 * embed_dim * 2 / 3) + 7) // 8 * 8
    return (2 * hidden + 0.5) / embed_dim


def _timm_kwargs(c: dict[str, Any]) -> dict[str, Any]:
    arch = c["arch"]
    overlay: dict[str, Any] = {"input_size": [c["in_chans"], c["img_size"], c["img_size"]]}
    if arch in RESNET_FEATURES:
        return {
            "model_name": arch,
            "pretrained": False,
            "num_classes": 0,
            "in_chans": c["in_chans"],
            "pretrained_cfg_overlay": overlay,
        }
    dim, depth, heads = VIT_SIZES[arch]
    depth = c["depth"] or depth
    overlay["fixed_input_size"] = not c["dynamic_img_size"]
    name, patch = SWIGLU_MODEL_NAME if c["swiglu"] else f"{arch}_patch16_224", c["patch_size"]
    if arch in CONV_STEM_VITS:
        stem_name, stride = CONV_STEM_VITS[arch]
        name, patch = stem_name, c["patch_size"] // stride
    return {
        "model_name": name,
        "pretrained": False,
        "num_classes": 0,
        "global_pool": "token",
        "class_token": True,
        "no_embed_class": False,
        "img_size": c["img_size"],
        "patch_size": patch,
        "in_chans": c["in_chans"],
        "embed_dim": dim,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": swiglu_mlp_ratio(dim) if c["swiglu"] else 4.0,
        "qkv_bias": c["qkv_bias"],
        "init_values": c["layerscale"],
        "reg_tokens": c["reg_tokens"],
        "dynamic_img_size": c["dynamic_img_size"],
        "pretrained_cfg_overlay": overlay,
    }


def build_backbone(cfg: Mapping | DictConfig) -> nn.Module:
    """Backbone whose forward(x) gives pooled features (B, num_features); never downloads weights.

    Attaches `medssl_config` (resolved cfg) and `timm_kwargs` (export kwargs, no drop_path).
    """
    c = resolve_backbone_config(cfg)
    if is_volume_backbone(c):
        from pretrain.backbones3d import build_volume_backbone

        return build_volume_backbone(c)
    kwargs = _timm_kwargs(c)
    if c["arch"] in RESNET_FEATURES:
        model = getattr(torchvision.models, c["arch"])(weights=None)
        if c["in_chans"] != 3:
            model.conv1 = nn.Conv2d(
                c["in_chans"], 64, kernel_size=7, stride=2, padding=3, bias=False
            )
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.fc = nn.Identity()
        model.num_features = RESNET_FEATURES[c["arch"]]
    else:
        model = timm.create_model(**kwargs, drop_path_rate=c["drop_path_rate"])
    model.medssl_config = c
    model.timm_kwargs = kwargs
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """DDP (`module`) and torch.compile (`_orig_mod`) wrappers hide the backbone."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def backbone_timm_kwargs(model: nn.Module) -> dict[str, Any]:
    """JSON-able kwargs so that `timm.create_model(**kwargs)` rebuilds this backbone."""
    kwargs = getattr(_unwrap(model), "timm_kwargs", None)
    if kwargs is None:
        raise BackboneError(
            "model has no timm_kwargs: build it with build_backbone or load_backbone"
        )
    return json.loads(json.dumps(kwargs))


def _check_keys_match(kwargs: dict[str, Any], state: Mapping[str, Tensor], where: str) -> None:
    """Compare keys/shapes with a meta-device timm model: cheap, and catches a mismatch at export."""
    with torch.device("meta"):
        reference = timm.create_model(**kwargs).state_dict()
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    shapes = [
        k for k in reference if k in state and tuple(reference[k].shape) != tuple(state[k].shape)
    ]
    if missing or extra or shapes:
        raise BackboneError(
            f"{where}: weights do not match timm.create_model({kwargs['model_name']!r}, ...): "
            f"missing {missing[:5]}, unexpected {extra[:5]}, shape mismatch {shapes[:5]}"
        )


def _as_channel_list(value: Any, in_chans: int, key: str) -> list[float] | None:
    if value is None:
        return None
    values = (
        [float(value)] * in_chans if isinstance(value, (int, float)) else [float(v) for v in value]
    )
    if len(values) != in_chans:
        raise BackboneError(f"meta {key} has {len(values)} values for {in_chans} channels")
    return values


def _merge_meta(info: dict[str, Any], meta: Mapping | None, in_chans: int) -> None:
    """Add the caller's meta to an export's info; architecture keys must agree with the model."""
    for key, value in (meta or {}).items():
        if key in ARCH_META_KEYS and value != info[key]:
            raise BackboneError(f"meta {key}={value!r} contradicts the model ({info[key]!r})")
        info[key] = value
    for key in ("mean", "std"):
        info[key] = _as_channel_list(info[key], in_chans, key)


def export_backbone(
    model: nn.Module,
    out_dir: str | Path,
    *,
    meta: dict | None = None,
    license: str | None = None,
    card: str | None = None,
) -> Path:
    """Write a timm / Hugging Face Hub model folder (config.json, model.safetensors, and README.md
    when `card` is given); return out_dir.

    The weights go through a timm model built from the export's own kwargs and timm's
    `save_for_hf`, so what timm writes is what timm reads back. config.json is written last: its
    presence means the export is complete.
    """
    from timm.models import save_for_hf

    model = _unwrap(model)
    c = getattr(model, "medssl_config", None)
    if c is None:
        raise BackboneError(
            "model has no medssl_config: build it with build_backbone or load_backbone"
        )
    if is_volume_backbone(model):
        return _export_volume(model, out_dir, meta=meta, license=license, card=card)
    kwargs = backbone_timm_kwargs(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _check_keys_match(kwargs, state, f"export to {out_dir}")
    is_vit = c["arch"] in VIT_SIZES
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "arch": c["arch"],
        "img_size": c["img_size"],
        "in_chans": c["in_chans"],
        "patch_size": c["patch_size"] if is_vit else None,
        "num_features": int(model.num_features),
        "depth": c["depth"] if is_vit else None,
        "reg_tokens": c["reg_tokens"] if is_vit else 0,
        "layerscale": c["layerscale"] if is_vit else None,
        "swiglu": c["swiglu"] and is_vit,
        "qkv_bias": c["qkv_bias"],
        "dynamic_img_size": c["dynamic_img_size"],
        "channels": c["in_chans"],
        "mean": None,
        "std": None,
        "window": None,
        "source": None,
        "timm_version": timm.__version__,
    }
    _merge_meta(info, meta, c["in_chans"])
    chans = c["in_chans"]
    data_config = {
        "input_size": [chans, c["img_size"], c["img_size"]],
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        # no normalisation recorded = none applied: timm must not fill in ImageNet's statistics
        "mean": info["mean"] if info["mean"] is not None else [0.0] * chans,
        "std": info["std"] if info["std"] is not None else [1.0] * chans,
    }
    with torch.device("meta"):
        twin = timm.create_model(**kwargs)
    twin.load_state_dict(state, strict=True, assign=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        save_for_hf(
            twin,
            tmp,
            model_config={"medssl": _json_plain(info)},
            safe_serialization=True,
            data_config=data_config,
        )
        doc = json.loads((Path(tmp) / CONFIG_FILENAME).read_text())
        pretrained = doc["pretrained_cfg"]
        for key in _FOREIGN_PRETRAINED_KEYS:
            pretrained.pop(key, None)
        if license:
            pretrained["license"] = license
        os.replace(Path(tmp) / WEIGHTS_FILENAME, out / WEIGHTS_FILENAME)
    if card is not None:
        atomic_write(out / CARD_FILENAME, card)
    atomic_write(out / CONFIG_FILENAME, json.dumps(doc, indent=2) + "\n")
    logger.info("exported %s backbone (%s) to %s", c["arch"], info["source"], out)
    return out


def _export_volume(
    model: nn.Module,
    out_dir: str | Path,
    *,
    meta: dict | None,
    license: str | None,
    card: str | None,
) -> Path:
    from pretrain.backbones3d import export_volume_backbone

    c = model.medssl_config
    is_vit = c["arch"] in VIT3D_ARCHS
    info: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "arch": c["arch"],
        "spatial_dims": 3,
        "img_size": c["img_size"],
        "in_chans": c["in_chans"],
        "patch_size": c["patch_size"] if is_vit else None,
        "num_features": int(model.num_features),
        "depth": c["depth"] if is_vit else None,
        "qkv_bias": c["qkv_bias"],
        "widen_factor": None if is_vit else c["widen_factor"],
        "channels": c["in_chans"],
        "mean": None,
        "std": None,
        "window": None,
        "source": None,
    }
    _merge_meta(info, meta, c["in_chans"])
    out = export_volume_backbone(model, out_dir, _json_plain(info), license=license, card=card)
    logger.info("exported %s volume backbone (%s) to %s", c["arch"], info["source"], out)
    return out


def refresh_model_card(export_dir: str | Path, evaluation: Sequence[Mapping[str, Any]]) -> Path:
    """Rewrite an export's model card with an evaluation table (launch pipeline's gather job),
    from what its config.json recorded at export."""
    from pretrain.model_card import model_card

    folder = Path(export_dir)
    doc = json.loads((folder / CONFIG_FILENAME).read_text())
    info = doc["medssl"]
    card = model_card(
        info,
        license=(doc.get("pretrained_cfg") or {}).get("license") or "other",
        tags=info.get("card_tags") or [],
        data=info.get("pretraining_data"),
        evaluation=evaluation,
    )
    return atomic_write(folder / CARD_FILENAME, card)


def _json_plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _config_from_meta(info: Mapping[str, Any]) -> dict[str, Any]:
    c = {k: info[k] for k in BACKBONE_DEFAULTS if k in info and info[k] is not None}
    c["drop_path_rate"] = 0.0
    return resolve_backbone_config(c)


def is_export_dir(path: Path) -> bool:
    """A folder holding this project's export (timm layout + the `medssl` entry)."""
    config = path / CONFIG_FILENAME
    if not (config.is_file() and (path / WEIGHTS_FILENAME).is_file()):
        return False
    try:
        return "medssl" in json.loads(config.read_text())
    except ValueError:
        return False


def find_export(path: Path) -> Path:
    """Resolve a user path to an export's config.json or a .pt checkpoint (newest found in a run
    dir)."""
    if not path.exists():
        raise FileNotFoundError(f"backbone path not found: {path}")
    if path.is_file():
        if path.name in (WEIGHTS_FILENAME, CONFIG_FILENAME):
            return path.with_name(CONFIG_FILENAME)
        return path
    if (path / CONFIG_FILENAME).is_file():
        return path / CONFIG_FILENAME
    exports = [p / CONFIG_FILENAME for p in path.rglob("*") if p.is_dir() and is_export_dir(p)]
    for found in (exports, list(path.rglob("*.pt"))):
        if found:
            newest = max(found, key=lambda p: p.stat().st_mtime)
            logger.info("loading newest backbone under %s: %s", path, newest)
            return newest
    raise FileNotFoundError(
        f"{path}: no export ({CONFIG_FILENAME} + {WEIGHTS_FILENAME}) or *.pt checkpoint inside"
    )


def read_export_config(config_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(timm kwargs, medssl meta) of an export's config.json."""
    if not config_path.is_file():
        raise FileNotFoundError(f"backbone config not found: {config_path}")
    try:
        doc = json.loads(config_path.read_text())
        info = dict(doc["medssl"])
        pretrained = doc.get("pretrained_cfg") or {}
        kwargs = {
            "model_name": doc["architecture"],
            "pretrained": False,
            **doc.get("model_args", {}),
            "num_classes": 0,
            "pretrained_cfg_overlay": {
                k: pretrained[k]
                for k in ("input_size", "mean", "std", "fixed_input_size")
                if k in pretrained
            },
        }
    except (ValueError, KeyError, TypeError) as exc:
        raise BackboneError(
            f"{config_path}: not a medssl export config.json (architecture, model_args, "
            f"medssl) ({exc!r})"
        ) from exc
    return kwargs, info


def _load_volume_export(config_path: Path, doc: dict[str, Any]) -> tuple[nn.Module, dict]:
    from pretrain.backbones3d import load_volume_export

    weights = config_path.with_name(WEIGHTS_FILENAME)
    if not weights.is_file():
        raise FileNotFoundError(f"backbone weights not found: {weights}")
    try:
        model = load_volume_export(doc, weights)
    except Exception as exc:  # safetensors/MONAI raise several types for bad files
        raise BackboneError(
            f"{weights} does not load into {doc.get('architecture')}: {str(exc)[:600]}"
        ) from exc
    info = dict(doc["medssl"])
    model.medssl_config = _config_from_meta(info)
    return model, info


def _monai_export_doc(config_path: Path) -> dict[str, Any] | None:
    """config.json of a volume export (MONAI architecture, see backbones3d), else None."""
    try:
        doc = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None  # read_export_config names the problem
    if isinstance(doc, dict) and "medssl" in doc and doc.get("library") == "monai":
        return doc
    return None


def _load_export(config_path: Path) -> tuple[nn.Module, dict]:
    weights = config_path.with_name(WEIGHTS_FILENAME)
    monai_doc = _monai_export_doc(config_path)
    if monai_doc is not None:
        return _load_volume_export(config_path, monai_doc)
    kwargs, info = read_export_config(config_path)
    if not weights.is_file():
        raise FileNotFoundError(f"backbone weights not found: {weights}")
    try:
        state = safetensors.torch.load_file(str(weights))
    except Exception as exc:  # safetensors raises several error types for truncated files
        raise BackboneError(f"{weights}: corrupt or unreadable safetensors ({exc})") from exc
    try:
        # Built on the meta device: timm's random init costs most of a load and is overwritten anyway.
        with torch.device("meta"):
            model = timm.create_model(**kwargs)
        model.load_state_dict(state, strict=True, assign=True)
        if any(
            t.is_meta for t in (*model.parameters(), *model.buffers())
        ):  # non-persistent buffers
            model = timm.create_model(**kwargs)
            model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise BackboneError(
            f"{weights} does not match the architecture in {config_path}: {str(exc)[:600]}"
        ) from exc
    model.timm_kwargs = kwargs
    model.medssl_config = _config_from_meta(info)
    return model, info


def strip_prefixes(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys without DDP (`module.`) and torch.compile (`_orig_mod.`) wrapper prefixes."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def _load_checkpoint(path: Path, map_location: str | torch.device) -> tuple[nn.Module, dict]:
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle/zip errors vary
        raise BackboneError(f"{path}: cannot read checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict):
        raise BackboneError(f"{path}: checkpoint is not a dict")
    state = ckpt.get("teacher_backbone", ckpt.get("backbone_state"))
    cfg = ckpt.get("backbone_config")
    if cfg is None and isinstance(ckpt.get("config"), dict):
        cfg = ckpt["config"].get("model")
    if state is None or cfg is None:
        raise BackboneError(
            f"{path}: checkpoint needs 'teacher_backbone' or 'backbone_state' and 'backbone_config' "
            f"(found keys {sorted(ckpt)[:10]})"
        )
    model = build_backbone({**cfg, "drop_path_rate": 0.0})
    try:
        model.load_state_dict(strip_prefixes(state), strict=True)
    except RuntimeError as exc:
        raise BackboneError(
            f"{path}: backbone weights do not match backbone_config: {str(exc)[:600]}"
        ) from exc
    which = "teacher" if "teacher_backbone" in ckpt else "backbone"
    step = f" step {ckpt['step']}" if "step" in ckpt else ""
    info = {**model.medssl_config, "num_features": int(model.num_features)}
    info.update({"source": f"{which} of {path.name}{step}", **dict(ckpt.get("meta") or {})})
    return model, info


def load_backbone(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Load a backbone for evaluation; returns (model in eval mode, meta = config.json["medssl"]).

    `path` may be an export dir, its config.json/model.safetensors, a pretraining output dir
    (newest export inside, else newest *.pt), or a training checkpoint `.pt`. A checkpoint is
    a plain dict (loaded with weights_only=True) holding:
      - "teacher_backbone" (preferred, DINOv2 teacher) or "backbone_state": the backbone state dict
        (keys as built by build_backbone; `module.`/`_orig_mod.` prefixes are stripped);
      - "backbone_config": the backbone config dict (keys of BACKBONE_DEFAULTS), or else
        "config": the full plain-dict run config whose "model" entry is that dict;
      - optional "step" (int) and "meta" (dict merged into the returned meta: mean, std, window...).
    """
    target = find_export(Path(path))
    if target.suffix == ".pt":
        model, info = _load_checkpoint(target, map_location)
    elif target.name == CONFIG_FILENAME:
        model, info = _load_export(target)
    else:
        raise BackboneError(
            f"{target}: expected an export dir, its {CONFIG_FILENAME} or {WEIGHTS_FILENAME}, "
            "or a .pt checkpoint"
        )
    return model.to(map_location).eval(), info


def vit_intermediate_features(
    model: nn.Module, x: Tensor, n_last_blocks: int
) -> list[tuple[Tensor, Tensor]]:
    """Per block (cls_token (B, D), patch_tokens (B, N, D)) of the last n blocks, final-normed.

    This is the DINOv2 linear-probe input. ResNets give [(pooled, layer4 tokens)] for n_last_blocks=1.
    """
    model = _unwrap(model)
    if is_volume_backbone(model):
        from pretrain.backbones3d import volume_tokens

        return volume_tokens(model, x, n_last_blocks)
    if isinstance(model, VisionTransformer):
        if not 1 <= n_last_blocks <= len(model.blocks):
            raise ValueError(f"n_last_blocks={n_last_blocks} outside 1..{len(model.blocks)}")
        if not model.has_class_token:
            raise ValueError("vit_intermediate_features needs a ViT with a class token")
        outs = model.forward_intermediates(
            x,
            indices=n_last_blocks,
            return_prefix_tokens=True,
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        return [(prefix[:, 0], patches) for patches, prefix in outs]
    if n_last_blocks != 1:
        raise ValueError(f"{type(model).__name__} is not a ViT: only n_last_blocks=1 is supported")
    if hasattr(model, "forward_features"):  # timm ResNet (from load_backbone)
        fmap = model.forward_features(x)
    elif isinstance(model, torchvision.models.ResNet):
        fmap = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        fmap = model.layer4(model.layer3(model.layer2(model.layer1(fmap))))
    else:
        raise TypeError(f"unsupported backbone type {type(model).__name__}")
    return [(fmap.mean(dim=(2, 3)), fmap.flatten(2).transpose(1, 2))]
