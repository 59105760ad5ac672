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
    from pretrain.__main__ import compose_config, validate

    spec = f"{medssl_data / 'pneumoniamnist.npz'}:train"
    cfg = compose_config(recipe, [f"data.train={spec}", f"output_dir={tmp_path}"])
    validate(cfg)  # raises ConfigError naming the problem
    assert cfg.method in recipe.stem
