"""Privacy by construction, checked from outside the code: the PHI values are chosen here.

A hospital-style tree (folders and files named after the patient and MRN) holds the shared DICOMs
with a distinctive value in every attribute of DICOM PS3.15 Annex E's Basic Application Level
Confidentiality Profile that pydicom can set (the table as dicom-anonymizer ships it), in private
tags and free-text descriptions. Ingest, `curation run`, `curation preview`, `launch ingest
--cluster local` and an eval report run on it, and a labelled image folder named after the patient
is evaluated in place (`eval`, `launch eval`), pretrained on (`launch pretrain`) and given to
`curation run` and `launch curate` as an eval set. Every byte they write (shards and their
members, manifests, configs, checkpoints, logs, stdout and stderr, reports, feature caches with
their .npz arrays decoded, launch and submitit files), except the private folders (the pseudonym
map, the launcher's argument files, the configs as given), is searched for each
value: raw, upper and lower case, `^` read as a space.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c
from PIL import Image
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from curation.__main__ import main as curation_main

REPO = Path(__file__).resolve().parents[1]
SALT = "site-secret-Qv7Rk2Lm9Xw4"
PATIENT, MRN = "DOE^JOHN", "8047316259"
OTHER_PATIENT, OTHER_MRN = "SMITH^ANNA", "5550192837"
# Digit-only PHI (dates, numbers) is searched outside runs of 16+ hex digits: hashes and keys
# carry no PHI, but their digits would match a date by chance.
HEX_RUN = re.compile(rb"[0-9a-f]{16,}")
# (group, element[, group mask, element mask]): repeating groups (overlays 60xx) at their first group.
ANNEX_E = [Tag(t[0], t[1]) for t in dicomfields_2026c.ALL_TAGS]
SHARED = ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "MR2_UNCR.dcm", "JPEG2000_UNC.dcm")


def _value(vr: str, token: str) -> object | None:
    """A valid, distinctive value of a VR (None: not settable as text we can search for)."""
    if vr == "PN":
        return f"Zqfam{token}^Zqgiven{token}"
    if vr in ("LO", "SH", "LT", "ST", "UT", "UC", "AE", "UR"):
        return f"Zqtext{token}"
    if vr == "CS":
        return f"ZQCODE{token}"
    if vr == "DA":
        return "18880229"
    if vr == "TM":
        return "231759.918273"
    if vr == "DT":
        return "18880229231759.918273"
    if vr == "AS":
        return "087Y"
    if vr == "IS":
        return "918273645"
    if vr == "DS":
        return "9182.73645"
    if vr == "UI":
        return f"2.25.31415926535{token}"
    if vr in ("OB", "OB or OW"):
        return f"ZQBYTES{token}".encode()
    if vr == "SQ":
        item = Dataset()
        item.CodeValue = f"ZQSQ{token}"
        item.CodeMeaning = f"Zqmeaning{token}"
        return Sequence([item])
    return None  # binary numbers (US, SS, FL, ...), AT, UN: no text to find


def _phi_file(
    src: Path, dst: Path, n: int, patient: str, mrn: str, burned_in: bool = False
) -> set[str]:
    """Copy `src` to `dst` with PHI in every Annex E attribute; returns the values written."""
    ds = pydicom.dcmread(src)
    written: set[str] = set()
    for i, tag in enumerate(ANNEX_E):
        if tag.group in (0x0000, 0x0002):
            continue  # command set (network only) and file meta (set from SOPInstanceUID below)
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        value = _value(vr, f"{n}{i:03d}")
        if value is None:
            continue
        ds[tag] = DataElement(tag, "OB" if vr == "OB or OW" else vr, value)
        if isinstance(value, Sequence):
            written |= {value[0].CodeValue, value[0].CodeMeaning}
        else:
            written.add(value.decode() if isinstance(value, bytes) else str(value))
    ds.PatientName, ds.PatientID = patient, mrn
    ds.OtherPatientIDs = f"MRN{mrn}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    block = ds.private_block(0x0011, "ZQ HOSPITAL PACS", create=True)
    block.add_new(0x01, "LO", f"Zqprivate{n} {patient}")
    block.add_new(0x02, "LT", f"Zqprivnote{n} referred by Dr Zqhouse")
    ds.ImageComments = f"Zqcomment{n}: {patient} {mrn} follow-up"
    ds.StudyDescription = f"Zqstudy{n} CT chest {patient}"
    ds.BurnedInAnnotation = "YES" if burned_in else "NO"
    written |= {f"Zqprivate{n} {patient}", f"Zqprivnote{n}", "Zqhouse", f"Zqcomment{n}"}
    written |= {f"Zqstudy{n}", f"MRN{mrn}"}
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)
    return written


def _variants(values: set[str]) -> set[str]:
    out = set()
    for value in values:
        for v in (value, value.replace("^", " "), value.replace("^", "_")):
            out |= {v, v.upper(), v.lower()}
    return {v for v in out if len(v) >= 6}


def _chunks(root: Path) -> list[tuple[str, bytes]]:
    """Every byte under root but the private folders: files, and every tar member's name,
    payload and pax header."""
    chunks = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if "private" in path.relative_to(root).parts:
            continue
        chunks.append((str(path), path.read_bytes()))
        if path.suffix == ".npz":  # compressed arrays (the feature cache): their decoded values
            with np.load(path, allow_pickle=False) as npz:
                for name in npz.files:
                    values = npz[name]
                    text = "\n".join(map(str, values.ravel())) if values.dtype.kind == "U" else ""
                    chunks.append((f"{path}/{name}", values.tobytes() + text.encode()))
        if path.suffix == ".tar":
            with tarfile.open(path) as tf:
                for member in tf:
                    data = tf.extractfile(member).read() if member.isfile() else b""
                    pax = repr(member.pax_headers).encode()
                    chunks.append((f"{path}/{member.name}", member.name.encode() + data + pax))
    return chunks


def _hits(data: bytes, phi: set[str]) -> list[str]:
    without_hex = HEX_RUN.sub(b"#", data)
    return sorted(v for v in phi if v.encode() in (without_hex if v.isdigit() else data))


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    return proc


@pytest.fixture(scope="module")
def hospital(medssl_data, tmp_path_factory):
    """The PHI tree, and every value that must not leave it."""
    root = tmp_path_factory.mktemp("phi") / "hospital"
    phi: set[str] = {PATIENT, MRN, OTHER_PATIENT, OTHER_MRN, SALT}
    patient_dir = root / f"{PATIENT}_MRN{MRN}"
    for n, name in enumerate(SHARED):
        series = patient_dir / f"CT 2019 {PATIENT.split('^')[0]} visit{n}"
        dst = series / f"{PATIENT.replace('^', '_')}_{MRN}_{n}.dcm"
        phi |= _phi_file(medssl_data / "dicom" / name, dst, n, PATIENT, MRN)
        phi |= {series.name, dst.name, dst.stem}
    burned = root / f"{OTHER_PATIENT}_MRN{OTHER_MRN}" / f"US {OTHER_PATIENT}.dcm"
    phi |= _phi_file(
        medssl_data / "dicom" / "US1_UNCR.dcm", burned, 9, OTHER_PATIENT, OTHER_MRN, burned_in=True
    )
    phi |= {patient_dir.name, burned.parent.name, burned.name}
    # a whole-slide image named after the patient, in a folder named after the patient too
    from tests.slides import blank_slide, tissue_texture, write_pyramid

    slides = root.parent / f"slides {PATIENT.split('^')[0]} MRN{MRN}"
    slides.mkdir()
    slide = slides / f"{PATIENT.replace('^', '_')}_{MRN}_S24-0042.tif"
    level0 = blank_slide(1024, 1536)
    level0[256:768, 256:1280] = tissue_texture(medssl_data, 512, 1024)
    write_pyramid(slide, level0, 0.5, (1, 4))
    phi |= {slides.name, slide.name, slide.stem}
    # a labelled image folder named after the patient, evaluated in place (no ingest)
    labelled = root.parent / f"eval {PATIENT.split('^')[0]} MRN{MRN}"
    with np.load(medssl_data / "pneumoniamnist.npz") as npz:
        labels = npz["val_labels"][:, 0]
        rows = np.concatenate([np.flatnonzero(labels == c)[:12] for c in (0, 1)])
        images, labels = npz["val_images"][rows], labels[rows]
    for i, (image, label) in enumerate(zip(images, labels)):
        png = labelled / ("pneumonia" if label else "normal") / f"{PATIENT}_{MRN}_{i}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(png)
        phi |= {png.name, png.stem}
    phi.add(labelled.name)
    return root, phi, burned


@pytest.fixture(scope="module")
def pipeline_outputs(hospital, medssl_data, tmp_path_factory):
    """Ingest, curate, tile, preview, launch and eval, as a user would run them."""
    tree, _, _ = hospital
    work = tmp_path_factory.mktemp("work")
    out = work / "OUT"
    env = {**os.environ, "MEDSSL_PATIENT_SALT": SALT, "PYTHONPATH": str(REPO)}
    pneu = medssl_data / "pneumoniamnist.npz"
    labelled = next(p for p in tree.parent.iterdir() if p.name.startswith("eval "))
    streams = [
        _run(
            [
                "curation",
                "ingest",
                str(tree),
                f"{pneu}:val",
                "--out",
                str(out / "shards"),
                "--shard-size",
                "200",
            ],
            work,
            env,
        ),
        _run(
            [
                "curation",
                "run",
                f"pool={out / 'shards'}",
                f"output_dir={out / 'cur'}",
                f"eval_sets=[{pneu}:test,{labelled}]",
                "embed.groups=1",
            ],
            work,
            env,
        ),
        _run(
            [
                "curation",
                "tile",
                str(next(p for p in tree.parent.iterdir() if "slides" in p.name)),
                "--out",
                str(out / "tiles"),
                "tissue.mask_downsample=16",
            ],
            work,
            env,
        ),
        _run(
            [
                "launch",
                "tile",
                str(next(p for p in tree.parent.iterdir() if "slides" in p.name)),
                "--out",
                str(out / "launched_tiles"),
                "--cluster",
                "local",
                "tissue.mask_downsample=16",
                "progress=false",
            ],
            work,
            env,
        ),
        _run(["curation", "preview", str(out / "shards")], work, env),
        _run(["curation", "preview", str(out / "cur" / "curated")], work, env),
        _run(
            [
                "launch",
                "ingest",
                str(tree),
                "--out",
                str(out / "launched"),
                "--cluster",
                "local",
                "progress=false",
            ],
            work,
            env,
        ),
        _run(  # pretraining straight from the folder: its config and checkpoints hold a pseudonym
            [
                "launch",
                "pretrain",
                "--config",
                str(REPO / "pretrain" / "configs" / "simclr_cpu.yaml"),
                f"data.train={labelled}",
                f"output_dir={out / 'pretrain'}",
                "optim.max_steps=2",
                "data.batch_size=8",
                "model.arch=vit_tiny",  # one small block: the checkpoint stays small to search
                "model.depth=1",
                "model.patch_size=4",
                "model.img_size=16",
                "train.progress=false",
                "--cluster",
                "local",
            ],
            work,
            env,
        ),
        _run(  # the eval sets travel in the launcher's private arguments file
            [
                "launch",
                "curate",
                f"pool={out / 'shards'}",
                f"output_dir={out / 'launched_cur'}",
                f"eval_sets=[{pneu}:test,{labelled}]",
                "--embed-groups",
                "1",
                "--cluster",
                "local",
            ],
            work,
            env,
        ),
        _run(
            [
                "launch",
                "eval",
                "--backbone",
                "raw",
                "--protocol",
                "knn",
                "--train",
                str(labelled),
                "--test",
                f"{pneu}:test",
                "--out",
                str(out / "launched_eval"),
                "--cluster",
                "local",
                "raw_img_size=28",
            ],
            work,
            env,
        ),
        *(  # on the curated shards, and on an image folder named after the patient, in place
            _run(
                ["eval", protocol, "--backbone", "raw", "--train", str(train), "--test"]
                + [f"{pneu}:test", "--out", str(out / name), "raw_img_size=28", *extra],
                work,
                env,
            )
            for protocol, train, name, extra in (
                ("knn", out / "cur" / "curated", "eval", []),
                ("logreg", labelled, "eval_folder", ["--val", str(labelled)]),
            )
        ),
    ]
    return out, streams


def test_no_phi_in_any_byte_written(hospital, pipeline_outputs):
    _, phi, _ = hospital
    out, streams = pipeline_outputs
    searched = _variants(phi)
    assert {"DOE JOHN", "doe^john", "8047316259", "ZQCODE0050", "18880229"} <= searched
    assert _hits(b'{"k": "x DOE JOHN"}', searched) == ["DOE JOHN"]  # the search sees a leak
    assert _hits(b"a1b2c3d4e5f6a7b818880229a1b2c3d4", {"18880229"}) == []  # inside a hash
    chunks = _chunks(out)
    kinds = {Path(name.split(".tar/")[0]).suffix for name, _ in chunks}
    assert {
        ".tar",
        ".jsonl",
        ".json",
        ".yaml",
        ".png",
        ".md",
        ".html",
        ".pkl",
        ".npz",
        ".pt",
    } <= kinds
    assert any(name.endswith(".npz/keys") for name, _ in chunks)  # the feature cache's item names
    assert any("submitit" in name or "/launch/" in name for name, _ in chunks)
    leaks = {name: hits for name, data in chunks if (hits := _hits(data, searched))}
    assert leaks == {}
    for index, proc in enumerate(streams):
        assert _hits(proc.stdout + proc.stderr, searched) == [], index


def test_every_output_records_the_hash_of_the_config_saved_beside_it(pipeline_outputs):
    """Outputs save a config whose input paths are pseudonyms; their provenance must hash that
    file (`sha256sum config.yaml`), not the config the run read."""
    out, _ = pipeline_outputs
    checked = set()
    for doc in [*out.rglob("summary.json"), *out.rglob("metrics.json")]:
        record = json.loads(doc.read_text()).get("provenance")
        config = doc.parent / "config.yaml"
        if record and config.is_file():
            assert record["config_sha256"] == hashlib.sha256(config.read_bytes()).hexdigest(), doc
            checked.add(doc.parent.relative_to(out).as_posix())
    assert {"shards", "tiles", "cur", "eval", "eval_folder"} <= checked, checked
    # a pretraining run: its export and checkpoints record the hash of the run's config.yaml
    run = out / "pretrain"
    saved = hashlib.sha256((run / "config.yaml").read_bytes()).hexdigest()
    export = json.loads((run / "export" / "config.json").read_text())
    assert export["medssl"]["provenance"]["config_sha256"] == saved
    for checkpoint in (run / "checkpoints").glob("*.pt"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        assert state["provenance"]["config_sha256"] == saved
        assert state["config"]["data"]["train"].startswith("<path:")


def test_private_map_lists_every_input_and_only_its_owner_reads_it(hospital, pipeline_outputs):
    tree, _, _ = hospital
    out, _ = pipeline_outputs
    for shards in (out / "shards", out / "launched"):
        private = shards / "private" / "sources.jsonl"
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert stat.S_IMODE(private.parent.stat().st_mode) == 0o700
        paths = {json.loads(line)["path"] for line in private.read_text().splitlines()}
        assert {str(p) for p in tree.rglob("*.dcm")} <= paths
    keys = {json.loads(line)["key"] for line in (out / "shards" / "manifest.jsonl").open()}
    inputs = {
        json.loads(line).get("input")
        for line in (out / "shards" / "private" / "sources.jsonl").open()
    }
    records = [json.loads(line) for line in (out / "shards" / "manifest.jsonl").open()]
    assert {r["input"] for r in records} <= inputs and len(keys) == len(records)


def test_burned_in_annotation_rejected_with_that_reason(hospital, pipeline_outputs):
    _, _, burned = hospital
    out, _ = pipeline_outputs
    private = out / "shards" / "private" / "sources.jsonl"
    pseudonym = next(
        r["input"] for r in map(json.loads, private.open()) if r["path"] == str(burned)
    )
    reasons = {
        r["source"]: r["reason"]
        for r in map(json.loads, (out / "shards" / "rejected.jsonl").open())
    }
    assert "BurnedInAnnotation=YES" in reasons[pseudonym]
    # 5 PHI files (emri has 10 frames) + the 524 PneumoniaMNIST val images; the burned one is out.
    assert sum(1 for _ in (out / "shards" / "manifest.jsonl").open()) == 4 + 10 + 524


def _tree(root: Path, medssl_data: Path, files: dict[str, tuple[str, str]]) -> Path:
    """{relative path: (shared DICOM name, PatientID)}"""
    for rel, (name, patient_id) in files.items():
        ds = pydicom.dcmread(medssl_data / "dicom" / name)
        ds.PatientID = patient_id
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(root / rel)
    return root


def test_patient_decontamination_needs_one_site_key(medssl_data, tmp_path, monkeypatch, capsys):
    pool = _tree(
        tmp_path / "pool",
        medssl_data,
        {
            "a/1.dcm": ("CT_small.dcm", "PAT-ALPHA"),
            "a/2.dcm": ("MR_small.dcm", "PAT-ALPHA"),
            "b/1.dcm": ("MR2_UNCR.dcm", "PAT-BETA"),
            "b/2.dcm": ("JPEG2000_UNC.dcm", "PAT-GAMMA"),
        },
    )
    held_out = _tree(tmp_path / "held_out", medssl_data, {"x.dcm": ("emri_small.dcm", "PAT-ALPHA")})
    monkeypatch.setenv("MEDSSL_PATIENT_SALT", "one-site-key-for-both-0001")
    for src, out in ((pool, "pool_shards"), (held_out, "eval_shards")):
        assert (
            curation_main(["ingest", str(src), "--out", str(tmp_path / out), "progress=false"]) == 0
        )
    run = [
        "run",
        f"pool={tmp_path / 'pool_shards'}",
        f"eval_sets=[{tmp_path / 'eval_shards'}]",
        "progress=false",
        "embed.groups=1",
    ]
    assert curation_main([*run, f"output_dir={tmp_path / 'cur'}"]) == 0
    summary = json.loads((tmp_path / "cur" / "summary.json").read_text())
    assert summary["steps"]["decontam"]["removed_by"].get("patient") == 2  # PAT-ALPHA's two images
    curated = [json.loads(x) for x in (tmp_path / "cur" / "curated" / "manifest.jsonl").open()]
    assert len(curated) == 2

    monkeypatch.setenv("MEDSSL_PATIENT_SALT", "another-site-key-0002")
    other = tmp_path / "eval_other_key"
    assert curation_main(["ingest", str(held_out), "--out", str(other), "progress=false"]) == 0
    capsys.readouterr()
    code = curation_main(
        [*run[:2], f"eval_sets=[{other}]", *run[3:], f"output_dir={tmp_path / 'c2'}"]
    )
    err = capsys.readouterr().err
    fingerprints = {
        json.loads(next((d / "manifest.jsonl").open()))["key_fingerprint"]
        for d in (tmp_path / "pool_shards", other)
    }
    assert code == 2 and len(fingerprints) == 2
    assert all(fp in err for fp in fingerprints) and "different site keys" in err
    # A re-run of an ingest with another key is refused too, naming both fingerprints.
    assert (
        curation_main(
            ["ingest", str(pool), "--out", str(tmp_path / "pool_shards"), "progress=false"]
        )
        == 2
    )
    assert "fingerprint" in capsys.readouterr().err


def test_site_key_file_rules(tmp_path, monkeypatch, capsys):
    from pretrain.privacy import PrivacyError, resolve_site_key, user_key_path

    monkeypatch.delenv("MEDSSL_PATIENT_SALT", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    first = resolve_site_key()
    assert user_key_path() == tmp_path / "cfg" / "medssl" / "site_key"
    assert stat.S_IMODE(user_key_path().stat().st_mode) == 0o600
    assert resolve_site_key().fingerprint() == first.fingerprint()  # made once, then reused
    assert user_key_path().read_text().strip() not in repr(first)
    key = tmp_path / "site.key"
    key.write_text("a shared key for every machine of the site\n")
    key.chmod(0o644)
    with pytest.raises(PrivacyError, match="readable by others"):
        resolve_site_key(key)
    key.chmod(0o600)
    assert resolve_site_key(key).fingerprint() != first.fingerprint()
    with pytest.raises(PrivacyError, match="inside the output folder"):
        resolve_site_key(key, out=tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    assert (
        curation_main(["ingest", str(src), "--out", str(tmp_path / "o"), "patient_salt=abc"]) == 2
    )
    assert "not taken on the command line" in capsys.readouterr().err


def test_links_are_named_and_transient_rejections_retried(medssl_data, tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "real").mkdir(parents=True)
    shutil.copy(medssl_data / "dicom" / "CT_small.dcm", src / "real" / "ct.dcm")
    (src / "linked_folder").symlink_to(src / "real", target_is_directory=True)
    (src / "loop").symlink_to(src / "loop")
    (src / "dangling").symlink_to(src / "gone.dcm")
    locked = src / "locked.dcm"
    shutil.copy(medssl_data / "dicom" / "MR_small.dcm", locked)
    out = tmp_path / "out"
    args = [
        "ingest",
        str(src),
        "--out",
        str(out),
        "--workers",
        "1",
        "progress=false",
        "sources=keep",
    ]

    import curation.ingest as ingest

    real_read = ingest.readers.read_image_file

    def fails_once(path, **kw):  # a file server that was away during the first run
        if Path(path) == locked and not (tmp_path / "served").exists():
            raise PermissionError(13, "Permission denied")
        return real_read(path, **kw)

    monkeypatch.setattr(ingest.readers, "read_image_file", fails_once)
    assert curation_main(args) == 0
    reasons = {r["source"]: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").open())}
    assert reasons == {
        "src/linked_folder": reasons["src/linked_folder"],
        "src/loop": "symbolic link loop",
        "src/dangling": reasons["src/dangling"],
        "src/locked.dcm": "cannot open: Permission denied",
    }
    assert "symbolic link to a folder" in reasons["src/linked_folder"]
    assert "cannot open" in reasons["src/dangling"]
    (tmp_path / "served").touch()
    assert curation_main(args) == 0
    sources = [json.loads(x)["source"] for x in (out / "manifest.jsonl").open()]
    # retried by redoing its block: in its planned place, as a run without the outage gives
    assert sources == ["src/locked.dcm", "src/real/ct.dcm"]
    assert "src/locked.dcm" not in {
        json.loads(x)["source"] for x in (out / "rejected.jsonl").open()
    }


def test_overlay_bits_never_reach_pixels(medssl_data, tmp_path):
    from pretrain.data.readers import read_image_file

    ds = pydicom.dcmread(medssl_data / "dicom" / "MR2_UNCR.dcm")  # BitsStored 12 of 16
    clean = ds.pixel_array.copy()
    assert ds.BitsStored == 12 and clean.max() < 4096
    ds.PixelData = (clean | 0xA000).astype("<u2").tobytes()  # an overlay plane in bits 13 and 15
    ds.save_as(tmp_path / "overlay.dcm")
    np.testing.assert_array_equal(read_image_file(tmp_path / "overlay.dcm")[0].pixels, clean)


def test_burned_in_policies(medssl_data, tmp_path):
    from pretrain.data.readers import UnreadableImageError, read_image_file

    ds = pydicom.dcmread(medssl_data / "dicom" / "US1_UNCR.dcm")
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "us.dcm")
    with pytest.raises(UnreadableImageError, match="BurnedInAnnotation=YES"):
        read_image_file(tmp_path / "us.dcm")
    kept = read_image_file(tmp_path / "us.dcm", burned_in="keep")[0]
    np.testing.assert_array_equal(kept.pixels, ds.pixel_array)
    with pytest.raises(UnreadableImageError, match="cannot be masked"):
        read_image_file(tmp_path / "us.dcm", burned_in="mask")  # no deid rule for this device
    # A device and series deid's rules know (GE LightSpeed VCT localizer): its text box, found
    # by asking deid, is blacked out and every other pixel kept.
    ct = pydicom.dcmread(medssl_data / "dicom" / "CT_small.dcm")
    ct.ManufacturerModelName, ct.ImageType = "LightSpeed VCT", ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ct.save_as(tmp_path / "known.dcm")
    from deid.dicom.pixels import has_burned_pixels

    found = has_burned_pixels(ct)["results"]
    boxes = [c for r in found for keep, c in r["coordinates"] if str(keep) == "0"]
    assert len(boxes) == 1
    x0, y0, x1, y1 = (int(v) for v in boxes[0].split(","))
    masked = read_image_file(tmp_path / "known.dcm", burned_in="mask")[0]
    assert masked.record["pixel"]["burned_in_masked"] is True
    stored = ct.pixel_array
    band = masked.pixels[y0:y1, x0:x1]
    assert band.size > 1000 and (band == stored.min()).all()
    outside = np.ones(stored.shape, bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(masked.pixels[outside], stored[outside])
    assert not (stored[y0:y1, x0:x1] == stored.min()).all()  # the box held image content before
