"""Rules of the experiment grid, checked before any job is planned: fair comparisons, one untrained baseline.

A row of a table is only comparable with the row above it when both models trained on the same schedule:
MoCHi at 200 epochs against a MoCo-v2 baseline at 400 measures the schedule, not hard negatives. So every
experiment's variants must agree on the schedule keys (epochs, per-process batch, queue size K, step cap, lr,
its schedule, warm-up and batch scaling),
read from each variant's *composed* study config (pretrain.overrides, the variant's overrides and the Hydra
method defaults), unless the experiment names the key it studies under ``studies:``. The global batch is the
per-process batch times the GPUs of ``pretrain.resources``, which every run shares.

The untrained baseline (``random_init: true``) is the same network whatever it is "trained" on; scheduling it
for several datasets would build and evaluate identical checkpoints several times, so the grid allows it with
one dataset only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from analysis.tables import variant_settings

# The learning rate and its schedule belong to the schedule too: a variant at another lr measures the lr.
SCHEDULE_KEYS: tuple[str, ...] = ("epochs", "batch_size", "moco.K", "max_steps", "optim.lr", "optim.schedule",
                                  "optim.warmup_steps", "optim.lr_scale_batch")  # fmt: skip

Settings = Callable[[str], Mapping[str, Any]]


class GridError(ValueError):
    """The experiments of a study config compare what they should not, or repeat identical work."""


def _settings_fn(config: Mapping, settings: Settings | None) -> Settings:
    if settings is not None:
        return settings
    cache: dict[str, Mapping[str, Any]] = {}

    def get(variant: str) -> Mapping[str, Any]:
        if variant not in cache:
            cache[variant] = variant_settings(config, variant)
        return cache[variant]

    return get


def is_untrained(settings: Mapping[str, Any]) -> bool:
    return bool(settings.get("random_init", False))


def fairness_errors(config: Mapping, settings: Settings | None = None) -> list[str]:
    """One line per experiment x schedule key on which its trained variants differ without saying so."""
    get = _settings_fn(config, settings)
    errors = []
    for exp, spec in (config.get("experiments") or {}).items():
        studied = list(spec.get("studies") or [])
        unknown = [k for k in studied if k not in SCHEDULE_KEYS]
        if unknown:
            errors.append(f"config key experiments.{exp}.studies: {unknown} are not schedule keys; "
                          f"choose from {list(SCHEDULE_KEYS)}")  # fmt: skip
        trained = [v for v in spec["variants"] if not is_untrained(get(v))]
        for key in SCHEDULE_KEYS:
            if key in studied:
                continue
            values = {v: get(v).get(key) for v in trained}
            if len({repr(x) for x in values.values()}) > 1:
                listing = ", ".join(f"{v}: {key}={x}" for v, x in values.items())
                errors.append(
                    f"config key experiments.{exp}: variants differ in the schedule key '{key}' ({listing}); "
                    f"give them the same {key} (in variants.<name> or pretrain.overrides), or add "
                    f"`studies: [{key}]` to experiments.{exp} if that difference is what it studies"
                )
    return errors


def baseline_errors(config: Mapping, settings: Settings | None = None) -> list[str]:
    """An untrained variant paired with more than one dataset (identical checkpoints, evaluated repeatedly)."""
    get = _settings_fn(config, settings)
    seen: dict[str, dict[str, list[str]]] = {}
    for exp, spec in (config.get("experiments") or {}).items():
        for v in spec["variants"]:
            if is_untrained(get(v)):
                for d in spec["datasets"]:
                    seen.setdefault(v, {}).setdefault(d, []).append(exp)
    errors = []
    for v, by_dataset in seen.items():
        if len(by_dataset) > 1:
            where = "; ".join(f"{d} in experiments {', '.join(exps)}" for d, exps in by_dataset.items())
            errors.append(
                f"config key variants.{v}: an untrained network (random_init) is the same for every dataset, but "
                f"the experiments pair it with {len(by_dataset)} datasets ({where}); list it with one dataset "
                "only (e.g. in experiments.mechanism)"
            )
    return errors


def batch_errors(config: Mapping, settings: Settings | None = None) -> list[str]:
    """A trained variant whose global batch (per-process batch x the GPUs of pretrain.resources) is not the one
    its lr was tuned for (``optim.tuned_batch``) and that does not scale its lr (``optim.lr_scale_batch``): a
    changed GPU count would otherwise train at another batch with the same lr. The trainer checks the same at
    start-up against the processes it really has (``--set-resources pretrain:gpu=...`` is not visible here)."""
    get = _settings_fn(config, settings)
    gpu = int(((config.get("pretrain") or {}).get("resources") or {}).get("gpu", 0) or 0)
    world = max(1, gpu)
    errors, seen = [], set()
    for spec in (config.get("experiments") or {}).values():
        for v in spec["variants"]:
            s = get(v)
            if v in seen or is_untrained(s):
                continue
            seen.add(v)
            tuned, scale, batch = s.get("optim.tuned_batch"), s.get("optim.lr_scale_batch"), s.get("batch_size")
            if tuned and not scale and batch and int(batch) * world != int(tuned):
                errors.append(
                    f"config key variants.{v}: global batch {int(batch) * world} (batch_size={batch} x {world} GPU "
                    f"process(es) of pretrain.resources) is not optim.tuned_batch={tuned}, the batch its lr was "
                    f"tuned for; set batch_size={int(tuned) // world} or optim.lr_scale_batch={tuned} (lr x "
                    f"global / {tuned}, MoCo's linear rule)"
                )
    return errors


def check_grid(config: Mapping, settings: Settings | None = None) -> None:
    """Raise GridError listing every unfair comparison, repeated baseline and untuned global batch."""
    get = _settings_fn(config, settings)
    errors = fairness_errors(config, get) + baseline_errors(config, get) + batch_errors(config, get)
    if errors:
        raise GridError("the experiment grid is not sound:\n" + "\n".join(f"  {e}" for e in errors))


def select_experiments(config: dict, only: str | list[str] | None) -> None:
    """Keep only the named experiments (``--config only_experiments=davis,retrieval``), in place.

    Runs one table's or figure's experiment without the rest of the grid; the report then renders just the
    tables and figures whose experiments remain.
    """
    if not only:
        return
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    exps = config.get("experiments") or {}
    unknown = [n for n in names if n not in exps]
    if unknown:
        raise GridError(f"config key only_experiments: {unknown} are not experiments; defined: {sorted(exps)}")
    config["experiments"] = {n: exps[n] for n in exps if n in names}
