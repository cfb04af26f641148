"""The experiment grid's soundness rules (analysis.grid), with the study's real Hydra composition."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from analysis.grid import GridError, baseline_errors, check_grid, fairness_errors

REPO = Path(__file__).resolve().parents[1]


def _cfg(variants: dict, experiments: dict, overrides=("epochs=3", "batch_size=32", "moco.K=256")) -> dict:
    return {"pretrain": {"overrides": list(overrides)}, "variants": variants, "experiments": experiments}


def test_variants_on_different_schedules_are_refused_naming_experiment_variants_and_key():
    cfg = _cfg(
        {"moco_v2": ["method=moco_v2"], "mochi": ["method=mochi", "epochs=2"]},
        {"mochi": {"datasets": ["d"], "variants": ["moco_v2", "mochi"]}},
    )
    errors = fairness_errors(cfg)
    assert len(errors) == 1
    assert "experiments.mochi" in errors[0] and "'epochs'" in errors[0]
    assert "moco_v2: epochs=3" in errors[0] and "mochi: epochs=2" in errors[0]
    with pytest.raises(GridError, match="studies: \\[epochs\\]"):
        check_grid(cfg)


@pytest.mark.parametrize("key, value", [("batch_size", 64), ("moco.K", 512), ("max_steps", 7), ("optim.lr", 0.123),
                                        ("optim.schedule", "step"), ("optim.warmup_steps", 10)])
def test_every_schedule_key_counts_even_when_it_comes_from_the_composed_config(key, value):
    cfg = _cfg({"a": ["method=moco_v2"], "b": ["method=moco_v2", f"{key}={value}"]},
               {"e": {"datasets": ["d"], "variants": ["a", "b"]}})  # fmt: skip
    assert [f"'{key}'" in e for e in fairness_errors(cfg)] == [True]


def test_method_defaults_are_part_of_the_schedule():
    # moco_v1's own K (4096) differs from moco_v2's when nothing overrides it globally.
    cfg = _cfg({"v1": ["method=moco_v1"], "v2": ["method=moco_v2", "moco.K=256"]},
               {"e": {"datasets": ["d"], "variants": ["v1", "v2"]}}, overrides=())  # fmt: skip
    assert any("'moco.K'" in e and "v1: moco.K=4096" in e for e in fairness_errors(cfg))


def test_an_experiment_may_study_a_schedule_key_it_names():
    cfg = _cfg({"short": ["epochs=2"], "long": ["epochs=4"]},
               {"length": {"datasets": ["d"], "variants": ["short", "long"], "studies": ["epochs"]}})  # fmt: skip
    assert fairness_errors(cfg) == []
    cfg["experiments"]["length"]["studies"] = ["epoch"]
    assert any("studies: ['epoch'] are not schedule keys" in e for e in fairness_errors(cfg))


def test_the_untrained_baseline_is_exempt_from_the_schedule_but_allowed_with_one_dataset_only():
    cfg = _cfg({"moco_v2": ["method=moco_v2"], "random_init": ["method=random_init", "epochs=1"]},
               {"a": {"datasets": ["d1"], "variants": ["moco_v2", "random_init"]}})  # fmt: skip
    check_grid(cfg)  # a random_init run has no schedule to compare
    cfg["experiments"]["b"] = {"datasets": ["d2"], "variants": ["random_init"]}
    errors = baseline_errors(cfg)
    assert len(errors) == 1 and "variants.random_init" in errors[0]
    assert "d1 in experiments a" in errors[0] and "d2 in experiments b" in errors[0]


@pytest.mark.parametrize("path", ["config.yaml", "workflow/configs/paper.yaml"])
def test_the_shipped_study_configs_are_sound(path):
    check_grid(yaml.safe_load((REPO / path).read_text()))


def test_paper_config_keeps_knn_moco_without_warm_up_and_offers_it_as_its_own_variant():
    from analysis.tables import variant_settings

    cfg = yaml.safe_load((REPO / "workflow/configs/paper.yaml").read_text())
    knn = [v for v in cfg["variants"] if variant_settings(cfg, v).get("knn.enabled")]
    warm = {v: variant_settings(cfg, v)["knn.warmup_epochs"] for v in knn}
    assert warm["cc_mdown_aplus_knn"] == 0 and warm["knn_k20"] == 0
    assert [v for v, w in warm.items() if w] == ["knn_k20_warmup"]


def test_the_old_paper_grid_would_be_refused():
    """MoCHi at 200 epochs against MoCo-v2 at 400, and five untrained baselines: what this check exists for."""
    cfg = yaml.safe_load((REPO / "workflow/configs/paper.yaml").read_text())
    bad = copy.deepcopy(cfg)
    bad["experiments"]["mochi"]["variants"][0] = "moco_v2"
    bad["experiments"]["datasets"]["variants"].append("random_init")
    with pytest.raises(GridError) as err:
        check_grid(bad)
    assert "experiments.mochi" in str(err.value) and "variants.random_init" in str(err.value)


def test_select_experiments_keeps_the_named_ones_in_config_order_and_names_unknown_ones():
    from analysis.grid import select_experiments

    cfg = {"experiments": {"a": {}, "b": {}, "c": {}}}
    select_experiments(cfg, "c, a")
    assert list(cfg["experiments"]) == ["a", "c"]
    select_experiments(cfg, None)
    assert list(cfg["experiments"]) == ["a", "c"]
    with pytest.raises(GridError, match=r"only_experiments: \['b'\]"):
        select_experiments(cfg, ["b"])


def test_a_typo_in_a_variant_override_names_the_variant_and_the_closest_keys_not_hydras_plus_hint():
    from analysis.tables import ReportConfigError

    cfg = _cfg({"iou030": ["method=moco_v2", "crop.max_iuo=0.3"]}, {"e": {"datasets": ["d"], "variants": ["iou030"]}})
    with pytest.raises(ReportConfigError) as err:
        check_grid(cfg)
    msg = str(err.value)
    assert "variants.iou030" in msg and "'crop.max_iuo=0.3'" in msg and "did you mean crop.max_iou" in msg
    assert "+crop" not in msg


def test_a_gpu_count_that_changes_the_global_batch_stops_the_plan_unless_the_lr_scales():
    """No silent batch change: 8 GPUs x 64 trains at 512 with the lr tuned for 256."""
    cfg = _cfg({"a": ["method=moco_v2"], "e2e": ["method=end_to_end", "optim.lr_scale_batch=256"]},
               {"e": {"datasets": ["d"], "variants": ["a"]}, "f": {"datasets": ["d"], "variants": ["e2e"]}},
               overrides=("epochs=3", "batch_size=64", "moco.K=4096", "optim.tuned_batch=256"))  # fmt: skip
    cfg["pretrain"]["resources"] = {"gpu": 4}
    assert fairness_errors(cfg) == [] and check_grid(cfg) is None  # 4 x 64 = 256
    cfg["pretrain"]["resources"] = {"gpu": 8}
    with pytest.raises(GridError) as err:
        check_grid(cfg)
    lines = [x.strip() for x in str(err.value).splitlines()[1:]]
    assert len(lines) == 1 and lines[0].startswith("config key variants.a: global batch 512 (batch_size=64 x 8")
    assert "set batch_size=32 or optim.lr_scale_batch=256" in lines[0]  # e2e scales its lr: not refused


def test_the_trainer_refuses_an_untuned_global_batch_before_any_work():
    from study.runconfig import ConfigError, validate_config

    cfg = {"out_dir": "/tmp/x", "data": {"shards": "/tmp/s"}, "batch_size": 64, "moco": {"K": 4096},
           "optim": {"lr": 0.3, "tuned_batch": 256, "lr_scale_batch": None}}  # fmt: skip
    validate_config(cfg, world=4)
    with pytest.raises(ConfigError, match=r"global batch 512 \(batch_size=64 x 8 process\(es\)\) is not "
                                          r"optim.tuned_batch=256.*set batch_size=32 to keep it, or "
                                          r"optim.lr_scale_batch=256"):  # fmt: skip
        validate_config(cfg, world=8)
    validate_config({**cfg, "optim": {**cfg["optim"], "lr_scale_batch": 256}}, world=8)  # scaled: allowed
