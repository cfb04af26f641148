"""Figures 5 and 6 (Sec. 4: learning invariances), registered and re-exported by analysis.figures.

- ``fig5``: the online monitors of each pretraining run (``metrics.csv``: weighted-kNN top-1 on a held-out
  labelled split and view-matching top-1) against cumulative training wall time, two-crop vs multi-crop. The
  paper's Fig. 5 plots accuracy against training time per variant; the monitors give that curve from one run
  instead of one transfer job per intermediate checkpoint.
- ``fig6``: class activation maps of the two-crop and the multi-crop model, one test image per class, with the
  true label over each column and each model's predicted label under its map (the CAM protocol's ``.npz``).

Helpers (plotting, saving, ``FigureResult``) come from analysis.figures, imported at call time: that module
imports this one to register the figures, and either may be imported first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from analysis import tables as T

if TYPE_CHECKING:
    from analysis.figures import FigureResult

log = logging.getLogger("analysis.figures")

# metrics.csv column -> panel title; the trainer leaves a monitor's cell empty on rows where it did not run
MONITOR_METRICS: dict[str, str] = {
    "mon_knn_top1": "monitored weighted-kNN top-1 (held-out split)",
    "mon_view_top1": "view-matching top-1 (pretext)",
}
WALL_COLUMN = "wall_s"
CROP_MODES = ("two-crop", "multi-crop")


def _figures():  # noqa: ANN202 - the analysis.figures module
    from analysis import figures

    return figures


def _n_small(config: Mapping, variant: str) -> int:
    return int(T.variant_settings(config, variant).get("crop.n_small", 0) or 0)


# ---------------------------------------------------------------------------------------------- Figure 5


def fig5_plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    # metrics.csv is written by the pretrain job next to its declared output, the checkpoint. It is not an
    # output itself: Snakemake deletes the outputs of a failed job, and the resumed run continues that file.
    return [T.checkpoint_path(results, d, v) for d, v in _trained_pairs(config, rs["fig5"]["experiment"])]


def _trained_pairs(config: Mapping, exp: str) -> list[tuple[str, str]]:
    """The experiment's runs that trained: the untrained baseline (a row of Tables 4 and 9) has no curve."""
    return [(d, v) for d, v in T.experiment_pairs(config, exp)
            if T.variant_settings(config, v).get("method_name") != "random_init"]  # fmt: skip


def fig5_enabled(config: Mapping, rs: Mapping) -> bool:
    return T.has_experiment(config, rs["fig5"]["experiment"])


def monitor_curves(path: Path, metrics: Sequence[str] = tuple(MONITOR_METRICS)) -> pd.DataFrame:
    """One run's monitor points: long frame (metric, step, wall_s, minutes, value), sorted by wall time.

    Rows where a monitor did not run (empty cell) are dropped per metric, so the curves join only measured
    points. A file without the monitor columns comes from a run before the monitors (or with them off): that is
    an error naming the fix rather than an empty panel, which would read as "no learning".
    """
    m = T.read_csv(path)
    missing = [c for c in (WALL_COLUMN, *metrics) if c not in m.columns]
    ckpt = path.parent / "checkpoint.pt"
    fix = (f"rerun its pretraining with the online monitors on (`monitor.every` > 0 in pretrain.overrides or the "
           f"variant's overrides): `snakemake --forcerun pretrain {ckpt}`")  # fmt: skip
    if missing:
        raise T.ReportConfigError(
            f"fig5: {path} has no column(s) {missing} (columns: {list(m.columns)}); the run predates the online "
            f"monitors or ran without them: {fix}"
        )
    wall = pd.to_numeric(m[WALL_COLUMN], errors="coerce")
    step = pd.to_numeric(m["step"], errors="coerce") if "step" in m.columns else pd.Series(np.nan, index=m.index)
    frames = []
    for col in metrics:
        sub = pd.DataFrame({"metric": col, "step": step, WALL_COLUMN: wall,
                            "value": pd.to_numeric(m[col], errors="coerce")})  # fmt: skip
        frames.append(sub.dropna(subset=[WALL_COLUMN, "value"]))
    out = pd.concat(frames, ignore_index=True).sort_values(["metric", WALL_COLUMN], kind="stable", ignore_index=True)
    if out.empty:
        raise T.ReportConfigError(f"fig5: {path} has the monitor columns but no monitored row (monitor.every = 0?); "
                                  + fix)  # fmt: skip
    out.insert(3, "minutes", out[WALL_COLUMN] / 60.0)
    return out


