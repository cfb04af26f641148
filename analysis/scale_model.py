"""A scale model of the paper study, derived from workflow/configs/paper.yaml by overrides only.

The paper config is weeks of GPU time, so nothing would notice when it stops planning a table. The scale model
keeps its experiments, variants and targets exactly and changes only sizes and places: every root points at the
synthetic world's folder in the same on-disk format, the backbone, crops, queue and subsets shrink, and each run
stops after a few steps. Because it is computed from paper.yaml (never a copied file), the two cannot drift;
tests/test_scale_model.py runs its whole DAG and checks that every table and figure the paper config declares
is rendered with every measured cell filled.

    python -m analysis.scale_model --out /tmp/scale/study.yaml --results /tmp/scale/results
    snakemake --cores 2 --configfile /tmp/scale/study.yaml
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

PAPER_CONFIG = Path(__file__).resolve().parents[1] / "workflow" / "configs" / "paper.yaml"

# Dataset format -> the synthetic world's folder written in that format (data_prep/synthetic.py).
DATASET_STAND_INS: dict[str, str] = {
    "imagenet": "imagenet", "coco": "coco", "openimages": "openimages", "bdd100k": "bdd100k",
}  # fmt: skip

# Target format -> (synthetic format, synthetic folder). The one place where a paper target without a synthetic
# counterpart is mapped: the torchvision classification sets (CIFAR10, Food-101, Pets, Cars, Places365, SUN397)
# and the ImageNet val folders become the synthetic ImageFolder set, under the same protocol.
TARGET_STAND_INS: dict[str, tuple[str, str]] = {
    **{fmt: ("imagefolder", "cls") for fmt in ("cifar10", "food101", "pets", "cars", "places365", "sun397")},
    "imagefolder": ("imagefolder", "cls"),
    "voc07": ("voc07", "voc"),
    "voc_seg": ("voc_seg", "voc"),
    "davis": ("davis", "davis"),
    # fine-tuning: Cityscapes becomes the VOC-layout segmentation set (same protocol, 21 classes)
    "cityscapes": ("voc_seg", "voc"),
    "voc_det": ("voc_det", "voc"),
    "nyud_depth": ("nyud_depth", "nyud"),
    # NYUD 40-class segmentation: the world's NYUD files (their `labels`) and its classMapping40.mat
    "nyud_seg": ("nyud_seg", "nyud"),
}
# Split names of a stand-in that differ from its format's defaults (the world has VOC2007 only, not 07+12).
STAND_IN_SPLITS: dict[str, dict[str, str]] = {"voc_det": {"train": "2007_trainval", "test": "2007_test"}}
# Format keys naming a file of the user's, per stand-in format: the world's file (path under its out folder).
STAND_IN_FILES: dict[str, dict[str, str]] = {"nyud_seg": {"class_map": "nyud/classMapping40.mat"}}

# Per-protocol target sizes (the paper's 224 px / 480p would dominate the run time).
PROTOCOL_SIZES: dict[str, dict[str, Any]] = {
    "linear": {"image_size": 32},
    "knn": {"image_size": 32},
    "voc07_svm": {"image_size": 32},
    "cam": {"image_size": 32, "n_images": 4},
    "segment_retrieval": {"image_size": 64, "stride": 8, "n_segments": 5},
    "video_propagation": {"short_side": 48, "stride": 8},
    # fine-tuning: two steps of two images (the paper's recipes are analysis.finetune's defaults)
    "finetune_seg": {"steps": 2, "batch_size": 2, "crop_size": 32, "head_channels": 16, "num_workers": 0},
    "finetune_det": {"steps": 2, "batch_size": 2, "min_size_train": [72], "min_size_test": 72, "max_size": 128,
                     "anchor_sizes": [8, 16, 32, 64], "score_thresh": 0.0, "rpn_pre_nms_train": 100,
                     "rpn_post_nms_train": 16, "rpn_pre_nms_test": 50, "rpn_post_nms_test": 4,
                     "rpn_batch_per_image": 32, "roi_batch_per_image": 8, "milestones": [], "warmup_steps": 0,
                     "num_workers": 0},
    "finetune_depth": {"steps": 2, "batch_size": 2, "resize": 1.0, "crop_size": None, "decoder_channels": 16,
                       "n_up": 3, "num_workers": 0},
}
# Per-recipe overrides of linear targets: MoCo's 100 SGD epochs (analysis.linear_sgd) shrink to two, with the lr
# step between them so the schedule still runs.
RECIPE_SIZES: dict[str, dict[str, Any]] = {
    "moco_sgd": {"epochs": 2, "milestones": [1], "batch_size": 16},
}

# The world: a few hundred tiny images in all (the embedded default's spec, smaller).
WORLD_SPEC: dict[str, Any] = {
    "seed": 0,
    "colours": "random",
    "imagenet": {"splits": {"train": 24}},
    "coco": {"splits": {"train2017": 96}},
    "openimages": {"splits": {"train": 96}},
    "bdd100k": {"splits": {"train": 64}},
    "cls": {"splits": {"train": 8, "val": 4}},
    "voc": {"splits": {"trainval": 40, "test": 40}},
    "davis": {"splits": {"train": 1, "val": 2}, "n_frames": 6},
    "nyud": {"splits": {"train": 8, "test": 4}},
}

# Subset rules keep their kind; only their sizes shrink to what the world holds.
SUBSET_SIZES: dict[str, dict[str, Any]] = {
    "uniform": {"per_class": 10},
    "long_tailed": {"total": 100, "min_per_class": 2, "max_per_class": 24},
    "random": {"n": 64},
    "all": {},
}

# Trainer overrides appended to the paper's pretrain.overrides (the later value of a key replaces the paper's).
PRETRAIN: dict[str, Any] = {
    "model": "resnet18", "crop.size": 32, "crop.small_size": 16, "batch_size": 16, "moco.K": 256,
    "max_steps": 2, "num_workers": 0, "log_every": 1, "ckpt_every": 50,
    "optim.tuned_batch": 16,  # the scale model's own global batch (16 x one process): the check stays on
}  # fmt: skip
CROP_SCALE = 32 / 224  # variants' own crop sizes (multi-crop 160 px) shrink by the same factor
CROP_KEYS = ("crop.size", "crop.small_size")
RESOURCES = {"threads": 1, "mem_mb": 3000, "runtime": 30, "gpu": 0}
MONITOR = {"n_train": 64, "n_val": 32, "n_pairs": 16}  # the online monitors on the stand-in target, small
SHARDS = {"max_per_shard": 40, "min_shards": 2, "workers": 1}
FIG1 = {"n_pairs": 20000}  # Figure 1's crop-pair sample (10^6 in the paper study)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def rewrite_overrides(overrides: Sequence[str], values: Mapping[str, Any]) -> list[str]:
    """``overrides`` with every ``key=`` of ``values`` replaced in place (appended when absent).

    Hydra rejects a key given twice, so a value is replaced where it stands rather than appended.
    """
    out, done = [], set()
    for o in overrides:
        k = _key(o)
        if k in values:
            if k not in done:
                out.append(f"{k}={values[k]}")
                done.add(k)
        else:
            out.append(o)
    return out + [f"{k}={v}" for k, v in values.items() if k not in done]


def scaled_crop(size: int) -> int:
    """A paper crop size at the scale model's resolution: a multiple of 8, at least 16 px."""
    return max(16, 8 * round(size * CROP_SCALE / 8))


