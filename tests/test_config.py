"""Config refuses bad input before any work starts, naming the key; the merged config is saved."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pretrain.config import ConfigError, load_config, save_config

DEFAULT = """
output_dir: ???
data:
  train: ???
  batch_size: 32
  window: null
optim:
  base_lr: 0.004
  betas: [0.9, 0.999]
  fused: true
extra: {}
"""


@pytest.fixture
def default(tmp_path):
    path = tmp_path / "default.yaml"
    path.write_text(DEFAULT)
    return path


def test_merge_order_default_recipe_overrides(default, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  batch_size: 8\noptim:\n  base_lr: 1\n")
    cfg = load_config(
        default, recipe, ["data.train=a.npz:train", "output_dir=out", "data.batch_size=4"]
    )
    assert cfg.data.batch_size == 4  # override beats recipe
    assert cfg.optim.base_lr == 1  # int accepted for a float key
    assert cfg.optim.betas == [0.9, 0.999]  # untouched default kept
    assert cfg.data.window is None


def test_unknown_key_named(default, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.batchsize'"):
        load_config(default, None, ["data.train=x", "output_dir=o", "data.batchsize=3"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: unknown config key 'optim\.lr'"):
        load_config(default, recipe, ["data.train=x", "output_dir=o"])


def test_wrong_type_named(default):
    with pytest.raises(ConfigError, match=r"'data\.batch_size' must be int, got str"):
        load_config(default, None, ["data.train=x", "output_dir=o", "data.batch_size=big"])
    with pytest.raises(ConfigError, match=r"'optim\.fused' must be bool"):
        load_config(default, None, ["data.train=x", "output_dir=o", "optim.fused=3"])
    with pytest.raises(ConfigError, match=r"'data' must be a mapping"):
        load_config(default, None, ["data=3", "output_dir=o"])


def test_missing_mandatory_and_malformed(default):
    with pytest.raises(ConfigError, match=r"missing mandatory.*data\.train"):
        load_config(default, None, ["output_dir=o"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(default, None, ["output_dir"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(default, "/nonexistent/recipe.yaml", [])


def test_open_mapping_and_null_default(default):
    cfg = load_config(
        default, None, ["data.train=x", "output_dir=o", "extra.anything=1", "data.window=lung"]
    )
    assert cfg.extra.anything == 1 and cfg.data.window == "lung"


def test_saved_config_round_trips(default, tmp_path):
    cfg = load_config(default, None, ["data.train=x.npz:train", "output_dir=o"])
    path = save_config(cfg, tmp_path / "run")
    assert OmegaConf.load(path) == cfg


RECIPES = sorted((Path(__file__).parents[1] / "pretrain" / "configs").glob("*.yaml"))


@pytest.mark.parametrize(
    "recipe", [r for r in RECIPES if r.name != "default.yaml"], ids=lambda p: p.stem
)
def test_every_shipped_recipe_composes_and_validates(recipe, medssl_data, tmp_path):
    from pretrain.config import compose_config
    from pretrain.validation import validate

    volumes = str(OmegaConf.load(recipe).get("method", "")).endswith("3d")
    data = "adrenalmnist3d.npz" if volumes else "pneumoniamnist.npz"  # 3D recipes train on volumes
    spec = f"{medssl_data / data}:train"
    cfg = compose_config(recipe, [f"data.train={spec}", f"output_dir={tmp_path}"])
    validate(cfg)  # raises ConfigError naming the problem
    # every leaf comes from the last layer that sets it: recipe, else method YAML, else default
    layers = [OmegaConf.load(PRETRAIN_DIR / "default.yaml")]
    method = OmegaConf.load(recipe).get("method", layers[0].method)
    if (PRETRAIN_DIR / "method" / f"{method}.yaml").is_file():
        layers.append(OmegaConf.load(PRETRAIN_DIR / "method" / f"{method}.yaml"))
    layers.append(OmegaConf.load(recipe))
    for layer in layers[1:]:
        for key, value in _leaves(OmegaConf.to_container(layer)).items():
            later = [lay for lay in layers[layers.index(layer) + 1 :] if _has(lay, key)]
            if not later:
                assert OmegaConf.select(cfg, key) == value, f"{recipe.name}: {key}"
    assert cfg.method == method


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _has(cfg, key: str) -> bool:
    return OmegaConf.select(cfg, key, default="<absent>") != "<absent>"


PRETRAIN_DIR = Path(__file__).parents[1] / "pretrain" / "configs"


def test_method_yaml_sets_the_engine_defaults_of_its_method(tmp_path):
    from pretrain.config import compose_config

    base = ["data.train=x.npz:train", f"output_dir={tmp_path}", "optim.max_steps=1"]
    simclr = compose_config(None, ["method=simclr", *base])
    assert (simclr.optim.optimizer, simclr.optim.momentum, simclr.optim.base_lr) == (
        "lars",
        0.9,
        0.3,
    )
    assert simclr.optim.lr_scaling == "linear" and simclr.optim.weight_decay == 1.0e-6
    mae = compose_config(None, ["method=mae", *base])
    assert list(mae.optim.betas) == [0.9, 0.95] and mae.optim.optimizer == "adamw"
    dinov2 = compose_config(None, base)  # default.yaml's engine values are DINOv2's
    assert (dinov2.optim.base_lr, dinov2.optim.clip_grad) == (0.004, 3.0)
    with pytest.raises(ConfigError, match=r"unknown config key 'simclr'"):
        compose_config(None, ["simclr.temperature=0.5", *base])  # another method's section


def test_composed_config_is_struct(tmp_path):
    from pretrain.config import compose_config

    cfg = compose_config(
        None, ["data.train=x.npz:train", f"output_dir={tmp_path}", "optim.max_steps=1"]
    )
    with pytest.raises(Exception, match="optim.bogus|bogus"):
        cfg.optim.bogus = 1  # a typo in code fails instead of creating a key


@pytest.mark.parametrize(
    "override, key",
    [
        ("dinov2.crops.global_crops_size=30", "dinov2.crops.global_crops_size"),
        ("dinov2.crops.local_crops_size=15", "dinov2.crops.local_crops_size"),
        ("dinov2.ibot.mask_ratio_min_max=[0.5,0.1]", "dinov2.ibot.mask_ratio_min_max"),
        ("dinov2.crops.preset=grey", "dinov2.crops.preset"),
        ("dinov2.crops.jitter_strength=-0.5", "dinov2.crops.jitter_strength"),
    ],
)
def test_method_checks_refuse_before_any_work_in_pretrain_and_launch(
    override, key, medssl_data, tmp_path, capsys
):
    from launch.__main__ import main as launch_main
    from pretrain.__main__ import EXIT_REFUSED
    from pretrain.__main__ import main as pretrain_main

    args = [
        "--config",
        str(PRETRAIN_DIR / "dinov2_cpu.yaml"),
        f"data.train={medssl_data / 'pneumoniamnist.npz'}:train",
        f"output_dir={tmp_path / 'run'}",
        override,
    ]
    assert pretrain_main(["--check", *args]) == EXIT_REFUSED
    assert key in capsys.readouterr().err
    folder = tmp_path / "launch"
    assert launch_main(["--cluster", "local", "--folder", str(folder), "pretrain", *args]) == 2
    assert key in capsys.readouterr().err
    assert not folder.exists() and not (tmp_path / "run").exists()  # nothing written
