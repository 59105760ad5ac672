"""`python -m eval mil` (eval/mil.py): bags, the gated-attention head, and the CLI on
PneumoniaMNIST bags and on the slides of a `curation tile` run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.__main__ import main as eval_main
from eval.mil import GatedAttentionMIL, instance_loss, synthetic_bags
from pretrain.backbones import build_backbone, export_backbone


def test_gated_attention_by_hand():
    torch.manual_seed(0)
    head = GatedAttentionMIL(dim=3, hidden=2, num_classes=2, dropout=0.0).eval()
    h = torch.tensor([[1.0, 0.0, 2.0], [0.5, -1.0, 0.0], [0.0, 0.0, 1.0]])
    logits, attention = head(h)
    V, U, w = head.V, head.U, head.w
    scores = []
    for row in h:
        gate = torch.tanh(V.weight @ row + V.bias) * torch.sigmoid(U.weight @ row + U.bias)
        scores.append(float((w.weight[0] @ gate + w.bias[0]).detach()))
    expected = np.exp(scores) / np.exp(scores).sum()
    np.testing.assert_allclose(attention.detach().numpy(), expected, rtol=1e-5)
    pooled = (torch.from_numpy(expected).float()[:, None] * h).sum(0)
    np.testing.assert_allclose(
        logits.detach().numpy(),
        (head.classifier.weight @ pooled + head.classifier.bias).detach().numpy(),
        rtol=1e-5,
    )


def test_instance_loss_by_hand():
    """Instance logits through the bag classifier [0, h0 - h1]; attention ranks 1, 2, 0, 3."""
    head = GatedAttentionMIL(dim=2, hidden=3, num_classes=2, dropout=0.0)
    with torch.no_grad():
        head.classifier.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
        head.classifier.bias.zero_()
    h = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    attention = head(h)[1] * 0 + torch.tensor([0.1, 0.5, 0.3, 0.05])  # keeps the graph
    # positive bag, k=1: instance 1 (logit -1) taken as positive, instance 3 (logit 0) as negative
    positive = instance_loss(head, h, attention, label=1, k=1)
    expected = (np.log1p(np.e) + np.log(2)) / 2
    np.testing.assert_allclose(positive.item(), expected, rtol=1e-6)
    # negative bag, k=2: instances 1 and 2 (logits -1, 0) taken as negative
    negative = instance_loss(head, h, attention, label=0, k=2)
    np.testing.assert_allclose(negative.item(), (np.log1p(np.exp(-1)) + np.log(2)) / 2, rtol=1e-6)
    # k beyond half a positive bag: one instance each way, not the same instance twice
    np.testing.assert_allclose(
        instance_loss(head, h[:3], attention[:3], 1, k=5).item(),
        np.log1p(np.e) / 2 + np.log1p(np.exp(2)) / 2,
        rtol=1e-6,
    )
    # a one-instance positive bag gives no pseudo-labels: no loss rather than a NaN
    assert instance_loss(head, h[:1], attention[:1], 1, k=1).item() == 0.0
    # attention only chooses: the loss sends no gradient into the attention branch
    positive.backward()
    assert head.w.weight.grad is None and head.classifier.weight.grad is not None


def test_synthetic_bags_follow_the_mnist_bags_protocol():
    labels = np.array([0] * 300 + [1] * 100 + [2] * 50)
    bags = synthetic_bags(
        labels, n_bags=40, bag_size=(10, 30), positives=(1, 3), positive_class=1, seed=3
    )
    assert len(bags) == 40 and bags.labels.sum() == 20
    for rows, marks, y in zip(bags.rows, bags.positives, bags.labels):
        assert 10 <= len(rows) <= 30 and len(set(rows.tolist())) == len(rows)
        np.testing.assert_array_equal(labels[rows] == 1, marks)  # marks are the truth
        assert (1 <= marks.sum() <= 3) if y == 1 else marks.sum() == 0


def test_abmil_grid_keeps_the_head_of_lowest_validation_loss():
    """Instance features where one dimension marks the positives: a head at lr 1e-9 cannot learn
    them in 3 epochs, one at lr 1e-2 can; validation bags must pick the second."""
    from omegaconf import OmegaConf

    from eval.mil import _train_abmil

    rng = np.random.default_rng(0)
    labels = np.array([0] * 400 + [1] * 100)
    feats = rng.normal(size=(500, 8)).astype(np.float32)
    feats[labels == 1, 0] += 4.0
    train = synthetic_bags(labels, 60, (5, 10), (1, 2), 1, seed=1)
    val = synthetic_bags(labels, 30, (5, 10), (1, 2), 1, seed=2)
    opts = OmegaConf.create(
        {
            "hidden": 8,
            "dropout": 0.0,
            "epochs": 3,
            "lr": [1e-9, 1e-2],
            "weight_decay": [0.0],
            "instance_loss_weight": 0.0,
            "instance_k": 1,
        }
    )
    head, scale, kept, chosen = _train_abmil(
        feats, train, np.arange(60), (val, np.arange(30)), opts, 2, seed=0
    )
    assert chosen == {"lr": 1e-2, "weight_decay": 0.0} and 1 <= kept <= 3
    with torch.no_grad():
        pos = [torch.softmax(head(scale(feats[val.rows[b]]))[0], -1)[1] for b in range(30)]
    assert np.mean([float(p) for p, y in zip(pos, val.labels) if y]) > 0.8
    # without validation bags the grid's first values are used
    _, _, _, first = _train_abmil(
        feats, train, np.arange(60), (val, np.zeros(0, np.int64)), opts, 2, seed=0
    )
    assert first == {"lr": 1e-9, "weight_decay": 0.0}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_backbone({"arch": "vit_tiny", "patch_size": 7, "img_size": 28, "in_chans": 1})
    return export_backbone(model, tmp_path_factory.mktemp("mil") / "export")


def test_mil_cli_on_pneumoniamnist_bags(export, medssl_data, tmp_path, capsys):
    npz = medssl_data / "pneumoniamnist.npz"
    out = tmp_path / "mil"
    code = eval_main(
        [
            "mil",
            "--backbone",
            str(export),
            "--bags",
            f"{npz}:val",
            "--test-bags",
            f"{npz}:test",
            "--out",
            str(out),
            "synthetic.n_bags=40",
            "repeats=2",
            "synthetic.bag_size=[5,15]",  # the val split's 135 normal images, 20 % held out
            "abmil.epochs=5",
            "prompt_mil.epochs=1",
            "bootstrap.resamples=50",
        ]
    )
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["methods"]) == {"mean_pool", "abmil", "prompt_mil"}
    for m in doc["methods"].values():
        assert 0.0 <= m["auroc"] <= 1.0 and len(m["auroc_ci95"]) == 2 and m["n"] == 40
    prompt = doc["methods"]["prompt_mil"]
    backbone_params = sum(
        p.numel()
        for p in build_backbone(
            {"arch": "vit_tiny", "patch_size": 7, "img_size": 28, "in_chans": 1}
        ).parameters()
    )
    # Prompt-MIL trains 4 prompt tokens and the gated-attention head: under 1 % of the ViT
    assert prompt["trainable_params"] == 4 * 192 + (192 * 128 + 128) * 2 + 129 + 192 * 2 + 2
    assert prompt["trainable_params"] / backbone_params < 0.01
    abmil = doc["methods"]["abmil"]
    assert len(abmil["epochs_kept"]) == 2 and all(1 <= e <= 5 for e in abmil["epochs_kept"])
    assert abmil["repeats"] == 2 and abmil["auroc_std"] is not None
    grid = {(lr, wd) for lr in (5e-4, 1e-4) for wd in (1e-4, 1e-1)}  # eval/configs/mil.yaml
    assert len(abmil["selected"]) == 2
    assert all((c["lr"], c["weight_decay"]) in grid for c in abmil["selected"])
    assert doc["bags"]["protocol"] == "train/test" and (out / "auroc.png").is_file()
    assert "| abmil |" in (out / "report.md").read_text()


def test_mil_refuses_bad_input_before_work(export, medssl_data, tmp_path, capsys):
    npz = medssl_data / "pneumoniamnist.npz"
    base = ["mil", "--backbone", str(export), "--bags", f"{npz}:val", "--out"]
    assert eval_main([*base, str(tmp_path / "a"), "methods=[maxpool]"]) == 2
    assert "unknown MIL method" in capsys.readouterr().err
    assert eval_main([*base, str(tmp_path / "b"), "folds=1"]) == 2
    assert "folds must be >= 2" in capsys.readouterr().err
    assert eval_main([*base, str(tmp_path / "c")]) == 2  # MNIST-bags share images: no CV
    assert "give --test-bags" in capsys.readouterr().err
    assert eval_main([*base, str(tmp_path / "d"), "abmil.lr=[]", "--test-bags", f"{npz}:test"]) == 2
    assert "abmil.lr must be" in capsys.readouterr().err
    test_bags = ["--test-bags", f"{npz}:test"]
    assert eval_main([*base, str(tmp_path / "e"), "abmil.instance_loss_weight=1", *test_bags]) == 2
    assert "abmil.instance_loss_weight must be in [0, 1)" in capsys.readouterr().err
    for name in "ade":
        assert not (tmp_path / name).exists()


def test_mil_on_slides_of_a_tile_run(export, medssl_data, tmp_path, capsys):
    """Four slides tiled by `curation tile`, labelled by file name in a CSV: bags are slides,
    2-fold CV by patient, attention heatmaps over the thumbnails; no slide name in the outputs."""
    from curation.__main__ import main as curation_main
    from tests.slides import blank_slide, tissue_texture, write_pyramid

    slides = tmp_path / "slides"
    slides.mkdir()
    texture = tissue_texture(medssl_data, 1024, 1536)
    for i in range(4):
        level0 = blank_slide(1024, 1536, seed=i)
        level0[256:768, 256 + 64 * i : 1280 + 64 * i - 256] = texture[256:768, 256:1024]
        write_pyramid(slides / f"CASE-SMITH-{i}.tif", level0, 0.5, (1, 4))
    tiles = tmp_path / "tiles"
    args = ["tile", str(slides), "--out", str(tiles), "mpp=0.5", "progress=false"]
    assert curation_main([*args, "tissue.mask_downsample=16"]) == 0, capsys.readouterr().err
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"CASE-SMITH-{i}.tif,{i % 2}\n" for i in range(4)))
    out = tmp_path / "mil"
    code = eval_main(
        [
            "mil",
            "--backbone",
            str(export),
            "--bags",
            str(tiles),
            "--labels",
            str(labels),
            "--out",
            str(out),
            "folds=2",
            "repeats=1",
            "abmil.epochs=2",
            "prompt_mil.epochs=1",
            "bootstrap.resamples=20",
        ]
    )
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["bags"]["test"] == 4 and doc["bags"]["protocol"] == "2-fold CV by patient"
    assert all(m["n"] == 4 for m in doc["methods"].values())
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 4
    for f in [out / "metrics.json", out / "report.md", *heatmaps]:
        assert b"SMITH" not in f.read_bytes()
