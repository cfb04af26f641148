"""MoCo losses, queue, momentum, shuffle BN, kNN-MoCo and MoCHi against independent brute force (CPU, tiny)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from study.moco import (
    MoCo,
    MoCoConfigError,
    group_sizes,
    infonce_logits,
    invert_perm,
    key_groups,
    knn_loss,
    knn_neighbours,
    mochi_negatives,
    moco_logits,
    query_groups,
    split_shuffle_perm,
)

B, DIM, K, T = 4, 8, 16, 0.2
_CACHE: dict[str, MoCo] = {}


def tiny(
    K: int = K, shuffle: str = "none", knn: dict | None = None, mochi: dict | None = None, m: float = 0.99
) -> MoCo:
    """Tiny MoCo; every config starts from the same seed-0 encoders (cached: ResNet init dominates test time)."""
    key = repr((K, shuffle, knn, mochi, m))
    if key not in _CACHE:
        torch.manual_seed(0)
        _CACHE[key] = MoCo(
            {"arch": "resnet18", "small_input": False},
            {"dim": DIM, "K": K, "m": m, "T": T, "mlp": True, "shuffle_bn": shuffle},
            {"enabled": False, **(knn or {})},
            {"enabled": False, **(mochi or {})},
        )
    return copy.deepcopy(_CACHE[key]).train()


def views_of(*sizes: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 3, s, s, generator=gen) for s in sizes]


def unit(*shape: int, dim: int = -1, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=dim)


def ce_by_hand(pos: float, negs: list[float]) -> float:
    """-log(e^pos / (e^pos + sum e^neg)), written without torch's softmax."""
    top = max([pos, *negs])
    return -(pos - top) + math.log(math.exp(pos - top) + sum(math.exp(n - top) for n in negs))


# --------------------------------------------------------------------------------------------- loss math


def test_infonce_equals_cross_entropy_on_explicit_logits() -> None:
    q, k, queue = unit(5, DIM, seed=1), unit(5, DIM, seed=2), unit(DIM, 11, dim=0, seed=3)
    logits = infonce_logits(q, k, queue, T)
    assert logits.shape == (5, 12)
    ours = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long)).item()
    by_hand = []
    for n in range(5):
        pos = sum(q[n, d].item() * k[n, d].item() for d in range(DIM)) / T
        negs = [sum(q[n, d].item() * queue[d, j].item() for d in range(DIM)) / T for j in range(11)]
        by_hand.append(ce_by_hand(pos, negs))
    assert ours == pytest.approx(sum(by_hand) / 5, rel=1e-5)


def test_knn_loss_equals_python_loop() -> None:
    N, Kq, C, k = 3, 9, 6, 4
    feat, queue_g = torch.randn(N, C), unit(C, Kq, dim=0, seed=4)
    q, queue_h = unit(N, DIM, seed=5), unit(DIM, Kq, dim=0, seed=6)
    idx = knn_neighbours(feat, queue_g, k)
    ours = knn_loss(q @ queue_h / T, idx).item()
    total = 0.0
    for n in range(N):
        norm = math.sqrt(sum(v * v for v in feat[n].tolist()))
        cos = [sum(feat[n, c].item() / norm * queue_g[c, j].item() for c in range(C)) for j in range(Kq)]
        nbrs = sorted(range(Kq), key=lambda j: -cos[j])[:k]
        assert set(idx[n].tolist()) == set(nbrs)
        logits = [sum(q[n, d].item() * queue_h[d, j].item() for d in range(DIM)) / T for j in range(Kq)]
        log_z = math.log(sum(math.exp(v) for v in logits))
        total += sum(log_z - logits[j] for j in nbrs) / k
    assert ours == pytest.approx(total / N, rel=1e-5)


