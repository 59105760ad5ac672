"""Streaming loader: determinism, disjoint rank/worker splits, resuming, windowing, bad data."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data.loader import build_train_loader, count_samples, split_plan
from pretrain.data.shards import ShardWriter, encode_sample, shard_name


def write_shards(out: Path, n_shards: int, per_shard: int, start: int = 0) -> list[str]:
    """Tiny 8×8 uint8 samples whose pixel value encodes the sample number (keys sXXXX)."""
    out.mkdir(parents=True, exist_ok=True)
    keys, k = [], start
    for s in range(n_shards):
        writer = ShardWriter(out, s)
        for _ in range(per_shard):
            key = f"s{k:04d}"
            writer.write(
                encode_sample(key, np.full((8, 8), k % 256, np.uint8), {"key": key, "label": k % 3})
            )
            keys.append(key)
            k += 1
        writer.commit()
    return keys


def stream_keys(spec, **kw) -> list[str]:
    kw.setdefault("batch_size", 4)
    kw.setdefault("shuffle_buffer", 16)
    loader = build_train_loader(str(spec), None, seed=kw.pop("seed", 7), with_keys=True, **kw)
    return [key for batch in loader for key in batch[2]]


@pytest.fixture(scope="module")
def shards8(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("shards8")
    return out, write_shards(out, 8, 6)


def test_same_seed_epoch_same_order_other_epoch_other_order(shards8):
    spec, keys = shards8
    first = stream_keys(spec, num_workers=2, rank=0, world_size=1, epoch=3)
    again = stream_keys(spec, num_workers=2, rank=0, world_size=1, epoch=3)
    other_epoch = stream_keys(spec, num_workers=2, rank=0, world_size=1, epoch=4)
    assert first == again
    assert sorted(first) == sorted(keys) == sorted(other_epoch)
    assert first != other_epoch
    assert stream_keys(spec, num_workers=0, rank=0, world_size=1, epoch=3, seed=8) != stream_keys(
        spec, num_workers=0, rank=0, world_size=1, epoch=3
    )


@pytest.mark.parametrize("n_shards", [8, 3, 1])
def test_ranks_and_workers_cover_every_sample_exactly_once(tmp_path, n_shards):
    # 8 shards: split by shard; 3: rank 1 has one shard for two workers; 1: split by sample
    keys = write_shards(tmp_path, n_shards, 5)
    seen = Counter()
    for rank in range(2):
        seen.update(stream_keys(tmp_path, num_workers=2, rank=rank, world_size=2, epoch=1))
    assert seen == Counter(keys)


def test_split_plan_is_a_partition():
    for n_shards, world, workers in itertools.product(range(1, 7), range(1, 4), range(1, 4)):
        owners = Counter()
        for rank, worker in itertools.product(range(world), range(workers)):
            start, step, offset, stride = split_plan(n_shards, rank, world, worker, workers)
            for shard in range(start, n_shards, step):
                for sample in range(offset, 36, stride):  # 36: any common multiple of strides
                    owners[(shard, sample)] += 1
        assert set(owners.values()) == {1}
        assert len(owners) == n_shards * 36


def test_resampled_stream_does_not_end_and_differs_by_rank(shards8):
    spec, keys = shards8
    kw = dict(
        batch_size=4,
        num_workers=2,
        seed=1,
        world_size=2,
        resampled=True,
        with_keys=True,
        shuffle_buffer=16,
    )
    batches = {}
    for rank in range(2):
        loader = build_train_loader(str(spec), None, rank=rank, **kw)
        taken = list(itertools.islice(iter(loader), 40))  # 160 samples from 48: must repeat
        assert len(taken) == 40
        batches[rank] = [k for b in taken for k in b[2]]
        assert set(batches[rank]) <= set(keys)
        assert max(Counter(batches[rank]).values()) > 1
    assert batches[0] != batches[1]
    again = build_train_loader(str(spec), None, rank=0, **kw)
    assert [k for b in itertools.islice(iter(again), 40) for k in b[2]] == batches[0]


@pytest.mark.parametrize("resampled", [False, True])
def test_skip_batches_resumes_the_same_stream(shards8, resampled):
    spec, _ = shards8
    kw = dict(
        batch_size=4,
        num_workers=2,
        seed=5,
        rank=0,
        world_size=1,
        epoch=2,
        resampled=resampled,
        with_keys=True,
        shuffle_buffer=16,
    )
    full = [b[2] for b in itertools.islice(iter(build_train_loader(str(spec), None, **kw)), 12)]
    resumed = build_train_loader(str(spec), None, skip_batches=5, **kw)
    assert resumed.state.skip_batches == 5 and resumed.state.epoch == 2
    assert [b[2] for b in itertools.islice(iter(resumed), 7)] == full[5:]


def test_ct_shard_decodes_with_configured_window(tmp_path):
    hu = np.array([[-1000, 100], [300, 40]], dtype=np.int16)
    stored = (hu + 1024).astype(np.int16)  # raw CT values, modality LUT restores HU
    record = {
        "key": "ct0",
        "modality": "CT",
        "label": None,
        "photometric": "MONOCHROME2",
        "pixel": {"slope": 1.0, "intercept": -1024.0, "window_center": 40.0, "window_width": 400.0},
    }
    writer = ShardWriter(tmp_path, 0)
    writer.write(encode_sample("ct0", stored, record))
    writer.commit()
    spec = str(tmp_path / shard_name(0))

    def first(window):
        loader = build_train_loader(
            spec, None, batch_size=1, num_workers=0, seed=0, rank=0, world_size=1, window=window
        )
        images, labels = next(iter(loader))
        assert images.dtype == torch.float32 and images.shape == (1, 1, 2, 2)
        assert labels.tolist() == [-1]
        return images[0, 0].numpy()

    # DICOM linear VOI: (HU - (c - 0.5)) / (w - 1) + 0.5, clipped to [0, 1]
    mediastinum = first((40, 400))
    np.testing.assert_allclose(
        mediastinum, [[0.0, (100 - 39.5) / 399 + 0.5], [1.0, (40 - 39.5) / 399 + 0.5]], atol=1e-6
    )
    np.testing.assert_allclose(first(None), mediastinum, atol=1e-6)  # the record's own window
    lung = first("lung")  # (-600, 1500)
    assert lung[0, 0] == pytest.approx((-1000 + 600.5) / 1499 + 0.5, abs=1e-6)


def test_corrupt_sample_and_truncated_shard_are_skipped_and_logged(tmp_path, caplog):
    keys = write_shards(tmp_path, 2, 4)
    writer = ShardWriter(tmp_path, 2)
    bad = encode_sample("bad0", np.zeros((8, 8), np.uint8), {"key": "bad0"})
    bad["png"] = b"\x89PNG\r\n\x1a\nnot really a png"
    writer.write(bad)
    writer.write(encode_sample("good9", np.zeros((8, 8), np.uint8), {"key": "good9"}))
    writer.commit()
    cut = tmp_path / shard_name(3)
    cut.write_bytes((tmp_path / shard_name(0)).read_bytes()[:1500])  # truncated copy
    with caplog.at_level(logging.WARNING):
        got = stream_keys(tmp_path, num_workers=0, rank=0, world_size=1)
    assert "bad0" not in got
    assert set(keys + ["good9"]) <= set(got)
    assert "bad0" in caplog.text


def test_npz_spec_uses_deterministic_map_style_split(medssl_data):
    spec = f"{medssl_data / 'breastmnist.npz'}:val"
    per_rank = [
        stream_keys(spec, num_workers=0, rank=r, world_size=2, batch_size=8) for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 39
    assert sorted(per_rank[0] + per_rank[1]) == [f"breastmnist-val-{i:06d}" for i in range(78)]
    assert stream_keys(spec, num_workers=0, rank=0, world_size=2, batch_size=8) == per_rank[0]
    assert (
        stream_keys(spec, num_workers=0, rank=0, world_size=2, batch_size=8, epoch=1) != per_rank[0]
    )
    resumed = stream_keys(spec, num_workers=0, rank=0, world_size=2, batch_size=8, skip_batches=2)
    assert resumed == per_rank[0][16:]


def test_rank_defaults_come_from_environment(shards8, monkeypatch):
    spec, keys = shards8
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = build_train_loader(str(spec), None, batch_size=4, num_workers=0, seed=7)
    assert (loader.state.rank, loader.state.world_size) == (1, 2)
    with pytest.raises(ValueError, match="rank 2 outside world_size 2"):
        build_train_loader(str(spec), None, batch_size=4, num_workers=0, seed=7, rank=2)


def test_count_samples(shards8, medssl_data):
    spec, keys = shards8
    assert count_samples(spec) == len(keys) == 48
    assert count_samples(f"{medssl_data / 'breastmnist.npz'}:val") == 78
