"""Pretraining app: one MoCo-family model per (dataset, variant), trained from webdataset shards.

Run as a Hydra app, e.g.::

    python -m study.train method=moco_v2 crop.max_iou=0.3 data.shards=results/data/coco/shards out_dir=...

or under ``torchrun --standalone --nproc_per_node=G`` for several GPUs (DDP). The public MoCo code is DDP-only,
fp32 and overwrites one checkpoint per epoch; this trainer also runs on a CPU, uses bf16 autocast and
channels_last where they help, checkpoints atomically every ``ckpt_every`` steps and resumes by itself.

Artefacts in ``out_dir``: ``checkpoint.pt`` (written once, at the end: Snakemake's output), ``last.pt`` (the
rolling resume point, removed at the end), ``metrics.csv``, ``config.yaml`` (resolved), ``train.log`` (this
attempt; earlier attempts are kept as ``train.log.1``, ``.2``, ...) and ``.lock``.

Run integrity (issue 10; the pieces live in ``study.runconfig`` and ``study.runstate``):

- *Exact resume.* ``last.pt`` holds the model (with the MoCo queue), the optimiser, every RNG of every rank at
  that step and at the start of the current epoch, and the partial metrics window. The loader re-seeds itself
  per (seed, rank, worker, epoch), so a resumed run re-creates the current epoch's stream from the epoch-start
  RNG (``DataLoader.__iter__`` draws the workers' base seed from it), drops the batches already trained, then
  restores the step's RNG: a run killed at any step ends byte-identical to an unbroken one (same processes,
  device and ``num_workers``). The price is re-decoding at most one epoch's consumed batches on resume.
- *Same run only.* Checkpoints store the resolved config and a fingerprint of it (without keys that cannot
  change the result, ``study.runconfig.NEUTRAL_KEYS``); another configuration's ``last.pt`` is refused with the
  differing keys, a truncated or foreign one with the file name, each with the command that moves it aside.
- *One trainer per folder.* ``cli`` takes ``<out_dir>/.lock`` (rank 0) before Hydra writes anything.
- *Good checkpoints only.* Parameters and buffers are checked for NaN/inf before every checkpoint, so the one a
  divergence message names is finite; a collapse guard flags runs stuck at the uniform-logit loss.
- *One-line errors.* ``cli`` validates the overrides and every value first (``study.runconfig.RULES``).

Time limits and preemption (issue 19): under ``main`` (the CLI), SIGTERM (SLURM's time limit, preemption,
torchrun passing it on) and SIGUSR1 (a ``--signal`` warning) let the current step finish; then every rank agrees
on that step, ``last.pt`` is written there by the periodic save's code (so the resume is exact) and the process
logs one line naming the signal, the step and the file, and exits with ``RETRY_EXIT`` (75, EX_TEMPFAIL) so that
Snakemake's ``retries`` reruns the job. A signal during the last step lets the run finish instead.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

HYDRA_HELP_FLAGS = ("--help", "-h", "--hydra-help")


def _help_only(cfg: DictConfig) -> None:  # pragma: no cover - Hydra prints the help and exits before a task
    raise AssertionError("Hydra runs no task with --help")


if __name__ == "__main__" and any(a in HYDRA_HELP_FLAGS for a in sys.argv[1:]):
    # `python -m study.train --help`: the same Hydra app (config path, name, job name) answers before torch loads
    hydra.main(config_path="conf", config_name="config", version_base=None)(_help_only)()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from data_prep.shards import ShardError, load_manifest, manifest_counts, verify_shards  # noqa: E402
from study.monitor import MONITOR_FIELDS, MonitorConfigError, OnlineMonitor, monitor_spec  # noqa: E402
from study.runconfig import (  # noqa: E402
    ConfigError,
    compose_config,
    config_diff,
    data_identity,
    fingerprint,
    validate_config,
)
from study.runstate import (  # noqa: E402
    RETRY_EXIT,
    UNWRITABLE,
    CollapseGuard,
    DiskWriteError,
    ResumeError,
    RunError,
    RunLocked,
    RunStopped,
    StopSignals,
    TrainingCollapsed,
    TrainingDiverged,
    acquire_run_lock,
    all_ranks,
    atomic_save,
    chance_loss,
    fail,
    from_rank0,
    gather_rng,
    load_resume_state,
    model_nonfinite,
    move_aside_cmd,
    restore_training_state,
    rng_state,
    rotate_log,
    set_rng_state,
    signal_name,
    write_failure,
)

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
    "iou_p50",
    "iou_p90",
    "iou_p99",
    "iou_max",
    "pos_logit",
    "neg_logit",
    "collapse",
    *MONITOR_FIELDS,
]
MONITORS = ("loss", "loss_inst", "loss_nn", "pos_logit", "neg_logit")
TRAIN_LOG = "train.log"  # Hydra's job log: ${hydra.run.dir}/${hydra.job.name}.log with run.dir=out_dir, name=train
# Ranks > 0 log to stdout only and write no .hydra/: the run folder belongs to rank 0, which holds its lock.
RANK_OVERRIDES = ["hydra/job_logging=stdout", "hydra.output_subdir=null"]

__all__ = ["DiskWriteError", "MetricsLog", "TrainingDiverged", "atomic_save", "cli", "lr_at", "read_manifest",
           "train"]  # fmt: skip


# ----------------------------------------------------------------------------------------------- helpers


def read_manifest(shard_dir: str | Path) -> tuple[list[str], int, list[str], str]:
    """Shard URLs, sample count, class list and data identity of one subset, from the data stage's manifest."""
    try:
        meta, tars = load_manifest(shard_dir)
    except FileNotFoundError as exc:
        raise RunError(f"data.shards={shard_dir}: {exc}") from None
    count = int(meta["totals"]["images"])
    if count == 0:
        raise RunError(f"{shard_dir}/manifest.json: the subset has no images; check the data stage's log for skips.")
    return [str(t) for t in tars], count, list(meta.get("classes", [])), data_identity(meta)


