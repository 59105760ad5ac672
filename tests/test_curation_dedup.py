"""Copy detection on real MedMNIST images: planted copies are found, unique images are kept."""

from __future__ import annotations

import io

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from curation.decontaminate import contamination_pairs, decontaminate
from curation.dedup import (
    components,
    copy_pairs,
    exact_duplicates,
    keeper_rank,
    merge_pairs,
    part_rows,
)
from curation.descriptor import match_pairs, thumbnail
from curation.plant import medmnist
from curation.run import DEFAULT_CONFIG
from pretrain.data.shards import pixel_sha256

DEFAULTS = OmegaConf.load(DEFAULT_CONFIG)  # the tests check the shipped thresholds
DEDUP = DEFAULTS.dedup
INDEX = {"kind": "flat"}


def thumbs_of(images: list[np.ndarray]) -> np.ndarray:
    import torch

    out = []
    for px in images:
        t = torch.from_numpy(px.astype(np.float32) / 255)
        out.append(thumbnail(t[None] if t.ndim == 2 else t.permute(2, 0, 1)))
    return np.stack(out)


def jpeg(px: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())))


def copies_of(px: np.ndarray) -> dict[str, np.ndarray]:
    """The transformations the issue names, at moderate strength, on one 28x28 image."""
    pil = Image.fromarray(px)
    return {
        "crop": np.asarray(pil.crop((2, 1, 27, 26))),  # 89 % of the side, kept at 25x25
        "crop_resize": np.asarray(pil.crop((0, 3, 25, 28)).resize((28, 28), Image.BICUBIC)),
        "upsize": np.asarray(pil.resize((56, 56), Image.BILINEAR)),
        "downsize": np.asarray(pil.resize((20, 20), Image.BILINEAR)),
        "brightness": np.clip(px.astype(np.float32) * 1.2 + 5, 0, 255).astype(np.uint8),
        "jpeg": jpeg(px, 60),
        "combo": jpeg(np.asarray(pil.crop((1, 1, 26, 26)).resize((40, 40), Image.BILINEAR)), 80),
    }


@pytest.fixture(scope="module")
def pool(medssl_data):
    """250 chest X-rays + 50 fundi (twin-free by pixel hash) and 6-7 copies of each of 6 originals."""
    originals = medmnist(medssl_data, "pneumoniamnist", "train", 250, seed=1)
    originals += medmnist(medssl_data, "retinamnist", "train", 50, seed=1)
    hashes = [pixel_sha256(px) for px in originals]
    assert len(set(hashes)) == len(hashes)
    images, source = list(originals), list(range(len(originals)))
    planted = [0, 40, 80, 120, 260, 290]
    for i in planted:
        for kind, px in copies_of(originals[i]).items():
            if (
                i >= 250 and kind == "combo"
            ):  # crop + resize + JPEG of a 28 px fundus scores ~0.985,
                continue  # below the 0.99 default (bench: combo recall 0.85); see configs/default.yaml
            images.append(px)
            source.append(i)
    images.append(originals[7].copy())  # an exact duplicate
    source.append(7)
    return images, np.array(source), planted


def test_match_scores_separate_copies_from_lookalikes(medssl_data):
    xr = medmnist(medssl_data, "pneumoniamnist", "train", 3, seed=5)
    pairs = [
        (xr[0], xr[0]),
        (xr[0], copies_of(xr[0])["crop"]),
        (xr[0], copies_of(xr[0])["jpeg"]),
        (xr[0], xr[1]),
    ]
    got = match_pairs(thumbs_of([p[0] for p in pairs]), thumbs_of([p[1] for p in pairs]))
    assert got["ncc"][0] > 0.999 and got["local"][0] > 0.99 and got["scale"][0] == 1.0
    t, lt = DEDUP.threshold, DEDUP.local_threshold
    assert got["ncc"][1] >= t and got["local"][1] >= lt and 0.85 <= got["scale"][1] < 1.0
    assert got["ncc"][2] >= t and got["local"][2] >= lt
    assert got["ncc"][3] < t or got["local"][3] < lt  # two different children's X-rays


