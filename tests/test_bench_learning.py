"""benchmarks/learning.py --smoke: the learning check runs the real trainer and the real transfer code on CPU."""

from __future__ import annotations

import json
from pathlib import Path

from format_fixtures import make_class_folder, make_class_shards

REPO = Path(__file__).resolve().parents[1]


def test_learning_check_trains_evaluates_and_reports_the_gap(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import learning

    shards = make_class_shards(tmp_path / "data")
    cls = make_class_folder(tmp_path / "cls")
    out = tmp_path / "out"
    rec = learning.main(["--shards", str(shards), "--cls-root", str(cls), "--out", str(out), "--smoke"])
    assert json.loads((out / "learning.json").read_text()) == rec
    for run in ("moco_v2", "random_init"):
        for target in ("syn_cls_knn", "syn_cls_linear"):
            res = json.loads((out / run / f"{target}.json").read_text())
            assert res["settings"]["bn_recalibrate"] is False  # the paper's protocol, not the demo's
            assert rec[run][target] == round(100 * res["value"], 1)
        assert rec[f"gap_{target}"] == round(rec["moco_v2"][target] - rec["random_init"][target], 1)
    assert rec["steps"] == 4 and rec["n_test"] == 12  # 2 epochs of 32 images at batch 16; 3 classes x 4
    # the two runs share the architecture: the baseline is the trained model's own initialisation scheme
    assert {"model.width=8", "model.small_input=true"} <= set(rec["overrides"])
    # the recipe is the demo's mechanism run, read from config.yaml, not a copy that could drift
    moco, untrained = learning.recipe(learning.CONFIG)
    assert rec["overrides"][: len(moco)] == moco and "method=moco_v2" in moco and "method=random_init" in untrained
    assert {"model.width=8", "model.small_input=true"} <= set(untrained)
