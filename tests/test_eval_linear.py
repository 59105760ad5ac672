"""Linear-probe grid, logistic regression, few-shot and label-efficiency protocols on synthetic
features (no backbone): each against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.preprocessing import StandardScaler

from eval.__main__ import DEFAULT_CONFIG
from eval.featureset import FeatureSet
from eval.protocols import discover, get_protocol, thread_limit
from eval.protocols.base import EvalContext, EvalError, label_subset, split_indices
from eval.protocols.fewshot import cl2n
from eval.protocols.linear import fit_and_select, full_features, train_linear_grid, variant_masks
from pretrain.config import load_config


@pytest.fixture(autouse=True)
def _one_thread():
    """As the protocols run (config `threads`): small matmuls thrash with several threads."""
    with thread_limit(1):
        yield


def _cfg(*overrides: str):
    return load_config(DEFAULT_CONFIG, None, ["bootstrap.resamples=100", *overrides])


def make_set(rng, n: int, *, k: int = 2, blocks: int = 4, dim: int = 6, signal: str = "pool"):
    """Features whose label signal sits in the pooled patch tokens ('pool') or the last CLS."""
    y = rng.integers(0, k, n)
    tokens = rng.normal(size=(n, blocks, dim)).astype(np.float32)
    pooled = rng.normal(size=(n, dim)).astype(np.float32)
    if signal == "pool":
        pooled[:, 0] += 3.0 * (y - (k - 1) / 2)
    else:
        tokens[:, -1, 0] += 3.0 * (y - (k - 1) / 2)
    return FeatureSet(tokens, pooled, y, k, np.array([str(i) for i in range(n)]), None)


def test_protocols_are_registered_one_module_each():
    registry = discover()
    assert {"knn", "linear", "logreg", "fewshot", "label_efficiency"} <= set(registry)
    assert get_protocol("linear").run.__module__ == "eval.protocols.linear"
    with pytest.raises(KeyError, match="unknown protocol"):
        get_protocol("nope")


def test_variant_masks_select_the_dinov2_inputs():
    fs = make_set(np.random.default_rng(0), 5)
    full = full_features(fs)
    masks = variant_masks(fs, ["n1", "n1+avgpool", "n4", "n4+avgpool"])
    for row, name in enumerate(["n1", "n1+avgpool", "n4", "n4+avgpool"]):
        np.testing.assert_array_equal(full[:, masks[row]], fs.variant(name))
    np.testing.assert_array_equal(
        fs.variant("n1+avgpool"), np.concatenate([fs.tokens[:, -1], fs.patch_mean], axis=1)
    )


def test_each_grid_head_equals_the_head_trained_alone():
    rng = np.random.default_rng(1)
    fs = make_set(rng, 90, k=3)
    x = full_features(fs)
    masks = variant_masks(fs, ["n1", "n4+avgpool", "n1+avgpool"])
    lrs = np.array([0.05, 0.01, 0.2])
    kw = dict(num_outputs=3, epochs=4, batch_size=16, seed=3, progress=False)
    grid = train_linear_grid(x, fs.labels, masks=masks, lrs=lrs, **kw)
    for h in range(3):
        alone = train_linear_grid(x, fs.labels, masks=masks[h : h + 1], lrs=lrs[h : h + 1], **kw)
        torch.testing.assert_close(grid.weight[:, h], alone.weight[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grid.bias[h], alone.bias[0], rtol=1e-5, atol=1e-6)
        assert (grid.weight[~torch.from_numpy(masks[h]), h] == 0).all()  # masked columns unused


def test_grid_sgd_equals_torch_optim_sgd_with_cosine_lr():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 5)).astype(np.float32)
    y = rng.integers(0, 2, 50)
    epochs, bs, lr, seed = 3, 16, 0.3, 7
    grid = train_linear_grid(
        x,
        y,
        masks=np.ones((1, 5), bool),
        lrs=np.array([lr]),
        num_outputs=2,
        epochs=epochs,
        batch_size=bs,
        seed=seed,
        progress=False,
    )
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(5, 2)
    with torch.no_grad():
        head.weight.copy_((torch.randn((5, 1, 2), generator=gen) * 0.01)[:, 0].T)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr * bs / 256, momentum=0.9, weight_decay=0)
    total, step = epochs * math.ceil(50 / bs), 0
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        order = torch.randperm(50, generator=gen)
        for start in range(0, 50, bs):
            idx = order[start : start + bs]
            for group in opt.param_groups:
                group["lr"] = lr * bs / 256 * 0.5 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx]).backward()
            opt.step()
            step += 1
    torch.testing.assert_close(grid.weight[:, 0].T, head.weight.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grid.bias[0], head.bias.detach(), rtol=1e-4, atol=1e-6)


def test_linear_grid_selects_the_head_with_the_best_val_score():
    rng = np.random.default_rng(4)
    fit, val = make_set(rng, 300, signal="pool"), make_set(rng, 120, signal="pool")
    ctx = EvalContext(
        _cfg("linear.epochs=15", "linear.lrs=[1e-5,0.01,0.5]"),
        train=fit,
        val=val,
        test=make_set(rng, 100, signal="pool"),
    )
    grid, masks, val_scores, best = fit_and_select(ctx, fit, val, seed=0, progress=False)
    assert len(val_scores) == 12  # 2 block counts x 2 pooling x 3 lrs
    # independent val accuracy of every head from its raw weights
    x_val = full_features(val)
    acc = {}
    for h, name in enumerate(grid.names):
        logits = x_val @ grid.weight[:, h].numpy() + grid.bias[h].numpy()
        acc[name] = accuracy_score(val.labels, logits.argmax(1))
        assert val_scores[name][0] == pytest.approx(acc[name])
    assert acc[best] == max(acc.values())
    assert best.split()[0].endswith("+avgpool")  # the signal is only in the pooled patch tokens
    result = get_protocol("linear").run(ctx)
    assert result.best == best and len(result.settings) == 12
    assert result.settings[best]["accuracy"] > 0.9


def test_linear_multilabel_heads_learn_each_label():
    rng = np.random.default_rng(5)
    n, dim = 400, 8
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = np.stack([(x[:, 0] > 0), (x[:, 1] + x[:, 2] > 0)], axis=1).astype(np.int64)
    grid = train_linear_grid(
        x,
        y,
        masks=np.ones((1, dim), bool),
        lrs=np.array([1.0]),
        num_outputs=2,
        epochs=30,
        batch_size=64,
        progress=False,
    )
    probs = grid.predict(x)[0]
    assert ((probs >= 0.5) == y).mean() > 0.95


def test_logreg_picks_c_on_val_and_refits_on_train_plus_val():
    rng = np.random.default_rng(6)
    fit, val, test = (make_set(rng, n, k=3, signal="cls") for n in (150, 60, 90))
    cs = [1e-4, 0.01, 1.0]
    ctx = EvalContext(_cfg(f"logreg.Cs={cs}"), train=fit, val=val, test=test)
    result = get_protocol("logreg").run(ctx)
    grid = result.extras["val_grid"]
    x_fit, x_val = fit.variant("n1"), val.variant("n1")
    ref = {}
    for c in cs:
        sc = StandardScaler().fit(x_fit)
        m = LogisticRegression(C=c, max_iter=1000).fit(sc.transform(x_fit), fit.labels)
        ref[c] = accuracy_score(val.labels, m.predict(sc.transform(x_val)))
        assert grid[f"C={c:g}"] == pytest.approx(ref[c], abs=1e-9)
    best_c = result.settings[result.best]["params"]["C"]
    assert ref[best_c] == max(ref.values())
    x_all = np.concatenate([x_fit, x_val])
    y_all = np.concatenate([fit.labels, val.labels])
    sc = StandardScaler().fit(x_all)
    m = LogisticRegression(C=best_c, max_iter=1000).fit(sc.transform(x_all), y_all)
    expected = accuracy_score(test.labels, m.predict(sc.transform(test.variant("n1"))))
    assert result.settings[result.best]["accuracy"] == pytest.approx(expected)


def test_fewshot_prototypes_by_hand_and_skips_impossible_shots():
    rng = np.random.default_rng(7)
    train = make_set(rng, 40, k=2, signal="cls")
    train.labels[:] = np.r_[np.zeros(37, int), np.ones(3, int)]  # smallest class: 3 images
    test = make_set(rng, 30, k=2, signal="cls")
    ctx = EvalContext(_cfg("fewshot.shots=[1,2,4]", "fewshot.episodes=5"), train=train, test=test)
    result = get_protocol("fewshot").run(ctx)
    assert list(result.settings) == ["1-shot", "2-shot"] and result.extras["skipped_shots"] == [4]
    # 1-shot with one image per class: prediction = the nearer of the two centred, normalised supports
    mean = train.variant("n1").mean(axis=0)
    tr, te = cl2n(train.variant("n1"), mean), cl2n(test.variant("n1"), mean)
    episode_rng = np.random.default_rng([ctx.seed, 1])
    accs = []
    for _ in range(5):
        s0 = episode_rng.choice(np.flatnonzero(train.labels == 0), 1, replace=False)
        s1 = episode_rng.choice(np.flatnonzero(train.labels == 1), 1, replace=False)
        d = np.stack([((te - tr[s0]) ** 2).sum(1), ((te - tr[s1]) ** 2).sum(1)], axis=1)
        accs.append(np.mean(d.argmin(1) == test.labels))
    assert result.settings["1-shot"]["accuracy"] == pytest.approx(np.mean(accs))
    assert result.settings["1-shot"]["accuracy_std"] == pytest.approx(np.std(accs))


def test_label_subsets_are_stratified_with_one_image_per_class_at_least():
    rng = np.random.default_rng(8)
    fs = make_set(rng, 500, k=3)
    fs.labels[:] = np.r_[np.zeros(400, int), np.ones(90, int), np.full(10, 2)]
    idx = label_subset(fs, 0.1, seed=0)
    assert np.bincount(fs.labels[idx]).tolist() == [40, 9, 1]
    assert np.bincount(fs.labels[label_subset(fs, 0.01, seed=1)]).tolist() == [4, 1, 1]
    assert not np.array_equal(label_subset(fs, 0.1, 0), label_subset(fs, 0.1, 1))
    multi = make_set(rng, 200)
    multi.labels = (rng.random((200, 3)) < [0.5, 0.02, 0.98]).astype(np.int64)  # a rare label
    idx = label_subset(multi, 0.01, seed=0)
    assert all({0, 1} <= set(multi.labels[idx, j].tolist()) for j in range(3))
    fit, val = split_indices(fs, 0.2, seed=0)
    assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == 500
    assert np.bincount(fs.labels[val]).tolist() == [80, 18, 2]


def test_split_keeps_each_patient_on_one_side():
    rng = np.random.default_rng(9)
    fs = make_set(rng, 200)
    fs.patients = np.array([f"p{i // 4}" for i in range(200)])
    fit, val = split_indices(fs, 0.25, seed=0)
    assert not set(fs.patients[fit]) & set(fs.patients[val])


def test_label_efficiency_curve_over_fractions_and_seeds():
    rng = np.random.default_rng(10)
    fit, val, test = (make_set(rng, n, signal="cls") for n in (300, 80, 120))
    cfg = _cfg(
        "label_efficiency.fractions=[0.02,1.0]",
        "label_efficiency.seeds=[0,1]",
        "label_efficiency.methods=[logreg,linear]",
        "linear.epochs=5",
        "linear.lrs=[0.01,0.1]",
        "logreg.Cs=[0.1,1.0]",
    )
    result = get_protocol("label_efficiency").run(EvalContext(cfg, train=fit, val=val, test=test))
    assert list(result.settings) == ["logreg@2%", "logreg@100%", "linear@2%", "linear@100%"]
    assert result.settings["logreg@2%"]["params"]["n_labels"] == [6, 6]  # 3 per class
    assert result.settings["logreg@100%"]["params"]["seeds"] == [0]  # deterministic: one run
    assert result.settings["linear@100%"]["params"]["n_labels"] == [300, 300]
    curve = result.extras["curve"]
    assert [p["fraction"] for p in curve["linear"]] == [0.02, 1.0]
    assert curve["logreg"][1]["accuracy"] > 0.85
    assert "accuracy_std" in result.settings["linear@2%"]


def test_mismatched_classes_and_empty_splits_are_refused():
    rng = np.random.default_rng(11)
    two, three = make_set(rng, 20, k=2), make_set(rng, 20, k=3)
    with pytest.raises(EvalError, match="class count mismatch.*2 classes.*3"):
        EvalContext(_cfg(), train=two, test=three)
    unlabeled = make_set(rng, 10)
    unlabeled.labels[:] = -1
    with pytest.raises(EvalError, match="no labeled images"):
        EvalContext(_cfg(), train=two, test=unlabeled)
