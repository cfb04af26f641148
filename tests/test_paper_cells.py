"""Every paper cell has a job (issue 19, part 7): NYUD-v2 40-class segmentation (reader, synthetic stand-in,
oracle scoring), the Rand. init. rows of Tables 4 and 9 and MoCHi's VOC detection, each planned by paper.yaml
and shown beside the paper's values."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from scipy.io import savemat

from analysis import dense_targets as dt
from analysis import figures_sec4, finetune, finetune_tasks, scale_model
from analysis import tables as T
from analysis.target_settings import target_problems
from analysis.targets import TargetError, TargetNotFoundError, load_split
from data_prep.synthetic import WorldSpec, make_world, nyud_class_map, tiny_spec

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "workflow" / "configs" / "paper.yaml"
NEW_CELLS_TABLES = ["table3", "table4", "table9", "mochi"]


@pytest.fixture(scope="module")
def nyud(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WorldSpec]:
    spec = WorldSpec.from_dict({**tiny_spec().to_dict(), "nyud": {"splits": {"train": 10, "test": 6}}})
    return make_world(tmp_path_factory.mktemp("world"), spec, only=["nyud"]) / "nyud", spec


def _cfg(root: Path, **kw: object) -> dict:
    return {"format": "nyud_seg", "root": str(root), "class_map": str(root / "classMapping40.mat"), **kw}


# ------------------------------------------------------------------------------------------ nyud_seg reader


def test_nyud_seg_reads_the_synthetic_world_through_its_class_map(nyud: tuple[Path, WorldSpec]) -> None:
    root, spec = nyud
    s = spec.nyud
    tr, te = load_split("n", _cfg(root), "train"), load_split("n", _cfg(root), "test")
    assert (len(tr), len(te)) == (s.splits["train"], s.splits["test"])  # the splits.mat split, as nyud_depth
    assert sorted(tr.rows + te.rows) == list(range(len(tr) + len(te)))
    assert tr.classes == list(dt.NYUD40_CLASSES) and tr.ignore_index == 255
    # the map written beside the .mat sends world class k (label k + 1) to NYU40 class (7k mod 40) + 1
    mapped = nyud_class_map(s.n_classes)[0]
    seen = set()
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "r") as f:
        for split in (tr, te):
            for i in range(len(split)):
                mask, img = split.load_mask(i), split.load(i)
                labels = np.asarray(f["labels"][split.rows[i]]).T  # read independently of the reader
                assert mask.dtype == np.uint8 and mask.shape == (s.height, s.width) == img.size[::-1]
                assert set(np.unique(mask)) <= set(range(40)) | {255}
                assert (mask[labels == 0] == 255).all()  # unlabeled pixels are ignored
                for k in np.unique(labels[labels > 0]):
                    assert (mask[labels == k] == mapped[k - 1] - 1).all()
                    seen.add(int(mask[labels == k][0]))
    assert len(seen) > 3 and seen != set(range(len(seen)))  # several classes, not the identity
    assert tr.fingerprint != te.fingerprint
    other = load_split("n", _cfg(root), "train")
    assert other.fingerprint == tr.fingerprint
    tr.close(), te.close(), other.close()


def test_nyud_seg_reads_the_real_file_layouts(tmp_path: Path, nyud: tuple[Path, WorldSpec]) -> None:
    """Gupta et al.'s file is MATLAB v5 (mapClass 1 x 894, className 1 x 40 cell); a v7.3 copy (HDF5) and one
    without className are read the same way; another mapping is another fingerprint."""
    root, spec = nyud
    base = load_split("n", _cfg(root), "train")
    mapping = nyud_class_map(spec.nyud.n_classes)
    savemat(tmp_path / "v5.mat", {"mapClass": mapping})  # no className: the 40 standard names
    with h5py.File(tmp_path / "v73.mat", "w", userblock_size=512) as f:
        f["mapClass"] = mapping.T  # MATLAB's 1 x 894 as h5py sees it
    for name in ("v5.mat", "v73.mat"):
        split = load_split("n", _cfg(root, class_map=str(tmp_path / name)), "train")
        assert split.classes == list(dt.NYUD40_CLASSES)
        np.testing.assert_array_equal(split.load_mask(3), base.load_mask(3))
        assert split.fingerprint == base.fingerprint
        split.close()
    shifted = mapping.copy()
    shifted[0, : spec.nyud.n_classes] = 40
    savemat(tmp_path / "other.mat", {"mapClass": shifted})
    other = load_split("n", _cfg(root, class_map=str(tmp_path / "other.mat")), "train")
    labelled = other.load_labels(0) > 0
    assert (other.load_mask(0)[labelled] == 39).all() and other.fingerprint != base.fingerprint
    other.close(), base.close()


def test_a_missing_or_garbled_class_map_stops_naming_the_file_and_the_layout(tmp_path: Path,
                                                                            nyud: tuple[Path, WorldSpec]) -> None:
    root, _ = nyud
    with pytest.raises(TargetError, match=r"'n': format nyud_seg needs `class_map`.*classMapping40\.mat"):
        load_split("n", {"format": "nyud_seg", "root": str(root)}, "train")
    with pytest.raises(TargetNotFoundError, match=rf"class map \(`class_map`\) {tmp_path}/nope\.mat does not exist"):
        load_split("n", _cfg(root, class_map=str(tmp_path / "nope.mat")), "train")
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"\x00\x01 not a MATLAB file " * 20)
    cases = {
        garbage: "is not a readable MATLAB file",
        tmp_path / "nomap.mat": "has no `mapClass` variable",
        tmp_path / "matrix.mat": "must be a numeric 1 x N vector",
        tmp_path / "range.mat": r"integer classes in 0\.\.40",
        tmp_path / "names.mat": r"integer classes in 0\.\.2 .*got 1\.\.5",  # className names 2 classes
    }
    savemat(tmp_path / "nomap.mat", {"className": np.array([["wall"]], dtype=object)})
    savemat(tmp_path / "matrix.mat", {"mapClass": np.ones((3, 4))})
    savemat(tmp_path / "range.mat", {"mapClass": np.array([[1.0, 41.0]])})
    savemat(tmp_path / "names.mat", {"mapClass": np.array([[1.0, 5.0]]),
                                     "className": np.array([["a", "b"]], dtype=object)})  # fmt: skip
    for path, needle in cases.items():
        with pytest.raises(TargetError, match=needle) as err:
            load_split("n", _cfg(root, class_map=str(path)), "train")
        assert str(path) in str(err.value) and "mapClass" in str(err.value), str(err.value)
    # a map shorter than the labels in the file: named when a mask is read
    savemat(tmp_path / "short.mat", {"mapClass": np.array([[1.0]])})
    short = load_split("n", _cfg(root, class_map=str(tmp_path / "short.mat")), "train")
    with pytest.raises(TargetError, match=r"has label \d+, but class map .*short\.mat maps labels 1\.\.1 only"):
        [short.load_mask(i) for i in range(len(short))]
    short.close()
    # a labeled set without `labels` (a depth-only copy) is refused for segmentation, naming what it needs
    bare = tmp_path / "bare"
    bare.mkdir()
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "r") as src, h5py.File(bare / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"], f["depths"] = src["images"][:], src["depths"][:]
    (bare / "splits.mat").write_bytes((root / "splits.mat").read_bytes())
    with pytest.raises(TargetError, match=r"has no `labels` dataset; nyud_seg needs the per-pixel class ids"):
        load_split("n", _cfg(bare, class_map=str(root / "classMapping40.mat")), "train")


def test_the_plan_requires_class_map_for_nyud_seg_only() -> None:
    seg = {"protocol": "finetune_seg", "format": "nyud_seg", "root": "/n", "crop_size": [480, 640]}
    assert target_problems("s", seg) == [
        "config key targets.s.class_map: required for format 'nyud_seg': the path of Gupta et al.'s "
        "classMapping40.mat (mapClass: 894 NYUD labels -> 40 classes), e.g. /datasets/nyud/classMapping40.mat"
    ]
    assert target_problems("s", {**seg, "class_map": "/n/classMapping40.mat"}) == []
    voc = {**seg, "format": "voc_seg", "class_map": "/n/classMapping40.mat"}
    assert target_problems("s", voc) == [
        "config key targets.s.class_map: read only by format(s) nyud_seg, not 'voc_seg'; remove it"
    ]
    depth = {"protocol": "finetune_depth", "format": "nyud_seg", "root": "/n", "resize": 0.5, "crop_size": None}
    assert target_problems("d", depth)[0].startswith("config key targets.d.format: protocol 'finetune_depth' reads")


class _Oracle(torch.nn.Module):
    """Returns the given outputs in evaluation order (tests/test_finetune.py's oracle)."""

    def __init__(self, answers: list[torch.Tensor]) -> None:
        super().__init__()
        self.answers, self.i = answers, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.answers[self.i]
        self.i += 1
        return out


def test_segmentation_task_trains_on_and_scores_nyud_seg(nyud: tuple[Path, WorldSpec]) -> None:
    root, _ = nyud
    s = finetune.resolve_settings({"protocol": "finetune_seg", "steps": 1, **_cfg(root), "crop_size": 32})
    task = finetune_tasks.SegmentationTask("nyud_seg", _cfg(root), s)
    masks = [task.test.load_mask(i) for i in range(len(task.test))]
    onehot = [torch.nn.functional.one_hot(torch.from_numpy(np.where(m == 255, 0, m)).long(), 40)
              .permute(2, 0, 1)[None].float() for m in masks]  # fmt: skip
    res = task.evaluate(_Oracle(onehot), torch.device("cpu"))
    assert res["mIoU"] == 1.0 and res["pixel_acc"] == 1.0 and len(res["per_class_IoU"]) == 40
    wrong = [torch.roll(o, 1, dims=1) for o in onehot]  # every class predicted as the next one
    assert task.evaluate(_Oracle(wrong), torch.device("cpu"))["mIoU"] == 0.0
    x, y = task.sample(0, np.random.default_rng(0))  # a training crop: image and its mapped mask
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    assert set(y.unique().tolist()) <= set(range(40)) | {255}
    task.train.close(), task.test.close()


# --------------------------------------------------------------------------------- paper.yaml's new cells


@pytest.fixture(scope="module")
def paper() -> dict:
    return yaml.safe_load(PAPER.read_text())


def _new_cells(paper: dict) -> list[tuple[str, str, str]]:
    """(dataset, variant, target) of the cells this issue adds: NYUD seg in Tables 3, 4 and 9, the Rand. init.
    fine-tuned rows of Tables 4 and 9, and MoCHi's VOC detection."""
    ex = paper["experiments"]
    cells = [(d, "moco_v2", "nyud_seg_ft") for d in ex["datasets"]["datasets"]]
    for exp in ("invariances", "finetune"):
        cells += [("coco", v, "nyud_seg_ft") for v in ex[exp]["variants"]]
    cells += [("coco", "random_init", t) for t in ("voc_seg_ft", "cityscapes_seg_ft", "nyud_depth_ft")]
    cells += [("in118k", v, "voc_det_ft") for v in ex["mochi"]["variants"]]
    return list(dict.fromkeys(cells))


def test_paper_config_declares_the_new_cells_in_the_tables_experiments(paper: dict) -> None:
    t = paper["targets"]
    assert t["nyud_seg_ft"]["protocol"] == "finetune_seg" and t["nyud_seg_ft"]["format"] == "nyud_seg"
    assert t["nyud_seg_ft"]["class_map"].endswith("classMapping40.mat")
    det = t["voc_det_ft"]  # MoCHi "follow[s] [MoCo]": 07+12 trainval -> 07 test, the format's default splits
    assert det["protocol"] == "finetune_det" and "splits" not in det and det.get("year", 2007) == 2007
    ex = paper["experiments"]
    assert ex["invariances"]["variants"][0] == ex["finetune"]["variants"][-1] == "random_init"
    assert ex["finetune"]["variants"][0] == "moco_v2_800ep"  # Table 9's deltas stay against MoCo
    assert {d for e in ex.values() if "random_init" in e["variants"] for d in e["datasets"]} == {"coco"}
    # Fig 5 draws monitor curves, which an untrained network does not have: it reads Table 4's trained runs
    rs = T.report_settings(paper)
    assert rs["table4"]["experiment"] == rs["fig5"]["experiment"] == "invariances"
    fig5_runs = [str(p) for p in figures_sec4.fig5_plan(paper, "/r", rs)]
    assert len(fig5_runs) == len(ex["invariances"]["variants"]) - 1 and not any("random_init" in p for p in fig5_runs)
    planned = set(T.table_inputs(paper, "/r", NEW_CELLS_TABLES))  # what the report asks Snakemake for
    missing = [c for c in _new_cells(paper) if str(T.transfer_path("/r", *c)) not in planned]
    assert not missing
    # the scale model keeps the cells and points class_map at the world's file
    cfg = scale_model.derive(paper, "/tmp/scale")
    assert cfg["experiments"] == paper["experiments"]
    assert cfg["targets"]["nyud_seg_ft"]["class_map"] == "/tmp/scale/synthetic/nyud/classMapping40.mat"
    assert cfg["targets"]["nyud_seg_ft"]["format"] == "nyud_seg"


def test_paper_config_plans_a_job_for_every_new_cell(tmp_path: Path, paper: dict) -> None:
    """The real plan (snakemake -n) with stand-in roots: every new cell is the output of a fine-tuning job."""
    cfg = copy.deepcopy(paper)
    for section in ("datasets", "targets"):
        for name, entry in cfg[section].items():
            (tmp_path / "roots" / name).mkdir(parents=True, exist_ok=True)
            entry["root"] = str(tmp_path / "roots" / name)
    cfg["results"] = str(tmp_path / "res")
    cfg["transfer"]["cache"] = str(tmp_path / "res" / "features")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile",
                          str(tmp_path / "study.yaml")], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs, rule = {}, None
    for line in res.stdout.splitlines():
        line = line.strip()
        if line.startswith("rule ") or line.startswith("localrule "):
            rule = line.split()[1].rstrip(":")
        elif line.startswith("output:"):
            for out in line.removeprefix("output:").split(","):
                jobs[out.strip()] = rule
    for cell in _new_cells(paper):
        path = str(T.transfer_path(tmp_path / "res", *cell))
        assert jobs.get(path) == "finetune", (cell, jobs.get(path))


