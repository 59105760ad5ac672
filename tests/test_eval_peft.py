"""Adaptation protocols (eval/adapters.py, eval/finetune_loop.py, eval/protocols/adaptation.py):
adapters start as the identity, train only what they should, LoRA merges exactly, saved adapters
reload onto (only) their backbone, prompts matter, training resumes exactly, and the CLI writes rows.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.__main__ import main
from eval.adapters import (
    AdaptedModel,
    AdapterError,
    load_adapter,
    merged_backbone,
    save_adapter,
)
from eval.finetune_loop import (
    CHECKPOINT,
    FinetuneCheckpointError,
    ImageRows,
    TrainSettings,
    train_model,
)
from pretrain.backbones import build_backbone, export_backbone, load_backbone
from pretrain.transforms import eval_transform

OPTIONS = {
    "lora": {"rank": 4, "alpha": 8.0, "targets": ["q", "v"]},
    "adaptformer": {"width": 8, "scale": 0.1, "dropout": 0.0},
    "bottleneck": {"width": 8, "train_norms": True},
    "prompt": {"tokens": 3},
    "finetune": {},
}
DIM, DEPTH = 192, 12


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    """vit_tiny with 7 px patches on 28 px (16 patches), a register token and LayerScale: the
    prefix-token and LayerScale paths of the adapters are exercised."""
    torch.manual_seed(seed)
    cfg = {"arch": "vit_tiny", "patch_size": 7, "img_size": 28, "in_chans": 1}
    return build_backbone({**cfg, "reg_tokens": 1, "layerscale": 0.1}).eval()


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    return tiny_vit()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _adapted(backbone, method: str, seed: int = 0) -> AdaptedModel:
    torch.manual_seed(seed)
    return AdaptedModel(copy.deepcopy(backbone), method, OPTIONS[method], num_outputs=2).eval()


def _perturb(model: AdaptedModel) -> None:
    """Non-zero values in every trained tensor (as after training), deterministically."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("method", ["lora", "adaptformer", "bottleneck"])
def test_adapters_at_init_leave_backbone_outputs_unchanged(backbone, images, method):
    model = _adapted(backbone, method)
    with torch.no_grad():
        assert torch.equal(model.backbone(images), backbone(images))
        _perturb(model)  # the hooks are live: once the adapters are non-zero the output moves
        assert not torch.allclose(model.backbone(images), backbone(images), atol=1e-4)


def test_prompt_tokens_are_inserted_after_prefix_and_removed(backbone, images):
    model = _adapted(backbone, "prompt")
    with torch.no_grad():
        tokens = model.backbone.forward_features(images)
        plain = backbone.forward_features(images)
    assert tokens.shape == plain.shape == (4, 2 + 16, DIM)  # cls + register + patches, no prompts
    assert not torch.allclose(tokens, plain, atol=1e-4)  # the prompts take part in attention


@pytest.mark.parametrize("method", ["lora", "adaptformer", "bottleneck", "prompt", "finetune"])
def test_only_intended_parameters_receive_gradients(backbone, images, method):
    model = _adapted(backbone, method).train()
    model(images).logsumexp(dim=1).sum().backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable
    backbone_names = {f"backbone.{n}" for n, _ in backbone.named_parameters()}
    head = {"head.weight", "head.bias"}
    if method == "finetune":
        assert trainable == backbone_names | head
        return
    frozen_trained = trainable & backbone_names
    if method == "bottleneck":  # Houlsby: layer norms train too, nothing else of the backbone
        assert frozen_trained == {n for n in backbone_names if ".norm" in n}
    else:
        assert not frozen_trained
    counts = model.count()
    expected = {
        "lora": DEPTH * 2 * 4 * (DIM + DIM),  # q and v: A (4 x 192) and B (192 x 4)
        "adaptformer": DEPTH * (DIM * 8 + 8 + 8 * DIM + DIM),
        "bottleneck": 2 * DEPTH * (DIM * 8 + 8 + 8 * DIM + DIM) + (2 * DEPTH + 1) * 2 * DIM,
        "prompt": 3 * DIM,
    }[method]
    assert counts["trainable_params"] == expected + DIM * 2 + 2
    assert counts["backbone_params"] == sum(p.numel() for p in backbone.parameters())


