"""Continued pretraining: start a method's backbone(s) from existing weights (`init.from`).

Sources: this project's export (a timm model folder: config.json + model.safetensors) or training checkpoint (`ckpt-*.pt`), or a
foreign state dict file (.safetensors / .pth / .pt / .bin) in one of the key layouts of LAYOUTS.
Each layout is an explicit table (namespace, renames, keys known not to belong to a backbone), so a
key is either mapped, dropped for a stated reason, or reported as unknown -- never guessed. Then
the mapped weights are fitted to the target backbone: the position embedding resampled to the
target grid (timm's `resample_abs_pos_embed`) with its prefix rows (class/register tokens)
rearranged, the patch-embedding / stem channels adapted 1 <-> 3 (timm's `adapt_input_conv`: RGB
kernels summed for gray, a gray kernel repeated / 3 for RGB), LayerScale absent from the source
filled with 1 (the same function). Any other disagreement is an architecture mismatch and an error
naming the key and both shapes. Every backbone module of the method is loaded (DINOv2: student and
EMA teacher, so the teacher starts equal to the student); heads stay freshly initialised.
What happened is logged and written to output_dir/init_from.json.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from pretrain.backbones import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    BackboneError,
    find_export,
    strip_prefixes,
)

logger = logging.getLogger(__name__)

REPORT_FILENAME = "init_from.json"
# wrappers around a state dict in training checkpoints, tried in this order
CONTAINER_KEYS = ("state_dict", "model", "teacher", "module")
# backbone namespaces inside a whole-method state dict, preferred first (DINOv2: the teacher is
# what DINOv2 evaluates and releases)
NAMESPACES = ("teacher.backbone.", "student.backbone.", "backbone.", "encoder.")


@dataclass(frozen=True)
class Layout:
    """One key layout: regex renames (applied in order to every key), regexes of keys that are
    not part of a backbone (dropped with `drop_reason`), renames applied only when the target key
    is absent from the source (`fallbacks`), and which position rows pos_embed holds."""

    name: str
    description: str
    renames: tuple[tuple[str, str], ...] = ()
    fallbacks: tuple[tuple[str, str], ...] = ()
    drops: tuple[str, ...] = ()
    drop_reason: str = ""
    pos_prefix: str = "auto"  # "cls": pos_embed = [cls, patches]; "auto": found from its length


_TIMM_DROPS = (r"^head\.", r"^head_drop\.", r"^fc\.", r"^attn_pool\.")
LAYOUTS: dict[str, Layout] = {
    "timm": Layout(
        "timm",
        "timm VisionTransformer / ResNet names (this project's exports and checkpoints use them)",
        drops=_TIMM_DROPS,
        drop_reason="classifier / pooling head",
    ),
    "uni": Layout(
        "uni",
        "UNI / UNI2 (MahmoodLab): timm vit_large/vit_huge names, LayerScale `blocks.N.ls1.gamma`, "
        "UNI2 `reg_token` and pos_embed without prefix rows (no_embed_class)",
        drops=_TIMM_DROPS,
        drop_reason="classifier / pooling head",
    ),
    "dinov2": Layout(
        "dinov2",
        "facebookresearch/dinov2 DinoVisionTransformer: `register_tokens`, chunked "
        "`blocks.C.N.` (block_chunks), SwiGLU `mlp.w12`/`mlp.w3`, `mask_token`",
        renames=(
            (r"^blocks\.\d+\.(\d+)\.", r"blocks.\1."),  # BlockChunk: blocks.<chunk>.<global idx>.
            (r"^register_tokens$", "reg_token"),
            (
                r"\.mlp\.w12\.",
                ".mlp.fc1.",
            ),  # SwiGLUFFNFused packed (w1; w2) = timm SwiGLUPacked fc1
            (r"\.mlp\.w3\.", ".mlp.fc2."),
        ),
        drops=(r"^mask_token$", r"^head\.", r"^dino_head\.", r"^ibot_head\."),
        drop_reason="iBOT mask token / DINO-iBOT heads (not part of the backbone)",
        pos_prefix="cls",
    ),
    "mae": Layout(
        "mae",
        "facebookresearch/mae and RETFound: timm names in a `model` wrapper, decoder_* and "
        "mask_token (pretraining), `fc_norm` instead of `norm` (fine-tuned with global_pool)",
        fallbacks=((r"^fc_norm\.", "norm."),),
        drops=(r"^decoder_", r"^mask_token$", r"^head\.", r"^fc_norm\.", r"^head_drop\."),
        drop_reason="MAE decoder / mask token / classifier (not part of the encoder)",
        pos_prefix="cls",
    ),
}
LAYOUT_CHOICES = ("auto", *LAYOUTS)


@dataclass
class InitReport:
    """What the load did, key by key (written to output_dir/init_from.json)."""

    source: str
    kind: str  # medssl_export | medssl_checkpoint | state_dict
    layout: str
    layout_detected: bool
    container: list[str] = field(default_factory=list)
    namespace: str = ""
    other_namespaces: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    missing_kept_init: list[str] = field(default_factory=list)
    filled: dict[str, str] = field(default_factory=dict)
    adapted: dict[str, str] = field(default_factory=dict)
    loaded: int = 0
    targets: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---- reading the source ---------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())
    )


def _read_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path))
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise BackboneError(f"{path}: unreadable safetensors file ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/EOF errors vary
        raise BackboneError(
            f"{path}: cannot read as a weights_only torch file ({str(exc)[:300]})"
        ) from exc


def read_source(path: str | Path) -> tuple[dict[str, Tensor], str, list[str], Path]:
    """(flat state dict, kind, container keys unwrapped, resolved file) of an init source."""
    given = Path(path)
    if not given.exists():
        raise FileNotFoundError(f"init.from: {given} does not exist")
    target = given
    if given.is_dir() or given.name in (CONFIG_FILENAME, WEIGHTS_FILENAME):
        target = find_export(given)  # export dir/json, or run dir (newest export, else *.pt)
    if target.name == CONFIG_FILENAME:
        weights = target.with_name(WEIGHTS_FILENAME)
        if not weights.is_file():
            raise FileNotFoundError(f"init.from: {weights} missing beside {target}")
        return _read_file(weights), "medssl_export", [], weights
    obj = _read_file(target)
    if isinstance(obj, Mapping) and "backbone_state" in obj and "format" in obj:
        return dict(obj["backbone_state"]), "medssl_checkpoint", ["backbone_state"], target
    container: list[str] = []
    while not _is_state_dict(obj):
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj, Mapping) and k in obj), None)
        if inner is None:
            keys = sorted(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise BackboneError(
                f"{target}: no state dict found (tensors at the top level or under one of "
                f"{CONTAINER_KEYS}); top-level keys: {keys}"
            )
        container.append(inner)
        obj = obj[inner]
    return dict(obj), "state_dict", container, target


def detect_layout(keys: list[str]) -> str:
    """The layout whose distinctive keys are present (timm when none is)."""
    if any(re.match(r"^decoder_(embed|pred|blocks|norm)", k) for k in keys):
        return "mae"
    dinov2_marks = (r"^register_tokens$", r"^blocks\.\d+\.\d+\.", r"\.mlp\.w12\.", r"^mask_token$")
    if any(re.search(p, k) for p in dinov2_marks for k in keys):
        return "dinov2"
    return "timm"


def _select_namespace(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], str, list[str]]:
    """Keep the backbone of a whole-method state dict (teacher first); report the others."""
    for ns in NAMESPACES:
        if any(k.startswith(ns) for k in state):
            picked = {k[len(ns) :]: v for k, v in state.items() if k.startswith(ns)}
            others = sorted({k.split(".")[0] + "." for k in state if not k.startswith(ns)})
            return picked, ns, others
    return state, "", []


def map_keys(state: Mapping[str, Tensor], layout: Layout, report: InitReport) -> dict[str, Tensor]:
    """Apply a layout table (renames, fallbacks, drops) to backbone keys; records it in report."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        new = key
        for pattern, repl in layout.renames:
            new = re.sub(pattern, repl, new)
        if new != key:
            report.renamed[key] = new
        out[new] = value
    for pattern, repl in layout.fallbacks:
        for key in [k for k in out if re.search(pattern, k)]:
            new = re.sub(pattern, repl, key)
            if new not in out:
                out[new] = out.pop(key)
                report.renamed[key] = new
    for key in [k for k in out if any(re.search(p, k) for p in layout.drops)]:
        del out[key]
        report.dropped.append(key)
    return out


