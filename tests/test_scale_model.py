"""The paper study's scale model (analysis.scale_model): derived from paper.yaml, run end to end.

The paper config cannot run here (weeks of GPU time), so its grid would rot unnoticed: an experiment without
targets, a table without inputs. The scale model keeps its experiments, variants and targets and shrinks only
sizes, so running it checks that every table and figure paper.yaml declares gets a measured value.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis import figures as F
from analysis import scale_model
from analysis import tables as T

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "workflow" / "configs" / "paper.yaml"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module")
def paper() -> dict:
    return yaml.safe_load(PAPER.read_text())


def test_scale_model_keeps_the_paper_grid_and_changes_only_sizes_and_places(paper, tmp_path):
    cfg = scale_model.derive(paper, tmp_path / "res")
    assert cfg["experiments"] == paper["experiments"]
    assert cfg["variants"].keys() == paper["variants"].keys() and cfg["targets"].keys() == paper["targets"].keys()
    for name, t in cfg["targets"].items():
        assert t["protocol"] == paper["targets"][name]["protocol"] and t["synthetic"] is True
        assert t["root"].startswith(str(tmp_path / "res" / "synthetic"))
    # MoCo's SGD linear recipe keeps its kind but runs two epochs with the lr step between them
    lin = cfg["targets"]["imagenet_linear"]
    assert lin["recipe"] == paper["targets"]["imagenet_linear"]["recipe"] == "moco_sgd"
    assert lin["epochs"] == 2 and lin["milestones"] == [1]
    for name, ds in cfg["datasets"].items():
        assert ds["subset"]["rule"] == paper["datasets"][name]["subset"]["rule"] and ds["synthetic"] is True
    # variant overrides survive except crop sizes, which shrink with the backbone's input
    assert cfg["variants"]["mc"] == ["method=moco_v2", "epochs=200", "crop.n_small=4", "crop.size=24"]
    assert cfg["variants"]["knn_k20_warmup"][-2:] == ["knn.k=20", "knn.warmup_epochs=5"]
    # a variant's own batch (end-to-end's batch sweep) shrinks with the global one (64 -> 16 per process)
    assert "batch_size=64" in cfg["variants"]["mk_e2e_b1024"] and "batch_size=16" in cfg["variants"]["mk_e2e_b256"]
    pre = cfg["pretrain"]["overrides"]
    assert "model=resnet18" in pre and "moco.K=256" in pre and "model=resnet50" not in pre
    assert len({o.split("=")[0] for o in pre}) == len(pre)  # Hydra rejects a key given twice


def test_every_target_format_of_the_schema_has_a_synthetic_stand_in():
    schema = yaml.safe_load(SCHEMA.read_text())
    dataset_formats = schema["properties"]["datasets"]["additionalProperties"]["properties"]["format"]["enum"]
    target_formats = schema["properties"]["targets"]["additionalProperties"]["properties"]["format"]["enum"]
    assert set(dataset_formats) <= set(scale_model.DATASET_STAND_INS)
    assert set(target_formats) <= set(scale_model.TARGET_STAND_INS)


def test_rewrite_overrides_replaces_in_place_and_appends_new_keys():
    out = scale_model.rewrite_overrides(["model=resnet50", "epochs=400", "+x=1"], {"model": "resnet18", "x": 2,
                                                                                    "max_steps": 3})  # fmt: skip
    assert out == ["model=resnet18", "epochs=400", "x=2", "max_steps=3"]
    assert [scale_model.scaled_crop(s) for s in (224, 160, 96)] == [32, 24, 16]


# Columns a table may leave empty by design: descriptors, and Table 1's class statistics of datasets that have
# no image-level classes (COCO, OpenImages, BDD100K).
DESCRIPTORS = {"paper row", "paper method", "label", "N", "s", "s'"}
CLASS_STATS = {"uniform", "gini", "max/min", "many", "medium", "few"}


def _empty_measured_cells(name: str, frame: pd.DataFrame, cfg: dict) -> list[str]:
    empty = []
    for col in frame.columns:
        if "paper" in col or col in DESCRIPTORS:
            continue
        for i, value in frame[col].items():
            if isinstance(value, float) and math.isnan(value):
                row = frame.iloc[i]
                if name == "table1" and col in CLASS_STATS and cfg["datasets"][row["dataset"]]["format"] != "imagenet":
                    continue
                empty.append(f"{name}: row {dict(row.iloc[:3])} column {col!r}")
    return empty


@pytest.mark.slow
def test_scale_model_runs_the_whole_paper_dag_and_fills_every_table_and_figure(paper, tmp_path):
    results = tmp_path / "results"
    cfg = scale_model.derive(paper, results)
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(cfg_path), "--quiet", "progress"],
        cwd=REPO, capture_output=True, text=True, timeout=2400,
    )  # fmt: skip
    if res.returncode != 0:
        logs = sorted((results / "logs").rglob("*.log"))
        tails = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs if "rror" in p.read_text())
        pytest.fail(f"scale model failed:\n{res.stderr[-4000:]}\n{tails[-8000:]}")

    # every (dataset, variant, target) of every experiment was evaluated once
    for exp, spec in paper["experiments"].items():
        for d in spec["datasets"]:
            for v in spec["variants"]:
                for t in spec.get("targets", []):
                    assert T.transfer_path(results, d, v, t).is_file(), (exp, d, v, t)
    assert sorted(p.parent.name for p in (results / "pretrain").rglob("random_init/checkpoint.pt")) == ["random_init"]

    rs = T.report_settings(cfg)
    tables = T.enabled_tables(cfg, rs)
    assert set(tables) == set(T.TABLES)  # the paper config declares every table the report knows
    empty = []
    for name in tables:
        frame = pd.read_csv(results / "tables" / f"{name}.csv")
        assert len(frame), name
        empty += _empty_measured_cells(name, frame, cfg)
    assert not empty, "\n".join(empty)

    figures = F.enabled_figures(cfg, rs)
    assert set(figures) == set(F.FIGURES)
    for name in figures:
        for path in map(Path, F.figure_outputs(results / "figures", name)):
            assert path.is_file() and path.stat().st_size > 0, path
        data = pd.read_csv(next(p for p in map(Path, F.figure_outputs(results / "figures", name)) if p.suffix == ".csv"))
        assert len(data), name
