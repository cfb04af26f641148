"""Online monitors (study/monitor.py): the kNN column is the protocol's number, the view-matching column measures
instance discrimination, and monitoring never changes the run it watches."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from format_fixtures import CLASSES, make_class_folder, make_class_shards
from omegaconf import OmegaConf

from study.monitor import MonitorConfigError, OnlineMonitor, _pick, monitor_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_class_folder(tmp_path_factory.mktemp("monitor_cls"))


def _cfg(folder: Path, **mon) -> OmegaConf:
    base = {"every": 5, "format": "imagefolder", "root": str(folder), "image_size": 32, "n_train": 24, "n_val": 12,
            "n_pairs": 12, "k": 5, "temperature": 0.07, "seed": 0}
    return OmegaConf.create({"monitor": {**base, **mon}})


CROP = OmegaConf.create({"size": 24, "scale": [0.5, 1.0], "ratio": [0.75, 1.333]})


class _Enc(torch.nn.Module):
    """Backbone = a fixed random conv + pooling (no ReLU, so no view maps to an all-zero embedding, which would
    tie every key); the head is the identity on normalised features."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        with torch.no_grad():
            self.backbone[0].weight.copy_(torch.randn(self.backbone[0].weight.shape, generator=g))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.backbone(x)
        return g, F.normalize(g, dim=1)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder_q = _Enc(0)
        self.encoder_k = copy.deepcopy(self.encoder_q)  # MoCo's key encoder starts as a copy


def test_spec_is_off_by_default_and_needs_a_root(folder):
    assert monitor_spec(OmegaConf.create({"monitor": {"every": 0}})) is None
    with pytest.raises(MonitorConfigError, match="monitor.root"):
        monitor_spec(OmegaConf.create({"monitor": {"every": 5, "root": None}}))
    assert monitor_spec(_cfg(folder)).every == 5


def test_pick_spreads_the_memory_over_classes():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 45)
    idx = _pick(labels, 12, seed=0)
    assert len(idx) == len(set(idx)) == 12
    assert np.bincount(labels[idx]).tolist() == [4, 4, 4]


def test_knn_column_equals_an_independent_weighted_knn(folder):
    mon = OnlineMonitor(monitor_spec(_cfg(folder)), CROP, None, torch.device("cpu"))
    model = _Model().train()
    out = mon(model)
    assert model.encoder_q.training and model.encoder_k.training  # modes restored
    # independent: eval-mode features, cosine top-k, exp(sim / T) votes
    with torch.no_grad():
        net = model.encoder_q.backbone.eval()
        assert mon.x_train.dtype == torch.uint8  # stored compactly, normalised per chunk
        mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        tr = F.normalize(net((mon.x_train / 255.0 - mean) / std), dim=1).numpy()
        te = F.normalize(net((mon.x_test / 255.0 - mean) / std), dim=1).numpy()
    sim = te @ tr.T
    top = np.argsort(-sim, axis=1)[:, :5]
    votes = np.zeros((len(te), len(CLASSES)))
    for i in range(len(te)):
        for j in top[i]:
            votes[i, mon.y_train[j]] += np.exp(sim[i, j] / 0.07)
    want = 100.0 * float((votes.argmax(1) == mon.y_test.numpy()).mean())
    assert out["mon_knn_top1"] == pytest.approx(want, abs=1e-3)
    assert len(mon.y_train) == 24 and np.bincount(mon.y_train.numpy()).tolist() == [8, 8, 8]


def test_view_matching_counts_a_hit_only_for_the_own_key(folder):
    mon = OnlineMonitor(monitor_spec(_cfg(folder)), CROP, None, torch.device("cpu"))
    model = _Model()
    mon.v2 = mon.v1.clone()
    assert mon(model)["mon_view_top1"] == 100.0
    mon.v2 = mon.v1.roll(1, dims=0)  # key i shows image i-1: each query's best key (itself) is at i+1, a miss
    assert mon(model)["mon_view_top1"] == 0.0


def test_views_are_fixed_by_the_seed_and_leave_the_global_rng_alone(folder):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = OnlineMonitor(monitor_spec(_cfg(folder)), CROP, None, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    b = OnlineMonitor(monitor_spec(_cfg(folder)), CROP, None, torch.device("cpu"))
    c = OnlineMonitor(monitor_spec(_cfg(folder, seed=1)), CROP, None, torch.device("cpu"))
    assert torch.equal(a.v1, b.v1) and torch.equal(a.v2, b.v2)
    assert not torch.equal(a.v1, a.v2) and not torch.equal(a.v1, c.v1)


# ----------------------------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return make_class_shards(tmp_path_factory.mktemp("monitor_shards"))


def _train(out: Path, shards: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "study.train", "model.width=8", "crop.size=24", "crop.small_size=16",
           "batch_size=8", "moco.K=32", "num_workers=0", "progress=false", "seed=1", "epochs=2", "log_every=2",
           "ckpt_every=100", f"data.shards={shards}", f"out_dir={out}", *overrides]
    res = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]


def test_monitored_run_writes_the_columns_and_ends_with_the_same_weights(tmp_path, shard_dir, folder):
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    _train(plain, shard_dir)
    _train(watched, shard_dir, "monitor.every=4", f"monitor.root={folder}", "monitor.image_size=32",
           "monitor.n_train=24", "monitor.n_val=12", "monitor.n_pairs=8")
    a = torch.load(plain / "checkpoint.pt", map_location="cpu", weights_only=True)["backbone"]
    b = torch.load(watched / "checkpoint.pt", map_location="cpu", weights_only=True)["backbone"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with (watched / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    # 32 images / 8 = 4 steps per epoch, 8 steps: rows at 0 (initial weights), 2, 4, 6, 8; monitors at 0, 4, 8
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6, 8]
    assert [r["step"] for r in rows if r["mon_knn_top1"]] == ["0", "4", "8"]
    walls = [float(r["wall_s"]) for r in rows]
    assert walls[0] == 0.0 and walls == sorted(walls) and walls[-1] > 0
    assert all(0.0 <= float(r["mon_view_top1"]) <= 100.0 for r in rows if r["mon_view_top1"])
    assert (watched / "tb").is_dir() and any((watched / "tb").iterdir())  # TensorBoard events


def test_monitor_every_must_fill_logged_rows(tmp_path, shard_dir, folder):
    cmd = [sys.executable, "-m", "study.train", f"data.shards={shard_dir}", f"out_dir={tmp_path / 'x'}",
           "log_every=2", "monitor.every=3", f"monitor.root={folder}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "monitor.every=3: must be a multiple of log_every=2" in res.stdout + res.stderr


def test_missing_monitor_root_is_one_line_naming_the_key(tmp_path, shard_dir):
    cmd = [sys.executable, "-m", "study.train", "model.width=8", "crop.size=24", "crop.small_size=16", "batch_size=8",
           "moco.K=32", "num_workers=0", "progress=false", "max_steps=2", "log_every=1", "monitor.every=1",
           f"monitor.root={tmp_path / 'no_such_split'}", f"data.shards={shard_dir}", f"out_dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert "monitor.root" in out and "no_such_split" in out and "monitor.every=0" in out
    assert "Traceback" not in out
