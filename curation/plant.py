"""Planted-case evaluation: build a pool with known copies, then score what curation removed.

Used by the tests and by `bench/curation.py --quality`, so the numbers that justify the default
thresholds (configs/default.yaml) come from one reproducible command. Copies are made with the
transformations a curated web or hospital pool really contains: crops (kept at their size or
resized back), resizes, brightness/contrast changes, JPEG re-encoding, and all of them combined.
Recall counts planted pairs only; false removal counts only images that have no twin (no planted
copy and no pixel-identical image), because MedMNIST itself holds near-identical images.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pretrain.data.shards import ShardWriter, encode_sample, pixel_sha256

KINDS = ("crop", "crop_resize", "resize", "brightness", "jpeg", "combo")
MEDMNIST_MODALITY = {"pneumoniamnist": "CR", "breastmnist": "US", "retinamnist": "FUNDUS"}


def plant_copy(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A near copy of uint8 `img` (H x W or H x W x 3) made by `kind` (see KINDS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown copy kind {kind!r}; choose from {KINDS}")
    pil = Image.fromarray(img)
    w, h = pil.size
    if kind in ("crop", "crop_resize", "combo"):
        f = rng.uniform(0.8, 0.95)
        cw, ch = max(1, round(w * f)), max(1, round(h * f))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        pil = pil.crop((x0, y0, x0 + cw, y0 + ch))
        if kind != "crop":
            pil = pil.resize((w, h), Image.BICUBIC)
    if kind in ("resize", "combo"):
        s = float(rng.choice([0.5, 0.75, 1.5, 2.0, 3.0]))
        pil = pil.resize(
            (max(4, round(pil.size[0] * s)), max(4, round(pil.size[1] * s))), Image.BILINEAR
        )
    a = np.asarray(pil).astype(np.float32)
    if kind in ("brightness", "combo"):
        a = a * rng.uniform(0.7, 1.3) if rng.random() < 0.5 else a + rng.uniform(-40, 40)
    pil = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    if kind in ("jpeg", "combo"):
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=int(rng.integers(30, 90)))
        pil = Image.open(io.BytesIO(buf.getvalue()))
        pil.load()
    return np.asarray(pil)


def medmnist(
    data_root: Path, name: str, split: str, limit: int | None = None, seed: int = 0
) -> list[np.ndarray]:
    """Images of one MedMNIST split (a random subset of `limit` when given, in file order)."""
    with np.load(data_root / f"{name}.npz") as z:
        arr = z[f"{split}_images"]
    if limit is not None and limit < len(arr):
        arr = arr[np.sort(np.random.default_rng(seed).choice(len(arr), limit, replace=False))]
    return list(arr)


def record_for(
    key: str, pixels: np.ndarray, modality: str, patient: str | None = None, **extra: Any
) -> dict:
    """A manifest-like record as `curation ingest` writes it (enough for curation)."""
    return {
        "key": key,
        "source": key,
        "sha256": pixel_sha256(pixels),
        "modality": modality,
        "height": int(pixels.shape[0]),
        "width": int(pixels.shape[1]),
        "channels": 1 if pixels.ndim == 2 else int(pixels.shape[2]),
        "bits": 8,
        "photometric": "RGB" if pixels.ndim == 3 else "MONOCHROME2",
        "split": None,
        "label": None,
        "patient": patient,
        "pixel": {},
        **extra,
    }


def write_shards(
    out: Path, items: list[tuple[str, np.ndarray, dict]], shard_size: int = 1000
) -> Path:
    """(key, pixels, record) items -> out/shard-*.tar + out/manifest.jsonl."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for start in range(0, len(items), shard_size):
        writer = ShardWriter(out, start // shard_size)
        for key, pixels, record in items[start : start + shard_size]:
            writer.write(encode_sample(key, pixels, record))
            lines.append(json.dumps({**record, "shard": writer.path.name}) + "\n")
        writer.commit()
    (out / "manifest.jsonl").write_text("".join(lines))
    return out


def planted_pool(
    images: list[tuple[str, np.ndarray, str]],
    n_copies: int,
    seed: int = 0,
    kinds: tuple[str, ...] = KINDS,
) -> tuple[list[tuple[str, np.ndarray, dict]], list[tuple[str, str, str]]]:
    """Originals (key, pixels, modality) + `n_copies` planted copies -> (items, (orig, copy, kind) pairs)."""
    rng = np.random.default_rng(seed)
    items = [(k, px, record_for(k, px, mod)) for k, px, mod in images]
    pairs = []
    for j, i in enumerate(rng.choice(len(images), n_copies, replace=False)):
        key, px, mod = images[int(i)]
        kind = kinds[j % len(kinds)]
        copy = plant_copy(px, kind, rng)
        ckey = f"copy{j:05d}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        items.append((ckey, copy, record_for(ckey, copy, mod)))
        pairs.append((key, ckey, kind))
    order = rng.permutation(len(items))  # copies must not sit next to their originals
    return [items[i] for i in order], pairs


def score(
    items: list[tuple[str, np.ndarray, dict]], pairs: list[tuple[str, str, str]], removed: set[str]
) -> dict[str, Any]:
    """Recall of planted pairs (one of the two removed) and false removal among twin-free images."""
    found = [
        (a in removed) != (b in removed) or (a in removed and b in removed) for a, b, _ in pairs
    ]
    by_hash: dict[str, list[str]] = {}
    for key, _, rec in items:
        by_hash.setdefault(rec["sha256"], []).append(key)
    twins = {k for keys in by_hash.values() if len(keys) > 1 for k in keys}
    planted = {k for a, b, _ in pairs for k in (a, b)}
    unique = [k for k, _, _ in items if k not in planted and k not in twins]
    per_kind = {}
    for kind in sorted({k for _, _, k in pairs}):
        hits = [f for f, (_, _, k) in zip(found, pairs) if k == kind]
        per_kind[kind] = round(float(np.mean(hits)), 4)
    return {
        "recall": float(np.mean(found)) if found else 1.0,
        "recall_per_kind": per_kind,
        "false_removal": float(np.mean([k in removed for k in unique])) if unique else 0.0,
        "unique": len(unique),
        "pairs": len(pairs),
    }


def source_twins(items: list[tuple[str, np.ndarray, str]]) -> dict[str, tuple[bool, float]]:
    """Per (key, pixels, source) item: (has a pixel-identical twin, best NCC with another image of
    the same source and size, unaligned). Source datasets hold their own near-copies (BUSI
    consecutive frames, repeated fundus photographs): a copy detector removes them too, so
    false-removal figures must say how many removed "unique" images are such twins."""
    import torch

    out: dict[str, tuple[bool, float]] = {}
    groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
    for i, (_, px, source) in enumerate(items):
        groups.setdefault((source, px.shape), []).append(i)
    for members in groups.values():
        x = torch.from_numpy(
            np.stack([items[i][1] for i in members]).reshape(len(members), -1).astype(np.float32)
        )
        x = x - x.mean(1, keepdim=True)
        x = x / (x.norm(dim=1, keepdim=True) + 1e-6)
        hashes = [pixel_sha256(items[i][1]) for i in members]
        counts: dict[str, int] = {}
        for h in hashes:
            counts[h] = counts.get(h, 0) + 1
        best = torch.full((len(members),), -1.0)
        for s in range(0, len(members), 1024):
            sims = x[s : s + 1024] @ x.T
            sims[torch.arange(sims.shape[0]), torch.arange(s, s + sims.shape[0])] = -1.0
            best[s : s + 1024] = sims.max(1).values if len(members) > 1 else -1.0
        for j, i in enumerate(members):
            out[items[i][0]] = (counts[hashes[j]] > 1, round(float(best[j]), 4))
    return out