# ---- fitting to the target backbone ---------------------------------------------------------------


def _shape_error(key: str, got: tuple, want: tuple, source: str) -> BackboneError:
    return BackboneError(
        f"init.from {source}: architecture mismatch at '{key}': source {got}, model {want} "
        f"(check model.arch / patch_size / in_chans / reg_tokens / swiglu against the source)"
    )


def _fit_pos_embed(
    pos: Tensor, target: Tensor, src_reg: int, vit: nn.Module, layout: Layout, source: str
) -> tuple[Tensor, str]:
    """Rearrange prefix rows ([cls, reg...] as the target expects) and resample the grid."""
    dim = target.shape[-1]
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[-1] != dim:
        raise _shape_error("pos_embed", tuple(pos.shape), tuple(target.shape), source)
    length = pos.shape[1]
    candidates = [1] if layout.pos_prefix == "cls" else [1 + src_reg, 1, 0]
    src_prefix = next(
        (
            p
            for p in dict.fromkeys(candidates)
            if p < length and math.isqrt(length - p) ** 2 == length - p
        ),
        None,
    )
    if src_prefix is None:
        raise BackboneError(
            f"init.from {source}: pos_embed of {length} rows is not prefix rows + a square grid"
        )
    src_grid = math.isqrt(length - src_prefix)
    tgt_prefix = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    tgt_grid = math.isqrt(target.shape[1] - tgt_prefix)
    patches = pos[:, src_prefix:].float()
    notes = []
    if src_grid != tgt_grid:
        from timm.layers import resample_abs_pos_embed

        patches = resample_abs_pos_embed(
            patches, [tgt_grid, tgt_grid], [src_grid, src_grid], num_prefix_tokens=0
        )
        notes.append(f"grid {src_grid}x{src_grid} -> {tgt_grid}x{tgt_grid} (bicubic)")
    # A token without a position row in the source is the same as one whose row is zero.
    prefix = torch.zeros(1, tgt_prefix, dim)
    if tgt_prefix and src_prefix:
        prefix[:, :1] = pos[:, :1].float()  # class token
        if src_prefix == tgt_prefix:
            prefix = pos[:, :src_prefix].float()
    if src_prefix != tgt_prefix:
        notes.append(f"prefix rows {src_prefix} -> {tgt_prefix} (missing ones zero)")
    return torch.cat([prefix, patches], dim=1).to(target.dtype), ", ".join(notes)