@pytest.mark.parametrize("method", ["lora", "adaptformer", "bottleneck", "prompt"])
def test_bf16_autocast_runs_the_adapters_close_to_fp32(backbone, images, method):
    """Under bf16 autocast the adapters still act: the bf16 features reproduce what the adapter
    changes in fp32 to within 10 % of that change (an adapter skipped or cast away under autocast
    would leave an error as large as the change itself)."""
    model = _adapted(backbone, method)
    _perturb(model)
    x = images[:2]
    with torch.no_grad():
        plain = backbone(x)  # no adapter
        fp32 = model.backbone(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.backbone(x)
            logits = model(x)
    assert logits.dtype == torch.bfloat16
    change = (fp32 - plain).norm()
    assert change > 0.05 * plain.norm()  # the perturbed adapter does move the features
    assert (bf16.float() - fp32).norm() < 0.1 * change


def test_lora_merge_equals_unmerged_forward_and_exports(backbone, images, tmp_path):
    model = _adapted(backbone, "lora")
    _perturb(model)
    merged = merged_backbone(model)
    with torch.no_grad():
        unmerged_out, merged_out = model.backbone(images), merged(images)
    assert not torch.allclose(unmerged_out, backbone(images), atol=1e-4)
    torch.testing.assert_close(merged_out, unmerged_out, atol=1e-5, rtol=1e-5)
    # k of the fused qkv is untouched, q and v moved
    w0, w1 = backbone.blocks[0].attn.qkv.weight, merged.blocks[0].attn.qkv.weight
    assert torch.equal(w0[DIM : 2 * DIM], w1[DIM : 2 * DIM]) and not torch.equal(w0[:DIM], w1[:DIM])
    export_backbone(merged, tmp_path / "merged")  # a plain-timm export anyone can load
    reloaded, _ = load_backbone(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), unmerged_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "adaptformer", "bottleneck", "prompt"])
def test_saved_adapters_reload_to_same_predictions(backbone, images, method, tmp_path):
    model = _adapted(backbone, method)
    _perturb(model)
    save_adapter(model, tmp_path / "adapter")
    size = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    assert size < 0.1 * 4 * model.count()["backbone_params"]  # the adapter alone, not the backbone
    reloaded = load_adapter(tmp_path / "adapter", copy.deepcopy(backbone))
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))
    with pytest.raises(AdapterError, match="trained on backbone"):
        load_adapter(tmp_path / "adapter", tiny_vit(seed=1))


def _rows(npz: Path, split: str, n: int) -> ImageRows:
    from pretrain.data.datasets import open_dataset

    dataset = open_dataset(f"{npz}:{split}", transform=eval_transform(28, 1, [0.5], [0.25]))
    return ImageRows(dataset, np.arange(n), np.asarray(dataset.labels[:n]), cache={})


def test_prompt_tokens_change_the_output_once_trained(backbone, medssl_data, tmp_path):
    npz = medssl_data / "breastmnist.npz"
    train, val = _rows(npz, "train", 24), _rows(npz, "val", 16)
    model = _adapted(backbone, "prompt")
    before = model.prompts.detach().clone()
    x = torch.stack([train[i][0] for i in range(8)])
    with torch.no_grad():
        features_before = model.backbone(x)
    settings = TrainSettings(lr=0.05, epochs=2, batch_size=8, min_epoch_samples=24, patience=5)
    train_model(model, train, val, settings, multilabel=False, run_dir=tmp_path, digest="d")
    assert not torch.equal(model.prompts.detach(), before)
    for name, p in model.backbone.named_parameters():  # the backbone itself did not move
        assert torch.equal(p, dict(backbone.named_parameters())[name]), name
    with torch.no_grad():
        assert not torch.allclose(model.backbone(x), features_before, atol=1e-4)


def test_training_resumes_exactly_after_an_interruption(
    backbone, medssl_data, tmp_path, monkeypatch
):
    import eval.finetune_loop as loop

    npz = medssl_data / "breastmnist.npz"
    train, val = _rows(npz, "train", 24), _rows(npz, "val", 16)
    settings = TrainSettings(lr=1e-2, epochs=3, batch_size=8, min_epoch_samples=16, patience=9)
    straight = _adapted(backbone, "adaptformer")
    full = train_model(
        straight, train, val, settings, multilabel=False, run_dir=tmp_path / "a", digest="d"
    )
    interrupted = _adapted(backbone, "adaptformer")
    real_predict, calls = loop.predict, []

    def crash_on_second_val(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during epoch 2")
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(loop, "predict", crash_on_second_val)
    with pytest.raises(KeyboardInterrupt):
        train_model(
            interrupted, train, val, settings, multilabel=False, run_dir=tmp_path / "b", digest="d"
        )
    monkeypatch.setattr(loop, "predict", real_predict)
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)["epoch"] == 1
    resumed_model = _adapted(backbone, "adaptformer")
    resumed = train_model(
        resumed_model, train, val, settings, multilabel=False, run_dir=tmp_path / "b", digest="d"
    )
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for name, value in straight.trainable_state().items():
        assert torch.equal(resumed_model.trainable_state()[name], value), name


