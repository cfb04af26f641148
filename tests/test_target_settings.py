"""Target specs are validated against their protocol before anything runs (analysis/target_settings.py): the
plan and the CLIs refuse a missing input size, a misspelt key, a key of another protocol or format, and a value
of the wrong type or out of range, one line each; every shipped config passes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from analysis import scale_model, target_settings
from analysis.target_settings import TargetSpecError, check_targets, resolve, target_problems

REPO = Path(__file__).resolve().parents[1]
KNN = {"protocol": "knn", "format": "imagefolder", "root": "/data/cls", "image_size": 32}


@pytest.mark.parametrize("path", ["config.yaml", "workflow/configs/paper.yaml"])
def test_the_shipped_configs_and_the_scale_model_targets_are_valid(path, tmp_path):
    cfg = yaml.safe_load((REPO / path).read_text())
    check_targets(cfg["targets"])
    if "paper" in path:  # the scale model's stand-ins for every paper target
        check_targets(scale_model.derive(cfg, tmp_path)["targets"])


def test_a_target_without_its_input_size_is_refused_naming_the_key_and_the_papers_value():
    spec = {k: v for k, v in KNN.items() if k != "image_size"}
    assert target_problems("syn_cls_knn", spec) == [
        "config key targets.syn_cls_knn.image_size: required for protocol 'knn': the input size depends on the "
        "data (the paper's protocol: 224 on ImageNet-size images (Resize 256 -> CenterCrop 224))"
    ]
    davis = {"protocol": "video_propagation", "format": "davis", "root": "/d"}
    assert [p.split(":")[0] for p in target_problems("d", davis)] == ["config key targets.d.short_side"]
    det = {"protocol": "finetune_det", "format": "voc_det", "root": "/v", "min_size_test": 800}
    assert sorted(p.split(":")[0] for p in target_problems("det", det)) == [
        "config key targets.det.max_size", "config key targets.det.min_size_train"]  # fmt: skip


def test_a_misspelt_key_is_refused_with_the_closest_key():
    spec = {**{k: v for k, v in KNN.items() if k != "image_size"}, "imagesize": 32}
    problems = target_problems("syn_cls_knn", spec)
    assert "config key targets.syn_cls_knn.imagesize: unknown key for protocol 'knn'; did you mean 'image_size'?" in problems
    assert len(problems) == 2  # and the size it meant is still missing


def test_a_key_of_another_protocol_or_format_says_where_it_belongs():
    assert target_problems("t", {**KNN, "wd_grid": [1e-3]}) == [
        "config key targets.t.wd_grid: unknown key for protocol 'knn'; it is read by protocol(s) linear, cam"
    ]
    lin = {**KNN, "protocol": "linear", "epochs": 3}
    assert target_problems("t", lin) == [
        "config key targets.t.epochs: unknown key for protocol 'linear'; it is read by `recipe: moco_sgd`"
    ]
    assert target_problems("t", {**lin, "recipe": "moco_sgd"}) == []
    assert target_problems("t", {**KNN, "year": 2012}) == [
        "config key targets.t.year: read only by format(s) voc_seg, voc_det, not 'imagefolder'; remove it"
    ]
    assert target_problems("t", {**KNN, "format": "voc07"}) == [
        "config key targets.t.format: protocol 'knn' reads formats ['imagefolder', 'cifar10', 'food101', 'pets', "
        "'cars', 'places365', 'sun397'], got 'voc07'"
    ]


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("image_size", "32", "must be an integer, got '32'"),
        ("image_size", 0, "must be >= 1, got 0"),
        ("k", True, "must be an integer, got True"),  # a YAML boolean is not a count
        ("temperature", -0.1, "must be > 0, got -0.1"),
        ("temperature", float("nan"), "must be a finite number"),
        ("batch_size", 2.5, "must be an integer"),
        ("mean", [0.5, 0.5], "must be a list of 3 values, got 2"),
        ("std", [0.2, 0.0, 0.2], "item [1] must be > 0"),
        ("splits", {"train": "a", "val": "b"}, "has role(s) ['val']"),
        ("bn_recalibrate", "yes", "must be true or false"),
        ("resize_ratio", 0.9, "must be >= 1.0"),
    ],
)
def test_types_and_ranges_are_checked(key, value, needle):
    problems = target_problems("t", {**KNN, key: value})
    assert len(problems) == 1 and problems[0].startswith(f"config key targets.t.{key}: ") and needle in problems[0]


def test_fine_tuning_values_are_checked_too():
    seg = {"protocol": "finetune_seg", "format": "voc_seg", "root": "/v", "crop_size": 64}
    assert target_problems("s", seg) == []
    assert "must be one of ['sgd', 'adam']" in target_problems("s", {**seg, "optimizer": "lamb"})[0]
    assert "low <= high" in target_problems("s", {**seg, "scale_range": [2.0, 0.5]})[0]
    assert "a positive integer or [height, width]" in target_problems("s", {**seg, "crop_size": [64]})[0]
    assert target_problems("s", {**seg, "epochs": None, "steps": 10}) == []
    assert target_problems("s", {**seg, "epochs": None, "steps": None}) == [
        "config key targets.s: set `steps` or `epochs` (both are null)"
    ]
    depth = {"protocol": "finetune_depth", "format": "nyud_depth", "root": "/n", "resize": 0.5, "crop_size": None}
    assert target_problems("d", depth) == []  # depth may train on whole images


def test_check_targets_lists_every_problem_of_every_target_at_once():
    with pytest.raises(TargetSpecError) as err:
        check_targets({"a": {**KNN, "k": 0}, "b": {**KNN, "protocol": "nope"}, "c": KNN})
    lines = str(err.value).splitlines()
    assert lines[0] == "the study config's targets have 2 problems:"
    assert [x.split(":")[0] for x in lines[1:]] == ["config key targets.a.k", "config key targets.b.protocol"]


def test_resolve_records_every_value_and_which_came_from_the_defaults():
    settings, defaulted = resolve("t", {**KNN, "k": 5})
    assert settings["k"] == 5 and settings["image_size"] == 32 and settings["temperature"] == 0.07
    assert "k" not in defaulted and "image_size" not in defaulted and "temperature" in defaulted
    assert set(defaulted) == set(settings) - {"k", "image_size"}
    assert "root" not in settings  # where the data is goes into the result separately


def test_the_protocol_modules_read_their_defaults_from_the_one_table():
    from analysis import finetune, linear_sgd, protocols, transfer

    assert transfer.PROTOCOL_DEFAULTS is target_settings.TRANSFER_DEFAULTS
    assert finetune.PROTOCOL_DEFAULTS is target_settings.FINETUNE_DEFAULTS
    assert protocols.DEFAULT_WD_GRID is target_settings.DEFAULT_WD_GRID
    assert linear_sgd.MOCO_SGD_DEFAULTS is target_settings.MOCO_SGD_DEFAULTS
    # every key a protocol reads has a type check
    for proto in target_settings.PROTOCOL_FORMATS:
        for recipe in target_settings.RECIPES if proto == "linear" else (None,):
            keys = set(target_settings.protocol_defaults(proto, recipe)) | set(target_settings.FORMAT_KEYS)
            assert keys <= set(target_settings.KEY_CHECKS), (proto, keys - set(target_settings.KEY_CHECKS))
