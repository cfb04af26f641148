"""Evaluate one checkpoint on its transfer targets and write one metric JSON per target.

    python -m analysis.transfer --checkpoint results/pretrain/D/V/checkpoint.pt \
        --targets-json '{"T1": {"protocol": "linear", "format": "imagefolder", "root": "..."}, "T2": {...}}' \
        --cache-dir results/features --out-dir results/transfer/D/V [--log FILE] [--device cpu]
    python -m analysis.transfer --checkpoint ... --name T --target-json '{...}' --out results/transfer/D/V/T.json

A Snakemake job evaluates every target of one checkpoint in one process (the first form), so the Python /
torch start-up, which dominates small evaluations, is paid once per checkpoint rather than once per target.
Each target's JSON is written atomically as soon as it is done; a target that fails does not stop the others,
and the command then exits non-zero naming every failed target.

On a CPU-only config the first form also runs the checkpoint's training targets (fine-tuning through
``analysis.finetune.finetune``, ``recipe: moco_sgd`` through ``analysis.linear_sgd``; the switch is
``analysis.target_settings.runs_alone``), after the frozen ones. ``--training-json`` gives each its state
directory and thread count, those its own job (rules finetune / linear_sgd) would have used, so its result is
the one that job writes (plus ``batched``: the job it ran in and the key of its inputs) and a killed batch
resumes it from its state. A training target whose result file already holds the same key (same checkpoint
digest, target and config entry) is not run again; frozen targets are always re-evaluated (their features are
cached). SIGTERM / SIGUSR1 then stop the job at the next step of a training target, or once the current frozen
target is done, with the state saved and exit status ``RETRY_EXIT`` (75).

The target JSON is one entry of the config's ``targets:``; ``analysis.target_settings`` lists its keys, their
defaults, types and ranges. A target with an unknown key, no input size or a value out of range is refused
with one line per problem (the workflow checks the same at plan time); every resolved setting is echoed into
the output, with the keys that came from the protocol's defaults, so a result file says how it was made.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from study.exitcodes import RETRY_EXIT


def build_parser() -> argparse.ArgumentParser:
    """The command line, defined above the torch imports: ``--help`` and usage errors cost no torch."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--targets-json", help="every target of this checkpoint: {name: target config entry}")
    ap.add_argument("--out-dir", type=Path, help="with --targets-json: writes <out-dir>/<name>.json per target")
    ap.add_argument("--manifest", type=Path, default=None,
                    help="with --targets-json: once every target succeeded, a JSON listing each target's result "
                         "file, metric and value (the Snakemake rule's output)")  # fmt: skip
    ap.add_argument("--training-json", default=None,
                    help="with --targets-json: its training targets (fine-tuning, recipe: moco_sgd) as {name: "
                         "{\"state_dir\": DIR, \"threads\": N}}: run after the frozen ones, resumable from DIR, "
                         "with N torch threads")  # fmt: skip
    ap.add_argument("--target-json", help="one target's config entry as a JSON object (with --name, --out)")
    ap.add_argument("--name", help="target key (names the cache folder and the result)")
    ap.add_argument("--cache-dir", default="results/features", type=Path)
    ap.add_argument("--out", type=Path, help="with --target-json: the result JSON")
    ap.add_argument("--state-dir", type=Path, default=None,
                    help="with --target-json: resumable state of a `recipe: moco_sgd` target (<dir>/state.pt); "
                         f"SIGTERM / SIGUSR1 save it and exit {RETRY_EXIT}")  # fmt: skip
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda when available)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


if __name__ == "__main__":  # `python -m analysis.transfer`: answer --help / usage errors before torch loads
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from analysis import linear_sgd, metrics, protocols, target_settings  # noqa: E402
from analysis.features import CheckpointArchError, FeatureExtractor, FeatureSpec, read_checkpoint  # noqa: E402
from analysis.target_settings import FORMAT_KEYS  # noqa: E402, F401 (callers read it from here)
from analysis.targets import (  # noqa: E402
    ImageSplit,
    SegmentationSplit,
    TargetError,
    VideoSplit,
    frames_split,
    load_label_png,
    load_split,
)
from study.runstate import first_line  # noqa: E402

