"""MoCo's ImageNet linear-classification recipe (target key ``recipe: moco_sgd``), beside the L-BFGS probe.

The L-BFGS probe of ``analysis.protocols`` fits cached centre-crop features; MoCo's recipe (facebookresearch/moco
``main_lincls.py``, REFERENCE.md "Linear protocol (ImageNet)") trains an fc layer on the avgpool features of the
frozen backbone *in eval mode* with SGD (momentum 0.9, lr 30, wd 0, batch 256, 100 epochs, lr x0.1 at epochs 60
and 80; fc initialised N(0, 0.01), bias 0) on RandomResizedCrop(224) + flip views, and tests on Resize 256 ->
CenterCrop 224. The train views are re-drawn every epoch, so features cannot be cached: the frozen backbone runs
on every batch. Eval mode matters: BN in train mode would rewrite its running statistics, which are part of the
pretrained model (``main_lincls.py``'s sanity check).

The reported metric is the final epoch's (MoCo's script prints the best over epochs, which selects on the test
split); every setting, the per-epoch learning rate included, is echoed into the result's ``settings``.

What makes 100 epochs over ImageNet feasible on a cluster (issue 19), following ``main_lincls.py``:

- *DDP.* Under torchrun (``WORLD_SIZE`` > 1; nccl on CUDA, gloo on CPU) the fc layer is wrapped in DDP and each
  epoch's images are split over the processes like DistributedSampler, but as a split of one global order
  (``EpochBatches``, the pattern of ``analysis.finetune.StepBatches``): epoch e's order is a permutation drawn from
  (seed, e) alone, global step k takes its positions k*B..(k+1)*B - 1 and rank r the slots r::world of those. The
  global batch stays ``batch_size`` (batch_size / world per process; it must divide). Each rank's loss is the sum
  over its images x world / (images in the global step), so DDP's averaged gradient is the global batch's
  mean-loss gradient even for a last batch that does not split evenly (a rank may then get no image). The 1- and
  2-process runs therefore take the same steps on the same views and differ by float rounding only (a gradient
  summed in two halves and all-reduced is not bit-equal to one summed at once). Rank 0 alone evaluates; the other
  ranks receive its result.
- *Views that depend on (seed, epoch, image) only.* The view of image i in epoch e is drawn by torchvision's
  RandomResizedCrop + flip from torch's CPU generator seeded with (seed, e, i) for that one call
  (``EpochViews``), so any number of decode workers (``num_workers``, the rule passes the job's CPUs per process)
  gives the same views, and the loop draws from no global RNG at all (the fc initialisation uses its own seeded
  generator): (epoch, step) is the whole RNG state a resume needs, whatever process or worker drew a view.
- *Resume.* With ``state_path``, the fc layer, the optimiser (momentum), the next (epoch, step), the losses so far
  and every rank's partial loss sums are saved atomically after every epoch, with a fingerprint of (checkpoint
  sha256, target, every setting but ``num_workers``, world size, the train split's items). A rerun resumes there
  and ends with exactly the weights and metrics of an unbroken run; a state of other settings is refused with the
  ``rm`` that clears it; an unreadable one is moved to ``state.pt.corrupt`` (rank 0 decides, every rank follows)
  and the run starts over with one warning.
- *Signals.* With ``stop`` (the CLI's ``study.runstate.StopSignals``), SIGTERM / SIGUSR1 let the current step
  finish; the ranks agree on the step, the state is saved there (mid-epoch: with the step within the epoch, so the
  rerun continues with the next batch of the same order and views) and ``RunStopped`` (exit status
  ``RETRY_EXIT``) is raised for the CLI to log in one line.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms as T

from analysis import metrics
from analysis.target_settings import LBFGS_KEYS, MOCO_SGD_DEFAULTS, RECIPES, TargetError  # noqa: F401 (re-exported)
from study.runstate import (
    RETRY_EXIT,
    RunStopped,
    StopSignals,
    agree_on_state,
    atomic_save,
    first_line,
    signal_name,
)

log = logging.getLogger("analysis.linear_sgd")

STATE_FILE = "state.pt"
_STATE_KEYS = frozenset({"fingerprint", "epoch", "step", "fc", "optimizer", "losses", "partial"})
# Settings that do not change the result: a resume may change them (the rule's CPUs per process).
UNFINGERPRINTED = ("num_workers",)


def lr_at_epoch(epoch: int, lr: float, milestones: Sequence[int], gamma: float = 0.1) -> float:
    """Step rule of ``main_lincls.adjust_learning_rate``: lr x gamma for every milestone <= epoch (0-based)."""
    return float(lr) * float(gamma) ** sum(int(epoch) >= int(m) for m in milestones)


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    )


def test_transform(size: int, resize_ratio: float, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    return T.Compose([T.Resize(int(round(size * resize_ratio))), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(mean, std)])  # fmt: skip


class IndexedImages(Dataset):
    """``(transform(image i), i)`` of any split with ``load(i)`` / ``len``; labels are looked up by index so
    single- and multi-label targets share one dataset."""

    def __init__(self, split: Any, transform: T.Compose):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.split.load(i)), i


# ------------------------------------------------------------------------------------ order and views


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the ``n`` train images in ``epoch``: a permutation drawn from (seed, epoch) alone (cached:
    do not modify it)."""
    return _epoch_order(int(seed), int(epoch), int(n))


