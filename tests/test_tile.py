"""`python -m curation tile`: whole-slide images -> tissue tiles (curation/tile.py, tissue.py, slides.py).

Slides are built here from the shared IHC image on glass (tests/slides.py), with the tissue area
known to the pixel, so coverage, background and scale are measured against the truth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.__main__ import main as curation_main
from curation.tissue import (
    QCParams,
    TissueParams,
    check_tile,
    pen_fraction,
    tile_grid,
    tissue_fractions,
    tissue_mask,
)
from pretrain.data.shards import decode_sample, list_shards
from tests.slides import blank_slide, blurred, disk, tissue_texture, write_pyramid

MPP0 = 0.25  # the slides' level 0 (40x); tiles are asked at 0.5 (20x)
PHI_NAME = "DOE_JANE_1960-01-01_S24-0042"


def _read_tiles(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    import tarfile

    tiles: dict[str, tuple[np.ndarray, dict]] = {}
    for shard in list_shards(out):
        members: dict[str, dict] = {}
        with tarfile.open(shard) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
        for key, sample in members.items():
            tiles[key] = decode_sample(sample)
    return tiles


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def main_slide(medssl_data, tmp_path_factory):
    """6144 x 4096 at 0.25 um/px, 3 levels (1, 4, 16): an aligned 3584 x 3072 tissue block and a
    round piece of radius 640 off the tile grid; the file name carries patient identifiers."""
    root = tmp_path_factory.mktemp("slides")
    h, w = 4096, 6144
    truth = np.zeros((h, w), bool)
    truth[512:3584, 512:4096] = True
    truth |= disk(h, w, 2100, 5200, 640)
    level0 = blank_slide(h, w)
    np.copyto(level0, tissue_texture(medssl_data, h, w), where=truth[..., None])
    path = root / f"{PHI_NAME}.tif"
    write_pyramid(path, level0, MPP0)
    return path, level0, truth


def test_tiles_cover_the_tissue_at_the_requested_mpp_and_a_rerun_does_nothing(
    main_slide, tmp_path, capsys
):
    path, level0, truth = main_slide
    out = tmp_path / "tiles"
    args = ["tile", str(path), "--out", str(out), "mpp=0.5", "progress=false"]
    assert curation_main(args) == 0, capsys.readouterr().err
    records = _manifest(out)
    extent = 512  # level-0 pixels of a 256 px tile at 0.5 um/px
    covered = np.zeros_like(truth)
    on_background = 0
    for r in records:
        assert abs(r["mpp"] - 0.5) <= 0.01 and r["tile_size"] == 256  # within 2 %
        window = truth[r["y"] : r["y"] + extent, r["x"] : r["x"] + extent]
        covered[r["y"] : r["y"] + extent, r["x"] : r["x"] + extent] = True
        on_background += window.mean() < 0.5
    coverage = (covered & truth).sum() / truth.sum()
    assert coverage >= 0.95, coverage
    assert on_background <= 0.02 * len(records)
    # The pixels are the slide's at half resolution, where the records say (checked on the truth).
    tiles = _read_tiles(out)
    assert set(tiles) == {r["key"] for r in records}
    for r in records[:: max(1, len(records) // 6)]:
        pixels, rec = tiles[r["key"]]
        crop = level0[r["y"] : r["y"] + extent, r["x"] : r["x"] + extent]
        expected = np.asarray(Image.fromarray(crop).reduce(2), np.float32)
        assert pixels.shape == (256, 256, 3) and rec["slide"] == r["slide"]
        assert np.abs(pixels.astype(np.float32) - expected).mean() < 4.0
    (slide,) = [json.loads(x) for x in (out / "slides.jsonl").read_text().splitlines()]
    assert slide["kept"] == len(records) and slide["levels"] == 3 and slide["resampled"]
    assert (out / slide["thumbnail"]).is_file()
    assert slide["grid"] == slide["kept"] + sum(slide["rejected"].values())
    # No output names the slide file, outside the private map.
    for f in out.rglob("*"):
        if f.is_file() and "private" not in f.parts:
            assert PHI_NAME.encode() not in f.read_bytes(), f
    # A second run does nothing: every output byte for byte, no shard rewritten.
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in list_shards(out)}
    manifest = (out / "manifest.jsonl").read_bytes()
    assert curation_main(args) == 0
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in list_shards(out)} == before
    assert (out / "manifest.jsonl").read_bytes() == manifest


@pytest.fixture(scope="module")
def slide_folder(medssl_data, tmp_path_factory):
    """A folder of three small slides: one with a pen stroke and a blurred region, one without
    resolution metadata, one OME-TIFF whose pyramid is in SubIFDs (OpenSlide sees one level)."""
    root = tmp_path_factory.mktemp("folder")
    h, w = 2048, 3072
    texture = tissue_texture(medssl_data, h, w)
    level0 = blank_slide(h, w, seed=1)
    level0[512:1536, 512:2560] = texture[512:1536, 512:2560]  # 2 x 4 tiles of 512
    level0[512:1024, 512:1024] = blurred(level0[512:1024, 512:1024], 4)  # tile (512, 512)
    level0[1100:1400, 2100:2500] = (40, 160, 60)  # green marker ink in tile (2048, 1024)
    write_pyramid(root / "a_qc.tif", level0, MPP0)
    plain = blank_slide(h, w, seed=2)
    plain[512:1536, 512:1536] = texture[512:1536, 512:1536]
    write_pyramid(root / "b_nompp.tif", plain, None)
    write_pyramid(root / "c_ome.ome.tif", plain, MPP0, subifds=True)
    (root / "notes.txt").write_text("not a slide\n")
    return root


def test_quality_checks_backends_and_slides_without_mpp(slide_folder, tmp_path, capsys):
    out = tmp_path / "tiles"
    code = curation_main(
        ["tile", str(slide_folder), "--out", str(out), "--workers", "2", "progress=false"]
    )
    assert code == 0, capsys.readouterr().err
    slides = [json.loads(x) for x in (out / "slides.jsonl").read_text().splitlines()]
    assert len(slides) == 2  # a_qc and c_ome; notes.txt is not a slide
    qc, ome = slides
    assert qc["rejected"]["blur"] == 1 and qc["rejected"]["pen"] == 1 and qc["kept"] == 6
    assert ome["backend"] == "tifffile" and ome["levels"] == 3 and ome["kept"] == 4
    kept = {(r["x"], r["y"]) for r in _manifest(out) if r["slide"] == qc["slide"]}
    assert (512, 512) not in kept and (2048, 1024) not in kept and (1024, 512) in kept
    (refused,) = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert "mpp_override" in refused["reason"] and "b_nompp" not in refused["reason"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tiles_rejected"]["blur"] == 1 and summary["slides_refused"] == 1
    # With mpp_override the slide without metadata is tiled at that scale.
    out2 = tmp_path / "override"
    nompp = slide_folder / "b_nompp.tif"
    args = ["tile", str(nompp), "--out", str(out2), "mpp_override=0.25", "progress=false"]
    assert curation_main(args) == 0
    (slide,) = [json.loads(x) for x in (out2 / "slides.jsonl").read_text().splitlines()]
    assert slide["mpp_from"] == "override" and slide["kept"] == 4


def test_patients_csv_is_the_patient_key(slide_folder, tmp_path, capsys):
    table = tmp_path / "patients.csv"
    table.write_text("slide,patient\na_qc.tif,P-0001\nc_ome.ome.tif,P-0001\n")
    out = tmp_path / "tiles"
    args = ["tile", str(slide_folder), "--out", str(out), f"patients_csv={table}"]
    assert curation_main([*args, "progress=false", "workers=1"]) == 0, capsys.readouterr().err
    records = _manifest(out)
    assert len({r["slide"] for r in records}) == 2 and len({r["patient"] for r in records}) == 1
    assert b"P-0001" not in (out / "manifest.jsonl").read_bytes()
    refused = (out / "rejected.jsonl").read_text()
    assert "not in patients_csv" in refused  # b_nompp has no row


def test_an_interrupted_run_resumes_to_the_same_output(slide_folder, tmp_path):
    env = {**os.environ, "MEDSSL_TILE_TEST_EXIT_AFTER": "1"}
    cmd = [sys.executable, "-m", "curation", "tile", str(slide_folder), "progress=false"]
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    first = subprocess.run([*cmd, "--out", str(cut), "workers=1"], env=env, capture_output=True)
    assert first.returncode == 75 and not (cut / "manifest.jsonl").exists()
    env.pop("MEDSSL_TILE_TEST_EXIT_AFTER")
    for out in (cut, whole):
        done = subprocess.run([*cmd, "--out", str(out), "workers=1"], env=env, capture_output=True)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert (cut / "manifest.jsonl").read_bytes() == (whole / "manifest.jsonl").read_bytes()
    assert {p.name: p.read_bytes() for p in list_shards(cut)} == {
        p.name: p.read_bytes() for p in list_shards(whole)
    }


def test_bad_settings_are_refused_before_any_slide_is_read(slide_folder, tmp_path, capsys):
    for bad, message in [
        ("overlap=256", "overlap must be in"),
        ("mpp=0", "mpp must be > 0"),
        ("backend=vips", "backend must be"),
    ]:
        out = tmp_path / bad.split("=")[0]
        assert curation_main(["tile", str(slide_folder), "--out", str(out), bad]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


# ------------------------------------------------------------------- tissue.py by hand
def test_tissue_fractions_and_grid_by_hand():
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # one mask pixel = 16 level-0 pixels
    corners = tile_grid(128, 128, tile=64, step=64)
    assert corners == [(0, 0), (64, 0), (0, 64), (64, 64)]
    np.testing.assert_allclose(tissue_fractions(mask, 16, corners, 64), [1, 0, 0, 0])
    # a tile straddling the corner of the tissue block: a quarter of it is tissue
    np.testing.assert_allclose(tissue_fractions(mask, 16, [(32, 32)], 64), [0.25])
    assert tile_grid(100, 64, tile=64, step=32) == [(0, 0), (32, 0)]


def test_tissue_mask_finds_pale_tissue_and_leaves_glass_empty():
    glass = blank_slide(256, 256)
    assert not tissue_mask(glass, mpp=16.0, params=TissueParams()).any()
    image = glass.copy()
    image[32:224, 32:128] = (150, 90, 40)  # dark chromogen: saturation ~187
    image[32:224, 128:224] = (205, 205, 228)  # pale counterstain: saturation ~26
    mask = tissue_mask(image, mpp=16.0, params=TissueParams())
    truth = np.zeros((256, 256), bool)
    truth[32:224, 32:224] = True
    # the pale half is tissue too (a 2-class Otsu on linear saturation would cut it off)
    assert (mask[:, 128:] & truth[:, 128:]).sum() / truth[:, 128:].sum() > 0.95
    assert (mask & truth).sum() / truth.sum() > 0.95 and (mask & ~truth).sum() < 0.02 * truth.sum()


def test_pen_and_blur_checks_on_a_tile(medssl_data):
    tile = tissue_texture(medssl_data, 256, 256)
    qc = QCParams()
    assert check_tile(tile, 1.0, qc) is None and pen_fraction(tile) < 0.01
    inked = tile.copy()
    inked[100:140, :] = (30, 90, 200)  # blue marker
    assert check_tile(inked, 1.0, qc) == "pen"
    assert check_tile(blurred(tile, 4), 1.0, qc) == "blur"
    assert check_tile(tile, 0.3, qc) == "tissue"


def test_launch_tile_array_gives_the_same_tiles(slide_folder, tmp_path, capsys):
    """`launch tile ... --array 2` (two tasks over the slides, then the merging job) writes what
    one `curation tile` run writes; the slide paths stay in the private arguments file."""
    from launch.__main__ import main as launch_main

    one = tmp_path / "one"
    assert curation_main(["tile", str(slide_folder), "--out", str(one), "progress=false"]) == 0
    out = tmp_path / "arr"
    argv = ["tile", str(slide_folder), "--out", str(out), "progress=false", "--array", "2"]
    assert launch_main([*argv, "--cluster", "local", "--wait"]) == 0, capsys.readouterr().err
    for name in ("manifest.jsonl", "rejected.jsonl"):
        assert (out / name).read_bytes() == (one / name).read_bytes(), name

    def slides(folder: Path) -> list[dict]:
        lines = (folder / "slides.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in lines]

    assert slides(out) == slides(one)
    queued = [json.loads(x) for x in (out / "launch" / "jobs.jsonl").read_text().splitlines()]
    assert [q["name"] for q in queued] == ["tile-tasks", "tile"]
    assert str(slide_folder) not in (out / "launch" / "jobs.jsonl").read_text()
    assert oct((out / "private" / "launch-tile.args").stat().st_mode)[-3:] == "600"


def test_slide_aware_curation_caps_tiles_per_slide_and_drops_eval_slides(
    slide_folder, tmp_path, capsys
):
    """An eval slide tiled on its own (other tiles: tile_size 128) has the pool's slide key, so
    decontamination removes every pool tile of it; sample.per_slide_max caps the others. The
    test slides repeat their images, so duplicate removal is off: it would keep one tile of each
    repeat, from either slide, whichever key sorts first."""
    from curation.run import main as run_main

    pool, held_out = tmp_path / "pool", tmp_path / "eval"
    assert curation_main(["tile", str(slide_folder), "--out", str(pool), "progress=false"]) == 0
    eval_slide = slide_folder / "c_ome.ome.tif"
    args = ["tile", str(eval_slide), "--out", str(held_out), "tile_size=128", "progress=false"]
    assert curation_main(args) == 0
    eval_key = _manifest(held_out)[0]["slide"]
    pool_records = _manifest(pool)
    assert sum(r["slide"] == eval_key for r in pool_records) == 4  # the same slide, same key
    assert not {r["sha256"] for r in pool_records} & {r["sha256"] for r in _manifest(held_out)}
    out = tmp_path / "curated"
    code = run_main(
        [
            f"pool={pool}",
            f"output_dir={out}",
            f"eval_sets=[{held_out}]",
            "dedup.exact=false",
            "dedup.near=false",
            "sample.per_slide_max=4",
            "progress=false",
        ]
    )
    assert code == 0, capsys.readouterr().err
    curated = [json.loads(x) for x in (out / "curated" / "manifest.jsonl").read_text().splitlines()]
    other_key = next(r["slide"] for r in pool_records if r["slide"] != eval_key)
    assert sum(r["slide"] == other_key for r in pool_records) == 6
    assert [r["slide"] for r in curated] == [other_key] * 4  # 6 tiles capped to 4, eval slide out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"]["decontam"]["removed_by"] == {"patient": 4}
    assert summary["steps"]["select"]["dropped_by_per_slide_max"] == 2


def test_pathology_cpu_recipe_trains_on_tiles(slide_folder, tmp_path, capsys):
    """slides -> tiles -> `python -m pretrain` with the pathology CPU recipe -> a timm export."""
    import timm
    import torch

    from pretrain.__main__ import main as pretrain_main

    tiles = tmp_path / "tiles"
    assert curation_main(["tile", str(slide_folder), "--out", str(tiles), "progress=false"]) == 0
    run = tmp_path / "run"
    args = [
        "--config",
        "pretrain/configs/dinov2_pathology_cpu.yaml",
        f"data.train={tiles}",
        f"output_dir={run}",
        "optim.max_steps=2",
        "data.batch_size=4",
        "train.progress=false",
    ]
    assert pretrain_main(args) == 0, capsys.readouterr().err
    model = timm.create_model(f"local-dir:{run / 'export'}", pretrained=True).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 192)
