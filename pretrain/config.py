"""Configuration: one default YAML per stage, override-only recipes, and `key=value` overrides.

As in DINOv2, a recipe only changes keys that the default declares. Unlike a plain OmegaConf merge,
we refuse unknown keys, wrong types and missing mandatory values (`???`) before any work starts,
naming the key, because a typo in a 10-hour SLURM job should cost seconds, not the whole run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.yaml"


class ConfigError(ValueError):
    """A configuration that must not start a run (unknown key, wrong type, missing value)."""


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple, ListConfig)):
        return "list"
    if isinstance(value, (dict, DictConfig)):
        return "dict"
    return type(value).__name__


def _compatible(default: Any, value: Any) -> bool:
    """A value may replace a default of the same kind; ints may stand for floats; null is free."""
    if default is None or value is None:
        return True
    d, v = _type_name(default), _type_name(value)
    return d == v or (d == "float" and v == "int")


def _check_against(default: DictConfig, given: DictConfig, prefix: str, source: str) -> None:
    for key in given.keys():
        path = f"{prefix}{key}"
        d_node = default._get_node(key)
        if d_node is None:
            raise ConfigError(f"{source}: unknown config key '{path}'")
        g_node = given._get_node(key)
        if g_node._is_missing():
            continue
        d_val = None if d_node._is_missing() else d_node._value()
        g_val = g_node._value()
        if isinstance(d_node, DictConfig) and isinstance(g_node, DictConfig):
            # An empty dict in the default is an open mapping (e.g. per-dataset options).
            if len(d_node) > 0:
                _check_against(d_node, g_node, path + ".", source)
            continue
        if isinstance(d_node, DictConfig) and g_val is not None:
            raise ConfigError(f"{source}: config key '{path}' must be a mapping, got {g_val!r}")
        if isinstance(g_node, DictConfig):
            if d_val is not None:
                raise ConfigError(
                    f"{source}: config key '{path}' must be a single value, not a mapping"
                )
            continue
        if not _compatible(d_val, g_val):
            raise ConfigError(
                f"{source}: config key '{path}' must be {_type_name(d_val)}, "
                f"got {_type_name(g_val)} {g_val!r}"
            )


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {exc}") from exc


def load_config(
    default: str | Path,
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> DictConfig:
    """Merge default <- recipe <- overrides, refusing anything the default does not declare."""
    default_cfg = OmegaConf.load(default)
    layers: list[DictConfig] = [default_cfg]
    if recipe is not None and Path(recipe).resolve() != Path(default).resolve():
        if not Path(recipe).is_file():
            raise ConfigError(f"config file not found: {recipe}")
        try:
            recipe_cfg = OmegaConf.load(recipe)
        except Exception as exc:  # yaml errors come in many types
            raise ConfigError(f"{recipe}: not valid YAML: {exc}") from exc
        if not isinstance(recipe_cfg, DictConfig):
            raise ConfigError(f"{recipe}: a config must be a mapping at top level")
        _check_against(default_cfg, recipe_cfg, "", str(recipe))
        layers.append(recipe_cfg)
    override_cfg = _parse_overrides(overrides)
    _check_against(default_cfg, override_cfg, "", "command line")
    layers.append(override_cfg)
    cfg = OmegaConf.merge(*layers)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing mandatory config value(s): {', '.join(missing)} (set key=value)"
        )
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve config interpolation: {exc}") from exc
    return cfg


def save_config(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Write the merged config beside the outputs it produced (atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CONFIG_FILENAME
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg))
    tmp.replace(path)
    return path


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `key=value` overrides from other positional arguments."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    rest = [a for a in args if a not in overrides]
    return overrides, rest
