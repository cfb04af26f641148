"""Figures from hand-written results files: files exist, and the plotted data equal the inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis import figures as F
from analysis import tables as T
from study import crops

TARGETS = {
    "syn_cls_linear": {"protocol": "linear", "format": "imagefolder", "root": "unused"},
    "syn_cams": {"protocol": "cam", "format": "imagefolder", "root": "unused"},
}


def make_config(**report) -> dict:
    return {
        "results": "results",
        "datasets": {},
        "pretrain": {"overrides": ["epochs=1"]},
        "variants": {
            "moco_v2": ["method=moco_v2"],
            "iou030": ["method=moco_v2", "crop.max_iou=0.3"],
            "iou010": ["method=moco_v2", "crop.max_iou=0.1"],
            "mc": ["method=moco_v2", "crop.n_small=4"],
            "cc": ["method=moco_v2", "crop.n_small=4", "crop.constraint=inside"],
            "mochi_128_1024_512": ["method=mochi"],
        },
        "targets": TARGETS,
        "experiments": {
            "iou": {"datasets": ["syn_coco"], "variants": ["moco_v2", "iou030", "iou010"],
                    "targets": ["syn_cls_linear"]},
            "invariances": {"datasets": ["syn_coco"], "variants": ["moco_v2", "mc", "cc"],
                            "targets": ["syn_cls_linear", "syn_cams"]},
            "mochi": {"datasets": ["syn_in"], "variants": ["moco_v2", "mochi_128_1024_512"],
                      "targets": ["syn_cls_linear"]},
        },
        "report": report,
    }  # fmt: skip


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def transfer(res: Path, d: str, v: str, t: str, value: float, **extra) -> None:
    write_json(T.transfer_path(res, d, v, t), {"target": t, "protocol": TARGETS[t]["protocol"], "metric": "top1",
                                               "value": value, "metrics": {"top1": value}, **extra})  # fmt: skip


def check_files(res: F.FigureResult) -> None:
    assert [p.suffix for p in res.paths] == [".png", ".pdf", ".csv"]
    for p in res.paths:
        assert p.is_file() and p.stat().st_size > 0
    assert res.paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res.paths[1].read_bytes()[:5] == b"%PDF-"


def test_fig1_moco_v2_views_rarely_disjoint(tmp_path):
    settings = [{"name": "MoCo v2", "scale": [0.2, 1.0]},
                {"name": "MC small vs key", "scale": [0.2, 1.0], "scale_b": [0.05, 0.14]}]  # fmt: skip
    cfg = make_config(fig1={"n_pairs": 20000, "settings": settings, "seed": 3})
    res = F.build_figures(cfg, tmp_path / "results", tmp_path / "fig", only=["fig1"])["fig1"]
    check_files(res)
    csv = pd.read_csv(tmp_path / "fig" / "fig1_iou.csv")
    moco = csv[csv.setting == "MoCo v2"].iloc[0]
    assert moco["n"] == 20000 and moco["share_iou0"] < 0.05  # the paper's claim for default crops
    q = csv[["q05", "q25", "q50", "q75", "q95"]].to_numpy()
    assert (np.diff(q, axis=1) >= 0).all()
    # small multi-crop views miss the key far more often than two default views miss each other
    assert csv[csv.setting == "MC small vs key"].iloc[0]["share_iou0"] > moco["share_iou0"]
    # the numbers are those of the crop sampler itself (same seed stream, computed directly)
    pairs, _ = crops.sample_pairs(480, 640, 20000, (0.2, 1.0), (0.75, 1.3333333), np.random.default_rng([3, 0]))
    a, b = pairs[:, 0].astype(float), pairs[:, 1].astype(float)
    ih = np.clip(np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iw = np.clip(np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    iou = ih * iw / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - ih * iw)
    assert moco["share_iou0"] == pytest.approx(np.mean(iou == 0))
    assert moco["mean"] == pytest.approx(iou.mean()) and moco["q50"] == pytest.approx(np.median(iou))
    hist = res.extra["hist"]
    width = 1.0 / 50
    assert hist[hist.setting == "MoCo v2"].density.sum() * width == pytest.approx(1.0)


def test_fig2_transfer_vs_iou_ceiling(tmp_path):
    res_dir = tmp_path / "results"
    vals = {"moco_v2": 0.60, "iou030": 0.55, "iou010": 0.50}
    for v, x in vals.items():
        transfer(res_dir, "syn_coco", v, "syn_cls_linear", x)
    res = F.build_figures(make_config(), res_dir, tmp_path / "fig", only=["fig2"])["fig2"]
    check_files(res)
    got = {r.variant: (r.max_iou, r.value) for r in res.data.itertuples()}
    assert got == {"moco_v2": (1.0, pytest.approx(60.0)), "iou030": (0.3, pytest.approx(55.0)),
                   "iou010": (0.1, pytest.approx(50.0))}  # fmt: skip


def test_the_figure_cli_names_a_broken_result_file_in_one_line(tmp_path, capsys):
    res_dir = tmp_path / "results"
    for v, x in {"moco_v2": 0.60, "iou030": 0.55}.items():
        transfer(res_dir, "syn_coco", v, "syn_cls_linear", x)
    bad = T.transfer_path(res_dir, "syn_coco", "iou010", "syn_cls_linear")
    write_json(bad, {})
    rc = F.main(["--config-json", json.dumps(make_config()), "--results", str(res_dir), "--out",
                 str(tmp_path / "fig"), "--only", "fig2"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and err == [f"error: {bad} is an empty JSON object; delete it, then rebuild it with `snakemake -f "
                               f"{bad.parent / 'frozen-targets.json'}` (rule transfer evaluates every frozen-feature "
                               "target of the checkpoint)"]  # fmt: skip
    assert not (tmp_path / "fig").exists()


def test_fig3_loss_curves_equal_metrics_csv(tmp_path):
    res_dir = tmp_path / "results"
    inputs = {}
    for i, v in enumerate(["moco_v2", "iou030", "iou010"]):
        m = pd.DataFrame({"step": [0, 5, 10], "epoch": [0.0, 0.5, 1.0], "loss": [8.0 - i, 7.0 - i, 6.5 - i]})
        path = T.metrics_path(res_dir, "syn_coco", v)
        path.parent.mkdir(parents=True, exist_ok=True)
        m.to_csv(path, index=False)
        inputs[v] = m
    res = F.build_figures(make_config(), res_dir, tmp_path / "fig", only=["fig3"])["fig3"]
    check_files(res)
    for v, m in inputs.items():
        sub = res.data[res.data.variant == v]
        assert sub.step.tolist() == m.step.tolist() and sub.loss.tolist() == m.loss.tolist()
    assert set(res.data.ceiling) == {"no ceiling", "IoU < 0.3", "IoU < 0.1"}


def test_fig3_missing_metrics_names_checkpoint_target(tmp_path):
    with pytest.raises(T.MissingResultError, match="checkpoint.pt"):
        F.build_figures(make_config(), tmp_path / "results", tmp_path / "fig", only=["fig3"])


def test_fig4_constrained_crops_on_subset_image(tmp_path):
    res_dir = tmp_path / "results"
    img = tmp_path / "img.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(img)
    subset = T.subset_path(res_dir, "syn_coco")
    subset.parent.mkdir(parents=True)
    subset.write_text(f"key,path,class,n_objects,split,width,height,boxes,attributes\nk0,{img},,1,train,160,120,[],{{}}\n")
    res = F.build_figures(make_config(fig4={"n_candidates": 30}), res_dir, tmp_path / "fig", only=["fig4"])["fig4"]
    check_files(res)
    d = res.data
    assert res.extra["variant"] == "cc" and (d.constraint == "inside").all() and (d.image == str(img)).all()
    assert list(d.role[:2]) == ["key", "query"] and len(d) == 32
    key = d.iloc[0]
    small = d.iloc[2:]
    inside = ((small.top >= key.top) & (small.left >= key.left) & (small.top + small.height <= key.top + key.height)
              & (small.left + small.width <= key.left + key.width))  # fmt: skip
    assert (small.accepted == inside).all() and ((small.role == "accepted") == inside).all()
    assert ((d.top >= 0) & (d.left >= 0) & (d.top + d.height <= 120) & (d.left + d.width <= 160)).all()
    # small crops keep 5-14 % of the image area (torchvision rounding aside)
    assert (small.height * small.width / (120 * 160)).between(0.04, 0.15).all()


def monitored_run(res: Path, d: str, v: str, rows: list[tuple], **extra_cols) -> Path:
    """A metrics.csv in the trainer's contract: step, loss, wall_s and the monitor columns (None = not run)."""
    m = pd.DataFrame(rows, columns=["step", "wall_s", "mon_knn_top1", "mon_view_top1"])
    m.insert(1, "loss", np.linspace(8.0, 6.0, len(m)))
    for k, col in extra_cols.items():
        m[k] = col
    path = T.metrics_path(res, d, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    m.to_csv(path, index=False)
    return path


RUNS = {  # (step, wall_s, knn, view); rows out of order (a resumed run appends), monitor cells empty between
    "moco_v2": [(20, 120.0, 30.0, 60.0), (0, 0.0, 10.0, 5.0), (10, 60.0, None, None), (15, 90.0, 25.0, None)],
    "mc": [(0, 0.0, 10.0, 4.0), (10, 90.0, 28.0, 50.0), (20, 180.0, 40.0, 70.0)],
    "cc": [(0, 0.0, 11.0, 6.0), (5, 45.0, None, None), (20, 210.0, 42.0, 75.0)],
}


def test_fig5_monitor_curves_against_wall_time(tmp_path):
    res_dir = tmp_path / "results"
    for v, rows in RUNS.items():
        monitored_run(res_dir, "syn_coco", v, rows)
    res = F.build_figures(make_config(), res_dir, tmp_path / "fig", only=["fig5"])["fig5"]
    check_files(res)
    d = res.data
    assert set(d.metric) == {"mon_knn_top1", "mon_view_top1"}
    assert {v: c for v, c in zip(d.variant, d.crops, strict=True)} == {"moco_v2": "two-crop", "mc": "multi-crop",
                                                                       "cc": "multi-crop"}  # fmt: skip
    for v, rows in RUNS.items():
        for j, metric in ((2, "mon_knn_top1"), (3, "mon_view_top1")):
            want = sorted((r[1], r[j]) for r in rows if r[j] is not None)  # NaN rows dropped, by wall time
            sub = d[(d.variant == v) & (d.metric == metric)]
            assert list(zip(sub.wall_s, sub.value, strict=True)) == want
            assert sub.minutes.tolist() == pytest.approx([w / 60.0 for w, _ in want])
            assert sub.step.is_monotonic_increasing
    # the CSV beside the figure holds exactly the curve points
    csv = pd.read_csv(tmp_path / "fig" / "fig5_time_vs_transfer.csv")
    assert len(csv) == len(d) == 15 and csv.value.tolist() == pytest.approx(d.value.tolist())


def test_fig5_inputs_are_the_checkpoints_whose_jobs_write_the_metrics(tmp_path):
    # metrics.csv is not a declared output (Snakemake would delete it when a job fails, losing the history a
    # resumed run continues): the checkpoint, written last by the same job, stands for it
    ins = F.figure_inputs(make_config(), "results", ["fig5"])
    assert sorted(ins) == sorted(str(T.checkpoint_path("results", "syn_coco", v)) for v in ("moco_v2", "mc", "cc"))


def test_fig5_run_without_monitors_names_the_file_and_the_fix(tmp_path):
    res_dir = tmp_path / "results"
    for v, rows in RUNS.items():
        monitored_run(res_dir, "syn_coco", v, rows)
    old = T.metrics_path(res_dir, "syn_coco", "mc")
    pd.DataFrame({"step": [0, 10], "epoch": [0.0, 1.0], "loss": [8.0, 7.0]}).to_csv(old, index=False)
    with pytest.raises(T.ReportConfigError, match=r"(?s)mc/metrics\.csv.*mon_knn_top1.*monitor\.every.*--forcerun"):
        F.build_figures(make_config(), res_dir, tmp_path / "fig", only=["fig5"])
    # columns present but never filled: the monitors were off
    monitored_run(res_dir, "syn_coco", "mc", [(0, 0.0, None, None), (10, 60.0, None, None)])
    with pytest.raises(T.ReportConfigError, match=r"mc/metrics\.csv has the monitor columns but no monitored row"):
        F.build_figures(make_config(), res_dir, tmp_path / "fig", only=["fig5"])
    # a missing file names the pretrain target that writes it
    old.unlink()
    with pytest.raises(T.MissingResultError, match="mc/checkpoint.pt"):
        F.build_figures(make_config(), res_dir, tmp_path / "fig", only=["fig5"])


def test_fig6_cam_grid_from_npz(tmp_path):
    res_dir = tmp_path / "results"
    rng = np.random.default_rng(1)
    cams = {}
    for v in ("moco_v2", "mc"):
        out = T.transfer_path(res_dir, "syn_coco", v, "syn_cams")
        transfer(res_dir, "syn_coco", v, "syn_cams", 0.5)
        cams[v] = rng.random((3, 4, 4)).astype(np.float32)
        np.savez(out.with_suffix(".cam.npz"), images=rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8),
                 cams=cams[v], ids=np.array(["a", "b", "c"]), class_names=np.array(["cat", "dog", "cat"]))  # fmt: skip
    res = F.build_figures(make_config(fig6={"n_images": 2}), res_dir, tmp_path / "fig", only=["fig6"])["fig6"]
    check_files(res)
    assert len(res.data) == 4
    for v, mode in (("moco_v2", "two-crop"), ("mc", "multi-crop")):
        sub = res.data[res.data.variant == v]
        assert (sub.crops == mode).all() and sub.id.tolist() == ["a", "b"]
        assert sub.cam_mean.tolist() == pytest.approx(cams[v][:2].mean(axis=(1, 2)).tolist())
        assert sub.cam_max.tolist() == pytest.approx(cams[v][:2].max(axis=(1, 2)).tolist())
        # a file of the earlier protocol has no predictions: drawn without them
        assert (sub.pred_name == "").all() and sub.correct.isna().all()


