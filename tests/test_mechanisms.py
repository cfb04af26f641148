"""MoCo's mechanism ablation (Fig 3): end-to-end and memory-bank models against brute force, and real runs."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import _run, shard_dir  # noqa: F401  (module fixture reused)

from study.data import make_loader
from study.mechanisms import (
    EndToEnd,
    MemoryBank,
    bank_update,
    build_model,
    end_to_end_logits,
    sample_bank_negatives,
)
from study.moco import MoCo
from study.runconfig import ConfigError, compose_config, validate_config
from study.train import lr_at

MODEL = {"arch": "resnet18", "small_input": True}
MOCO = {"dim": 16, "K": 8, "T": 0.2, "mlp": True, "bn_splits": 2}


def test_end_to_end_logits_match_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(6, 5, generator=g), dim=1)  # 2 query views x batch 3
    k = F.normalize(torch.randn(3, 5, generator=g), dim=1)
    pos = torch.arange(3).repeat(2)
    got = end_to_end_logits(q, k, pos, 0.1)
    assert got.shape == (6, 3)  # K = batch: 1 positive + K - 1 negatives
    for i in range(6):
        own = int(pos[i])
        want = [float(q[i] @ k[own])] + [float(q[i] @ k[j]) for j in range(3) if j != own]
        assert got[i].tolist() == pytest.approx([w / 0.1 for w in want], abs=1e-5)


def test_end_to_end_forward_keys_have_gradient_and_shuffle_bn() -> None:
    torch.manual_seed(0)
    model = EndToEnd(MODEL, MOCO).train()
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    out = model(views)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.last_shuffle is not None
    assert sorted(model.last_shuffle.tolist()) == list(range(4))
    assert all(p.grad is not None for p in model.encoder_q.parameters() if p.requires_grad)
    assert not hasattr(model, "encoder_k") and not hasattr(model, "queue")
    # chance loss of 1 positive + 3 negatives at init is about ln 4
    assert 0.5 < float(out["loss"].detach()) < 4.0


def test_bank_sampling_never_draws_the_positive_unless_allowed() -> None:
    g = torch.Generator().manual_seed(1)
    batch = torch.tensor([0, 3, 5])
    for _ in range(200):
        idx = sample_bank_negatives(8, 16, batch, generator=g)
        assert idx.shape == (16,) and not torch.isin(idx, batch).any()
        assert int(idx.min()) >= 0 and int(idx.max()) < 8
    drawn = torch.cat([sample_bank_negatives(8, 64, None, generator=g) for _ in range(20)])
    assert set(drawn.tolist()) == set(range(8))  # allow_self: every entry, the batch's own too


def test_bank_update_rule() -> None:
    bank = F.normalize(torch.randn(5, 4), dim=1)
    before = bank.clone()
    f = F.normalize(torch.randn(2, 4), dim=1)
    bank_update(bank, torch.tensor([1, 4]), f, 0.5)
    for row, i in enumerate((1, 4)):
        want = F.normalize(0.5 * before[i] + 0.5 * f[row], dim=0)
        assert torch.allclose(bank[i], want, atol=1e-6)
    assert torch.equal(bank[[0, 2, 3]], before[[0, 2, 3]])


def test_memory_bank_forward_uses_own_entry_as_positive_and_updates_it() -> None:
    torch.manual_seed(0)
    model = MemoryBank(MODEL, MOCO, {"momentum": 0.5}, n_samples=20).train()
    before = model.bank.clone()
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    index = torch.tensor([2, 7, 11, 19])
    out = model(views, index=index)
    out["loss"].backward()
    changed = (model.bank != before).any(dim=1).nonzero().squeeze(1).tolist()
    assert changed == [2, 7, 11, 19]
    assert torch.allclose(model.bank.norm(dim=1), torch.ones(20), atol=1e-5)
    with pytest.raises(ValueError, match="index"):
        model(views)


def test_resume_restores_the_bank(tmp_path) -> None:
    torch.manual_seed(0)
    a = MemoryBank(MODEL, MOCO, None, n_samples=12).train()
    a([torch.randn(4, 3, 16, 16)] * 2, index=torch.tensor([0, 1, 2, 3]))
    torch.save(a.state_dict(), tmp_path / "m.pt")
    torch.manual_seed(1)
    b = MemoryBank(MODEL, MOCO, None, n_samples=12)
    assert not torch.equal(a.bank, b.bank)
    b.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert torch.equal(a.bank, b.bank)


def test_build_model_and_config_rules() -> None:
    assert isinstance(build_model({"model": MODEL, "moco": MOCO}), MoCo)
    assert isinstance(build_model({"mechanism": "end_to_end", "model": MODEL, "moco": MOCO}), EndToEnd)
    assert isinstance(build_model({"mechanism": "memory_bank", "model": MODEL, "moco": MOCO}, 10), MemoryBank)
    base = ["out_dir=/tmp/x", "data.shards=/tmp/y"]
    # the bank draws K entries per step, so K need not be a multiple of the batch (the queue's rule)
    validate_config(compose_config(["method=memory_bank", "moco.K=100", *base]))
    with pytest.raises(ConfigError, match="bank.momentum"):
        validate_config(compose_config(["method=memory_bank", "bank.momentum=1.5", *base]))
    with pytest.raises(ConfigError, match="lr_scale_batch"):
        validate_config(compose_config(["method=end_to_end", "optim.lr_scale_batch=0", *base]))


def test_linear_lr_scaling() -> None:
    optim = {"lr": 0.03, "schedule": "cosine", "lr_scale_batch": 256}

    from omegaconf import OmegaConf

    assert lr_at(0, 10, 5, OmegaConf.create(optim), 1024) == pytest.approx(0.12)
    assert lr_at(0, 10, 5, OmegaConf.create({**optim, "lr_scale_batch": None}), 1024) == pytest.approx(0.03)


def test_loader_gives_stable_manifest_indices(shard_dir) -> None:  # noqa: F811
    from data_prep.shards import load_manifest, manifest_counts

    _, tars = load_manifest(shard_dir)
    loader = make_loader([str(t) for t in tars], crop_cfg={"size": 32, "small_size": 16}, aug_cfg={},
                         batch_size=8, num_workers=0, seed=0, epoch_len=6,
                         expected_counts=manifest_counts(shard_dir))
    seen = {}
    for batch in loader:
        for i, k in zip(batch["index"].tolist(), batch["key"], strict=True):
            seen[i] = k
    assert sorted(seen) == list(range(48))
    # position in the manifest order: shard by shard, members in tar order
    order = []
    for t in tars:
        with tarfile.open(t) as tf:
            order += [m.name.rsplit(".", 1)[0] for m in tf.getmembers() if m.name.endswith(".json")]
    assert [seen[i] for i in range(48)] == order


@pytest.mark.parametrize("method", ["end_to_end", "memory_bank"])
def test_short_real_training_run(tmp_path, shard_dir, method) -> None:  # noqa: F811
    out = tmp_path / method
    res = _run(out, shard_dir, f"method={method}", "epochs=1", "log_every=2", "ckpt_every=3", "max_steps=4")
    assert res.returncode == 0, res.stdout[-3000:]
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["method"] == method and ckpt["step"] == 4
    if method == "memory_bank":
        assert ckpt["model"]["bank"].shape == (48, 128)
    else:
        assert not any(k.startswith("encoder_k") for k in ckpt["model"])
    with (out / "metrics.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(float(r["loss"]) > 0 for r in rows)
    json.loads((out / "crop_iou.json").read_text())


def test_mechanism_k_table_and_figure(tmp_path) -> None:
    import yaml

    from analysis import figures, tables
    from analysis.tables import load_paper_values, report_settings, transfer_path

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    spec = config["experiments"]["mechanism_k"]
    for i, v in enumerate(spec["variants"]):
        for t in spec["targets"]:
            p = transfer_path(tmp_path, "syn_in", v, t)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps({"protocol": "knn", "metric": "top1", "value": 0.3 + 0.01 * i}))
    rs = report_settings(config)
    assert "mechanism_k" in tables.enabled_tables(config, rs) and "mechanism_k" in figures.enabled_figures(config, rs)
    table = tables.TABLES["mechanism_k"].build(config, tmp_path, rs, load_paper_values())
    frame = table.frame.set_index("variant")
    assert frame.loc["e2e_b32", "K"] == 32 and frame.loc["e2e_b32", "negatives"] == 31
    assert frame.loc["bank_k64", "mechanism"] == "memory bank" and frame.loc["moco_v2", "K"] == 256
    res = figures.FIGURES["mechanism_k"].build(config, tmp_path, tmp_path / "fig", rs)
    assert all(p.is_file() for p in res.paths) and set(res.data.mechanism) == {"queue", "end_to_end", "memory_bank"}
