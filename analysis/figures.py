"""The paper's figures from ``results/`` files (seaborn, Agg): PNG + PDF + the CSV of the plotted data.

    python -m analysis.figures --config-json '<the study config as JSON>' --results results \
        --out results/figures [--only fig1[,fig4]]

- ``fig1``: IoU between the two views under the default crop settings of common frameworks (sampled with
  ``study.crops``; 10^6 pairs per setting on a 640x480 image unless ``report.fig1`` says otherwise), plus
  ``fig1_iou.csv``: share IoU = 0, share < 0.1, mean and the 5/25/50/75/95 % quantiles per setting.
- ``fig2``: transfer metric vs IoU ceiling (each variant's composed ``crop.max_iou``; 1.0 = no ceiling).
- ``fig3``: training loss curves per IoU ceiling (``metrics.csv`` of each run).
- ``fig4``: constrained multi-crop drawn on a real image: anchor (key), query, accepted (green) and rejected
  (red) small crops, with the crop module's own sampler and constraint tests.
- ``fig5``: online-monitor curves (kNN and view-matching top-1 from ``metrics.csv``) vs pretraining wall time,
  two-crop vs multi-crop (analysis/figures_sec4.py).
- ``fig6``: class activation maps, two-crop vs multi-crop model, one image per class with true and predicted
  labels (the CAM protocol's ``.npz``; analysis/figures_sec4.py).
- ``mochi``: alignment / uniformity and share of false negatives per checkpoint (analysis.embedding_stats).

Each builder returns a ``FigureResult`` whose ``data`` frame is exactly what was plotted (tests compare it with
the inputs); the same frame is written as ``<figure>.csv`` next to the images.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analysis import tables as T
from study import crops

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger("analysis.figures")

FIGURE_FILES = {
    "fig1": "fig1_iou",
    "fig2": "fig2_iou_transfer",
    "fig3": "fig3_iou_curves",
    "fig4": "fig4_constrained_multicrop",
    "fig5": "fig5_time_vs_transfer",
    "fig6": "fig6_cams",
    "mochi": "mochi_embedding",
    "mechanism_k": "mechanism_k",
}
IMAGE_FORMATS = ("png", "pdf")


def _plotting() -> tuple[Any, Any, Any]:
    """(seaborn, Figure, Rectangle) on the Agg backend, imported on first use: the Snakefile imports this
    module to plan figure inputs and should not pay for seaborn at DAG construction."""
    import matplotlib

    matplotlib.use("Agg")
    import seaborn as sns
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    return sns, Figure, Rectangle


@dataclass
class FigureResult:
    name: str
    paths: list[Path]
    data: pd.DataFrame
    extra: dict[str, Any] = field(default_factory=dict)


def figure_outputs(out_dir: str | Path, name: str) -> list[str]:
    stem = FIGURE_FILES[name]
    return [str(Path(out_dir) / f"{stem}.{ext}") for ext in (*IMAGE_FORMATS, "csv")]


def _save(fig: Figure, data: pd.DataFrame, out_dir: str | Path, name: str) -> list[Path]:
    """PNG + PDF + CSV, each written to a temporary name and renamed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in IMAGE_FORMATS:
        path = out_dir / f"{FIGURE_FILES[name]}.{ext}"
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        os.replace(tmp, path)
        paths.append(path)
    csv = out_dir / f"{FIGURE_FILES[name]}.csv"
    T.atomic_write_text(csv, data.to_csv(index=False))
    return paths + [csv]


def _grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.4)) -> tuple[Figure, list]:
    sns, Figure, _ = _plotting()
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _targets(config: Mapping, rs: Mapping, exp: str) -> list[str]:
    return T.experiment_targets(config, exp, rs.get("exclude_protocols", ()))


def _iou_label(max_iou: float) -> str:
    return "no ceiling" if max_iou >= 1.0 else f"IoU < {max_iou:g}"


