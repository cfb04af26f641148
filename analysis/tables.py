"""The paper's tables, rebuilt from ``results/`` files only: CSV + Markdown + LaTeX + HTML per table.

    python -m analysis.tables --config-json '<the study config as JSON>' --results results \
        --out results/tables [--only table4[,table8]]

Tables: ``table1`` (dataset statistics), ``table2`` (frozen-feature classification per pretraining dataset,
deltas against the reference dataset), ``table3`` (every transfer target per dataset), ``table4`` (invariance
ablation), ``table5`` / ``table6`` (DAVIS-2017, VOC segment retrieval), ``table7`` (augmentation policies),
``table8`` (kNN-MoCo k / lambda), ``mochi`` (MoCHi (N, s, s') with embedding statistics), ``mechanism`` (MoCo
v1 vs v2); Tables 5-8 are built in analysis/tables_sec4.py. Which (dataset, variant, target) feeds which table
is read from the config's ``experiments:``; the optional ``report:`` section (defaults: ``report_defaults`` in
paper_values.yaml) picks the experiment behind each table, the reference dataset and the formatting.

Each table can carry the paper's reported numbers ("... paper" columns, from paper_values.yaml). They are
matched by *role* (``roles:`` there: syn_coco plays COCO, syn_voc_svm the VOC07 classification column), so in
the embedded default study only orderings and signs are comparable, never absolute values.

This module also holds the helpers every report stage shares (config sections, variant settings resolved with
the study's Hydra config, result paths, atomic writes) so rules/report.smk can list a job's inputs with the
same code that reads them.
"""

from __future__ import annotations

import argparse
import copy
import html
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis.compose import composed_settings
from analysis.target_settings import MANIFEST, runs_alone, trains

log = logging.getLogger("analysis.tables")

PAPER_VALUES = Path(__file__).with_name("paper_values.yaml")
STUDY_CONF = Path(__file__).resolve().parents[1] / "study" / "conf"
TABLE_FORMATS = ("csv", "md", "tex", "html")
ROLE_NOTE = (
    "Paper columns hold the number the paper reported for the row's / column's role (roles: in "
    "analysis/paper_values.yaml, e.g. syn_coco -> COCO); with the embedded synthetic study only orderings and "
    "signs are comparable."
)


class ReportConfigError(ValueError):
    """The config (or its ``report:`` section) does not say what a table or figure needs."""


class MissingResultError(FileNotFoundError):
    """An input artefact is missing; the message names each file and the Snakemake target that makes it."""


class ResultFileError(ValueError):
    """An input artefact exists but is unreadable, not what its stage writes, or incomplete; the message is one
    line naming the file, what is wrong and the command that rebuilds it (no cell is rendered from it)."""


# ----------------------------------------------------------------------------------------------- config


def load_paper_values(path: str | Path | None = None) -> dict:
    """The paper's numbers, role maps and report defaults (analysis/paper_values.yaml)."""
    path = Path(path) if path else PAPER_VALUES
    if not path.is_file():
        raise FileNotFoundError(f"paper values file {path} does not exist; it ships with the analysis package")
    return yaml.safe_load(path.read_text()) or {}


def deep_merge(base: Mapping, over: Mapping) -> dict:
    """``over`` on top of ``base``, merging nested mappings (lists and scalars are replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in (over or {}).items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def report_settings(config: Mapping, paper: Mapping | None = None) -> dict:
    """The config's ``report:`` section merged over the defaults in paper_values.yaml."""
    paper = load_paper_values() if paper is None else paper
    return deep_merge(paper.get("report_defaults", {}), config.get("report") or {})


def has_experiment(config: Mapping, name: str | None) -> bool:
    return bool(name) and name in (config.get("experiments") or {})


def experiment(config: Mapping, name: str) -> dict:
    exps = config.get("experiments") or {}
    if name not in exps:
        raise ReportConfigError(
            f"config key experiments.{name} is missing (defined: {sorted(exps)}); add it, or point the report at "
            "another experiment with the config's report: section"
        )
    return exps[name]


def experiment_pairs(config: Mapping, name: str) -> list[tuple[str, str]]:
    """(dataset, variant) rows of an experiment: datasets outer, variants in the experiment's order."""
    spec = experiment(config, name)
    return [(d, v) for d in spec["datasets"] for v in spec["variants"]]


def experiment_targets(config: Mapping, name: str, exclude_protocols: Iterable[str] = ()) -> list[str]:
    """Targets of an experiment: its ``targets:`` list, else every key of the config's ``targets:``."""
    spec = experiment(config, name)
    targets = spec.get("targets")
    if targets is None:
        targets = list(config.get("targets") or {})
    excluded = set(exclude_protocols)
    return [t for t in targets if target_protocol(config, t) not in excluded]


def target_protocol(config: Mapping, target: str) -> str | None:
    return ((config.get("targets") or {}).get(target) or {}).get("protocol")


def all_pairs(config: Mapping) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name in config.get("experiments") or {}:
        for pair in experiment_pairs(config, name):
            if pair not in out:
                out.append(pair)
    return out


# ------------------------------------------------------------------------------------- variant settings


def _parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``key=value`` Hydra overrides as a flat dict (values parsed as YAML, ``+``/``++`` prefixes dropped)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item or item.startswith("~"):
            continue
        key, value = item.split("=", 1)
        out[key.lstrip("+")] = yaml.safe_load(value) if value else None
    return out