def view_seed(seed: int, epoch: int, index: int) -> int:
    """The torch seed of image ``index``'s train view in ``epoch`` (independent of the order's stream)."""
    return int(np.random.SeedSequence([int(seed), 1, int(epoch), int(index)]).generate_state(1, np.uint64)[0])


class EpochViews(Dataset):
    """``ds`` read by (index, epoch) keys: its random transform draws from torch's CPU generator seeded with
    ``view_seed`` for that one call, so a view is the same in any process, worker or restart."""

    def __init__(self, ds: Dataset, seed: int):
        self.ds, self.seed = ds, int(seed)

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        i, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(view_seed(self.seed, epoch, i))
            return self.ds[i]


def steps_per_epoch(n: int, batch: int) -> int:
    return math.ceil(int(n) / int(batch))


class EpochBatches:
    """The batch sampler of every global step from (epoch, step) ``start`` to the end: this process's share
    (slots rank::world of the step's ``batch`` positions in the epoch's order) as (image, epoch) keys, made
    lazily, one epoch's order at a time."""

    def __init__(self, start: tuple[int, int], epochs: int, batch: int, n: int, seed: int, rank: int = 0,
                 world: int = 1):  # fmt: skip
        self.start, self.epochs, self.batch, self.n, self.seed = start, int(epochs), int(batch), int(n), int(seed)
        self.rank, self.world = rank, world
        self.steps = steps_per_epoch(n, batch)

    def schedule(self) -> Iterator[tuple[int, int]]:
        """(epoch, step within it) of every remaining global step."""
        e0, k0 = self.start
        for e in range(e0, self.epochs):
            for k in range(k0 if e == e0 else 0, self.steps):
                yield e, k

    def __len__(self) -> int:
        e0, k0 = self.start
        return max((self.epochs - e0) * self.steps - k0, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for e, k in self.schedule():
            slots = epoch_order(self.seed, e, self.n)[k * self.batch : (k + 1) * self.batch][self.rank :: self.world]
            yield [(int(i), e) for i in slots]


def _collate(batch: list[Any]) -> Any:
    """``default_collate``, and an empty batch for a rank that has no image in a last, short global step."""
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return default_collate(batch)


# -------------------------------------------------------------------------------------------- the net


def _per_sample_loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none").mean(1)
    return F.cross_entropy(logits, y.long(), reduction="none")


def _frozen(net: nn.Module) -> list[bool]:
    """Put ``net`` in eval mode without gradients; returns the previous requires_grad flags."""
    flags = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    net.eval()
    return flags


@torch.no_grad()
def _features(net: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if net.training:  # a caller flipped it back: BN would update its running statistics
        raise RuntimeError("the frozen backbone must stay in eval mode during the linear protocol")
    x = x.to(device, non_blocking=True)
    cuda = device.type == "cuda"
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with ctx:
        return net(x).float().flatten(1)


# ---------------------------------------------------------------------------------- DDP and run state


def init_distributed(device: str | torch.device | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device); under torchrun (``WORLD_SIZE`` > 1) the process group is
    initialised once (nccl on CUDA, gloo on CPU) and ``cuda`` means ``cuda:LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0) if world > 1
                               else torch.cuda.current_device())  # fmt: skip
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dev
    return 0, 1, dev