# ---------------------------------------------------------------------------------------------- Figure 1


def sample_setting_iou(
    setting: Mapping, n: int, height: int, width: int, ratio: Sequence[float], rng: np.random.Generator,
    chunk: int = 250_000,
) -> np.ndarray:  # fmt: skip
    """IoU of ``n`` view pairs under one crop setting: ``scale`` for view A, ``scale_b`` for view B if set.

    Same-scale settings go through ``crops.sample_pairs`` (which also applies an optional ``max_iou``
    ceiling); multi-crop settings pair a small RRC box with a large one, both from ``crops.sample_rrc_boxes``.
    Sampled in chunks so 10^6 pairs stay within a few hundred MB.
    """
    scale = tuple(float(s) for s in setting["scale"])
    scale_b = tuple(float(s) for s in setting["scale_b"]) if setting.get("scale_b") else None
    ratio = tuple(float(r) for r in setting.get("ratio", ratio))
    out = []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        if scale_b is None:
            pairs, _ = crops.sample_pairs(height, width, m, scale, ratio, rng,
                                          max_iou=float(setting.get("max_iou", 1.0)))  # fmt: skip
            a, b = pairs[:, 0], pairs[:, 1]
        else:
            a = crops.sample_rrc_boxes(height, width, m, scale, ratio, rng)
            b = crops.sample_rrc_boxes(height, width, m, scale_b, ratio, rng)
        out.append(crops.box_iou(a, b))
    return np.concatenate(out) if out else np.zeros(0)


def iou_summary(iou: np.ndarray) -> dict[str, float]:
    """The Fig-1 numbers: share of non-overlapping pairs (IoU = 0), share < 0.1, mean, quantiles."""
    q = np.quantile(iou, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"n": int(iou.size), "share_iou0": float(np.mean(iou == 0)), "share_lt_0.1": float(np.mean(iou < 0.1)),
            "mean": float(iou.mean()), "q05": q[0], "q25": q[1], "q50": q[2], "q75": q[3], "q95": q[4]}  # fmt: skip


def fig1(config: Mapping, results: str | Path, out_dir: str | Path, rs: Mapping) -> FigureResult:
    sns = _plotting()[0]
    f1 = rs["fig1"]
    n, h, w, seed = int(f1["n_pairs"]), int(f1["height"]), int(f1["width"]), int(f1.get("seed", 0))
    settings = f1.get("settings") or []
    if not settings:
        raise T.ReportConfigError("config key report.fig1.settings is empty; list at least one crop setting")
    edges = np.linspace(0.0, 1.0, int(f1.get("bins", 50)) + 1)
    grid = np.linspace(0.0, 1.0, 201)
    rows, hist_rows, cdf_rows = [], [], []
    for i, s in enumerate(settings):
        if "name" not in s or "scale" not in s:
            raise T.ReportConfigError(f"config key report.fig1.settings[{i}] needs `name` and `scale`, got {s}")
        iou = sample_setting_iou(s, n, h, w, f1.get("ratio", (3 / 4, 4 / 3)), np.random.default_rng([seed, i]))
        rows.append({"setting": s["name"], "scale": str(list(s["scale"])),
                     "scale_b": str(list(s["scale_b"])) if s.get("scale_b") else "", **iou_summary(iou)})  # fmt: skip
        dens, _ = np.histogram(iou, bins=edges, density=True)
        hist_rows += [{"setting": s["name"], "iou": (lo + hi) / 2, "density": d}
                      for lo, hi, d in zip(edges[:-1], edges[1:], dens, strict=True)]  # fmt: skip
        srt = np.sort(iou)
        cdf = np.searchsorted(srt, grid, side="right") / max(srt.size, 1)
        cdf_rows += [{"setting": s["name"], "iou": g, "share_le": c} for g, c in zip(grid, cdf, strict=True)]
    data, hist, cdf = pd.DataFrame(rows), pd.DataFrame(hist_rows), pd.DataFrame(cdf_rows)
    fig, (ax1, ax2) = _grid(2, ncols=2, size=(5.6, 3.8))
    sns.lineplot(data=hist, x="iou", y="density", hue="setting", drawstyle="steps-mid", ax=ax1)
    ax1.set(xlabel="IoU between the two views", ylabel="density", title=f"{n:,} pairs per setting, {w}x{h} image")
    sns.lineplot(data=cdf, x="iou", y="share_le", hue="setting", ax=ax2, legend=False)
    ax2.set(xlabel="IoU", ylabel="share of pairs with IoU <= x", title="cumulative", ylim=(0, 1.01))
    sns.move_legend(ax1, "upper right", fontsize=7, title=None)
    paths = _save(fig, data, out_dir, "fig1")
    return FigureResult("fig1", paths, data, {"hist": hist, "cdf": cdf})


