"""What each job asks a cluster for, estimated from its work instead of one blanket value.

A request far from need costs twice: a 72 h, 4-GPU request for a 10 h run waits longer in the queue and
blocks GPUs others could use, and an untrained baseline holding 4 GPUs trains nothing. So a rule whose config
says ``runtime: auto`` asks for

    minutes = work / (throughput x GPUs x estimate.gpu_speed) x estimate.safety + estimate.overhead_min

capped at ``estimate.max_runtime`` (a site's partition limit; a longer job is signalled before the limit,
saves its state and is retried, so it continues over ``ceil(uncapped / cap)`` attempts: docs/cluster.md).
Throughputs are stated per V100 (``gpu_speed`` 1.0; an A100 is about 2, an H100 about 3.5 in bf16; measure yours
with benchmarks/gpu.py) from public anchors, each named where it is defined:

- pretraining: MoCo's 200 ImageNet epochs (1.28 M images) in about 53 h on 8 V100 (He et al. 2020), about 168
  img/s per V100 for ResNet-50 at two 224 px views; other view sets scale with their pixels (multi-crop
  2 x 160 + 4 x 96 costs about 1.06x: the small crops are queries only; see ``view_cost``);
- fine-tuning: detectron2's model zoo R50-C4 (0.55 s/iteration of 16 images on 8 V100), about 20 img/s per
  V100 for a dilated ResNet-50 FCN at 512 px, about 22 img/s for FCRN at 228 x 304;
- MoCo's SGD linear recipe: a frozen ResNet-50 forward pass plus JPEG decoding, about 600 img/s per V100 with
  8 decoding workers per GPU (the forward pass alone is ~3x faster; decoding bounds it).

Image counts come from the dataset's subset rule (``uniform``: per_class x the format's classes, ``long_tailed``:
total, ``random``: n, ``all``: the format's known train size) unless the dataset or target states ``images:``.
Torch-free: the Snakefile imports it at DAG build.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Train images of a full dataset (subset rule `all`) and classes (rule `uniform`), per pretraining format.
FORMAT_IMAGES = {"imagenet": 1_281_167, "coco": 118_287, "openimages": 1_743_042, "bdd100k": 70_000}
FORMAT_CLASSES = {"imagenet": 1000, "coco": 80, "openimages": 600, "bdd100k": 10}
# Train images per fine-tuning / linear target format (the paper's splits).
TARGET_IMAGES = {"voc_seg": 10_582, "cityscapes": 2_975, "voc_det": 16_551, "nyud_depth": 795, "nyud_seg": 795,
                 "imagefolder": 1_281_167}  # fmt: skip

PRETRAIN_IMG_S_V100 = 200 * 1_281_167 / (53 * 3600) / 8  # MoCo: 200 ImageNet epochs in ~53 h on 8 V100: ~168 img/s
ARCH_COST = {"resnet50": 1.0, "resnet18": 0.45, "resnet34": 0.9, "resnet101": 1.9}  # forward+backward FLOPs ratio
FINETUNE_IMG_S_V100 = {  # at the reference input size, per V100
    "finetune_seg": (20.0, 512 * 512),
    "finetune_det": (16 / 0.55 / 8, 800 * 1067),  # detectron2 R50-C4: 0.55 s/iter, 16 images, 8 V100
    "finetune_depth": (22.0, 228 * 304),
}
SGD_LINEAR_IMG_S_V100 = 600.0
DEFAULTS = {"gpu_speed": 1.0, "safety": 1.5, "overhead_min": 20, "max_runtime": 4320, "min_runtime": 30,
            "target_hours": 12}


class EstimateError(ValueError):
    """A job's work cannot be estimated from the config; the message names the key to set."""


def settings(config: Mapping[str, Any]) -> dict[str, float]:
    return {**DEFAULTS, **(config.get("estimate") or {})}


