"""Step a: embed a dataset into float16 memory-mapped `.npy` + 32x32 thumbnails + records.

One independent job per group of shards (`embed_group`), so a SLURM array can run them in
parallel (`python -m curation run ... embed.groups=N --step embed --group $SLURM_ARRAY_TASK_ID`);
`merge` then concatenates the groups into one memory-mapped array. Group G of N is a pure function
of the sorted shard list (contiguous chunks), so a requeued task redoes exactly its own group.
Every group and the merged result record the fingerprint of what they hold (settings + the paths
and sha256 of its shards): a re-run with other settings or data re-embeds instead of reusing stale
vectors, without deleting what a concurrent task of the same array is writing. A group is written
to a temporary directory and renamed when complete, so a killed job leaves nothing half-written
and a re-run embeds only the groups that are missing.

Encoders: `descriptor` (training-free, `curation.descriptor.global_descriptor`), a medssl export or
checkpoint, a timm model folder (`local-dir:PATH`) or `timm:<name>` with a weights file
(`pretrain.init_from.open_backbone`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from curation.descriptor import THUMB, global_descriptor, thumbnail
from curation.steps import ContentHashes, fingerprint
from pretrain.data.datasets import ShardDataset, open_dataset, to_tensor_image
from pretrain.data.readers import UnreadableImageError
from pretrain.data.shards import pixel_sha256
from pretrain.data.specs import DatasetSpec, parse_spec
from pretrain.data.volumes import orthogonal_mid_slices
from pretrain.privacy import pseudonymised_path

logger = logging.getLogger(__name__)

DONE = "DONE.json"
RECORD_FIELDS = (
    "key",
    "sha256",
    "patient",
    "slide",  # tiles: the slide's pseudonym (sample.per_slide_max, near-duplicate groups across slides)
    "key_fingerprint",
    "modality",
    "height",
    "width",
    "label",
    "source",
)


class EmbedError(RuntimeError):
    """An embedding job that cannot run (bad backbone, unreadable dataset)."""


class Encoder:
    """Turns a batch of float C x H x W images in [0, 1] into unit vectors."""

    name = "descriptor"
    dim = 214
    volumes = False  # True: prepare() takes whole C×D×H×W volumes (a 3D backbone)

    def prepare(self, img: torch.Tensor) -> torch.Tensor | None:
        """Per-image model input, built in DataLoader workers (None: the thumbnail suffices)."""
        return None

    def encode(self, inputs: torch.Tensor | None, thumbs: np.ndarray) -> np.ndarray:
        return global_descriptor(thumbs)


class BackboneEncoder(Encoder):
    def __init__(
        self,
        backbone: str,
        weights: str | None,
        img_size: int | None,
        channels: Any,
        device: str,
        stain: tuple[str, str | None] | None = None,
    ):
        from pretrain.backbones import is_volume_backbone
        from pretrain.init_from import open_backbone
        from pretrain.transforms import default_mean_std, eval_transform, stain_transform

        try:
            self.model, meta = open_backbone(backbone, weights)
        except (FileNotFoundError, ValueError) as exc:
            raise EmbedError(f"embed.backbone={backbone}: {exc}") from exc
        self.device = torch.device(
            "cuda"
            if device == "auto" and torch.cuda.is_available()
            else "cpu"
            if device == "auto"
            else device
        )
        self.model = self.model.to(self.device).eval()
        size = int(img_size or meta.get("img_size") or 224)
        chans = channels or meta.get("channels") or meta.get("in_chans") or 3
        mean, std = meta.get("mean"), meta.get("std")
        if mean is None or std is None:
            mean, std = default_mean_std(chans)
        self.volumes = is_volume_backbone(self.model)
        if self.volumes:  # a 3D backbone embeds the volume itself
            from pretrain.transforms3d import volume_eval_transform

            self.transform = volume_eval_transform(size, mean, std)
        else:  # volumes reach a 2D backbone as their orthogonal mid-slices
            self.transform = eval_transform(size, chans, mean, std)
        if stain is not None and stain[0]:  # H&E tiles: one staining before the backbone
            try:
                normalise = stain_transform(*stain)
            except (OSError, ValueError) as exc:
                raise EmbedError(f"embed.stain_norm: {exc}") from exc
            from torchvision.transforms import v2

            self.transform = v2.Compose([normalise, self.transform])
        self.name = f"backbone:{backbone}"
        with torch.no_grad():
            shape = (1, size, size, size) if self.volumes else (1, size, size)
            probe = self.transform(torch.rand(*shape))[None].to(self.device)
            self.dim = int(self._features(probe).shape[1])

    def prepare(self, img: torch.Tensor) -> torch.Tensor:
        return self.transform(img)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        from pretrain.backbones import vit_intermediate_features

        try:
            return vit_intermediate_features(self.model, x, 1)[0][0]
        except (TypeError, ValueError):  # other timm models: pooled pre-logits features
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True)

    @torch.no_grad()
    def encode(self, inputs: torch.Tensor | None, thumbs: np.ndarray) -> np.ndarray:
        assert inputs is not None
        feats = self._features(inputs.to(self.device)).float()
        return torch.nn.functional.normalize(feats, dim=1).cpu().numpy()


def make_encoder(cfg: Any) -> Encoder:
    backbone = str(cfg.backbone)
    if backbone == "descriptor":
        return Encoder()
    stain_cfg = cfg.get("stain_norm")  # absent from hand-made embed settings
    stain = (stain_cfg.method, stain_cfg.reference) if stain_cfg is not None else None
    return BackboneEncoder(
        backbone, cfg.weights, cfg.img_size, cfg.channels, str(cfg.device), stain=stain
    )


class _Items(Dataset):
    """(model input or 0, thumbnail, record) per item; decoding happens in DataLoader workers."""

    def __init__(self, base: Dataset, encoder: Encoder, window: Any):
        self.base, self.encoder, self.window = base, encoder, window

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Any, np.ndarray | None, dict]:
        try:
            pixels, record = self.base.load(i)
            img = to_tensor_image(pixels, record, self.window)
            volume = None
            if img.ndim == 4:  # a volume: its orthogonal mid-slices stand for it in 2D steps
                volume = img
                img = torch.from_numpy(orthogonal_mid_slices(img[0].numpy()))[None]
        except (UnreadableImageError, ValueError, OSError) as exc:
            return 0, None, {"key": self.base.keys[i], "error": str(exc)}
        rec = {k: record.get(k) for k in RECORD_FIELDS}
        if isinstance(self.base, ShardDataset):  # where the curated-set writer finds the sample
            shard_index, members = self.base.items[i]
            rec["shard"] = str(self.base.shards[shard_index])
            rec["members"] = members
        rec["key"] = self.base.keys[i]
        rec["sha256"] = rec["sha256"] or pixel_sha256(pixels)
        rec["patient"] = self.base.patients[i]
        rec["label"] = int(self.base.labels[i])
        rec["height"], rec["width"] = int(pixels.shape[-2]), int(pixels.shape[-1])
        inp = self.encoder.prepare(volume if volume is not None and self.encoder.volumes else img)
        return (0 if inp is None else inp), thumbnail(img), rec


def _collate(batch: list) -> tuple[torch.Tensor | None, np.ndarray, list[dict], list[dict]]:
    """Stack the good items; unreadable ones come back separately (logged, listed in DONE.json)."""
    good = [b for b in batch if b[1] is not None]
    bad = [b[2] for b in batch if b[1] is None]
    inputs = None if not good or isinstance(good[0][0], int) else torch.stack([b[0] for b in good])
    thumbs = np.stack([b[1] for b in good]) if good else np.zeros((0, THUMB, THUMB, 3), np.uint8)
    return inputs, thumbs, [b[2] for b in good], bad


def dataset_groups(spec: str, shards_per_job: int, groups: int | None = None) -> list[DatasetSpec]:
    """The embed jobs of `spec`: `groups` contiguous chunks of its sorted shards (some empty when
    there are fewer shards than groups), or chunks of `shards_per_job` shards when `groups` is
    None. Any other spec (npz, image folder) is one job; with `groups` the others are empty."""
    parsed = parse_spec(spec)
    if groups is not None and int(groups) < 1:
        raise EmbedError(f"embed.groups must be >= 1, got {groups}")
    if parsed.kind != "shards":
        if groups is None:
            return [parsed]
        return [parsed] + [
            DatasetSpec("shards", parsed.path, f"{spec}#{g}", shards=())
            for g in range(1, int(groups))
        ]
    shards = list(parsed.shards)
    if groups is None:
        size = max(1, int(shards_per_job))
        bounds = list(range(0, len(shards), size)) + [len(shards)]
    else:
        bounds = [len(shards) * g // int(groups) for g in range(int(groups) + 1)]
    return [
        DatasetSpec(
            "shards", shards[min(a, len(shards) - 1)], f"{spec}#{g}", shards=tuple(shards[a:b])
        )
        for g, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


def _done(out: Path) -> dict | None:
    try:
        return json.loads((out / DONE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def group_dir(out: Path, index: int) -> Path:
    return out / "groups" / f"group-{index:06d}"


def embed_group(
    group: DatasetSpec,
    out: Path,
    encoder: Encoder,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    window: Any = None,
    progress: bool = True,
    fingerprint: str | None = None,
) -> Path:
    """Embed one group into `out` (skipped when complete with the same fingerprint); returns `out`."""
    done = _done(out)
    if done is not None and done.get("fingerprint") == fingerprint:
        return out
    if done is not None:
        logger.warning("%s holds embeddings of other data or settings: embedding again", out)
    base = ShardDataset(group) if group.kind == "shards" else open_dataset(group)
    n = len(base)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    emb = open_memmap(tmp / "embeddings.npy", mode="w+", dtype=np.float16, shape=(n, encoder.dim))
    thumbs = open_memmap(tmp / "thumbs.npy", mode="w+", dtype=np.uint8, shape=(n, THUMB, THUMB, 3))
    loader = DataLoader(
        _Items(base, encoder, window),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    pos, skipped = 0, []
    shown = pseudonymised_path(group.spec)  # a folder name can name a patient
    with open(tmp / "records.jsonl", "w") as f:
        for inputs, th, recs, bad in tqdm(
            loader, desc=f"embed {shown}", unit="batch", disable=not progress
        ):
            for b in bad:
                logger.warning("%s: skipping unreadable sample %r: %s", shown, b["key"], b["error"])
            skipped += bad
            m = len(recs)
            if m:
                emb[pos : pos + m] = encoder.encode(inputs, th).astype(np.float16)
                thumbs[pos : pos + m] = th
                f.writelines(json.dumps(r) + "\n" for r in recs)
            pos += m
    emb.flush()
    thumbs.flush()
    if pos < n:  # drop the rows of skipped samples
        for name, arr in (("embeddings.npy", emb), ("thumbs.npy", thumbs)):
            np.save(tmp / f"{name}.part", np.asarray(arr[:pos]))
            (tmp / f"{name}.part.npy").replace(tmp / name)
    del emb, thumbs
    done = {
        "n": pos,
        "encoder": encoder.name,
        "dim": encoder.dim,
        "spec": shown,
        "shards": [str(p) for p in group.shards],
        "skipped": skipped,
        "fingerprint": fingerprint,
    }
    (tmp / DONE).write_text(json.dumps(done))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@dataclass
class Embedded:
    """A merged, memory-mapped embedding of one dataset."""

    embeddings: np.ndarray  # (N, D) float16 memmap, unit rows
    thumbs: np.ndarray  # (N, 32, 32, 3) uint8 memmap
    records: list[dict]

    def __len__(self) -> int:
        return len(self.records)

    def column(self, name: str) -> np.ndarray:
        return np.array([r.get(name) for r in self.records], dtype=object)


def short_side(embedded: Embedded | list[dict]) -> np.ndarray:
    """Short side in pixels of every source image (copies are compared at the lower one)."""
    records = embedded.records if isinstance(embedded, Embedded) else embedded
    return np.array(
        [min(r.get("height") or THUMB, r.get("width") or THUMB) for r in records], dtype=np.int64
    )


def merge(out: Path, group_fps: list[str | None]) -> Embedded:
    """Concatenate complete groups into out/{embeddings,thumbs}.npy + records.jsonl (once per set
    of group fingerprints); refuses, naming them, when groups are missing or hold other settings."""
    n_groups, fingerprint = len(group_fps), fingerprint_of(group_fps)
    merged = _done(out)
    if (
        merged is None
        or merged.get("fingerprint") != fingerprint
        or merged.get("groups") != n_groups
    ):
        dirs = [group_dir(out, i) for i in range(n_groups)]
        metas = [_done(d) for d in dirs]
        missing = [
            i
            for i, (m, fp) in enumerate(zip(metas, group_fps))
            if m is None or m.get("fingerprint") != fp
        ]
        if missing:
            listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise EmbedError(
                f"{out}: {len(missing)} of {n_groups} embed group(s) missing or embedded with other "
                f"settings (group {listed}; first: {dirs[missing[0]]}). Run `python -m curation run "
                "... --step embed --group G` for each (the same config and embed.groups), then again"
            )
        n, dim = sum(m["n"] for m in metas), metas[0]["dim"]
        (out / DONE).unlink(missing_ok=True)
        emb = open_memmap(out / "embeddings.npy.tmp", mode="w+", dtype=np.float16, shape=(n, dim))
        thumbs = open_memmap(
            out / "thumbs.npy.tmp", mode="w+", dtype=np.uint8, shape=(n, THUMB, THUMB, 3)
        )
        pos = 0
        with open(out / "records.jsonl.tmp", "w") as f:
            for d, meta in zip(dirs, metas):
                m = meta["n"]
                if m:
                    emb[pos : pos + m] = np.load(d / "embeddings.npy", mmap_mode="r")
                    thumbs[pos : pos + m] = np.load(d / "thumbs.npy", mmap_mode="r")
                f.write((d / "records.jsonl").read_text())
                pos += m
        emb.flush()
        thumbs.flush()
        del emb, thumbs
        for name in ("embeddings.npy", "thumbs.npy", "records.jsonl"):
            (out / f"{name}.tmp").replace(out / name)
        (out / DONE).write_text(
            json.dumps(
                {
                    "n": n,
                    "dim": dim,
                    "encoder": metas[0]["encoder"],
                    "groups": n_groups,
                    "fingerprint": fingerprint,
                }
            )
        )
    return load_embedded(out)


def load_embedded(out: Path) -> Embedded:
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return Embedded(
        np.load(out / "embeddings.npy", mmap_mode="r"),
        np.load(out / "thumbs.npy", mmap_mode="r"),
        records,
    )


def embed_dataset(
    spec: str,
    out: Path,
    encoder: Encoder | None,
    cfg: Any,
    *,
    progress: bool = True,
    n_groups: int | None = None,
    only_group: int | None = None,
    merge_only: bool = False,
    settings: Any = None,
    hashes: ContentHashes | None = None,
) -> Embedded | None:
    """Embed every group of `spec` (or just `only_group`) and merge; None when only one group ran.

    `merge_only`: embed nothing, merge the groups that array tasks wrote (refusing when some are
    missing). `settings`: what else decides the vectors (encoder settings), for the fingerprints;
    `hashes`: the run's file hashes, so a group is keyed on its shards' content."""
    groups = dataset_groups(spec, cfg.shards_per_job, n_groups)
    fps = [fingerprint_of(settings, g, hashes=hashes) for g in groups]
    if hashes is not None:
        hashes.save()
    if only_group is not None and not 0 <= only_group < len(groups):
        raise EmbedError(f"--group {only_group} outside 0..{len(groups) - 1} for {spec}")
    todo = [] if merge_only else range(len(groups)) if only_group is None else [only_group]

    def embed(i: int) -> None:
        embed_group(
            groups[i],
            group_dir(out, i),
            encoder,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            window=cfg.window,
            progress=progress,
            fingerprint=fps[i],
        )

    if only_group is not None:  # one task of an embed array: its own group folder
        embed(only_group)
        return None
    # The array tasks of later steps (near, decontam) all embed the small sets and merge at once:
    # one at a time, the others then find the work done.
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for i in todo:
            embed(i)
        return merge(out, fps)


def fingerprint_of(*parts: Any, hashes: ContentHashes | None = None) -> str:
    """Short hash of settings and data: a DatasetSpec counts by its files' paths (its records
    name them) and sha256 (`hashes`), else by their paths, sizes and modification times."""

    def stat(path: Path) -> list:
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]

    def identity(x: Any) -> Any:
        if isinstance(x, DatasetSpec):
            files = x.shards if x.kind == "shards" else (x.path,)
            if hashes is not None:
                if x.kind == "folder":
                    return [x.kind, str(x.path), hashes.dataset(str(x.path))]
                return [x.kind, x.split, [[str(f), hashes.file(f)] for f in files]]
            return [x.kind, x.split, [stat(Path(f)) for f in files]]
        return x

    return fingerprint(*[identity(p) for p in parts])