def test_fig6_one_image_per_class_with_true_and_predicted_labels(tmp_path):
    res_dir = tmp_path / "results"
    rng = np.random.default_rng(2)
    true = np.array(["cat", "dog", "fox"])
    preds = {"moco_v2": np.array(["cat", "cat", "fox"]), "mc": np.array(["cat", "dog", "fox"])}
    for v in ("moco_v2", "mc"):
        out = T.transfer_path(res_dir, "syn_coco", v, "syn_cams")
        transfer(res_dir, "syn_coco", v, "syn_cams", 0.5)
        np.savez(out.with_suffix(".cam.npz"), images=rng.integers(0, 255, (3, 56, 56, 3), dtype=np.uint8),
                 cams=rng.random((3, 7, 7)).astype(np.float32), ids=np.array(["cat/0", "dog/0", "fox/0"]),
                 class_names=true, pred_names=preds[v])  # fmt: skip
    res = F.build_figures(make_config(fig6={"n_images": 10}), res_dir, tmp_path / "fig", only=["fig6"])["fig6"]
    check_files(res)
    d = res.data
    assert len(d) == 6 and (d.cam_h == 7).all() and (d.cam_w == 7).all()
    for v in ("moco_v2", "mc"):
        sub = d[d.variant == v]
        assert sub.class_name.tolist() == true.tolist() and sub.pred_name.tolist() == preds[v].tolist()
        assert sub.correct.tolist() == (preds[v] == true).tolist()


