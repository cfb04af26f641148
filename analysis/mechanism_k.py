"""MoCo's Figure 3 (He et al. 2020): accuracy against the dictionary size K for the three mechanisms.

The ``mechanism_k`` experiment trains MoCo (queue), end-to-end and memory-bank variants at several K
(study/mechanisms.py). K of a run is read from its composed study config: ``moco.K`` for the queue and the bank,
the *global batch* (``batch_size`` x the GPUs of ``pretrain.resources``) for end-to-end, whose dictionary is the
batch (K - 1 negatives, as in the paper's caption). Table: one row per (dataset, variant) with mechanism, K and
every target; figure: one panel per target, accuracy vs K on a log2 axis, one line per mechanism, the paper's
IN-1M linear numbers (``paper_values.yaml: mechanism_k``) as dashed lines with hollow markers on a twin scale-free
overlay (they are ImageNet-1M top-1, not our targets: compare the trends, not the levels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import tables as T

MECH_LABELS = {"queue": "MoCo", "end_to_end": "end-to-end", "memory_bank": "memory bank"}


def _gpus(config: Mapping) -> int:
    res = (config.get("pretrain") or {}).get("resources") or {}
    return max(1, int(res.get("gpu", 0) or 0))


def mechanism_and_k(config: Mapping, variant: str) -> tuple[str, int]:
    """(mechanism, K) of a variant from its composed settings (end-to-end: K = the global batch)."""
    s = T.variant_settings(config, variant)
    mech = str(s.get("mechanism") or "queue")
    if mech == "end_to_end":
        return mech, int(s.get("batch_size", 1)) * _gpus(config)
    return mech, int(s.get("moco.K", 0))


def _exp(rs: Mapping) -> str:
    return rs["mechanism_k"]["experiment"]


def plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    exp = _exp(rs)
    targets = T.experiment_targets(config, exp, rs.get("exclude_protocols", ()))
    return [T.transfer_path(results, d, v, t) for d, v in T.experiment_pairs(config, exp) for t in targets]


def enabled(config: Mapping, rs: Mapping) -> bool:
    return T.has_experiment(config, rs.get("mechanism_k", {}).get("experiment"))


def frame(config: Mapping, results: str | Path, rs: Mapping) -> pd.DataFrame:
    """Long frame: dataset, variant, mechanism, K, target, metric, value (percent)."""
    exp = _exp(rs)
    pairs = T.experiment_pairs(config, exp)
    targets = T.experiment_targets(config, exp, rs.get("exclude_protocols", ()))
    inputs = T.Inputs(results, config)
    long = T.transfer_frame(inputs, pairs, targets, rs)
    inputs.check("mechanism_k (MoCo Fig 3: accuracy vs K per mechanism)")
    mk = {v: mechanism_and_k(config, v) for _, v in pairs}
    long["mechanism"] = [mk[v][0] for v in long["variant"]]
    long["K"] = [mk[v][1] for v in long["variant"]]
    return long


def paper_points(paper: Mapping) -> pd.DataFrame:
    rows = [{"mechanism": m, "K": int(p["K"]), "value": float(p["top1"])}
            for m, pts in (paper.get("mechanism_k") or {}).get("in1m_linear", {}).items() for p in pts or []]
    return pd.DataFrame(rows, columns=["mechanism", "K", "value"])


def table(config: Mapping, results: str | Path, rs: Mapping, paper: Mapping) -> T.Table:
    long = frame(config, results, rs)
    targets = T.experiment_targets(config, _exp(rs), rs.get("exclude_protocols", ()))
    pp = paper_points(paper)
    rows: list[dict[str, Any]] = []
    for d, v in T.experiment_pairs(config, _exp(rs)):
        mech, K = mechanism_and_k(config, v)
        row: dict[str, Any] = {"dataset": d, "variant": v, "mechanism": MECH_LABELS.get(mech, mech), "K": K,
                               "negatives": K - 1 if mech == "end_to_end" else K}
        for t in targets:
            row[t] = T._value(long, d, v, t)
        hit = pp[(pp.mechanism == mech) & (pp.K == K)]
        row["paper IN-1M top-1"] = float(hit.value.iloc[0]) if len(hit) else math.nan
        rows.append(row)
    notes = ["K = moco.K for MoCo and the memory bank; for end-to-end K = the global batch (K - 1 negatives).",
             "paper IN-1M top-1: MoCo (He et al. 2020) Fig 3 / Sec 4.1 text, ResNet-50, 200 epochs; blank where "
             "the text gives no number for that point."]
    return T.Table("mechanism_k", "MoCo Fig 3: contrastive mechanisms vs dictionary size K", pd.DataFrame(rows),
                   notes)


def figure(config: Mapping, results: str | Path, out_dir: str | Path, rs: Mapping) -> Any:
    from analysis import figures as F

    sns = F._plotting()[0]
    long = frame(config, results, rs)
    targets = T.experiment_targets(config, _exp(rs), rs.get("exclude_protocols", ()))
    pp = paper_points(T.load_paper_values())
    data = long[["dataset", "variant", "mechanism", "K", "target", "metric", "value"]].sort_values(
        ["target", "dataset", "mechanism", "K"], ignore_index=True)
    palette = {"queue": "tab:blue", "end_to_end": "tab:orange", "memory_bank": "tab:green"}
    fig, axes = F._grid(len(targets))
    for ax, t in zip(axes, targets, strict=True):
        sub = data[data.target == t]
        sns.lineplot(data=sub, x="K", y="value", hue="mechanism", style="dataset", marker="o", palette=palette,
                     ax=ax, hue_order=[m for m in palette if m in set(sub.mechanism)])
        ax.set_xscale("log", base=2)
        ax.set(xlabel="K (end-to-end: batch; log2)", ylabel=f"{sub.metric.iloc[0] if len(sub) else ''} (%)",
               title=t)
        if len(pp):
            twin = ax.twinx()
            for m, g in pp.groupby("mechanism"):
                twin.plot(g.K, g.value, "--", marker="s", mfc="none", color=palette.get(str(m), "0.4"),
                          label=f"paper {MECH_LABELS.get(str(m), m)}")
            twin.set_ylabel("paper IN-1M top-1 (%, dashed)")
            twin.legend(fontsize="x-small", loc="lower right")
        ax.legend(fontsize="small", loc="upper left")
    paths = F._save(fig, data, out_dir, "mechanism_k")
    return F.FigureResult("mechanism_k", paths, data)
