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
over); an unreadable one is moved aside to ``state.pt.corrupt`` and the run starts from step 0. The state also
holds every rank's global RNG (torch CPU, CUDA, numpy, python), saved between two steps and restored at the same
point, because torchvision's RPN / RoI samplers and multi-scale resize draw from the global torch RNG: without
it a resumed detection run drew other proposals than an unbroken one. Under DDP rank 0 alone reads, judges and
(if damaged) moves ``state.pt`` aside, and every rank follows its verdict.

Under ``main`` (the CLI), SIGTERM (SLURM's time limit, preemption, torchrun passing it on) and SIGUSR1 let the
current step finish; every rank agrees on that step, ``state.pt`` is saved there by the periodic save's code, one
line names the signal, the step and the file, and the process exits with ``study.runstate.RETRY_EXIT`` (75) so
that Snakemake's ``retries`` reruns the job, which resumes exactly. A signal after the last step stops before
the test (the rerun only tests).

The result JSON has the same fields as ``analysis.transfer``'s, so the tables read it the same way. On a CPU-only
config no job runs this CLI: the checkpoint's transfer job calls ``finetune`` with the state directory this job
would use (``analysis.target_settings.runs_alone``; ``analysis.transfer --training-json``), after its other
targets; ``seed_globals`` makes the numbers independent of what ran before in the process.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    """The command line, defined above the torch imports: ``--help`` and usage errors cost no torch."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--name", required=True, help="target key")
    ap.add_argument("--target-json", required=True, help="the target's config entry as a JSON object")
    ap.add_argument("--out", required=True, type=Path, help="result JSON")
    ap.add_argument("--state-dir", type=Path, default=None, help="resumable state (default: <out>.state/)")
    ap.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda when available)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


if __name__ == "__main__":  # `python -m analysis.finetune`: answer --help / usage errors before torch loads
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from analysis import target_settings  # noqa: E402
from analysis.features import file_sha256  # noqa: E402
from analysis.finetune_tasks import TASKS, Task  # noqa: E402
from analysis.targets import TargetError  # noqa: E402
from analysis.transfer import write_json_atomic  # noqa: E402
from study.models import load_backbone  # noqa: E402
from study.runstate import (  # noqa: E402
    RETRY_EXIT,
    RunStopped,
    StopSignals,
    agree_on_state,
    atomic_save,
    first_line,
    gather_rng,
    rng_state,
    set_rng_state,
    signal_name,
)

log = logging.getLogger("analysis.finetune")

# The target keys, their defaults (the paper-scale recipes), types and ranges live in analysis.target_settings
# (shared with the plan); these names stay for the callers that read them from here.
COMMON_DEFAULTS = target_settings.FINETUNE_COMMON
PROTOCOL_DEFAULTS = target_settings.FINETUNE_DEFAULTS


def resolve_settings(cfg: Mapping[str, Any], name: str = "?") -> dict[str, Any]:
    """Protocol defaults overridden by the target config; unknown keys, missing input sizes and values out of
    range raise ``TargetSpecError`` (one line each, see ``analysis.target_settings``)."""
    if cfg.get("protocol") not in PROTOCOL_DEFAULTS:
        raise TargetError(f"fine-tuning protocol {cfg.get('protocol')!r} is unknown; choose one of "
                          f"{sorted(PROTOCOL_DEFAULTS)}")  # fmt: skip
    return target_settings.resolve(name, cfg)[0]


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


def seed_globals(seed: int) -> None:
    """Seed every global RNG a run draws from (torch CPU and CUDA, numpy, python): the run then draws the same
    numbers in a fresh process and in one that ran other targets first (a CPU config's batched transfer job,
    analysis.transfer ``--training-json``). A resumed run then restores the saved state over these."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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
    on_step: Callable[[int, torch.nn.Module], None] | None = None, stop: StopSignals | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune ``checkpoint`` on target ``name`` and evaluate it; returns the result record (the caller
    writes rank 0's). ``on_step(steps done, model)`` runs after each step (tests use it to stop a run);
    ``stop`` is the CLI's signal flag: once raised the run saves its state at the next step boundary and raises
    ``RunStopped``."""
    t0 = time.time()
    s = resolve_settings(cfg, name)
    defaulted = target_settings.resolve(name, cfg)[1]
    rank, world, local_rank = _init_distributed()
    dev = torch.device(device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    seed_globals(int(s["seed"]))  # the heads' initialisation, the loader's base seed, detection's samplers
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
    saved: int | None = None  # the step state.pt holds
    resume_rng: dict[str, Any] | None = None
    if state_path is not None:
        state = agree_on_state(state_path, lambda: _load_state(state_path, fp), rank, world, dev, TargetError)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = saved = int(state["step"])
            last = float(state.get("loss", float("nan")))
            rngs = state.get("rng") or []
            if len(rngs) == world:
                resume_rng = rngs[rank]
            elif rank == 0:
                log.warning("%s holds no RNG state (an older version wrote it): the run continues, but detection's "
                            "samplers draw differently from an unbroken run", state_path)
            if rank == 0:
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

    def save(done: int, step_rng: dict[str, Any] | None = None) -> None:
        """state.pt at ``done`` steps: the periodic save and a stop signal's save are this one call, made
        between two steps, with every rank's RNG as the next step will draw it (``step_rng``: captured there)."""
        assert state_path is not None
        rngs = [r["step"] for r in gather_rng(None, world, step_rng)]  # a collective: every rank calls save()
        if rank == 0:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save({"step": done, "fingerprint": fp, "model": model.state_dict(),
                         "optimizer": opt.state_dict(), "loss": last, "rng": rngs}, state_path)  # fmt: skip

    def stop_at(sig: int, step: int, step_rng: dict[str, Any] | None = None) -> None:
        if state_path is not None and saved != step:
            save(step, step_rng)
        bar.close()
        if world > 1:
            dist.barrier()  # rank 0's state.pt is complete before any rank exits (torchrun then ends the rest)
        where = (f"the resume state {state_path} holds step {step}" if state_path is not None
                 else "no state is kept (no state_dir)")  # fmt: skip
        raise RunStopped(f"target {name}: received {signal_name(sig)} at step {step}/{total}: {where}; exiting "
                         f"with status {RETRY_EXIT} so that the job is retried and resumes from there")

    batches = iter(loader)  # draws the loader's base seed from the global RNG, as the unbroken run did at step 0
    if resume_rng is not None:
        set_rng_state(resume_rng)  # the RNG as the unbroken run left it after step `start - 1`
    for step in range(start, total):
        # the CLI path: the RNG as the step starts, then the batch, then the ranks agree on a stop (the fetch may
        # fail by it: SLURM signals DataLoader workers too)
        before = rng_state() if stop is not None else None
        try:
            items, fetch_error = next(batches), None
        except Exception as exc:
            if stop is None or not (stop.received or world > 1):
                raise
            items, fetch_error = None, exc
        if stop is not None:
            sig, failed = stop.agreed(world, dev, failed=fetch_error is not None)
            if sig:
                stop_at(sig, step, before)
            if fetch_error is not None:
                raise fetch_error
            if failed:
                raise TargetError(f"target {name!r}: the data loader of another rank failed at step {step} (its "
                                  "error is above)")
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
        if state_path is not None and (done % int(s["save_every"]) == 0 or done == total):
            save(done)
            saved = done
        if on_step is not None:
            on_step(done, model)
    sig = stop.agreed(world, dev)[0] if stop is not None else 0
    if sig:  # the test can take long (VOC07: 4952 images); the rerun resumes at `total` and only tests
        stop_at(sig, total)
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
        "defaulted": defaulted,  # setting keys the target left to the protocol's documented defaults
        "final_loss": last, "resumed_from_step": start, "seconds": round(time.time() - t0, 3),
        "checkpoint": str(checkpoint), "checkpoint_sha256": sha, "arch": info.get("arch"), "device": str(dev),
        "n_train": n_train, "n_test": len(task.test),
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
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
        with StopSignals() as stop:  # the run path only: importing or calling finetune() installs no handler
            result = finetune(args.checkpoint, args.name, cfg, state_dir=state_dir, device=args.device,
                              progress=not args.no_progress, stop=stop)  # fmt: skip
    except RunStopped as exc:  # not an error: one line, then the retry status
        if int(os.environ.get("RANK", "0") or 0) == 0:
            log.warning("%s", exc)
        if dist.is_initialized():
            dist.destroy_process_group()
        return exc.exit_code
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