# ------------------------------------------------------------------------------------------- Figures 2-3


def _max_iou(config: Mapping, variant: str) -> float:
    return float(T.variant_settings(config, variant).get("crop.max_iou", 1.0) or 1.0)


def _realised_iou(results: str | Path, dataset: str, variant: str) -> dict[str, float]:
    """The run's realised key/query IoU (``crop_iou.json``, written by the trainer next to ``metrics.csv``).

    The configured ceiling is what was asked for; Figs 2-3 mark what the sampler delivered (p99 and max, plus
    the fallback count), so a ceiling that did not hold shows. NaN for runs of trainers that did not write it.
    """
    path = Path(T.metrics_path(results, dataset, variant)).parent / "crop_iou.json"
    rec = (T.Inputs(results).json(path) or {}) if path.is_file() else {}
    try:
        return {k: float(rec.get(k, np.nan)) for k in ("iou_p99", "iou_max", "fallbacks")}
    except (TypeError, ValueError):
        raise T.broken_result(path, "has a non-numeric iou_p99 / iou_max / fallbacks",
                              results) from None  # fmt: skip


def _ceiling_label(max_iou: float, rec: Mapping[str, float]) -> str:
    if np.isnan(rec.get("iou_max", np.nan)):
        return _iou_label(max_iou)
    return f"{_iou_label(max_iou)} (realised p99 {rec['iou_p99']:.3f}, max {rec['iou_max']:.3f})"


def fig2_plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    exp = rs["fig2"]["experiment"]
    return [T.transfer_path(results, d, v, t) for d, v in T.experiment_pairs(config, exp)
            for t in _targets(config, rs, exp)]  # fmt: skip


def fig2(config: Mapping, results: str | Path, out_dir: str | Path, rs: Mapping) -> FigureResult:
    sns = _plotting()[0]
    exp = rs["fig2"]["experiment"]
    pairs, targets = T.experiment_pairs(config, exp), _targets(config, rs, exp)
    if not targets:
        raise T.ReportConfigError(f"fig2: experiments.{exp} has no transfer target; add `targets: [...]` to it")
    inputs = T.Inputs(results, config)
    long = T.transfer_frame(inputs, pairs, targets, rs)
    inputs.check("fig2 (transfer vs IoU ceiling)")
    long["max_iou"] = [_max_iou(config, v) for v in long["variant"]]
    realised = {(d, v): _realised_iou(results, d, v) for d, v in set(zip(long.dataset, long.variant, strict=True))}
    for k in ("iou_p99", "iou_max", "fallbacks"):
        long[f"realised_{k}"] = [realised[(d, v)][k] for d, v in zip(long.dataset, long.variant, strict=True)]
    data = long[["dataset", "variant", "max_iou", "realised_iou_p99", "realised_iou_max", "realised_fallbacks",
                 "target", "metric", "value"]].sort_values(["target", "dataset", "max_iou"], ignore_index=True)
    fig, axes = _grid(len(targets))
    for ax, t in zip(axes, targets, strict=True):
        sub = data[data.target == t]
        sns.lineplot(data=sub, x="max_iou", y="value", hue="dataset", marker="o", ax=ax)
        # the realised ceiling along the x axis: where each run's IoU actually ended (p99 |, max v)
        marks = sub.drop_duplicates(["dataset", "variant"])
        xa = ax.get_xaxis_transform()
        ax.plot(marks.realised_iou_p99, np.full(len(marks), 0.03), "|", ms=9, color="0.3", transform=xa,
                label="realised p99 IoU")
        ax.plot(marks.realised_iou_max, np.full(len(marks), 0.03), "v", ms=6, mfc="none", color="0.3",
                transform=xa, label="realised max IoU")
        ax.legend(fontsize="small")
        ax.set(xlabel="IoU ceiling (1 = none; marks: realised)",
               ylabel=f"{sub.metric.iloc[0]} (%)", title=t)
    paths = _save(fig, data, out_dir, "fig2")
    return FigureResult("fig2", paths, data)


