"""The pretraining config as data: value rules, override checking and the run fingerprint.

- ``RULES`` is the table every composed config is checked against before any work (``validate_config``); the
  few rules that relate several keys (queue vs batch, MoCHi's n vs K, an attainable IoU ceiling) follow it.
  A bad value fails with one line naming the key, the value and what is allowed: today ``epochs=-1`` would
  write an untrained checkpoint and ``ckpt_every=0`` divide by zero mid-run.
- ``compose_config`` composes the Hydra config from command-line overrides and rephrases Hydra's errors: for a
  typo (``crop.max_iuo=0.3``) Hydra suggests ``+crop.max_iuo=0.3``, which adds a key nothing reads; here the
  unknown key is named with the closest valid keys.
- ``fingerprint`` / ``config_diff``: a checkpoint stores the resolved config, so a rerun under another
  configuration is refused instead of silently resuming another variant's weights. Keys that cannot change the
  result (``NEUTRAL_KEYS``) are left out; ``EXECUTION_KEYS`` change speed or numerics but not the experiment,
  so a changed value resumes with a warning (the result is then not byte-identical to an unbroken run).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from study.runstate import RunError

CONF_DIR = Path(__file__).resolve().parent / "conf"
NEUTRAL_KEYS = ("out_dir", "progress", "log_every", "ckpt_every", "data.shards", "guard", "monitor",
                "optim.tuned_batch")  # a check, not a setting: the same run with or without it
EXECUTION_KEYS = ("num_workers", "device", "precision", "channels_last", "compile", "data.render",
                  "data.decode")
# The IoU-ceiling estimate: pairs sampled at a typical (ImageNet-like) image size; more fallbacks than this fail.
# The sampler (rejection, then conditional placement) holds any attainable ceiling on all but < 0.1 % of pairs,
# so a fallback here means the ceiling is unattainable for the crop sizes, and 1 % is a clear signal.
FALLBACK_IMAGE_HW = (375, 500)
FALLBACK_PAIRS = 500
FALLBACK_MAX = 0.01


class ConfigError(RunError):
    """A config value or override is invalid; raised before any work."""

    exit_code = 2


# ----------------------------------------------------------------------------------------- value rules


@dataclass(frozen=True)
class Rule:
    """What one key may hold. ``when``: only checked when that (boolean) key is true."""

    key: str
    kind: str  # int | float | bool | choice | pair
    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    choices: tuple[Any, ...] = ()
    nullable: bool = False
    when: str | None = None
    hint: str = ""

    def allowed(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(_show(c) for c in self.choices)
        what = {"int": "an integer", "float": "a number", "pair": "a pair [low, high] with low <= high,"}[self.kind]
        lo = None if self.lo is None else f"{'>' if self.open_lo else '>='} {_num(self.lo)}"
        hi = None if self.hi is None else f"{'<' if self.open_hi else '<='} {_num(self.hi)}"
        rng = " and ".join(p for p in (lo, hi) if p)
        out = f"{what} {rng}".strip().rstrip(",") if rng else what.rstrip(",")
        return out + (" or null" if self.nullable else "")

    def _in_range(self, x: float) -> bool:
        if self.lo is not None and (x <= self.lo if self.open_lo else x < self.lo):
            return False
        return not (self.hi is not None and (x >= self.hi if self.open_hi else x > self.hi))

    def check(self, value: Any) -> str | None:
        """An error message, or None when ``value`` is allowed."""
        if value is None and self.nullable:
            return None
        ok = False
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "choice":
            ok = any(value == c and type(value) is type(c) for c in self.choices)
        elif self.kind in ("int", "float"):
            x = _as_number(value, integer=self.kind == "int")
            ok = x is not None and self._in_range(x)
        elif self.kind == "pair":
            xs = value if isinstance(value, (list, tuple)) else None
            nums = [_as_number(v, integer=False) for v in xs] if xs is not None and len(xs) == 2 else None
            ok = nums is not None and None not in nums and nums[0] <= nums[1] and all(map(self._in_range, nums))
        if ok:
            return None
        return f"{self.key}={_show(value)}: must be {self.allowed()}" + (f" ({self.hint})" if self.hint else "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, str):
        return repr(v)
    return str(v)


def _as_number(value: Any, integer: bool) -> float | None:
    """``value`` as a finite number (numeric strings too: Hydra keeps ``1e-3`` untyped), else None."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x) or (integer and not x.is_integer()):
        return None
    return x


