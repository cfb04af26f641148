"""A variant's study settings as the trainer's Hydra config composes them, each override list composed once.

Planning asks for every variant's settings (the grid's fairness checks, the table and figure inputs) and Hydra's
``compose`` rebuilds its defaults list and re-reads the YAML files on every call (~0.09 s CPU each): at 1,000
jobs that was 93 % of a plan's CPU. ``composed_settings`` composes with Hydra once per distinct set of
config-group choices (``method=``, ``optim=``, ``model=``), applies the variant's ``key=value`` overrides to a
copy with Hydra's own override code, and keeps the result per override list for the life of the process.
Anything unusual (a sweep, a ``hydra`` key, an override that fails) is composed by Hydra directly, so its
result or its error message is Hydra's own. ``SSL_PLAN_NO_COMPOSE_CACHE=1`` composes as before: Hydra on every
call behind an LRU of 256 override lists (the baseline of benchmarks/dag.py; tests compare the two).

Torch-free: the Snakefile imports it at DAG build.
"""

from __future__ import annotations

import copy
import functools
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override
    from omegaconf import DictConfig

Flat = tuple[tuple[str, Any], ...]  # sorted (dotted key, value) pairs, ``hydra.*`` left out

NO_CACHE_ENV = "SSL_PLAN_NO_COMPOSE_CACHE"
# "hydra": Hydra compose() calls; "variant": override lists composed (cache misses). For tests and benchmarks.
COMPOSE_CALLS: Counter[str] = Counter()
_SETTINGS: dict[tuple[str, tuple[str, ...]], Flat] = {}
_BASES: dict[tuple[str, tuple[str, ...]], DictConfig] = {}  # (conf dir, group overrides) -> composed config
_PARSED: dict[str, Override] = {}  # one override line -> Hydra's parse (every variant repeats pretrain's)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"crop": {"max_iou": 0.3}}`` -> ``{"crop.max_iou": 0.3}``."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _hydra(conf_dir: str, overrides: Sequence[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    COMPOSE_CALLS["hydra"] += 1
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _flat(cfg: DictConfig) -> Flat:
    from omegaconf import OmegaConf

    flat = flatten(OmegaConf.to_container(cfg, resolve=False))
    return tuple(sorted((k, v) for k, v in flat.items() if not k.startswith("hydra.")))


def hydra_settings(conf_dir: str, overrides: Sequence[str]) -> Flat:
    """Hydra's own composition of ``overrides``, every call (the reference the cache must equal)."""
    return _flat(_hydra(conf_dir, overrides))


# The composition before this module (the baseline of benchmarks/dag.py): Hydra on every call behind an LRU of
# 256 override lists, which misses on every call once a plan has more variants than that.
_hydra_lru = functools.lru_cache(maxsize=256)(hydra_settings)


def _compose_split(conf_dir: str, overrides: tuple[str, ...]) -> Flat:
    """Hydra's result for ``overrides``, composing only their config-group choices with Hydra.

    Hydra itself builds the config from the group choices alone, then applies the ``key=value`` overrides
    in order (ConfigLoaderImpl._apply_overrides_to_config, Hydra 1.3); here the first step is shared by every
    variant with the same choices. Should that private method change, the fallback composes with Hydra.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        missing = [o for o in overrides if o not in _PARSED]
        if missing:  # Hydra parses each line on its own too
            _PARSED.update(zip(missing, OverridesParser.create().parse_overrides(missing), strict=True))
        parsed = [_PARSED[o] for o in overrides]
        if any(o.is_sweep_override() or o.key_or_group.startswith("hydra") for o in parsed):
            raise LookupError("composed by Hydra")
        # a config group is a folder of the config dir (Hydra's FileConfigSource.is_group); dict values are
        # config overrides even for a group name, as in hydra._internal.defaults_list.Overrides
        is_group = [(Path(conf_dir) / o.key_or_group).is_dir() and not isinstance(o.value(), dict)
                    for o in parsed]  # fmt: skip
        groups = tuple(o.input_line for o, g in zip(parsed, is_group, strict=True) if g)
        values = [o for o, g in zip(parsed, is_group, strict=True) if not g]
        if (conf_dir, groups) not in _BASES:
            _BASES[(conf_dir, groups)] = _hydra(conf_dir, groups)
        cfg = copy.deepcopy(_BASES[(conf_dir, groups)])
        ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    except Exception:  # Hydra raises many types: the direct composition raises the real one (or succeeds)
        return hydra_settings(conf_dir, overrides)
    return _flat(cfg)


def composed_settings(conf_dir: str, overrides: Sequence[str]) -> Flat:
    """The flattened study config of ``overrides``, composed once per distinct override list per process."""
    key = (conf_dir, tuple(overrides))
    if os.environ.get(NO_CACHE_ENV, "") not in ("", "0"):
        return _hydra_lru(*key)
    if key not in _SETTINGS:
        COMPOSE_CALLS["variant"] += 1
        _SETTINGS[key] = _compose_split(*key)
    return _SETTINGS[key]
