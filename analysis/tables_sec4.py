"""The paper's Sec. 4 tables beyond the Table 4 ablation, rebuilt from ``results/`` files only.

``table5`` (DAVIS-2017 video instance segmentation on frozen features: J_m, F_m, J&F), ``table6`` (VOC semantic
segment retrieval: mIoU on the 7-class subset and on all 21 classes), ``table7`` (augmentation policy of the
positives, read from each variant's composed ``aug.*`` settings) and ``table8`` (kNN-MoCo k / lambda / warm-up).
Each reads the experiment named in ``report.<table>.experiment`` (defaults in paper_values.yaml).

Kept out of analysis/tables.py (which holds the shared helpers this module imports and the ``TABLES`` registry);
that registry calls these builders through a lazy import, so either module can be imported first.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.tables import (
    ROLE_NOTE,
    Inputs,
    ReportConfigError,
    Table,
    _roles,
    _value,
    broken_result,
    experiment_pairs,
    experiment_targets,
    has_experiment,
    is_knn_variant,
    knn_setting,
    raw_decimals,
    target_protocol,
    to_percent,
    transfer_frame,
    transfer_path,
    variant_label,
    variant_settings,
)

PAPER_MATCH_NOTE = ("Paper values sit on rows whose variant plays the paper's method (roles.variants, e.g. MoCo, "
                    "+MC) and whose dataset plays the paper's pretraining data (COCO).")  # fmt: skip


# ------------------------------------------------------------------------------------------------ helpers


def _protocol_targets(config: Mapping, exp: str, protocol: str, table: str) -> list[str]:
    """The experiment's targets of one protocol (Tables 5 / 6 read metrics only that protocol writes)."""
    all_targets = experiment_targets(config, exp)
    targets = [t for t in all_targets if target_protocol(config, t) == protocol]
    if not targets:
        raise ReportConfigError(
            f"config key experiments.{exp}.targets: {table} needs a target with protocol {protocol} (has "
            f"{all_targets}); add one, or point report.{table}.experiment at another experiment"
        )
    return targets


def _protocol_plan(table: str, protocol: str) -> Callable[[Mapping, str | Path, Mapping], list[Path]]:
    def plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
        exp = rs[table]["experiment"]
        targets = _protocol_targets(config, exp, protocol, table)
        return [transfer_path(results, d, v, t) for d, v in experiment_pairs(config, exp) for t in targets]

    return plan


table5_plan = _protocol_plan("table5", "video_propagation")
table6_plan = _protocol_plan("table6", "segment_retrieval")


def _results(inputs: Inputs, pairs: Sequence[tuple[str, str]], targets: Sequence[str]) -> dict[tuple, dict]:
    """Result JSON per (dataset, variant, target); missing files are collected by ``inputs``."""
    return {(d, v, t): inputs.result(transfer_path(inputs.results, d, v, t)) or {}
            for d, v in pairs for t in targets}  # fmt: skip


def _metric(res: Mapping, name: str, path: Path, rs: Mapping) -> float:
    """A named metric of a result JSON in percent; a file without it is stale, so say how to remake it."""
    metrics = res.get("metrics") or {}
    if isinstance(metrics.get(name), (int, float)):
        return to_percent(name, metrics[name], rs.get("raw_metrics", ()))
    if res.get("metric") == name:
        return to_percent(name, res.get("value"), rs.get("raw_metrics", ()))
    raise broken_result(path, f"has no metric {name!r} (metrics: {sorted(metrics)})")


def _data_role(paper: Mapping, dataset: str) -> str | None:
    return _roles(paper, "datasets").get(dataset)


def _on_paper_data(paper: Mapping, ptab: Mapping, dataset: str) -> bool:
    """Whether the dataset plays the paper table's pretraining data (any dataset when the table names none)."""
    return "data" not in ptab or _data_role(paper, dataset) == ptab["data"]


def _paper_row(rows: Sequence[Mapping], paper: Mapping, dataset: str, variant: str) -> Mapping:
    """The paper row whose method the variant plays and whose pretraining data the dataset plays ({} if none)."""
    label, data = variant_label(paper, variant), _data_role(paper, dataset)
    return next((r for r in rows if r.get("variant") == label and r.get("data") == data), {})


def _method(row: Mapping) -> str | None:
    return f"{row['method']} ({row['data']})" if row else None


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:g}"


