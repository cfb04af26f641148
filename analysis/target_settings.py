"""Every key a transfer or fine-tuning target may carry: its default, its type and range, the formats it
applies to. One table serves the plan (the Snakefile checks every target before any job runs) and the CLIs
(``analysis.transfer`` / ``analysis.finetune`` resolve a target's settings through it), so a target the
workflow accepts is exactly a target the protocols run, and a misspelt key or a value out of range stops
with one line per problem instead of silently changing a number:

    config key targets.syn_cls_knn.imagesize: unknown key for protocol 'knn'; did you mean 'image_size'?
    config key targets.syn_cls_knn.image_size: required for protocol 'knn' (the pixel size the network sees
        depends on the data: the paper's protocol uses 224 on ImageNet-size images)

The input size of every protocol has no default: it depends on the images, and a wrong one still gives a
number (the embedded 32 px classification target scored kNN 0.155 at 224 px instead of 0.205 at 32 px).
Every other default is the paper's protocol (REFERENCE.md, "Transfer protocols"), and the result JSON of a
target records every value it used and which of them came from these defaults.

Torch-free on purpose: the Snakefile imports it at DAG build.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# -------------------------------------------------------------------------------------------- constants

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_WD_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
# The paper's 7 classes (bus, airplane, car, person, cat, cow, bottle): exactly the VOC classes MaskContrast's
# retrieval config does not ignore (segmentation/configs/retrieval/retrieval_VOCSegmentation_unsupervised_saliency
# .yml, `ignore_classes`: the other 13). Override with `subset_classes`.
DEFAULT_SUBSET_CLASSES = ("aeroplane", "bottle", "bus", "car", "cat", "cow", "person")
RECIPES = ("lbfgs", "moco_sgd")
# main_lincls.py's defaults; each is a target key of a `recipe: moco_sgd` target (batch_size also sizes the
# feature extractor's batches, which this recipe does not use otherwise).
MOCO_SGD_DEFAULTS: dict[str, Any] = {
    "epochs": 100, "lr": 30.0, "momentum": 0.9, "weight_decay": 0.0, "milestones": [60, 80], "lr_gamma": 0.1,
    "batch_size": 256, "init_std": 0.01, "seed": 0,
}  # fmt: skip
# Keys of the L-BFGS recipe that a moco_sgd target does not read (dropped from its settings).
LBFGS_KEYS = ("wd_grid", "val_fraction", "max_iter")

CLASSIFICATION_FORMATS = ("imagefolder", "voc07", "cifar10", "food101", "pets", "cars", "places365", "sun397")
TORCHVISION_FORMATS = ("cifar10", "food101", "pets", "cars", "places365", "sun397")
SINGLE_LABEL_FORMATS = tuple(f for f in CLASSIFICATION_FORMATS if f != "voc07")
FORMATS = (*CLASSIFICATION_FORMATS, "voc_seg", "davis", "voc_det", "cityscapes", "nyud_depth", "nyud_seg")

# Which formats each protocol reads (the readers' split types: analysis.targets / analysis.dense_targets).
PROTOCOL_FORMATS: dict[str, tuple[str, ...]] = {
    "linear": CLASSIFICATION_FORMATS,
    "knn": SINGLE_LABEL_FORMATS,  # kNN top-1 needs one label per image
    "voc07_svm": ("voc07",),  # one SVM per class of a multi-label target
    "cam": CLASSIFICATION_FORMATS,
    "segment_retrieval": ("voc_seg",),
    "video_propagation": ("davis",),
    "finetune_seg": ("voc_seg", "cityscapes", "nyud_seg"),
    "finetune_det": ("voc_det",),
    "finetune_depth": ("nyud_depth",),
}
FROZEN_PROTOCOLS = ("linear", "knn", "voc07_svm", "segment_retrieval", "video_propagation", "cam")
FINETUNE_PROTOCOLS = ("finetune_seg", "finetune_det", "finetune_depth")

# The keys that say at what pixel size the network sees the target's images: no default (see the module
# docstring); the value the paper's protocol uses is quoted in the error.
REQUIRED_SIZE_KEYS: dict[str, dict[str, str]] = {
    **{p: {"image_size": "224 on ImageNet-size images (Resize 256 -> CenterCrop 224)"}
       for p in ("linear", "knn", "voc07_svm", "cam")},
    "segment_retrieval": {"image_size": "448 on VOC (MaskContrast's retrieval)"},
    "video_propagation": {"short_side": "480 on DAVIS-2017 480p (videowalk)"},
    "finetune_seg": {"crop_size": "512 on VOC, 768 on Cityscapes"},
    "finetune_det": {"min_size_train": "[480, 512, ..., 800] on VOC (MoCo's detectron2 config)",
                     "min_size_test": "800 on VOC", "max_size": "1333 on VOC"},
    "finetune_depth": {"resize": "0.5 on NYUD-v2 (Laina et al.)", "crop_size": "[228, 304] on NYUD-v2"},
}  # fmt: skip

# ------------------------------------------------------------------------------------------ defaults

# Keys every target may carry whatever its protocol: where the data is and how its splits are named.
FORMAT_KEYS = (
    "format",
    "root",
    "splits",
    "classes",
    "resolution",
    "split_seed",
    "test_fraction",
    "protocol",
    "arch",
    "year",  # voc_seg / voc_det: VOC<year>/ under root (analysis.dense_targets)
    "sbd_root",  # voc_seg train_aug built from SBD
    "class_map",  # nyud_seg: classMapping40.mat (894 NYUD labels -> 40 classes; analysis.dense_targets)
    "synthetic",
)
# Format keys that only some formats read (any other format refuses them).
FORMAT_ONLY: dict[str, tuple[str, ...]] = {
    "classes": ("voc07",),
    "resolution": ("davis",),
    "split_seed": TORCHVISION_FORMATS,
    "test_fraction": TORCHVISION_FORMATS,
    "year": ("voc_seg", "voc_det"),
    "sbd_root": ("voc_seg",),
    "class_map": ("nyud_seg",),
}
# Format keys a format cannot do without (no default: the file is the user's, and nothing is downloaded).
FORMAT_REQUIRED: dict[str, dict[str, str]] = {
    "nyud_seg": {"class_map": "the path of Gupta et al.'s classMapping40.mat (mapClass: 894 NYUD labels -> 40 "
                              "classes), e.g. /datasets/nyud/classMapping40.mat"},
}

TRANSFER_COMMON: dict[str, Any] = {
    "resize_ratio": 256 / 224,  # ~1.14; exactly Resize 256 -> CenterCrop 224 at s = 224 (REFERENCE.md)
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "batch_size": 64,
    "num_workers": 0,
    "arch": None,  # expected backbone arch; a checkpoint of another arch is an error
    # re-estimate BN statistics on the train split before extracting pooled features (linear, knn, voc07_svm);
    # off in the paper's protocol, see analysis.features.recalibrate_bn
    "bn_recalibrate": False,
}
_LINEAR = {"wd_grid": list(DEFAULT_WD_GRID), "val_fraction": 0.2, "max_iter": 300, "seed": 0}
TRANSFER_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {**_LINEAR, "recipe": "lbfgs"},  # or "moco_sgd": analysis.linear_sgd (its keys replace L-BFGS's)
    "knn": {"k": 20, "temperature": 0.07},
    "voc07_svm": {"C": 0.5, "pos_weight": 2.0, "max_iter": 2000, "ap": "voc"},
    "segment_retrieval": {
        "layer": "layer4", "stride": 16, "n_segments": 15, "kmeans_iters": 30, "seed": 0,
        "subset_classes": list(DEFAULT_SUBSET_CLASSES), "store_dtype": "float16",
        # K-means segments cover the whole image, so background votes like a class ("keep"); "drop" applies
        # MaskContrast's bank vote literally (its saliency segments never carry background)
        "background": "keep",
    },
    "video_propagation": {
        "layer": "layer3", "stride": 8, "topk": 10, "context": 20, "radius": 12,
        "temperature": 0.05, "bound_th": 0.008, "exclude_last": True, "chunk": 512, "store_dtype": "float16",
        # davis2017-evaluation reads GT 255 (void) as background (davis.py _get_all_elements sets 255 to 0), so
        # its void mask is empty; "exclude" leaves void pixels out of J and F instead (a deviation, opt-in)
        "void": "background",
    },
    # CAMs: one test image per class for the first `n_images` classes (or the listed `images`), every feature
    # at `cam_size` ("auto": the smallest size >= image_size whose layer4 map is >= cam_min_map on a side, 224
    # on a stride-32 ResNet as in the paper; an int; null: image_size); see analysis.transfer._run_cam
    "cam": {**_LINEAR, "images": None, "n_images": 10, "cam_size": "auto", "cam_min_map": 7, "cam_class": "predicted",
            "cam_out": None},
}  # fmt: skip

FINETUNE_COMMON: dict[str, Any] = {
    "steps": None,  # iterations; null: derived from `epochs` (ceil(epochs x train images / batch_size))
    "epochs": None,
    "batch_size": 16,  # global batch, split over the DDP processes
    "optimizer": "sgd",  # or "adam"
    "lr": 0.02,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "schedule": "step",  # "step" (x gamma at each milestone), "poly" ((1 - t/T)^poly_power) or "constant"
    "milestones": [],
    "gamma": 0.1,
    "poly_power": 0.9,
    "warmup_steps": 0,  # linear warm-up from lr / 1000 (detectron2's WARMUP_FACTOR)
    "seed": 0,
    "save_every": 200,
    "num_workers": 0,
    "precision": "auto",  # "auto": bf16 autocast on CUDA, fp32 on CPU; "fp32" / "bf16" force one
    "sync_bn": True,  # BN -> SyncBN with several processes (the recipes' "BN tuned, synchronised")
    "arch": None,
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
}
# Paper-scale recipes per protocol (REFERENCE.md "Transfer protocols"; MoCo's detectron2 VOC config); the
# embedded study overrides sizes and schedules in config.yaml's targets.
FINETUNE_DEFAULTS: dict[str, dict[str, Any]] = {
    # VOC train_aug: 512 crops (crop_size), SGD lr 0.003, 45 epochs (Cityscapes: crop_size 768, optimizer adam,
    # lr 1e-4, 150 epochs, head_dilation 1); poly 0.9 decay
    "finetune_seg": {"epochs": 45, "batch_size": 8, "lr": 0.003, "weight_decay": 1e-4, "schedule": "poly",
                     "scale_range": [0.5, 2.0], "head_channels": 256, "head_dilation": 6, "dilate": True},
    # pascal_voc_R_50_C4_24k: 16 images, lr 0.02, 24k iterations, steps 18k / 22k, warm-up 100; train scales
    # 480-800 (step 32), test 800, max 1333 (min_size_train / min_size_test / max_size, set per target); VOC07
    # 11-point AP50 on test2007 (detectron2 for the 2007 set)
    "finetune_det": {"steps": 24000, "batch_size": 16, "lr": 0.02, "schedule": "step", "milestones": [18000, 22000],
                     "warmup_steps": 100, "anchor_sizes": [32, 64, 128, 256, 512], "detections_per_img": 100,
                     "score_thresh": 0.05, "use_07_metric": True,
                     # detectron2's RPN / RoI sampling (MoCo's Base-RCNN-C4-BN: 6000 / 1000 proposals at test)
                     "rpn_pre_nms_train": 12000, "rpn_post_nms_train": 2000, "rpn_pre_nms_test": 6000,
                     "rpn_post_nms_test": 1000, "rpn_batch_per_image": 256, "roi_batch_per_image": 512},
    # NYUD-v2 (Laina et al.): images at half size (resize 0.5), 228 x 304 crops (crop_size), berHu loss, SGD
    # lr 0.01, 20 epochs
    "finetune_depth": {"epochs": 20, "batch_size": 16, "lr": 0.01, "schedule": "poly", "decoder_channels": None,
                       "n_up": 4},
}  # fmt: skip

# ----------------------------------------------------------------------------------- types and ranges

Check = Callable[[Any], "str | None"]  # the problem with a value, or None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(lo: int | None = None, hi: int | None = None, null: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        if not _is_int(v):
            return f"must be an integer{' or null' * null}, got {v!r}"
        if lo is not None and v < lo or hi is not None and v > hi:
            return f"must be {_range(lo, hi)}, got {v}"
        return None

    return check


def _num(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False,
         null: bool = False) -> Check:  # fmt: skip
    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        if not _is_num(v):
            return f"must be a finite number{' or null' * null}, got {v!r}"
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            return f"must be {_range(lo, hi, lo_open, hi_open)}, got {v}"
        return None

    return check


def _range(lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"{'<' if hi_open else '<='} {hi}"


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _choice(*values: Any, null: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and null or (v in values and type(v) is type(values[0])):
            return None
        return f"must be one of {list(values)}{' or null' * null}, got {v!r}"

    return check


def _str(null: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and null or isinstance(v, str) and v:
            return None
        return f"must be a non-empty string{' or null' * null}, got {v!r}"

    return check


def _list(item: Check, min_len: int = 1, length: int | None = None, null: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and null:
            return None
        if not isinstance(v, (list, tuple)):
            return f"must be a list{' or null' * null}, got {v!r}"
        if length is not None and len(v) != length:
            return f"must be a list of {length} values, got {len(v)}"
        if len(v) < min_len:
            return f"must list at least {min_len} value(s)"
        for i, x in enumerate(v):
            problem = item(x)
            if problem:
                return f"item [{i}] {problem}"
        return None

    return check


def _any(*checks: Check, what: str) -> Check:
    def check(v: Any) -> str | None:
        return None if any(c(v) is None for c in checks) else f"must be {what}, got {v!r}"

    return check


def _size(null: bool = False) -> Check:
    return _any(_int(1), _list(_int(1), length=2), *([_choice(None, null=True)] if null else []),
                what="a positive integer or [height, width]" + " or null" * null)  # fmt: skip


def _splits(v: Any) -> str | None:
    if not isinstance(v, Mapping) or not v:
        return f"must map roles (train, test) to split names, got {v!r}"
    bad = [k for k in v if k not in ("train", "test")]
    if bad:
        return f"has role(s) {bad}; the roles are train and test"
    for k, name in v.items():
        if not (isinstance(name, str) and name) and not isinstance(name, bool):
            return f"split name of {k!r} must be a non-empty string, got {name!r}"
    return None


def _scale_range(v: Any) -> str | None:
    problem = _list(_num(0, lo_open=True), length=2)(v)
    if problem is None and v[0] > v[1]:
        return f"must be [low, high] with low <= high, got {list(v)}"
    return problem


_POS = _num(0, lo_open=True)
_RGB = _list(_num(), length=3)
_LAYER = _choice("layer1", "layer2", "layer3", "layer4")
_DTYPE = _choice("float32", "float16", "bfloat16")
KEY_CHECKS: dict[str, Check] = {
    # where the data is
    "protocol": _choice(*PROTOCOL_FORMATS), "format": _choice(*FORMATS), "root": _str(), "splits": _splits,
    "classes": _list(_str(), null=True), "resolution": _str(), "split_seed": _int(0),
    "test_fraction": _num(0, 1, lo_open=True, hi_open=True), "year": _choice(2007, 2012), "sbd_root": _str(null=True),
    "class_map": _str(),
    "synthetic": _bool, "arch": _str(null=True),
    # frozen features
    "image_size": _int(1), "resize_ratio": _num(1.0), "mean": _RGB, "std": _list(_POS, length=3),
    "batch_size": _int(1), "num_workers": _int(0), "bn_recalibrate": _bool,
    "wd_grid": _list(_num(0)), "val_fraction": _num(0, 1, lo_open=True, hi_open=True), "max_iter": _int(1),
    "seed": _int(0), "recipe": _choice(*RECIPES),
    "k": _int(1), "temperature": _POS, "C": _POS, "pos_weight": _POS, "ap": _choice("voc", "sklearn"),
    "layer": _LAYER, "stride": _int(1, null=True), "n_segments": _int(1), "kmeans_iters": _int(1),
    "subset_classes": _list(_str()), "store_dtype": _DTYPE, "background": _choice("keep", "drop"),
    "short_side": _int(1), "topk": _int(1), "context": _int(0), "radius": _POS, "bound_th": _POS,
    "exclude_last": _bool, "chunk": _int(1), "void": _choice("background", "exclude"),
    "images": _list(_any(_int(0), _str(), what="an image index or file name"), null=True),
    "n_images": _int(1), "cam_size": _any(_int(1), _choice("auto", null=True), what="'auto', a positive integer or null"),
    "cam_min_map": _int(1), "cam_class": _choice("predicted", "label"), "cam_out": _str(null=True),
    # MoCo's SGD linear recipe
    "lr_gamma": _POS, "init_std": _POS,
    # fine-tuning
    "steps": _int(1, null=True), "epochs": _num(0, lo_open=True, null=True), "optimizer": _choice("sgd", "adam"),
    "lr": _POS, "momentum": _num(0, 1, hi_open=True), "weight_decay": _num(0),
    "schedule": _choice("step", "poly", "constant"), "milestones": _list(_int(0), min_len=0), "gamma": _POS,
    "poly_power": _POS, "warmup_steps": _int(0), "save_every": _int(1), "precision": _choice("auto", "fp32", "bf16"),
    "sync_bn": _bool, "crop_size": _size(), "scale_range": _scale_range, "head_channels": _int(1),
    "head_dilation": _int(1), "dilate": _bool, "min_size_train": _list(_int(1)), "min_size_test": _int(1),
    "max_size": _int(1), "anchor_sizes": _list(_int(1)), "detections_per_img": _int(1),
    "score_thresh": _num(0, 1), "use_07_metric": _bool, "rpn_pre_nms_train": _int(1), "rpn_post_nms_train": _int(1),
    "rpn_pre_nms_test": _int(1), "rpn_post_nms_test": _int(1), "rpn_batch_per_image": _int(1),
    "roi_batch_per_image": _int(1), "resize": _POS, "decoder_channels": _int(1, null=True), "n_up": _int(1),
}  # fmt: skip
# Where a key means something else under one protocol (moco_sgd's epochs are whole epochs; depth's crop may
# be null = the whole image).
PROTOCOL_CHECKS: dict[str, dict[str, Check]] = {
    "linear": {"epochs": _int(1), "milestones": _list(_int(0), min_len=0)},
    "finetune_depth": {"crop_size": _size(null=True)},
}

# Frozen-feature targets of one checkpoint run in one job and write this manifest beside their results
# (rules/transfer.smk, rule transfer); the targets that train run alone on GPUs (see ``runs_alone``).
MANIFEST = "frozen-targets.json"


def trains(cfg: Mapping[str, Any]) -> bool:
    """Whether a target trains for long with a resumable state: fine-tuning, and MoCo's SGD linear recipe (100
    augmented epochs through the backbone). Where it runs is ``runs_alone``'s decision."""
    proto = cfg.get("protocol")
    return proto in FINETUNE_PROTOCOLS or (proto == "linear" and cfg.get("recipe") == "moco_sgd")


