"""Volumes end to end: readers (3D MedMNIST, NIfTI, DICOM series, volumetric multi-frame DICOM),
lossless volume shards without PHI, 3D transforms and patches, MONAI backbones restored by MONAI's
own constructor, mae3d / simclr3d runs and probes on volumes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import safetensors.torch
import torch
from pydicom.uid import generate_uid

from pretrain.backbones import build_backbone, export_backbone, load_backbone
from pretrain.components.heads import sincos_pos_embed_3d
from pretrain.components.losses import patchify3d
from pretrain.components.masked_vit import monai_vit_encode_visible
from pretrain.config import ConfigError
from pretrain.data import readers
from pretrain.data.datasets import open_dataset
from pretrain.data.shards import decode_sample, encode_sample
from pretrain.data.volumes import order_slices, read_nifti
from pretrain.transforms3d import (
    RandomResizedCrop3D,
    SimCLR3DTransform,
    resample_to_spacing,
    resize_volume,
)
from tests.conftest import REPO, tiny_run_config
from tests.test_ingest import manifest, shard_samples

pytestmark = pytest.mark.usefixtures("one_thread")

SALT = "volume-test-salt-71b2"
PATIENT, MRN = "Zqvolpatient^Zqanna", "VOL77123"


def run_module(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "MEDSSL_PATIENT_SALT": SALT, **(env_extra or {})}
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------ readers
def test_adrenalmnist3d_ingests_every_volume_losslessly(medssl_data, tmp_path):
    """The acceptance run: 1,584 volumes (train 1,188, val 98, test 298), none rejected, each
    sample's voxels equal to the .npz array."""
    out = tmp_path / "adrenal"
    run_module(["curation", "ingest", str(medssl_data / "adrenalmnist3d.npz"), "--out", str(out)])
    records = manifest(out)
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test")}
    assert counts == {"train": 1188, "val": 98, "test": 298}
    assert not (out / "rejected.jsonl").read_text().strip()
    assert all(r["volume"]["shape"] == [28, 28, 28] and r["modality"] == "CT" for r in records)
    with np.load(medssl_data / "adrenalmnist3d.npz") as npz:
        test_images, test_labels = npz["test_images"], npz["test_labels"]
    samples = list(shard_samples(out).values())
    test = {r["index_in_source"]: (px, r) for px, r in samples if r["split"] == "test"}
    for index in (0, 150, 297):
        px, record = test[index]
        assert px.dtype == np.uint8 and np.array_equal(px, test_images[index])
        assert record["label"] == int(test_labels[index, 0])


