"""Readers keep stored values exact, dispatch on content, refuse bad files by name, and leak no PHI."""

from __future__ import annotations

import hashlib
import hmac
import shutil

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut, convert_color_space

from pretrain.data.dicom import phi_values, scrub
from pretrain.data.readers import (
    UnreadableImageError,
    iter_npz,
    read_image_file,
    sniff,
)
from pretrain.data.shards import decode_sample, encode_sample, modality_values
from pretrain.data.windowing import to_float_image
from pretrain.privacy import SiteKey


def dcm(data, name):
    return data / "dicom" / name


# ------------------------------------------------------------------------------------ DICOM
@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "emri_small.dcm", "JPEG2000_UNC.dcm", "MR2_UNCR.dcm"]
)
def test_dicom_modality_values_exact_after_encode(medssl_data, name):
    ds = pydicom.dcmread(dcm(medssl_data, name))
    frames = ds.pixel_array if int(ds.get("NumberOfFrames") or 1) > 1 else ds.pixel_array[None]
    images = read_image_file(dcm(medssl_data, name), site_key=SiteKey(b"s" * 16, "test"))
    assert len(images) == len(frames)
    for index, (image, frame) in enumerate(zip(images, frames)):
        assert image.pixels.dtype == frame.dtype  # int16 CT stays int16
        assert image.record["index_in_source"] == index
        assert image.record["n_in_source"] == len(frames)
        pixels, record = decode_sample(encode_sample("k", image.pixels, image.record))
        np.testing.assert_array_equal(pixels, frame)
        np.testing.assert_array_equal(
            modality_values(pixels, record), apply_modality_lut(frame, ds)
        )


def test_dicom_record_fields(medssl_data):
    key = SiteKey(b"test key 0123456", "test")
    ct = read_image_file(dcm(medssl_data, "CT_small.dcm"), site_key=key)[0].record
    assert ct["modality"] == "CT" and ct["photometric"] == "MONOCHROME2" and ct["bits"] == 16
    assert (ct["height"], ct["width"], ct["channels"]) == (128, 128, 1)
    # No window tags in CT_small: the configured CT preset is recorded.
    assert ct["pixel"]["intercept"] == -1024.0 and ct["pixel"]["slope"] == 1.0
    assert (ct["pixel"]["window_center"], ct["pixel"]["window_width"]) == (40.0, 400.0)
    assert ct["pixel"]["window_preset"] == "mediastinum"
    keyed = hmac.new(b"test key 0123456", b"patient\x001CT1", hashlib.sha256).hexdigest()[:16]
    assert ct["patient"] == keyed  # HMAC-SHA256 of PatientID under the site key
    other = read_image_file(dcm(medssl_data, "CT_small.dcm"), site_key=SiteKey(b"o" * 16, "t"))
    assert other[0].record["patient"] != keyed
    assert read_image_file(dcm(medssl_data, "CT_small.dcm"))[0].record["patient"] is None
    # Multi-valued window tags: the first value is used.
    mr = read_image_file(dcm(medssl_data, "MR-SIEMENS-DICOM-WithOverlays.dcm"))[0].record
    assert (mr["pixel"]["window_center"], mr["pixel"]["window_width"]) == (450.0, 790.0)
    assert mr["bits"] == 12 and mr["modality"] == "MR"
    emri = read_image_file(dcm(medssl_data, "emri_small.dcm"))
    assert emri[0].record["pixel"]["window_center"] is None  # MR without tags: percentile later
    allowed = {
        "modality",
        "photometric",
        "bits",
        "channels",
        "height",
        "width",
        "index_in_source",
        "n_in_source",
        "patient",
        "pixel",
    }
    assert set(ct) == allowed


def test_dicom_rgb_ultrasound(medssl_data):
    ds = pydicom.dcmread(dcm(medssl_data, "US1_UNCR.dcm"))
    (image,) = read_image_file(dcm(medssl_data, "US1_UNCR.dcm"))
    assert image.record["photometric"] == "RGB" and image.record["channels"] == 3
    np.testing.assert_array_equal(image.pixels, ds.pixel_array)
    assert image.pixels.dtype == np.uint8


def test_dicom_ybr_converted_to_rgb(medssl_data, tmp_path):
    ds = pydicom.dcmread(dcm(medssl_data, "US1_UNCR.dcm"))
    rgb = ds.pixel_array
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds.PixelData = np.ascontiguousarray(ybr).tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    ds.save_as(tmp_path / "ybr.dcm")
    (image,) = read_image_file(tmp_path / "ybr.dcm")
    assert image.record["photometric"] == "RGB"
    np.testing.assert_array_equal(image.pixels, convert_color_space(ybr, "YBR_FULL", "RGB"))
    assert np.abs(image.pixels.astype(int) - rgb.astype(int)).max() <= 3  # colour round trip


