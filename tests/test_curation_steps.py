"""Curation steps are keyed on content: a pool rewritten in place under the same path recomputes
every step, an unchanged rerun recomputes none, a changed setting recomputes what is downstream
of it and the log says why."""

from __future__ import annotations

import doctest
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

import curation.steps
from curation.embed import Encoder
from curation.plant import medmnist, record_for, write_shards
from curation.run import DEFAULT_CONFIG, run_pipeline
from curation.steps import ContentHashes
from pretrain.config import load_config

STEPS = ("embed", "exact", "near", "decontam", "select", "write")


def _items(px_list: list[np.ndarray], prefix: str) -> list[tuple[str, np.ndarray, dict]]:
    return [
        (f"{prefix}-{i:03d}", px, record_for(f"{prefix}-{i:03d}", px, "CR"))
        for i, px in enumerate(px_list)
    ]


def _run(root: Path, *extra: str) -> dict:
    overrides = [
        f"pool={root / 'pool'}",
        f"output_dir={root / 'out'}",
        f"eval_sets=[{root / 'eval'}]",
        "progress=false",
        "embed.shards_per_job=1",
        *extra,
    ]
    return run_pipeline(load_config(DEFAULT_CONFIG, None, overrides))


def _curated_keys(root: Path) -> set[str]:
    lines = (root / "out" / "curated" / "manifest.jsonl").read_text().splitlines()
    return {json.loads(line)["key"] for line in lines}


def test_pool_rewritten_in_place_recomputes_every_step_and_an_unchanged_rerun_none(
    medssl_data, tmp_path, monkeypatch
):
    xrays = medmnist(medssl_data, "pneumoniamnist", "train", 55, seed=3)
    first = _items(xrays[:50], "a")
    write_shards(tmp_path / "pool", first, shard_size=20)
    write_shards(
        tmp_path / "eval", _items(medmnist(medssl_data, "pneumoniamnist", "test", 10), "e")
    )

    summary = _run(tmp_path)
    assert [summary["steps"][s]["cached"] for s in STEPS] == [False] * len(STEPS)
    assert (
        summary["steps"]["exact"]["groups"] == 0
        and len(_curated_keys(tmp_path)) == summary["curated"]
    )

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded again though nothing changed")

    with monkeypatch.context() as m:  # unchanged: every step is read back, nothing is embedded
        m.setattr(Encoder, "encode", no_embedding)
        again = _run(tmp_path)
    assert [again["steps"][s]["cached"] for s in STEPS] == [True] * len(STEPS)
    assert again["curated"] == summary["curated"]

    # the same folder and shard names, new content: 5 new X-rays and exact copies of 5 old ones
    copies = [
        (f"dup-{i}", px, record_for(f"dup-{i}", px, "CR")) for i, (_, px, _) in enumerate(first[:5])
    ]
    rewritten = first + _items(xrays[50:], "b") + copies
    names = sorted(p.name for p in (tmp_path / "pool").glob("*.tar"))
    write_shards(tmp_path / "pool", rewritten, shard_size=20)
    assert sorted(p.name for p in (tmp_path / "pool").glob("*.tar"))[: len(names)] == names
    third = _run(tmp_path)
    assert [third["steps"][s]["cached"] for s in STEPS] == [False] * len(STEPS)
    assert third["steps"]["embed"]["in"] == 60 and third["steps"]["exact"]["groups"] == 5
    curated = _curated_keys(tmp_path)
    assert {f"b-{i:03d}" for i in range(5)} <= curated  # the new images are curated ...
    for i in range(5):  # ... and of each exact pair one is kept
        assert (f"a-{i:03d}" in curated) + (f"dup-{i}" in curated) == 1


def test_changed_setting_recomputes_downstream_only_and_says_which(medssl_data, tmp_path, caplog):
    write_shards(
        tmp_path / "pool", _items(medmnist(medssl_data, "pneumoniamnist", "train", 40, seed=4), "a")
    )
    write_shards(tmp_path / "eval", _items(medmnist(medssl_data, "pneumoniamnist", "test", 5), "e"))
    _run(tmp_path)
    with caplog.at_level(logging.INFO, logger="curation.steps"):
        summary = _run(tmp_path, "dedup.threshold=0.97")
    cached = {s: summary["steps"][s]["cached"] for s in STEPS}
    assert cached == {
        "embed": True,
        "exact": True,
        "near": False,
        "decontam": False,
        "select": False,
        "write": False,
    }
    assert "step near: recomputing: settings changed: dedup.threshold" in caplog.text
    assert "step decontam: recomputing: step near changed" in caplog.text

    caplog.clear()  # an eval set rewritten in place: decontamination and what follows run again
    write_shards(tmp_path / "eval", _items(medmnist(medssl_data, "pneumoniamnist", "test", 6), "e"))
    with caplog.at_level(logging.INFO, logger="curation.steps"):
        summary = _run(tmp_path, "dedup.threshold=0.97")
    assert summary["steps"]["near"]["cached"] and not summary["steps"]["decontam"]["cached"]
    assert "step decontam: recomputing: eval sets changed" in caplog.text


def test_file_hashes_follow_content_not_names_or_times(tmp_path):
    data = tmp_path / "a.bin"
    data.write_bytes(b"pixels" * 1000)
    hashes = ContentHashes(tmp_path / "hashes.json")
    assert hashes.file(data) == hashlib.sha256(b"pixels" * 1000).hexdigest()
    os.utime(data, ns=(1, 1))  # touched: hashed again, same value
    assert hashes.file(data) == hashlib.sha256(b"pixels" * 1000).hexdigest()
    data.write_bytes(b"PIXELS" * 1000)  # same size, new content
    assert hashes.file(data) == hashlib.sha256(b"PIXELS" * 1000).hexdigest()
    hashes.save()
    reread = ContentHashes(tmp_path / "hashes.json")  # remembered: not read again
    # remembered under the file's keyed pseudonym, never its path
    assert str(tmp_path) not in (tmp_path / "hashes.json").read_text()
    (entry,) = reread.known.values()
    assert entry[2] == hashlib.sha256(b"PIXELS" * 1000).hexdigest()


def test_an_unreadable_step_file_is_recomputed_not_trusted(medssl_data, tmp_path, caplog):
    write_shards(
        tmp_path / "pool", _items(medmnist(medssl_data, "pneumoniamnist", "train", 30, seed=5), "a")
    )
    write_shards(tmp_path / "eval", _items(medmnist(medssl_data, "pneumoniamnist", "test", 5), "e"))
    _run(tmp_path)
    (tmp_path / "out" / "steps" / "near.json").write_text('{"key": ')  # torn by a full disk
    with caplog.at_level(logging.WARNING, logger="curation.steps"):
        summary = _run(tmp_path)
    assert not summary["steps"]["near"]["cached"] and summary["steps"]["exact"]["cached"]
    assert "near.json unreadable" in caplog.text


def test_docstring_examples_run():
    assert doctest.testmod(curation.steps).failed == 0
