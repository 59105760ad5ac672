"""open_dataset: npz, image folders and shards give the same (tensor, label) items and metadata."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from curation.__main__ import main as curation_main
from pretrain.data.datasets import open_dataset
from pretrain.data.readers import UnreadableImageError
from pretrain.data.shards import ShardWriter, encode_sample
from pretrain.privacy import SiteKey


def test_npz_val_split_items_and_labels(medssl_data):
    path = medssl_data / "breastmnist.npz"
    ds = open_dataset(f"{path}:val")
    with np.load(path) as npz:
        images, labels = npz["val_images"], npz["val_labels"][:, 0]
    assert len(ds) == 78
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.num_classes == 2
    assert ds.patients == [None] * 78 and len(set(ds.keys)) == 78
    img, label = ds[5]
    assert img.dtype == torch.float32 and img.shape == (1, 28, 28)
    assert label == int(labels[5])
    np.testing.assert_allclose(img[0].numpy(), images[5] / 255.0, atol=1e-7)


def test_npz_rgb_and_transform(medssl_data):
    ds = open_dataset(f"{medssl_data / 'retinamnist.npz'}:val", transform=lambda t: t * 2)
    img, _ = ds[0]
    assert img.shape == (3, 28, 28) and float(img.max()) > 1.0  # transform applied after [0, 1]
    assert ds.num_classes == 5


def _pseudonym(secret: bytes, name: str) -> str:
    return hmac.new(secret, b"source\x00" + name.encode(), hashlib.sha256).hexdigest()[:32]


def test_folder_keys_are_the_pseudonyms_ingest_gives(medssl_data, tmp_path, monkeypatch):
    """Read in place or ingested, an image keeps one name: eval features, curation and
    decontamination records of either agree, and neither shows a path."""
    monkeypatch.setenv("MEDSSL_PATIENT_SALT", "site-secret-for-this-test")
    with np.load(medssl_data / "breastmnist.npz") as npz:
        images = npz["val_images"][:3]
    root = tmp_path / "DOE^JOHN"
    for i, name in enumerate(["malignant/DOE_1.png", "benign/DOE_2.png", "benign/DOE_3.png"]):
        _save_png(root / name, images[i])
    shutil.copy(medssl_data / "dicom" / "emri_small.dcm", root / "benign" / "DOE_mr.dcm")
    out = tmp_path / "shards"
    assert curation_main(["ingest", str(root), "--out", str(out)]) == 0
    key_of = {}  # private map: path -> key of a single-frame file / of the file's frames
    for entry in map(json.loads, (out / "private" / "sources.jsonl").read_text().splitlines()):
        if "path" in entry and "input" in entry:
            key_of[entry["path"]] = entry["input"]
    ingested = {json.loads(line)["key"] for line in (out / "manifest.jsonl").open()}
    ds = open_dataset(root)
    assert len(ds) == 3 + 10 and set(ds.keys) == ingested  # 10 MR frames
    for (path, _), key in zip(ds.items, ds.keys):
        if not path.name.endswith(".dcm"):
            assert key == key_of[str(path)]
    assert not any("DOE" in k or "/" in k for k in ds.keys)
    # a file broken after indexing is named by its key when read, never by its path
    index = next(i for i, (path, _) in enumerate(ds.items) if path.name == "DOE_2.png")
    ds.items[index][0].write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UnreadableImageError) as caught:
        ds.load(index)
    assert str(caught.value).startswith(ds.keys[index]) and "DOE" not in str(caught.value)


def _save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_with_class_subfolders_skips_corrupt_files(medssl_data, tmp_path, caplog):
    with np.load(medssl_data / "breastmnist.npz") as npz:
        images = npz["val_images"][:5]
    root = tmp_path / "folder"
    for i, name in enumerate(["zeta/a.png", "alpha/b.png", "alpha/c.png", "zeta/d.png"]):
        _save_png(root / name, images[i])
    (root / "alpha" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    site = SiteKey(b"test-salt-012345", "test")
    with caplog.at_level(logging.WARNING):
        ds = open_dataset(root, site_key=site)
    # the log names the file by its keyed pseudonym (HMAC-SHA256, computed here by hand), never
    # by a folder or file name
    assert _pseudonym(b"test-salt-012345", "folder/alpha/broken.png") in caplog.text
    assert "broken" not in caplog.text and "alpha" not in caplog.text
    assert [p.name for p in ds.skipped] == ["broken.png"]
    assert ds.classes == ["alpha", "zeta"] and ds.num_classes == 2
    names = ["folder/alpha/b.png", "folder/alpha/c.png", "folder/zeta/a.png", "folder/zeta/d.png"]
    assert ds.keys == [_pseudonym(b"test-salt-012345", n) for n in names]
    assert ds.labels.tolist() == [0, 0, 1, 1]
    img, label = ds[2]
    assert label == 1
    np.testing.assert_allclose(img[0].numpy(), images[0] / 255.0, atol=1e-7)


def test_flat_folder_has_no_labels_and_dicom_frames_are_items(medssl_data, tmp_path):
    _save_png(tmp_path / "x.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    shutil.copy(medssl_data / "dicom" / "emri_small.dcm", tmp_path / "mr_no_extension")
    shutil.copy(medssl_data / "dicom" / "CT_small.dcm", tmp_path / "ct.dcm")
    ds = open_dataset(tmp_path, site_key=SiteKey(b"test-salt-012345", "test"))
    assert ds.num_classes == 0 and set(ds.labels.tolist()) == {-1}
    assert len(ds) == 12  # CT + 10 MR frames + the PNG
    root = tmp_path.name
    expected = [f"{root}/ct.dcm", f"{root}/mr_no_extension#0", f"{root}/x.png"]
    assert [ds.keys[0], ds.keys[1], ds.keys[-1]] == [
        _pseudonym(b"test-salt-012345", n) for n in expected
    ]
    ct_patient = ds.patients[0]  # salted hash of PatientID '1CT1', never the ID itself
    assert ct_patient is not None and "1CT1" not in ct_patient
    assert ds.patients[1] is None and ds.patients[-1] is None  # no PatientID / not DICOM
    site = SiteKey(b"test-salt-012345", "test")  # the key that made the patient key is named
    assert ds.load(0)[1]["key_fingerprint"] == site.fingerprint()
    assert "key_fingerprint" not in ds.load(len(ds) - 1)[1]
    img, _ = ds[3]
    assert img.shape == (1, 64, 64) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert not torch.equal(img, ds[4][0])  # frames differ


def test_empty_or_all_corrupt_folder_raises_naming_it(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(UnreadableImageError, match=str(tmp_path)):
        open_dataset(tmp_path)


def test_shards_random_access_with_records(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    for s in range(2):
        writer = ShardWriter(tmp_path, s)
        for i in range(4):
            key = f"img{s}{i}"
            pixels = rng.integers(0, 65535, size=(6, 5), dtype=np.uint16)
            label = None if i == 3 else i % 2
            record = {
                "key": key,
                "label": label,
                "patient": f"p{i % 2}",
                "modality": "MR",
                "pixel": {"window_center": 30000.0, "window_width": 20001.0},
            }
            writer.write(encode_sample(key, pixels, record))
            expected[key] = (pixels, -1 if label is None else label, f"p{i % 2}")
        writer.commit()
    ds = open_dataset(tmp_path, window="minmax")
    assert ds.keys == list(expected)
    assert ds.labels.tolist() == [v[1] for v in expected.values()]
    assert ds.patients == [v[2] for v in expected.values()]
    assert ds.num_classes == 2
    for index in (6, 0, 3):  # out of order: positional reads, no stream state
        img, label = ds[index]
        pixels = expected[ds.keys[index]][0].astype(np.float64)
        want = (pixels - pixels.min()) / (pixels.max() - pixels.min())
        np.testing.assert_allclose(img[0].numpy(), want, atol=1e-6)
        assert label == expected[ds.keys[index]][1]
    # worker processes get their own file descriptors
    batches = list(DataLoader(ds, batch_size=3, num_workers=2))
    assert sum(len(b[1]) for b in batches) == 8


def test_truncated_shard_keeps_the_samples_before_the_damage(tmp_path, caplog):
    writer = ShardWriter(tmp_path, 0)
    for i in range(6):
        pixels = np.full((16, 16), i, np.uint8)
        writer.write(encode_sample(f"k{i}", pixels, {"key": f"k{i}", "label": i % 2}))
    shard = writer.commit()
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        ds = open_dataset(shard)
    assert "shard-000000.tar" in caplog.text and "skipped" in caplog.text
    assert 0 < len(ds) < 6 and ds.keys == [f"k{i}" for i in range(len(ds))]
    for i in range(len(ds)):
        assert float(ds[i][0].max()) == pytest.approx(i / 255.0)