def fig3_plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    # metrics.csv is written by the pretrain job next to its declared output, the checkpoint
    return [T.checkpoint_path(results, d, v) for d, v in T.experiment_pairs(config, rs["fig3"]["experiment"])]


def fig3(config: Mapping, results: str | Path, out_dir: str | Path, rs: Mapping) -> FigureResult:
    sns = _plotting()[0]
    exp, x, y = rs["fig3"]["experiment"], rs["fig3"].get("x", "step"), rs["fig3"].get("y", "loss")
    inputs = T.Inputs(results, config)
    frames = []
    for d, v in T.experiment_pairs(config, exp):
        path = T.metrics_path(results, d, v)
        if not inputs.exists(path):
            continue
        m = T.read_csv(path, results)
        for col in (x, y):
            if col not in m:
                raise ValueError(f"{path}: no column {col!r} (columns: {list(m.columns)}); set report.fig3.x / .y")
        mi, rec = _max_iou(config, v), _realised_iou(results, d, v)
        frames.append(pd.DataFrame({"dataset": d, "variant": v, "max_iou": mi, "ceiling": _ceiling_label(mi, rec),
                                    "realised_iou_p99": rec["iou_p99"], "realised_iou_max": rec["iou_max"],
                                    "realised_fallbacks": rec["fallbacks"],
                                    x: m[x].to_numpy(), y: m[y].to_numpy()}))  # fmt: skip
    inputs.check("fig3 (training curves per IoU ceiling)")
    data = pd.concat(frames, ignore_index=True)
    datasets = list(dict.fromkeys(data.dataset))
    fig, axes = _grid(len(datasets), size=(5.4, 3.8))
    for ax, d in zip(axes, datasets, strict=True):
        sub = data[data.dataset == d]
        order = list(sub.sort_values("max_iou", ascending=False, kind="stable").ceiling.drop_duplicates())
        sns.lineplot(data=sub, x=x, y=y, hue="ceiling", hue_order=order, ax=ax)
        ax.set(title=f"{d}: training {y} per IoU ceiling", xlabel=x, ylabel=y)
    paths = _save(fig, data, out_dir, "fig3")
    return FigureResult("fig3", paths, data)


# ---------------------------------------------------------------------------------------------- Figure 4


def _crop_dict(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k[5:]: v for k, v in settings.items() if k.startswith("crop.")}


def _fig4_variant(config: Mapping, rs: Mapping) -> str | None:
    if rs["fig4"].get("variant"):
        return rs["fig4"]["variant"]
    exp = rs["fig5"]["experiment"]
    if not T.has_experiment(config, exp):
        return None
    for v in T.experiment(config, exp)["variants"]:
        s = T.variant_settings(config, v)
        if int(s.get("crop.n_small", 0) or 0) > 0 and s.get("crop.constraint", "none") != "none":
            return v
    return None