RULES: tuple[Rule, ...] = (
    Rule("seed", "int", lo=0),
    Rule("epochs", "int", lo=1, hint="for an untrained baseline use method=random_init"),
    Rule("batch_size", "int", lo=1, hint="images per process and step"),
    Rule("num_workers", "int", lo=0),
    Rule("log_every", "int", lo=1, hint="steps per metrics.csv row"),
    Rule("ckpt_every", "int", lo=1, hint="steps between last.pt checkpoints"),
    Rule("max_steps", "int", lo=1, nullable=True),
    Rule("random_init", "bool"),
    Rule("device", "choice", choices=("auto", "cpu", "cuda")),
    Rule("precision", "choice", choices=("auto", "bf16", "fp32")),
    Rule("channels_last", "choice", choices=("auto", True, False)),
    Rule("compile", "bool"),
    Rule("progress", "bool"),
    Rule("data.shuffle_buffer", "int", lo=1),
    Rule("data.interleave", "int", lo=1),
    Rule("data.render", "choice", choices=("pil", "batched"), hint="where the colour augmentation runs"),
    Rule("data.decode", "choice", choices=("cpu", "device"), hint="where the JPEGs are decoded and cropped"),
    Rule("optim.lr", "float", lo=0, open_lo=True),
    Rule("optim.momentum", "float", lo=0, hi=1, open_hi=True),
    Rule("optim.weight_decay", "float", lo=0),
    Rule("optim.schedule", "choice", choices=("cosine", "step")),
    Rule("optim.warmup_steps", "int", lo=0),
    Rule("optim.lr_scale_batch", "int", lo=1, nullable=True, hint="linear lr scaling: lr * global batch / this"),
    Rule("optim.tuned_batch", "int", lo=1, nullable=True, hint="the global batch optim.lr was tuned for"),
    Rule("mechanism", "choice", choices=("queue", "end_to_end", "memory_bank")),
    Rule("bank.momentum", "float", lo=0, hi=1, open_hi=True, hint="memory bank update v <- m v + (1 - m) f"),
    Rule("bank.allow_self", "bool"),
    Rule("model.arch", "choice", choices=("resnet18", "resnet34", "resnet50")),
    Rule("model.small_input", "bool"),
    Rule("model.width", "int", lo=4, hint="channels of the stem and layer1 (64 = torchvision)"),
    Rule("moco.K", "int", lo=1, hint="queue length"),
    Rule("moco.dim", "int", lo=1),
    Rule("moco.m", "float", lo=0, hi=1),
    Rule("moco.T", "float", lo=0, open_lo=True),
    Rule("moco.mlp", "bool"),
    Rule("moco.shuffle_bn", "choice", choices=("auto", "ddp", "split", "none", True, False)),
    Rule("moco.bn_splits", "int", lo=1),
    Rule("knn.enabled", "bool"),
    Rule("knn.k", "int", lo=1, when="knn.enabled"),
    Rule("knn.lam", "float", lo=0, when="knn.enabled"),
    Rule("knn.warmup_epochs", "float", lo=0, when="knn.enabled"),
    Rule("knn.mine_before_enqueue", "bool", when="knn.enabled"),
    Rule("mochi.enabled", "bool"),
    Rule("mochi.n", "int", lo=1, when="mochi.enabled"),
    Rule("mochi.s", "int", lo=0, when="mochi.enabled"),
    Rule("mochi.s_prime", "int", lo=0, when="mochi.enabled"),
    Rule("mochi.warmup_epochs", "float", lo=0, when="mochi.enabled"),
    Rule("mochi.oracle", "bool"),
    Rule("crop.size", "int", lo=1),
    Rule("crop.small_size", "int", lo=1),
    Rule("crop.n_small", "int", lo=0),
    Rule("crop.scale", "pair", lo=0, hi=1, open_lo=True),
    Rule("crop.small_scale", "pair", lo=0, hi=1, open_lo=True),
    Rule("crop.ratio", "pair", lo=0, open_lo=True),
    Rule("crop.max_iou", "float", lo=0, hi=1, open_lo=True, hint="IoU ceiling of key and query; 1 = none"),
    Rule("crop.max_tries", "int", lo=1),
    Rule("crop.flip", "choice", choices=("after", "before")),
    Rule("crop.constraint", "choice", choices=("none", "inside", "overlap")),
    Rule("crop.min_overlap", "float", lo=0, hi=1),
    Rule("crop.constraint_tries", "int", lo=1),
    Rule("aug.pipeline", "choice", choices=("v1", "v2")),
    Rule("aug.aplus", "bool"),
    Rule("aug.aplus_p", "float", lo=0, hi=1),
    Rule("aug.blur", "bool"),
    Rule("monitor.every", "int", lo=0, hint="steps between monitor rows; 0 = off"),
    Rule("monitor.image_size", "int", lo=8),
    Rule("monitor.n_train", "int", lo=1),
    Rule("monitor.n_val", "int", lo=1),
    Rule("monitor.n_pairs", "int", lo=2),
    Rule("monitor.k", "int", lo=1),
    Rule("monitor.temperature", "float", lo=0, open_lo=True),
    Rule("guard.stop_on_collapse", "bool"),
    Rule("guard.collapse_rows", "int", lo=1),
    Rule("guard.collapse_gap", "float", lo=0),
    Rule("guard.collapse_loss_rtol", "float", lo=0),
)

