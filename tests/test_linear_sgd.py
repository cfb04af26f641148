"""MoCo's SGD linear recipe (analysis.linear_sgd): step schedule, frozen eval-mode backbone, learning, wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from analysis import linear_sgd, transfer
from analysis.targets import TargetError


class _Tensors(Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], i


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes told apart by the sign of the mean of channel 0 (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, 3, 8, 8, generator=g)
    x[:, 0] += (2.0 * y - 1.0)[:, None, None]
    return x, y


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())  # fmt: skip
    bn = net[1]
    # Non-trivial statistics, so a train-mode pass would visibly move them.
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return net


def test_lr_step_rule() -> None:
    assert [linear_sgd.lr_at_epoch(e, 30.0, [60, 80]) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx(
        [30.0, 30.0, 3.0, 3.0, 0.3, 0.3]
    )


def test_sgd_schedule_frozen_backbone_and_accuracy() -> None:
    net = _backbone()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    xtr, ytr = _separable(32, 0)
    xte, yte = _separable(16, 1)
    milestones, epochs, lr = [2, 4], 6, 30.0
    res = linear_sgd.fit_linear_sgd(
        net, _Tensors(xtr), ytr, _Tensors(xte), yte, 2, epochs=epochs, lr=lr, milestones=milestones, batch_size=8,
    )  # fmt: skip
    s = res["settings"]
    rule = [lr * 0.1 ** sum(e >= m for m in milestones) for e in range(epochs)]  # brute force
    assert s["lr_per_epoch"] == pytest.approx(rule)
    assert s["recipe"] == "moco_sgd" and s["momentum"] == 0.9 and s["weight_decay"] == 0.0
    after = net.state_dict()
    for k, v in before.items():  # weights and BN running statistics / counters: bit-identical
        assert torch.equal(after[k], v), k
    assert not net.training and all(p.requires_grad for p in net.parameters())  # flags restored, mode eval
    assert res["top1"] > 0.75  # chance is 0.5


def test_backbone_switched_to_train_mode_is_refused() -> None:
    net = _backbone().train()
    xtr, ytr = _separable(8, 0)

    class Flip(_Tensors):  # a dataset that flips the backbone back to train mode mid-run
        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            net.train()
            return super().__getitem__(i)

    with pytest.raises(RuntimeError, match="eval mode"):
        linear_sgd.fit_linear_sgd(net, Flip(xtr), ytr, _Tensors(xtr), ytr, 2, epochs=1, batch_size=4)


def test_resolve_settings_recipes() -> None:
    base = {"protocol": "linear", "format": "imagefolder", "root": "/x", "image_size": 224}
    lb = transfer.resolve_settings(base)
    assert lb["recipe"] == "lbfgs" and "wd_grid" in lb and "lr" not in lb
    sgd = transfer.resolve_settings({**base, "recipe": "moco_sgd", "epochs": 3})
    assert (
        sgd["recipe"] == "moco_sgd" and sgd["epochs"] == 3 and sgd["lr"] == 30.0 and sgd["batch_size"] == 256
    )
    assert sgd["milestones"] == [60, 80] and not any(k in sgd for k in linear_sgd.LBFGS_KEYS)
    with pytest.raises(TargetError, match="recipe"):
        transfer.resolve_settings({**base, "recipe": "adam"})


def test_run_target_moco_sgd_end_to_end(tmp_path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Identity()
    ckpt = tmp_path / "checkpoint.pt"
    torch.save(
        {"backbone": net.state_dict(), "arch": "resnet18", "small_input": False, "feat_dim": 512}, ckpt
    )
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c, col in {"red": (200, 30, 30), "blue": (30, 30, 200)}.items():
            for i in range(n):
                arr = np.clip(np.asarray(col)[None, None] + rng.integers(-20, 20, (40, 40, 3)), 0, 255)
                (tmp_path / "data" / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr.astype(np.uint8)).save(tmp_path / "data" / split / c / f"{i}.jpg")
    cfg = {"protocol": "linear", "format": "imagefolder", "root": str(tmp_path / "data"), "recipe": "moco_sgd",
           "image_size": 32, "epochs": 2, "milestones": [1], "batch_size": 4, "lr": 1.0}  # fmt: skip
    rec = transfer.run_target(ckpt, "in_lin", cfg, tmp_path / "cache", device="cpu", progress=False)
    assert rec["metric"] == "top1" and 0.0 <= rec["value"] <= 1.0
    assert rec["settings"]["recipe"] == "moco_sgd" and rec["settings"]["lr_per_epoch"] == pytest.approx(
        [1.0, 0.1]
    )
    assert rec["feature_cache"] == {"hits": 0, "misses": 0}  # nothing cached: views are re-drawn every epoch