def job_resources(config: Mapping[str, Any], cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """The resources section a training target's own job would take: ``transfer.finetune_resources`` for
    fine-tuning, ``transfer.sgd_resources`` for the SGD linear recipe (each falling back as the rules do:
    sgd -> finetune -> ``transfer.resources``); a frozen-feature target takes ``transfer.resources``."""
    tr = config.get("transfer") or {}
    base = tr.get("resources") or {}
    if not trains(cfg):
        return base
    ft = tr.get("finetune_resources", base)
    return ft if cfg.get("protocol") in FINETUNE_PROTOCOLS else tr.get("sgd_resources", ft)


def _holds_gpu(res: Mapping[str, Any]) -> bool:
    """``gpu: auto`` resolves to at least one GPU (analysis.job_cost.choose_gpus), a number to itself."""
    g = res.get("gpu", 0)
    return g == "auto" or int(g or 0) > 0


def runs_alone(cfg: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """Whether target ``cfg`` gets a job of its own under study config ``config``: THE switch between the rules
    `finetune` / `linear_sgd` (one job per checkpoint x target) and the checkpoint's batched `transfer` job.

    Frozen-feature targets never run alone. A training target (``trains``) runs alone when its job would hold
    a GPU (its resources' ``gpu`` is ``auto`` or > 0: paper.yaml), or when the checkpoint's transfer job holds
    one: it trains for hours there, may ask for several GPUs, and a batched job must not redo the cheap targets
    of its checkpoint because one of these timed out. On a CPU-only config (``gpu: 0`` for both, config.yaml and
    the scale model) it runs inside the transfer job instead, after the frozen targets, with the same state
    directory, seed, thread count and result file as its own job would have: the ~5 s of Python + torch
    start-up per job is then paid once per checkpoint (rules/transfer.smk; analysis.transfer's
    ``--training-json``).
    """
    if not trains(cfg):
        return False
    return _holds_gpu(job_resources(config, cfg)) or _holds_gpu((config.get("transfer") or {}).get("resources") or {})


# ------------------------------------------------------------------------------------------ resolution


class TargetError(ValueError):
    """A target dataset is misconfigured, malformed or empty (``analysis.targets`` raises its subclasses)."""


class TargetSpecError(TargetError):
    """A target's config entry names unknown keys, lacks a required one, or has a value out of range.

    The message has one line per problem, each naming ``targets.<name>.<key>`` and the fix.
    """


def protocol_defaults(protocol: str, recipe: str | None = None) -> dict[str, Any]:
    """Every setting key of ``protocol`` (and linear ``recipe``) with its default; size keys map to None."""
    if protocol in TRANSFER_DEFAULTS:
        out = {**TRANSFER_COMMON, **TRANSFER_DEFAULTS[protocol]}
        if protocol == "linear" and (recipe or out["recipe"]) == "moco_sgd":
            out = {k: v for k, v in out.items() if k not in LBFGS_KEYS}
            out.update(MOCO_SGD_DEFAULTS)
    elif protocol in FINETUNE_DEFAULTS:
        out = {**FINETUNE_COMMON, **FINETUNE_DEFAULTS[protocol]}
    else:
        raise KeyError(protocol)
    return {**out, **dict.fromkeys(REQUIRED_SIZE_KEYS[protocol])}


def _owners(key: str) -> list[str]:
    """The protocols whose settings include ``key`` (for "read by protocol X" hints)."""
    out = []
    for p in PROTOCOL_FORMATS:
        recipes: Sequence[str | None] = RECIPES if p == "linear" else (None,)
        if any(key in protocol_defaults(p, r) for r in recipes):
            out.append(p)
    return out


def target_problems(name: str, cfg: Any) -> list[str]:
    """One line per problem of target ``name``'s config entry ``cfg``; empty when it is valid."""
    where = f"config key targets.{name}"
    if not isinstance(cfg, Mapping):
        return [f"{where}: must be a mapping of settings, got {cfg!r}"]
    proto, fmt = cfg.get("protocol"), cfg.get("format")
    if proto not in PROTOCOL_FORMATS:
        return [f"{where}.protocol: {proto!r} is not one of {list(PROTOCOL_FORMATS)}"]
    out = []
    if "format" not in cfg or "root" not in cfg:
        missing = [k for k in ("format", "root") if k not in cfg]
        out.append(f"{where}: {', '.join(missing)} {'are' if len(missing) > 1 else 'is'} required")
    elif fmt not in PROTOCOL_FORMATS[proto]:
        out.append(f"{where}.format: protocol {proto!r} reads formats {list(PROTOCOL_FORMATS[proto])}, got {fmt!r}")
    recipe = cfg.get("recipe") if proto == "linear" else None
    settings = protocol_defaults(proto, recipe if recipe in RECIPES else None)
    allowed = [*settings, *FORMAT_KEYS]
    for key, value in cfg.items():
        if key not in allowed:
            owners = _owners(str(key))
            close = difflib.get_close_matches(str(key), allowed, n=1)
            if owners:
                hint = f"it is read by protocol(s) {', '.join(owners)}"
                if key in MOCO_SGD_DEFAULTS and proto == "linear":
                    hint = "it is read by `recipe: moco_sgd`"
            elif close:
                hint = f"did you mean {close[0]!r}?"
            else:
                hint = f"allowed: {', '.join(sorted(allowed))}"
            out.append(f"{where}.{key}: unknown key for protocol {proto!r}; {hint}")
            continue
        if key in FORMAT_ONLY and fmt in FORMATS and fmt not in FORMAT_ONLY[key]:
            out.append(f"{where}.{key}: read only by format(s) {', '.join(FORMAT_ONLY[key])}, not {fmt!r}; remove it")
            continue
        check = PROTOCOL_CHECKS.get(proto, {}).get(key) or KEY_CHECKS.get(key)
        problem = check(value) if check is not None else None
        if problem:
            out.append(f"{where}.{key}: {problem}")
    for key, what in FORMAT_REQUIRED.get(fmt, {}).items() if fmt in PROTOCOL_FORMATS[proto] else ():
        if key not in cfg:
            out.append(f"{where}.{key}: required for format {fmt!r}: {what}")
    for key, paper in REQUIRED_SIZE_KEYS[proto].items():
        if key not in cfg:
            out.append(f"{where}.{key}: required for protocol {proto!r}: the input size depends on the data "
                       f"(the paper's protocol: {paper})")  # fmt: skip
    if proto in FINETUNE_PROTOCOLS:
        steps = cfg.get("steps", settings["steps"])
        epochs = cfg.get("epochs", settings["epochs"])
        if steps is None and epochs is None:
            out.append(f"{where}: set `steps` or `epochs` (both are null)")
    return out


def check_targets(targets: Mapping[str, Any]) -> None:
    """Raise TargetSpecError listing every problem of every target (the plan calls this before any job)."""
    problems = [line for name, cfg in targets.items() for line in target_problems(name, cfg)]
    if problems:
        n = len(problems)
        raise TargetSpecError("\n".join([f"the study config's targets have {n} problem{'s' * (n > 1)}:", *problems]))


def resolve(name: str, cfg: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(settings, defaulted): the protocol's defaults overridden by ``cfg``'s setting keys (plus ``arch``), and
    the keys whose value came from the defaults. Raises TargetSpecError with every problem of ``cfg``."""
    problems = target_problems(name, cfg)
    if problems:
        raise TargetSpecError("\n".join(problems) if len(problems) == 1 else
                              "\n".join([f"target {name!r} has {len(problems)} problems:", *problems]))  # fmt: skip
    proto = cfg["protocol"]
    settings = protocol_defaults(proto, cfg.get("recipe") if proto == "linear" else None)
    defaulted = sorted(k for k in settings if k not in cfg)
    settings.update({k: v for k, v in cfg.items() if k in settings})
    return settings, defaulted