_ABSENT = object()


def _get(c: Mapping[str, Any], key: str, default: Any = _ABSENT) -> Any:
    node: Any = c
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


@lru_cache(maxsize=32)
def crop_fallback_rate(scale: tuple[float, float], ratio: tuple[float, float], max_iou: float,
                       max_tries: int) -> float:
    """Fraction of key/query pairs ``study.crops.sample_pairs`` leaves over ``max_iou`` (estimated)."""
    from study.crops import sample_pairs

    if max_iou >= 1.0:
        return 0.0
    rng = np.random.default_rng(0)
    _, fell_back = sample_pairs(*FALLBACK_IMAGE_HW, FALLBACK_PAIRS, scale, ratio, rng, max_iou, max_tries)
    return float(fell_back.mean())


def _nearest_multiples(k: int, b: int) -> str:
    lo, hi = (k // b) * b, (k // b + 1) * b
    return " or ".join(str(v) for v in (lo, hi) if v > 0)


def _cross_checks(c: Mapping[str, Any], world: int) -> list[str]:
    """Rules between keys; only run when each key on its own is valid."""
    errs: list[str] = []
    training = not _get(c, "random_init", False)
    if _get(c, "out_dir", "???") in ("???", None, ""):
        errs.append("out_dir is missing: pass out_dir=<folder for checkpoints and logs>")
    if training and _get(c, "data.shards", "???") in ("???", None, ""):
        errs.append("data.shards is missing: pass data.shards=<folder with manifest.json and the .tar shards>")
    every, log_every = int(_get(c, "monitor.every", 0) or 0), int(_get(c, "log_every", 1) or 1)
    if training and every:
        if every % log_every:
            errs.append(f"monitor.every={every}: must be a multiple of log_every={log_every} (monitors fill "
                        "logged rows of metrics.csv)")
        if _get(c, "monitor.root", None) in (None, ""):
            errs.append("monitor.every > 0 needs monitor.root (a labelled split, e.g. results/synthetic/cls) and "
                        "monitor.format; or set monitor.every=0")
    K, B = int(_get(c, "moco.K", 1)), int(_get(c, "batch_size", 1))
    gb = B * world
    mechanism = _get(c, "mechanism", "queue")
    tuned, scale = _get(c, "optim.tuned_batch", None), _get(c, "optim.lr_scale_batch", None)
    if training and tuned and gb != int(tuned) and not scale:
        fix = f"batch_size={int(tuned) // world} to keep it, or " if int(tuned) % world == 0 else ""
        errs.append(f"global batch {gb} (batch_size={B} x {world} process(es)) is not optim.tuned_batch={tuned}, the "
                    f"batch optim.lr={_get(c, 'optim.lr', '?')} was tuned for (did the GPU count change?): set {fix}"
                    f"optim.lr_scale_batch={tuned} to scale the lr linearly (MoCo's rule: lr x global batch / {tuned})")
    if training and mechanism == "queue" and K % gb:
        errs.append(f"moco.K={K}: must be a multiple of the global batch {gb} (batch_size={B} x {world} "
                    f"process(es)), since MoCo enqueues whole batches; use moco.K={_nearest_multiples(K, gb)}")
    if _get(c, "data.decode", "cpu") == "device":
        if _get(c, "data.render", "pil") != "batched":
            errs.append(f"data.decode=device needs data.render=batched (decode and colour on the device), got "
                        f"data.render={_get(c, 'data.render', 'pil')}")
        if _get(c, "aug.aplus", False):
            errs.append("data.decode=device cannot run with aug.aplus=true (A+'s AutoAugment needs PIL pixels "
                        "in the loader workers); use data.decode=cpu")
    if _get(c, "knn.enabled", False) and int(_get(c, "knn.k", 1)) > K:
        errs.append(f"knn.k={_get(c, 'knn.k')}: must be <= moco.K={K} (neighbours are mined in the queue)")
    if _get(c, "mochi.enabled", False):
        n, s = int(_get(c, "mochi.n", 1)), int(_get(c, "mochi.s", 0))
        if n > K:
            errs.append(f"mochi.n={n}: must be <= moco.K={K} (hardest negatives are taken from the queue); "
                        f"lower mochi.n or raise moco.K")
        if s > 0 and n < 2:
            errs.append(f"mochi.n={n}: must be >= 2 when mochi.s={s} > 0 (two distinct negatives are mixed)")
    shuffle = _get(c, "moco.shuffle_bn", "auto")
    splits = int(_get(c, "moco.bn_splits", 2))
    if training and mechanism != "memory_bank" and world == 1 and shuffle in ("auto", "split", True) and splits > 1 and B < 2 * splits:
        errs.append(f"batch_size={B}: split-batch shuffle BN with moco.bn_splits={splits} needs batch_size >= "
                    f"{2 * splits}; raise batch_size, lower moco.bn_splits or set moco.shuffle_bn=none")
    if _get(c, "optim.schedule", "cosine") == "step":
        ms = _get(c, "optim.milestones", [])
        if not isinstance(ms, (list, tuple)) or any(_as_number(m, integer=False) is None or float(m) < 0 for m in ms):
            errs.append(f"optim.milestones={_show(ms)}: must be a list of epochs >= 0 for optim.schedule=step")
    max_iou = float(_get(c, "crop.max_iou", 1.0))
    if training and max_iou < 1.0:
        scale = tuple(float(v) for v in _get(c, "crop.scale", (0.2, 1.0)))
        ratio = tuple(float(v) for v in _get(c, "crop.ratio", (3 / 4, 4 / 3)))
        tries = int(_get(c, "crop.max_tries", 100))
        rate = crop_fallback_rate(scale, ratio, max_iou, tries)  # type: ignore[arg-type]
        if rate > FALLBACK_MAX:
            errs.append(
                f"crop.max_iou={_num(max_iou)}: unattainable with crop.scale={list(scale)} and crop.max_tries={tries}:"
                f" {rate:.0%} of key/query pairs would fall back to their lowest-IoU pair (estimated on "
                f"{FALLBACK_PAIRS} pairs of a {FALLBACK_IMAGE_HW[0]}x{FALLBACK_IMAGE_HW[1]} image, limit "
                f"{FALLBACK_MAX:.0%}); raise crop.max_iou or lower the low end of crop.scale")
    return errs


def _container(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
    return dict(cfg)


def validate_config(cfg: DictConfig | Mapping[str, Any], world: int | None = None) -> None:
    """Check the composed config against ``RULES`` and the cross-key rules; raise one ``ConfigError`` line."""
    if world is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    c = _container(cfg)
    errs = []
    for rule in RULES:
        value = _get(c, rule.key)
        if value is _ABSENT or (rule.when and _get(c, rule.when, False) is not True):
            continue
        msg = rule.check(value)
        if msg:
            errs.append(msg)
    if not errs:
        errs = _cross_checks(c, world)
    if errs:
        raise ConfigError("; ".join(errs))


# ------------------------------------------------------------------------------------------- overrides


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every node and leaf."""
    if not isinstance(node, Mapping):
        return [prefix]
    out = [prefix] if prefix else []
    for k, v in node.items():
        out += _all_keys(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _groups() -> dict[str, list[str]]:
    return {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in CONF_DIR.iterdir() if d.is_dir()}


def _explain(overrides: Sequence[str], exc: Exception, compose: Callable[[list[str]], Any]) -> str:
    """One line for a failed composition: the unknown key with its nearest valid keys, a bad group option, or
    Hydra's own message without its ``+key`` advice."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except HydraException:
            return f"override {line!r} is not key=value (e.g. crop.max_iou=0.3)"
    groups = _groups()
    for o in parsed:
        if o.key_or_group in groups and not o.is_delete() and str(o.value()) not in groups[o.key_or_group]:
            return (f"{o.input_line}: no such {o.key_or_group} config; choose one of "
                    f"{', '.join(groups[o.key_or_group])}")
    try:
        base = OmegaConf.to_container(compose([o.input_line for o in parsed if o.key_or_group in groups]),
                                      resolve=False)
        known, leaves = _all_keys(base), list(flatten(base))
    except HydraException:
        known, leaves = [], []
    for o in parsed:
        key = o.key_or_group
        if (known and not (o.is_add() or o.is_force_add() or o.is_delete()) and key not in known
                and key not in groups and not key.startswith("hydra") and "/" not in key):
            near = difflib.get_close_matches(key, leaves, n=3, cutoff=0.7)
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            siblings = [k for k in leaves if parent and k.startswith(parent + ".") and k.count(".") == key.count(".")]
            hint = (f"did you mean {' or '.join(near)}?" if near
                    else f"valid keys under {parent}: {', '.join(siblings)}" if siblings
                    else "see study/conf/config.yaml for the valid keys")
            return f"unknown config key {key!r} in override {o.input_line!r}: {hint}"
    text = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip() and "To append" not in ln)
    return f"cannot compose the config from {list(overrides)}: {text}"


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The study config composed from command-line ``overrides``, or one ``ConfigError`` line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            return compose(config_name="config", overrides=list(overrides))
        except HydraException as exc:
            message = _explain(overrides, exc, lambda ovr: compose(config_name="config", overrides=ovr))
    raise ConfigError(message)


# ------------------------------------------------------------------------------------------ fingerprint


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def result_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config without the keys that cannot change the trained weights' experiment."""
    return {k: v for k, v in flatten(config).items() if not _matches(k, NEUTRAL_KEYS + EXECUTION_KEYS)}


def fingerprint(config: Mapping[str, Any], data_id: str | None) -> str:
    """Short hash of what defines the run: ``result_keys`` plus the identity of its shards."""
    blob = json.dumps({"config": result_keys(config), "data": data_id}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_identity(meta: Mapping[str, Any]) -> str:
    """Identity of a shard set from its manifest (names, counts and checksums; not its path, which may move)."""
    shards = [(s.get("name"), s.get("count"), s.get("sha256")) for s in meta.get("shards", [])]
    blob = json.dumps({"shards": shards, "images": meta.get("totals", {}).get("images")}, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], keys: str = "result") -> list[str]:
    """``key: old -> new`` for every differing key, of the result keys or (``keys="execution"``) the others."""
    if keys == "result":
        a, b = result_keys(old), result_keys(new)
    else:
        a = {k: v for k, v in flatten(old).items() if _matches(k, EXECUTION_KEYS)}
        b = {k: v for k, v in flatten(new).items() if _matches(k, EXECUTION_KEYS)}
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, _ABSENT), b.get(k, _ABSENT)
        if va != vb:
            show = [("(absent)" if v is _ABSENT else _show(v)) for v in (va, vb)]
            out.append(f"{k}: {show[0]} -> {show[1]}")
    return out
