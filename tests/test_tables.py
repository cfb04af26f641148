"""Paper tables from hand-written results files: known inputs -> known cells (deltas computed by hand here)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import tables as T

TARGETS = {
    "syn_cls_linear": {"protocol": "linear", "format": "imagefolder", "root": "unused"},
    "syn_voc_svm": {"protocol": "voc07_svm", "format": "voc", "root": "unused"},
    "syn_davis": {"protocol": "video_propagation", "format": "davis", "root": "unused"},
    "syn_cams": {"protocol": "cam", "format": "imagefolder", "root": "unused"},
    "syn_voc_retrieval": {"protocol": "segment_retrieval", "format": "voc_seg", "root": "unused"},
    "syn_voc_seg_ft": {"protocol": "finetune_seg", "format": "voc_seg", "root": "unused"},
    "syn_nyud_depth_ft": {"protocol": "finetune_depth", "format": "nyud_depth", "root": "unused"},
}
ALL_TARGETS = ["syn_cls_linear", "syn_voc_svm", "syn_davis", "syn_cams"]  # the `datasets` experiment's
CC_MDOWN = ["method=moco_v2", "crop.n_small=4", "crop.constraint=inside", "moco.m=0.98"]
KNN_GRID = ["cc_mdown", "knn_k1", "knn_k5", "knn_k20", "knn_lam08", "knn_k20_warmup"]


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
            "cc_mdown": CC_MDOWN,
            # Table 7 rows: named so that the policy must come from the settings, not from the name
            "cc_mdown_autoaug": [*CC_MDOWN, "aug.aplus=true", "aug.aplus_p=0.0"],
            "cc_mdown_aplus": [*CC_MDOWN, "aug.aplus=true"],
            "knn_k1": ["method=knn_moco", "knn.k=1"],
            "knn_k5": ["method=knn_moco", "knn.k=5"],
            "knn_k20": ["method=knn_moco"],
            "knn_lam08": ["method=knn_moco", "knn.lam=0.8"],
            "knn_k20_warmup": ["method=knn_moco", "knn.k=20", "knn.warmup_epochs=5"],
            "mochi_128_1024_512": ["method=mochi", "mochi.n=128", "mochi.s=1024", "mochi.s_prime=512"],
            "moco_v1": ["method=moco_v1"],
        },
        "targets": TARGETS,
        "experiments": {
            "datasets": {"datasets": ["syn_in", "syn_coco"], "variants": ["moco_v2", "random_init"],
                         "targets": ALL_TARGETS},
            "invariances": {"datasets": ["syn_coco"], "variants": ["moco_v2", "mc", "cc"],
                            "targets": ["syn_voc_svm"]},
            "davis": {"datasets": ["syn_coco"], "variants": ["moco_v2", "mc"], "targets": ["syn_davis"]},
            "retrieval": {"datasets": ["syn_coco"], "variants": ["moco_v2", "mc"], "targets": ["syn_voc_retrieval"]},
            "augmentation": {"datasets": ["syn_coco"], "variants": ["cc_mdown", "cc_mdown_autoaug", "cc_mdown_aplus"],
                             "targets": ["syn_voc_svm"]},
            "knn": {"datasets": ["syn_coco"], "variants": KNN_GRID, "targets": ["syn_voc_svm"]},
            "mochi": {"datasets": ["syn_in"], "variants": ["moco_v2", "mochi_128_1024_512"],
                      "targets": ["syn_cls_linear"]},
            "mechanism": {"datasets": ["syn_in"], "variants": ["moco_v1", "moco_v2"], "targets": ["syn_cls_linear"]},
            "finetune": {"datasets": ["syn_in"], "variants": ["random_init", "moco_v2"],
                         "targets": ["syn_voc_seg_ft", "syn_nyud_depth_ft", "syn_voc_svm"]},
        },
    }  # fmt: skip


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_transfer(res: Path, d: str, v: str, t: str, value: float, metrics: dict | None = None) -> None:
    metric = {"linear": "top1", "voc07_svm": "mAP", "video_propagation": "JF_mean", "cam": "top1",
              "segment_retrieval": "mIoU_21", "finetune_seg": "mIoU", "finetune_depth": "rmse"}[TARGETS[t]["protocol"]]
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
        ("syn_coco", "moco_v2"): {"syn_cls_linear": 0.45, "syn_voc_svm": 0.75, "syn_davis": 0.46, "syn_cams": 0.4,
                                  "syn_voc_retrieval": 0.30},
        ("syn_in", "random_init"): {"syn_cls_linear": 0.20, "syn_voc_svm": 0.30, "syn_davis": 0.10, "syn_cams": .2},
        ("syn_coco", "random_init"): {"syn_cls_linear": 0.21, "syn_voc_svm": 0.33, "syn_davis": 0.12, "syn_cams": .2},
        ("syn_coco", "mc"): {"syn_voc_svm": 0.80, "syn_davis": 0.52, "syn_voc_retrieval": 0.35},
        ("syn_coco", "cc"): {"syn_voc_svm": 0.82},
        ("syn_coco", "cc_mdown"): {"syn_voc_svm": 0.84},
        ("syn_coco", "cc_mdown_autoaug"): {"syn_voc_svm": 0.79},
        ("syn_coco", "cc_mdown_aplus"): {"syn_voc_svm": 0.86},
        ("syn_coco", "knn_k1"): {"syn_voc_svm": 0.81},
        ("syn_coco", "knn_k5"): {"syn_voc_svm": 0.83},
        ("syn_coco", "knn_k20"): {"syn_voc_svm": 0.85},
        ("syn_coco", "knn_lam08"): {"syn_voc_svm": 0.60},
        ("syn_coco", "knn_k20_warmup"): {"syn_voc_svm": 0.845},
        ("syn_in", "mochi_128_1024_512"): {"syn_cls_linear": 0.52},
        ("syn_in", "moco_v1"): {"syn_cls_linear": 0.41},
    }  # fmt: skip
    vals[("syn_in", "moco_v2")].update(syn_voc_seg_ft=0.30, syn_nyud_depth_ft=0.70)
    vals[("syn_in", "random_init")].update(syn_voc_seg_ft=0.25, syn_nyud_depth_ft=0.90)
    for (d, v), per_t in vals.items():
        for t, x in per_t.items():
            extra = {"J_mean": x - 0.02, "F_mean": x + 0.02} if t == "syn_davis" else None
            if t == "syn_voc_retrieval":  # 21 classes (primary) and the 7-class subset
                extra = {"mIoU_7": x + 0.1, "iou_per_class": {"background": 0.9}}
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


def measured_cells_filled(df: pd.DataFrame, cols: list[str]) -> bool:
    return bool(df[cols].notna().all().all())


def test_table5_davis_j_f_and_paper_rows_by_role(results, tmp_path):
    df = build("table5", results, tmp_path / "tables")
    assert list(df.variant) == ["moco_v2", "mc"] and set(df.target) == {"syn_davis"}
    assert measured_cells_filled(df, ["J_m", "F_m", "J&F"])
    moco, mc = row(df, variant="moco_v2"), row(df, variant="mc")
    assert (mc["J_m"], mc["F_m"], mc["J&F"]) == pytest.approx((50.0, 54.0, 52.0))
    assert (moco["J_m"], moco["F_m"]) == pytest.approx((44.0, 48.0))
    assert mc["paper method"] == "MoCo + MC (COCO)" and moco["paper method"] == "MoCo (COCO)"
    assert (mc["J_m paper"], mc["F_m paper"]) == (69.4, 64.3) and mc["J&F paper"] == pytest.approx(66.85)
    assert (moco["J_m paper"], moco["F_m paper"]) == (66.6, 61.6)
    md = (tmp_path / "tables" / "table5.md").read_text()
    assert "STC (Kinetics) 70.2 / 64.8" in md and "DenseCL (COCO) 63.9 / 60.6" in md


def test_table5_paper_values_need_the_paper_data_role(results, tmp_path):
    cfg = make_config()
    cfg["experiments"]["davis"]["datasets"] = ["syn_in"]  # plays IN-118K: the paper's rows are COCO models
    write_transfer(results, "syn_in", "mc", "syn_davis", 0.5, {"J_mean": 0.49, "F_mean": 0.51})
    df = build("table5", results, tmp_path / "tables", cfg)
    assert df["J_m paper"].isna().all() and df["paper method"].isna().all()
    assert row(df, variant="mc")["J_m"] == pytest.approx(49.0)


def test_table6_retrieval_7_and_21_classes_with_paper(results, tmp_path):
    df = build("table6", results, tmp_path / "tables")
    assert list(df.variant) == ["moco_v2", "mc"]
    assert measured_cells_filled(df, ["7 classes", "21 classes"])
    moco, mc = row(df, variant="moco_v2"), row(df, variant="mc")
    assert (mc["7 classes"], mc["21 classes"]) == pytest.approx((45.0, 35.0))
    assert (moco["7 classes"], moco["21 classes"]) == pytest.approx((40.0, 30.0))
    assert (moco["7 classes paper"], moco["21 classes paper"]) == (41.8, 28.1)
    assert (mc["7 classes paper"], mc["21 classes paper"]) == (48.1, 35.1)
    md = (tmp_path / "tables" / "table6.md").read_text()
    assert "SegSort 10.2 / –" in md and "DenseCL 48.4 / 35.1" in md


def test_table5_needs_a_target_of_its_protocol(results, tmp_path):
    cfg = make_config()
    cfg["experiments"]["davis"]["targets"] = ["syn_voc_svm"]
    with pytest.raises(T.ReportConfigError, match="experiments.davis.targets"):
        T.build_tables(cfg, results, tmp_path / "tables", only=["table5"])


def test_table7_policy_from_composed_settings_with_paper(results, tmp_path):
    df = build("table7", results, tmp_path / "tables")
    assert list(df.variant) == ["cc_mdown", "cc_mdown_autoaug", "cc_mdown_aplus"]
    assert list(df.policy) == ["Standard", "AutoAugment", "Standard or AutoAugment"]
    assert list(df["P(standard)"]) == [1.0, 0.0, 0.5]
    assert measured_cells_filled(df, ["syn_voc_svm"])
    assert list(df["syn_voc_svm"]) == pytest.approx([84.0, 79.0, 86.0])
    assert list(df["syn_voc_svm paper"]) == [82.8, 79.9, 83.7]
    # the policy follows the settings, not the name: aplus_p = 1 is the standard pipeline only
    cfg = make_config()
    cfg["variants"]["cc_mdown_autoaug"] = [*CC_MDOWN, "aug.aplus=true", "aug.aplus_p=1.0"]
    df = build("table7", results, tmp_path / "t7", cfg)
    assert row(df, variant="cc_mdown_autoaug")["policy"] == "Standard"
    assert row(df, variant="cc_mdown_autoaug")["syn_voc_svm paper"] == 82.8


def test_aug_policy():
    from analysis.tables_sec4 import aug_policy

    assert aug_policy({}) == ("Standard", 1.0)
    assert aug_policy({"aug.aplus": False, "aug.aplus_p": 0.0}) == ("Standard", 1.0)  # A+ off: p is unused
    assert aug_policy({"aug.aplus": True}) == ("Standard or AutoAugment", 0.5)
    assert aug_policy({"aug.aplus": True, "aug.aplus_p": 0.0}) == ("AutoAugment", 0.0)


def test_table8_rows_from_its_experiment_in_order(results, tmp_path):
    df = build("table8", results, tmp_path / "tables")
    assert list(df.variant) == KNN_GRID
    assert measured_cells_filled(df, ["syn_voc_svm"])
    grid = [(r["variant"], r["k"], r["lambda"], r["warm-up epochs"]) for _, r in df.iterrows()]
    assert grid == [("cc_mdown", 20, 0.0, 0), ("knn_k1", 1, 0.4, 0), ("knn_k5", 5, 0.4, 0), ("knn_k20", 20, 0.4, 0),
                    ("knn_lam08", 20, 0.8, 0), ("knn_k20_warmup", 20, 0.4, 5)]  # fmt: skip
    paper = dict(zip(df.variant, df["syn_voc_svm paper"], strict=True))
    assert paper["cc_mdown"] == 82.8 and paper["knn_k1"] == 83.6 and paper["knn_k20"] == 84.2
    assert paper["knn_lam08"] == 80.7 and math.isnan(paper["knn_k20_warmup"])  # the paper reports no warm-up
    assert row(df, variant="knn_k20_warmup")["syn_voc_svm"] == pytest.approx(84.5)


def test_table8_notes_rows_that_differ_from_the_paper_setup(results, tmp_path):
    cfg = make_config()
    cfg["experiments"]["knn"]["variants"] = ["cc_mdown_aplus", "knn_k5"]
    T.build_tables(cfg, results, tmp_path / "tables", only=["table8"])
    md = (tmp_path / "tables" / "table8.md").read_text()
    assert "train with aug.aplus=false; rows that do not (compare orderings only): cc_mdown_aplus." in md


def test_sec4_tables_registered_in_order_and_planned(results):
    cfg = make_config()
    names = T.enabled_tables(cfg)
    assert [n for n in names if n in ("table4", "table5", "table6", "table7", "table8")] == [
        "table4", "table5", "table6", "table7", "table8"]  # fmt: skip
    assert all(T.TABLES[n].category == T.SEC4 for n in ("table5", "table6", "table7", "table8"))
    cfg["experiments"]["davis"]["targets"] = ["syn_davis", "syn_voc_svm"]  # table5 reads DAVIS results only
    assert T.table_inputs(cfg, results, ["table5"]) == [
        str(T.transfer_path(results, "syn_coco", v, "syn_davis")) for v in ("moco_v2", "mc")]  # fmt: skip
    del cfg["experiments"]["augmentation"]
    assert "table7" not in T.enabled_tables(cfg)


def test_sec4_module_imports_first_without_a_cycle():
    code = "import analysis.tables_sec4 as S; from analysis import tables as T; assert 'table5' in T.TABLES; S.table5"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_table8_without_its_experiment_takes_every_knn_variant(results, tmp_path):
    cfg = make_config()
    cfg["report"] = {"table8": {"experiment": None}}
    df = build("table8", results, tmp_path / "tables", cfg)
    # cc_mdown neither enables kNN nor sets knn.*: without the experiment's order it has no row
    assert list(df.variant) == KNN_GRID[1:]
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


def test_table9_fine_tuned_and_frozen_with_paper_rows_by_label(results, tmp_path):
    df = build("table9", results, tmp_path / "tables")
    moco, rand = row(df, variant="moco_v2"), row(df, variant="random_init")
    assert moco["label"] == "MoCo" and moco["paper row"] == "MoCo" and rand["paper row"] == "Rand. init."
    assert moco["syn_voc_seg_ft"] == pytest.approx(30.0) and moco["syn_voc_seg_ft delta"] == pytest.approx(5.0)
    assert moco["syn_nyud_depth_ft"] == pytest.approx(0.70)  # rmse stays in metres, lower is better
    assert moco["syn_nyud_depth_ft delta"] == pytest.approx(-0.20)
    assert moco["syn_voc_seg_ft paper"] == 71.1 and moco["syn_nyud_depth_ft paper"] == 0.606
    assert rand["syn_nyud_depth_ft paper"] == 0.867 and math.isnan(rand["syn_voc_svm paper"])
    assert moco["syn_voc_svm paper"] == 81.0
    md = (tmp_path / "tables" / "table9.md").read_text()
    assert "DenseCL" in md and "VirTex" in md  # reference methods in the note


def test_missing_input_names_file_and_snakemake_target(results, tmp_path):
    missing = T.transfer_path(results, "syn_coco", "cc", "syn_voc_svm")
    missing.unlink()
    with pytest.raises(T.MissingResultError) as err:
        T.build_tables(make_config(), results, tmp_path / "tables", only=["table4"])
    manifest = missing.parent / "frozen-targets.json"  # the transfer job's declared output
    assert str(missing) in str(err.value) and f"`snakemake -f {manifest}` (rule transfer" in str(err.value)
    assert str(missing) in T.table_inputs(make_config(), results, ["table4"])
    assert T.transfer_dag_file(make_config(), missing) == str(manifest)
    ft = T.transfer_path(results, "syn_in", "moco_v2", "syn_voc_seg_ft")
    gpu = {**make_config(), "transfer": {"finetune_resources": {"gpu": 1}}}  # a job of its own: itself
    assert T.transfer_dag_file(gpu, ft) == str(ft)
    assert T.make_hint(ft, results, gpu) == f"`snakemake {ft}` (rule finetune)"
    ft_manifest = ft.parent / "frozen-targets.json"  # no GPU anywhere: it runs in the checkpoint's transfer job
    assert T.transfer_dag_file(make_config(), ft) == str(ft_manifest)
    assert T.make_hint(ft, results, make_config()).startswith(f"`snakemake -f {ft_manifest}` (rule transfer")


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


def test_every_table_has_a_report_caption():
    captions = Path(__file__).resolve().parents[1] / "workflow" / "report"
    assert [n for n in T.TABLES if not (captions / f"{n}.rst").is_file()] == []


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"target": "syn_voc_svm", "metric": "mA', "is not valid JSON (Unterminated string"),  # a truncated write
        ("{}", "is an empty JSON object"),
        ('{"target": "syn_voc_svm", "protocol": "voc07_svm"}', "is incomplete: no 'metric' / 'value'"),
        ('{"metric": "mAP", "value": null}', "has value None, not a finite number"),
        ("[0.8]", "holds a JSON list"),
    ],
)
def test_a_broken_result_file_is_one_line_naming_the_file_and_the_fix_and_no_table(results, tmp_path, capsys,
                                                                                  content, problem):  # fmt: skip
    """Fault 18: a truncated result ended the report in a 40-line traceback, and `{}` rendered a silent '–'."""
    bad = T.transfer_path(results, "syn_coco", "mc", "syn_voc_svm")
    bad.write_text(content)
    out = tmp_path / "cli"
    rc = T.main(["--config-json", json.dumps(make_config()), "--results", str(results), "--out", str(out),
                 "--only", "table4"])  # fmt: skip
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {bad} {problem}"), err
    assert err[0].endswith(f"delete it, then rebuild it with `snakemake -f {bad.parent / 'frozen-targets.json'}` "
                           "(rule transfer evaluates every frozen-feature target of the checkpoint)")
    assert not out.exists()  # no table rendered from it


def test_a_broken_csv_input_of_a_figure_is_one_line_too(results, tmp_path):
    path = T.metrics_path(results, "syn_in", "moco_v2")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"step,loss\n1,2\n\xff\xfe\x00garbage,\n")
    with pytest.raises(T.ResultFileError) as err:
        T.read_csv(path, results)
    assert str(err.value).startswith(f"{path} is not a readable CSV (") and "\n" not in str(err.value)
    assert str(err.value).endswith(f"`snakemake {T.checkpoint_path(results, 'syn_in', 'moco_v2')}` (rule pretrain "
                                   "writes it next to the checkpoint)")  # fmt: skip
