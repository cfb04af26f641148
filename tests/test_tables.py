"""Paper tables from hand-written results files: known inputs -> known cells (deltas computed by hand here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from analysis import tables as T

TARGETS = {
    "syn_cls_linear": {"protocol": "linear", "format": "imagefolder", "root": "unused"},
    "syn_voc_svm": {"protocol": "voc07_svm", "format": "voc", "root": "unused"},
    "syn_davis": {"protocol": "video_propagation", "format": "davis", "root": "unused"},
    "syn_cams": {"protocol": "cam", "format": "imagefolder", "root": "unused"},
}
ALL_TARGETS = list(TARGETS)


def make_config() -> dict:
    return {
        "results": "results",
        "datasets": {},
        "pretrain": {"overrides": ["epochs=1"]},
        "variants": {
            "moco_v2": ["method=moco_v2"],
            "random_init": ["method=random_init"],
            "mc": ["method=moco_v2", "crop.n_small=4"],
            "cc": ["method=moco_v2", "crop.n_small=4", "crop.constraint=inside"],
            "knn_k5": ["method=knn_moco", "knn.k=5"],
            "knn_lam08": ["method=knn_moco", "knn.lam=0.8"],
            "mochi_128_1024_512": ["method=mochi", "mochi.n=128", "mochi.s=1024", "mochi.s_prime=512"],
            "moco_v1": ["method=moco_v1"],
        },
        "targets": TARGETS,
        "experiments": {
            "datasets": {"datasets": ["syn_in", "syn_coco"], "variants": ["moco_v2", "random_init"],
                         "targets": ALL_TARGETS},
            "invariances": {"datasets": ["syn_coco"], "variants": ["moco_v2", "mc", "cc"],
                            "targets": ["syn_voc_svm"]},
            "knn": {"datasets": ["syn_coco"], "variants": ["moco_v2", "knn_k5", "knn_lam08"],
                    "targets": ["syn_voc_svm"]},
            "mochi": {"datasets": ["syn_in"], "variants": ["moco_v2", "mochi_128_1024_512"],
                      "targets": ["syn_cls_linear"]},
            "mechanism": {"datasets": ["syn_in"], "variants": ["moco_v1", "moco_v2"], "targets": ["syn_cls_linear"]},
        },
    }  # fmt: skip


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_transfer(res: Path, d: str, v: str, t: str, value: float, metrics: dict | None = None) -> None:
    metric = {"linear": "top1", "voc07_svm": "mAP", "video_propagation": "JF_mean", "cam": "top1"}[
        TARGETS[t]["protocol"]]
    write_json(T.transfer_path(res, d, v, t), {"target": t, "protocol": TARGETS[t]["protocol"], "metric": metric,
                                               "value": value, "metrics": {metric: value, **(metrics or {})}})


def stats(name: str, images: int, mean_obj: float, hist: dict | None) -> dict:
    out = {"dataset": name, "images": images, "objects_per_image": {"mean": mean_obj, "median": 1.0},
           "classes": len(hist or {}), "class_histogram": hist or {}}
    if hist:
        vals = list(hist.values())
        out.update(imbalance={"gini": 0.25, "max_min_ratio": max(vals) / min(vals), "max": max(vals),
                              "min": min(vals)}, uniform=len(set(vals)) == 1,
                   shots={"many": 0, "medium": 1, "few": 1})
    else:
        out.update(imbalance=None, uniform=None, shots=None)
    return out  # fmt: skip


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    write_json(T.stats_path(res, "syn_in"), stats("syn_in", 600, 1.0, {"a": 30, "b": 30}))
    write_json(T.stats_path(res, "syn_coco"), stats("syn_coco", 300, 4.5, None))
    vals = {  # (dataset, variant) -> target -> fraction
        ("syn_in", "moco_v2"): {"syn_cls_linear": 0.50, "syn_voc_svm": 0.70, "syn_davis": 0.40, "syn_cams": 0.5},
        ("syn_coco", "moco_v2"): {"syn_cls_linear": 0.45, "syn_voc_svm": 0.75, "syn_davis": 0.46, "syn_cams": 0.4},
        ("syn_in", "random_init"): {"syn_cls_linear": 0.20, "syn_voc_svm": 0.30, "syn_davis": 0.10, "syn_cams": .2},
        ("syn_coco", "random_init"): {"syn_cls_linear": 0.21, "syn_voc_svm": 0.33, "syn_davis": 0.12, "syn_cams": .2},
        ("syn_coco", "mc"): {"syn_voc_svm": 0.80},
        ("syn_coco", "cc"): {"syn_voc_svm": 0.82},
        ("syn_coco", "knn_k5"): {"syn_voc_svm": 0.83},
        ("syn_coco", "knn_lam08"): {"syn_voc_svm": 0.60},
        ("syn_in", "mochi_128_1024_512"): {"syn_cls_linear": 0.52},
        ("syn_in", "moco_v1"): {"syn_cls_linear": 0.41},
    }  # fmt: skip
    for (d, v), per_t in vals.items():
        for t, x in per_t.items():
            extra = {"J_mean": x - 0.02, "F_mean": x + 0.02} if t == "syn_davis" else None
            write_transfer(res, d, v, t, x, extra)
    for v, (a, u, fn) in {"moco_v2": (0.8, -3.1, 0.30), "mochi_128_1024_512": (0.9, -3.4, 0.25)}.items():
        write_json(T.embedding_stats_path(res, "syn_in", v),
                   {"alignment": a, "uniformity": u, "fn_share": fn, "fn_share_chance": 0.1})  # fmt: skip
    return res


def build(name: str, results: Path, out: Path, cfg: dict | None = None) -> pd.DataFrame:
    T.build_tables(cfg or make_config(), results, out, only=[name])
    for ext in T.TABLE_FORMATS:
        assert (out / f"{name}.{ext}").stat().st_size > 0
    return pd.read_csv(out / f"{name}.csv")


def row(df: pd.DataFrame, **keys) -> pd.Series:
    hit = df
    for k, v in keys.items():
        hit = hit[hit[k] == v]
    assert len(hit) == 1, keys
    return hit.iloc[0]


def test_table1_statistics_and_paper_columns(results, tmp_path):
    df = build("table1", results, tmp_path / "tables")
    assert list(df.dataset) == ["syn_in", "syn_coco"]
    r_in, r_coco = row(df, dataset="syn_in"), row(df, dataset="syn_coco")
    assert r_in["images"] == 600 and r_in["uniform"] and r_in["max/min"] == 1.0 and r_in["classes"] == 2
    assert r_coco["objects/img"] == 4.5 and pd.isna(r_coco["gini"])  # scene dataset: no image-level classes
    assert r_coco["paper row"] == "COCO" and r_coco["images paper (K)"] == 118
    assert r_coco["objects/img paper"] == 7.3 and r_in["objects/img paper"] == 1.7


def test_table2_deltas_against_reference_and_paper_by_role(results, tmp_path):
    df = build("table2", results, tmp_path / "tables")
    # protocols linear / knn / voc07_svm only: DAVIS and CAM targets are not in Table 2
    assert "syn_davis" not in df.columns and "syn_cams" not in df.columns
    coco = row(df, dataset="syn_coco", variant="moco_v2")
    assert coco["syn_cls_linear"] == pytest.approx(45.0)
    assert coco["syn_cls_linear delta"] == pytest.approx(45.0 - 50.0)
    assert coco["syn_voc_svm delta"] == pytest.approx(75.0 - 70.0)
    assert row(df, dataset="syn_in", variant="moco_v2")["syn_voc_svm delta"] == 0
    # random-init rows compare with the reference's random-init row
    assert row(df, dataset="syn_coco", variant="random_init")["syn_voc_svm delta"] == pytest.approx(3.0)
    # syn_voc_svm plays VOC07 classification: COCO 80.9, IN-118K 75.8; random-init rows get no paper value
    assert coco["syn_voc_svm paper"] == 80.9
    assert row(df, dataset="syn_in", variant="moco_v2")["syn_voc_svm paper"] == 75.8
    assert pd.isna(row(df, dataset="syn_coco", variant="random_init")["syn_voc_svm paper"])
    assert "syn_cls_linear paper" not in df.columns  # ImageNet accuracy is not a Table 2 column


def test_reference_dataset_from_report_config(results, tmp_path):
    cfg = make_config()
    cfg["report"] = {"reference_dataset": "syn_coco"}
    df = build("table2", results, tmp_path / "tables", cfg)
    assert row(df, dataset="syn_in", variant="moco_v2")["syn_cls_linear delta"] == pytest.approx(5.0)
    cfg["report"] = {"reference_dataset": "nope"}
    with pytest.raises(T.ReportConfigError, match="report.reference_dataset"):
        T.build_tables(cfg, results, tmp_path / "t2", only=["table2"])


def test_table3_all_targets_extra_metrics_without_cam(results, tmp_path):
    df = build("table3", results, tmp_path / "tables")
    assert "syn_cams" not in df.columns
    coco = row(df, dataset="syn_coco", variant="moco_v2")
    assert coco["syn_davis"] == pytest.approx(46.0) and coco["syn_davis delta"] == pytest.approx(6.0)
    assert coco["syn_davis J_mean"] == pytest.approx(44.0) and coco["syn_davis F_mean"] == pytest.approx(48.0)
    assert coco["syn_davis paper"] == 65.1


def test_table4_labels_flags_deltas_and_paper(results, tmp_path):
    df = build("table4", results, tmp_path / "tables")
    assert list(df.label) == ["MoCo", "+MC", "+CC"]
    mc, cc = row(df, variant="mc"), row(df, variant="cc")
    assert mc["MC"] and not mc["CC"] and cc["CC"] and not cc["m-down"]
    assert cc["syn_voc_svm delta"] == pytest.approx(82.0 - 75.0)
    assert mc["syn_voc_svm paper"] == 81.3 and row(df, variant="moco_v2")["syn_voc_svm paper"] == 76.1


def test_table8_rows_from_knn_variants_with_paper_grid(results, tmp_path):
    df = build("table8", results, tmp_path / "tables")
    assert set(df.variant) == {"knn_k5", "knn_lam08"}  # moco_v2 neither enables kNN nor sets knn.*
    k5, lam08 = row(df, variant="knn_k5"), row(df, variant="knn_lam08")
    assert (k5["k"], k5["lambda"]) == (5, 0.4) and (lam08["k"], lam08["lambda"]) == (20, 0.8)
    assert k5["syn_voc_svm"] == pytest.approx(83.0)
    assert k5["syn_voc_svm paper"] == 84.0 and lam08["syn_voc_svm paper"] == 80.7


def test_mochi_table_settings_deltas_embedding_stats(results, tmp_path):
    df = build("mochi", results, tmp_path / "tables")
    base, mochi = row(df, variant="moco_v2"), row(df, variant="mochi_128_1024_512")
    assert pd.isna(base["N"]) and (mochi["N"], mochi["s"], mochi["s'"]) == (128, 1024, 512)
    assert mochi["syn_cls_linear delta"] == pytest.approx(2.0)
    assert mochi["uniformity"] == -3.4 and mochi["false neg. share"] == 0.25
    assert mochi["IN-1k top1 paper"] == 66.9 and mochi["VOC det AP paper"] == 57.5
    assert base["IN-1k top1 paper"] == 67.9 and base["IN-100 top1 paper"] == 78.0


def test_mechanism_table(results, tmp_path):
    df = build("mechanism", results, tmp_path / "tables")
    v2 = row(df, variant="moco_v2")
    assert v2["syn_cls_linear delta"] == pytest.approx(50.0 - 41.0)
    assert v2["tau"] == 0.2 and row(df, variant="moco_v1")["tau"] == 0.07


def test_missing_input_names_file_and_snakemake_target(results, tmp_path):
    missing = T.transfer_path(results, "syn_coco", "cc", "syn_voc_svm")
    missing.unlink()
    with pytest.raises(T.MissingResultError) as err:
        T.build_tables(make_config(), results, tmp_path / "tables", only=["table4"])
    assert str(missing) in str(err.value) and f"snakemake {missing}" in str(err.value)
    assert str(missing) in T.table_inputs(make_config(), results, ["table4"])


def test_markdown_latex_formatting(results, tmp_path):
    build("table4", results, tmp_path / "tables")
    md = (tmp_path / "tables" / "table4.md").read_text()
    tex = (tmp_path / "tables" / "table4.tex").read_text()
    assert "| syn_coco | cc | +CC |" in md and "82.0" in md
    assert r"syn\_voc\_svm" in tex and r"\toprule" in tex and "syn_voc_svm" not in tex


def test_cli_only_one_table(results, tmp_path):
    out = tmp_path / "cli"
    rc = T.main(["--config-json", json.dumps(make_config()), "--results", str(results), "--out", str(out),
                 "--only", "table1"])  # fmt: skip
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == [f"table1.{e}" for e in sorted(T.TABLE_FORMATS)]
    assert T.main(["--config-json", "{not json", "--results", str(results)]) == 2


def test_to_percent_keeps_rmse():
    assert T.to_percent("top1", 0.5) == 50.0
    assert T.to_percent("rmse", 0.61) == 0.61
    assert math.isnan(T.to_percent("top1", None))
