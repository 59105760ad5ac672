"""Parameter-efficient adaptation of a frozen timm ViT: LoRA, AdaptFormer, Houlsby bottleneck
adapters, visual prompt tuning (VPT-shallow), and full fine-tuning, behind one `AdaptedModel`.

Why forward hooks instead of replacing modules: the backbone keeps exactly the module tree and
state-dict keys of the timm model its export folder describes (config.json), so the frozen weights stay
shareable as the plain-timm export, the adapter tensors live apart (`adapters.*`, `prompts`,
`head.*`) and can be saved alone, and LoRA merges back into the very keys it adapts.

- lora: low-rank updates of the q and v parts of timm's fused `attn.qkv` (Hu et al. 2021: q and v
  work best); B is zero-initialised, so the model starts as the backbone.
- adaptformer: a ReLU bottleneck in parallel to each block's MLP branch, fed the MLP branch's
  input and added with scale 0.1 (Chen et al. 2022; parallel beats sequential); zero-init up.
- bottleneck: Houlsby et al. 2019 adapters after the attention and after the MLP of every block
  (down, GELU, up, plus a skip connection), zero-init up-projection; layer norms trained too.
- prompt: VPT-shallow (Jia et al. 2022): learned tokens inserted after the class/register tokens
  once the position embedding is added (prompts have no position), dropped after the last block
  so the final norm and the pooling see the backbone's usual token layout.
- finetune: every backbone weight trains (layer-wise lr decay and drop path: eval/finetune_loop).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from torch import Tensor, nn

from eval.features import backbone_fingerprint

logger = logging.getLogger(__name__)

METHODS = ("finetune", "lora", "adaptformer", "bottleneck", "prompt")
HEAD_INPUTS = ("cls", "avgpool", "cls+avgpool")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"
ADAPTER_FORMAT = 1


class AdapterError(ValueError):
    """Adapters that cannot be attached or loaded (unknown method, mismatched backbone...)."""


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every weight: adapters only fit the exact backbone they were trained on."""
    return backbone_fingerprint(model, {})


class LoRAQKV(nn.Module):
    """Low-rank update of chosen parts (q, k, v) of a fused qkv projection.

    Hand-written rather than the `peft` library: `peft` is not installed here, and its LoRA wraps a
    whole nn.Linear, i.e. q, k and v of timm's fused qkv together. Restricting it to q and v would
    mean splitting the layer, which changes timm's key layout and the exact-merge path.
    """

    def __init__(self, qkv: nn.Linear, rank: int, alpha: float, dropout: float, targets: list[str]):
        super().__init__()
        if qkv.out_features % 3:
            raise AdapterError(f"qkv projection has {qkv.out_features} outputs, not 3 parts")
        unknown = sorted(set(targets) - {"q", "k", "v"})
        if unknown or not targets or rank < 1:
            raise AdapterError(f"lora needs rank >= 1 and targets among q, k, v; got {targets}")
        self.part, self.scaling, self.targets = qkv.out_features // 3, alpha / rank, list(targets)
        self.drop = nn.Dropout(dropout)
        self.lora_a = nn.ParameterDict(
            {t: nn.Parameter(torch.empty(rank, qkv.in_features)) for t in self.targets}
        )
        self.lora_b = nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(self.part, rank)) for t in self.targets}
        )
        for a in self.lora_a.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # the LoRA reference init

    def hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = self.drop(inputs[0])
        parts = []
        for name in "qkv":
            if name in self.lora_a:
                a, b = self.lora_a[name], self.lora_b[name]
                parts.append((x @ a.t().to(x.dtype)) @ b.t().to(x.dtype) * self.scaling)
            else:
                parts.append(output.new_zeros((*output.shape[:-1], self.part)))
        return output + torch.cat(parts, dim=-1)

    def merged(self, weight: Tensor) -> Tensor:
        """qkv weight with this update folded in: W + scaling * B A on each adapted part."""
        out = weight.detach().clone()
        for i, name in enumerate("qkv"):
            if name in self.lora_a:
                delta = self.lora_b[name] @ self.lora_a[name] * self.scaling
                out[i * self.part : (i + 1) * self.part] += delta.to(out.dtype)
        return out


