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


def test_fig5_time_from_benchmarks(tmp_path):
    res_dir = tmp_path / "results"
    for v, (x, s) in {"moco_v2": (0.5, 600.0), "mc": (0.58, 900.0), "cc": (0.6, 960.0)}.items():
        transfer(res_dir, "syn_coco", v, "syn_cls_linear", x)
        bench = T.benchmark_path(res_dir, "syn_coco", v)
        bench.parent.mkdir(parents=True, exist_ok=True)
        bench.write_text(f"s\th:m:s\tmax_rss\n{s}\t0:10:00\t100\n")
    res = F.build_figures(make_config(), res_dir, tmp_path / "fig", only=["fig5"])["fig5"]
    check_files(res)
    got = {r.variant: (r.crops, r.train_minutes, r.value) for r in res.data.itertuples()}
    assert got == {"moco_v2": ("two-crop", 10.0, pytest.approx(50.0)), "mc": ("multi-crop", 15.0, pytest.approx(58.0)),
                   "cc": ("multi-crop", 16.0, pytest.approx(60.0))}  # fmt: skip


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
    assert F.enabled_figures(cfg) == ["fig1", "fig3", "fig4", "fig6", "mochi"]
