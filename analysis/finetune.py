"""Fine-tune a pretrained backbone on a dense target (segmentation, detection, depth) and write its result JSON.

    python -m analysis.finetune --checkpoint results/pretrain/D/V/checkpoint.pt --name T \
        --target-json '{"protocol": "finetune_seg", "format": "voc_seg", "root": "..."}' \
        --out results/transfer/D/V/T.json [--state-dir results/finetune/D/V/T] [--device cuda]
    torchrun --standalone --nproc_per_node=G -m analysis.finetune ...   # DDP, SyncBN (the pretraining launcher)

The paper fine-tunes every layer with BN trained (MoCo Sec. 4.2: "BN tuned", synchronised across GPUs), so BN
layers are converted to SyncBN when the run has several processes. The run is resumable like pretraining: the
model, optimiser and step are saved atomically every ``save_every`` steps to ``<state-dir>/state.pt``, and a
step's batch is drawn from (seed, step) only, so a killed run, restarted with the same command, ends exactly
where an unbroken one would. A state of another checkpoint or other settings is refused (delete it to start
over); an unreadable one is moved aside to ``state.pt.corrupt`` and the run starts from step 0.

The result JSON has the same fields as ``analysis.transfer``'s, so the tables read it the same way.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from analysis.features import IMAGENET_MEAN, IMAGENET_STD, file_sha256
from analysis.finetune_tasks import TASKS, Task
from analysis.targets import TargetError
from analysis.transfer import FORMAT_KEYS, write_json_atomic
from study.models import load_backbone
from study.runstate import atomic_save, first_line

log = logging.getLogger("analysis.finetune")

COMMON_DEFAULTS: dict[str, Any] = {
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
# Paper-scale defaults per protocol (REFERENCE.md "Transfer protocols"; MoCo's detectron2 VOC config); the
# embedded study overrides sizes and schedules in config.yaml's targets.
PROTOCOL_DEFAULTS: dict[str, dict[str, Any]] = {
    # VOC train_aug: 512 crops, SGD lr 0.003, 45 epochs (Cityscapes: crop_size 768, optimizer adam, lr 1e-4,
    # 150 epochs, head_dilation 1); poly 0.9 decay
    "finetune_seg": {"epochs": 45, "batch_size": 8, "lr": 0.003, "weight_decay": 1e-4, "schedule": "poly",
                     "crop_size": 512, "scale_range": [0.5, 2.0], "head_channels": 256, "head_dilation": 6,
                     "dilate": True},
    # pascal_voc_R_50_C4_24k: 16 images, lr 0.02, 24k iterations, steps 18k / 22k, warm-up 100; train scales
    # 480-800 (step 32), test 800, max 1333; VOC07 11-point AP50 on test2007 (detectron2 for the 2007 set)
    "finetune_det": {"steps": 24000, "batch_size": 16, "lr": 0.02, "schedule": "step", "milestones": [18000, 22000],
                     "warmup_steps": 100, "min_size_train": list(range(480, 801, 32)), "min_size_test": 800,
                     "max_size": 1333, "anchor_sizes": [32, 64, 128, 256, 512], "detections_per_img": 100,
                     "score_thresh": 0.05, "use_07_metric": True,
                     # detectron2's RPN / RoI sampling (MoCo's Base-RCNN-C4-BN: 6000 / 1000 proposals at test)
                     "rpn_pre_nms_train": 12000, "rpn_post_nms_train": 2000, "rpn_pre_nms_test": 6000,
                     "rpn_post_nms_test": 1000, "rpn_batch_per_image": 256, "roi_batch_per_image": 512},
    # NYUD-v2 (Laina et al.): images at half size, 228 x 304 crops, berHu loss, SGD lr 0.01, 20 epochs
    "finetune_depth": {"epochs": 20, "batch_size": 16, "lr": 0.01, "schedule": "poly", "resize": 0.5,
                       "crop_size": [228, 304], "decoder_channels": None, "n_up": 4},
}  # fmt: skip


def resolve_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Protocol defaults overridden by the target config; unknown keys are logged, bad values raise."""
    proto = cfg.get("protocol")
    if proto not in PROTOCOL_DEFAULTS:
        raise TargetError(f"fine-tuning protocol {proto!r} is unknown; choose one of {sorted(PROTOCOL_DEFAULTS)}")
    s = {**COMMON_DEFAULTS, **PROTOCOL_DEFAULTS[proto]}
    unknown = [k for k in cfg if k not in s and k not in FORMAT_KEYS]
    if unknown:
        log.warning("target keys %s are not read by protocol %r", unknown, proto)
    s.update({k: v for k, v in cfg.items() if k in s})
    if s["optimizer"] not in ("sgd", "adam"):
        raise TargetError(f"target key optimizer={s['optimizer']!r}: use sgd or adam")
    if s["schedule"] not in ("step", "poly", "constant"):
        raise TargetError(f"target key schedule={s['schedule']!r}: use step, poly or constant")
    if s["precision"] not in ("auto", "fp32", "bf16"):
        raise TargetError(f"target key precision={s['precision']!r}: use auto, fp32 or bf16")
    for key in ("batch_size", "save_every"):
        if int(s[key]) < 1:
            raise TargetError(f"target key {key}={s[key]!r}: must be >= 1")
    if s["steps"] is None and s["epochs"] is None:
        raise TargetError("set `steps` or `epochs` in the fine-tuning target")
    return s


