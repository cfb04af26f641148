"""Pretraining app: one MoCo-family model per (dataset, variant), trained from webdataset shards.

Run as a Hydra app, e.g.::

    python -m study.train method=moco_v2 crop.max_iou=0.3 data.shards=results/data/coco/shards out_dir=...

or under ``torchrun --standalone --nproc_per_node=G`` for several GPUs (DDP). The public MoCo code is DDP-only,
fp32 and overwrites one checkpoint per epoch; this trainer also runs on a CPU, uses bf16 autocast and
channels_last where they help, checkpoints atomically every ``ckpt_every`` steps and resumes by itself.

Artefacts in ``out_dir``: ``checkpoint.pt`` (written once, at the end: Snakemake's output), ``last.pt`` (the
rolling resume point, removed at the end), ``metrics.csv``, ``config.yaml`` (resolved) and ``train.log``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from data_prep.shards import load_manifest

log = logging.getLogger("study.train")

METRIC_FIELDS = [
    "step",
    "epoch",
    "loss",
    "loss_inst",
    "loss_nn",
    "lr",
    "img_per_s",
    "fallbacks",
    "pos_logit",
    "neg_logit",
]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


# ----------------------------------------------------------------------------------------------- helpers


def read_manifest(shard_dir: str | Path) -> tuple[list[str], int, list[str]]:
    """Shard URLs, sample count and class list of one subset, from the data stage's manifest."""
    try:
        meta, tars = load_manifest(shard_dir)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"data.shards={shard_dir}: {exc}") from None
    count = int(meta["totals"]["images"])
    if count == 0:
        raise ValueError(f"{shard_dir}/manifest.json: the subset has no images; check the data stage's log for skips.")
    return [str(t) for t in tars], count, list(meta.get("classes", []))