def test_monochrome1_recorded_and_inverted(medssl_data, tmp_path):
    ds = pydicom.dcmread(dcm(medssl_data, "MR_small.dcm"))  # window 600/1600 in tags
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    (image,) = read_image_file(tmp_path / "mono1.dcm")
    assert image.record["photometric"] == "MONOCHROME1" and image.record["pixel"]["invert"]
    stored = int(image.pixels[0, 0])
    assert stored == 905
    out = to_float_image(image.pixels, image.record)
    # DICOM linear window: ((x - (c - 0.5)) / (w - 1) + 0.5), then inverted.
    expected = 1.0 - ((905 - 599.5) / 1599 + 0.5)
    assert out[0, 0, 0] == pytest.approx(expected, abs=1e-6)
    (normal,) = read_image_file(dcm(medssl_data, "MR_small.dcm"))
    np.testing.assert_allclose(out, 1.0 - to_float_image(normal.pixels, normal.record), atol=1e-6)


def test_bad_dicoms_are_refused_without_phi(medssl_data, tmp_path):
    raw = dcm(medssl_data, "CT_small.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(raw[:-5000])  # pixel data truncated
    random = tmp_path / "random.dcm"
    random.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    header_only = tmp_path / "header.dcm"
    header_only.write_bytes(raw[:700])  # DICM magic, header cut mid-element
    phi = phi_values(pydicom.dcmread(dcm(medssl_data, "CT_small.dcm")))
    for path, words in ((cut, "pixel data"), (random, "unrecognised"), (header_only, "")):
        with pytest.raises(UnreadableImageError) as info:
            read_image_file(path)
        message = str(info.value)
        assert str(path) in message and words in message
        assert not [v for v in phi if len(v) >= 4 and v in message]


def test_phi_values_and_scrub(medssl_data):
    ds = pydicom.dcmread(dcm(medssl_data, "CT_small.dcm"))
    phi = phi_values(ds)
    assert {"CompressedSamples^CT1", "1CT1", str(ds.StudyInstanceUID), str(ds.StudyDate)} <= phi
    assert str(ds.file_meta.TransferSyntaxUID) not in phi  # standard UIDs identify nobody
    assert str(ds.SOPClassUID) not in phi
    assert (
        scrub("bad value 'CompressedSamples^CT1' in 1CT1", phi)
        == "bad value '<redacted>' in <redacted>"
    )


# ----------------------------------------------------------------------------------- rasters
def test_16bit_png_and_tiff_round_trip(tmp_path):
    values = np.random.default_rng(1).integers(0, 65536, size=(37, 53), dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    for name in ("a.png", "a.tif"):
        Image.fromarray(values).save(tmp_path / name)
        (image,) = read_image_file(tmp_path / name)
        assert image.pixels.dtype == np.uint16 and image.record["bits"] == 16
        np.testing.assert_array_equal(image.pixels, values)
        pixels, _ = decode_sample(encode_sample("k", image.pixels, image.record))
        np.testing.assert_array_equal(pixels, values)


def test_rgb_jpeg_and_modes(medssl_data, tmp_path):
    (retina,) = read_image_file(medssl_data / "images" / "retina.jpg")
    assert retina.pixels.shape == (1411, 1411, 3) and retina.pixels.dtype == np.uint8
    assert retina.record["photometric"] == "RGB" and retina.record["modality"] == "OT"
    rgba = np.random.default_rng(2).integers(0, 256, size=(9, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image_file(tmp_path / "rgba.png")[0].pixels, rgba[..., :3])
    grey_idx = np.arange(63, dtype=np.uint8).reshape(7, 9)
    pal = Image.fromarray(grey_idx, "P")
    pal.putpalette([v for i in range(256) for v in (i * 2 % 256,) * 3])
    pal.save(tmp_path / "grey_palette.png")
    grey = read_image_file(tmp_path / "grey_palette.png")[0].pixels
    assert grey.ndim == 2 and grey[0, 5] == 10  # palette looked up, one channel kept
    pal.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    pal.save(tmp_path / "colour_palette.png")
    colour = read_image_file(tmp_path / "colour_palette.png")[0].pixels
    assert colour.shape == (7, 9, 3) and tuple(colour[0, 5]) == (5, 250, 7)
    la = Image.fromarray(np.stack([grey_idx, grey_idx[::-1]], -1), "LA")
    la.save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image_file(tmp_path / "la.png")[0].pixels, grey_idx)


def test_dispatch_by_content_not_extension(medssl_data, tmp_path):
    shutil.copy(medssl_data / "images" / "microaneurysms.png", tmp_path / "really_png.jpg")
    shutil.copy(dcm(medssl_data, "CT_small.dcm"), tmp_path / "no_extension")
    assert sniff(tmp_path / "really_png.jpg") == "png"
    assert sniff(tmp_path / "no_extension") == "dicom"  # despite its TIFF-looking preamble
    (png,) = read_image_file(tmp_path / "really_png.jpg")
    assert png.pixels.shape == (102, 102)
    assert read_image_file(tmp_path / "no_extension")[0].record["modality"] == "CT"


def test_multipage_tiff_gives_one_sample_per_page(tmp_path):
    pages = [Image.fromarray(np.full((5, 6), v, dtype=np.uint8)) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    images = read_image_file(tmp_path / "pages.tif")
    assert [int(i.pixels[0, 0]) for i in images] == [10, 20, 30]
    assert [(i.record["index_in_source"], i.record["n_in_source"]) for i in images] == [
        (0, 3),
        (1, 3),
        (2, 3),
    ]


def test_bad_rasters_name_file_and_reason(medssl_data, tmp_path):
    cases = {
        "trunc.png": ((medssl_data / "images" / "ihc.png").read_bytes()[:3000], "truncated"),
        "empty.png": (b"", "empty file"),
        "notes.txt": (b"patient notes, not an image\n", "unrecognised content"),
        "archive.png": (b"PK\x03\x04" + b"\0" * 40, "npz"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnreadableImageError, match=reason) as info:
            read_image_file(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)


# ------------------------------------------------------------------------------------- npz
def test_iter_npz_split_and_labels(medssl_data):
    items = list(iter_npz(medssl_data / "breastmnist.npz", "val"))
    assert len(items) == 78
    assert all(img.shape == (28, 28) and img.dtype == np.uint8 for img, _ in items)
    labels = [label for _, label in items]
    assert labels.count(0) == 21 and labels.count(1) == 57  # SOURCES.md counts
    with np.load(medssl_data / "breastmnist.npz") as npz:
        np.testing.assert_array_equal(items[5][0], npz["val_images"][5])
    rgb = next(iter_npz(medssl_data / "retinamnist.npz", "test"))[0]
    assert rgb.shape == (28, 28, 3)


def test_iter_npz_gives_3d_volumes_and_refuses_a_bad_split(medssl_data):
    volume, label = next(iter_npz(medssl_data / "adrenalmnist3d.npz", "train"))
    assert volume.shape == (28, 28, 28) and label in (0, 1)
    with pytest.raises(UnreadableImageError, match="split"):
        next(iter_npz(medssl_data / "breastmnist.npz", "validation"))


# ------------------------------------------------------------------------------- windowing
def test_lung_preset_on_ct_by_hand(medssl_data):
    (ct,) = read_image_file(dcm(medssl_data, "CT_small.dcm"))
    assert int(ct.pixels[0, 0]) == 175  # HU = 175 * 1 - 1024 = -849
    lung = to_float_image(ct.pixels, ct.record, "lung")
    assert lung.shape == (128, 128, 1) and lung.dtype == np.float32
    assert lung.min() >= 0.0 and lung.max() <= 1.0
    # lung = (-600, 1500): (-849 - (-600 - 0.5)) / (1500 - 1) + 0.5 = 0.334223
    assert lung[0, 0, 0] == pytest.approx(0.334223, abs=1e-6)
    # Default: the recorded mediastinum window (40/400) puts -849 HU at 0.
    assert to_float_image(ct.pixels, ct.record)[0, 0, 0] == 0.0
    np.testing.assert_allclose(to_float_image(ct.pixels, ct.record, (-600, 1500)), lung)
    minmax = to_float_image(ct.pixels, ct.record, "minmax")
    assert minmax.min() == 0.0 and minmax.max() == 1.0
    with pytest.raises(ValueError, match="unknown window"):
        to_float_image(ct.pixels, ct.record, "liver")


def test_default_normalisation_8bit_and_16bit(medssl_data):
    (retina,) = read_image_file(medssl_data / "images" / "retina.jpg")
    out = to_float_image(retina.pixels, retina.record)
    assert out.shape == (1411, 1411, 3)
    np.testing.assert_allclose(out, retina.pixels / 255.0, atol=1e-6)
    frame = read_image_file(dcm(medssl_data, "emri_small.dcm"))[3]
    out = to_float_image(frame.pixels, frame.record)[:, :, 0]
    lo, hi = np.percentile(frame.pixels.astype(np.float64), (0.5, 99.5))
    assert out.min() == 0.0 and out.max() == 1.0
    inside = (frame.pixels > lo) & (frame.pixels < hi)
    np.testing.assert_allclose(out[inside], (frame.pixels[inside] - lo) / (hi - lo), atol=1e-5)