def fit_to_backbone(
    mapped: dict[str, Tensor], backbone: nn.Module, report: InitReport
) -> dict[str, Tensor]:
    """A strict-loadable state dict for `backbone` from the mapped source weights."""
    target = backbone.state_dict()
    source = report.source
    depth = len(getattr(backbone, "blocks", []))
    deeper = sorted(
        {int(m.group(1)) for k in mapped if (m := re.match(r"^blocks\.(\d+)\.", k))}
        - set(range(depth))
    )
    if deeper:
        raise BackboneError(
            f"init.from {source}: architecture mismatch: the source has blocks up to "
            f"{deeper[-1]}, the model {depth} blocks (model.arch={backbone.medssl_config['arch']})"
        )
    if "reg_token" in mapped and "reg_token" not in target:
        raise BackboneError(
            f"init.from {source}: architecture mismatch: the source has "
            f"{mapped['reg_token'].shape[1]} register tokens, the model none (model.reg_tokens)"
        )
    layout = LAYOUTS[report.layout]
    out: dict[str, Tensor] = {}
    missing = []
    for key, want in target.items():
        if key not in mapped:
            if key == "reg_token":
                report.missing_kept_init.append(key)
                out[key] = want
            elif re.search(r"\.ls\d\.gamma$", key):  # no LayerScale in the source == scale 1
                out[key] = torch.ones_like(want)
                report.filled[key] = "ones (the source has no LayerScale)"
            elif key.endswith("num_batches_tracked"):
                out[key] = want
            else:
                missing.append(key)
            continue
        value = mapped[key]
        if key == "pos_embed" and (
            tuple(value.shape) != tuple(want.shape) or layout.pos_prefix == "cls"
        ):
            src_reg = int(mapped["reg_token"].shape[1]) if "reg_token" in mapped else 0
            value, note = _fit_pos_embed(value, want, src_reg, backbone, layout, source)
            if note:
                report.adapted[key] = note
        elif (
            key in ("patch_embed.proj.weight", "conv1.weight")
            and value.ndim == 4
            and value.shape[1] != want.shape[1]
            and (value.shape[0], *value.shape[2:]) == (want.shape[0], *want.shape[2:])
        ):
            from timm.models._manipulate import adapt_input_conv

            how = "RGB kernels summed" if want.shape[1] == 1 else "kernel repeated / channels"
            value = adapt_input_conv(int(want.shape[1]), value, base_chans=int(value.shape[1]))
            report.adapted[key] = f"in_chans {mapped[key].shape[1]} -> {want.shape[1]} ({how})"
        if tuple(value.shape) != tuple(want.shape):
            raise _shape_error(key, tuple(value.shape), tuple(want.shape), source)
        out[key] = value.to(want.dtype)
    if missing:
        raise BackboneError(
            f"init.from {source}: architecture mismatch: {len(missing)} model key(s) not in the "
            f"source (layout {report.layout}): {missing[:8]}"
        )
    report.unknown = sorted(set(mapped) - set(target))
    report.loaded = len(target) - len(report.missing_kept_init) - len(report.filled)
    return out