@pytest.mark.parametrize(
    "index",
    [INDEX, {"copy_flat_max": 0, "copy_nprobe": 2}],
    ids=["flat", "ivfhnsw-2-of-5-lists"],  # 341 images: 5 lists of ~64 views, 2 probed
)
def test_planted_copies_found_and_unique_images_kept(pool, index):
    images, source, planted = pool
    n = len(images)
    rank = keeper_rank(
        np.array([f"{i:05d}" for i in range(n)]),
        np.array([px.shape[0] * px.shape[1] for px in images]),
    )
    keep_exact, exact_groups = exact_duplicates(np.array([pixel_sha256(px) for px in images]), rank)
    assert [sorted(g.tolist()) for g in exact_groups] == [[7, n - 1]]
    active = np.nonzero(keep_exact)[0]
    res = np.array([min(images[i].shape[:2]) for i in active])
    pairs = copy_pairs(
        thumbs_of([images[i] for i in active]), None, DEDUP, index, res_q=res, progress=False
    )
    edge = pairs.copies(DEDUP.threshold, DEDUP.local_threshold)
    keep, groups = components(n, active[pairs.a[edge]], active[pairs.b[edge]], rank)
    keep &= keep_exact
    for i in planted:  # each original with its copies is one group: exactly one of them is kept
        members = np.nonzero(source == i)[0]
        assert keep[members].sum() == 1, (i, keep[members])
    # Unique = X-rays without a planted or exact twin. The fundi are not counted: DeepDRiD holds
    # several photographs of each eye, near-identical at 28 px (see docs in curation/plant.py).
    unique = [i for i in range(250) if i not in planted and i != 7]
    removed = [i for i in unique if not keep[i]]
    assert len(removed) <= 0.01 * len(unique), removed


def test_array_parts_merge_to_the_pairs_of_one_process(pool):
    """Three slices of the queries, searched and verified apart, then merged: the same pairs,
    view similarities and verdicts as one process (pool vs pool, and pool vs an eval set). The
    similarities agree to float32 rounding: on AVX2 CPUs the BLAS sums a slice's inner products in
    another order than the whole set's (last-bit differences, seen on an AMD EPYC)."""
    images, _, _ = pool
    thumbs = thumbs_of(images)
    res = np.array([min(px.shape[:2]) for px in images])
    assert [len(part_rows(10, (i, 3))) for i in range(3)] == [3, 3, 4]
    for db, res_db in ((None, None), (thumbs[:60], res[:60])):
        n_db = len(thumbs if db is None else db)
        one = copy_pairs(thumbs, db, DEDUP, INDEX, res_q=res, res_db=res_db, progress=False)
        parts = [
            copy_pairs(
                thumbs, db, DEDUP, INDEX, res_q=res, res_db=res_db, part=(i, 3), progress=False
            )
            for i in range(3)
        ]
        assert min(len(p.a) for p in parts) > 0
        merged = merge_pairs(parts, n_db)
        assert len(merged.a) == len(one.a) > len(images)  # many candidates, not only copies
        np.testing.assert_array_equal(merged.a, one.a)
        np.testing.assert_array_equal(merged.b, one.b)
        np.testing.assert_allclose(merged.view, one.view, rtol=0, atol=1e-6)
        np.testing.assert_allclose(merged.ncc, one.ncc, atol=1e-6)
        verdict = (DEDUP.threshold, DEDUP.local_threshold)
        np.testing.assert_array_equal(merged.copies(*verdict), one.copies(*verdict))
        assert one.copies(*verdict).sum() >= 6 * 5  # the planted copies are among them


def test_keeper_is_deterministic_and_prefers_more_pixels():
    keys = np.array(["b", "a", "c"])
    rank = keeper_rank(keys, np.array([784, 784, 3136]))
    assert rank.tolist() == [2, 1, 0]  # most pixels first, then the smaller key
    keep, groups = components(3, np.array([0, 1]), np.array([1, 2]), rank)
    assert keep.tolist() == [False, False, True] and groups[0].tolist() == [2, 1, 0]


def test_eval_copies_and_patients_are_removed(pool, medssl_data):
    images, _, _ = pool
    evals = medmnist(medssl_data, "pneumoniamnist", "test", 40, seed=2)
    pool_imgs = list(images[:250]) + [
        evals[0],
        copies_of(evals[1])["crop_resize"],
        copies_of(evals[2])["jpeg"],
        copies_of(evals[3])["downsize"],
    ]
    records = [
        {"key": f"p{i}", "sha256": pixel_sha256(px), "patient": None}
        for i, px in enumerate(pool_imgs)
    ]
    records[5]["patient"] = "patient-x"
    eval_records = [
        {"key": f"e{i}", "sha256": pixel_sha256(px), "patient": None} for i, px in enumerate(evals)
    ]
    eval_records[9]["patient"] = "patient-x"
    cfg = DEFAULTS.decontaminate
    sets = [("eval", thumbs_of(evals), eval_records)]
    active = np.arange(len(pool_imgs))
    pairs = contamination_pairs(
        thumbs_of(pool_imgs), records, active, sets, cfg, INDEX, progress=False
    )
    found = decontaminate(records, active, sets, cfg, pairs)
    assert found.removed[250]["reason"] == "exact" and found.removed[250]["eval_key"] == "e0"
    for row, key in ((251, "e1"), (252, "e2"), (253, "e3")):
        assert found.removed[row]["reason"] == "copy" and found.removed[row]["eval_key"] == key
    assert found.removed[5]["reason"] == "patient"
    assert len(found.removed) <= 5 + 3  # at most 1 % of the 250 unrelated X-rays besides