def state_key(checkpoint_sha256: str, target: str, settings: Mapping[str, Any], world: int,
              train_items: str) -> dict[str, Any]:  # fmt: skip
    """What a resume state must have been made with: anything else gives other weights."""
    return {"checkpoint_sha256": checkpoint_sha256, "target": target, "world_size": int(world),
            "train_items": train_items,
            "settings": {k: v for k, v in settings.items() if k not in UNFINGERPRINTED}}  # fmt: skip


def _fingerprint(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _key_diff(old: Any, new: Mapping[str, Any]) -> str:
    """``lr: 30.0 -> 1.0; world_size: 2 -> 1``: why a state does not fit (digests shortened)."""
    if not isinstance(old, dict):
        return "it records no settings"

    def short(v: Any) -> str:
        return repr(v[:12] + "...") if isinstance(v, str) and len(v) == 64 else repr(v)

    parts = []
    for k in sorted(set(old) | set(new)):
        if k == "settings" and isinstance(old.get(k), dict):
            o, n = old[k], new.get(k, {})
            parts += [f"{sk}: {short(o.get(sk))} -> {short(n.get(sk))}"
                      for sk in sorted(set(o) | set(n)) if o.get(sk) != n.get(sk)]  # fmt: skip
        elif old.get(k) != new.get(k):
            parts.append(f"{k}: {short(old.get(k))} -> {short(new.get(k))}")
    return "; ".join(parts[:6]) + (f"; and {len(parts) - 6} more" if len(parts) > 6 else "") or "same key"


def _load_state(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """The resume state at ``path``: None when there is none or it is unreadable (moved to ``.corrupt``, one
    warning); ``TargetError`` when it was made with other settings."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
            raise ValueError("not a linear SGD state")
    except Exception as exc:  # truncated or foreign: nothing in it can be trusted; keep it for inspection
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        log.warning("%s is unreadable (%s); moved to %s, the run starts over from epoch 1", path, first_line(exc),
                    aside)  # fmt: skip
        return None
    if state["fingerprint"] != _fingerprint(key):
        raise TargetError(
            f"{path} was made with another checkpoint, target, settings or world size ({_key_diff(state.get('key'), key)}); "
            f"rm {shlex.quote(str(path))} to start over, or rerun with the settings it was made with"
        )
    return state


# ------------------------------------------------------------------------------------------ the recipe


def fit_linear_sgd(
    net: nn.Module,
    train_ds: Dataset,
    train_y: torch.Tensor,
    test_ds: Dataset,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    multilabel: bool = False,
    epochs: int = 100,
    lr: float = 30.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Sequence[int] = (60, 80),
    lr_gamma: float = 0.1,
    batch_size: int = 256,
    init_std: float = 0.01,
    seed: int = 0,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    state_path: str | Path | None = None,
    key: Mapping[str, Any] | None = None,
    name: str = "linear",
    stop: StopSignals | None = None,
    on_step: Callable[[int, int, nn.Module], None] | None = None,
) -> dict:
    """Train an fc layer on ``net``'s pooled output of ``train_ds`` items ``(image, index)``; evaluate on
    ``test_ds`` after the last epoch. ``net`` is left in eval mode with its weights and BN buffers untouched.

    ``state_path``: the resume state (see the module docstring); ``key``: what it must have been made with
    (default: these settings and the world size). ``stop``: the CLI's signal flag. ``on_step(epoch, steps done in
    it, fc)`` runs after every step and after the epoch's save (tests use it to kill a run). Under DDP every rank
    returns rank 0's result.
    """
    if len(train_ds) == 0 or len(test_ds) == 0:  # type: ignore[arg-type]
        raise ValueError("linear SGD recipe: a split has no sample; check the target's split lists")
    if int(epochs) < 1:
        raise ValueError(f"linear SGD recipe: epochs={epochs} must be >= 1")
    rank, world, dev = init_distributed(device)
    epochs, batch, seed, n = int(epochs), int(batch_size), int(seed), len(train_ds)  # type: ignore[arg-type]
    if batch % world:
        raise TargetError(f"target {name!r}: batch_size {batch} does not split over {world} processes; use a "
                          f"multiple of {world}")  # fmt: skip
    steps = steps_per_epoch(n, batch)
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    settings = {
        "recipe": "moco_sgd", "optimizer": "sgd", "epochs": epochs, "lr": float(lr),
        "momentum": float(momentum), "weight_decay": float(weight_decay), "milestones": [int(m) for m in milestones],
        "lr_gamma": float(lr_gamma), "batch_size": batch, "init_std": float(init_std), "seed": seed,
        "multilabel": multilabel,
    }  # fmt: skip
    key = dict(key) if key is not None else {"settings": settings, "world_size": world}
    path = Path(state_path) if state_path is not None else None
    flags = _frozen(net)
    try:
        x0, _ = test_ds[0]  # a deterministic view: the feature size without drawing from any RNG
        dim = _features(net, x0[None], dev).shape[1]
        fc = nn.utils.skip_init(nn.Linear, dim, num_classes)  # nn.Linear's own init would draw from the global RNG
        with torch.no_grad():
            fc.weight.normal_(0.0, float(init_std), generator=torch.Generator().manual_seed(seed))
            fc.bias.zero_()
        fc = fc.to(dev)
        opt = torch.optim.SGD(fc.parameters(), lr=float(lr), momentum=float(momentum),
                              weight_decay=float(weight_decay))  # fmt: skip
        start: tuple[int, int] = (0, 0)
        losses: list[float] = []
        partial: Sequence[float] = (0.0, 0)
        saved: tuple[int, int] | None = None  # the (epoch, step) the state file holds
        if path is not None:
            state = agree_on_state(path, lambda: _load_state(path, key), rank, world, dev, TargetError)
            if state is not None:
                fc.load_state_dict(state["fc"])
                opt.load_state_dict(state["optimizer"])
                start = saved = (int(state["epoch"]), int(state["step"]))
                losses = [float(v) for v in state["losses"]]
                partial = state["partial"][rank]
                if rank == 0:
                    log.info("resuming %s at step %d of epoch %d/%d (%s)", name, start[1], start[0] + 1, epochs,
                             path)  # fmt: skip
        train_fc: nn.Module = fc
        if world > 1:
            train_fc = nn.parallel.DistributedDataParallel(fc, device_ids=[dev.index] if dev.type == "cuda" else None)
        sampler = EpochBatches(start, epochs, batch, n, seed, rank, world)
        loader = DataLoader(EpochViews(train_ds, seed), batch_sampler=sampler, collate_fn=_collate,
                            num_workers=int(num_workers), pin_memory=dev.type == "cuda",
                            generator=torch.Generator().manual_seed(seed))  # fmt: skip
        total = torch.tensor(float(partial[0]), dtype=torch.float64, device=dev)  # this rank's loss sum, this epoch
        count = int(partial[1])

        def save(epoch: int, step: int) -> None:
            """The state at (epoch, step), between two steps; a collective (every rank's partial sums)."""
            assert path is not None
            parts: list[Any] = [[float(total), count]]
            if world > 1:
                parts = [None] * world
                dist.all_gather_object(parts, [float(total), count])
            if rank == 0:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_save({"fingerprint": _fingerprint(key), "key": key, "epoch": epoch, "step": step,
                             "fc": fc.state_dict(), "optimizer": opt.state_dict(), "losses": list(losses),
                             "partial": parts, "world_size": world}, path)  # fmt: skip

        def stop_at(sig: int, epoch: int, step: int) -> None:
            nonlocal saved
            if path is not None and saved != (epoch, step):
                save(epoch, step)
                saved = (epoch, step)
            if world > 1:
                dist.barrier()  # rank 0's state file is complete before any rank exits
            shown = (step, epoch + 1) if epoch < epochs else (steps, epochs)
            where = (f"the resume state {path} holds that point" if path is not None
                     else "no state is kept (no state dir)")  # fmt: skip
            raise RunStopped(f"target {name}: received {signal_name(sig)} at step {shown[0]}/{steps} of epoch "
                             f"{shown[1]}/{epochs}: {where}; exiting with status {RETRY_EXIT} so that the job is "
                             "retried and resumes from there")  # fmt: skip

        batches = iter(loader)
        try:
            net.eval()  # main_lincls.py: eval mode every epoch, the backbone is never trained
            for epoch, step in sampler.schedule():
                sig = stop.agreed(world, dev)[0] if stop is not None else 0
                if sig:
                    stop_at(sig, epoch, step)
                if step == 0:
                    net.eval()
                for group in opt.param_groups:
                    group["lr"] = lr_at_epoch(epoch, lr, milestones, lr_gamma)
                x, idx = next(batches)
                m = min(batch, n - step * batch)  # images in this global step, over all ranks
                feats = _features(net, x, dev) if len(idx) else torch.zeros(0, dim, device=dev)
                per = _per_sample_loss(train_fc(feats), train_y[idx].to(dev), multilabel)
                opt.zero_grad(set_to_none=True)
                (per.sum() * (world / m)).backward()  # DDP averages over ranks: the global batch's mean loss
                opt.step()
                total += per.detach().sum().double()
                count += len(idx)
                if step + 1 == steps:
                    sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=dev)])
                    if world > 1:
                        dist.all_reduce(sums)
                    mean = float(sums[0]) / max(float(sums[1]), 1.0)
                    if not math.isfinite(mean):  # before the save: a diverged state is never written
                        raise ValueError(f"linear SGD recipe diverged (train loss {mean} in epoch {epoch + 1}, "
                                         f"per epoch before {losses}); lower `lr`")  # fmt: skip
                    losses.append(mean)
                    total.zero_()
                    count = 0
                    if path is not None:
                        save(epoch + 1, 0)
                        saved = (epoch + 1, 0)
                if on_step is not None:
                    on_step(epoch, step + 1, fc)
            sig = stop.agreed(world, dev)[0] if stop is not None else 0
            if sig:  # the test can take long (ImageNet val: 50k images); the rerun resumes at the end and tests
                stop_at(sig, epochs, 0)
        finally:
            del batches  # shuts the decode workers down now, also when a stop or a failure propagates
        settings.update({
            "lr_per_epoch": [lr_at_epoch(e, lr, milestones, lr_gamma) for e in range(epochs)],
            "train_loss_per_epoch": losses, "reported_epoch": "last", "backbone_mode": "eval",
            "world_size": world, "per_process_batch": batch // world,
            "train_order": "a permutation of (seed, epoch); global step k = positions k*B..(k+1)*B-1, rank r slots "
                           "r::world",
            "view_rule": "torch generator seeded by (seed, epoch, image) per view",
            "resumed_from": {"epoch": start[0], "step": start[1]},
        })  # fmt: skip
        res: Any = None
        failure: Exception | None = None
        if rank == 0:
            try:
                res = _evaluate(net, fc, test_ds, test_y, num_classes, multilabel, batch, int(num_workers), dev)
                res["settings"] = settings
            except Exception as exc:
                if world == 1:
                    raise
                res, failure = f"{type(exc).__name__}: {first_line(exc)}", exc
        if world > 1:
            res = _from_rank0(res)
            if isinstance(res, str):
                if rank == 0 and failure is not None:
                    raise failure
                raise RuntimeError(f"target {name!r}: rank 0's evaluation failed: {res}")
        return res
    finally:
        for p, f in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(f)