def test_fig6_missing_npz_draws_placeholder(tmp_path):
    res_dir = tmp_path / "results"
    for v in ("moco_v2", "mc"):
        transfer(res_dir, "syn_coco", v, "syn_cams", 0.5)
    res = F.build_figures(make_config(), res_dir, tmp_path / "fig", only=["fig6"])["fig6"]
    check_files(res)
    assert res.data.empty and len(res.extra["missing"]) == 2


def test_mochi_embedding_figure(tmp_path):
    res_dir = tmp_path / "results"
    stats = {"moco_v2": (0.8, -3.1, 0.30), "mochi_128_1024_512": (0.9, -3.4, 0.25)}
    for v, (a, u, fn) in stats.items():
        write_json(T.embedding_stats_path(res_dir, "syn_in", v),
                   {"alignment": a, "uniformity": u, "fn_share": fn, "fn_share_chance": 0.1})  # fmt: skip
    res = F.build_figures(make_config(), res_dir, tmp_path / "fig", only=["mochi"])["mochi"]
    check_files(res)
    got = {r.variant: (r.alignment, r.uniformity, r.fn_share) for r in res.data.itertuples()}
    assert got == stats


def test_enabled_figures_and_inputs_follow_the_config(tmp_path):
    cfg = make_config()
    assert F.enabled_figures(cfg) == ["fig1", "fig2", "fig3", "fig4", "fig5", "fig6", "mochi"]
    ins = F.figure_inputs(cfg, "results", ["fig6"])
    assert ins == [str(T.transfer_path("results", "syn_coco", v, "syn_cams")) for v in ("moco_v2", "mc")]
    del cfg["experiments"]["iou"]["targets"]  # falls back to the config's targets: only a CAM one is left
    cfg["targets"] = {"syn_cams": TARGETS["syn_cams"]}
    cfg["experiments"]["invariances"]["targets"] = ["syn_cams"]
    # fig5 reads the runs' own monitors, not transfer results: still drawn
    assert F.enabled_figures(cfg) == ["fig1", "fig3", "fig4", "fig5", "fig6", "mochi"]
