"""Training data stream: webdataset shards -> decoded, windowed, augmented batches, on any node count.

Two modes over shards (npz and folder specs fall back to a map-style dataset, see below):

- finite (`resampled=False`, epoch-based): every rank lists the shards in the same order, shuffled
  by (seed, epoch); rank r takes shards r, r+W, ... and DataLoader worker w of that rank takes every
  num_workers-th of those. Each sample is seen exactly once per epoch across all ranks and workers.
  With fewer shards than ranks (or than a rank's workers) the split falls back to striding samples
  (every split reads the shards but keeps only its own samples): still exactly once, more I/O.
  Ranks may get different numbers of samples (whole shards); for DDP use equal-sized shards,
  the map-style path, or resampled mode with a fixed number of steps per epoch.
- resampled (`resampled=True`, infinite): each rank and worker draws shards with replacement from
  its own seeded stream (webdataset's ResampledShards); no coordination between nodes is needed,
  the stream never ends, and the training loop decides how many steps make an "epoch".

After the split, samples pass a seeded shuffle buffer (raw bytes, cheap), are grouped into batches
*before* decoding, then decoded (`shards.decode_sample` + `windowing.to_float_image`), transformed
and collated inside the worker. A sample that fails to decode is logged and dropped (its batch is
one smaller); a corrupt or truncated tar is logged and the stream continues with the next one.

Determinism and resuming: for a given (spec, seed, epoch, rank, world_size, num_workers,
batch_size, shuffle_buffer) the batch sequence is fixed, and augmentations too when
num_workers > 0 (worker RNGs come from a generator seeded by seed/epoch/rank). To resume after
`n` batches of an epoch, rebuild with the same arguments and `skip_batches=n`: each worker drops its
first batches *before* decoding them. This is exact while every worker still has data (always in
resampled mode and on the map-style path; in finite mode, near the end of an unbalanced epoch a few
batches may repeat). The resumed batches hold the same samples, but their random augmentations
differ from the uninterrupted run (skipped batches never consumed worker RNG). `loader.state`
holds the arguments to save in a checkpoint; `count_samples(spec)` gives steps per epoch.

Map-style fallback (npz, folders): `datasets.open_dataset` plus the index order of torch's
DistributedSampler(seed, epoch) sliced by `skip_batches`: equal batch counts on every rank (the
sampler repeats up to world_size - 1 samples to get there), resuming is always exact.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from pretrain.data.datasets import Transform, open_dataset, record_label, to_tensor_image
from pretrain.data.readers import npz_header
from pretrain.data.shards import decode_sample
from pretrain.data.specs import DatasetSpec, parse_spec
from pretrain.data.windowing import Window
from pretrain.distributed import is_dist
from pretrain.privacy import pseudonymised_path

logger = logging.getLogger(__name__)

Collate = Callable[[list], Any]  # [(view, label[, key]), ...] -> batch


@dataclass(frozen=True)
class LoaderState:
    """What rebuilds the same stream: save it with a checkpoint, resume with `skip_batches`."""

    seed: int
    epoch: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    shuffle_buffer: int
    resampled: bool
    skip_batches: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; else torch.distributed when initialised; else RANK/WORLD_SIZE; else 0/1."""
    if rank is None or world_size is None:
        if is_dist():
            d_rank, d_world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            d_rank = int(os.environ.get("RANK", 0))
            d_world = int(os.environ.get("WORLD_SIZE", 1))
        rank = d_rank if rank is None else rank
        world_size = d_world if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    return rank, world_size


def mix_seed(*parts: int) -> int:
    """One 31-bit seed from several non-negative ints, stable across processes and runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1)


def _worker(rotation: int = 0) -> tuple[int, int]:
    """(logical worker id, num_workers). The DataLoader always asks physical worker 0 first, so
    a stream resumed after `skip_batches` batches lets physical worker w play logical worker
    (w + skip_batches) % num_workers: the worker that owes the next batch is asked first."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0, 1
    return (info.id + rotation) % info.num_workers, info.num_workers


def _worker_id(rotation: int = 0) -> int:
    return _worker(rotation)[0]