def dataset_images(name: str, ds: Mapping[str, Any]) -> int:
    """Images a pretraining dataset's subset holds (its ``images:`` if stated)."""
    if ds.get("images"):
        return int(ds["images"])
    sub, fmt = ds.get("subset") or {}, ds.get("format")
    rule = sub.get("rule", "all")
    if rule == "long_tailed":
        return int(sub["total"])
    if rule == "random":
        return int(sub["n"])
    if rule == "uniform" and fmt in FORMAT_CLASSES:
        return int(sub["per_class"]) * FORMAT_CLASSES[fmt]
    if rule == "all" and fmt in FORMAT_IMAGES:
        return FORMAT_IMAGES[fmt]
    raise EstimateError(f"config key datasets.{name}.images: set it (the subset's image count) to estimate the "
                        "runtime of its pretraining jobs, or give the rule a runtime in minutes")  # fmt: skip


def view_cost(s: Mapping[str, Any]) -> float:
    """Cost of one image's views relative to MoCo's two 224 px views of a ResNet-50.

    A query view costs a forward and a backward pass (~3 forward passes), the key view one forward pass of the
    momentum encoder; multi-crop's small crops are queries only: (3 (size^2 + n_small small^2) + size^2) pixel
    units against 4 x 224^2 (2 x 160 + 4 x 96: ~1.06x).
    """
    size, small = float(s.get("crop.size", 224)), float(s.get("crop.small_size", 96))
    n_small = float(s.get("crop.n_small", 0) or 0)
    units = 3 * (size**2 + n_small * small**2) + size**2
    return ARCH_COST.get(str(s.get("model.arch", "resnet50")), 1.0) * units / (4 * 224**2)


def minutes(work_gpu_s: float, gpus: int, config: Mapping[str, Any]) -> tuple[int, int]:
    """(runtime request in minutes, capped at max_runtime; attempts the job needs at that cap)."""
    e = settings(config)
    raw = work_gpu_s / max(1, gpus) / float(e["gpu_speed"]) / 60.0 * float(e["safety"]) + float(e["overhead_min"])
    raw = max(float(e["min_runtime"]), raw)
    cap = float(e["max_runtime"])
    return int(math.ceil(min(raw, cap))), int(math.ceil(raw / cap))


def choose_gpus(work_gpu_s: float, max_gpu: int, batch: int, config: Mapping[str, Any]) -> int:
    """``gpu: auto``: the fewest GPUs (1, 2, 4, ... up to ``max_gpu``, dividing the global batch) that finish
    the work within ``estimate.target_hours``; more GPUs than that only wait longer in the queue."""
    e = settings(config)
    options = [g for g in (1, 2, 4, 8, 16, 32) if g <= max(1, max_gpu) and batch % g == 0] or [1]
    for g in options:
        if work_gpu_s / g / float(e["gpu_speed"]) <= float(e["target_hours"]) * 3600:
            return g
    return options[-1]


def pretrain_request(config: Mapping[str, Any], dataset: str, s: Mapping[str, Any], gpus: int) -> dict[str, Any]:
    """GPUs and minutes of one pretraining run with composed settings ``s``; the untrained baseline needs none."""
    if s.get("random_init"):
        return {"gpu": 0, "runtime": int(settings(config)["min_runtime"]), "attempts": 1, "gpu_hours": 0.0}
    images = dataset_images(dataset, config["datasets"][dataset])
    work = float(s.get("epochs", 0)) * images * view_cost(s) / PRETRAIN_IMG_S_V100  # V100-seconds
    runtime, attempts = minutes(work, gpus, config)
    return {"gpu": gpus, "runtime": runtime, "attempts": attempts, "gpu_hours": work / 3600.0}


def _train_images(name: str, t: Mapping[str, Any]) -> int:
    if t.get("images"):
        return int(t["images"])
    if t.get("format") in TARGET_IMAGES:
        return TARGET_IMAGES[t["format"]]
    raise EstimateError(f"config key targets.{name}.images: set it (train images) to estimate the runtime of "
                        "its jobs, or give the rule a runtime in minutes")  # fmt: skip


def _pixels(size: Any) -> float:
    if isinstance(size, (list, tuple)):
        return float(size[0]) * float(size[-1])
    return float(size) ** 2


