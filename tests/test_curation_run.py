"""`curation run` end to end on real images: copies, contaminants and patients leave the pool, a kill
after embedding resumes without embedding again, seeds retrieve their modality, outputs are complete."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from curation.embed import Encoder
from curation.plant import MEDMNIST_MODALITY, medmnist, record_for, write_shards
from curation.run import DEFAULT_CONFIG, run_pipeline
from curation.steps import TEST_EXIT_ENV
from pretrain.config import ConfigError, load_config
from pretrain.data.datasets import open_dataset
from pretrain.data.shards import iter_shard_records
from tests.test_curation_dedup import copies_of

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(medssl_data, tmp_path_factory):
    """A 3-shard pool: 150 X-rays, 40 ultrasounds, 40 fundi, 14 planted copies, one pixel-identical
    copy, 3 eval copies and one image of an eval patient; an eval set of 20 X-rays; a seed set of 30
    X-rays."""
    root = tmp_path_factory.mktemp("curation")
    rng = np.random.default_rng(0)
    items = []
    for name, n in (("pneumoniamnist", 150), ("breastmnist", 40), ("retinamnist", 40)):
        for i, px in enumerate(medmnist(medssl_data, name, "train", n, seed=7)):
            key = f"{name[:5]}-{i:03d}"
            items.append((key, px, record_for(key, px, MEDMNIST_MODALITY[name])))
    planted = []
    for j in range(14):  # every kind of copy twice, of X-rays, ultrasounds and fundi
        key, px, rec = items[[0, 40, 80, 120, 160, 200, 215][j % 7] + j // 7]
        copy = list(copies_of(px).values())[j % 7]
        items.append((f"copy-{j:02d}", copy, record_for(f"copy-{j:02d}", copy, rec["modality"])))
        planted.append((key, f"copy-{j:02d}"))
    key, px, rec = items[10]  # and one pixel-identical copy
    items.append(("copy-exact", px.copy(), record_for("copy-exact", px, rec["modality"])))
    planted.append((key, "copy-exact"))
    evals = medmnist(medssl_data, "pneumoniamnist", "test", 20, seed=7)
    eval_items = [
        (
            f"eval-{i:02d}",
            px,
            record_for(f"eval-{i:02d}", px, "CR", patient="pt-9" if i == 5 else None),
        )
        for i, px in enumerate(evals)
    ]
    contaminants = {
        "leak-exact": evals[0],
        "leak-crop": copies_of(evals[1])["crop_resize"],
        "leak-jpeg": copies_of(evals[2])["jpeg"],
    }
    for key, px in contaminants.items():
        items.append((key, px, record_for(key, px, "CR")))
    items[3] = (items[3][0], items[3][1], {**items[3][2], "patient": "pt-9"})
    order = rng.permutation(len(items))
    write_shards(root / "pool", [items[i] for i in order], shard_size=100)
    write_shards(root / "eval", eval_items)
    seeds = medmnist(medssl_data, "pneumoniamnist", "val", 30, seed=7)
    write_shards(
        root / "seeds",
        [(f"seed-{i}", px, record_for(f"seed-{i}", px, "CR")) for i, px in enumerate(seeds)],
    )
    return {
        "root": root,
        "items": items,
        "planted": planted,
        "leaks": list(contaminants),
        "patient_key": items[3][0],
    }


def _overrides(data: dict, out: Path, *extra: str) -> list[str]:
    r = data["root"]
    return [
        f"pool={r / 'pool'}",
        f"output_dir={out}",
        f"eval_sets=[{r / 'eval'}]",
        "progress=false",
        "embed.shards_per_job=1",
        *extra,
    ]


def _curated(out: Path) -> dict[str, dict]:
    return {
        rec["key"]: rec
        for rec in map(json.loads, (out / "curated" / "manifest.jsonl").read_text().splitlines())
    }


def test_kill_after_embed_resumes_without_embedding_again(data, monkeypatch):
    out = data["root"] / "run-auto"
    env = {**os.environ, TEST_EXIT_ENV: "embed", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "curation.run", *_overrides(data, out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert (out / "steps" / "embed.json").is_file() and not (out / "steps" / "exact.json").exists()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "embed").rglob("*.npy")}
    assert len(list((out / "embed" / "pool" / "groups").iterdir())) == 3  # one job per shard

    def no_embedding(*args, **kwargs):
        raise AssertionError("embedded again after resume")

    monkeypatch.setattr(Encoder, "encode", no_embedding)
    summary = run_pipeline(load_config(DEFAULT_CONFIG, None, _overrides(data, out)))
    assert {p: p.stat().st_mtime_ns for p in (out / "embed").rglob("*.npy")} == mtimes
    steps = summary["steps"]
    assert steps["embed"]["cached"] and not steps["near"]["cached"]
    assert steps["embed"]["in"] == len(data["items"])
    twins: dict[bytes, int] = {}  # pixel-identical groups, counted here from the pixels
    for _, px, _ in data["items"]:
        digest = hashlib.sha256(px.tobytes() + str(px.shape).encode()).digest()
        twins[digest] = twins.get(digest, 0) + 1
    assert steps["exact"]["groups"] == sum(c > 1 for c in twins.values()) >= 1
    assert steps["near"]["groups"] >= len(data["planted"]) - 2

    curated = _curated(out)
    for original, copy in data["planted"]:  # exactly one of each planted pair survives
        assert (original in curated) + (copy in curated) == 1, (original, copy)
    for leak in (*data["leaks"], data["patient_key"]):
        assert leak not in curated
    removed = json.loads((out / "steps" / "decontam.json").read_text())["data"]["removed"]
    reasons = {v["reason"] for v in removed.values()}
    assert {"exact", "copy", "patient"} <= reasons
    xrays = [k for k, _, r in data["items"] if r["modality"] == "CR" and k.startswith("pneum")]
    involved = {k for pair in data["planted"] for k in pair} | {data["patient_key"]}
    unique = [k for k in xrays if k not in involved]
    assert sum(k not in curated for k in unique) <= 0.02 * len(unique)
    assert summary["curated"] == len(curated) == steps["write"]["out"]
    assert all(rec["curation"]["reason"] == "kept" for rec in curated.values())

    # curated shards: source keys and pixels kept, records carry the reason
    ds = open_dataset(str(out / "curated"))
    pool = open_dataset(str(data["root"] / "pool"))
    pool_index = {k: i for i, k in enumerate(pool.keys)}
    for i in range(0, len(ds), 37):
        px, rec = ds.load(i)
        assert np.array_equal(px, pool.load(pool_index[ds.keys[i]])[0])
        assert "leaf_cluster" in rec["curation"]
    shard_records = [
        r for p in sorted((out / "curated").glob("*.tar")) for r in iter_shard_records(p)
    ]
    assert [r["key"] for r in shard_records] == list(curated)

    report = (out / "report.html").read_text()
    for name in ("similarity", "clusters", "duplicates", "contaminants", "cluster_examples"):
        assert (out / "report" / f"{name}.png").is_file() and f"report/{name}.png" in report
    saved = json.loads((out / "summary.json").read_text())
    defaults = OmegaConf.load(DEFAULT_CONFIG)
    assert saved["steps"]["near"]["threshold"] == defaults.dedup.threshold
    assert saved["steps"]["decontam"]["threshold"] == defaults.decontaminate.threshold
    assert "seconds" in saved["steps"]["decontam"]
    # provenance: the pool's manifest by sha256, the saved config by sha256, no path
    pool_manifest = data["root"] / "pool" / "manifest.jsonl"
    prov = saved["provenance"]
    assert (
        prov["inputs"][0]["manifest_sha256"]
        == hashlib.sha256(pool_manifest.read_bytes()).hexdigest()
    )
    assert str(data["root"]) not in json.dumps(prov)
    saved_config = (out / "config.yaml").read_bytes()  # `sha256sum config.yaml` checks it
    assert prov["config_sha256"] == hashlib.sha256(saved_config).hexdigest()
    assert str(data["root"] / "pool").encode() not in saved_config

    again = run_pipeline(load_config(DEFAULT_CONFIG, None, _overrides(data, out)))  # all cached
    assert all(s["cached"] for s in again["steps"].values())
    changed = run_pipeline(
        load_config(DEFAULT_CONFIG, None, _overrides(data, out, "sample.target_size=100"))
    )
    assert changed["steps"]["near"]["cached"] and not changed["steps"]["select"]["cached"]
    assert changed["curated"] == 100


def test_seeds_retrieve_their_modality_and_groups_embed_alone(data):
    out = data["root"] / "run-seeds"
    cfg = load_config(
        DEFAULT_CONFIG,
        None,
        _overrides(
            data,
            out,
            f"seeds=[{data['root'] / 'seeds'}]",
            "retrieve.n_clusters=8",
            "retrieve.per_cluster=40",
        ),
    )
    run_pipeline(cfg, only_group=1)  # what one SLURM array task does
    groups = out / "embed" / "pool" / "groups"
    assert sorted(p.name for p in groups.iterdir()) == ["group-000001"]
    summary = run_pipeline(cfg)
    curated = _curated(out)
    modality = {k: r["modality"] for k, _, r in data["items"]}
    precision = np.mean([modality[k] == "CR" for k in curated])
    assert len(curated) >= 60 and precision >= 0.9, (len(curated), precision)
    assert summary["steps"]["select"]["mode"] == "retrieval"
    why = {r["curation"]["reason"] for r in curated.values()}
    assert why <= {"seed-knn", "seed-cluster"} and "seed-knn" in why
    knn = [r["curation"] for r in curated.values() if r["curation"]["reason"] == "seed-knn"]
    assert all(c["seed"].startswith("seed-") and -1 <= c["similarity"] <= 1 for c in knn)
    assert (out / "report" / "retrieval.png").is_file()


def test_config_refuses_unknown_keys_and_missing_pool(tmp_path):
    with pytest.raises(ConfigError, match="dedup.treshold"):
        load_config(
            DEFAULT_CONFIG, None, ["pool=x", f"output_dir={tmp_path}", "dedup.treshold=0.9"]
        )
    with pytest.raises(ConfigError, match="pool"):
        load_config(DEFAULT_CONFIG, None, [f"output_dir={tmp_path}"])


def test_array_tasks_embed_their_group_and_global_job_refuses_missing_ones(data, capsys):
    """The SLURM-array contract (launch/curate.py): `--step embed --group G` with embed.groups=N
    embeds contiguous chunk G of the sorted shards only; `--step global` merges the N groups and
    runs every later step, refusing, with the missing group named, until all are there."""
    from curation.__main__ import main

    out = data["root"] / "run-array"
    args = ["run", *_overrides(data, out, "embed.groups=2")]
    assert main([*args, "--list-groups"]) == 0 and capsys.readouterr().out.strip() == "2"
    assert main([*args, "--step", "embed", "--group", "1"]) == 0
    assert main([*args, "--step", "global"]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 embed group(s) missing" in err and "group 0;" in err and "--group G" in err
    assert not (out / "curated").exists()
    groups = out / "embed" / "pool" / "groups"
    done = json.loads((groups / "group-000001" / "DONE.json").read_text())
    shards = sorted(str(p) for p in (data["root"] / "pool").glob("shard-*.tar"))
    assert len(shards) == 3 and done["shards"] == shards[1:]  # chunk 1 of 2: shards 1..2
    assert done["n"] == 100 + (len(data["items"]) - 200)
    assert main([*args, "--step", "embed", "--group", "2"]) == 2
    assert "--group 2 outside 0..1" in capsys.readouterr().err
    assert main([*args, "--step", "embed", "--group", "0"]) == 0
    assert sorted(p.name for p in groups.iterdir()) == ["group-000000", "group-000001"]
    assert main([*args, "--step", "global"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["curated"] > 0
    curated = _curated(out)
    for original, copy in data["planted"]:
        assert (original in curated) + (copy in curated) == 1, (original, copy)
    assert not set(data["leaks"]) & set(curated)
    # Other embed settings -> the groups no longer fit: refused, not silently mixed.
    assert main([*args, "embed.window=minmax", "--step", "global"]) == 2
    assert (
        "2 of 2 embed group(s) missing or embedded with other settings" in capsys.readouterr().err
    )


def test_global_array_tasks_give_the_single_process_result(data, capsys):
    """global_tasks=3: `--step near --task I`, then `--step decontam --task I`, then `--step global`
    keep exactly the images, pairs and clusters of one process; missing parts are named."""
    from curation.__main__ import main

    def steps_of(out: Path) -> dict:
        return {n: np.load(out / "steps" / f"{n}.npz") for n in ("near", "decontam", "select")}

    one = data["root"] / "run-one"
    extra = ("sample.target_size=150", "balance.n_clusters=[20,4]")
    assert main(["run", *_overrides(data, one, *extra)]) == 0
    out = data["root"] / "run-tasks"
    args = ["run", *_overrides(data, out, *extra, "global_tasks=3")]
    assert main([*args, "--step", "embed"]) == 0  # (or an embed array, as launch queues it)
    for task in (2, 0):
        assert main([*args, "--step", "near", "--task", str(task)]) == 0
    assert main([*args, "--step", "decontam", "--task", "0"]) == 2  # needs every near part
    err = capsys.readouterr().err
    assert "step near: 1 of 3 array part(s) missing" in err and "(task 1;" in err
    assert main([*args, "--step", "near", "--task", "1"]) == 0
    assert main([*args, "--step", "global"]) == 2
    assert "step decontam: 3 of 3 array part(s) missing" in capsys.readouterr().err
    for task in (1, 2, 0):
        assert main([*args, "--step", "decontam", "--task", str(task)]) == 0
    assert main([*args, "--step", "global"]) == 0
    assert _curated(out).keys() == _curated(one).keys()
    got, want = steps_of(out), steps_of(one)
    for name in ("near", "decontam"):
        for field in ("keep", "a", "local"):
            np.testing.assert_array_equal(got[name][field], want[name][field])
    np.testing.assert_array_equal(got["near"]["b"], want["near"]["b"])
    for field in ("rows", "candidate_leaf"):
        np.testing.assert_array_equal(got["select"][field], want["select"][field])
    summary = json.loads((out / "summary.json").read_text())["steps"]
    assert summary["near"]["tasks"] == summary["decontam"]["tasks"] == 3
    assert summary["near"]["edges"] >= len(data["planted"]) - 2
    assert main([*args, "--step", "near"]) == 2 and main([*args, "--task", "0"]) == 2


def test_group_count_fixes_contiguous_chunks_even_beyond_the_shards(tmp_path, medssl_data):
    from curation.embed import dataset_groups, embed_group, load_embedded

    write_shards(
        tmp_path / "pool",
        [
            (f"k{i}", px, record_for(f"k{i}", px, "CR"))
            for i, px in enumerate(medmnist(medssl_data, "pneumoniamnist", "val", 9))
        ],
        shard_size=3,
    )
    shards = sorted((tmp_path / "pool").glob("shard-*.tar"))
    got = dataset_groups(str(tmp_path / "pool"), shards_per_job=8, groups=5)
    assert [list(g.shards) for g in got] == [[], [shards[0]], [], [shards[1]], [shards[2]]]
    assert [list(g.shards) for g in dataset_groups(str(tmp_path / "pool"), 2)] == [
        shards[:2],
        shards[2:],
    ]
    empty = load_embedded(embed_group(got[0], tmp_path / "g0", Encoder(), progress=False))
    assert len(empty) == 0 and empty.embeddings.shape == (0, Encoder.dim)


def test_array_tasks_refuse_to_train_the_bootstrap_model_themselves(tmp_path, capsys):
    """N array tasks training the bootstrap model at once would race: `--step bootstrap` does it once."""
    from curation.__main__ import main

    args = [
        "run",
        f"pool={tmp_path / 'pool'}",
        f"output_dir={tmp_path / 'out'}",
        "bootstrap.enabled=true",
    ]
    assert main([*args, "--step", "embed", "--group", "0"]) == 2
    assert (
        "run `python -m curation run ... --step bootstrap` before the embed jobs"
        in capsys.readouterr().err
    )
    assert main([*args, "--step", "global"]) == 2
    assert "--step bootstrap" in capsys.readouterr().err
    assert main([*args[:-1], "--step", "bootstrap"]) == 2
    assert "--step bootstrap needs bootstrap.enabled=true" in capsys.readouterr().err