def test_3d_npz_dataset_gives_volumes_and_2d_files_stay_2d(medssl_data):
    volumes = open_dataset(f"{medssl_data}/adrenalmnist3d.npz:val")
    x, y = volumes[3]
    assert x.shape == (1, 28, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1
    assert len(volumes) == 98 and volumes.num_classes == 2 and y in (0, 1)
    image, _ = open_dataset(f"{medssl_data}/breastmnist.npz:val")[0]
    assert image.shape == (1, 28, 28)


def _series(medssl_data: Path, folder: Path, gap: float, drop: int | None = None) -> list[int]:
    """Six CT slices of one series (CT_small with distinct int16 HU per slice), written in shuffled
    order, named after the patient; returns the per-slice offsets in position order."""
    src = pydicom.dcmread(medssl_data / "dicom" / "CT_small.dcm")
    base = src.pixel_array.astype(np.int16)
    uid = generate_uid()
    folder.mkdir(parents=True)
    offsets = [-900, -300, 0, 250, 600, 1200]  # stored values reach -900+128 < 0: signed int16
    for order, i in enumerate([3, 0, 5, 1, 4, 2]):
        if i == drop:
            continue
        ds = src.copy()
        ds.PixelData = (base + offsets[i]).astype(np.int16).tobytes()
        ds.ImagePositionPatient = [-158.1, -179.0, -75.0 + gap * i]
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = order + 1  # not the spatial order: positions decide
        ds.PatientName, ds.PatientID = PATIENT, MRN
        ds.StudyDescription = f"Zqstudy CT abdomen {PATIENT}"
        ds.save_as(folder / f"{PATIENT.replace('^', '_')}_{MRN}_{order}.dcm")
    return [o for k, o in enumerate(offsets) if k != drop]


def test_dicom_series_is_one_volume_ordered_by_position_with_no_phi(medssl_data, tmp_path):
    src = tmp_path / f"{PATIENT.replace('^', ' ')} MRN{MRN}"
    offsets = _series(medssl_data, src / "CT 2019 chest", gap=2.5)
    out = tmp_path / "out"
    run_module(["curation", "ingest", str(src), "--out", str(out), "dicom.volumes=true"])
    (record,) = manifest(out)
    voxels, rec = next(iter(shard_samples(out).values()))
    assert voxels.shape == (6, 128, 128) and voxels.dtype == np.int16
    assert rec["volume"]["spacing"] == [2.5, 0.661468, 0.661468]
    assert rec["volume"]["orientation"] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    base = pydicom.dcmread(medssl_data / "dicom" / "CT_small.dcm").pixel_array.astype(np.int16)
    for k, offset in enumerate(offsets):  # ordered along the normal, HU exact
        assert np.array_equal(voxels[k], base + offset)
    assert rec["pixel"]["intercept"] == -1024.0 and "missing_slices" not in rec["volume"]
    assert record["patient"] and len(record["patient"]) >= 16  # a keyed hash, not the MRN
    phi = [PATIENT, PATIENT.replace("^", " "), "Zqvolpatient", "Zqanna", MRN, "Zqstudy", SALT]
    for path in out.rglob("*"):
        if path.is_file() and "private" not in path.parts:
            data = path.read_bytes()
            assert not [v for v in phi if v.encode() in data], path


def test_series_with_a_missing_slice_is_reported(medssl_data, tmp_path):
    _series(medssl_data, tmp_path / "s", gap=3.0, drop=2)
    (out := tmp_path / "out").mkdir()
    run_module(["curation", "ingest", str(tmp_path / "s"), "--out", str(out), "dicom.volumes=true"])
    (record,) = manifest(out)
    assert record["volume"]["shape"][0] == 5
    assert record["volume"]["missing_slices"] == 1 and record["volume"]["spacing"][0] == 3.0


def test_order_slices_flags_uneven_gaps():
    geometry = [
        {"position": [0, 0, z], "orientation": [1, 0, 0, 0, 1, 0]} for z in (4.0, 0.0, 2.0, 7.1)
    ]
    order, spacing, problems = order_slices(geometry)
    assert order == [1, 2, 0, 3] and spacing == pytest.approx(2.0)
    assert problems == {"uneven_spacing": True}


def test_multiframe_mr_is_one_volume_with_its_slice_spacing(medssl_data, tmp_path):
    frames = readers.read_image_file(medssl_data / "dicom" / "emri_small.dcm")
    assert len(frames) == 10 and frames[0].pixels.shape == (64, 64)  # 2D default unchanged
    (volume,) = readers.read_image_file(
        medssl_data / "dicom" / "emri_small.dcm", dicom_volumes=True
    )
    assert volume.pixels.shape == (10, 64, 64)
    assert volume.record["volume"]["spacing"][0] == 1.2  # SpacingBetweenSlices
    assert np.array_equal(volume.pixels, np.stack([f.pixels for f in frames]))


def test_nifti_volume_keeps_stored_values_spacing_and_orientation(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 2000, size=(12, 10, 8), dtype=np.int16)  # (i, j, k)
    img = nib.Nifti1Image(data, np.diag([0.8, 0.9, 2.5, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(img, path)
    assert readers.sniff(path) == "nifti"
    (volume,) = read_nifti(path, modality="CT")
    assert volume.pixels.shape == (8, 10, 12) and volume.pixels.dtype == np.int16
    assert np.array_equal(volume.pixels, data.transpose(2, 1, 0))
    assert volume.record["volume"]["spacing"] == [2.5, 0.9, 0.8]
    assert volume.record["volume"]["orientation"] == "RAS"
    assert volume.record["pixel"]["slope"] == 2.0 and volume.record["pixel"]["intercept"] == -1024
    sample = encode_sample("k", volume.pixels, volume.record)  # lossless through the shard format
    restored, _ = decode_sample(sample)
    assert restored.dtype == np.int16 and np.array_equal(restored, volume.pixels)


# --------------------------------------------------------------------------------- transforms
def test_random_resized_crop_3d_takes_a_box_and_resizes_it():
    torch.manual_seed(0)
    z = torch.arange(20, dtype=torch.float32).view(1, 20, 1, 1).expand(1, 20, 24, 24)
    crop = RandomResizedCrop3D(8, scale=(0.2, 0.3))
    for _ in range(5):
        (d0, _, _), (d, h, w) = crop.box((20, 24, 24))
        assert 0.15 <= d * h * w / (20 * 24 * 24) <= 0.4
        out = crop(z)
        assert out.shape == (1, 8, 8, 8)
        assert out.min() >= 0 and out.max() <= 19  # values from inside the volume
        assert torch.all(out[0, 1:, 0, 0] >= out[0, :-1, 0, 0])  # the slice axis kept its order
    views = SimCLR3DTransform(8)(torch.rand(1, 10, 12, 12))
    assert len(views) == 2 and views[0].shape == (1, 8, 8, 8) and not torch.equal(*views)


def test_resample_to_spacing_keeps_the_physical_extent():
    volume = torch.rand(1, 10, 40, 40)  # 5 mm slices, 0.5 mm pixels
    out = resample_to_spacing(volume, [5.0, 0.5, 0.5], [2.5, 1.0, 1.0])
    assert out.shape == (1, 20, 20, 20)
    assert resample_to_spacing(volume, [None, 0.5, 0.5], [1, 1, 1]).shape == (1, 10, 20, 20)
    assert resize_volume(volume, 10).shape == (1, 10, 10, 10)


def test_patchify3d_matches_the_patch_embedding_order():
    """Patch n of patchify3d is the cube a flattened 3D patch-embedding conv puts at token n."""
    vol = torch.randn(2, 1, 8, 12, 4)
    patches = patchify3d(vol, 4)
    assert patches.shape == (2, 2 * 3 * 1, 64)
    conv = torch.nn.Conv3d(1, 64, 4, stride=4, bias=False)
    with torch.no_grad():  # each output channel reads one voxel of the cube, in (p, q, r) order
        conv.weight.zero_()
        for k in range(64):
            conv.weight[k, 0, k // 16, (k // 4) % 4, k % 4] = 1.0
        tokens = conv(vol).flatten(2).transpose(1, 2)
    assert torch.allclose(tokens, patches)


def test_3d_sincos_positions_are_distinct_per_patch():
    pos = sincos_pos_embed_3d(12, (2, 3, 4))
    assert pos.shape == (24, 12)
    assert torch.cdist(pos, pos).add(torch.eye(24)).min() > 1e-3
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_pos_embed_3d(8, (2, 2, 2))


# ---------------------------------------------------------------------------------- backbones
@pytest.mark.parametrize(
    "config",
    [
        {"arch": "vit3d_tiny", "img_size": 16, "patch_size": 4, "in_chans": 1, "depth": 2},
        {"arch": "resnet3d_10", "img_size": 16, "in_chans": 1, "widen_factor": 0.25},
    ],
)
def test_volume_backbone_export_loads_into_monai_with_strict_keys(config, tmp_path):
    import monai.networks.nets as nets

    torch.manual_seed(0)
    model = build_backbone(config).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    features = model(x)
    export_backbone(model, tmp_path, meta={"mean": [0.5], "std": [0.25], "source": "test"})
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["architecture"].startswith("monai.networks.nets.")
    net = getattr(nets, doc["architecture"].rsplit(".", 1)[1])(**doc["model_args"])
    net.load_state_dict(safetensors.torch.load_file(tmp_path / "model.safetensors"), strict=True)
    out = net.eval()(x)
    pooled = out[0].mean(dim=1) if isinstance(out, tuple) else out  # ViT: (tokens, hidden)
    assert torch.allclose(pooled, features, atol=1e-5)
    loaded, info = load_backbone(tmp_path)
    assert torch.allclose(loaded(x), features, atol=1e-5) and info["spatial_dims"] == 3


def test_mae3d_encoder_sees_only_kept_patches():
    torch.manual_seed(0)
    vit = build_backbone(
        {"arch": "vit3d_tiny", "img_size": 8, "patch_size": 4, "in_chans": 1, "depth": 1}
    )
    x = torch.rand(2, 1, 8, 8, 8)
    every = torch.arange(8).expand(2, 8)
    assert torch.allclose(monai_vit_encode_visible(vit, x, every).mean(1), vit(x), atol=1e-6)
    kept = monai_vit_encode_visible(vit, x, every[:, :2])
    assert kept.shape == (2, 2, 192)
    y = x.clone()
    y[:, :, 4:, 4:, 4:] = 0  # the last cube (token 7) changes; tokens 0-1 do not see it
    assert torch.allclose(monai_vit_encode_visible(vit, y, every[:, :2]), kept, atol=1e-6)


# ------------------------------------------------------------------------------ runs and probes
@pytest.fixture(scope="module")
def cube_npz(tmp_path_factory) -> Path:
    """24 train / 16 test 16³ volumes: a bright blob whose size is the label, plus noise."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("vol") / "cubes3d.npz"
    grid = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"))
    arrays = {}
    for split, n in (("train", 24), ("test", 16)):
        labels = np.arange(n) % 2
        vols = []
        for label in labels:
            centre = rng.integers(5, 11, size=3)[:, None, None, None]
            radius = 3 + 3 * label
            blob = ((grid - centre) ** 2).sum(0) <= radius**2
            vols.append((blob * 200 + rng.integers(0, 40, size=(16, 16, 16))).astype(np.uint8))
        arrays[f"{split}_images"] = np.stack(vols)
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez(path, **arrays)
    return path


VOLUME_RUNS = {
    "mae3d": {
        "model.arch": "vit3d_tiny",
        "model.depth": 1,
        "model.patch_size": 4,
        "mae3d.decoder_depth": 1,
        "mae3d.decoder_embed_dim": 48,
        "mae3d.decoder_num_heads": 2,
        "optim.base_lr": 1.5e-3,
    },
    "simclr3d": {"model.arch": "resnet3d_10", "model.widen_factor": 0.25, "optim.base_lr": 0.3},
}


@pytest.mark.parametrize("method", sorted(VOLUME_RUNS))
def test_volume_method_trains_exports_and_is_probed(method, cube_npz, tmp_path):
    from pretrain.train import run

    out = tmp_path / method
    cfg = tiny_run_config(method, cube_npz, out, **{"optim.max_steps": 2, **VOLUME_RUNS[method]})
    run(cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(np.isfinite(losses))
    _, info = load_backbone(out / "export")
    assert info["method"] == method and info["spatial_dims"] == 3
    report = tmp_path / "knn"
    run_module(
        [
            "eval", "knn", "--backbone", str(out / "export"),
            "--train", f"{cube_npz}:train", "--test", f"{cube_npz}:test",
            "--out", str(report), "knn.ks=[3]", "knn.default_k=3", "bootstrap.resamples=10",
        ]
    )  # fmt: skip
    doc = json.loads((report / "metrics.json").read_text())
    assert doc["protocols"]["knn"]["settings"]["k=3"]["auroc"] >= 0.0
    assert "raw" in doc["baselines"]


def test_2d_method_on_volumes_and_3d_method_on_images_are_refused(cube_npz, ramp_npz, tmp_path):
    with pytest.raises(ConfigError, match="holds volumes"):
        tiny_run_config("simclr", cube_npz, tmp_path / "a", **{"model.arch": "resnet18"})
    with pytest.raises(ConfigError, match="holds 2D images"):
        tiny_run_config("mae3d", ramp_npz, tmp_path / "b", **VOLUME_RUNS["mae3d"])
    with pytest.raises(ConfigError, match="3D ViT"):
        tiny_run_config(
            "mae3d",
            cube_npz,
            tmp_path / "c",
            **{**VOLUME_RUNS["mae3d"], "model.arch": "resnet3d_10"},
        )


def test_preview_shows_volumes(medssl_data, tmp_path):
    out = tmp_path / "v"
    run_module(["curation", "ingest", f"{medssl_data}/adrenalmnist3d.npz:val", "--out", str(out)])
    run_module(["curation", "preview", str(out), "--n", "4"])
    assert (out / "preview.png").stat().st_size > 1000
    shutil.rmtree(out)


def test_2_5d_baseline_averages_a_2d_backbone_over_axial_slices(tmp_path):
    from eval.features import FeatureExtractor

    torch.manual_seed(0)
    model2d = build_backbone(
        {"arch": "vit_tiny", "img_size": 16, "patch_size": 8, "in_chans": 1, "depth": 1}
    )
    export_backbone(model2d.eval(), tmp_path / "2d", meta={"mean": [0.5], "std": [0.25]})
    extractor = FeatureExtractor(f"2.5d:{tmp_path / '2d'}", cache_dir=None, n_last_blocks=1)
    volume = torch.rand(1, 5, 32, 32)  # 5 axial slices of 32², resized to the model's 16²
    prepared = extractor.transform(volume)
    assert prepared.shape == (1, 5, 16, 16)
    got = extractor.model(prepared[None])
    by_hand = torch.stack([model2d((prepared[:, k][None] - 0.5) / 0.25)[0] for k in range(5)]).mean(
        0
    )
    assert torch.allclose(got[0], by_hand, atol=1e-5)


def test_curation_on_volume_shards_drops_copies_and_eval_volumes(medssl_data, tmp_path):
    """Exact copies of volumes go (one keeper), and pool volumes that are copies of the eval set's
    go too; the curated shards still hold volumes."""
    with np.load(medssl_data / "adrenalmnist3d.npz") as npz:
        val, labels = npz["val_images"], npz["val_labels"]
    pool = np.concatenate([val[:40], val[:3], val[60:62]])  # 3 copies, 2 eval volumes
    np.savez(
        tmp_path / "pool3d.npz",
        train_images=pool,
        train_labels=np.concatenate([labels[:40], labels[:3], labels[60:62]]),
    )
    np.savez(tmp_path / "held3d.npz", test_images=val[60:62], test_labels=labels[60:62])
    run_module(["curation", "ingest", f"{tmp_path}/pool3d.npz", "--out", str(tmp_path / "pool")])
    run_module(
        [
            "curation", "run", f"pool={tmp_path / 'pool'}", f"output_dir={tmp_path / 'cur'}",
            f"eval_sets=[{tmp_path}/held3d.npz:test]", "progress=false",
        ]
    )  # fmt: skip
    summary = json.loads((tmp_path / "cur" / "summary.json").read_text())
    curated = open_dataset(str(tmp_path / "cur" / "curated"))
    assert len(curated) == 40, summary
    volume, _ = curated[0]
    assert volume.shape == (1, 28, 28, 28)
    kept = {r["sha256"] for r in manifest(tmp_path / "cur" / "curated")}
    from pretrain.data.shards import pixel_sha256

    assert not {pixel_sha256(v) for v in val[60:62]} & kept
