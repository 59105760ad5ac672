"""Share-ready artifacts: the export is a timm / Hub model folder with a model card, every output
records its provenance, trackers mirror the metrics, and foreign backbones load by timm name or
folder for side-by-side evaluation."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf

from eval.__main__ import main as eval_main
from launch.results import gather_eval_table
from pretrain.__main__ import main as pretrain_main
from pretrain.backbones import BackboneError, build_backbone, load_backbone
from pretrain.init_from import open_backbone
from pretrain.privacy import SiteKey
from pretrain.provenance import pseudonymised_command
from pretrain.trackers import Trackers

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "pretrain" / "configs" / "dinov2_cpu.yaml"
QUIET = ["train.progress=false", "monitor.plot=false"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pretrain(out: Path, data: str, *overrides: str) -> None:
    args = ["--config", str(RECIPE), f"data.train={data}", f"output_dir={out}", *QUIET, *overrides]
    assert pretrain_main(args) == 0


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, medssl_data) -> Path:
    """`python -m pretrain ... optim.max_steps=0 output_dir=R` on BreastMNIST train."""
    out = tmp_path_factory.mktemp("share") / "R"
    _pretrain(out, f"{medssl_data / 'breastmnist.npz'}:train", "optim.max_steps=0")
    return out


def test_export_loads_by_local_dir_in_a_fresh_python_with_the_loaders_outputs(untrained):
    export = untrained / "export"
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model, _ = load_backbone(export)
    with torch.no_grad():
        ours = model(x).numpy()
    np.save(untrained / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np, timm, torch\n"
        "m = timm.create_model(f'local-dir:{sys.argv[1]}', pretrained=True).eval()\n"
        "x = torch.from_numpy(np.load(sys.argv[2]))\n"
        "with torch.no_grad():\n"
        "    np.save(sys.argv[3], m(x).numpy())\n"
    )
    out = untrained / "timm_out.npy"
    subprocess.run(
        [sys.executable, "-c", script, str(export), str(untrained / "x.npy"), str(out)],
        check=True,
        cwd=untrained,  # not the repository: nothing of this project is importable by accident
    )
    np.testing.assert_array_equal(np.load(out), ours)
    assert sorted(p.name for p in export.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


def test_model_card_has_front_matter_and_the_manifest_sha256(untrained, medssl_data):
    card = (untrained / "export" / "README.md").read_text()
    front = card.split("---\n")[1]
    meta = OmegaConf.create(front)
    assert meta.library_name == "timm" and meta.license == "other"
    assert meta.pipeline_tag == "image-feature-extraction" and "dinov2" in meta.tags
    assert _sha256(medssl_data / "breastmnist.npz") in card
    assert "images: 546" in card  # BreastMNIST train split
    assert "not for clinical use" in card


def test_provenance_is_recorded_without_paths(untrained, medssl_data):
    config = json.loads((untrained / "export" / "config.json").read_text())
    prov = config["medssl"]["provenance"]
    assert prov["config_sha256"] == _sha256(untrained / "config.yaml")
    assert prov["inputs"][0]["manifest_sha256"] == _sha256(medssl_data / "breastmnist.npz")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert prov["code"]["git_commit"] == head.stdout.strip()
    assert prov["code"]["version"] and isinstance(prov["code"]["git_dirty"], bool)
    # no path of the run: neither the data's folder nor the output's, in any exported byte
    for path in (untrained / "export").iterdir():
        blob = path.read_bytes()
        for secret in (str(medssl_data), str(untrained), "breastmnist"):
            assert secret.encode() not in blob, (path.name, secret)
    # the run folder names its data by pseudonym; the path as given is in an owner-only copy
    saved = OmegaConf.load(untrained / "config.yaml")
    assert saved.data.train.startswith("<path:") and str(medssl_data) not in str(saved)
    private = untrained / "private" / "config.yaml"
    assert OmegaConf.load(private).data.train == f"{medssl_data / 'breastmnist.npz'}:train"
    assert private.stat().st_mode & 0o077 == 0


def test_pseudonymised_command_hides_every_path_and_keeps_the_rest():
    site = SiteKey(b"a test key of enough bytes", "test")
    argv = [
        "/usr/lib/python3/site-packages/pretrain/__main__.py",
        "--config",
        "/data/DOE^JOHN/recipe.yaml",
        "data.train=/data/DOE^JOHN/scans.npz:train",
        "optim.max_steps=10",
        "./relative/out",
        "eval_sets=[/data/SMITH^ANNA/test.npz:test,/data/eval MRN5550192837]",
    ]
    text = pseudonymised_command(argv, site)
    assert "DOE" not in text and "relative" not in text and "scans" not in text
    assert "SMITH" not in text and "5550192837" not in text
    assert "eval_sets=[<path:" in text and ":test,<path:" in text  # each list item on its own
    assert text.startswith("python -m pretrain --config '<path:")
    assert "optim.max_steps=10" in text and ":train" in text
    same = pseudonymised_command(argv, site)
    assert same == text  # one path, one pseudonym: outputs stay comparable


def test_eval_names_the_backbone_and_warns_when_test_images_were_pretrained_on(
    untrained, medssl_data, tmp_path
):
    data = medssl_data / "breastmnist.npz"
    common = [
        "--backbone",
        str(untrained / "export"),
        "knn.ks=[5]",
        "knn.default_k=5",
        "raw_baseline=[]",
    ]
    assert eval_main(["knn", *common, "--train", f"{data}:val", "--test", f"{data}:train",
                      "--out", str(tmp_path / "leak")]) == 0  # fmt: skip
    doc = json.loads((tmp_path / "leak" / "metrics.json").read_text())
    assert doc["backbone"]["pretraining_manifests"] == [_sha256(data)]
    assert (
        doc["backbone"]["git_commit"]
        == (
            json.loads((untrained / "export" / "config.json").read_text())["medssl"]["provenance"][
                "code"
            ]["git_commit"]
        )
    )
    assert doc["pretraining_overlap"]["test"] == 546  # every train image is in the pretraining set
    assert "WARNING: eval images appear" in (tmp_path / "leak" / "report.md").read_text()

    assert eval_main(["knn", *common, "--train", f"{data}:train", "--test", f"{data}:test",
                      "--out", str(tmp_path / "clean")]) == 0  # fmt: skip
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    # BreastMNIST's own splits share pixel-identical images: count them independently
    with np.load(data) as npz:
        train = {img.tobytes() for img in npz["train_images"]}
        shared = sum(img.tobytes() in train for img in npz["test_images"])
    assert clean["pretraining_overlap"] == {
        "checked": True,
        "reason": "",
        "manifest_sha256": _sha256(data),
        "test": shared,
    }

    # launch pipeline's gather job puts the evaluation table into the model card
    cell = {"out": str(tmp_path / "clean"), "label": "ours", "protocol": "knn"}
    gather_eval_table(tmp_path / "table", [{**cell, "backbone": str(untrained)}])
    card = (untrained / "export" / "README.md").read_text()
    accuracy = clean["protocols"]["knn"]["settings"]["k=5"]["accuracy"]
    assert "## Evaluation" in card and f"| knn | k=5 | {accuracy:.4f} |" in card
    assert _sha256(data) in card  # the data section survives the rewrite


def test_tensorboard_events_hold_the_logged_losses(tmp_path, medssl_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _pretrain(
        out,
        f"{medssl_data / 'breastmnist.npz'}:train",
        "optim.max_steps=4",
        "optim.warmup_steps=1",
        "train.log_every=2",
        "data.batch_size=8",
        "dinov2.crops.local_crops_number=2",
        "logging.tensorboard=true",
    )
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if "loss" in r}
    assert sorted(losses) == [2, 4]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    read = {e.step: e.value for e in events.Scalars("loss")}
    assert read.keys() == losses.keys()
    for step, value in losses.items():
        assert read[step] == pytest.approx(value, rel=1e-6)


def test_wandb_offline_run_is_written_locally(tmp_path):
    trackers = Trackers(tmp_path, wandb=True, wandb_mode="offline", config={"lr": 0.1})
    trackers.log({"loss": 2.0}, step=1)
    trackers.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def _tiny_timm() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, in_chans=1, num_classes=5
    ).eval()


def test_timm_name_with_a_weights_file_and_a_timm_folder_load_strictly(tmp_path):
    from timm.models import save_for_hf

    reference = _tiny_timm()
    torch.save({"model": reference.state_dict()}, tmp_path / "weights.pth")
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
    source = "timm:vit_tiny_patch16_224?img_size=32&patch_size=8&in_chans=1"
    model, meta = open_backbone(source, str(tmp_path / "weights.pth"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    assert meta["img_size"] == 32 and meta["in_chans"] == 1 and meta["num_features"] == 192
    assert "weights.pth" not in meta["source"]  # named by its sha256, not its file name

    save_for_hf(reference, tmp_path / "hub", safe_serialization=True)
    model, meta = open_backbone(f"local-dir:{tmp_path / 'hub'}")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)

    with pytest.raises(BackboneError, match="nothing is downloaded"):
        open_backbone(source)
    other = build_backbone({"arch": "vit_small", "patch_size": 8, "img_size": 32, "in_chans": 1})
    torch.save(other.state_dict(), tmp_path / "small.pth")
    with pytest.raises(BackboneError, match="small.pth does not fit timm vit_tiny"):
        open_backbone(source, str(tmp_path / "small.pth"))