def variant_settings(config: Mapping, variant: str, conf_dir: str | Path | None = None) -> dict[str, Any]:
    """The study settings a variant trains with, flattened (``crop.max_iou``, ``knn.lam``, ``mochi.n``...).

    Composed with the study's own Hydra config (pretrain.overrides, then the variant's overrides), so method
    defaults such as kNN-MoCo's k = 20 are what the trainer used. Without study/conf (analysis installed
    alone) only the overrides themselves are returned.
    """
    variants = config.get("variants") or {}
    if variant not in variants:
        raise ReportConfigError(f"variant {variant!r} is not a key of the config's variants: ({sorted(variants)})")
    overrides = tuple(str(o) for o in (config.get("pretrain") or {}).get("overrides", [])) + tuple(
        str(o) for o in variants[variant]
    )
    conf_dir = Path(conf_dir) if conf_dir else STUDY_CONF
    if not (conf_dir / "config.yaml").is_file():
        return _parse_overrides(overrides)
    try:
        return dict(composed_settings(str(conf_dir.resolve()), overrides))  # once per override list
    except Exception as exc:  # Hydra raises many types; name the variant and its overrides
        unknown = _unknown_override_keys(conf_dir, overrides)
        if unknown:  # Hydra's own advice (`+key=...`) would add a key that nothing reads
            raise ReportConfigError(f"config key variants.{variant} (or pretrain.overrides): " + "; ".join(unknown)) from None
        raise ReportConfigError(
            f"config key variants.{variant}: overrides {list(overrides)} do not compose with {conf_dir}: {exc}"
        ) from exc


