"""3D backbones for volumes: MONAI's `ViT` (3D patch embedding) and `ResNet` (3D convolutions).

Why MONAI: it is the field's library for 3D networks, and an export is only useful if others can
rebuild it. The export is the same folder as a 2D one (config.json + model.safetensors + README.md)
but config.json names `architecture: monai.networks.nets.ViT` (or `ResNet`) and its `model_args`,
so the library's own constructor + `load_state_dict(strict=True)` restores it with no renaming:

    >>> import json, safetensors.torch, monai.networks.nets as nets  # doctest: +SKIP
    >>> doc = json.load(open("export/config.json"))
    >>> net = getattr(nets, doc["architecture"].rsplit(".", 1)[1])(**doc["model_args"])
    >>> net.load_state_dict(safetensors.torch.load_file("export/model.safetensors"), strict=True)

A MONAI ViT returns (tokens, hidden states); the features this project uses are the mean of the
final-normed tokens (it has no class token). A ResNet built with `feed_forward=False` returns its
pooled features. Inputs are B×C×D×H×W volumes in [0, 1], normalised by the export's mean/std.

Backbone config keys (beside the 2D ones in backbones.py):
  arch          vit3d_tiny | vit3d_small | vit3d_base | resnet3d_10 | resnet3d_18 | resnet3d_34 |
                resnet3d_50
  img_size      cube side the ViT's position embedding is made for (a multiple of patch_size)
  patch_size    ViT cube patch side
  widen_factor  ResNet width multiplier (0.5 halves every stage: 4x fewer FLOPs)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
from monai.networks.nets import ViT
from torch import Tensor, nn

from pretrain.io import atomic_write

logger = logging.getLogger(__name__)

# name -> (hidden size, blocks, heads)
VIT3D_SIZES = {
    "vit3d_tiny": (192, 12, 3),
    "vit3d_small": (384, 12, 6),
    "vit3d_base": (768, 12, 12),
}
# name -> (block, layers per stage)
RESNET3D_LAYERS = {
    "resnet3d_10": ("basic", [1, 1, 1, 1]),
    "resnet3d_18": ("basic", [2, 2, 2, 2]),
    "resnet3d_34": ("basic", [3, 4, 6, 3]),
    "resnet3d_50": ("bottleneck", [3, 4, 6, 3]),
}
VOLUME_ARCHS = (*VIT3D_SIZES, *RESNET3D_LAYERS)
MONAI_MODULE = "monai.networks.nets"


def monai_model_args(c: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(MONAI class name, JSON-able constructor kwargs) for a resolved backbone config."""
    arch = c["arch"]
    if arch in VIT3D_SIZES:
        dim, depth, heads = VIT3D_SIZES[arch]
        return "ViT", {
            "in_channels": c["in_chans"],
            "img_size": [c["img_size"]] * 3,
            "patch_size": [c["patch_size"]] * 3,
            "hidden_size": dim,
            "mlp_dim": 4 * dim,
            "num_layers": c["depth"] or depth,
            "num_heads": heads,
            "proj_type": "conv",
            "pos_embed_type": "learnable",
            "classification": False,
            "dropout_rate": 0.0,
            "spatial_dims": 3,
            "qkv_bias": c["qkv_bias"],
        }
    block, layers = RESNET3D_LAYERS[arch]
    return "ResNet", {
        "block": block,
        "layers": layers,
        "block_inplanes": [64, 128, 256, 512],
        "spatial_dims": 3,
        "n_input_channels": c["in_chans"],
        "conv1_t_size": 7,
        "conv1_t_stride": 2,
        "no_max_pool": True,  # small volumes (28-64 voxels): keep resolution for the stages
        "shortcut_type": "B",
        "widen_factor": float(c["widen_factor"]),
        "feed_forward": False,
        "num_classes": 0,
    }


def _monai_class(name: str) -> type[nn.Module]:
    import monai.networks.nets as nets

    return getattr(nets, name)


def _num_features(name: str, args: Mapping[str, Any]) -> int:
    if name == "ViT":
        return int(args["hidden_size"])
    expansion = 4 if args["block"] == "bottleneck" else 1
    return int(512 * float(args["widen_factor"])) * expansion