def test_unreadable_or_unwritable_checkpoint_names_the_file(backbone, medssl_data, tmp_path):
    npz = medssl_data / "breastmnist.npz"
    train, val = _rows(npz, "train", 4), _rows(npz, "val", 4)
    settings = TrainSettings(lr=1e-3, epochs=1, batch_size=4, min_epoch_samples=4)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / CHECKPOINT).write_bytes(b"")  # a kill on a full disk
    with pytest.raises(FinetuneCheckpointError, match=r"corrupt/checkpoint\.pt: .*empty file"):
        train_model(
            _adapted(backbone, "lora"),
            train,
            val,
            settings,
            multilabel=False,
            run_dir=corrupt,
            digest="d",
        )
    assert (corrupt / CHECKPOINT).read_bytes() == b""  # left for the operator to look at
    blocked = tmp_path / "blocked"
    (blocked / CHECKPOINT).mkdir(parents=True)  # the checkpoint cannot be written there
    with pytest.raises(FinetuneCheckpointError, match=r"blocked/checkpoint\.pt: cannot write"):
        train_model(
            _adapted(backbone, "lora"),
            train,
            val,
            settings,
            multilabel=False,
            run_dir=blocked,
            digest="d",
        )
    assert [p.name for p in blocked.iterdir()] == [CHECKPOINT]  # no temporary file left


def test_finetune_layer_decay_and_bf16_step(backbone, medssl_data, tmp_path):
    from pretrain.optim import param_groups_lrd

    model = _adapted(backbone, "finetune")
    groups = param_groups_lrd(model, layer_decay=0.65, num_layers=DEPTH)
    mult = {id(p): g["lr_multiplier"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert mult[id(named["head.weight"])] == 1.0
    assert mult[id(named["backbone.blocks.11.attn.qkv.weight"])] == pytest.approx(0.65)
    assert mult[id(named["backbone.pos_embed"])] == pytest.approx(0.65**13)
    npz = medssl_data / "breastmnist.npz"
    train, val = _rows(npz, "train", 4), _rows(npz, "val", 4)
    settings = TrainSettings(lr=1e-4, epochs=1, batch_size=4, min_epoch_samples=4, bf16=True)
    out = train_model(model, train, val, settings, multilabel=False, run_dir=tmp_path, digest="d")
    assert np.isfinite(out.history[0]["loss"])


def test_cli_all_with_adapt_writes_rows_and_reuses_finished_runs(medssl_data, tmp_path):
    export = export_backbone(tiny_vit(), tmp_path / "export")
    npz = medssl_data / "breastmnist.npz"
    args = [
        "all",
        "--adapt",
        "--backbone",
        str(export),
        "--train",
        f"{npz}:val",
        "--test",
        f"{npz}:test",
        "--out",
        str(tmp_path / "out"),
        "suite=[logreg]",
        "adaptation.methods=[lora,prompt]",
        "adaptation.fractions=[0.1,1.0]",
        "adaptation.seeds=[0]",
        "adaptation.epochs=1",
        "adaptation.min_epoch_samples=16",
        "bootstrap.resamples=50",
        "embedding.method=pca",
    ]
    assert main(args) == 0
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(doc["protocols"]) == ["logreg", "lora", "prompt"]
    for method in ("lora", "prompt"):
        block = doc["protocols"][method]
        assert list(block["settings"]) == [f"{method}@10%", f"{method}@100%"]
        for setting in block["settings"].values():
            lo, hi = setting["auroc_ci95"]
            assert lo <= setting["auroc"] <= hi and setting["train_seconds"] > 0
            assert 0 < setting["trainable_share"] < 0.05
    assert (
        doc["protocols"]["prompt"]["settings"]["prompt@100%"]["trainable_params"]
        == 8 * DIM + 2 * (2 * DIM) + 2  # 8 prompts + a head on [cls, mean patch] (default)
    )
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Adaptation on breastmnist" in report and "(adaptation.png)" in report
    assert "| lora | 10% |" in report and "| prompt | 100% |" in report
    assert (tmp_path / "out" / "adaptation.png").stat().st_size > 1000
    result = tmp_path / "out" / "adaptation" / "lora" / "1-seed0" / "result.json"
    stamp = result.stat().st_mtime_ns
    assert main(args) == 0  # a rerun reuses the finished runs
    assert result.stat().st_mtime_ns == stamp
    again = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert again["protocols"]["lora"]["settings"] == doc["protocols"]["lora"]["settings"]