def split_plan(n_shards: int, rank: int, world_size: int, worker: int, num_workers: int):
    """(shard slice start, step, sample offset, sample stride) of one (rank, worker) split.

    Shards are split when there are enough of them at that level, samples otherwise; the two
    levels compose so every sample lands in exactly one of world_size × num_workers splits.
    """
    start, step, offset, stride = 0, 1, 0, 1
    if n_shards >= world_size:
        start, step = rank, world_size
    else:
        offset, stride = rank, world_size
    node_shards = len(range(start, n_shards, step))
    if node_shards >= num_workers:
        start, step = start + worker * step, step * num_workers
    else:
        offset, stride = offset + worker * stride, stride * num_workers
    return start, step, offset, stride


class _SplitShards:
    """Keep this (rank, worker)'s shards of the globally identical, seed-shuffled shard list."""

    def __init__(self, n_shards: int, rank: int, world_size: int, rotation: int):
        self.n_shards, self.rank, self.world_size = n_shards, rank, world_size
        self.rotation = rotation

    def __call__(self, src):
        urls = list(src)
        worker = _worker(self.rotation)
        start, step, _, _ = split_plan(self.n_shards, self.rank, self.world_size, *worker)
        yield from urls[start::step]


class _StrideSamples:
    """Sample-level split, only active when there are fewer shards than splits."""

    def __init__(self, n_shards: int, rank: int, world_size: int, rotation: int):
        self.n_shards, self.rank, self.world_size = n_shards, rank, world_size
        self.rotation = rotation

    def __call__(self, src):
        worker = _worker(self.rotation)
        _, _, offset, stride = split_plan(self.n_shards, self.rank, self.world_size, *worker)
        for index, sample in enumerate(src):
            if index % stride == offset:
                yield sample


class _Shuffle:
    def __init__(self, bufsize: int, seed: int, rotation: int):
        self.bufsize, self.seed, self.rotation = bufsize, seed, rotation

    def __call__(self, src):
        seed = mix_seed(self.seed, _worker_id(self.rotation))
        yield from wds.shuffle(self.bufsize, initial=self.bufsize, seed=seed)(src)