class PooledViT(ViT):
    """MONAI's ViT whose forward gives pooled features (B, D): the mean of the final-normed
    tokens. Same constructor and state-dict keys as `monai.networks.nets.ViT`."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch_embedding(x)
        for block in self.blocks:
            h = block(h)
        return self.norm(h).mean(dim=1)


def build_monai(name: str, args: Mapping[str, Any]) -> nn.Module:
    """The MONAI network, returning pooled features, with `num_features` and `monai_spec`."""
    model = PooledViT(**args) if name == "ViT" else _monai_class(name)(**args)
    if name == "ViT":
        model.global_pool = "avg"  # what model(x) gives: the mean of the normed tokens
    model.num_features = _num_features(name, args)
    model.monai_spec = {"class": name, "model_args": json.loads(json.dumps(dict(args)))}
    return model


def build_volume_backbone(c: dict[str, Any]) -> nn.Module:
    name, args = monai_model_args(c)
    model = build_monai(name, args)
    model.medssl_config = c
    return model


def is_monai_vit(model: nn.Module) -> bool:
    return getattr(model, "monai_spec", {}).get("class") == "ViT"


def volume_tokens(model: nn.Module, x: Tensor, n_last_blocks: int) -> list[tuple[Tensor, Tensor]]:
    """Per block (pooled (B, D), tokens (B, N, D)), final-normed, of the last n blocks (MONAI
    ViT), or [(pooled, layer-4 voxels as tokens)] for a ResNet (n_last_blocks must be 1)."""
    if is_monai_vit(model):
        n_blocks = len(model.blocks)
        if not 1 <= n_last_blocks <= n_blocks:
            raise ValueError(f"n_last_blocks={n_last_blocks} outside 1..{n_blocks}")
        h = model.patch_embedding(x)
        outs = []
        for index, block in enumerate(model.blocks):
            h = block(h)
            if index >= n_blocks - n_last_blocks:
                normed = model.norm(h)
                outs.append((normed.mean(dim=1), normed))
        return outs
    if n_last_blocks != 1:
        raise ValueError("a 3D ResNet gives one feature level: n_last_blocks must be 1")
    h = model.act(model.bn1(model.conv1(x)))
    if not model.no_max_pool:
        h = model.maxpool(h)
    h = model.layer4(model.layer3(model.layer2(model.layer1(h))))
    return [(h.mean(dim=(2, 3, 4)), h.flatten(2).transpose(1, 2))]


def zero_init_residual_3d_(model: nn.Module) -> int:
    """Zero the last BatchNorm scale of each MONAI residual block (SimCLR's init_zero)."""
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    count = 0
    for module in model.modules():
        if isinstance(module, ResNetBottleneck):
            nn.init.zeros_(module.bn3.weight)
            count += 1
        elif isinstance(module, ResNetBlock):
            nn.init.zeros_(module.bn2.weight)
            count += 1
    return count


def export_volume_backbone(
    model: nn.Module,
    out_dir: str | Path,
    info: dict[str, Any],
    *,
    license: str | None = None,
    card: str | None = None,
) -> Path:
    """Write config.json (MONAI class + model_args + `medssl` info), model.safetensors (MONAI's
    own keys) and README.md; config.json last, so its presence means the export is complete."""
    spec = model.monai_spec
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    twin = _monai_class(spec["class"])(**spec["model_args"])
    twin.load_state_dict(state, strict=True)  # what a MONAI user will do, checked at export
    c = model.medssl_config
    chans = c["in_chans"]
    doc = {
        "architecture": f"{MONAI_MODULE}.{spec['class']}",
        "library": "monai",
        "model_args": spec["model_args"],
        "num_features": int(model.num_features),
        "pretrained_cfg": {
            "input_size": [chans, c["img_size"], c["img_size"], c["img_size"]],
            "mean": info["mean"] if info.get("mean") is not None else [0.0] * chans,
            "std": info["std"] if info.get("std") is not None else [1.0] * chans,
            "interpolation": "trilinear",
            "pooling": "mean of the final-normed tokens" if spec["class"] == "ViT" else "global",
        },
        "medssl": info,
    }
    if license:
        doc["pretrained_cfg"]["license"] = license
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        path = Path(tmp) / "model.safetensors"
        safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
        os.replace(path, out / "model.safetensors")
    if card is not None:
        atomic_write(out / "README.md", card)
    atomic_write(out / "config.json", json.dumps(doc, indent=2) + "\n")
    return out


def load_volume_export(doc: Mapping[str, Any], weights: Path) -> nn.Module:
    """The MONAI network of an export, from config.json's class and model_args (strict load)."""
    name = str(doc["architecture"]).rsplit(".", 1)[-1]
    state = safetensors.torch.load_file(str(weights))
    model = build_monai(name, doc["model_args"])
    model.load_state_dict(state, strict=True)
    return model