# ---- entry point ----------------------------------------------------------------------------------


def backbone_modules(method: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the method's backbones (`SSLMethod.backbone_modules`; any module built by
    build_backbone otherwise): DINOv2's student and teacher, MAE's encoder, SimCLR's backbone."""
    chosen = getattr(method, "backbone_modules", None)
    wanted = {id(m) for m in chosen()} if callable(chosen) else None
    return [
        (n, m)
        for n, m in method.named_modules()
        if (id(m) in wanted if wanted is not None else hasattr(m, "medssl_config"))
    ]


def _carry_mask_token(method: nn.Module, token: Tensor | None, report: InitReport) -> None:
    """DINOv2 keeps iBOT's learned mask token in the backbone; this project's DINOv2 keeps it
    beside the student backbone. Continued DINOv2 pretraining starts from the trained token."""
    if token is None:
        return
    for name, param in method.named_parameters():
        if name.endswith("mask_token.mask_token") and param.numel() == token.numel():
            with torch.no_grad():
                param.copy_(token.reshape(param.shape))
            report.adapted[name] = "iBOT mask token, from the source's mask_token"


def initialise_from(
    method: nn.Module,
    path: str | Path,
    *,
    layout: str = "auto",
    report_dir: str | Path | None = None,
) -> InitReport:
    """Load the backbone weights at `path` into every backbone module of `method` (in place)."""
    if layout not in LAYOUT_CHOICES:
        raise BackboneError(f"init.layout must be one of {LAYOUT_CHOICES}, got {layout!r}")
    targets = backbone_modules(method)
    if not targets:
        raise BackboneError(f"{type(method).__name__} holds no backbone built by build_backbone")
    state, kind, container, resolved = read_source(path)
    state, namespace, others = _select_namespace(strip_prefixes(state))
    chosen = layout
    if layout == "auto":
        chosen = "timm" if kind != "state_dict" else detect_layout(list(state))
    report = InitReport(str(resolved), kind, chosen, layout == "auto", container=container)
    report.namespace, report.other_namespaces = namespace, others
    mapped = map_keys(state, LAYOUTS[chosen], report)
    fitted = fit_to_backbone(mapped, targets[0][1], report)
    for name, module in targets:
        module.load_state_dict(fitted, strict=True)
        report.targets.append(name)
    if chosen == "dinov2":
        _carry_mask_token(method, state.get("mask_token"), report)
    logger.info(
        "init.from %s (%s, layout %s%s): %d tensors into %s",
        resolved,
        kind,
        chosen,
        " detected" if report.layout_detected else "",
        report.loaded,
        ", ".join(report.targets),
    )
    for key, note in report.adapted.items():
        logger.info("init.from: adapted %s: %s", key, note)
    for key, note in report.filled.items():
        logger.info("init.from: filled %s with %s", key, note)
    if report.dropped:
        logger.info(
            "init.from: dropped %d key(s) (%s): %s",
            len(report.dropped),
            LAYOUTS[chosen].drop_reason,
            report.dropped[:6],
        )
    if report.other_namespaces:
        logger.info("init.from: took '%s', ignored %s", report.namespace, report.other_namespaces)
    if report.missing_kept_init:
        logger.warning("init.from: not in the source, kept fresh: %s", report.missing_kept_init)
    if report.unknown:
        logger.warning(
            "init.from: %d unknown key(s) ignored: %s", len(report.unknown), report.unknown[:8]
        )
    if report_dir is not None:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / REPORT_FILENAME).write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


# ---- backbones from elsewhere, for evaluation and embedding ---------------------------------------