def base_lr(optim: Any, global_batch: int | None = None) -> float:
    """``optim.lr``, scaled by global_batch / ``optim.lr_scale_batch`` when that is set (MoCo's linear rule)."""
    base = float(optim.lr)
    ref = optim.get("lr_scale_batch") if hasattr(optim, "get") else None
    if ref and global_batch:
        base *= global_batch / float(ref)
    return base


def lr_at(step: int, total_steps: int, steps_per_epoch: int, optim: Any, global_batch: int | None = None) -> float:
    """Learning rate at a step: cosine (no warm-up, the paper's setting) or MoCo's step decay.

    ``optim.lr_scale_batch`` (absent or null: off) applies the linear scaling rule MoCo uses for its end-to-end
    runs with large batches (He et al. 2020, Sec 4.1; Goyal et al. 2017): lr * global_batch / lr_scale_batch.
    """
    base = base_lr(optim, global_batch)
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
            w = csv.DictWriter(fh, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)

    def append(self, row: dict[str, float]) -> None:
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=METRIC_FIELDS).writerow({k: row.get(k, "") for k in METRIC_FIELDS})


@dataclass
class Window:
    """Monitors summed since the last metrics row; saved in last.pt so a resumed row averages the same steps."""

    n: int = 0
    imgs: int = 0
    fallbacks: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    ious: list[float] = field(default_factory=list)  # realised key/query IoU of this rank's samples
    t0: float = field(default_factory=time.perf_counter)

    def reset(self) -> None:
        self.n = self.imgs = self.fallbacks = 0
        self.sums, self.ious = {}, []
        self.t0 = time.perf_counter()

    def iou_row(self) -> dict[str, float]:
        """p50/p90/p99/max of the window's key/query IoU: the ceiling as realised, next to ``fallbacks``."""
        if not self.ious:
            return {}
        q = np.quantile(np.asarray(self.ious), [0.5, 0.9, 0.99, 1.0])
        return {k: round(float(v), 5) for k, v in zip(("iou_p50", "iou_p90", "iou_p99", "iou_max"), q, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "imgs": self.imgs, "fallbacks": self.fallbacks, "sums": dict(self.sums),
                "ious": list(self.ious)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.imgs, self.fallbacks = int(state["n"]), int(state["imgs"]), int(state["fallbacks"])
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.ious = [float(v) for v in state.get("ious", [])]  # absent in checkpoints of older trainers


IOU_BINS = 10_000
CROP_IOU_FILE = "crop_iou.json"


@dataclass
class IouRecord:
    """Realised key/query IoU over the whole run (this rank's samples): histogram, exact max, fallback count.

    Written to ``crop_iou.json`` and the final checkpoint (``run_state.crop_iou``) so that Figs 2-3 can show
    the ceiling as realised rather than as configured. A fixed 10^4-bin histogram keeps it small at any run
    length and survives resume in ``last.pt``; its quantiles are bin upper edges (capped at the exact max),
    so they err high by < 1e-4 and never hide a breach of the ceiling.
    """

    counts: np.ndarray = field(default_factory=lambda: np.zeros(IOU_BINS, dtype=np.int64))
    max: float = 0.0
    fallbacks: int = 0

    def add(self, iou: np.ndarray, fallbacks: int) -> None:
        if iou.size:
            self.counts += np.bincount(np.minimum((iou * IOU_BINS).astype(np.int64), IOU_BINS - 1),
                                       minlength=IOU_BINS)
            self.max = max(self.max, float(iou.max()))
        self.fallbacks += int(fallbacks)

    def summary(self, max_iou: float) -> dict[str, Any]:
        n = int(self.counts.sum())
        out: dict[str, Any] = {"max_iou": max_iou, "pairs": n, "fallbacks": self.fallbacks,
                               "fallback_rate": self.fallbacks / n if n else 0.0, "iou_max": self.max}
        cum = np.cumsum(self.counts)
        for name, q in (("iou_p50", 0.5), ("iou_p90", 0.9), ("iou_p99", 0.99)):
            k = int(np.searchsorted(cum, max(1, math.ceil(q * n)))) if n else 0
            out[name] = min((k + 1) / IOU_BINS, self.max) if n else 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.tolist(), "max": self.max, "fallbacks": self.fallbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = np.asarray(state["counts"], dtype=np.int64)
        self.max, self.fallbacks = float(state["max"]), int(state["fallbacks"])


def _pick_device(cfg: DictConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu.")
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


@dataclass(frozen=True)
class RunId:
    """What a checkpoint must match to be resumed by this run."""

    config: dict[str, Any]
    fingerprint: str
    data_id: str | None
    world: int


def _checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, total: int,
                steps_per_epoch: int, cfg: DictConfig, final: bool, run: RunId,
                rng: list[dict[str, Any]] | None = None, run_state: dict[str, Any] | None = None) -> dict[str, Any]:
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
        config=run.config,
        fingerprint=run.fingerprint,
        data_id=run.data_id,
        world=run.world,
        global_batch=int(cfg.batch_size) * run.world,  # what the lr below was applied to
        base_lr=base_lr(cfg.optim, int(cfg.batch_size) * run.world),  # before warm-up and decay
        final=final,
        torch_rng=torch.get_rng_state(),
        rng=rng or [],
        run_state=run_state or {},
    )
    return state


class BatchStream:
    """Endless batches, one loader epoch of ``steps_per_epoch`` batches after another.

    The loader re-seeds itself per (seed, rank, worker, epoch), so any epoch's stream can be re-created; the
    global RNG state at each epoch start is kept (``epoch_rng``) because ``DataLoader.__iter__`` draws the
    workers' base seed from it.
    """

    def __init__(self, urls: list[str], cfg: DictConfig, start_epoch: int, steps_per_epoch: int) -> None:
        from study.data import make_loader

        self.urls = urls
        self.loader = make_loader(
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
            render=str(cfg.data.get("render", "pil")),  # batched: colour on the device in _run_steps
            decode=str(cfg.data.get("decode", "cpu")),  # device: JPEG decode + crop on the device too
            expected_counts=manifest_counts(cfg.data.shards),  # a shard yielding fewer samples stops the run
        )
        self.it: Any = None
        self.n = 0
        self.epoch_rng: dict[str, Any] | None = None

    def __next__(self) -> dict[str, Any]:
        while True:
            if self.it is None:
                self.epoch_rng = rng_state()
                self.it, self.n = iter(self.loader), 0
            try:
                batch = next(self.it)
            except StopIteration:
                if self.n == 0:
                    raise RunError(f"the loader over {self.urls[:2]}... yielded no batch; is batch_size larger than "
                                   "what each reader gets from the shards?") from None
                self.it = None
                continue
            self.n += 1
            return batch

    def fast_forward(self, epoch_rng: dict[str, Any] | None, skip: int) -> None:
        """Re-create the current epoch as the unbroken run drew it and drop its first ``skip`` batches."""
        if epoch_rng is not None:
            set_rng_state(epoch_rng)
        for _ in range(skip):
            next(self)


# ------------------------------------------------------------------------------------------------ resume


def _board(out_dir: Path, start: int) -> Any:
    """TensorBoard writer on ``<out_dir>/tb`` (``tensorboard --logdir results/pretrain``); events after ``start``
    from an interrupted attempt are purged so a resumed curve has no duplicates. None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # an optional extra: metrics.csv holds the same numbers
        log.info("tensorboard is not installed: metrics go to metrics.csv only")
        return None
    return SummaryWriter(str(out_dir / "tb"), purge_step=start)


def _board_row(board: Any, row: dict[str, Any]) -> None:
    if board is None:
        return
    for k, v in row.items():
        if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
            group = "monitor" if k.startswith("mon_") else "train"
            board.add_scalar(f"{group}/{k}", v, int(row["step"]))
    board.flush()


def _warn_changes(state: dict[str, Any], run: RunId, steps_per_epoch: int) -> None:
    changed = config_diff(state["config"], run.config, keys="execution")
    if int(state.get("world", run.world)) != run.world:
        changed.append(f"processes: {state.get('world')} -> {run.world}")
    if changed:
        log.warning("resuming with changed execution settings (%s): the run continues, but is not byte-identical "
                    "to an unbroken one", "; ".join(changed))
    if int(state.get("steps_per_epoch", steps_per_epoch)) != steps_per_epoch:
        log.warning("resuming with a different steps/epoch (%s -> %s): the schedule is rescaled",
                    state.get("steps_per_epoch"), steps_per_epoch)


# ------------------------------------------------------------------------------------------------- train


def train(cfg: DictConfig, stop: StopSignals | None = None) -> Path:
    """Train (or resume) one model; returns the final checkpoint path.

    ``stop``: the CLI's signal flag; when it is raised the run saves ``last.pt`` at the next step boundary and
    raises ``RunStopped``.
    """
    from study.mechanisms import build_model

    rank, world, local_rank = _init_distributed()
    validate_config(cfg, world=world)
    out_dir = Path(cfg.out_dir)
    is_main = rank == 0
    final_path, last_path = out_dir / "checkpoint.pt", out_dir / "last.pt"
    if is_main:
        acquire_run_lock(out_dir)
        for stale in (final_path, last_path):  # a temp file of a write that was killed; ours now (we hold the lock)
            stale.with_name(stale.name + ".tmp").unlink(missing_ok=True)
    device = _pick_device(cfg, local_rank)

    torch.manual_seed(int(cfg.seed) + rank)
    training = not cfg.get("random_init", False)
    data_id = None
    if training:
        # every shard against its manifest before any step (rank 0 also hashes what it has not verified yet)
        report = verify_shards(cfg.data.shards, full=None if is_main else False)
        if is_main:
            log.info("%s", report.summary())
        urls, count, _classes, data_id = read_manifest(cfg.data.shards)
        global_batch = int(cfg.batch_size) * world
        if count < global_batch:
            raise ConfigError(f"batch_size={cfg.batch_size} x {world} process(es) exceeds the {count} images of "
                              f"{cfg.data.shards}; lower batch_size.")
        steps_per_epoch = count // global_batch
    else:
        urls, steps_per_epoch, count = [], 1, 0
    total = int(cfg.epochs) * steps_per_epoch if training else 0
    if cfg.max_steps is not None:
        total = min(total, int(cfg.max_steps))
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    run = RunId(config, fingerprint(config, data_id), data_id, world)

    resume_from = last_path if last_path.exists() else (final_path if final_path.exists() else None)
    resume = load_resume_state(resume_from, config, data_id) if resume_from is not None else None

    model = build_model(cfg, n_samples=count if training else 0).to(device)
    use_cl = cfg.channels_last is True or (cfg.channels_last == "auto" and device.type == "cuda")
    if use_cl:
        model = model.to(memory_format=torch.channels_last)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=float(cfg.optim.lr), momentum=float(cfg.optim.momentum),
                                weight_decay=float(cfg.optim.weight_decay))

    start = 0
    if resume is not None:
        assert resume_from is not None
        restore_training_state(resume, model, optimizer, resume_from)
        start = int(resume["step"])
        if start > total:
            raise ResumeError(f"{resume_from} is at step {start}, beyond this run's {total} steps (the number of "
                              f"processes changed?); move it aside to start fresh: {move_aside_cmd(resume_from, '.old')}")
        _warn_changes(resume, run, steps_per_epoch)
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
        log.info("method=%s arch=%s device=%s world=%d bf16=%s channels_last=%s steps=%d (%d/epoch) global batch=%d "
                 "lr=%g fingerprint=%s", cfg.get("method_name"), cfg.model.arch, device, world, use_bf16, use_cl, total,
                 steps_per_epoch, int(cfg.batch_size) * world, base_lr(cfg.optim, int(cfg.batch_size) * world),
                 run.fingerprint)  # fmt: skip

    last_good = start if resume_from == last_path else None
    if start < total:
        last_good = _run_steps(train_model, model, optimizer, cfg, urls, start, total, steps_per_epoch, device,
                               use_bf16, use_cl, metrics, rank, world, last_path, run, resume, last_good, stop)

    nonfinite = model_nonfinite(model)
    if not all_ranks(not nonfinite, world, device):
        raise TrainingDiverged(_diverged(f"weights/buffers became NaN/inf by step {total} ({', '.join(nonfinite[:3])})"
                                         f" and {final_path.name} was not written", cfg, last_path, last_good))
    if is_main:
        crop_iou = out_dir / CROP_IOU_FILE  # realised IoU ceiling, written by _run_steps
        atomic_save(_checkpoint(model, optimizer, total, total, steps_per_epoch, cfg, final=True, run=run,
                                run_state={"crop_iou": json.loads(crop_iou.read_text())} if crop_iou.exists()
                                else None), final_path)
        if last_path.exists():
            last_path.unlink()
        log.info("wrote %s", final_path)
    if dist.is_initialized():
        dist.barrier()
    return final_path


def _diverged(what: str, cfg: DictConfig, last_path: Path, last_good: int | None) -> str:
    good = (f"Last good checkpoint: {last_path} (step {last_good}; every weight, BatchNorm statistic and the queue "
            "finite)." if last_good is not None else "No checkpoint was written before.")
    retry = (f" A lower rate is another configuration, so move the resume point aside first: "
             f"{move_aside_cmd(last_path, '.diverged')}" if last_good is not None else "")
    return (f"{what}: training stopped (NaN/inf). {good} Lower optim.lr (now {cfg.optim.lr}) or check the data "
            f"(see {Path(cfg.out_dir) / 'metrics.csv'}).{retry}")


def _negatives(cfg: DictConfig, epoch: float, world: int = 1) -> int:
    """Negatives per query of the InfoNCE term: the queue (or bank draw) plus MoCHi's synthetic ones once MoCHi
    is on; end-to-end: the other samples of the global batch."""
    if cfg.get("mechanism", "queue") == "end_to_end":
        return int(cfg.batch_size) * world - 1
    n = int(cfg.moco.K)
    if cfg.mochi.get("enabled", False) and epoch >= float(cfg.mochi.get("warmup_epochs", 0) or 0):
        n += int(cfg.mochi.s) + int(cfg.mochi.s_prime)
    return n


def _run_steps(train_model: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               cfg: DictConfig, urls: list[str], start: int, total: int, steps_per_epoch: int,
               device: torch.device, use_bf16: bool, use_cl: bool, metrics: MetricsLog | None, rank: int,
               world: int, last_path: Path, run: RunId, resume: dict[str, Any] | None,
               last_good: int | None, stop: StopSignals | None = None) -> int | None:
    """Steps ``start`` .. ``total - 1``; returns the step of the last checkpoint written (or resumed).

    A raised ``stop`` flag is read before each step's batch is fetched, so the stop falls between two steps:
    ``last.pt`` is saved there (unless it already holds that step) and ``RunStopped`` is raised.
    """
    from tqdm import tqdm

    is_main = rank == 0
    stream = BatchStream(urls, cfg, start // steps_per_epoch, steps_per_epoch)
    window, ious = Window(), IouRecord()
    wall = 0.0  # training wall seconds before this process (monitors excluded): Fig 5's x axis
    g = cfg.guard
    guard = CollapseGuard(rows=int(g.collapse_rows), gap=float(g.collapse_gap), loss_rtol=float(g.collapse_loss_rtol),
                          min_step=math.ceil(int(cfg.moco.K) / (int(cfg.batch_size) * world))
                          if cfg.get("mechanism", "queue") == "queue" else 1)
    if resume is not None:
        run_state = resume.get("run_state") or {}
        if "window" in run_state:
            window.load_state_dict(run_state["window"])
        if "crop_iou" in run_state:
            ious.load_state_dict(run_state["crop_iou"])
        if "guard" in run_state:
            guard.load_state_dict(run_state["guard"])
        wall = float(run_state.get("wall_s", 0.0))
        rngs = resume.get("rng") or []
        skip = start % steps_per_epoch
        exact = len(rngs) == world
        t0 = time.perf_counter()
        stream.fast_forward(rngs[rank]["epoch_start"] if exact else None, skip)
        if exact:
            set_rng_state(rngs[rank]["step"])
        else:
            held = f"the RNG state of {len(rngs)} process(es)" if rngs else "no RNG state (an older trainer wrote it)"
            log.warning("%s holds %s, this run has %d process(es): it continues, but not byte-identical to an "
                        "unbroken run", last_path.name, held, world)
        if skip:
            log.info("skipped the %d batches of epoch %d trained before the resume point (%.1f s)", skip,
                     start // steps_per_epoch, time.perf_counter() - t0)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
    mf = torch.channels_last if use_cl else torch.contiguous_format
    bar = tqdm(total=total, initial=start, desc="pretrain", disable=not (is_main and cfg.progress),
               dynamic_ncols=True)
    spec = monitor_spec(cfg)
    monitor = OnlineMonitor(spec, cfg.crop, cfg.aug, device) if (spec is not None and is_main) else None
    board = _board(Path(cfg.out_dir), start) if is_main else None
    if monitor is not None and start == 0:  # the curve starts at the initial weights
        first = {"step": 0, "epoch": 0.0, "wall_s": 0.0, **monitor(model, use_cl)}
        assert metrics is not None
        metrics.append(first)
        _board_row(board, first)
    train_model.train()
    t_wall = time.perf_counter()
    from study.colour import BatchColour, device_views  # data.render: batched -> colour per step on `device`
    ds = stream.loader.dataset
    colour = BatchColour(cfg.aug, ds.sizes) if ds.render == "batched" else None

    def save_last(done: int, before: tuple[dict[str, Any], dict[str, Any] | None] | None = None) -> None:
        """``last.pt`` at ``done`` steps: the periodic save and a stop signal's save are this one code path, at
        the same point between steps (every rank's RNG as the next step will draw it), so both resume exactly.
        ``before``: (step RNG, epoch-start RNG) captured before the batch fetch of step ``done``."""
        step_rng, epoch_rng = before if before is not None else (None, stream.epoch_rng)
        rngs = gather_rng(epoch_rng, world, step_rng)
        nonfinite = model_nonfinite(model)
        if not all_ranks(not nonfinite, world, device):
            raise TrainingDiverged(_diverged(
                f"weights/buffers became NaN/inf by step {done} ({', '.join(nonfinite[:3]) or 'on another rank'})"
                f" and {last_path.name} was not overwritten", cfg, last_path, last_good))
        if is_main:
            state = _checkpoint(model, optimizer, done, total, steps_per_epoch, cfg, final=False, run=run,
                                rng=rngs, run_state={"window": window.state_dict(), "guard": guard.state_dict(),
                                                     "crop_iou": ious.state_dict(),
                                                     "wall_s": wall + time.perf_counter() - t_wall})
            atomic_save(state, last_path)

    for step in range(start, total):
        # the CLI path: the RNG as the step starts (a new epoch's iter() draws from it), then the batch, then the
        # ranks agree on a stop (the fetch may fail by it: SLURM signals the DataLoader workers too)
        before = (rng_state(), stream.epoch_rng) if stop is not None else None
        try:
            batch, fetch_error = next(stream), None
        except Exception as exc:
            if stop is None or not (stop.received or world > 1):
                raise
            batch, fetch_error = None, exc
        if stop is not None:
            sig, failed = stop.agreed(world, device, failed=fetch_error is not None)
            if sig:
                if last_good != step:
                    save_last(step, before)
                    last_good = step
                bar.close()
                if board is not None:
                    board.close()
                if world > 1:
                    dist.barrier()  # rank 0's last.pt is complete before any rank exits (torchrun ends the rest)
                raise RunStopped(f"received {signal_name(sig)} at step {step}/{total}: the resume state "
                                 f"{last_path} holds step {step}; exiting with status {RETRY_EXIT} so that the job "
                                 "is retried and resumes from there")
            if fetch_error is not None:
                raise fetch_error
            if failed:
                raise RunError(f"the data loader of another rank failed at step {step + 1} (its error is above); "
                               f"the run stopped on every rank, {last_path.name} is untouched")
        lr = lr_at(step, total, steps_per_epoch, cfg.optim, int(cfg.batch_size) * world)
        for group in optimizer.param_groups:
            group["lr"] = lr
        views = device_views(batch, device, mf, colour, int(cfg.seed), step, rank)
        epoch = step / steps_per_epoch
        with autocast:
            # labels: read only by mochi.oracle (drops same-class negatives); -1 where a shard has no class
            # index: the samples' manifest positions, read only by the memory bank
            out = train_model(views, epoch=epoch, labels=batch["label"].to(device, non_blocking=True),
                              index=batch["index"].to(device, non_blocking=True))
        loss = out["loss"]
        if not all_ranks(bool(torch.isfinite(loss.detach()).all()), world, device):
            where = " on this or another rank" if world > 1 else ""
            raise TrainingDiverged(_diverged(f"loss is {loss.item()} at step {step + 1}{where}", cfg, last_path,
                                             last_good))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        window.n += 1
        window.imgs += views[0].shape[0] * world
        window.fallbacks += int(batch["fallbacks"].sum())
        if "iou" in batch:
            window.ious += batch["iou"].tolist()
            ious.add(batch["iou"].numpy(), int(batch["fallbacks"].sum()))
        for k in MONITORS:
            window.sums[k] = window.sums.get(k, 0.0) + float(out[k].detach())
        done = step + 1
        bar.update(1)
        if done % int(cfg.log_every) == 0 or done == total:
            dt = max(1e-9, time.perf_counter() - window.t0)
            row: dict[str, Any] = {k: v / window.n for k, v in window.sums.items()}
            row.update(step=done, epoch=round(done / steps_per_epoch, 4), lr=lr,
                       img_per_s=round(window.imgs / dt, 2), fallbacks=window.fallbacks, **window.iou_row())
            wall += time.perf_counter() - t_wall
            row["wall_s"] = round(wall, 3)
            if monitor is not None and (done % spec.every == 0 or done == total):
                row.update(monitor(model, use_cl))
            chance = chance_loss(_negatives(cfg, epoch, world))
            collapsed = guard.update(done, row["loss_inst"], row["pos_logit"], row["neg_logit"], chance)
            row["collapse"] = int(collapsed)
            if is_main:
                assert metrics is not None
                metrics.append(row)
                _board_row(board, row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", img_s=f"{row['img_per_s']:.0f}")
                log.info("step %d/%d epoch %.2f loss %.4f lr %.4g img/s %.1f%s", done, total, row["epoch"],
                         row["loss"], lr, row["img_per_s"],
                         f" kNN {row['mon_knn_top1']:.1f}% view-match {row['mon_view_top1']:.1f}%"
                         if "mon_knn_top1" in row else "")
            window.reset()
            t_wall = time.perf_counter()
            if collapsed:
                what = (f"training collapsed: since step {guard.since} loss_inst is within "
                        f"{guard.loss_rtol:.0%} of ln(1 + {_negatives(cfg, epoch, world)} negatives) = {chance:.4f} (uniform "
                        f"logits) and |pos_logit - neg_logit| < {guard.gap:g} for {guard.streak} logged rows up to "
                        f"step {done}: every image gets nearly the same embedding")
                if not guard.warned and is_main:
                    log.warning("%s. Lower optim.lr (now %s); guard.stop_on_collapse=true stops such runs.", what,
                                cfg.optim.lr)
                guard.warned = True
                if from_rank0(bool(g.stop_on_collapse), world, device):
                    aside = (f" after moving the resume point aside: {move_aside_cmd(last_path, '.collapsed')}"
                             if last_good is not None else "")
                    raise TrainingCollapsed(f"{what}; stopped (guard.stop_on_collapse=true). Rerun with a lower "
                                            f"optim.lr (now {cfg.optim.lr}){aside}")
        if done % int(cfg.ckpt_every) == 0 and done < total:
            save_last(done)
            last_good = done
    bar.close()
    if stop is not None and stop.received and is_main:
        log.info("received %s during the last step: finishing the run instead of stopping",
                 signal_name(stop.received))
    if board is not None:
        board.close()
    if is_main:
        record = ious.summary(float(cfg.crop.max_iou))
        (Path(cfg.out_dir) / CROP_IOU_FILE).write_text(json.dumps(record, indent=1) + "\n")
        log.info("crop IoU (key/query, %d pairs): p50 %.4f p90 %.4f p99 %.4f max %.4f, %d fallbacks (ceiling %g)",
                 record["pairs"], record["iou_p50"], record["iou_p90"], record["iou_p99"], record["iou_max"],
                 record["fallbacks"], record["max_iou"])
    return last_good


# ---------------------------------------------------------------------------------------------- entry


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message already names the file or key and the fix: printed as one line."""
    from study.augment import AugConfigError
    from study.crops import CropConfigError
    from study.moco import MoCoConfigError
    from study.models import CheckpointError

    return (RunError, MoCoConfigError, CropConfigError, AugConfigError, CheckpointError, ShardError,
            MonitorConfigError)


def _log_to_file(message: str) -> None:
    """Put the error into train.log too (the console already gets it on stderr)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        with StopSignals() as stop:  # the run path only: importing or calling train() installs no handler
            train(cfg, stop)
    except RunStopped as exc:  # not an error: one line in train.log, then the retry status
        if int(os.environ.get("RANK", "0")) == 0:
            log.warning("%s", exc)
        raise SystemExit(exc.exit_code) from None
    except OSError as exc:  # metrics.csv, config.yaml: a full or read-only disk is the user's to fix too
        if exc.errno not in UNWRITABLE:
            raise
        err = DiskWriteError(write_failure(Path(exc.filename or cfg.out_dir), exc))
        _log_to_file(str(err))
        fail(err)
    except _user_errors() as exc:
        if not isinstance(exc, RunLocked):  # the folder's train.log belongs to the other trainer
            _log_to_file(" ".join(str(exc).split()))
        fail(exc)


def cli(argv: Sequence[str] | None = None) -> None:
    """Entry point: check the overrides and every value, take the run folder's lock, then start the Hydra app.

    Doing this before Hydra starts means a typo, a bad value or a busy folder stops with one line and leaves
    nothing behind (Hydra first creates the folder, ``.hydra/`` and ``train.log``). Hydra's own modes (``--help``,
    ``--cfg``, ``-m``) skip the checks; ``train`` repeats the value checks and the lock anyway.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("-") for a in args):
        try:
            cfg = compose_config(args)
            validate_config(cfg)
            out_dir = Path(cfg.out_dir)
            if int(os.environ.get("RANK", "0")) == 0:
                acquire_run_lock(out_dir)
                rotate_log(out_dir / TRAIN_LOG)
            else:
                args += RANK_OVERRIDES
        except RunError as exc:
            fail(exc)
        except OSError as exc:  # e.g. train.log cannot be renamed on a read-only folder
            if exc.errno not in UNWRITABLE:
                raise
            fail(DiskWriteError(write_failure(Path(exc.filename or "."), exc)))
    sys.argv = [sys.argv[0], *args]
    main()


if __name__ == "__main__":
    cli()