class _SkipBatches:
    """Drop this worker's share of the first `skip_batches` loader batches (round-robin order)."""

    def __init__(self, skip_batches: int):
        self.skip_batches = skip_batches

    def __call__(self, src):
        worker, num_workers = _worker(self.skip_batches)
        skip = max(0, (self.skip_batches - worker + num_workers - 1) // num_workers)
        for index, group in enumerate(src):
            if index >= skip:
                yield group


class _DecodeBatch:
    """Raw sample group -> collated (transformed images, labels[, keys])."""

    def __init__(self, transform, window: Window, with_keys: bool, collate_fn: Collate):
        self.transform, self.window, self.with_keys = transform, window, with_keys
        self.collate_fn = collate_fn

    def __call__(self, src):
        for group in src:
            items = []
            for sample in group:
                try:
                    pixels, record = decode_sample(sample)
                    img = to_tensor_image(pixels, record, self.window)
                    label = record_label(record, sample)
                except Exception as exc:  # one bad sample must not stop a long run
                    logger.warning(
                        "%s: sample %r skipped: %s",
                        sample.get("__url__"),
                        sample.get("__key__"),
                        exc,
                    )
                    continue
                out = self.transform(img) if self.transform is not None else img
                key = str(record.get("key", sample["__key__"]))
                items.append((out, label, key) if self.with_keys else (out, label))
            if items:
                yield self.collate_fn(items)


def _log_and_continue(exn: Exception) -> bool:
    logger.warning("skipping unreadable shard data: %r", exn)
    return True


def shard_pipeline(
    spec: DatasetSpec,
    transform: Transform | None,
    *,
    batch_size: int,
    seed: int,
    rank: int,
    world_size: int,
    resampled: bool,
    shuffle_buffer: int,
    window: Window,
    epoch: int,
    skip_batches: int,
    drop_last: bool,
    with_keys: bool,
    collate_fn: Collate = default_collate,
) -> wds.DataPipeline:
    """The per-worker webdataset pipeline yielding collated batches (see module docstring)."""
    urls = [str(p) for p in spec.shards]
    rotation = skip_batches
    if resampled:
        stages: list[Any] = [
            wds.ResampledShards(
                urls,
                seed=mix_seed(seed, epoch, rank),
                worker_seed=partial(_worker_id, rotation),
                deterministic=True,
            )
        ]
    else:
        stages = [
            wds.SimpleShardList(urls, seed=mix_seed(seed, epoch)),
            _SplitShards(len(urls), rank, world_size, rotation),
        ]
    stages.append(wds.tarfile_to_samples(handler=_log_and_continue))
    if not resampled:
        stages.append(_StrideSamples(len(urls), rank, world_size, rotation))
    if shuffle_buffer > 1:
        stages.append(_Shuffle(shuffle_buffer, mix_seed(seed, epoch, rank, 1), rotation))
    stages += [
        wds.batched(batch_size, collation_fn=None, partial=not drop_last),
        _SkipBatches(skip_batches),
        _DecodeBatch(transform, window, with_keys, collate_fn),
    ]
    return wds.DataPipeline(*stages)


def count_samples(spec: str | os.PathLike | DatasetSpec) -> int:
    """Samples in a spec, for steps-per-epoch and LR schedules (an IterableDataset has no len).

    Shards: tar headers are scanned (one JSON record per sample), pixels are not read. Folders
    are fully indexed (decoded once), as `open_dataset` does.
    """
    parsed = spec if isinstance(spec, DatasetSpec) else parse_spec(spec)
    if parsed.kind == "npz":
        return int(npz_header(parsed.path, f"{parsed.split}_images")[0][0])
    if parsed.kind == "folder":
        return len(open_dataset(parsed))
    total = 0
    for path in parsed.shards:
        try:
            with tarfile.open(path) as tf:
                total += sum(1 for m in tf if m.isfile() and m.name.endswith(".json"))
        except (tarfile.TarError, OSError) as exc:
            logger.warning("%s: cannot count samples (%s); counted as 0", path, exc)
    return total


class _WithKeys(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        img, label = self.dataset[index]
        return img, label, self.dataset.keys[index]


def build_train_loader(
    spec: str | os.PathLike | DatasetSpec,
    transform: Transform | None,
    *,
    batch_size: int,
    num_workers: int,
    seed: int,
    rank: int | None = None,
    world_size: int | None = None,
    resampled: bool = False,
    shuffle_buffer: int = 1000,
    window: Window = None,
    epoch: int = 0,
    skip_batches: int = 0,
    drop_last: bool = False,
    with_keys: bool = False,
    pin_memory: bool = False,
    collate_fn: Collate = default_collate,
) -> DataLoader:
    """A DataLoader of (transform(image) batch, labels[, keys]) for one rank and epoch.

    `collate_fn` turns a list of (view, label[, key]) into the batch, in the workers (a method's
    per-batch inputs such as iBOT masks: `SSLMethod.collate_fn`).

    Rebuild it every epoch with `epoch=e` (orders differ per epoch). `loader.state` is the
    LoaderState to checkpoint. `with_keys` adds the list of sample keys to each batch.
    """
    parsed = spec if isinstance(spec, DatasetSpec) else parse_spec(spec)
    rank, world_size = resolve_rank(rank, world_size)
    if batch_size < 1 or num_workers < 0 or skip_batches < 0:
        raise ValueError("batch_size must be >= 1, num_workers and skip_batches >= 0")
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, rank, 2))
    if parsed.kind == "shards":
        n_splits = world_size * max(1, num_workers)
        if len(parsed.shards) < n_splits and not resampled:
            logger.info(
                "%s: %d shard(s) for %d rank×worker splits; splitting by sample",
                pseudonymised_path(parsed.spec),
                len(parsed.shards),
                n_splits,
            )
        pipeline = shard_pipeline(
            parsed,
            transform,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            resampled=resampled,
            shuffle_buffer=shuffle_buffer,
            window=window,
            epoch=epoch,
            skip_batches=skip_batches,
            drop_last=drop_last,
            with_keys=with_keys,
            collate_fn=collate_fn,
        )
        loader = DataLoader(
            pipeline,
            batch_size=None,
            num_workers=num_workers,
            generator=generator,
            pin_memory=pin_memory,
        )
    else:
        if resampled:
            logger.info(
                "%s: map-style dataset; resampled mode means reshuffled epochs",
                pseudonymised_path(parsed.spec),
            )
        dataset = open_dataset(parsed, transform=transform, window=window)
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        sampler.set_epoch(epoch)
        indices = list(sampler)[skip_batches * batch_size :]
        loader = DataLoader(
            _WithKeys(dataset) if with_keys else dataset,
            batch_size=batch_size,
            sampler=indices,
            num_workers=num_workers,
            drop_last=drop_last,
            generator=generator,
            pin_memory=pin_memory,
            collate_fn=collate_fn,
        )
    loader.state = LoaderState(
        seed,
        epoch,
        rank,
        world_size,
        num_workers,
        batch_size,
        shuffle_buffer,
        resampled,
        skip_batches,
    )
    return loader
