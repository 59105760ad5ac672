"""The model card (README.md of an export): what made the backbone, on what data, and what for.

Hugging Face model-card format: YAML front matter (written by huggingface_hub's ModelCardData, so
the Hub reads it) and a body written from the run itself -- method and recipe, steps and images
seen, the pretraining data (manifest sha256, images per modality, curation counts), the evaluation
table when one ran, provenance, and the intended use. Nothing in it names a file or a patient.

>>> card = model_card({"method": "dinov2", "step": 3, "arch": "vit_tiny"}, license="cc-by-4.0")
>>> card.splitlines()[0], "license: cc-by-4.0" in card, "not for clinical use" in card
('---', True, True)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import ModelCardData

TAGS = ("medical-imaging", "self-supervised", "feature-extraction", "medssl")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def _data_section(data: Mapping[str, Any]) -> list[str]:
    lines = ["## Pretraining data", ""]
    for i, item in enumerate(data.get("inputs") or []):
        digest = item.get("manifest_sha256") or item.get("listing_sha256")
        what = "manifest sha256" if item.get("manifest_sha256") else "file listing sha256"
        split = f", split {item['split']}" if item.get("split") else ""
        lines.append(f"- input {i + 1}: {item.get('kind')}{split}, {what} `{digest}`")
    if data.get("images") is not None:
        lines.append(f"- images: {data['images']}")
    modalities = data.get("modalities") or {}
    if modalities:
        lines += ["", "| modality | images |", "|---|---|"]
        lines += [f"| {name} | {count} |" for name, count in sorted(modalities.items())]
    curation = data.get("curation") or {}
    if curation:
        lines += ["", "Curation (this system's `python -m curation run`):", ""]
        lines += [f"- {key}: {_fmt(value)}" for key, value in curation.items()]
    return lines + [""]


def _eval_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "## Evaluation (frozen backbone)",
        "",
        "| dataset | protocol | setting | accuracy | balanced accuracy | AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.get('dataset')} | {r.get('protocol')} | {r.get('setting')} | "
            f"{_fmt(r.get('accuracy'))} | {_fmt(r.get('balanced_accuracy'))} | "
            f"{_fmt(r.get('auroc'))} |"
        )
    return lines + [""]


def model_card(
    info: Mapping[str, Any],
    *,
    license: str = "other",
    tags: Sequence[str] = (),
    data: Mapping[str, Any] | None = None,
    evaluation: Sequence[Mapping[str, Any]] = (),
    recipe: str | None = None,
) -> str:
    """README.md text for an export whose config.json `medssl` entry is `info`.

    data: {"inputs": provenance inputs, "images": N, "modalities": {name: N}, "curation": {...}};
    evaluation: rows with dataset, protocol, setting, accuracy, balanced_accuracy, auroc."""
    arch = info.get("arch")
    volume = str(arch).startswith(("vit3d_", "resnet3d_"))  # backbones3d: MONAI networks
    front = ModelCardData(
        license=license,
        library_name="monai" if volume else "timm",
        pipeline_tag="image-feature-extraction",
        tags=[*TAGS, str(info.get("method") or "ssl"), *tags],
    ).to_yaml()
    method = info.get("method") or "unknown method"
    usage = (
        [
            "import json, safetensors.torch, monai.networks.nets as nets",
            'doc = json.load(open("PATH_TO_THIS_FOLDER/config.json"))',
            'model = getattr(nets, doc["architecture"].rsplit(".", 1)[1])(**doc["model_args"])',
            'weights = safetensors.torch.load_file("PATH_TO_THIS_FOLDER/model.safetensors")',
            "model.load_state_dict(weights, strict=True)",
            "# input: B x 1 x D x H x W in [0, 1], normalised by pretrained_cfg mean/std; a ViT",
            "# returns (tokens, hidden states): the features are tokens.mean(dim=1)",
        ]
        if volume
        else [
            "import timm",
            'model = timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True).eval()',
            "cfg = timm.data.resolve_data_config({}, model=model)",
            "transform = timm.data.create_transform(**cfg)",
        ]
    )
    size = info.get("img_size")
    lines = [
        "---",
        front,
        "---",
        "",
        f"# {arch} pretrained with {method} (medssl)",
        "",
        f"A {arch} backbone (no classifier head) pretrained by self-supervised learning with "
        f"{method} on the data below, exported by medssl. It gives image features for k-NN, "
        "linear probes, MIL or fine-tuning.",
        "",
        "```python",
        *usage,
        "```",
        "",
        "## Training",
        "",
        f"- method: {method}" + (f", recipe {recipe}" if recipe else ""),
        f"- architecture: {arch}, input {info.get('in_chans')} x "
        + (f"{size}^3 voxels" if volume else f"{size} px")
        + (f", patch {info['patch_size']}" if info.get("patch_size") else ""),
        f"- steps: {_fmt(info.get('step'))}, images seen: {_fmt(info.get('images_seen'))}",
        f"- weights: {info.get('source') or '-'}",
        f"- normalisation: mean {info.get('mean')}, std {info.get('std')}"
        + (f", window {info['window']}" if info.get("window") else ""),
        "",
    ]
    if data:
        lines += _data_section(data)
    if evaluation:
        lines += _eval_section(evaluation)
    prov = info.get("provenance") or {}
    code = prov.get("code") or {}
    if prov:
        lines += [
            "## Provenance",
            "",
            f"- code: {code.get('package')} {code.get('version')}, git commit "
            f"{code.get('git_commit') or 'unknown'}"
            + (" (uncommitted changes)" if code.get("git_dirty") else ""),
            f"- merged config sha256: `{prov.get('config_sha256')}`",
            f"- command: `{prov.get('command')}`",
            f"- site key fingerprint (pseudonyms): {prov.get('site_key_fingerprint')}",
            "",
        ]
    lines += [
        "## Intended use",
        "",
        "Research on medical image representations: feature extraction, probing and fine-tuning "
        "on labelled data the user has the right to use. Research use only; not for clinical "
        "use: not a medical device, not validated for diagnosis, triage or treatment decisions. "
        "Features inherit the biases of the pretraining data (sites, scanners, populations).",
        "",
    ]
    return "\n".join(lines)