def lr_at(step: int, total: int, s: Mapping[str, Any]) -> float:
    """Learning rate of ``step`` (0-based) out of ``total``."""
    lr = float(s["lr"])
    if s["schedule"] == "poly":
        lr *= (1.0 - step / total) ** float(s["poly_power"])
    elif s["schedule"] == "step":
        lr *= float(s["gamma"]) ** sum(step >= int(m) for m in s["milestones"])
    warm = int(s["warmup_steps"])
    if step < warm:
        a = step / warm
        lr *= 1e-3 * (1 - a) + a
    return lr


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_slots(step: int, batch: int, n: int, seed: int) -> list[tuple[int, int]]:
    """(image index, augmentation seed) of each slot of ``step``'s batch: images are read in epochs, each a
    seeded permutation, so the stream depends on (seed, step) alone, not on when the run was restarted."""
    out = []
    for j in range(batch):
        p = step * batch + j
        epoch, k = divmod(p, n)
        out.append((int(_epoch_order(seed, epoch, n)[k]), p))
    return out


class StepBatches:
    """The batch sampler of steps ``start``..``total - 1``, this process's share (slots rank::world), made
    lazily: a 24k-step schedule is never materialised."""

    def __init__(self, start: int, total: int, batch: int, n: int, seed: int, rank: int = 0, world: int = 1):
        self.start, self.total, self.batch, self.n, self.seed = start, total, batch, n, seed
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self):
        for k in range(self.start, self.total):
            yield batch_slots(k, self.batch, self.n, self.seed)[self.rank :: self.world]


class _Samples(torch.utils.data.Dataset):
    def __init__(self, task: Task, seed: int) -> None:
        self.task, self.seed = task, seed

    def __len__(self) -> int:
        return len(self.task.train)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        i, p = key
        return self.task.sample(i, np.random.default_rng([self.seed, 1, p]))