log = logging.getLogger("analysis.transfer")

# The target keys, their defaults, types and ranges live in analysis.target_settings (shared with the plan);
# these names stay for the callers that read them from here.
COMMON_DEFAULTS = target_settings.TRANSFER_COMMON
PROTOCOL_DEFAULTS = target_settings.TRANSFER_DEFAULTS
PRIMARY_METRIC = {
    "linear": None,  # top1 or mAP, by label type
    "knn": "top1",
    "voc07_svm": "mAP",
    "segment_retrieval": None,  # mIoU_<n classes>
    "video_propagation": "JF_mean",
    "cam": None,
}


def resolve_settings(cfg: Mapping[str, Any], name: str = "?") -> dict[str, Any]:
    """Defaults of the protocol, overridden by the target config; unknown keys, missing input sizes and values
    out of range raise ``TargetSpecError`` (one line each, see ``analysis.target_settings``)."""
    return _resolve(name, cfg)[0]


def _resolve(name: str, cfg: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    proto = cfg.get("protocol")
    if proto not in PROTOCOL_DEFAULTS:
        hint = "; fine-tuning targets run with analysis.finetune" if proto in target_settings.FINETUNE_PROTOCOLS else ""
        raise TargetError(f"target protocol {proto!r} is unknown; choose one of {sorted(PROTOCOL_DEFAULTS)}{hint}")
    return target_settings.resolve(name, cfg)


def _pooled_spec(s: Mapping[str, Any], calib: ImageSplit | None = None) -> FeatureSpec:
    return FeatureSpec(
        size=int(s["image_size"]), pooled=True, crop=True, resize_ratio=float(s["resize_ratio"]),
        mean=tuple(s["mean"]), std=tuple(s["std"]),
        bn_calib=calib.fingerprint if calib is not None and s.get("bn_recalibrate") else None,
    )  # fmt: skip


def _image_splits(name: str, cfg: Mapping[str, Any]) -> tuple[ImageSplit, ImageSplit]:
    train, test = load_split(name, cfg, "train"), load_split(name, cfg, "test")
    if not isinstance(train, ImageSplit) or not isinstance(test, ImageSplit):
        raise TargetError(
            f"target {name!r}: protocol {cfg['protocol']!r} needs an image classification format"
        )
    return train, test


def _labels(split: ImageSplit) -> torch.Tensor:
    return torch.as_tensor(split.labels)


class _LazyMasks(Sequence):
    def __init__(self, split: SegmentationSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i):  # type: ignore[override]
        return self.split.load_mask(i)


def _run_linear(ext: FeatureExtractor, name: str, cfg: Mapping[str, Any], s: dict, *,
                state_dir: Path | None = None, stop: Any = None) -> tuple[dict, int, int]:  # fmt: skip
    """``state_dir`` / ``stop`` (a ``study.runstate.StopSignals``): resume and signals of ``recipe: moco_sgd``,
    the only recipe long enough to need them (L-BFGS fits cached features in minutes)."""
    train, test = _image_splits(name, cfg)
    spec = _pooled_spec(s, train)
    if s["recipe"] == "moco_sgd":  # augmented views every epoch: the backbone runs per batch, nothing cached
        res = linear_sgd.run_moco_sgd(ext, train, test, s, spec, name=name, state_dir=state_dir, stop=stop)
        return res, len(train), len(test)
    xtr, xte = ext.get(train, spec, train)["features"].float(), ext.get(test, spec, train)["features"].float()
    res = protocols.linear_probe(
        xtr, _labels(train), xte, _labels(test), len(train.classes), multilabel=train.multilabel,
        wd_grid=s["wd_grid"], val_fraction=float(s["val_fraction"]), max_iter=int(s["max_iter"]),
        seed=int(s["seed"]), device=ext.device,
    )  # fmt: skip
    return res, len(train), len(test)


def _run_knn(ext: FeatureExtractor, name: str, cfg: Mapping[str, Any], s: dict) -> tuple[dict, int, int]:
    train, test = _image_splits(name, cfg)
    if train.multilabel:
        raise TargetError(
            f"target {name!r}: kNN top-1 needs single-label classes; use protocol 'linear' or 'voc07_svm'"
        )
    spec = _pooled_spec(s, train)
    xtr, xte = ext.get(train, spec, train)["features"].float(), ext.get(test, spec, train)["features"].float()
    res = protocols.knn_classify(
        xtr, _labels(train), xte, _labels(test), len(train.classes), k=int(s["k"]),
        temperature=float(s["temperature"]), device=ext.device,
    )  # fmt: skip
    return res, len(train), len(test)


def _run_svm(ext: FeatureExtractor, name: str, cfg: Mapping[str, Any], s: dict) -> tuple[dict, int, int]:
    train, test = _image_splits(name, cfg)
    if not train.multilabel:
        raise TargetError(f"target {name!r}: voc07_svm needs a multi-label target (format 'voc07')")
    spec = _pooled_spec(s, train)
    xtr, xte = ext.get(train, spec, train)["features"].float(), ext.get(test, spec, train)["features"].float()
    res = protocols.voc07_svm(
        xtr, train.labels, xte, test.labels, cost=float(s["C"]), pos_weight=float(s["pos_weight"]),
        max_iter=int(s["max_iter"]), ap=str(s["ap"]),
    )  # fmt: skip
    return res, len(train), len(test)


def _run_retrieval(
    ext: FeatureExtractor, name: str, cfg: Mapping[str, Any], s: dict
) -> tuple[dict, int, int]:
    train, test = load_split(name, cfg, "train"), load_split(name, cfg, "test")
    if not isinstance(train, SegmentationSplit) or not isinstance(test, SegmentationSplit):
        raise TargetError(f"target {name!r}: segment_retrieval needs format 'voc_seg'")
    spec = FeatureSpec(
        size=int(s["image_size"]), pooled=False, crop=False, layer=str(s["layer"]),
        stride=None if s["stride"] is None else int(s["stride"]), mean=tuple(s["mean"]), std=tuple(s["std"]),
        store_dtype=str(s["store_dtype"]),
    )  # fmt: skip
    ftr, fte = ext.get(train, spec), ext.get(test, spec)
    res = protocols.segment_retrieval(
        ftr["features"], _LazyMasks(train), fte["features"], _LazyMasks(test), classes=train.classes,
        subset_classes=s["subset_classes"], n_segments=int(s["n_segments"]), kmeans_iters=int(s["kmeans_iters"]),
        seed=int(s["seed"]), ignore_index=train.ignore_index, background=str(s["background"]),
    )  # fmt: skip
    res["settings"]["feature_stride"] = int(ftr["stride"])
    res["settings"]["feature_grid"] = list(ftr["features"].shape[-2:])
    return res, len(train), len(test)


def _run_davis(ext: FeatureExtractor, name: str, cfg: Mapping[str, Any], s: dict) -> tuple[dict, int, int]:
    split = load_split(name, cfg, "test")
    if not isinstance(split, VideoSplit):
        raise TargetError(f"target {name!r}: video_propagation needs format 'davis'")
    if s["void"] not in ("background", "exclude"):
        raise TargetError(f"target {name!r}: void={s['void']!r}; use 'background' (davis2017-evaluation) or 'exclude'")
    exclude_void = s["void"] == "exclude"
    per_video: dict[str, tuple[list[float], list[float]]] = {}
    n_frames, stride = 0, None
    binary, empty = [], []
    for video in split.videos:
        first = load_label_png(video.annotations[0], name)
        lut, n_obj, is_binary = protocols.davis_instances(first)
        if n_obj == 0:  # nothing to propagate: skip before extracting features, never a NaN in J&F
            log.warning("DAVIS %s: the first-frame annotation has no object; video skipped", video.name)
            empty.append(video.name)
            continue
        if is_binary:
            binary.append(video.name)
        h0, w0 = first.shape
        short = int(s["short_side"])
        size = (
            (short, max(1, round(w0 * short / h0))) if h0 <= w0 else (max(1, round(h0 * short / w0)), short)
        )
        spec = FeatureSpec(
            size=size, pooled=False, crop=False, layer=str(s["layer"]),
            stride=None if s["stride"] is None else int(s["stride"]), mean=tuple(s["mean"]), std=tuple(s["std"]),
            store_dtype=str(s["store_dtype"]),
        )  # fmt: skip
        blob = ext.get(frames_split(split, video), spec)
        stride = int(blob["stride"])
        # void pixels of frame 0 are one more label, propagated like the objects (videowalk's make_lbl_set
        # takes every colour of frame 0); predicted void is no object
        labels0 = np.where(lut[first] == 255, n_obj + 1, lut[first])
        pred = protocols.propagate_labels(
            blob["features"], labels0, int(labels0.max()) + 1, (h0, w0), topk=int(s["topk"]),
            context=int(s["context"]), radius=float(s["radius"]), temperature=float(s["temperature"]),
            chunk=int(s["chunk"]), device=ext.device,
        )  # fmt: skip
        gts = [None if a is None else lut[load_label_png(a, name)] for a in video.annotations]
        per_video[video.name] = protocols.davis_scores(
            list(pred), gts, range(1, n_obj + 1), bound_th=float(s["bound_th"]),
            exclude_last=bool(s["exclude_last"]), void_label=None if is_binary or not exclude_void else 255,
        )  # fmt: skip
        n_frames += len(video.frames)
        log.info(
            "DAVIS %s: J %.3f F %.3f",
            video.name,
            np.mean(per_video[video.name][0]),
            np.mean(per_video[video.name][1]),
        )
    keys = ("topk", "context", "radius", "temperature", "bound_th", "exclude_last", "short_side", "layer", "void")
    rules = {
        "context_rule": "videowalk: frame 0 (long memory) + previous `context` frames, video start padded with "
        "frame-0 copies",
        "radius_rule": "strictly < radius, on the recent frames only (frame 0 unrestricted)",
        "first_labels": "one-hot resized bilinearly to the feature grid",
        "void_rule": ("GT 255 excluded from J and F (deviation from the toolkit)" if exclude_void else
                      "GT 255 scored as background, as davis2017-evaluation loads it (davis.py: 255 -> 0)"),
        "binary_videos": binary, "videos_without_objects": empty,
    }  # fmt: skip
    res = protocols.summarise_davis(per_video, {**{k: s[k] for k in keys}, "feature_stride": stride, **rules})
    return res, 0, n_frames


def _select_images(split: ImageSplit, images: Sequence[Any] | None, n: int) -> list[int]:
    """The listed ``images`` (indices or file names), else one image per class (``one_image_per_class``)."""
    if not images:
        return protocols.one_image_per_class(split.ids, split.labels, n, len(split.classes))
    out = []
    for item in images:
        if isinstance(item, int):
            if not 0 <= item < len(split):
                raise TargetError(
                    f"target {split.target!r}: CAM image index {item} outside [0, {len(split)})"
                )
            out.append(item)
        else:
            hits = [i for i, p in enumerate(split.ids) if p == item or p.endswith("/" + str(item))]
            if not hits:
                raise TargetError(
                    f"target {split.target!r}: CAM image {item!r} is not in split {split.split!r}"
                )
            out.append(hits[0])
    return out


def _label_names(split: ImageSplit, idx: Sequence[int]) -> list[str]:
    """True label per image: the class name, or the '+'-joined names of a multi-label image's classes."""
    if split.multilabel:
        return ["+".join(split.classes[c] for c in np.flatnonzero(split.labels[i] > 0)) for i in idx]
    return [split.classes[int(split.labels[i])] for i in idx]


def _cam_size(ext: FeatureExtractor, s: Mapping[str, Any], name: str) -> int:
    """The CAM protocol's input size (see ``_run_cam``)."""
    cam_size, image_size = s["cam_size"], int(s["image_size"])
    if cam_size is None:
        return image_size
    if cam_size == "auto":
        stride = ext.network(FeatureSpec(pooled=False, layer="layer4"))[1]
        return max(image_size, int(s["cam_min_map"]) * stride)
    if isinstance(cam_size, bool) or not isinstance(cam_size, int) or cam_size < 1:
        raise TargetError(f"target {name!r}: cam_size must be 'auto', a positive int or null, got {cam_size!r}")
    return cam_size


def _run_cam(
    ext: FeatureExtractor, name: str, cfg: Mapping[str, Any], s: dict, out: Path | None
) -> tuple[dict, int, int]:
    """Class activation maps (Zhou et al. 2016) of a linear probe on frozen features, as in the paper's Fig. 6.

    Images: one test image per class (the first ``n_images`` classes) unless ``images`` lists them. Size: every
    feature of this protocol (the probe's train features, its test accuracy, the per-image predictions and the
    layer4 maps) is computed at ``cam_size``, Resize(cam_size * resize_ratio) -> CenterCrop(cam_size), which
    upsamples small images bilinearly. A CAM weights the layer4 maps with the probe's weights, so it is the
    probe's own logit map only when the probe was fitted on the average of maps computed the same way: a probe
    fitted at ``image_size`` would be applied to features of another scale. ``cam_size: auto`` picks the
    smallest size >= ``image_size`` that gives maps of at least ``cam_min_map`` (7, the paper's) on a side for
    the checkpoint's output stride: 224 for 64 px images on a standard ResNet (whose map would be 2 x 2), 64 on
    a small-input stem of stride 8 (8 x 8); an int is used as is, ``null`` means ``image_size``. The cost: both splits are extracted
    once per checkpoint at that size (cached). The npz holds the images as the network saw them, the maps, and
    per image the id, true label (``class_names``) and prediction (``pred_names``).
    """
    train, test = _image_splits(name, cfg)
    size = _cam_size(ext, s, name)
    pooled = _pooled_spec({**s, "image_size": size})
    xtr, xte = ext.get(train, pooled)["features"].float(), ext.get(test, pooled)["features"].float()
    probe = protocols.train_linear_probe(
        xtr, _labels(train), len(train.classes), multilabel=train.multilabel, wd_grid=s["wd_grid"],
        val_fraction=float(s["val_fraction"]), max_iter=int(s["max_iter"]), seed=int(s["seed"]), device=ext.device,
    )  # fmt: skip
    idx = _select_images(test, s["images"], int(s["n_images"]))
    sub = ImageSplit(
        test.target, f"{test.split}-cam", [test.ids[i] for i in idx], test.labels[idx], test.classes,
        lambda j: test.load(idx[j]), test.multilabel, source=test.source,
    )  # fmt: skip
    spatial = FeatureSpec(
        size=pooled.size, pooled=False, crop=True, resize_ratio=pooled.resize_ratio, layer="layer4",
        mean=pooled.mean, std=pooled.std,
    )  # fmt: skip
    maps = ext.get(sub, spatial)["features"].float()
    map_hw = [int(v) for v in maps.shape[-2:]]
    if min(map_hw) < int(s["cam_min_map"]):
        log.warning("target %s: CAMs are %dx%d at cam_size %d, smaller than cam_min_map %d (the paper's are 7x7); "
                    "use cam_size: auto", name, *map_hw, size, int(s["cam_min_map"]))  # fmt: skip
    with torch.no_grad():
        logits = probe.logits(maps.mean((2, 3))).cpu()  # = the pooled feature at the same spec
    pred = logits.argmax(1).tolist()
    if s["cam_class"] == "predicted" or train.multilabel:
        cls = pred
    elif s["cam_class"] == "label":
        cls = [int(v) for v in test.labels[idx]]
    else:
        raise TargetError(
            f"target {name!r}: cam_class must be 'predicted' or 'label', got {s['cam_class']!r}"
        )
    cams = protocols.class_activation_maps(maps, probe.effective_weight, cls)
    crop = spatial.transform().transforms[:2]
    pixels = np.stack([np.asarray(crop[1](crop[0](sub.load(j)))) for j in range(len(sub))])
    true_names, pred_names = _label_names(test, idx), [train.classes[c] for c in pred]
    cam_path = Path(s["cam_out"]) if s["cam_out"] else (out.with_suffix(".cam.npz") if out else None)
    if cam_path is not None:
        cam_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cam_path.with_name(cam_path.name + ".tmp.npz")
        np.savez_compressed(
            tmp, cams=cams.astype(np.float32), images=pixels.astype(np.uint8), class_idx=np.asarray(cls),
            ids=np.asarray(sub.ids), labels=np.asarray(test.labels[idx]), class_names=np.asarray(true_names),
            pred_idx=np.asarray(pred), pred_names=np.asarray(pred_names),
        )  # fmt: skip
        os.replace(tmp, cam_path)
    with torch.no_grad():
        test_logits = probe.logits(xte).cpu()
    if train.multilabel:
        value = {"mAP": metrics.mean_average_precision(test_logits.numpy(), test.labels)[0]}
    else:
        value = {"top1": metrics.top1_accuracy(test_logits, _labels(test))}
    res = {
        **value,
        "n_maps": len(idx),
        "settings": {"weight_decay": probe.weight_decay, "images": [sub.ids[j] for j in range(len(sub))],
                     "cam_size": size, "cam_map_shape": map_hw, "true_names": true_names,
                     "pred_names": pred_names, "cam_file": str(cam_path) if cam_path else None},
    }  # fmt: skip
    return res, len(train), len(test)


def run_target(
    checkpoint: str | Path,
    name: str,
    cfg: Mapping[str, Any],
    cache_dir: str | Path,
    *,
    device: str | None = None,
    out: Path | None = None,
    progress: bool = True,
    state_dir: Path | None = None,
    stop: Any = None,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on target ``name`` (config mapping ``cfg``); returns the result record.
    ``state_dir`` / ``stop``: see ``_run_linear`` (other protocols ignore them)."""
    t0 = time.time()
    s, defaulted = _resolve(name, cfg)
    ext = FeatureExtractor(
        checkpoint, cache_dir, expect_arch=s["arch"], target=name, device=device,
        batch_size=int(s["batch_size"]), num_workers=int(s["num_workers"]), progress=progress,
    )  # fmt: skip
    proto = cfg["protocol"]

    def linear(*a: Any) -> tuple[dict, int, int]:
        return _run_linear(*a, state_dir=state_dir, stop=stop)

    runners = {"linear": linear, "knn": _run_knn, "voc07_svm": _run_svm,
               "segment_retrieval": _run_retrieval, "video_propagation": _run_davis}  # fmt: skip
    if proto == "cam":
        res, n_train, n_test = _run_cam(ext, name, cfg, s, out)
    else:
        res, n_train, n_test = runners[proto](ext, name, cfg, s)
    metric = PRIMARY_METRIC[proto] or next(k for k in res if k in ("top1", "mAP") or k.startswith("mIoU_"))
    value = res[metric]
    if not np.isfinite(value):
        raise ValueError(f"target {name!r}: metric {metric} is {value}; check the splits")
    proto_settings = res.pop("settings")
    return {
        "target": name,
        "protocol": proto,
        "metric": metric,
        "value": float(value),
        "metrics": res,
        "settings": {**s, **proto_settings, "format": cfg.get("format"), "root": str(cfg.get("root"))},
        "defaulted": defaulted,  # setting keys the target left to the protocol's documented defaults
        "seconds": round(time.time() - t0, 3),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": ext.sha256,
        "arch": ext.arch,
        "device": str(ext.device),
        "n_train": n_train,
        "n_test": n_test,
        "feature_cache": {"hits": ext.hits, "misses": ext.misses},
    }


def write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def _json_object(text: str, flag: str, ap: argparse.ArgumentParser) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        ap.error(f"{flag} is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        ap.error(f"{flag} must be a JSON object")
    return obj


def _run_resumable(args: argparse.Namespace, name: str, cfg: dict, out: Path) -> int:
    """The single-target form with ``--state-dir`` and/or under torchrun (the job of a ``recipe: moco_sgd`` target).

    Under torchrun every rank runs this: rank 0 hashes the checkpoint first (the others then read its cached
    digest instead of racing to write it) and alone writes the result. SIGTERM / SIGUSR1 end the run with its
    state saved, one log line and ``RETRY_EXIT``, so that Snakemake's ``retries`` reruns the job, which resumes.
    """
    import contextlib

    import torch.distributed as dist

    from analysis.features import file_sha256
    from study.runstate import RunStopped, StopSignals

    rank = 0
    try:
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            rank = linear_sgd.init_distributed(args.device)[0]
            if rank == 0:
                file_sha256(args.checkpoint, args.cache_dir)
            dist.barrier()
        log.info("%s (%s) on %s", name, cfg.get("protocol"), args.checkpoint)
        signals = StopSignals() if args.state_dir is not None else contextlib.nullcontext()
        try:
            with signals as stop:  # the run path only: importing or calling run_target installs no handler
                result = run_target(args.checkpoint, name, cfg, args.cache_dir, device=args.device, out=out,
                                    progress=not args.no_progress and rank == 0, state_dir=args.state_dir,
                                    stop=stop)  # fmt: skip
        except RunStopped as exc:  # not a failure: one line, then the retry status
            if rank == 0:
                log.warning("%s", exc)
            return exc.exit_code
        except Exception as exc:
            known = isinstance(exc, (TargetError, CheckpointArchError, FileNotFoundError))  # no traceback
            (log.error if known else log.exception)("target %s failed: %s", name, exc)
            print(f"error: target {name} failed for {args.checkpoint}: {first_line(exc, limit=400)}", file=sys.stderr)
            return 1
        if rank == 0:
            write_json_atomic(result, out)
            log.info("%s %s = %.4f (%.1fs) -> %s", name, result["metric"], result["value"], result["seconds"], out)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _batch_key(sha: str, name: str, cfg: Mapping[str, Any]) -> str:
    """What a batched training target's result is made from: the checkpoint's digest, the target's name and its
    config entry (its settings resolve from that alone)."""
    key = {"checkpoint_sha256": sha, "target": name, "config": cfg}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _finished(out: Path, key: str) -> dict | None:
    """The result in ``out`` when a batched run made it from the same inputs (``_batch_key``), else None."""
    try:
        res = json.loads(out.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or (res.get("batched") or {}).get("key") != key:
        return None
    value = res.get("value")
    return res if isinstance(value, (int, float)) and math.isfinite(value) else None


def _run_training(args: argparse.Namespace, name: str, cfg: dict, out: Path, spec: Mapping[str, Any],
                  stop: Any) -> dict[str, Any]:  # fmt: skip
    """One training target inside the batched job, as its own job runs it: the same state directory (resume),
    seed and thread count, and the same result record."""
    threads = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        state_dir = Path(spec["state_dir"]) if spec.get("state_dir") else None
        if cfg.get("protocol") in target_settings.FINETUNE_PROTOCOLS:
            from analysis import finetune  # here: a job of frozen targets loads no dense model

            state_dir = state_dir or out.with_name(out.stem + ".state")  # analysis.finetune's default
            return finetune.finetune(args.checkpoint, name, cfg, state_dir=state_dir, device=args.device,
                                     progress=not args.no_progress, stop=stop)  # fmt: skip
        return run_target(args.checkpoint, name, cfg, args.cache_dir, device=args.device, out=out,
                          progress=not args.no_progress, state_dir=state_dir, stop=stop)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def _run_batch(args: argparse.Namespace, jobs: dict[str, tuple[dict, Path]], training: Mapping[str, Any]) -> int:
    """The first form: every target of one checkpoint, the frozen ones first, then the training ones (see the
    module docstring); the manifest once all of them are done."""
    import contextlib

    from analysis.features import file_sha256
    from study.runstate import RunStopped, StopSignals, signal_name

    order = sorted(jobs, key=lambda n: target_settings.trains(jobs[n][0]))  # stable: frozen targets first
    trained = [n for n in order if target_settings.trains(jobs[n][0])]
    failed, done = [], {}
    sha = file_sha256(args.checkpoint, args.cache_dir) if trained else ""  # once per job, not per target
    # the signals become a flag only where a target trains (a frozen-only job stops at once, as it always did)
    signals = StopSignals() if trained else contextlib.nullcontext()
    with signals as stop:
        for i, name in enumerate(order, 1):
            cfg, out = jobs[name]
            if stop is not None and stop.received:  # between targets: nothing to save
                log.warning("received %s after %d of %d targets; exiting with status %d so that the job is retried "
                            "(finished targets keep their results)", signal_name(stop.received), i - 1, len(order),
                            RETRY_EXIT)  # fmt: skip
                return RETRY_EXIT
            key = _batch_key(sha, name, cfg) if name in trained else None
            if key is not None and (result := _finished(out, key)) is not None:
                log.info("[%d/%d] %s (%s): %s holds its result for this checkpoint and config; not run again",
                         i, len(order), name, cfg.get("protocol"), out)  # fmt: skip
            else:
                spec = training.get(name, {})
                where = (f" (training; state {spec.get('state_dir') or 'default'}, {spec.get('threads') or 'all'} "
                         "thread(s))") if key is not None else ""  # fmt: skip
                log.info("[%d/%d] %s (%s) on %s%s", i, len(order), name, cfg.get("protocol"), args.checkpoint, where)
                try:
                    if key is not None:
                        result = _run_training(args, name, cfg, out, spec, stop)
                        result["batched"] = {"job": "transfer", "key": key}
                    else:
                        result = run_target(args.checkpoint, name, cfg, args.cache_dir, device=args.device, out=out,
                                            progress=not args.no_progress)  # fmt: skip
                except RunStopped as exc:  # not a failure: the state is saved; one line, then the retry status
                    log.warning("%s", exc)
                    return exc.exit_code
                except (TargetError, CheckpointArchError, FileNotFoundError) as exc:  # config / data: no traceback
                    log.error("target %s failed: %s", name, exc)
                    failed.append(f"{name}: {exc}")
                    continue
                except Exception as exc:  # keep evaluating the other targets; report every failure at the end
                    log.exception("target %s failed: %s", name, exc)
                    failed.append(f"{name}: {type(exc).__name__}: {exc}")
                    continue
                write_json_atomic(result, out)
                log.info("%s %s = %.4f (%.1fs) -> %s", name, result["metric"], result["value"], result["seconds"],
                         out)  # fmt: skip
            done[name] = {"result": str(out), "metric": result["metric"], "value": result["value"]}
    if failed:
        print(f"error: {len(failed)} of {len(jobs)} target(s) failed for {args.checkpoint}:\n  "
              + "\n  ".join(failed), file=sys.stderr)  # fmt: skip
        return 1
    if args.manifest is not None:  # written last: its presence says every target of the checkpoint is done
        write_json_atomic({"checkpoint": str(args.checkpoint), "targets": done}, args.manifest)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    if (args.state_dir is not None or distributed) and args.target_json is None:
        ap.error("--state-dir and torchrun (WORLD_SIZE > 1) go with the single-target form (--target-json)")
    if args.targets_json is not None:
        if args.out_dir is None or args.target_json is not None:
            ap.error("--targets-json goes with --out-dir (and without --target-json / --name / --out)")
        jobs = {name: (cfg, args.out_dir / f"{name}.json")
                for name, cfg in _json_object(args.targets_json, "--targets-json", ap).items()}  # fmt: skip
        bad = [n for n, (c, _) in jobs.items() if not isinstance(c, dict)]
        if bad:
            ap.error(f"--targets-json: the entries of {bad} must be JSON objects")
    elif args.target_json is not None and args.name and args.out:
        jobs = {args.name: (_json_object(args.target_json, "--target-json", ap), args.out)}
    else:
        ap.error("pass --targets-json with --out-dir, or --target-json with --name and --out")
    if args.manifest is not None and args.targets_json is None:
        ap.error("--manifest goes with --targets-json")
    training: dict[str, dict] = {}
    if args.training_json is not None:
        if args.targets_json is None:
            ap.error("--training-json goes with --targets-json")
        training = _json_object(args.training_json, "--training-json", ap)
        bad = sorted(n for n, v in training.items() if n not in jobs or not isinstance(v, dict)
                     or not target_settings.trains(jobs[n][0]))  # fmt: skip
        if bad:
            ap.error(f"--training-json: {bad} must be training targets of --targets-json (fine-tuning or "
                     "recipe: moco_sgd), each a JSON object")  # fmt: skip
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(args.log))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", handlers=handlers
    )
    try:  # an unreadable checkpoint fails every target the same way: say it once, in one line
        read_checkpoint(args.checkpoint)
    except (OSError, ValueError) as exc:
        print(f"error: {first_line(exc, limit=400)}", file=sys.stderr)
        return 1
    if args.state_dir is not None or distributed:
        [(name, (cfg, out))] = jobs.items()
        return _run_resumable(args, name, cfg, out)
    return _run_batch(args, jobs, training)


if __name__ == "__main__":
    raise SystemExit(main())
