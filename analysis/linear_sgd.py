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
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from analysis import metrics
from analysis.target_settings import LBFGS_KEYS, MOCO_SGD_DEFAULTS, RECIPES  # noqa: F401 (re-exported)


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


def _loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, y.float()) if multilabel else F.cross_entropy(logits, y)


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
) -> dict:
    """Train an fc layer on ``net``'s pooled output of ``train_ds`` items ``(image, index)``; evaluate on
    ``test_ds`` after the last epoch. ``net`` is left in eval mode with its weights and BN buffers untouched."""
    if len(train_ds) == 0 or len(test_ds) == 0:
        raise ValueError("linear SGD recipe: a split has no sample; check the target's split lists")
    if int(epochs) < 1:
        raise ValueError(f"linear SGD recipe: epochs={epochs} must be >= 1")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    train_y, test_y = torch.as_tensor(train_y), torch.as_tensor(test_y)
    flags = _frozen(net)
    lrs: list[float] = []
    losses: list[float] = []
    try:
        # Seeded crops, flips, shuffling and fc init; the caller's RNG state is restored afterwards.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            x0, _ = train_ds[0]
            dim = _features(net, x0[None], dev).shape[1]
            fc = nn.Linear(dim, num_classes).to(dev)
            fc.weight.data.normal_(0.0, float(init_std))
            fc.bias.data.zero_()
            opt = torch.optim.SGD(fc.parameters(), lr=float(lr), momentum=float(momentum),
                                  weight_decay=float(weight_decay))  # fmt: skip
            loader = DataLoader(train_ds, batch_size=int(batch_size), shuffle=True, num_workers=int(num_workers),
                                pin_memory=dev.type == "cuda")  # fmt: skip
            for epoch in range(int(epochs)):
                rate = lr_at_epoch(epoch, lr, milestones, lr_gamma)
                for group in opt.param_groups:
                    group["lr"] = rate
                lrs.append(opt.param_groups[0]["lr"])
                net.eval()  # main_lincls.py: eval mode every epoch, the backbone is never trained
                total, count = 0.0, 0
                for x, idx in loader:
                    y = train_y[idx].to(dev)
                    loss = _loss(
                        fc(_features(net, x, dev)), y.float() if multilabel else y.long(), multilabel
                    )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total, count = total + float(loss.detach()) * len(idx), count + len(idx)
                losses.append(total / max(count, 1))
            test_loader = DataLoader(test_ds, batch_size=int(batch_size), shuffle=False,
                                     num_workers=int(num_workers))  # fmt: skip
            out = torch.empty(len(test_ds), num_classes)
            with torch.no_grad():
                for x, idx in test_loader:
                    out[idx] = fc(_features(net, x, dev)).float().cpu()
    finally:
        for p, f in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(f)
    settings = {
        "recipe": "moco_sgd", "optimizer": "sgd", "epochs": int(epochs), "lr": float(lr),
        "momentum": float(momentum), "weight_decay": float(weight_decay), "milestones": [int(m) for m in milestones],
        "lr_gamma": float(lr_gamma), "batch_size": int(batch_size), "init_std": float(init_std), "seed": int(seed),
        "multilabel": multilabel, "lr_per_epoch": lrs, "train_loss_per_epoch": losses, "reported_epoch": "last",
        "backbone_mode": "eval",
    }  # fmt: skip
    if not all(math.isfinite(v) for v in losses):
        raise ValueError(f"linear SGD recipe diverged (train loss per epoch {losses}); lower `lr`")
    if multilabel:
        m, aps = metrics.mean_average_precision(out.numpy(), np.asarray(test_y))
        return {
            "mAP": m,
            "ap_per_class": [None if np.isnan(a) else float(a) for a in aps],
            "settings": settings,
        }
    return {"top1": metrics.top1_accuracy(out, test_y), "settings": settings}


def run_moco_sgd(ext: Any, train: Any, test: Any, s: Mapping[str, Any], spec: Any) -> dict:
    """The recipe on a target: ``ext`` an ``analysis.features.FeatureExtractor`` (its eval-mode pooled backbone
    for ``spec``, so BN recalibration and the arch check apply as for cached features), ``train`` / ``test``
    ``ImageSplit`` s, ``s`` the resolved target settings."""
    size, mean, std = int(s["image_size"]), tuple(s["mean"]), tuple(s["std"])
    net, _ = ext.network(spec, train)
    res = fit_linear_sgd(
        net, IndexedImages(train, train_transform(size, mean, std)), torch.as_tensor(train.labels),
        IndexedImages(test, test_transform(size, float(s["resize_ratio"]), mean, std)),
        torch.as_tensor(test.labels), len(train.classes), multilabel=train.multilabel, epochs=int(s["epochs"]),
        lr=float(s["lr"]), momentum=float(s["momentum"]), weight_decay=float(s["weight_decay"]),
        milestones=[int(m) for m in s["milestones"]], lr_gamma=float(s["lr_gamma"]),
        batch_size=int(s["batch_size"]), init_std=float(s["init_std"]), seed=int(s["seed"]),
        num_workers=int(s["num_workers"]), device=ext.device,
    )  # fmt: skip
    res["settings"]["train_transform"] = f"RandomResizedCrop({size}) + RandomHorizontalFlip"
    res["settings"]["test_transform"] = (
        f"Resize({int(round(size * float(s['resize_ratio'])))}) + CenterCrop({size})"
    )
    return res