def _unknown_override_keys(conf_dir: Path, overrides: Sequence[str]) -> list[str]:
    """Overrides naming no setting of the study config, each with the closest valid keys."""
    import difflib

    known = {k for k, _ in composed_settings(str(conf_dir.resolve()), ())}
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir()}
    out = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" in o and key not in known and key not in groups:
            close = difflib.get_close_matches(key, sorted(known | groups), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else "see `python -m study.train --cfg job`"
            out.append(f"'{o}' names no study setting ({hint})")
    return out


def knn_setting(settings: Mapping[str, Any]) -> tuple[int | None, float]:
    """(k, lambda) a variant trains with; lambda is 0 when kNN-MoCo is off (the paper's lambda = 0 row)."""
    enabled = bool(settings.get("knn.enabled", False))
    k = settings.get("knn.k")
    return (int(k) if k is not None else None), (float(settings.get("knn.lam", 0.0)) if enabled else 0.0)


def mochi_setting(settings: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
    if not settings.get("mochi.enabled", False):
        return None, None, None
    return tuple(int(settings[f"mochi.{k}"]) if settings.get(f"mochi.{k}") is not None else None
                 for k in ("n", "s", "s_prime"))  # type: ignore[return-value]


def is_knn_variant(config: Mapping, variant: str) -> bool:
    """Variants that belong in Table 8: kNN-MoCo enabled, or knn.* set explicitly by the variant."""
    if any(str(o).lstrip("+").startswith("knn.") for o in config["variants"][variant]):
        return True
    return bool(variant_settings(config, variant).get("knn.enabled", False))


# --------------------------------------------------------------------------------------- result paths


def stats_path(results: str | Path, dataset: str) -> Path:
    return Path(results) / "data" / dataset / "stats.json"


def subset_path(results: str | Path, dataset: str) -> Path:
    return Path(results) / "data" / dataset / "subset.csv"


def transfer_path(results: str | Path, dataset: str, variant: str, target: str) -> Path:
    return Path(results) / "transfer" / dataset / variant / f"{target}.json"


def checkpoint_path(results: str | Path, dataset: str, variant: str) -> Path:
    return Path(results) / "pretrain" / dataset / variant / "checkpoint.pt"


def metrics_path(results: str | Path, dataset: str, variant: str) -> Path:
    return Path(results) / "pretrain" / dataset / variant / "metrics.csv"


def benchmark_path(results: str | Path, dataset: str, variant: str) -> Path:
    return Path(results) / "benchmarks" / "pretrain" / dataset / f"{variant}.tsv"


def embedding_stats_path(results: str | Path, dataset: str, variant: str) -> Path:
    return Path(results) / "analysis" / dataset / variant / "embedding_stats.json"


def transfer_dag_file(config: Mapping, path: str | Path) -> str:
    """The file a job declares for ``path``: a batched target's result JSON (every frozen-feature target, and a
    training one on a CPU-only config: ``runs_alone``) is written by its checkpoint's transfer job, whose declared
    output is the manifest beside it; any other path is its own."""
    p = Path(path)
    targets = config.get("targets") or {}
    if len(p.parts) >= 4 and p.parts[-4] == "transfer" and p.suffix == ".json" and p.stem in targets:
        if not runs_alone(targets[p.stem], config):
            return str(p.parent / MANIFEST)
    return str(path)


def make_hint(path: Path, results: str | Path, config: Mapping | None = None) -> str:
    """The Snakemake command that makes ``path`` (files written alongside a checkpoint name the checkpoint)."""
    parts = path.relative_to(Path(results)).parts if path.is_relative_to(Path(results)) else ()
    if parts[:1] == ("pretrain",) and path.name != "checkpoint.pt" or parts[:2] == ("benchmarks", "pretrain"):
        d, v = (parts[1], parts[2]) if parts[0] == "pretrain" else (parts[2], Path(parts[3]).stem)
        ckpt = checkpoint_path(results, d, v)
        if parts[0] == "benchmarks":
            return (f"`snakemake {ckpt}` (Snakemake's benchmark: directive of rule pretrain writes it; add "
                    "`--forcerun pretrain` if the checkpoint was made outside Snakemake)")  # fmt: skip
        return f"`snakemake {ckpt}` (rule pretrain writes it next to the checkpoint)"
    if parts[:1] == ("transfer",) and len(parts) == 4:
        spec = ((config or {}).get("targets") or {}).get(path.stem)
        manifest = path.parent / MANIFEST
        batched = not runs_alone(spec, config or {}) if spec is not None else manifest.is_file()
        if batched:  # -f: the job also reruns when its manifest exists but this file was lost
            what = ("every frozen-feature target of the checkpoint, and on a CPU-only config its training ones "
                    "(this one: it resumes from its state)") if spec is not None and trains(spec) else (
                    "every frozen-feature target of the checkpoint")  # fmt: skip
            return f"`snakemake -f {manifest}` (rule transfer evaluates {what})"
        rule = "finetune" if str(spec and spec.get("protocol")).startswith("finetune") else "linear_sgd"
        return f"`snakemake {path}` (rule {rule})" if spec is not None else f"`snakemake {path}`"
    rule = {"data": "subset/stats", "analysis": "embedding_stats",
            "pretrain": "pretrain"}.get(parts[0] if parts else "", "?")  # fmt: skip
    return f"`snakemake {path}` (rule {rule})"


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def broken_result(path: Path, problem: str, results: str | Path | None = None,
                  config: Mapping | None = None) -> ResultFileError:  # fmt: skip
    """The one-line error for a damaged input file: the file, what is wrong, and how to rebuild it."""
    how = make_hint(Path(path), results, config) if results is not None else f"`snakemake {path}`"
    return ResultFileError(f"{path} {problem}; delete it, then rebuild it with {how}")


def read_csv(path: Path, results: str | Path | None = None, **kwargs: Any) -> pd.DataFrame:
    """``pd.read_csv`` that names the file and the rebuild command when it cannot be parsed."""
    try:
        return pd.read_csv(path, **kwargs)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        raise broken_result(path, f"is not a readable CSV ({_one_line(exc)})", results) from None


class Inputs:
    """Reads result files, collecting every missing one so a single error lists them all."""

    def __init__(self, results: str | Path, config: Mapping | None = None):
        self.results = Path(results)
        self.config = config  # names the job that makes a missing or broken file
        self.missing: list[Path] = []

    def exists(self, path: Path) -> bool:
        if path.is_file():
            return True
        if path not in self.missing:
            self.missing.append(path)
        return False

    def broken(self, path: Path, problem: str) -> ResultFileError:
        return broken_result(path, problem, self.results, self.config)

    def json(self, path: Path) -> dict | None:
        """A JSON object written by a stage; None (and listed as missing) when the file does not exist."""
        if not self.exists(path):
            return None
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise self.broken(path, f"is not valid JSON ({_one_line(exc)})") from None
        if not isinstance(obj, dict):
            raise self.broken(path, f"holds a JSON {type(obj).__name__}, not the object its stage writes")
        if not obj:
            raise self.broken(path, "is an empty JSON object")
        return obj

    def result(self, path: Path) -> dict | None:
        """A transfer / fine-tuning result: a cell needs its metric's name and a finite value."""
        obj = self.json(path)
        if obj is None:
            return None
        missing = [k for k in ("metric", "value") if k not in obj]
        if missing:
            raise self.broken(path, f"is incomplete: no {' / '.join(repr(k) for k in missing)}")
        if not isinstance(obj["metric"], str) or not obj["metric"]:
            raise self.broken(path, f"has metric {obj['metric']!r}, not a metric name")
        value = obj["value"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.broken(path, f"has value {value!r}, not a finite number")
        return obj

    def check(self, what: str) -> None:
        if self.missing:
            lines = [f"  {p}: make it with {make_hint(p, self.results, self.config)}" for p in self.missing[:20]]
            more = f"\n  ... and {len(self.missing) - 20} more" if len(self.missing) > 20 else ""
            raise MissingResultError(f"{what}: {len(self.missing)} input file(s) missing:\n" + "\n".join(lines) + more)


# ------------------------------------------------------------------------------------------ metric values


def to_percent(metric: str, value: float | None, raw_metrics: Iterable[str] = ("rmse",)) -> float:
    """Protocols write fractions in [0, 1]; the paper prints percent. Metrics named in ``raw_metrics`` stay."""
    if value is None:
        return math.nan
    value = float(value)
    return value if any(r.lower() in metric.lower() for r in raw_metrics) else 100.0 * value


def transfer_frame(
    inputs: Inputs, pairs: Sequence[tuple[str, str]], targets: Sequence[str], rs: Mapping
) -> pd.DataFrame:
    """Long frame (dataset, variant, target, protocol, metric, value, <extra metrics>) in percent."""
    rows = []
    for d, v in pairs:
        for t in targets:
            res = inputs.result(transfer_path(inputs.results, d, v, t))
            if res is None:
                continue
            metric = str(res.get("metric", "value"))
            row = {"dataset": d, "variant": v, "target": t, "protocol": res.get("protocol"), "metric": metric,
                   "value": to_percent(metric, res.get("value"), rs.get("raw_metrics", ()))}  # fmt: skip
            extra = res.get("metrics") or {}
            for name in rs.get("extra_metrics", ()):
                if name in extra and name != metric and isinstance(extra[name], (int, float)):
                    row[f"extra:{name}"] = to_percent(name, extra[name], rs.get("raw_metrics", ()))
            rows.append(row)
    cols = ["dataset", "variant", "target", "protocol", "metric", "value"]
    return pd.DataFrame(rows, columns=cols) if not rows else pd.DataFrame(rows)


def raw_decimals(long: pd.DataFrame, rs: Mapping, columns: Iterable[str]) -> dict[str, int]:
    """3 decimals for the columns of targets whose metric stays raw (rmse in metres: 0.629, not 0.6)."""
    if long.empty or "metric" not in long:
        return {}
    raw = rs.get("raw_metrics", ())
    targets = set(long.loc[[any(r in str(m) for r in raw) for m in long.metric], "target"])
    return {c: 3 for c in columns if str(c).split(" ")[0] in targets}


def _value(long: pd.DataFrame, d: str, v: str, t: str, col: str = "value") -> float:
    if long.empty or col not in long:
        return math.nan
    hit = long[(long.dataset == d) & (long.variant == v) & (long.target == t)]
    return float(hit[col].iloc[0]) if len(hit) and pd.notna(hit[col].iloc[0]) else math.nan


# ------------------------------------------------------------------------------------------------ tables


@dataclass
class Table:
    name: str
    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    decimals: dict[str, int] = field(default_factory=dict)  # per-column rounding in .md/.tex/.html


def _roles(paper: Mapping, kind: str) -> dict[str, str]:
    return dict((paper.get("roles") or {}).get(kind) or {})


def variant_label(paper: Mapping, variant: str) -> str:
    return _roles(paper, "variants").get(variant, variant)


def table1_plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    return [stats_path(results, d) for d in _table1_datasets(config, rs)]


def _table1_datasets(config: Mapping, rs: Mapping) -> list[str]:
    exp = rs["table1"].get("experiment")
    if has_experiment(config, exp):
        return list(experiment(config, exp)["datasets"])
    return sorted({d for d, _ in all_pairs(config)})


def table1(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    inputs = Inputs(results, config)
    datasets = _table1_datasets(config, rs)
    stats = {d: inputs.json(stats_path(results, d)) for d in datasets}
    inputs.check("table1 (dataset statistics)")
    roles, ppr = _roles(paper, "datasets"), paper.get("table1") or {}
    rows = []
    for d in datasets:
        s = stats[d]
        imb, shots, opi = s.get("imbalance") or {}, s.get("shots") or {}, s.get("objects_per_image") or {}
        role = roles.get(d)
        p = ppr.get(role, {}) if role else {}
        rows.append({
            "dataset": d, "paper row": role, "images": s.get("images"),
            "objects/img": opi.get("mean"), "objects/img median": opi.get("median"), "classes": s.get("classes"),
            "uniform": s.get("uniform"), "gini": imb.get("gini"), "max/min": imb.get("max_min_ratio"),
            "many": shots.get("many"), "medium": shots.get("medium"), "few": shots.get("few"),
            "images paper (K)": p.get("images_k"), "objects/img paper": p.get("objects_per_image"),
            "uniform paper": p.get("uniform"), "discriminative paper": p.get("discriminative"),
        })  # fmt: skip
    frame = pd.DataFrame(rows).astype({c: "Int64" for c in ("images", "classes", "many", "medium", "few")})
    return Table("table1", "Table 1: pretraining datasets", frame,
                 [ROLE_NOTE, "uniform / gini / shots are empty for datasets without image-level classes."],
                 {"gini": 3, "max/min": 2})  # fmt: skip


def table2_plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    pairs, targets = _table2_grid(config, rs)
    return [transfer_path(results, d, v, t) for d, v in pairs for t in targets]


def _table2_grid(config: Mapping, rs: Mapping) -> tuple[list[tuple[str, str]], list[str]]:
    exp = rs["table2"]["experiment"]
    protocols = set(rs["table2"].get("protocols") or [])
    targets = experiment_targets(config, exp, rs.get("exclude_protocols", ()))
    targets = [t for t in targets if not protocols or target_protocol(config, t) in protocols or
               target_protocol(config, t) is None]  # fmt: skip
    return experiment_pairs(config, exp), targets


def reference_dataset(config: Mapping, rs: Mapping, exp: str) -> str:
    datasets = experiment(config, exp)["datasets"]
    ref = rs.get("reference_dataset") or datasets[0]
    if ref not in datasets:
        raise ReportConfigError(
            f"config key report.reference_dataset: {ref!r} is not a dataset of experiments.{exp} ({datasets})"
        )
    return ref


def _per_dataset_table(
    name: str, title: str, config: Mapping, results: str | Path, rs: Mapping, paper: Mapping,
    exp: str, pairs: list[tuple[str, str]], targets: list[str], paper_key: str, extra: bool,
) -> Table:  # fmt: skip
    inputs = Inputs(results, config)
    long = transfer_frame(inputs, pairs, targets, rs)
    inputs.check(f"{name} ({title})")
    ref = reference_dataset(config, rs, exp)
    droles, troles = _roles(paper, "datasets"), _roles(paper, "targets")
    ptab = paper.get(paper_key) or {}
    prow_label = ptab.get("variant")
    pcols = {c for row in (ptab.get("rows") or {}).values() for c in row}
    extra_cols = sorted({c for c in long.columns if c.startswith("extra:")}) if extra else []
    rows = []
    for d, v in pairs:
        role = droles.get(d)
        prow = (ptab.get("rows") or {}).get(role, {}) if variant_label(paper, v) == prow_label else {}
        row: dict[str, Any] = {"dataset": d, "variant": v, "paper row": role}
        for t in targets:
            val = _value(long, d, v, t)
            row[t] = val
            row[f"{t} delta"] = val - _value(long, ref, v, t)
            if troles.get(t) in pcols:
                row[f"{t} paper"] = prow.get(troles[t], math.nan)
            for col in extra_cols:  # a secondary metric gets a column when any row of the target has it
                if long.loc[long.target == t, col].notna().any():
                    row[f"{t} {col[6:]}"] = _value(long, d, v, t, col)
        rows.append(row)
    notes = [f"delta = value - value of the reference dataset {ref} (same variant, same target); metrics in "
             "percent (fractions x 100) except rmse.", ROLE_NOTE]  # fmt: skip
    if prow_label:
        notes.append(f"Paper values are filled on rows whose variant plays '{prow_label}'.")
    frame = pd.DataFrame(rows)
    return Table(name, title, frame, notes, raw_decimals(long, rs, frame.columns))


def table2(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    pairs, targets = _table2_grid(config, rs)
    return _per_dataset_table("table2", "Table 2: frozen-feature classification per pretraining dataset", config,
                              results, rs, paper, rs["table2"]["experiment"], pairs, targets, "table2", False)


def table3(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    exp = rs["table3"]["experiment"]
    targets = experiment_targets(config, exp, rs.get("exclude_protocols", ()))
    return _per_dataset_table("table3", "Table 3: transfer per pretraining dataset", config, results, rs, paper,
                              exp, experiment_pairs(config, exp), targets, "table3", True)


def _experiment_plan(key: str) -> Callable[[Mapping, str | Path, Mapping], list[Path]]:
    def plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
        exp = rs[key]["experiment"]
        targets = experiment_targets(config, exp, rs.get("exclude_protocols", ()))
        return [transfer_path(results, d, v, t) for d, v in experiment_pairs(config, exp) for t in targets]

    return plan


def _ablation_rows(
    config: Mapping, rs: Mapping, paper: Mapping, long: pd.DataFrame, pairs: list[tuple[str, str]],
    targets: list[str], base: dict[str, str], prows: Mapping, per_row: Callable[[str, dict], dict],
) -> list[dict]:  # fmt: skip
    troles = _roles(paper, "targets")
    pcols = {c for row in prows.values() for c in row}
    rows = []
    for d, v in pairs:
        label = variant_label(paper, v)
        row: dict[str, Any] = {"dataset": d, "variant": v, "label": label}
        row.update(per_row(v, variant_settings(config, v)))
        for t in targets:
            row[t] = _value(long, d, v, t)
            row[f"{t} delta"] = row[t] - _value(long, d, base[d], t)
            if troles.get(t) in pcols:
                row[f"{t} paper"] = (prows.get(label) or {}).get(troles[t], math.nan)
        rows.append(row)
    return rows


def experiment_results(
    config: Mapping, results: str | Path, rs: Mapping, key: str, what: str
) -> tuple[str, list[tuple[str, str]], list[str], pd.DataFrame]:
    """The experiment of ``report.<key>``, its (dataset, variant) pairs and targets, and their results as a
    long frame; stops naming every missing result file (``what`` names the table)."""
    exp = rs[key]["experiment"]
    pairs = experiment_pairs(config, exp)
    targets = experiment_targets(config, exp, rs.get("exclude_protocols", ()))
    inputs = Inputs(results, config)
    long = transfer_frame(inputs, pairs, targets, rs)
    inputs.check(what)
    return exp, pairs, targets, long


def table4(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    exp, pairs, targets, long = experiment_results(config, results, rs, "table4", "table4 (invariance ablation)")
    variants = experiment(config, exp)["variants"]
    base_v = next((v for v in variants if variant_label(paper, v) == "MoCo"), variants[0])

    # m-down is relative to the baseline row's momentum (0.999 at paper scale, lower on short schedules).
    base_m = float(variant_settings(config, base_v).get("moco.m", 0.999))

    def flags(v: str, s: dict) -> dict:
        return {
            "MC": int(s.get("crop.n_small", 0) or 0) > 0,
            "CC": int(s.get("crop.n_small", 0) or 0) > 0 and s.get("crop.constraint", "none") != "none",
            "m-down": float(s.get("moco.m", base_m)) < base_m,
            "A+": bool(s.get("aug.aplus", False)),
            "NN": bool(s.get("knn.enabled", False)),
        }

    rows = _ablation_rows(config, rs, paper, long, pairs, targets, {d: base_v for d, _ in pairs},
                          (paper.get("table4") or {}).get("rows") or {}, flags)  # fmt: skip
    notes = [f"delta = value - value of {base_v} ('{variant_label(paper, base_v)}') on the same dataset; setup flags "
             "are read from each variant's composed study config.", ROLE_NOTE]  # fmt: skip
    frame = pd.DataFrame(rows)
    return Table("table4", "Table 4: learning invariances (ablation)", frame, notes, raw_decimals(long, rs, frame.columns))


def mochi_plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    exp = rs["mochi"]["experiment"]
    paths = _experiment_plan("mochi")(config, results, rs)
    if rs["mochi"].get("embedding_stats"):
        paths += [embedding_stats_path(results, d, v) for d, v in experiment_pairs(config, exp)]
    return paths


# Detection metrics a MoCHi row shows beside a detection target's AP50: the slides' "VOC 2007" columns.
MOCHI_DET_METRICS = ("AP", "AP75")


def table_mochi(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    exp = rs["mochi"]["experiment"]
    pairs = experiment_pairs(config, exp)
    targets = experiment_targets(config, exp, rs.get("exclude_protocols", ()))
    det = [t for t in targets if target_protocol(config, t) == "finetune_det"]
    inputs = Inputs(results, config)
    extra = [*rs.get("extra_metrics", ()), *MOCHI_DET_METRICS] if det else rs.get("extra_metrics", ())
    long = transfer_frame(inputs, pairs, targets, {**rs, "extra_metrics": extra})
    emb = {}
    if rs["mochi"].get("embedding_stats"):
        emb = {(d, v): inputs.json(embedding_stats_path(results, d, v)) for d, v in pairs}
    inputs.check("mochi (hard negative mixing)")
    variants = experiment(config, exp)["variants"]
    settings = {v: variant_settings(config, v) for v in variants}
    base_v = next((v for v in variants if mochi_setting(settings[v])[0] is None), variants[0])
    pmochi = paper.get("mochi") or {}

    def paper_row(key: str, nss: tuple) -> dict:
        return next((r for r in pmochi.get(key, []) if (r["n"], r["s"], r["s_prime"]) == tuple(nss)), {})

    rows = []
    for d, v in pairs:
        nss = mochi_setting(settings[v])
        row: dict[str, Any] = {"dataset": d, "variant": v, "label": variant_label(paper, v), "N": nss[0], "s": nss[1],
                               "s'": nss[2]}  # fmt: skip
        for t in targets:
            row[t] = _value(long, d, v, t)
            row[f"{t} delta"] = row[t] - _value(long, d, base_v, t)
            for m in MOCHI_DET_METRICS if t in det else ():  # AP50 is the target's own value
                row[f"{t} {m}"] = _value(long, d, v, t, f"extra:{m}")
                row[f"{t} {m} delta"] = row[f"{t} {m}"] - _value(long, d, base_v, t, f"extra:{m}")
        e = emb.get((d, v)) or {}
        if emb:
            row.update({"alignment": e.get("alignment"), "uniformity": e.get("uniformity"),
                        "false neg. share": e.get("fn_share"), "false neg. chance": e.get("fn_share_chance")})  # fmt: skip
        # An oracle run (mochi.oracle: same-class negatives dropped) has no paper value for its (N, s, s').
        oracle = bool(settings[v].get("mochi.oracle", False))
        p200, p100 = ({}, {}) if oracle else (paper_row("in1k_200ep", nss), paper_row("in100_linear", nss))
        row["IN-1k top1 paper"] = p200.get("top1", math.nan)
        row["VOC det AP50 paper"] = p200.get("voc_ap50", math.nan)
        row["VOC det AP paper"] = p200.get("voc_ap", math.nan)
        row["VOC det AP75 paper"] = p200.get("voc_ap75", math.nan)
        row["IN-100 top1 paper"] = p100.get("top1", math.nan)
        rows.append(row)
    notes = [f"delta = value - value of {base_v} (no MoCHi) on the same dataset. Embedding statistics on L2-"
             "normalised backbone features of the labelled subset: alignment (same-class pairs, alpha 2, lower = "
             "tighter classes), uniformity (t = 2, lower = more uniform), false neg. share = same-class items "
             "among the top-k hardest queue negatives (chance = share under random ranking).",
             "Paper columns: the MoCHi slides' ImageNet-1k 200-epoch linear top-1, VOC 2007 test detection AP50 / "
             "AP / AP75 (Faster R-CNN R50-C4 fine-tuned on VOC07+12 trainval) and ImageNet-100 linear top-1 for the "
             "same (N, s, s') (MoCo-v2 row: no MoCHi); empty where not reported."]  # fmt: skip
    if det:
        notes.insert(1, f"Detection ({', '.join(det)}): the column is AP50, beside it AP (mean over IoU 0.50:0.95) "
                        "and AP75, each with its delta.")  # fmt: skip
    frame = pd.DataFrame(rows).astype({"N": "Int64", "s": "Int64", "s'": "Int64"})
    stats_cols = ["alignment", "uniformity", "false neg. share", "false neg. chance"]
    return Table("mochi", "MoCHi: hard negative mixing (N, s, s')", frame, notes, dict.fromkeys(stats_cols, 3))


def table_mechanism(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    exp, pairs, targets, long = experiment_results(config, results, rs, "mechanism", "mechanism (MoCo v1 vs v2)")
    base_v = experiment(config, exp)["variants"][0]

    def setup(v: str, s: dict) -> dict:
        return {"tau": s.get("moco.T"), "mlp head": s.get("moco.mlp"), "augmentation": s.get("aug.pipeline")}

    rows = _ablation_rows(config, rs, paper, long, pairs, targets, {d: base_v for d, _ in pairs}, {}, setup)
    frame = pd.DataFrame(rows)
    return Table("mechanism", "MoCo v1 vs MoCo v2", frame, [f"delta = value - value of {base_v} on the same dataset."],
                 raw_decimals(long, rs, frame.columns))


@dataclass(frozen=True)
class TableSpec:
    build: Callable[[Mapping, str | Path, Mapping, Mapping], Table]
    plan: Callable[[Mapping, str | Path, Mapping], list[Path]]
    enabled: Callable[[Mapping, Mapping], bool]
    category: str
    title: str


def _exp_enabled(key: str) -> Callable[[Mapping, Mapping], bool]:
    return lambda c, rs: has_experiment(c, rs[key]["experiment"])


def _sec4(name: str) -> Callable[..., Any]:
    """A function of analysis.tables_sec4, imported at the first call: that module imports this one's helpers."""

    def call(*args: Any) -> Any:
        from analysis import tables_sec4

        return getattr(tables_sec4, name)(*args)

    return call


def _mech_k(name: str) -> Callable[..., Any]:
    """A function of analysis.mechanism_k, imported at the first call (it imports this module's helpers)."""

    def call(*args: Any) -> Any:
        from analysis import mechanism_k

        return getattr(mechanism_k, name)(*args)

    return call


SEC3, SEC4, MOCHI = "Sec. 3: dataset biases", "Sec. 4: learning invariances", "MoCHi: hard negative mixing"
TABLES: dict[str, TableSpec] = {
    "table1": TableSpec(table1, table1_plan, lambda c, rs: bool(_table1_datasets(c, rs)), SEC3,
                        "Table 1: pretraining datasets"),
    "table2": TableSpec(table2, table2_plan, _exp_enabled("table2"), SEC3, "Table 2: linear probes per dataset"),
    "table3": TableSpec(table3, _experiment_plan("table3"), _exp_enabled("table3"), SEC3, "Table 3: transfer per dataset"),
    "table4": TableSpec(table4, _experiment_plan("table4"), _exp_enabled("table4"), SEC4,
                        "Table 4: invariance ablation"),
    "table5": TableSpec(_sec4("table5"), _sec4("table5_plan"), _exp_enabled("table5"), SEC4,
                        "Table 5: DAVIS-2017 video instance segmentation"),
    "table6": TableSpec(_sec4("table6"), _sec4("table6_plan"), _exp_enabled("table6"), SEC4,
                        "Table 6: VOC semantic segment retrieval"),
    "table7": TableSpec(_sec4("table7"), _experiment_plan("table7"), _exp_enabled("table7"), SEC4,
                        "Table 7: augmentation policies"),
    "table8": TableSpec(_sec4("table8"), _sec4("table8_plan"), _sec4("table8_enabled"), SEC4,
                        "Table 8: kNN-MoCo k and lambda"),
    "table9": TableSpec(_sec4("table9"), _experiment_plan("table9"), _exp_enabled("table9"), SEC4,
                        "Table 9: state-of-the-art comparison"),
    "mochi": TableSpec(table_mochi, mochi_plan, _exp_enabled("mochi"), MOCHI, "MoCHi (N, s, s')"),
    "mechanism": TableSpec(table_mechanism, _experiment_plan("mechanism"), _exp_enabled("mechanism"),
                           "MoCo mechanism", "MoCo v1 vs v2"),
    "mechanism_k": TableSpec(_mech_k("table"), _mech_k("plan"), _mech_k("enabled"), "MoCo mechanism",
                             "MoCo Fig 3: mechanisms vs K"),
}  # fmt: skip


def enabled_tables(config: Mapping, rs: Mapping | None = None) -> list[str]:
    """Tables whose experiment exists in this config (the report asks for exactly these)."""
    rs = report_settings(config) if rs is None else rs
    return [name for name, spec in TABLES.items() if spec.enabled(config, rs)]


def table_inputs(config: Mapping, results: str | Path, names: Iterable[str] | None = None) -> list[str]:
    """Every file the given tables read (for a Snakemake rule's input)."""
    rs = report_settings(config)
    names = enabled_tables(config, rs) if names is None else names
    out: list[str] = []
    for name in names:
        out += [str(p) for p in TABLES[name].plan(config, results, rs) if str(p) not in out]
    return list(dict.fromkeys(out))


def table_outputs(out_dir: str | Path, name: str) -> list[str]:
    return [str(Path(out_dir) / f"{name}.{ext}") for ext in TABLE_FORMATS]


# ------------------------------------------------------------------------------------------------ writers


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _cell(value: Any, decimals: int, empty: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return empty
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{decimals}f}" if abs(float(value)) >= 10 ** -decimals or value == 0 else f"{value:.3g}"
    return str(value)


def to_markdown(table: Table, decimals: int = 1) -> str:
    cols = list(table.frame.columns)
    lines = [f"**{table.title}**", "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.frame.iterrows():
        lines.append("| " + " | ".join(_cell(row[c], table.decimals.get(c, decimals), "–").replace("|", "\\|")
                                       for c in cols) + " |")  # fmt: skip
    lines += [""] + [f"_{n}_" for n in table.notes]
    return "\n".join(lines) + "\n"


_TEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--"}  # fmt: skip


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPE.get(ch, ch) for ch in str(text))


def to_latex(table: Table, decimals: int = 1) -> str:
    cols = list(table.frame.columns)
    align = "".join("r" if pd.api.types.is_numeric_dtype(table.frame[c]) else "l" for c in cols)
    lines = [r"% generated by analysis.tables; needs \usepackage{booktabs}", r"\begin{table}[t]", r"\centering",
             r"\caption{" + tex_escape(table.title) + "}", r"\resizebox{\linewidth}{!}{%",
             r"\begin{tabular}{" + align + "}", r"\toprule", " & ".join(tex_escape(c) for c in cols) + r" \\",
             r"\midrule"]  # fmt: skip
    for _, row in table.frame.iterrows():
        lines.append(" & ".join(tex_escape(_cell(row[c], table.decimals.get(c, decimals), "--")) for c in cols)
                     + r" \\")  # fmt: skip
    lines += [r"\bottomrule", r"\end{tabular}}"]
    lines += [r"\par\footnotesize " + tex_escape(n) for n in table.notes]
    lines += [r"\end{table}"]
    return "\n".join(lines) + "\n"


def to_html(table: Table, decimals: int = 1) -> str:
    cols = list(table.frame.columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(row[c], table.decimals.get(c, decimals), '–'))}</td>"
                         for c in cols) + "</tr>"  # fmt: skip
        for _, row in table.frame.iterrows()
    )
    notes = "".join(f"<p><small>{html.escape(n)}</small></p>" for n in table.notes)
    style = "table{border-collapse:collapse;font-family:sans-serif;font-size:13px}td,th{border:1px solid #ccc;" \
            "padding:3px 6px;text-align:right}th{background:#eee}"  # fmt: skip
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(table.title)}</title>"
            f"<style>{style}</style></head><body><h3>{html.escape(table.title)}</h3><table><thead><tr>{head}"
            f"</tr></thead><tbody>{body}</tbody></table>{notes}</body></html>\n")  # fmt: skip


def write_table(table: Table, out_dir: str | Path, decimals: int = 1) -> list[Path]:
    """``<out>/<name>.{csv,md,tex,html}``, each written atomically; the CSV keeps 4 decimals."""
    out_dir = Path(out_dir)
    paths = {ext: out_dir / f"{table.name}.{ext}" for ext in TABLE_FORMATS}
    atomic_write_text(paths["csv"], table.frame.round(4).to_csv(index=False))
    atomic_write_text(paths["md"], to_markdown(table, decimals))
    atomic_write_text(paths["tex"], to_latex(table, decimals))
    atomic_write_text(paths["html"], to_html(table, decimals))
    return list(paths.values())


def build_tables(
    config: Mapping, results: str | Path, out_dir: str | Path, only: Iterable[str] | None = None,
    paper: Mapping | None = None,
) -> dict[str, Table]:  # fmt: skip
    """Build and write the requested tables (default: every enabled one); returns them by name."""
    paper = load_paper_values() if paper is None else paper
    rs = report_settings(config, paper)
    names = list(only) if only else enabled_tables(config, rs)
    unknown = [n for n in names if n not in TABLES]
    if unknown:
        raise ReportConfigError(f"unknown table(s) {unknown}; choose from {sorted(TABLES)}")
    out = {}
    for name in names:
        table = TABLES[name].build(config, results, rs, paper)
        write_table(table, out_dir, int(rs.get("decimals", 1)))
        log.info("%s: %d rows -> %s", name, len(table.frame), Path(out_dir) / f"{name}.*")
        out[name] = table
    return out


# ---------------------------------------------------------------------------------------------------- CLI


def load_config_arg(config_json: str | None, configfile: str | None) -> dict:
    """The study config from ``--config-json`` (what the rules pass) or ``--configfile`` (by hand)."""
    if config_json:
        try:
            cfg = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ReportConfigError(f"--config-json is not valid JSON: {exc}") from exc
    elif configfile:
        cfg = yaml.safe_load(Path(configfile).read_text())
    else:
        raise ReportConfigError("pass the study config with --config-json '<json>' or --configfile config.yaml")
    if not isinstance(cfg, dict):
        raise ReportConfigError("the config must be a mapping (the content of config.yaml)")
    return cfg


def split_only(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [n for v in values for n in v.split(",") if n]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rebuild the paper's tables from results/ files.")
    ap.add_argument("--config-json", help="the study config as JSON (rules pass the whole config)")
    ap.add_argument("--configfile", help="alternatively, a config YAML file")
    ap.add_argument("--results", default=None, help="results root (default: the config's `results`)")
    ap.add_argument("--out", default=None, help="output folder (default: <results>/tables)")
    ap.add_argument("--only", action="append", help=f"table name(s), comma-separated; from {sorted(TABLES)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config_arg(args.config_json, args.configfile)
        results = args.results or cfg.get("results", "results")
        build_tables(cfg, results, args.out or Path(results) / "tables", split_only(args.only))
    except (ReportConfigError, MissingResultError, ResultFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