def test_mochi_negatives_match_recipe() -> None:
    N, Kq, n, s, sp = 5, 20, 6, 7, 4
    q = unit(N, DIM, seed=7).requires_grad_(True)
    queue = unit(DIM, Kq, dim=0, seed=8)
    mix = mochi_negatives(q, queue, n, s, sp, generator=torch.Generator().manual_seed(0))
    neg = mix.negatives
    assert neg.shape == (N, s + sp, DIM) and not neg.requires_grad
    assert torch.allclose(neg.norm(dim=2), torch.ones(N, s + sp), atol=1e-5)
    assert (mix.beta < 0.5).all() and (mix.beta >= 0).all()
    assert ((mix.alpha >= 0) & (mix.alpha < 1)).all()
    assert (mix.idx_i != mix.idx_j).all()
    for r in range(N):
        sims = [(q[r].detach() @ queue[:, j]).item() for j in range(Kq)]
        hardest = set(sorted(range(Kq), key=lambda j: -sims[j])[:n])
        assert set(mix.hard_idx[r].tolist()) == hardest
        assert set(mix.idx_i[r].tolist()) <= hardest and set(mix.idx_j[r].tolist()) <= hardest
        assert set(mix.idx_jq[r].tolist()) <= hardest
        for t in range(s):
            a = mix.alpha[r, t].item()
            h = a * queue[:, mix.idx_i[r, t]] + (1 - a) * queue[:, mix.idx_j[r, t]]
            assert torch.allclose(neg[r, t], h / h.norm(), atol=1e-5)
        for t in range(sp):
            b = mix.beta[r, t].item()
            h = b * q[r].detach() + (1 - b) * queue[:, mix.idx_jq[r, t]]
            assert torch.allclose(neg[r, s + t], h / h.norm(), atol=1e-5)


def test_mochi_logits_width_and_rows() -> None:
    N, Kq = 3, 12
    q, k, queue = unit(N, DIM, seed=9), unit(N, DIM, seed=10), unit(DIM, Kq, dim=0, seed=11)
    base, full = moco_logits(q, k, queue, T, mochi=(5, 6, 2), generator=torch.Generator().manual_seed(3))
    assert full.shape == (N, 1 + Kq + 6 + 2)
    assert torch.equal(full[:, : 1 + Kq], base)
    mix = mochi_negatives(q, queue, 5, 6, 2, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(full[:, 1 + Kq :], torch.einsum("nd,nsd->ns", q, mix.negatives) / T, atol=1e-6)
    with pytest.raises(MoCoConfigError, match="mochi.n"):
        mochi_negatives(q, queue, Kq + 1, 1, 0)


# ------------------------------------------------------------------------------------------- shuffle BN


@pytest.mark.parametrize("n,groups", [(8, 2), (12, 3), (10, 2), (11, 3), (16, 4)])
def test_split_shuffle_inverse_and_bn_group_guarantee(n: int, groups: int) -> None:
    perm = split_shuffle_perm(n, groups, generator=torch.Generator().manual_seed(n))
    assert sorted(perm.tolist()) == list(range(n))
    x = torch.randn(n, 3)
    assert torch.equal(x[perm][invert_perm(perm)], x)
    qg, kg = query_groups(n, groups).tolist(), key_groups(perm, groups).tolist()
    sizes = group_sizes(n, groups)
    # key groups are the contiguous chunks of x[perm]
    chunks, start = [], 0
    for size in sizes:
        chunks.append(set(perm[start : start + size].tolist()))
        start += size
    for i in range(n):
        assert i in chunks[kg[i]]
        q_set = {j for j in range(n) if qg[j] == qg[i]}
        overlap = len(chunks[kg[i]] & q_set)
        assert overlap in (len(q_set) // groups, -(-len(q_set) // groups))
        assert chunks[kg[i]] != q_set  # never normalised over its query's sample set
    for c in range(groups):  # every key group draws from every query group
        assert {qg[j] for j in chunks[c]} == set(range(groups))


def test_split_mode_forward_matches_brute_force() -> None:
    model = tiny(shuffle="split")
    views = views_of(32, 32)
    queue0 = model.queue.clone()
    out = model(views)
    perm, inv = model.last_shuffle, invert_perm(model.last_shuffle)
    with torch.no_grad():
        key_chunks = [model.encoder_k(c)[1] for c in torch.split(views[0][perm], group_sizes(B, 2))]
        k = torch.cat(key_chunks)[inv]
        q = torch.cat([model.encoder_q(c)[1] for c in torch.split(views[1], group_sizes(B, 2))])
    assert torch.allclose(model.queue[:, :B], k.t(), atol=1e-5)
    assert torch.equal(model.queue[:, B:], queue0[:, B:])
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue0], 1) / T
    assert out["loss"].item() == pytest.approx(
        F.cross_entropy(logits, torch.zeros(B, dtype=torch.long)).item()
    )