def _others_note(table: str, rows: Sequence[Mapping], cols: Sequence[str], names: str) -> str:
    """The paper's rows for methods this study does not train, as a note (no measured cell to leave empty)."""
    others = [r for r in rows if not r.get("variant")]
    items = ", ".join(f"{r['method']}" + (f" ({r['data']})" if r.get("data") else "") + " "
                      + " / ".join(_fmt(r.get(c)) for c in cols) for r in others)  # fmt: skip
    return f"Other methods in the paper's {table} (not reproduced here; {names}): {items}." if others else ""


# ----------------------------------------------------------------------------------- Table 5: DAVIS-2017


def table5(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    exp = rs["table5"]["experiment"]
    pairs, targets = experiment_pairs(config, exp), _protocol_targets(config, exp, "video_propagation", "table5")
    inputs = Inputs(results, config)
    res = _results(inputs, pairs, targets)
    inputs.check("table5 (DAVIS-2017 video instance segmentation)")
    prows = (paper.get("table5") or {}).get("rows") or []
    rows = []
    for d, v in pairs:
        p = _paper_row(prows, paper, d, v)
        pj, pf = p.get("J", math.nan), p.get("F", math.nan)
        for t in targets:
            r, path = res[(d, v, t)], transfer_path(results, d, v, t)
            rows.append({"dataset": d, "variant": v, "target": t, "paper method": _method(p),
                         "J_m": _metric(r, "J_mean", path, rs), "F_m": _metric(r, "F_mean", path, rs),
                         "J&F": _metric(r, "JF_mean", path, rs), "J_m paper": pj, "F_m paper": pf,
                         "J&F paper": (pj + pf) / 2})  # fmt: skip
    notes = ["J_m = region similarity (mask IoU), F_m = boundary F-measure, both averaged over the objects of all "
             "videos, in percent; J&F = their mean (davis2017-evaluation). Labels of frame 0 are propagated with "
             "frozen features (the target's settings are in each result JSON).",
             PAPER_MATCH_NOTE + " The paper prints J_m and F_m only: J&F paper is their mean.",
             _others_note("Table 5", prows, ("J", "F"), "J_m / F_m"), ROLE_NOTE]  # fmt: skip
    return Table("table5", "Table 5: DAVIS-2017 video instance segmentation (frozen features)",
                 pd.DataFrame(rows), [n for n in notes if n])  # fmt: skip


# ----------------------------------------------------------------------------- Table 6: segment retrieval

_MIOU = re.compile(r"^mIoU_(\d+)$")


def _miou_counts(res: Mapping) -> list[int]:
    """Class counts n of the ``mIoU_<n>`` metrics a segment-retrieval result carries."""
    names = list(res.get("metrics") or {}) + [str(res.get("metric"))]
    return sorted({int(m.group(1)) for m in map(_MIOU.match, names) if m})


def table6(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    exp = rs["table6"]["experiment"]
    pairs, targets = experiment_pairs(config, exp), _protocol_targets(config, exp, "segment_retrieval", "table6")
    inputs = Inputs(results, config)
    res = _results(inputs, pairs, targets)
    inputs.check("table6 (VOC semantic segment retrieval)")
    for (d, v, t), r in res.items():
        if not _miou_counts(r):
            path = transfer_path(results, d, v, t)
            raise ValueError(f"{path} has no mIoU_<n classes> metric; delete it and rerun `snakemake {path}`")
    # the class subset (the paper's 7 classes) has fewer classes than the full label set (21 with background)
    counts = sorted({n for r in res.values() for n in _miou_counts(r)})
    paper_col = {n: "subset" if n < counts[-1] else "all" for n in counts}
    prows = (paper.get("table6") or {}).get("rows") or []
    rows = []
    for d, v in pairs:
        p = _paper_row(prows, paper, d, v)
        for t in targets:
            r, path = res[(d, v, t)], transfer_path(results, d, v, t)
            row: dict[str, Any] = {"dataset": d, "variant": v, "target": t, "paper method": _method(p)}
            row.update({f"{n} classes": _metric(r, f"mIoU_{n}", path, rs) for n in counts})
            row.update({f"{n} classes paper": _paper_num(p.get(paper_col[n])) for n in counts})
            rows.append(row)
    notes = ["mIoU in percent of val regions labelled by their nearest train region (K-means segments of the "
             "frozen spatial features, mean embedding per segment); the smaller class count is the paper's 7-class "
             "subset (other classes ignored in bank and ground truth), the larger all classes with background.",
             PAPER_MATCH_NOTE, _others_note("Table 6", prows, ("subset", "all"), "7 / 21 classes"),
             ROLE_NOTE]  # fmt: skip
    return Table("table6", "Table 6: VOC semantic segment retrieval (frozen features)", pd.DataFrame(rows),
                 [n for n in notes if n])


def _paper_num(value: Any) -> float:
    return math.nan if value is None else float(value)


# ------------------------------------------------------------------------------ Table 7: augmentation policy


def aug_policy(settings: Mapping[str, Any]) -> tuple[str, float]:
    """(policy, P(standard)) of the positives from composed ``aug.*`` settings: with ``aug.aplus`` every view
    but the key takes the standard pipeline with probability ``aug.aplus_p``, else AutoAugment (study/augment.py
    EitherPipeline), so p = 0 is AutoAugment only and p = 1 the standard pipeline."""
    if not settings.get("aug.aplus", False):
        return "Standard", 1.0
    p = float(settings.get("aug.aplus_p", 0.5))
    if p <= 0.0:
        return "AutoAugment", 0.0
    if p >= 1.0:
        return "Standard", 1.0
    return "Standard or AutoAugment", p


def table7(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    exp = rs["table7"]["experiment"]
    pairs = experiment_pairs(config, exp)
    targets = experiment_targets(config, exp, rs.get("exclude_protocols", ()))
    inputs = Inputs(results, config)
    long = transfer_frame(inputs, pairs, targets, rs)
    inputs.check("table7 (augmentation policies)")
    ptab = paper.get("table7") or {}
    troles = _roles(paper, "targets")
    rows = []
    for d, v in pairs:
        policy, p_std = aug_policy(variant_settings(config, v))
        prow = (ptab.get("rows") or {}) if _on_paper_data(paper, ptab, d) else {}
        row: dict[str, Any] = {"dataset": d, "variant": v, "policy": policy, "P(standard)": p_std}
        for t in targets:
            row[t] = _value(long, d, v, t)
            if troles.get(t) == ptab.get("role"):
                row[f"{t} paper"] = prow.get(policy, math.nan)
        rows.append(row)
    notes = ["Policy of the positives (every crop but the key, which always gets the standard pipeline), read "
             "from each variant's composed aug.aplus / aug.aplus_p: Standard = the aug.pipeline recipe (MoCo-v2: "
             "colour jitter, grayscale, blur); AutoAugment = flip + ImageNet AutoAugment policy; P(standard) = "
             "probability of the standard one.",
             "Paper: VOC07 SVM mAP of the Sec. 4.1 constrained multi-crop model (COCO, 200 epochs), beside "
             "targets that play VOC07 classification.", ROLE_NOTE]  # fmt: skip
    return Table("table7", "Table 7: augmentation policies applied to the random crops", pd.DataFrame(rows), notes,
                 {"P(standard)": 2})  # fmt: skip


# ------------------------------------------------------------------------------------- Table 8: kNN-MoCo


def _knn_grid(config: Mapping, rs: Mapping) -> list[tuple[str, str, list[str]]]:
    """Table 8's (dataset, variant, targets): the report's table8 experiment in its order (its kNN-off variant
    is the lambda = 0 row); without one, every variant of any experiment that enables kNN-MoCo or sets knn.*."""
    exp = rs["table8"].get("experiment")
    if has_experiment(config, exp):
        targets = experiment_targets(config, exp, rs.get("exclude_protocols", ()))
        return [(d, v, list(targets)) for d, v in experiment_pairs(config, exp)]
    exps = rs["table8"].get("experiments") or list(config.get("experiments") or {})
    out: list[tuple[str, str, list[str]]] = []
    for name in exps:
        targets = experiment_targets(config, name, rs.get("exclude_protocols", ()))
        for d, v in experiment_pairs(config, name):
            if not is_knn_variant(config, v):
                continue
            hit = next((row for row in out if row[:2] == (d, v)), None)
            if hit is None:
                out.append((d, v, list(targets)))
            else:
                hit[2].extend(t for t in targets if t not in hit[2])
    return out


def table8_plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    return [transfer_path(results, d, v, t) for d, v, ts in _knn_grid(config, rs) for t in ts]


def table8_enabled(config: Mapping, rs: Mapping) -> bool:
    return bool(_knn_grid(config, rs))


def _knn_paper(rows: Sequence[Mapping], k: int | None, lam: float, warm: float) -> float:
    """The paper's value for (k, lambda) without warm-up; lambda = 0 is kNN off, so its k and warm-up are moot."""
    hit = (r["value"] for r in rows if math.isclose(r["lam"], lam)
           and (lam == 0 or (r["k"] == k and r.get("warmup_epochs", 0) == warm)))  # fmt: skip
    return next(hit, math.nan)


def table8(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    grid = _knn_grid(config, rs)
    inputs = Inputs(results, config)
    longs = [transfer_frame(inputs, [(d, v)], ts, rs) for d, v, ts in grid]
    inputs.check("table8 (kNN-MoCo ablation)")
    long = pd.concat(longs, ignore_index=True) if longs else transfer_frame(inputs, [], [], rs)
    ptab = paper.get("table8") or {}
    role, setup = ptab.get("role"), ptab.get("setup") or {}
    troles = _roles(paper, "targets")
    targets = list(dict.fromkeys(t for _, _, ts in grid for t in ts))
    rows, differ = [], []
    for d, v, ts in grid:
        s = variant_settings(config, v)
        k, lam = knn_setting(s)
        warm = float(s.get("knn.warmup_epochs", 0) or 0)
        warm = int(warm) if warm.is_integer() else warm
        if any(s.get(key, val) != val for key, val in setup.items()) and v not in differ:
            differ.append(v)
        row: dict[str, Any] = {"dataset": d, "variant": v, "k": k, "lambda": lam, "warm-up epochs": warm}
        for t in targets:
            row[t] = _value(long, d, v, t) if t in ts else math.nan
            if role and troles.get(t) == role:
                on_data = _on_paper_data(paper, ptab, d)
                row[f"{t} paper"] = _knn_paper(ptab.get("rows", []), k, lam, warm) if on_data else math.nan
        rows.append(row)
    exp = rs["table8"].get("experiment")
    if has_experiment(config, exp):
        source = f"Rows: the variants of experiments.{exp} in order"
    else:
        source = "Rows: every variant (of any experiment) that enables kNN-MoCo or sets knn.*"
    notes = [f"{source}; k, lambda and warm-up epochs (no kNN loss before) are the composed values (lambda = 0 "
             "when kNN-MoCo is off, the paper's multi-crop row).",
             "Paper values match (k, lambda) on rows without warm-up (the paper describes none; the public code's "
             "5-epoch warm-up is its own row) whose dataset plays COCO.", ROLE_NOTE]  # fmt: skip
    if differ:
        fixed = ", ".join(f"{key}={str(val).lower() if isinstance(val, bool) else val}"
                          for key, val in setup.items())  # fmt: skip
        notes.insert(2, f"The paper's Table 8 models train with {fixed}; rows that do not (compare orderings "
                        f"only): {', '.join(differ)}.")  # fmt: skip
    if not rows:
        notes.insert(0, "No variant of the experiments uses kNN-MoCo: add e.g. `knn_k5: [method=knn_moco, "
                        "knn.k=5]`.")  # fmt: skip
    empty = ["dataset", "variant", "k", "lambda", "warm-up epochs"]
    frame = pd.DataFrame(rows, columns=empty if not rows else None)
    return Table("table8", "Table 8: kNN-MoCo, number of neighbours k and weight lambda", frame, notes)


# ------------------------------------------------------------------------------------------------ Table 9


def table9(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> Table:
    """State-of-the-art comparison: the experiment's variants (first = the baseline of the deltas) on every
    target, fine-tuned and frozen; paper values on rows whose variant label a paper row ``plays``."""
    from analysis.tables import _ablation_rows, experiment, experiment_results

    exp, pairs, targets, long = experiment_results(config, results, rs, "table9",
                                                   "table9 (state-of-the-art comparison)")  # fmt: skip
    rows_p = (paper.get("table9") or {}).get("rows") or []
    prows = {label: r for r in rows_p for label in r.get("plays") or []}
    base_v = experiment(config, exp)["variants"][0]

    def method(v: str, s: dict) -> dict:
        return {"paper row": (prows.get(variant_label(paper, v)) or {}).get("method")}

    rows = _ablation_rows(config, rs, paper, long, pairs, targets, {d: base_v for d, _ in pairs}, prows, method)
    cols = ["voc_seg", "cityscapes_seg", "nyud_seg", "voc07_cls", "imagenet_cls", "places", "davis_jf", "nyud_depth"]
    others = [{**r, "variant": None} for r in rows_p if not r.get("plays")]
    notes = [f"delta = value - value of {base_v} on the same dataset; metrics in percent except rmse (lower is "
             "better). The paper's models are trained 800 epochs on COCO.", ROLE_NOTE,
             _others_note("Table 9", others, cols, " / ".join(cols))]  # fmt: skip
    frame = pd.DataFrame(rows)
    return Table("table9", "Table 9: state-of-the-art comparison", frame, [n for n in notes if n],
                 raw_decimals(long, rs, frame.columns))