def _scale_variant(overrides: Sequence[str], batch_factor: float) -> list[str]:
    """A variant's own crop sizes and batch sizes (e.g. end-to-end's batch sweep) at the scale model's size."""
    scaled = {}
    for o in overrides:
        k, value = _key(o), o.split("=", 1)[-1]
        if k in CROP_KEYS and re.fullmatch(r"\d+", value):
            scaled[k] = scaled_crop(int(value))
        elif k == "batch_size" and re.fullmatch(r"\d+", value):
            scaled[k] = max(2, round(int(value) * batch_factor))
    return rewrite_overrides(overrides, scaled) if scaled else list(overrides)


def _map_tree(obj: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(obj, dict):
        return {k: _map_tree(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tree(v, fn) for v in obj]
    return fn(obj) if isinstance(obj, str) else obj


def derive(paper: Mapping[str, Any], results: str | Path) -> dict[str, Any]:
    """The scale model of ``paper`` writing under ``results``: same experiments, variants and targets."""
    cfg = copy.deepcopy(dict(paper))
    results = str(results)
    syn = f"{results}/synthetic"
    old_results = str(paper.get("results", "results"))
    # Paths under the paper's results root (e.g. transfer.cache) move with it.
    cfg = _map_tree(cfg, lambda s: results + s[len(old_results):] if s.startswith(old_results + "/") else s)
    cfg["results"] = results
    cfg["synthetic"] = {"out": syn, "spec": copy.deepcopy(WORLD_SPEC)}
    for name, ds in cfg["datasets"].items():
        if ds["format"] not in DATASET_STAND_INS:
            raise ValueError(f"datasets.{name}: format {ds['format']!r} has no synthetic stand-in; add it to "
                             "analysis.scale_model.DATASET_STAND_INS")  # fmt: skip
        ds.update(root=f"{syn}/{DATASET_STAND_INS[ds['format']]}", synthetic=True)
        rule = ds["subset"]["rule"]
        ds["subset"].update(SUBSET_SIZES[rule])
    for name, t in (cfg.get("targets") or {}).items():
        if t["format"] not in TARGET_STAND_INS:
            raise ValueError(f"targets.{name}: format {t['format']!r} has no synthetic stand-in; add it to "
                             "analysis.scale_model.TARGET_STAND_INS")  # fmt: skip
        fmt, folder = TARGET_STAND_INS[t["format"]]
        t.update(format=fmt, root=f"{syn}/{folder}", synthetic=True, **PROTOCOL_SIZES.get(t["protocol"], {}))
        t.update(RECIPE_SIZES.get(t.get("recipe", ""), {}))
        for key in ("splits", "year", "sbd_root", "class_map"):  # each synthetic set: its format's default splits
            t.pop(key, None)
        if fmt in STAND_IN_SPLITS:
            t["splits"] = dict(STAND_IN_SPLITS[fmt])
        t.update({key: f"{syn}/{rel}" for key, rel in STAND_IN_FILES.get(fmt, {}).items()})
    cfg["shards"].update(SHARDS)
    pre = cfg["pretrain"]
    paper_batch = next((int(o.split("=", 1)[1]) for o in pre["overrides"] if _key(o) == "batch_size"), None)
    batch_factor = PRETRAIN["batch_size"] / paper_batch if paper_batch else 1.0
    pre["overrides"] = rewrite_overrides(pre["overrides"], PRETRAIN)
    pre["resources"] = dict(RESOURCES)
    pre.pop("launcher", None)
    if pre.get("monitor"):
        pre["monitor"] = {**pre["monitor"], **MONITOR}
    cfg["variants"] = {v: _scale_variant(o, batch_factor) for v, o in cfg["variants"].items()}
    cfg.setdefault("transfer", {})["resources"] = dict(RESOURCES)
    cfg["transfer"]["finetune_resources"] = dict(RESOURCES)
    cfg["transfer"]["sgd_resources"] = dict(RESOURCES)
    report = cfg.setdefault("report", {})
    report["fig1"] = {**(report.get("fig1") or {}), **FIG1}
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write the scale model of the paper study config.")
    ap.add_argument("--paper", default=str(PAPER_CONFIG), help="the paper-scale config (default: %(default)s)")
    ap.add_argument("--results", required=True, help="results root of the scale model")
    ap.add_argument("--out", required=True, help="where to write the derived config (YAML)")
    args = ap.parse_args(argv)
    cfg = derive(yaml.safe_load(Path(args.paper).read_text()), args.results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tmp.replace(out)
    print(f"wrote {out}: snakemake --cores 2 --configfile {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