def finetune_request(config: Mapping[str, Any], name: str, t: Mapping[str, Any], s: Mapping[str, Any],
                     gpus: int | str, max_gpu: int = 8) -> dict[str, Any]:  # fmt: skip
    """GPUs and minutes of one fine-tuning job (``s``: its resolved settings, analysis.target_settings);
    ``gpus="auto"`` chooses the count (``choose_gpus``)."""
    rate, ref_px = FINETUNE_IMG_S_V100[t["protocol"]]
    if t["protocol"] == "finetune_det":
        px = _pixels(s["min_size_test"]) * 4 / 3
    elif s.get("crop_size") is not None:
        px = _pixels(s["crop_size"])
    else:
        px = ref_px
    batch = int(s["batch_size"])
    n = int(s["steps"]) * batch if s.get("steps") else float(s["epochs"]) * _train_images(name, t)
    work = n / rate * px / ref_px
    g = choose_gpus(work, max_gpu, batch, config) if gpus == "auto" else int(gpus)
    runtime, attempts = minutes(work, g, config)
    return {"gpu": g, "runtime": runtime, "attempts": attempts, "gpu_hours": work / 3600.0}


def sgd_linear_request(config: Mapping[str, Any], name: str, t: Mapping[str, Any], s: Mapping[str, Any],
                       gpus: int | str, max_gpu: int = 8) -> dict[str, Any]:  # fmt: skip
    """GPUs and minutes of one SGD linear job (MoCo's recipe: ``epochs`` passes over the train images)."""
    work = float(s["epochs"]) * _train_images(name, t) * _pixels(s["image_size"]) / 224**2 / SGD_LINEAR_IMG_S_V100
    g = choose_gpus(work, max_gpu, int(s["batch_size"]), config) if gpus == "auto" else int(gpus)
    runtime, attempts = minutes(work, g, config)
    return {"gpu": g, "runtime": runtime, "attempts": attempts, "gpu_hours": work / 3600.0}