def fig5(config: Mapping, results: str | Path, out_dir: str | Path, rs: Mapping) -> FigureResult:
    F = _figures()
    sns = F._plotting()[0]
    exp = rs["fig5"]["experiment"]
    pairs = _trained_pairs(config, exp)
    inputs = T.Inputs(results, config)
    present = [(d, v) for d, v in pairs if inputs.exists(T.metrics_path(results, d, v))]
    inputs.check("fig5 (monitored accuracy vs training time)")
    paper = T.load_paper_values()
    several = len({d for d, _ in pairs}) > 1
    frames = []
    for d, v in present:
        curve = monitor_curves(T.metrics_path(results, d, v))
        label = T.variant_label(paper, v)
        curve.insert(0, "dataset", d)
        curve.insert(1, "variant", v)
        curve.insert(2, "label", f"{d}: {label}" if several else label)
        curve.insert(3, "crops", CROP_MODES[_n_small(config, v) > 0])
        frames.append(curve)
    data = pd.concat(frames, ignore_index=True)
    panels = [m for m in MONITOR_METRICS if (data.metric == m).any()]
    hue_order = list(dict.fromkeys(data.label))
    style_order = [c for c in CROP_MODES if (data.crops == c).any()]
    fig, axes = F._grid(len(panels), ncols=2, size=(5.6, 4.0))
    for i, (ax, metric) in enumerate(zip(axes, panels, strict=True)):
        sub = data[data.metric == metric]
        sns.lineplot(data=sub, x="minutes", y="value", hue="label", hue_order=hue_order, style="crops",
                     style_order=style_order, markers=True, markersize=5, estimator=None, sort=False,
                     legend=i == 0, ax=ax)  # fmt: skip
        ax.set(xlabel="pretraining wall time (min)", ylabel="top-1 (%)", title=MONITOR_METRICS[metric])
    if panels:
        sns.move_legend(axes[0], "best", fontsize=7, title=None)
    paths = F._save(fig, data, out_dir, "fig5")
    return F.FigureResult("fig5", paths, data)


# ---------------------------------------------------------------------------------------------- Figure 6


def _cam_target(config: Mapping, rs: Mapping) -> str | None:
    exp = rs["fig6"]["experiment"]
    if not T.has_experiment(config, exp):
        return None
    return next((t for t in T.experiment_targets(config, exp) if T.target_protocol(config, t) == "cam"), None)


def _fig6_variants(config: Mapping, rs: Mapping) -> tuple[str | None, str | None]:
    f6, exp = rs["fig6"], rs["fig6"]["experiment"]
    two, multi = f6.get("two_crop"), f6.get("multi_crop")
    if T.has_experiment(config, exp):
        for v in T.experiment(config, exp)["variants"]:
            s = T.variant_settings(config, v)
            if s.get("method_name") == "random_init":
                continue
            if two is None and int(s.get("crop.n_small", 0) or 0) == 0:
                two = v
            if multi is None and int(s.get("crop.n_small", 0) or 0) > 0:
                multi = v
    return two, multi


def fig6_enabled(config: Mapping, rs: Mapping) -> bool:
    return _cam_target(config, rs) is not None and None not in _fig6_variants(config, rs)


def fig6_plan(config: Mapping, results: str | Path, rs: Mapping) -> list[Path]:
    t, (two, multi) = _cam_target(config, rs), _fig6_variants(config, rs)
    d = T.experiment(config, rs["fig6"]["experiment"])["datasets"][0]
    return [T.transfer_path(results, d, v, t) for v in (two, multi)]


def cam_npz_path(result_json: Path, result: Mapping | None) -> Path | None:
    """Where the CAM protocol put its maps: the result's ``settings.cam_file``, else ``<target>.cam.npz`` or
    ``<target>.npz`` next to the result JSON."""
    cand = []
    cam_file = ((result or {}).get("settings") or {}).get("cam_file")
    if cam_file:
        cand.append(Path(cam_file))
    cand += [result_json.with_suffix(".cam.npz"), result_json.with_suffix(".npz")]
    return next((p for p in cand if p.is_file()), None)


def load_cams(path: Path) -> dict[str, np.ndarray]:
    """Images (N, H, W, 3) uint8 and CAMs (N, h, w) from a CAM npz; optional ``ids``, ``class_names`` (the true
    labels) and ``pred_names`` (the probe's predictions; absent in files of the earlier protocol)."""
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        img_key = next((k for k in ("images", "pixels", "image") if k in keys), None)
        cam_key = next((k for k in ("cams", "cam", "maps") if k in keys), None)
        if img_key is None or cam_key is None:
            raise ValueError(f"{path}: expected arrays `images` and `cams`, found {sorted(keys)}")
        out = {"images": z[img_key], "cams": z[cam_key]}
        for k in ("ids", "class_names", "pred_names"):
            if k in keys:
                out[k] = z[k]
    if out["images"].ndim != 4 or out["cams"].ndim != 3 or len(out["images"]) != len(out["cams"]):
        raise ValueError(f"{path}: images {out['images'].shape} / cams {out['cams'].shape} are not (N,H,W,3) / (N,h,w)")
    return out