def lr_at(step: int, total_steps: int, steps_per_epoch: int, optim: Any) -> float:
    """Learning rate at a step: cosine (no warm-up, the paper's setting) or MoCo's step decay."""
    base = float(optim.lr)
    warm = int(optim.get("warmup_steps", 0) or 0)
    if warm and step < warm:
        return base * (step + 1) / warm
    if optim.schedule == "cosine":
        t = (step - warm) / max(1, total_steps - warm)
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    if optim.schedule == "step":
        epoch = step / max(1, steps_per_epoch)
        return base * 0.1 ** sum(epoch >= m for m in optim.milestones)
    raise ValueError(f"optim.schedule={optim.schedule!r}: use 'cosine' or 'step'.")


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class MetricsLog:
    """metrics.csv that survives resume: rows after the resumed step are dropped, so no gap and no duplicate."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        rows: list[dict[str, str]] = []
        if path.exists() and resume_step > 0:
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= resume_step]
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    def append(self, row: dict[str, float]) -> None:
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=METRIC_FIELDS).writerow({k: row.get(k, "") for k in METRIC_FIELDS})


def _pick_device(cfg: DictConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible; use device=auto or device=cpu.")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _init_distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, total: int,
                steps_per_epoch: int, cfg: DictConfig, final: bool) -> dict[str, Any]:
    from study.models import backbone_state

    core = _unwrap(model)
    state = backbone_state(core.encoder_q)
    state.update(
        model={k: v.detach().cpu() for k, v in core.state_dict().items()},
        optimizer=optimizer.state_dict(),
        step=step,
        total_steps=total,
        steps_per_epoch=steps_per_epoch,
        epoch=step / max(1, steps_per_epoch),
        method=str(cfg.get("method_name", "")),
        config=OmegaConf.to_container(cfg, resolve=True),
        final=final,
        torch_rng=torch.get_rng_state(),
    )
    return state


def _batches(urls: list[str], cfg: DictConfig, start_epoch: int, steps_per_epoch: int) -> Iterator[dict[str, Any]]:
    """Endless stream of batches. The loader re-seeds itself per (seed, rank, worker, epoch), so a resumed run
    continues with the epochs it had not seen, in a reproducible order."""
    from study.data import make_loader

    loader = make_loader(
        urls,
        crop_cfg=cfg.crop,
        aug_cfg=cfg.aug,
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        seed=int(cfg.seed),
        epoch_len=steps_per_epoch,
        start_epoch=start_epoch,
        shuffle_buffer=int(cfg.data.shuffle_buffer),
        interleave=int(cfg.data.get("interleave", 64)),
    )
    while True:  # each pass is one epoch of steps_per_epoch batches
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise RuntimeError(f"the loader over {urls[:2]}... yielded no batch; is batch_size larger than what "
                               "each reader gets from the shards?")


# ------------------------------------------------------------------------------------------------- train


def train(cfg: DictConfig) -> Path:
    """Train (or resume) one model; returns the final checkpoint path."""
    from study.moco import MoCo

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rank, world, local_rank = _init_distributed()
    device = _pick_device(cfg, local_rank)
    is_main = rank == 0
    final_path, last_path = out_dir / "checkpoint.pt", out_dir / "last.pt"

    torch.manual_seed(int(cfg.seed) + rank)
    epochs = 0 if cfg.get("random_init", False) else int(cfg.epochs)
    if epochs > 0:
        urls, count, _classes = read_manifest(cfg.data.shards)
        global_batch = int(cfg.batch_size) * world
        if count < global_batch:
            raise ValueError(f"batch_size={cfg.batch_size} x {world} process(es) exceeds the {count} images of "
                             f"{cfg.data.shards}; lower batch_size.")
        steps_per_epoch = count // global_batch
    else:
        urls, steps_per_epoch = [], 1
    total = epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, int(cfg.max_steps))

    model = MoCo(cfg.model, cfg.moco, cfg.knn, cfg.mochi).to(device)
    use_cl = cfg.channels_last is True or (cfg.channels_last == "auto" and device.type == "cuda")
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=float(cfg.optim.lr), momentum=float(cfg.optim.momentum),
                                weight_decay=float(cfg.optim.weight_decay))

    start = 0
    resume_from = last_path if last_path.exists() else (final_path if final_path.exists() else None)
    if resume_from is not None:
        state = torch.load(resume_from, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
        if int(state.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
            log.warning("resuming with a different steps/epoch (%s -> %s): the schedule is rescaled",
                        state.get("steps_per_epoch"), steps_per_epoch)
        log.info("resumed from %s at step %d / %d", resume_from, start, total)

    train_model: torch.nn.Module = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    metrics = MetricsLog(out_dir / "metrics.csv", start) if is_main else None
    if is_main:
        OmegaConf.save(cfg, out_dir / "config.yaml", resolve=True)
        log.info("method=%s arch=%s device=%s world=%d bf16=%s channels_last=%s steps=%d (%d/epoch)",
                 cfg.get("method_name"), cfg.model.arch, device, world, use_bf16, use_cl, total, steps_per_epoch)

    if start < total:
        _run_steps(train_model, model, optimizer, cfg, urls, start, total, steps_per_epoch, device,
                   use_bf16, use_cl, metrics, rank, world, last_path)

    if is_main:
        atomic_save(_checkpoint(model, optimizer, total, total, steps_per_epoch, cfg, final=True), final_path)
        if last_path.exists():
            last_path.unlink()
        log.info("wrote %s", final_path)
    if dist.is_initialized():
        dist.barrier()
    return final_path


def _run_steps(train_model: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               cfg: DictConfig, urls: list[str], start: int, total: int, steps_per_epoch: int,
               device: torch.device, use_bf16: bool, use_cl: bool, metrics: MetricsLog | None, rank: int,
               world: int, last_path: Path) -> None:
    from tqdm import tqdm

    is_main = rank == 0
    batches = _batches(urls, cfg, start // steps_per_epoch, steps_per_epoch)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
    mf = torch.channels_last if use_cl else torch.contiguous_format
    window = {"n": 0, "imgs": 0, "t0": time.perf_counter(), "fallbacks": 0}
    sums: dict[str, float] = {}
    bar = tqdm(total=total, initial=start, desc="pretrain", disable=not (is_main and cfg.progress),
               dynamic_ncols=True)
    train_model.train()
    for step in range(start, total):
        batch = next(batches)
        lr = lr_at(step, total, steps_per_epoch, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views = [v.to(device, non_blocking=True).contiguous(memory_format=mf) for v in batch["views"]]
        epoch = step / steps_per_epoch
        with autocast:
            out = train_model(views, epoch=epoch)
        loss = out["loss"]
        if not torch.isfinite(loss.detach()):
            good = last_path if last_path.exists() else "none yet"
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {step}; training stopped. Last good checkpoint: {good}. "
                f"Lower optim.lr or check the data (see {Path(cfg.out_dir) / 'metrics.csv'}).")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        window["n"] += 1
        window["imgs"] += views[0].shape[0] * world
        window["fallbacks"] += int(batch["fallbacks"].sum())
        for k in ("loss", "loss_inst", "loss_nn", "pos_logit", "neg_logit"):
            sums[k] = sums.get(k, 0.0) + float(out[k].detach())
        done = step + 1
        bar.update(1)
        if is_main and (done % int(cfg.log_every) == 0 or done == total):
            dt = max(1e-9, time.perf_counter() - window["t0"])
            row = {k: v / window["n"] for k, v in sums.items()}
            row.update(step=done, epoch=round(done / steps_per_epoch, 4), lr=lr,
                       img_per_s=round(window["imgs"] / dt, 2), fallbacks=window["fallbacks"])
            assert metrics is not None
            metrics.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['img_per_s']:.0f}")
            log.info("step %d/%d epoch %.2f loss %.4f lr %.4g img/s %.1f", done, total, row["epoch"],
                     row["loss"], lr, row["img_per_s"])
            window.update(n=0, imgs=0, t0=time.perf_counter(), fallbacks=0)
            sums.clear()
        if is_main and done % int(cfg.ckpt_every) == 0 and done < total:
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise TrainingDiverged(
                    f"weights became NaN/inf by step {done}; the checkpoint was not overwritten "
                    f"({last_path if last_path.exists() else 'none yet'} is the last good one). Lower optim.lr.")
            atomic_save(_checkpoint(model, optimizer, done, total, steps_per_epoch, cfg, final=False), last_path)
    bar.close()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