def _resources(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    tr = config.get("transfer") or {}
    if key == "pretrain":
        return (config.get("pretrain") or {}).get("resources") or {}
    ft = tr.get("finetune_resources", tr.get("resources", {}))
    return {"transfer": tr.get("resources", {}), "finetune": ft, "linear_sgd": tr.get("sgd_resources", ft)}[key]


def batched_request(config: Mapping[str, Any], names: list[str]) -> dict[str, int]:
    """What one checkpoint's `transfer` job asks for when it runs ``names`` (its batched targets): the
    ``transfer.resources``, and for each training target that runs in it (a CPU-only config,
    ``analysis.target_settings.runs_alone``) the threads and memory its own job would have asked for (the
    larger wins) and its runtime added to the job's (``runtime: auto``: its estimate, as its own job's)."""
    from analysis.target_settings import job_resources, resolve, trains

    tr = _resources(config, "transfer")
    out = {"threads": max(1, int(tr.get("threads", 1) or 1)), "mem_mb": int(tr.get("mem_mb", 4000)),
           "runtime": int(tr.get("runtime", 60))}  # fmt: skip
    targets = config.get("targets") or {}
    for t in names:
        if not trains(targets[t]):
            continue
        res = job_resources(config, targets[t])
        out["threads"] = max(out["threads"], int(res.get("threads", 1) or 1))
        out["mem_mb"] = max(out["mem_mb"], int(res.get("mem_mb", 4000)))
        if res.get("runtime", 60) == "auto":
            fn = finetune_request if str(targets[t]["protocol"]).startswith("finetune") else sgd_linear_request
            s = resolve(t, {k: x for k, x in targets[t].items() if k != "synthetic"})[0]
            out["runtime"] += int(fn(config, t, targets[t], s, 0)["runtime"])
        else:
            out["runtime"] += int(res.get("runtime", 60))
    return out


def plan_requests(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per training job of the config's experiments: what it asks for and the work estimate behind it.

    ``requested_gpu_hours`` = GPUs x runtime x attempts (what the queue reserves at worst); ``gpu_hours`` is the
    estimated work in V100-hours. Frozen-feature transfer jobs are listed with their configured request (with
    the training targets they run on a CPU-only config: ``batched_request``).
    """
    from analysis.tables import variant_settings
    from analysis.target_settings import resolve, runs_alone

    pairs, triples = [], []
    for spec in (config.get("experiments") or {}).values():
        for d in spec["datasets"]:
            for v in spec["variants"]:
                if (d, v) not in pairs:
                    pairs.append((d, v))
                for t in spec.get("targets", []):
                    if (d, v, t) not in triples:
                        triples.append((d, v, t))
    rows = []
    pre = _resources(config, "pretrain")
    for d, v in pairs:
        s = variant_settings(config, v)
        gpus = 0 if s.get("random_init") else int(pre.get("gpu", 0))
        req = pretrain_request(config, d, s, gpus)
        if pre.get("runtime", "auto") != "auto":
            req["runtime"], req["attempts"] = int(pre["runtime"]), 1
        rows.append({"rule": "pretrain", "job": f"{d}/{v}", **req})
    targets = config.get("targets") or {}
    batched = sorted({(d, v) for d, v, t in triples if not runs_alone(targets[t], config)})
    tr = _resources(config, "transfer")
    for d, v in batched:
        names = [t for dd, vv, t in triples if (dd, vv) == (d, v) and not runs_alone(targets[t], config)]
        rows.append({"rule": "transfer", "job": f"{d}/{v}", "gpu": int(tr.get("gpu", 0)),
                     "runtime": batched_request(config, names)["runtime"], "attempts": 1,
                     "gpu_hours": float("nan")})  # fmt: skip
    for d, v, t in triples:
        if not runs_alone(targets[t], config):
            continue
        key = "finetune" if str(targets[t]["protocol"]).startswith("finetune") else "linear_sgd"
        res = _resources(config, key)
        fn = finetune_request if key == "finetune" else sgd_linear_request
        s = resolve(t, {k: x for k, x in targets[t].items() if k != "synthetic"})[0]
        req = fn(config, t, targets[t], s, res.get("gpu", 0), int(res.get("max_gpu", 8)))
        if res.get("runtime", "auto") != "auto":
            req["runtime"], req["attempts"] = int(res["runtime"]), 1
        rows.append({"rule": key, "job": f"{d}/{v}/{t}", **req})
    for r in rows:
        r["requested_gpu_hours"] = r["gpu"] * r["runtime"] / 60.0 * r["attempts"]
    return rows


def summary_markdown(rows: list[dict[str, Any]], config: Mapping[str, Any]) -> str:
    """Per rule: jobs, GPUs and hours per job (range), estimated V100-hours of work, requested GPU-hours."""
    speed = float(settings(config)["gpu_speed"])
    out = ["| rule | jobs | GPUs per job | request per job (h) | work (V100-hours) | requested GPU-hours |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    total_work = total_req = 0.0
    for rule in ("pretrain", "transfer", "finetune", "linear_sgd"):
        rs = [r for r in rows if r["rule"] == rule]
        if not rs:
            continue
        gpus = sorted({r["gpu"] for r in rs})
        hours = [r["runtime"] / 60.0 * r["attempts"] for r in rs]
        work = sum(r["gpu_hours"] for r in rs if not math.isnan(r["gpu_hours"]))
        req = sum(r["requested_gpu_hours"] for r in rs)
        total_work, total_req = total_work + work, total_req + req
        work_txt = "-" if all(math.isnan(r["gpu_hours"]) for r in rs) else f"{work:,.0f}"
        out.append(f"| {rule} | {len(rs)} | {'/'.join(map(str, gpus))} | {min(hours):.1f}-{max(hours):.1f} | "
                   f"{work_txt} | {req:,.0f} |")  # fmt: skip
    out.append(f"| all | {len(rows)} | | | {total_work:,.0f} | {total_req:,.0f} |")
    out.append(f"\nGPU speed {speed:g}x a V100; work in V100-hours, requests in hours of your GPUs.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    from pathlib import Path

    import yaml

    ap = argparse.ArgumentParser(description="What each training job of a study config asks the cluster for.")
    ap.add_argument("--configfile", default="workflow/configs/paper.yaml", type=Path)
    ap.add_argument("--jobs", action="store_true", help="one JSON line per job instead of the per-rule table")
    args = ap.parse_args(argv)
    config = yaml.safe_load(args.configfile.read_text())
    try:
        rows = plan_requests(config)
    except EstimateError as exc:
        print(f"error: {exc}")
        return 2
    if args.jobs:
        for r in rows:
            print(json.dumps(r))
    else:
        print(summary_markdown(rows, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