def _from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank, over a gloo group with a long timeout: the others wait while rank 0 alone
    tests (minutes on ImageNet val), longer than NCCL's default timeout."""
    group = dist.new_group(backend="gloo", timeout=timedelta(hours=6))
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    dist.destroy_process_group(group)
    return box[0]


@torch.no_grad()
def _evaluate(net: nn.Module, fc: nn.Module, test_ds: Dataset, test_y: torch.Tensor, num_classes: int,
              multilabel: bool, batch: int, num_workers: int, dev: torch.device) -> dict[str, Any]:  # fmt: skip
    loader = DataLoader(test_ds, batch_size=batch, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda", generator=torch.Generator())  # its worker seed: not global
    out = torch.empty(len(test_ds), num_classes)  # type: ignore[arg-type]
    net.eval()
    for x, idx in loader:
        out[idx] = fc(_features(net, x, dev)).float().cpu()
    if multilabel:
        m, aps = metrics.mean_average_precision(out.numpy(), np.asarray(test_y))
        return {"mAP": m, "ap_per_class": [None if np.isnan(a) else float(a) for a in aps]}
    return {"top1": metrics.top1_accuracy(out, test_y)}


def run_moco_sgd(
    ext: Any, train: Any, test: Any, s: Mapping[str, Any], spec: Any, *, name: str = "linear",
    state_dir: str | Path | None = None, stop: StopSignals | None = None,
    on_step: Callable[[int, int, nn.Module], None] | None = None,
) -> dict:  # fmt: skip
    """The recipe on a target: ``ext`` an ``analysis.features.FeatureExtractor`` (its eval-mode pooled backbone
    for ``spec``, so BN recalibration and the arch check apply as for cached features), ``train`` / ``test``
    ``ImageSplit`` s, ``s`` the resolved target settings; ``state_dir`` holds ``state.pt`` (resume)."""
    size, mean, std = int(s["image_size"]), tuple(s["mean"]), tuple(s["std"])
    _, world, dev = init_distributed(ext.device)  # before the network is built: it goes to this rank's GPU
    net, _ = ext.network(spec, train)
    res = fit_linear_sgd(
        net, IndexedImages(train, train_transform(size, mean, std)), torch.as_tensor(train.labels),
        IndexedImages(test, test_transform(size, float(s["resize_ratio"]), mean, std)),
        torch.as_tensor(test.labels), len(train.classes), multilabel=train.multilabel, epochs=int(s["epochs"]),
        lr=float(s["lr"]), momentum=float(s["momentum"]), weight_decay=float(s["weight_decay"]),
        milestones=[int(m) for m in s["milestones"]], lr_gamma=float(s["lr_gamma"]),
        batch_size=int(s["batch_size"]), init_std=float(s["init_std"]), seed=int(s["seed"]),
        num_workers=int(s["num_workers"]), device=dev,
        state_path=Path(state_dir) / STATE_FILE if state_dir is not None else None,
        key=state_key(ext.sha256, name, s, world, train.fingerprint), name=name, stop=stop, on_step=on_step,
    )  # fmt: skip
    res["settings"]["train_transform"] = f"RandomResizedCrop({size}) + RandomHorizontalFlip"
    res["settings"]["test_transform"] = (
        f"Resize({int(round(size * float(s['resize_ratio'])))}) + CenterCrop({size})"
    )
    return res