class Bottleneck(nn.Module):
    """down -> activation -> (dropout) -> up, times `scale`; up-projection zero-initialised."""

    def __init__(self, dim: int, width: int, act: type[nn.Module], scale: float, dropout: float):
        super().__init__()
        if width < 1:
            raise AdapterError(f"adapter width must be >= 1, got {width}")
        self.down, self.act, self.up = nn.Linear(dim, width), act(), nn.Linear(width, dim)
        self.drop, self.scale = nn.Dropout(dropout), scale
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self._mlp_input: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.drop(self.act(self.down(x)))) * self.scale

    # Houlsby: sequential, with skip, on a sub-layer's output
    def after(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return output + self(output)

    # AdaptFormer: remember the MLP branch's input (norm2's input), add in parallel to the branch
    def capture(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._mlp_input = inputs[0]

    def parallel(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        mlp_input, self._mlp_input = self._mlp_input, None
        return output + self(mlp_input)


class AdaptedModel(nn.Module):
    """backbone (frozen except what `method` trains) + adapters + a linear head.

    head_input: the final-normed class token (`cls`, VPT), the mean patch token (`avgpool`,
    MAE/RETFound fine-tuning), or both concatenated (`cls+avgpool`, DINOv2's linear-probe input).
    """

    def __init__(
        self,
        backbone: nn.Module,
        method: str,
        options: dict[str, Any],
        num_outputs: int,
        head_input: str = "cls",
    ):
        super().__init__()
        if method not in METHODS:
            raise AdapterError(f"unknown adaptation method {method!r}; choose from {METHODS}")
        if head_input not in HEAD_INPUTS:
            raise AdapterError(f"head_input must be one of {HEAD_INPUTS}, got {head_input!r}")
        blocks = getattr(backbone, "blocks", None)
        if not isinstance(blocks, nn.Sequential) or not hasattr(blocks[0], "attn"):
            raise AdapterError(f"{method} needs a timm ViT backbone, got {type(backbone).__name__}")
        if getattr(backbone, "grad_checkpointing", False):
            raise AdapterError("gradient checkpointing bypasses the adapter hooks; turn it off")
        self.method, self.options, self.head_input = method, dict(options), head_input
        self.backbone_fingerprint = weights_fingerprint(backbone)
        self.backbone_params = sum(p.numel() for p in backbone.parameters())
        self.backbone = backbone
        self.adapters = nn.ModuleList()
        self.prompts: nn.Parameter | None = None
        self._handles: list[Any] = []
        dim = int(backbone.num_features)
        for p in backbone.parameters():
            p.requires_grad_(method == "finetune")
        getattr(self, f"_attach_{method}")(backbone, dim)
        self.head = nn.Linear(dim * (2 if head_input == "cls+avgpool" else 1), num_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def _attach_finetune(self, backbone: nn.Module, dim: int) -> None:
        pass

    def _attach_lora(self, backbone: nn.Module, dim: int) -> None:
        o = self.options
        for block in backbone.blocks:
            lora = LoRAQKV(
                block.attn.qkv,
                int(o["rank"]),
                float(o["alpha"]),
                float(o.get("dropout", 0.0)),
                [str(t) for t in o.get("targets", ["q", "v"])],
            )
            self.adapters.append(lora)
            self._handles.append(block.attn.qkv.register_forward_hook(lora.hook))

    def _attach_adaptformer(self, backbone: nn.Module, dim: int) -> None:
        o = self.options
        for block in backbone.blocks:
            adapter = Bottleneck(
                dim, int(o["width"]), nn.ReLU, float(o["scale"]), float(o.get("dropout", 0.0))
            )
            self.adapters.append(adapter)
            self._handles.append(block.norm2.register_forward_pre_hook(adapter.capture))
            self._handles.append(block.register_forward_hook(adapter.parallel))

    def _attach_bottleneck(self, backbone: nn.Module, dim: int) -> None:
        o = self.options
        for block in backbone.blocks:
            for sublayer in (block.attn, block.mlp):
                adapter = Bottleneck(dim, int(o["width"]), nn.GELU, 1.0, 0.0)
                self.adapters.append(adapter)
                self._handles.append(sublayer.register_forward_hook(adapter.after))
        if o.get("train_norms", True):  # Houlsby et al. train the layer norms as well
            for name, p in backbone.named_parameters():
                parts = name.split(".")
                if len(parts) >= 2 and "norm" in parts[-2]:
                    p.requires_grad_(True)

    def _attach_prompt(self, backbone: nn.Module, dim: int) -> None:
        tokens = int(self.options["tokens"])
        if tokens < 1:
            raise AdapterError(f"prompt.tokens must be >= 1, got {tokens}")
        patch = backbone.patch_embed.patch_size
        fan_in = backbone.patch_embed.proj.in_channels * patch[0] * patch[1]
        bound = math.sqrt(6.0 / (fan_in + dim))  # VPT's xavier-uniform prompt init
        self.prompts = nn.Parameter(torch.empty(tokens, dim).uniform_(-bound, bound))
        prefix = int(backbone.num_prefix_tokens)  # class + register tokens stay in front

        def insert(module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            x = inputs[0]
            prompts = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
            return (torch.cat([x[:, :prefix], prompts, x[:, prefix:]], dim=1), *inputs[1:])

        def remove(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return torch.cat([output[:, :prefix], output[:, prefix + tokens :]], dim=1)

        self._handles.append(backbone.blocks.register_forward_pre_hook(insert))
        self._handles.append(backbone.blocks.register_forward_hook(remove))

    # -- use ----------------------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """The head's input: final-normed class token and/or mean patch token."""
        tokens = self.backbone.forward_features(x)
        cls, patches = tokens[:, 0], tokens[:, self.backbone.num_prefix_tokens :].mean(dim=1)
        parts = {"cls": [cls], "avgpool": [patches], "cls+avgpool": [cls, patches]}
        return torch.cat(parts[self.head_input], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def trainable_state(self) -> dict[str, Tensor]:
        """Exactly the trained tensors (adapters, prompts, head, and any unfrozen backbone ones)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def count(self) -> dict[str, Any]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        head = sum(p.numel() for p in self.head.parameters())
        return {
            "trainable_params": int(trainable),
            "head_params": int(head),
            "backbone_params": int(self.backbone_params),
            "trainable_share": trainable / self.backbone_params,
        }

    def detach_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def merged_backbone(model: AdaptedModel) -> nn.Module:
    """A plain timm backbone (no hooks) computing what `model.backbone` computes with LoRA active;
    export it with pretrain.backbones.export_backbone. Full fine-tuning: the tuned backbone."""
    if model.method not in ("lora", "finetune"):
        raise AdapterError(f"{model.method} adapters are not linear in the weights: no merge")
    state = {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}
    if model.method == "lora":
        for i, lora in enumerate(model.adapters):
            key = f"blocks.{i}.attn.qkv.weight"
            state[key] = lora.merged(state[key])
    kwargs = getattr(model.backbone, "timm_kwargs", None)
    if kwargs is None:
        raise AdapterError("backbone has no timm_kwargs: load it with pretrain.backbones")
    merged = timm.create_model(**{**kwargs, "pretrained": False})
    merged.load_state_dict(state, strict=True)
    merged.timm_kwargs = copy.deepcopy(kwargs)
    merged.medssl_config = copy.deepcopy(getattr(model.backbone, "medssl_config", None))
    return merged.eval()


def save_adapter(model: AdaptedModel, out_dir: str | Path, extra: dict | None = None) -> Path:
    """adapter.safetensors (trained tensors only) + adapter.json (written last: the marker)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu().contiguous() for k, v in model.trainable_state().items()}
    tmp = out / (ADAPTER_WEIGHTS + ".tmp")
    safetensors.torch.save_file(state, str(tmp))
    tmp.replace(out / ADAPTER_WEIGHTS)
    doc = {
        "format": ADAPTER_FORMAT,
        "method": model.method,
        "options": model.options,
        "num_outputs": model.head.out_features,
        "head_input": model.head_input,
        "backbone_fingerprint": model.backbone_fingerprint,
        **model.count(),
        "tensors": sorted(state),
        **(extra or {}),
    }
    (out / ADAPTER_META).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return out


def load_adapter(adapter_dir: str | Path, backbone: nn.Module) -> AdaptedModel:
    """Attach saved adapters (and head) to `backbone`, which must be the backbone they were
    trained on (same weights fingerprint); the backbone module is modified in place."""
    path = Path(adapter_dir)
    meta_path, weights_path = path / ADAPTER_META, path / ADAPTER_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{path}: needs {ADAPTER_META} and {ADAPTER_WEIGHTS}")
    doc = json.loads(meta_path.read_text())
    found = weights_fingerprint(backbone)
    if found != doc["backbone_fingerprint"]:
        raise AdapterError(
            f"{path}: these {doc['method']} adapters were trained on backbone "
            f"{doc['backbone_fingerprint'][:16]}, but the given backbone is {found[:16]} "
            "(other weights or architecture): load the backbone they were trained on"
        )
    model = AdaptedModel(
        backbone, doc["method"], doc["options"], int(doc["num_outputs"]), doc["head_input"]
    )
    state = safetensors.torch.load_file(str(weights_path))
    expected = set(model.trainable_state())
    if set(state) != expected:
        raise AdapterError(
            f"{weights_path}: tensors {sorted(set(state) ^ expected)[:5]} do not match a "
            f"{doc['method']} model with options {doc['options']}"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected  # the set comparison above rules them out
    return model.eval()