# ------------------------------------------------------------------------------------- momentum & queue


def test_momentum_update_formula_and_buffers() -> None:
    model = tiny(m=0.9)
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        assert torch.equal(pq, pk) and not pk.requires_grad and pq.requires_grad
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
        for b in model.encoder_q.buffers():
            b.add_(1)
    before_k = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for p0, pq, pk in zip(before_k, model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        assert torch.allclose(pk, 0.9 * p0 + 0.1 * pq, atol=1e-6)
    for bq, bk in zip(model.encoder_q.buffers(), model.encoder_k.buffers(), strict=True):
        assert torch.equal(bq, bk)


def test_queue_enqueue_dequeue_order_and_wrap() -> None:
    model = tiny(K=8)
    init = model.queue.clone()
    assert torch.allclose(init.norm(dim=0), torch.ones(8), atol=1e-5)
    batches = [unit(4, DIM, seed=20 + i) for i in range(3)]
    model.enqueue(batches[0])
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue[:, :4], batches[0].t()) and torch.equal(model.queue[:, 4:], init[:, 4:])
    model.enqueue(batches[1])
    assert int(model.queue_ptr) == 0  # wrapped
    model.enqueue(batches[2])  # overwrites the oldest (batch 0), keeps batch 1
    assert int(model.queue_ptr) == 4
    assert torch.equal(model.queue, torch.cat([batches[2], batches[1]]).t())


def test_queue_must_be_multiple_of_batch() -> None:
    model = tiny(K=10)
    with pytest.raises(MoCoConfigError, match="moco.K=10"):
        model(views_of(32, 32))
    with pytest.raises(MoCoConfigError, match="multiple"):
        model.enqueue(unit(4, DIM))
    with pytest.raises(ValueError, match="views"):
        tiny()([torch.randn(B, 3, 32, 32)])


# ------------------------------------------------------------------------------------------ multi-crop


def test_multicrop_small_views_not_enqueued_and_loss_averages_queries() -> None:
    model = tiny()
    views = views_of(32, 32, 24, 24)
    queue0 = model.queue.clone()
    out = model(views)
    assert int(model.queue_ptr) == B  # only the B keys went in
    with torch.no_grad():
        k = model.encoder_k(views[0])[1]
        q_main = model.encoder_q(views[1])[1]
        q_small = model.encoder_q(torch.cat(views[2:]))[1]  # equal-size views share one BN batch
    assert torch.allclose(model.queue[:, :B], k.t(), atol=1e-5)
    assert torch.equal(model.queue[:, B:], queue0[:, B:])
    per_view = []
    for q in [q_main, q_small[:B], q_small[B:]]:
        rows = [ce_by_hand((q[n] @ k[n]).item() / T, (q[n] @ queue0 / T).tolist()) for n in range(B)]
        per_view.append(sum(rows) / B)
    assert out["loss"].item() == pytest.approx(sum(per_view) / 3, rel=1e-5)
    assert out["loss_nn"].item() == 0.0


def test_eval_mode_leaves_state_alone() -> None:
    model = tiny().eval()
    queue0, k0 = model.queue.clone(), [p.clone() for p in model.encoder_k.parameters()]
    model(views_of(32, 32))
    assert torch.equal(model.queue, queue0) and int(model.queue_ptr) == 0
    assert all(torch.equal(a, b) for a, b in zip(k0, model.encoder_k.parameters(), strict=True))


# ------------------------------------------------------------------------------------------------- kNN


def _knn_brute(model: MoCo, views, queue_h: torch.Tensor, queue_g: torch.Tensor, k: int) -> float:
    """kNN loss recomputed from the encoders and a given queue state, one sample at a time."""
    with torch.no_grad():
        g, q = model.encoder_q(views[1])
    total = 0.0
    for n in range(B):
        cos = F.normalize(g[n], dim=0) @ queue_g
        nbrs = cos.topk(k).indices.tolist()
        logits = (q[n] @ queue_h / T).tolist()
        log_z = math.log(sum(math.exp(v) for v in logits))
        total += sum(log_z - logits[j] for j in nbrs) / k
    return total / B


