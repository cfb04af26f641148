"""MoCHi oracle (same-class negatives dropped) against brute force; the label queue; the no-label error."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_prep.records import Record
from data_prep.shards import write_shards
from study.moco import MoCo, MoCoConfigError, infonce_logits, mochi_negatives, moco_logits, oracle_mask

B, DIM, K, T = 4, 8, 16, 0.2


def _model(oracle: bool = True, mochi: bool = False) -> MoCo:
    torch.manual_seed(0)
    return MoCo(
        {"arch": "resnet18", "small_input": False},
        {"dim": DIM, "K": K, "m": 0.99, "T": T, "mlp": True, "shuffle_bn": "none"},
        {"enabled": False},
        {"enabled": mochi, "n": 4, "s": 3, "s_prime": 2, "oracle": oracle},
    ).train()


def _unit(*shape: int, dim: int = -1, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=dim)


def _views(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, 32, 32, generator=g) for _ in range(2)]


def test_logits_of_same_class_entries_masked_others_untouched() -> None:
    q, k, queue = _unit(5, DIM, seed=1), _unit(5, DIM, seed=2), _unit(DIM, K, dim=0, seed=3)
    q_lab = torch.tensor([0, 1, 2, -1, 1])
    queue_lab = torch.tensor([0, 1, -1, 2, 1, 3, 0, -1, 2, 2, 1, 0, 3, 3, -1, 1])
    drop = oracle_mask(q_lab, queue_lab)
    logits, all_logits = moco_logits(q, k, queue, T, drop=drop)
    assert torch.equal(logits, infonce_logits(q, k, queue, T))  # unmasked copy for statistics / kNN
    for i in range(5):
        assert all_logits[i, 0] == logits[i, 0]
        for j in range(K):
            same = q_lab[i] >= 0 and queue_lab[j] >= 0 and q_lab[i] == queue_lab[j]
            assert bool(drop[i, j]) == bool(same)
            if same:
                assert all_logits[i, 1 + j] == -math.inf
            else:
                assert all_logits[i, 1 + j] == logits[i, 1 + j]
    assert not drop[3].any()  # an unknown query label drops nothing


def test_mochi_hard_negatives_skip_dropped_entries() -> None:
    q, k, queue = _unit(3, DIM, seed=4), _unit(3, DIM, seed=5), _unit(DIM, K, dim=0, seed=6)
    drop = oracle_mask(torch.tensor([0, 1, 0]), torch.arange(K) % 3)
    _, full = moco_logits(q, k, queue, T, (4, 3, 2), generator=torch.Generator().manual_seed(7), drop=drop)
    sim = (q @ queue).masked_fill(drop, -math.inf)
    mix = mochi_negatives(q, queue, 4, 3, 2, sim=sim, generator=torch.Generator().manual_seed(7))
    assert not drop.gather(1, mix.hard_idx).any()
    syn = torch.einsum("nd,nsd->ns", q, mix.negatives) / T
    assert torch.allclose(full[:, 1 + K :], syn)


def test_forward_matches_brute_force_and_label_queue_advances() -> None:
    model = _model()
    queue_lab = torch.tensor([0, 1, 2, 3] * 4)
    model.queue_labels.copy_(queue_lab)
    queue0 = model.queue.clone()
    views, labels = _views(), torch.tensor([1, 3, -1, 1])
    with torch.no_grad():
        q = model.encoder_q(views[1])[1].float()
    out = model(views, labels=labels)
    with torch.no_grad():
        k = model.encoder_k(views[0])[1].float()  # the updated key encoder, the one forward used
    want = []
    for i in range(B):
        pos = float(q[i] @ k[i]) / T
        negs = [
            float(q[i] @ queue0[:, j]) / T
            for j in range(K)
            if not (labels[i] >= 0 and queue_lab[j] == labels[i])
        ]
        top = max([pos, *negs])
        want.append(-(pos - top) + math.log(math.exp(pos - top) + sum(math.exp(n - top) for n in negs)))
    assert out["loss_inst"].item() == pytest.approx(sum(want) / B, rel=1e-4)
    # the label queue advances with the key queue: this step's labels in the slots its keys went to
    assert torch.equal(model.queue_labels[:B], labels) and torch.equal(model.queue_labels[B:], queue_lab[B:])
    assert torch.allclose(model.queue[:, :B], k.t(), atol=1e-5) and int(model.queue_ptr) == B
    model(_views(2), labels=torch.tensor([5, 6, 7, 8]))
    assert (
        torch.equal(model.queue_labels[B : 2 * B], torch.tensor([5, 6, 7, 8]))
        and int(model.queue_ptr) == 2 * B
    )
    assert torch.equal(model.queue_labels[:B], labels)


def test_oracle_needs_labels_and_off_ignores_them() -> None:
    with pytest.raises(MoCoConfigError, match="labels"):
        _model(mochi=True)(_views())
    on = _model(mochi=True)
    # Unknown until labelled keys arrive: nothing is dropped at first.
    assert int(on.queue_labels.eq(-1).sum()) == K
    out = on(_views(), labels=torch.tensor([0, 1, 0, 1]))  # with synthetic negatives too
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out = on(_views(2), labels=torch.tensor([0, 1, 0, 1]))  # now the labelled slots match and are dropped
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["neg_logit"])
    off_a, off_b = _model(oracle=False), _model(oracle=False)
    assert not hasattr(off_a, "queue_labels")
    assert torch.equal(off_a(_views())["loss"], off_b(_views(), labels=torch.tensor([0, 0, 1, 1]))["loss"])


def test_training_run_with_oracle_passes_the_loader_labels(tmp_path) -> None:
    """study.train hands the shards' class indices to the model: an oracle run fails without them."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(16):
        path = tmp_path / f"img_{i:03d}.jpg"
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(path)
        rec = Record(
            key=path.stem, path=str(path), cls=f"c{i % 2}", boxes=[], split="train", width=48, height=40
        )
        records.append(rec)
    shards = tmp_path / "shards"
    write_shards(records, shards, "tiny", max_per_shard=8, min_shards=2, progress=False)
    cmd = [sys.executable, "-m", "study.train", "model.small_input=false", "crop.size=32", "batch_size=8",
           "moco.K=16", "num_workers=0", "progress=false", "method=mochi", "mochi.n=4", "mochi.s=2",
           "mochi.s_prime=2", "mochi.oracle=true", "max_steps=2", f"data.shards={shards}",
           f"out_dir={tmp_path / 'run'}"]  # fmt: skip
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run(cmd, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