TIMM_PREFIX, LOCAL_DIR_PREFIX = "timm:", "local-dir:"
_TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def _parse_timm_source(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME?key=value&key=value` -> (NAME, kwargs), values read as YAML scalars."""
    import yaml

    name, _, query = text.partition("?")
    kwargs: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise BackboneError(f"timm:{text}: '{part}' is not key=value")
        kwargs[key] = yaml.safe_load(value)
    return name, kwargs


def _timm_backbone(
    name: str, kwargs: dict[str, Any], weights: Path, pretrained_cfg: dict | None = None
) -> tuple[nn.Module, dict]:
    """timm model `name` (no classifier) with the backbone weights of `weights`, loaded strictly
    after this module's layout mapping (timm, DINOv2, MAE/RETFound, UNI key tables)."""
    import timm

    if not weights.is_file():
        raise FileNotFoundError(f"backbone weights not found: {weights}")
    try:
        extra = {"pretrained_cfg_overlay": pretrained_cfg} if pretrained_cfg else {}
        model = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": 0}, **extra)
    except (RuntimeError, TypeError) as exc:
        raise BackboneError(f"timm:{name}: {exc}") from exc
    state, kind, _, resolved = read_source(weights)
    state, _, _ = _select_namespace(strip_prefixes(state))
    layout = LAYOUTS[detect_layout(list(state))]
    report = InitReport(str(resolved), kind, layout.name, True)
    mapped = map_keys(state, layout, report)
    mapped = {k: v for k, v in mapped.items() if not re.match(r"^(head|fc)\.", k)}
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise BackboneError(
            f"{weights} does not fit timm {name} ({layout.name} layout): {str(exc)[:600]}"
        ) from exc
    # what adaptation protocols rebuild it from (e.g. full fine-tuning with drop path)
    model.timm_kwargs = {
        "model_name": name,
        "pretrained": False,
        **kwargs,
        "num_classes": 0,
        **extra,
    }
    model.medssl_config = None
    data = timm.data.resolve_data_config({}, model=model)
    in_chans, _, size = data["input_size"]
    if kwargs.get("img_size") is not None:  # built for another size than its registered weights
        given = kwargs["img_size"]
        size = given[-1] if isinstance(given, (list, tuple)) else given
    in_chans = int(kwargs.get("in_chans") or in_chans)
    mean, std = (
        [float(v) for v in values]
        if len(values) == in_chans
        else [float(sum(values) / len(values))] * in_chans  # RGB statistics for a gray stem
        for values in (data["mean"], data["std"])
    )
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    info = {
        "arch": name,
        "img_size": int(size),
        "in_chans": int(in_chans),
        "channels": int(in_chans),
        "patch_size": int(patch[0]) if patch else None,
        "num_features": int(model.num_features),
        "mean": mean,
        "std": std,
        "window": None,
        "source": f"timm {name}, weights sha256 {_sha256(weights)[:16]}",
    }
    return model, info


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def open_backbone(
    source: str, weights: str | None = None, *, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict]:
    """Any backbone an evaluation may compare: this project's (see
    pretrain.backbones.load_backbone), `local-dir:PATH` (any timm / Hub model folder:
    config.json + model.safetensors), or `timm:NAME[?key=value&...]` with a `weights` file --
    e.g. a public DINOv2, UNI or RETFound checkpoint on disk. Nothing is downloaded."""
    from pretrain.backbones import is_export_dir, load_backbone

    source = str(source)
    if source.startswith(TIMM_PREFIX):
        if not weights:
            raise BackboneError(
                f"{source} needs a weights file (--weights / embed.weights): nothing is downloaded"
            )
        name, kwargs = _parse_timm_source(source[len(TIMM_PREFIX) :])
        model, info = _timm_backbone(name, kwargs, Path(weights))
    elif weights:
        raise BackboneError(f"a weights file is only used with timm:NAME, not {source}")
    elif source.startswith(LOCAL_DIR_PREFIX):
        folder = Path(source[len(LOCAL_DIR_PREFIX) :])
        if is_export_dir(folder):
            return load_backbone(folder, map_location=map_location)
        config = folder / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{source}: no config.json in {folder}")
        try:
            doc = json.loads(config.read_text())
            name, kwargs = doc["architecture"], dict(doc.get("model_args") or {})
        except (ValueError, KeyError) as exc:
            raise BackboneError(f"{config}: not a timm model config ({exc!r})") from exc
        found = next((folder / f for f in _TIMM_WEIGHT_FILES if (folder / f).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{source}: none of {_TIMM_WEIGHT_FILES} in {folder}")
        pretrained_cfg = {
            k: v
            for k, v in (doc.get("pretrained_cfg") or {}).items()
            if k in ("input_size", "mean", "std")
        }
        model, info = _timm_backbone(name, kwargs, found, pretrained_cfg)
    else:
        return load_backbone(source, map_location=map_location)
    return model.to(map_location).eval(), info
