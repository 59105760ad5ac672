"""Configuration: one default YAML per stage, override-only recipes, and `key=value` overrides.

As in DINOv2, a recipe only changes keys that the default declares. Unlike a plain OmegaConf merge,
we refuse unknown keys, wrong types and missing mandatory values (`???`) before any work starts,
naming the key, because a typo in a 10-hour SLURM job should cost seconds, not the whole run.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pretrain.io import atomic_write
from pretrain.privacy import pseudonymised_path

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.yaml"
PRETRAIN_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRETRAIN_DEFAULT = PRETRAIN_CONFIG_DIR / "default.yaml"
METHOD_CONFIG_DIR = PRETRAIN_CONFIG_DIR / "method"
_METHODS_DIR = Path(__file__).resolve().parent / "methods"
_MISSING = "???"
# the pretraining config's inputs (datasets, a model to start from): by pseudonym in saved configs
PRETRAIN_INPUT_KEYS = ("data.train", "monitor.knn_train", "monitor.knn_test", "init.from")


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
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "dict"
    return type(value).__name__


def _free(value: Any) -> bool:
    """Values that fit any declared type: null, missing (???) and interpolations."""
    return value is None or value == _MISSING or (isinstance(value, str) and value.startswith("${"))


def _compatible(default: Any, value: Any) -> bool:
    """A value may replace a default of the same kind; ints may stand for floats."""
    if _free(default) or _free(value):
        return True
    d, v = _type_name(default), _type_name(value)
    return d == v or (d == "float" and v == "int")


def _check_against(default: Mapping, given: Mapping, prefix: str, source: str) -> None:
    """Walk `given` (a plain container) against `default`, naming the first offending key."""
    for key, value in given.items():
        path = f"{prefix}{key}"
        if key not in default:
            raise ConfigError(f"{source}: unknown config key '{path}'")
        declared = default[key]
        if value == _MISSING:
            continue
        if isinstance(declared, Mapping) and isinstance(value, Mapping):
            if declared:  # an empty mapping in the default is open (e.g. per-dataset options)
                _check_against(declared, value, path + ".", source)
            continue
        if isinstance(declared, Mapping) and value is not None:
            raise ConfigError(f"{source}: config key '{path}' must be a mapping, got {value!r}")
        if isinstance(value, Mapping):
            if not _free(declared):
                raise ConfigError(
                    f"{source}: config key '{path}' must be a single value, not a mapping"
                )
            continue
        if not _compatible(declared, value):
            raise ConfigError(
                f"{source}: config key '{path}' must be {_type_name(declared)}, "
                f"got {_type_name(value)} {value!r}"
            )


def plain(value: Any) -> Any:
    """A config node as plain Python (dicts, lists), resolved; any other value as it is."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _unresolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)


def _load_yaml(path: str | Path) -> DictConfig:
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml errors come in many types
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a config must be a mapping at top level")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {exc}") from exc


def load_config(
    default: str | Path | DictConfig,
    recipe: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> DictConfig:
    """Merge default <- recipe <- overrides, refusing anything the default does not declare.

    The result is in struct mode (OmegaConf.set_struct): code that reads or writes a key the
    default does not declare fails at once instead of creating it.
    """
    default_path = None if isinstance(default, DictConfig) else Path(default)
    default_cfg = default if isinstance(default, DictConfig) else _load_yaml(default)
    declared = _unresolved(default_cfg)
    layers: list[DictConfig] = [default_cfg]
    if recipe is not None and (
        default_path is None or Path(recipe).resolve() != default_path.resolve()
    ):
        recipe_cfg = _load_yaml(recipe)
        _check_against(declared, _unresolved(recipe_cfg), "", str(recipe))
        layers.append(recipe_cfg)
    override_cfg = _parse_overrides(overrides)
    _check_against(declared, _unresolved(override_cfg), "", "command line")
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
    _set_struct(cfg, declared)
    return cfg


def _set_struct(cfg: DictConfig, declared: Mapping) -> None:
    """Struct mode everywhere except under mappings the default leaves open (empty)."""
    OmegaConf.set_struct(cfg, True)

    def open_nodes(node: DictConfig, spec: Mapping) -> None:
        for key, value in spec.items():
            child = node.get(key)
            if isinstance(value, Mapping) and isinstance(child, DictConfig):
                if value:
                    open_nodes(child, value)
                else:
                    OmegaConf.set_struct(child, False)

    open_nodes(cfg, declared)


def _method_names_on_disk() -> list[str]:
    names = {p.stem for p in METHOD_CONFIG_DIR.glob("*.yaml")}
    names |= {p.stem for p in _METHODS_DIR.glob("*.py") if p.stem not in ("__init__", "base")}
    return sorted(names)


def _chosen_method(recipe: str | Path | None, overrides: Sequence[str], default: DictConfig) -> str:
    """`method` from the last override, else the recipe, else the default."""
    for item in reversed(list(overrides)):
        if item.startswith("method="):
            return item.split("=", 1)[1]
    if recipe is not None:
        loaded = _load_yaml(recipe)
        if loaded.get("method") is not None:
            return str(loaded.method)
    return str(default.method)


def method_config_path(name: str) -> Path | None:
    """`configs/method/NAME.yaml` when the method ships defaults, else None."""
    path = METHOD_CONFIG_DIR / f"{name}.yaml"
    return path if path.is_file() else None


def compose_config(recipe: str | Path | None, overrides: Sequence[str] = ()) -> DictConfig:
    """Pretraining config: default.yaml <- configs/method/<method>.yaml <- recipe <- overrides.

    The method's YAML holds its own `NAME:` section and may change engine defaults for that method
    (SimCLR: LARS and its learning rate; MAE: AdamW betas), so recipes only say what differs from
    the published method. Checks that need the method's code run in `pretrain.validation.validate`.
    """
    default = _load_yaml(PRETRAIN_DEFAULT)
    name = _chosen_method(recipe, overrides, default)
    method_yaml = method_config_path(name)
    if method_yaml is not None:
        section = _load_yaml(method_yaml)
        if name not in section:
            raise ConfigError(f"{method_yaml}: must hold the method's '{name}:' section")
        engine_keys = OmegaConf.masked_copy(section, [k for k in section if k != name])
        _check_against(_unresolved(default), _unresolved(engine_keys), "", str(method_yaml))
        default = OmegaConf.merge(default, section)
    try:
        return load_config(default, recipe, overrides)
    except ConfigError as exc:
        if method_yaml is None and name not in _method_names_on_disk():
            # a method registered from user code needs no YAML; a typo in `method` is likelier
            known = ", ".join(_method_names_on_disk())
            raise ConfigError(f"{exc} (method {name!r} is not one of {known})") from exc
        raise


def save_config(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Write the merged config beside the outputs it produced (atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write(out / CONFIG_FILENAME, OmegaConf.to_yaml(cfg))


def pseudonymised_config(cfg: DictConfig, keys: Sequence[str]) -> DictConfig:
    """A copy of `cfg` as saved beside outputs: the value at each dotted key of `keys` (a path or
    a list of paths) by keyed pseudonym (pretrain.privacy.pseudonymised_path), since a folder
    name can name a patient; the run itself reads `cfg`."""
    shown = copy.deepcopy(cfg)
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_list(value):
            OmegaConf.update(shown, key, [pseudonymised_path(v) for v in value], merge=False)
        elif value is not None:
            OmegaConf.update(shown, key, pseudonymised_path(value), merge=False)
    return shown


def split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `key=value` overrides from other positional arguments."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    rest = [a for a in args if a not in overrides]
    return overrides, rest