def _cam_rows(c: Mapping[str, np.ndarray], variant: str, mode: str, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        true = str(c["class_names"][i]) if "class_names" in c else ""
        pred = str(c["pred_names"][i]) if "pred_names" in c else ""
        rows.append({"variant": variant, "crops": mode, "index": i, "id": str(c["ids"][i]) if "ids" in c else str(i),
                     "class_name": true, "pred_name": pred, "correct": (pred == true) if pred and true else None,
                     "cam_h": int(c["cams"].shape[1]), "cam_w": int(c["cams"].shape[2]),
                     "cam_mean": float(c["cams"][i].mean()), "cam_max": float(c["cams"][i].max())})  # fmt: skip
    return rows


def fig6(config: Mapping, results: str | Path, out_dir: str | Path, rs: Mapping) -> FigureResult:
    F = _figures()
    sns, Figure, _ = F._plotting()
    t = _cam_target(config, rs)
    two, multi = _fig6_variants(config, rs)
    if t is None or two is None or multi is None:
        raise T.ReportConfigError(
            f"fig6 needs a target with protocol 'cam' in experiments.{rs['fig6']['experiment']}.targets and a "
            f"two-crop and a multi-crop variant there (found target={t}, two_crop={two}, multi_crop={multi}); "
            "set report.fig6.two_crop / multi_crop"
        )
    d = T.experiment(config, rs["fig6"]["experiment"])["datasets"][0]
    inputs = T.Inputs(results, config)
    res = {v: inputs.result(T.transfer_path(results, d, v, t)) for v in (two, multi)}
    inputs.check("fig6 (class activation maps)")
    n_max = int(rs["fig6"].get("n_images", 6))
    cams, missing = {}, []
    for v in (two, multi):
        path = cam_npz_path(T.transfer_path(results, d, v, t), res[v])
        if path is None:
            missing.append(str(T.transfer_path(results, d, v, t).with_suffix(".cam.npz")))
        else:
            cams[v] = load_cams(path)
    if missing:
        log.warning("fig6: CAM maps missing (%s); drawing a placeholder", ", ".join(missing))
        fig, (ax,) = F._grid(1, size=(7.0, 2.0))
        ax.set_axis_off()
        ax.text(0.5, 0.5, "CAM maps not available:\n" + "\n".join(missing) + "\n(rerun the CAM target)",
                ha="center", va="center", fontsize=8, wrap=True)  # fmt: skip
        data = pd.DataFrame(columns=["variant", "crops", "index", "id", "class_name", "pred_name", "correct",
                                     "cam_h", "cam_w", "cam_mean", "cam_max"])  # fmt: skip
        return F.FigureResult("fig6", F._save(fig, data, out_dir, "fig6"), data, {"missing": missing})
    n = min(n_max, *(len(c["cams"]) for c in cams.values()))
    rows = _cam_rows(cams[two], two, "two-crop", n) + _cam_rows(cams[multi], multi, "multi-crop", n)
    data = pd.DataFrame(rows)
    with sns.axes_style("white"):
        fig = Figure(figsize=(2.0 * n, 6.8), layout="constrained")
        axes = fig.subplots(3, n, squeeze=False)
    first = data[data.variant == two]
    for i in range(n):
        img = cams[two]["images"][i]
        h, w = img.shape[:2]
        axes[0][i].imshow(img)
        axes[0][i].set_title(first.class_name.iloc[i] or first.id.iloc[i], fontsize=8)  # the true label
        for r, v in ((1, two), (2, multi)):
            ax, c = axes[r][i], cams[v]
            ax.imshow(c["images"][i])
            ax.imshow(c["cams"][i], cmap="jet", alpha=0.5, extent=(0, w, h, 0), interpolation="bilinear")
            row = data[data.variant == v].iloc[i]
            if row.pred_name:  # the model's own probe prediction: green if right, red if wrong
                colour = {True: "green", False: "red"}.get(row.correct, "black")
                ax.set_xlabel(f"pred: {row.pred_name}", fontsize=7, color=colour)
    axes[0][0].set_ylabel("true label", fontsize=8)
    for r, (v, mode) in enumerate(((two, "two-crop"), (multi, "multi-crop")), 1):
        axes[r][0].set_ylabel(f"{mode} ({v})\nCAM {cams[v]['cams'].shape[1]}x{cams[v]['cams'].shape[2]}", fontsize=8)
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])
    paths = F._save(fig, data, out_dir, "fig6")
    return F.FigureResult("fig6", paths, data)