def _init_distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _fingerprint(sha: str, name: str, s: Mapping[str, Any], world: int) -> str:
    key = {"checkpoint": sha, "target": name, "settings": s, "world": world}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _load_state(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a fine-tuning state")
    except Exception as exc:  # a truncated or foreign file: keep it for inspection, start over
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning("%s is unreadable (%s); moved to %s, starting from step 0", path, first_line(exc), aside)
        return None
    if state.get("fingerprint") != fingerprint:
        raise TargetError(
            f"{path} belongs to another checkpoint, target or settings; delete it (rm {path}) to start over, "
            "or restore the settings it was made with"
        )
    return state


def finetune(
    checkpoint: str | Path, name: str, cfg: Mapping[str, Any], *, state_dir: str | Path | None = None,
    device: str | None = None, progress: bool = True,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune ``checkpoint`` on target ``name`` and evaluate it; returns the result record (the caller
    writes rank 0's). ``on_step(steps done, model)`` runs after each step (tests use it to stop a run)."""
    t0 = time.time()
    s = resolve_settings(cfg)
    rank, world, local_rank = _init_distributed()
    dev = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(int(s["seed"]))  # the heads' initialisation
    task = TASKS[cfg["protocol"]](name, cfg, s)
    backbone, info = load_backbone(checkpoint, arch=s["arch"])
    model = task.build(backbone).to(dev)
    sync_bn = world > 1 and bool(s["sync_bn"]) and dev.type == "cuda"
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif world > 1 and s["sync_bn"]:  # torch's SyncBatchNorm runs on GPUs only
        log.warning("sync_bn: SyncBatchNorm needs CUDA; on %s each process keeps its own BN statistics", dev)
    params = [p for p in model.parameters() if p.requires_grad]
    if s["optimizer"] == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=float(s["lr"]), momentum=float(s["momentum"]),
                                                     weight_decay=float(s["weight_decay"]))  # fmt: skip
    else:
        opt = torch.optim.Adam(params, lr=float(s["lr"]), weight_decay=float(s["weight_decay"]))
    batch = int(s["batch_size"])
    if batch % world:
        raise TargetError(f"target {name!r}: batch_size {batch} does not split over {world} processes")
    n_train = len(task.train)
    total = int(s["steps"]) if s["steps"] is not None else math.ceil(float(s["epochs"]) * n_train / batch)
    sha = file_sha256(checkpoint)
    fp = _fingerprint(sha, name, s, world)
    state_path = Path(state_dir) / "state.pt" if state_dir else None
    start, last = 0, float("nan")
    if state_path is not None:
        state = _load_state(state_path, fp)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["step"])
            last = float(state.get("loss", float("nan")))
            log.info("resuming %s from step %d of %d (%s)", name, start, total, state_path)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True)
    bf16 = s["precision"] == "bf16" or (s["precision"] == "auto" and dev.type == "cuda")
    samples = _Samples(task, int(s["seed"]))
    slots = StepBatches(start, total, batch, n_train, int(s["seed"]), rank, world)
    loader = torch.utils.data.DataLoader(samples, batch_sampler=slots, collate_fn=task.collate,
                                         num_workers=int(s["num_workers"]))  # fmt: skip
    model.train()
    bar = tqdm(total=total, initial=start, desc=f"finetune {name}", disable=not progress or rank != 0)
    for step, items in zip(range(start, total), loader, strict=True):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, s)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = task.loss(train_model, items, dev)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"target {name!r}: loss is {loss.item()} at step {step}; lower `lr`")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(loss.detach())
        bar.update()
        bar.set_postfix(loss=f"{last:.3f}")
        done = step + 1
        if state_path is not None and rank == 0 and (done % int(s["save_every"]) == 0 or done == total):
            state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save({"step": done, "fingerprint": fp, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "loss": last}, state_path)  # fmt: skip
        if on_step is not None:
            on_step(done, model)
    bar.close()
    if rank != 0:  # the replicas are identical after DDP's averaged steps: rank 0 alone tests and reports
        return {"target": name, "rank": rank, "steps": total}
    model.eval()
    res = task.evaluate(model, dev, progress=progress)
    value = float(res[task.metric])
    if not np.isfinite(value):
        raise ValueError(f"target {name!r}: metric {task.metric} is {value}; check the splits")
    return {
        "target": name, "protocol": cfg["protocol"], "metric": task.metric, "value": value,
        "lower_is_better": task.lower_is_better, "metrics": res,
        "settings": {**s, "steps": total, "format": cfg.get("format"), "root": str(cfg.get("root")),
                     "world_size": world, "bf16": bf16, "sync_bn": sync_bn},
        "final_loss": last, "resumed_from_step": start, "seconds": round(time.time() - t0, 3),
        "checkpoint": str(checkpoint), "checkpoint_sha256": sha, "arch": info.get("arch"), "device": str(dev),
        "n_train": n_train, "n_test": len(task.test),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--name", required=True, help="target key")
    ap.add_argument("--target-json", required=True, help="the target's config entry as a JSON object")
    ap.add_argument("--out", required=True, type=Path, help="result JSON")
    ap.add_argument("--state-dir", type=Path, default=None, help="resumable state (default: <out>.state/)")
    ap.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda when available)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = json.loads(args.target_json)
    except json.JSONDecodeError as exc:
        ap.error(f"--target-json is not valid JSON: {exc}")
    if not isinstance(cfg, dict):
        ap.error("--target-json must be a JSON object")
    state_dir = args.state_dir or args.out.with_name(args.out.stem + ".state")
    try:
        result = finetune(args.checkpoint, args.name, cfg, state_dir=state_dir, device=args.device,
                          progress=not args.no_progress)  # fmt: skip
    except (TargetError, FileNotFoundError, FloatingPointError, ValueError) as exc:
        print(f"error: target {args.name} on {args.checkpoint}: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0") or 0) == 0:
        write_json_atomic(result, args.out)
        log.info("%s %s = %.4f (%.1fs) -> %s", args.name, result["metric"], result["value"], result["seconds"],
                 args.out)  # fmt: skip
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