def _fig4_dataset(config: Mapping, rs: Mapping) -> str | None:
    if rs["fig4"].get("dataset"):
        return rs["fig4"]["dataset"]
    for exp in (rs["fig5"]["experiment"], rs["fig2"]["experiment"]):
        if T.has_experiment(config, exp):
            return T.experiment(config, exp)["datasets"][0]
    pairs = T.all_pairs(config)
    return pairs[0][0] if pairs else None


def fig4_plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    if rs["fig4"].get("image"):
        return [Path(rs["fig4"]["image"])]
    d = _fig4_dataset(config, rs)
    return [T.subset_path(results, d)] if d else []


def constrained_crops(
    height: int, width: int, crop_cfg: Mapping, n_candidates: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Key / query boxes and ``n_candidates`` small crops flagged by the configured constraint.

    The key/query pair comes from ``crops.two_view_boxes``; candidates are RRC boxes at ``small_scale``, judged
    by the same test the sampler applies: ``inside`` = ``crops.box_contains(key, crop)``, ``overlap`` =
    intersection >= ``min_overlap`` x crop area, ``none`` = every crop accepted.
    """
    spec = crops.crop_spec(dict(crop_cfg))
    pair, _ = crops.two_view_boxes(height, width, spec, rng)
    cand = crops.sample_rrc_boxes(height, width, n_candidates, spec.small_scale, spec.ratio, rng)
    key = pair[0]
    if spec.constraint == "inside":
        ok = crops.box_contains(key[None, :], cand)
    elif spec.constraint == "overlap":
        ok = crops.box_intersection(cand, key[None, :]) >= spec.min_overlap * crops.box_area(cand)
    else:
        ok = np.ones(len(cand), dtype=bool)
    boxes = np.concatenate([pair, cand])
    roles = ["key", "query"] + ["accepted" if a else "rejected" for a in ok]
    return pd.DataFrame({"role": roles, "top": boxes[:, 0], "left": boxes[:, 1], "height": boxes[:, 2],
                         "width": boxes[:, 3], "accepted": [True, True, *ok.tolist()],
                         "constraint": spec.constraint})  # fmt: skip


def fig4(config: Mapping, results: str | Path, out_dir: str | Path, rs: Mapping) -> FigureResult:
    Rectangle = _plotting()[2]
    from PIL import Image

    f4 = rs["fig4"]
    image = f4.get("image")
    if not image:
        d = _fig4_dataset(config, rs)
        if d is None:
            raise T.ReportConfigError("fig4: no dataset to take a sample image from; set report.fig4.image")
        inputs = T.Inputs(results, config)
        subset = T.subset_path(results, d)
        if not inputs.exists(subset):
            inputs.check("fig4 (constrained multi-crop)")
        sub = T.read_csv(subset, results, usecols=["path"], nrows=1)
        if sub.empty:
            raise ValueError(f"{subset} lists no image; rebuild it with `snakemake {subset}`")
        image = sub["path"].iloc[0]
    if not Path(image).is_file():
        raise FileNotFoundError(f"fig4: sample image {image} does not exist; set report.fig4.image to an image path")
    with Image.open(image) as im:
        pixels = np.asarray(im.convert("RGB"))
    height, width = pixels.shape[:2]
    variant = _fig4_variant(config, rs)
    crop_cfg = _crop_dict(T.variant_settings(config, variant)) if variant else {"constraint": "inside"}
    if crop_cfg.get("constraint", "none") == "none":
        crop_cfg["constraint"] = "inside"
    rng = np.random.default_rng(int(f4.get("seed", 0)))
    data = constrained_crops(height, width, crop_cfg, int(f4.get("n_candidates", 10)), rng)
    data.insert(0, "image", str(image))
    fig, (ax,) = _grid(1, size=(7.0, 7.0 * height / max(width, 1)))
    ax.imshow(pixels)
    style = {"key": ("tab:blue", "-", 3.0), "query": ("white", "--", 2.0), "accepted": ("limegreen", "-", 2.0),
             "rejected": ("red", "-", 2.0)}  # fmt: skip
    for _, b in data.iterrows():
        color, ls, lw = style[b.role]
        ax.add_patch(Rectangle((b.left, b.top), b.width, b.height, fill=False, edgecolor=color, linestyle=ls,
                               linewidth=lw, label=b.role))  # fmt: skip
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=True))
    ax.legend(uniq.values(), uniq.keys(), loc="lower right", fontsize=8)
    ax.set_axis_off()
    ax.set_title(f"constrained multi-crop ({data.constraint.iloc[0]}): small crops vs the anchor (key)"
                 + (f", variant {variant}" if variant else ""), fontsize=9)  # fmt: skip
    paths = _save(fig, data, out_dir, "fig4")
    return FigureResult("fig4", paths, data, {"variant": variant})


# ------------------------------------------------------------------------------------------- Figures 5-6
# Built in analysis/figures_sec4.py (which imports this module's helpers at call time); re-exported here so
# `from analysis.figures import fig5` and `F.load_cams` keep working.
from analysis.figures_sec4 import (  # noqa: E402, F401 - re-exports
    MONITOR_METRICS,
    cam_npz_path,
    fig5,
    fig5_enabled,
    fig5_plan,
    fig6,
    fig6_enabled,
    fig6_plan,
    load_cams,
    monitor_curves,
)

# ------------------------------------------------------------------------------------------------- MoCHi


def mochi_plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    exp = rs["embedding_stats"]["experiment"]
    return [T.embedding_stats_path(results, d, v) for d, v in T.experiment_pairs(config, exp)]


def fig_mochi(config: Mapping, results: str | Path, out_dir: str | Path, rs: Mapping) -> FigureResult:
    sns = _plotting()[0]
    exp = rs["embedding_stats"]["experiment"]
    inputs = T.Inputs(results, config)
    stats = {(d, v): inputs.json(T.embedding_stats_path(results, d, v)) for d, v in T.experiment_pairs(config, exp)}
    inputs.check("mochi (embedding statistics)")
    paper = T.load_paper_values()
    data = pd.DataFrame([
        {"dataset": d, "variant": v, "label": T.variant_label(paper, v), "alignment": s["alignment"],
         "uniformity": s["uniformity"], "fn_share": s["fn_share"], "fn_share_chance": s.get("fn_share_chance")}
        for (d, v), s in stats.items()
    ])  # fmt: skip
    fig, (ax1, ax2) = _grid(2, ncols=2, size=(5.2, 3.8))
    sns.scatterplot(data=data, x="alignment", y="uniformity", hue="label", style="dataset", s=80, ax=ax1)
    ax1.set(title="alignment vs uniformity (lower = better)", xlabel="alignment (same-class, alpha 2)",
            ylabel="uniformity (t = 2)")  # fmt: skip
    bars = data.label if data.dataset.nunique() == 1 else data.dataset + "\n" + data.label
    sns.barplot(x=bars.tolist(), y=data.fn_share.tolist(), color="tab:blue", ax=ax2)
    ax2.scatter(range(len(data)), data.fn_share_chance, marker="_", s=400, color="k", label="chance", zorder=3)
    ax2.legend(fontsize=8)
    ax2.set(title="false negatives among the hardest negatives", xlabel="", ylabel="same-class share")
    ax2.tick_params(axis="x", labelrotation=20, labelsize=7)
    paths = _save(fig, data, out_dir, "mochi")
    return FigureResult("mochi", paths, data)


# -------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class FigureSpec:
    build: Callable[[Mapping, str | Path, str | Path, Mapping], FigureResult]
    plan: Callable[[Mapping, str | Path, Mapping], list[Path]]
    enabled: Callable[[Mapping, Mapping], bool]
    category: str
    title: str


def _has_targets(key: str) -> Callable[[Mapping, Mapping], bool]:
    def ok(c: Mapping, rs: Mapping) -> bool:
        exp = rs[key]["experiment"]
        return T.has_experiment(c, exp) and bool(_targets(c, rs, exp))

    return ok


def _mech_k(name: str) -> Callable[..., Any]:
    """A function of analysis.mechanism_k, imported at the first call (it imports this module's helpers)."""

    def call(*args: Any) -> Any:
        from analysis import mechanism_k

        return getattr(mechanism_k, name)(*args)

    return call


FIGURES: dict[str, FigureSpec] = {
    "fig1": FigureSpec(fig1, lambda c, r, rs: [], lambda c, rs: True, T.SEC3, "Fig. 1: IoU between views"),
    "fig2": FigureSpec(fig2, fig2_plan, _has_targets("fig2"), T.SEC3, "Fig. 2: transfer vs IoU ceiling"),
    "fig3": FigureSpec(fig3, fig3_plan, lambda c, rs: T.has_experiment(c, rs["fig3"]["experiment"]), T.SEC3,
                       "Fig. 3: training curves per IoU ceiling"),
    "fig4": FigureSpec(fig4, fig4_plan, lambda c, rs: bool(rs["fig4"].get("image") or _fig4_dataset(c, rs)),
                       T.SEC4, "Fig. 4: constrained multi-crop"),
    "fig5": FigureSpec(fig5, fig5_plan, fig5_enabled, T.SEC4, "Fig. 5: monitored accuracy vs training time"),
    "fig6": FigureSpec(fig6, fig6_plan, fig6_enabled, T.SEC4, "Fig. 6: CAMs two-crop vs multi-crop"),
    "mochi": FigureSpec(fig_mochi, mochi_plan, lambda c, rs: T.has_experiment(c, rs["embedding_stats"]["experiment"]),
                        T.MOCHI, "MoCHi: alignment, uniformity, false negatives"),
    "mechanism_k": FigureSpec(_mech_k("figure"), _mech_k("plan"), _mech_k("enabled"), "MoCo mechanism",
                              "MoCo Fig. 3: accuracy vs K per mechanism"),
}  # fmt: skip


def enabled_figures(config: Mapping, rs: Mapping | None = None) -> list[str]:
    rs = T.report_settings(config) if rs is None else rs
    return [name for name, spec in FIGURES.items() if spec.enabled(config, rs)]


def figure_inputs(config: Mapping, results: str | Path, names: Iterable[str]) -> list[str]:
    rs = T.report_settings(config)
    return list(dict.fromkeys(str(p) for n in names for p in FIGURES[n].plan(config, results, rs)))


def build_figures(
    config: Mapping, results: str | Path, out_dir: str | Path, only: Iterable[str] | None = None
) -> dict[str, FigureResult]:
    """Build and write the requested figures (default: every enabled one)."""
    rs = T.report_settings(config)
    names = list(only) if only else enabled_figures(config, rs)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise T.ReportConfigError(f"unknown figure(s) {unknown}; choose from {sorted(FIGURES)}")
    out = {}
    for name in names:
        res = FIGURES[name].build(config, results, out_dir, rs)
        log.info("%s: %d data rows -> %s", name, len(res.data), ", ".join(str(p) for p in res.paths))
        out[name] = res
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rebuild the paper's figures from results/ files.")
    ap.add_argument("--config-json", help="the study config as JSON (rules pass the whole config)")
    ap.add_argument("--configfile", help="alternatively, a config YAML file")
    ap.add_argument("--results", default=None, help="results root (default: the config's `results`)")
    ap.add_argument("--out", default=None, help="output folder (default: <results>/figures)")
    ap.add_argument("--only", action="append", help=f"figure name(s), comma-separated; from {sorted(FIGURES)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = T.load_config_arg(args.config_json, args.configfile)
        results = args.results or cfg.get("results", "results")
        build_figures(cfg, results, args.out or Path(results) / "figures", T.split_only(args.only))
    except (T.ReportConfigError, T.MissingResultError, T.ResultFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