# ----------------------------------------------------------------------------- the tables show the cells


def _fake_results(config: dict, results: Path, names: list[str]) -> None:
    """A result JSON for every transfer file the tables read (fine-tuned detection with AP / AP75)."""
    for i, p in enumerate(T.table_inputs(config, results, names)):
        p = Path(p)
        spec = config["targets"].get(p.stem) or {}
        value = 0.30 + 0.01 * (i % 7)
        if spec.get("protocol") == "finetune_det":
            res = {"metric": "AP50", "value": value, "metrics": {"AP50": value, "AP": value - 0.2, "AP75": value - 0.1}}
        elif spec.get("protocol") == "finetune_depth":
            res = {"metric": "rmse", "value": 0.5 + value}
        else:
            res = {"metric": "mIoU" if spec.get("protocol") == "finetune_seg" else "top1", "value": value}
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(res))


def test_the_tables_show_the_new_columns_and_rows_with_the_papers_values(tmp_path: Path, paper: dict) -> None:
    cfg = copy.deepcopy(paper)
    cfg["report"] = {**(cfg.get("report") or {}), "mochi": {"embedding_stats": False}}
    results = tmp_path / "res"
    _fake_results(cfg, results, NEW_CELLS_TABLES)
    rs, pv = T.report_settings(cfg), T.load_paper_values()
    frames = {n: T.TABLES[n].build(cfg, results, rs, pv).frame for n in NEW_CELLS_TABLES}

    def row(name: str, **keys: str) -> dict:
        df = frames[name]
        for k, v in keys.items():
            df = df[df[k] == v]
        assert len(df) == 1, (name, keys)
        return df.iloc[0].to_dict()

    t3 = {d: row("table3", dataset=d) for d in ("in118k", "coco", "oi118k", "in118k_lt")}
    assert [t3[d]["nyud_seg_ft paper"] for d in t3] == [37.7, 39.3, 38.4, 37.9]
    assert not math.isnan(t3["coco"]["nyud_seg_ft"])
    r4 = row("table4", variant="random_init")
    assert (r4["voc_seg_ft paper"], r4["cityscapes_seg_ft paper"], r4["nyud_seg_ft paper"]) == (39.2, 65.0, 24.4)
    assert math.isnan(r4["voc07_svm paper"]) and not math.isnan(r4["nyud_seg_ft"])  # the paper prints "-"
    assert row("table4", variant="cc_mdown_aplus_knn")["nyud_seg_ft paper"] == 40.9
    r9 = row("table9", variant="random_init")
    assert r9["paper row"] == "Rand. init." and r9["nyud_seg_ft paper"] == 24.4 and r9["nyud_depth_ft paper"] == 0.867
    assert (r9["voc_seg_ft paper"], r9["cityscapes_seg_ft paper"]) == (39.2, 65.0)
    assert row("table9", variant="moco_v2_800ep")["nyud_seg_ft delta"] == 0.0  # deltas vs MoCo, the first row
    base, hard, oracle = (row("mochi", variant=v) for v in ("moco_v2_200ep", "mochi_128_1024_512", "mochi_oracle"))
    assert (base["VOC det AP50 paper"], base["VOC det AP paper"], base["VOC det AP75 paper"]) == (82.5, 56.8, 63.3)
    assert (hard["VOC det AP50 paper"], hard["VOC det AP paper"], hard["VOC det AP75 paper"]) == (82.7, 57.5, 64.4)
    assert math.isnan(oracle["VOC det AP50 paper"])  # the oracle run has no published value
    for r in (base, hard):
        assert r["voc_det_ft AP"] == pytest.approx(r["voc_det_ft"] - 20.0)
        assert r["voc_det_ft AP75"] == pytest.approx(r["voc_det_ft"] - 10.0)
    assert hard["voc_det_ft AP delta"] == pytest.approx(hard["voc_det_ft delta"])