def test_knn_mines_before_enqueue() -> None:
    knn = {"enabled": True, "k": 1, "lam": 0.4, "mine_before_enqueue": True}
    model = tiny(knn=knn)
    buggy = tiny(knn={**knn, "mine_before_enqueue": False})
    v = views_of(32)[0]
    views = [v, v.clone()]  # key crop == query crop: the key is the query's nearest neighbour once enqueued
    h0, g0 = model.queue.clone(), model.queue_g.clone()
    out = model(views)
    pre = _knn_brute(model, views, h0, g0, 1)
    post = _knn_brute(model, views, model.queue, model.queue_g, 1)
    with torch.no_grad():
        g_self = F.normalize(model.encoder_q(views[1])[0], dim=1)
    assert (g_self @ model.queue_g).argmax(1).tolist() == list(range(B))  # own key is the post-enqueue NN
    assert out["loss_nn"].item() == pytest.approx(pre, rel=1e-4)
    assert abs(pre - post) > 1.0
    out_bug = buggy(views)
    assert out_bug["loss_nn"].item() == pytest.approx(post, rel=1e-4)
    assert out["loss"].item() == pytest.approx(out["loss_inst"].item() + 0.4 * pre, rel=1e-4)


def test_knn_lambda_zero_and_warmup_reduce_to_moco() -> None:
    base = tiny()
    zero = tiny(knn={"enabled": True, "k": 3, "lam": 0.0})
    warm = tiny(knn={"enabled": True, "k": 3, "lam": 0.4, "warmup_epochs": 5})
    views = views_of(32, 32)
    outs = []
    for model in (base, zero, warm):
        torch.manual_seed(5)
        out = model(views, epoch=1.0)
        out["loss"].backward()
        outs.append((out, [p.grad.clone() for p in model.encoder_q.parameters()]))
    (o_base, g_base), (o_zero, g_zero), (o_warm, g_warm) = outs
    assert o_zero["loss_nn"].item() > 0 and o_warm["loss_nn"].item() == 0.0
    for o, grads in ((o_zero, g_zero), (o_warm, g_warm)):
        assert torch.equal(o["loss"], o_base["loss"])
        assert all(torch.equal(a, b) for a, b in zip(grads, g_base, strict=True))


# ----------------------------------------------------------------------------------------------- MoCHi


def test_mochi_n00_reduces_to_moco_v2_and_synthetics_never_enqueued() -> None:
    base = tiny()
    n00 = tiny(mochi={"enabled": True, "n": 4, "s": 0, "s_prime": 0})
    full = tiny(mochi={"enabled": True, "n": 4, "s": 5, "s_prime": 3})
    views = views_of(32, 32)
    queue0 = base.queue.clone()
    outs = []
    for model in (base, n00, full):
        torch.manual_seed(5)
        outs.append(model(views))
    assert torch.equal(outs[0]["loss"], outs[1]["loss"])
    assert outs[2]["loss"].item() > outs[0]["loss"].item()  # extra negatives only add to the denominator
    assert outs[2]["loss"].requires_grad
    with torch.no_grad():
        k = full.encoder_k(views[0])[1]
    # after the step the queue is the old queue with exactly this step's keys written in: no synthetic point
    assert torch.allclose(full.queue[:, :B], k.t(), atol=1e-5)
    assert torch.equal(full.queue[:, B:], queue0[:, B:])


def test_mochi_warmup_and_single_cfg_constructor() -> None:
    cfg = {
        "model": {"arch": "resnet18", "small_input": False},
        "moco": {"dim": DIM, "K": K, "m": 0.99, "T": T, "mlp": False, "shuffle_bn": "none"},
        "knn": {"enabled": False},
        "mochi": {"enabled": True, "n": 4, "s": 5, "s_prime": 3, "warmup_epochs": 2},
    }
    torch.manual_seed(0)
    model = MoCo(cfg).train()
    assert model.mochi_enabled and isinstance(model.encoder_q.head, torch.nn.Linear)
    torch.manual_seed(0)
    base = MoCo({**cfg, "mochi": {"enabled": False}}).train()
    views = views_of(32, 32)
    assert torch.equal(model(views, epoch=1.0)["loss"], base(views, epoch=1.0)["loss"])
    assert not torch.equal(model(views, epoch=2.0)["loss"], base(views, epoch=2.0)["loss"])
