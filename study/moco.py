"""MoCo / MoCo-v2 with multi-crop queries, kNN-MoCo and MoCHi hard negative mixing.

The pure loss math (``infonce_logits``, ``knn_neighbours``, ``knn_loss``, ``mochi_negatives``) and the shuffle-BN
permutations (``split_shuffle_perm``, ``invert_perm``, ``query_groups``, ``key_groups``) are module-level functions
so they can be checked against brute force without encoders. ``MoCo.forward`` wires them together and performs the
momentum update and the enqueue itself, in MoCo's order: momentum update -> keys -> losses -> enqueue.

Shuffle BN guarantee (both the single-device split-batch emulation and the DDP path). The batch of B samples is
cut into G contiguous *query groups* (one device's share: on one device the ``moco.bn_splits`` chunks, under DDP
each rank's local batch), each forwarded with its own BN statistics. Keys are forwarded in G *key groups* built by
``split_shuffle_perm``: inside every query group the samples are shuffled and dealt round-robin to the G key
groups. Hence, for every sample i, the key group of i holds exactly floor or ceil(|Q_d|/G) samples of i's query
group Q_d (including i) and the rest from the other query groups; with G >= 2 and |Q_d| >= 2 a key is never
normalised with the statistics of the set of samples its query was normalised with. A uniformly random
permutation (MoCo's batch_shuffle_ddp) gives this overlap only in expectation; here it holds at every step.
"""

from __future__ import annotations

import copy
import itertools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from study.models import Encoder, build_encoder, cfg_get

SHUFFLE_MODES = ("auto", "ddp", "split", "none")


class MoCoConfigError(ValueError):
    """A MoCo / kNN / MoCHi setting cannot work with the given batch or queue."""


def shuffle_bn_settings(moco_cfg: Any) -> tuple[str, int]:
    """(``moco.shuffle_bn`` mode, ``moco.bn_splits``), validated; shared by every mechanism that shuffles BN."""
    shuffle = cfg_get(moco_cfg, "shuffle_bn", "auto")
    shuffle = {True: "auto", False: "none"}.get(shuffle, shuffle)
    if shuffle not in SHUFFLE_MODES:
        raise MoCoConfigError(f"moco.shuffle_bn={shuffle!r}; choose one of {SHUFFLE_MODES}")
    bn_splits = int(cfg_get(moco_cfg, "bn_splits", 2))
    if bn_splits < 1:
        raise MoCoConfigError(f"moco.bn_splits={bn_splits} must be >= 1")
    return str(shuffle), bn_splits


# --------------------------------------------------------------------------------------------- loss math


def infonce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, T: float) -> torch.Tensor:
    """``[q.k+, q.queue] / T`` of shape (N, 1 + K); the positive is column 0 (MoCo's target 0)."""
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue
    return torch.cat([pos, neg], dim=1) / T


def knn_neighbours(feat: torch.Tensor, queue_g: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (N, k) of the k queue columns most cosine-similar to ``feat`` (queue columns are unit-norm)."""
    if k > queue_g.shape[1]:
        raise MoCoConfigError(f"knn.k={k} exceeds the queue length moco.K={queue_g.shape[1]}")
    sim = F.normalize(feat.float(), dim=1) @ queue_g
    return sim.topk(k, dim=1).indices


def knn_loss(queue_logits: torch.Tensor, nn_idx: torch.Tensor) -> torch.Tensor:
    """kNN-MoCo loss: mean over queries and neighbours of ``-log softmax(queue_logits)[idx]``.

    Follows the paper's Alg. 1 (``multi_label_CE(lneg / t, indices)``): the softmax runs over the queue logits
    ``q . Q_h / T`` only, so each neighbour competes with the rest of the queue, not with the anchor's key.
    """
    logp = F.log_softmax(queue_logits, dim=1)
    return -logp.gather(1, nn_idx).mean()


@dataclass
class MochiNegatives:
    """Synthetic negatives of MoCHi plus the draws that produced them (kept so tests can recompute them)."""

    negatives: torch.Tensor  # (N, s + s', d) unit-norm, detached
    hard_idx: torch.Tensor  # (N, n) queue indices of each query's hardest negatives, hardest first
    idx_i: torch.Tensor  # (N, s) queue indices of n_i
    idx_j: torch.Tensor  # (N, s) queue indices of n_j (never equal to idx_i)
    alpha: torch.Tensor  # (N, s) weight of n_i, U(0, 1)
    idx_jq: torch.Tensor  # (N, s') queue indices mixed with the query
    beta: torch.Tensor  # (N, s') weight of the query, U(0, 0.5)


def mochi_negatives(
    q: torch.Tensor,
    queue: torch.Tensor,
    n: int,
    s: int,
    s_prime: int,
    sim: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> MochiNegatives:
    """MoCHi(N, s, s') hard negatives for every query, vectorised over the batch.

    h = normalise(a n_i + (1 - a) n_j), i != j among the query's top-``n`` queue negatives, a ~ U(0, 1);
    h' = normalise(b q + (1 - b) n_j), b ~ U(0, 0.5) so the query never dominates its own negative.
    ``sim`` may pass the already computed ``q @ queue`` to skip a matmul (only its ranking is used).
    """
    K = queue.shape[1]
    if not 1 <= n <= K:
        raise MoCoConfigError(f"mochi.n={n} must be in [1, moco.K={K}]")
    if s > 0 and n < 2:
        raise MoCoConfigError(f"mochi.s={s} > 0 needs mochi.n >= 2 to mix two distinct negatives (got {n})")
    with torch.no_grad():
        q = q.detach().float()
        N, dev = q.shape[0], q.device
        if sim is None:
            sim = q @ queue
        hard_idx = sim.detach().topk(n, dim=1).indices
        keys_t = queue.t()
        loc_i = torch.randint(0, n, (N, s), device=dev, generator=generator)
        loc_j = torch.randint(0, max(n - 1, 1), (N, s), device=dev, generator=generator)
        loc_j = loc_j + (loc_j >= loc_i).long()  # skip i: uniform over the other n - 1 entries
        idx_i, idx_j = hard_idx.gather(1, loc_i), hard_idx.gather(1, loc_j)
        alpha = torch.rand(N, s, device=dev, generator=generator)
        h = alpha[..., None] * keys_t[idx_i] + (1 - alpha[..., None]) * keys_t[idx_j]
        idx_jq = hard_idx.gather(1, torch.randint(0, n, (N, s_prime), device=dev, generator=generator))
        beta = 0.5 * torch.rand(N, s_prime, device=dev, generator=generator)
        hq = beta[..., None] * q[:, None, :] + (1 - beta[..., None]) * keys_t[idx_jq]
        negatives = F.normalize(torch.cat([h, hq], dim=1), dim=2)
    return MochiNegatives(negatives, hard_idx, idx_i, idx_j, alpha, idx_jq, beta)


def oracle_mask(q_labels: torch.Tensor, queue_labels: torch.Tensor) -> torch.Tensor:
    """(N, K) bool, True where queue entry j holds the query's own class: the false negatives an oracle drops.

    The MoCHi slides' oracle run drops same-class negatives using the labels. A label of -1 (unknown: an
    unlabelled sample, or a queue slot not yet filled by a labelled key) never matches, so nothing is dropped
    on a guess.
    """
    ql, kl = q_labels.long()[:, None], queue_labels.long().to(q_labels.device)[None, :]
    return (ql == kl) & (ql >= 0) & (kl >= 0)


def moco_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    T: float,
    mochi: tuple[int, int, int] | None = None,
    generator: torch.Generator | None = None,
    drop: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, all_logits)``: InfoNCE logits (N, 1 + K) and, with ``mochi=(n, s, s')``, the same rows
    extended by each query's own synthetic negatives (N, 1 + K + s + s'); without MoCHi both are the same.

    ``drop`` (N, K) bool (``oracle_mask``): those queue logits are -inf in ``all_logits`` (the loss's input, so
    they get zero probability and zero gradient) and are ranked last when MoCHi picks the hardest negatives;
    ``logits`` stays unmasked for the statistics and the kNN loss.
    """
    logits = infonce_logits(q, k, queue, T)
    masked = logits
    if drop is not None:
        neg = logits[:, 1:].masked_fill(drop, float("-inf"))
        masked = torch.cat([logits[:, :1], neg], dim=1)
    if mochi is None:
        return logits, masked
    mix = mochi_negatives(q, queue, *mochi, sim=masked[:, 1:].detach(), generator=generator)
    syn = torch.einsum("nd,nsd->ns", q, mix.negatives) / T
    return logits, torch.cat([masked, syn], dim=1)


# ------------------------------------------------------------------------------------------- shuffle BN


def group_sizes(n: int, groups: int) -> list[int]:
    """Sizes of ``groups`` contiguous chunks of ``n`` items (``torch.tensor_split`` convention)."""
    return [n // groups + (1 if g < n % groups else 0) for g in range(groups)]


def query_groups(n: int, groups: int, device: torch.device | str | None = None) -> torch.Tensor:
    """BN group id (n,) of each sample when the batch is cut into ``groups`` contiguous chunks."""
    return torch.repeat_interleave(
        torch.arange(groups, device=device), torch.tensor(group_sizes(n, groups), device=device)
    )


def split_shuffle_perm(
    n: int, groups: int, device: torch.device | str | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Permutation for shuffle BN: ``x[perm]`` cut into ``groups`` contiguous chunks gives the key BN groups.

    Within each query group the samples are shuffled and dealt round-robin over the key groups, so each key
    group takes floor/ceil(|Q_d| / groups) samples of every query group (see the module docstring).
    """
    qg = query_groups(n, groups, device)
    order = torch.argsort(qg + torch.rand(n, device=device, generator=generator))  # by group, random inside
    dealt = torch.arange(n, device=device) % groups  # key group of order[p]
    # key groups get the tensor_split sizes because round-robin from 0 gives the first n % groups one extra
    within = torch.argsort(dealt + torch.rand(n, device=device, generator=generator))
    return order[within]


def invert_perm(perm: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: ``x[perm][invert_perm(perm)] == x``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def key_groups(perm: torch.Tensor, groups: int) -> torch.Tensor:
    """BN group id (n,) of each sample's key when keys are encoded as ``x[perm]`` in ``groups`` chunks."""
    kg = torch.empty_like(perm)
    kg[perm] = query_groups(perm.numel(), groups, perm.device)
    return kg


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (no gradient: only used for keys)."""
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)


# ------------------------------------------------------------------------------------------------ model


class MoCo(nn.Module):
    """MoCo(-v2) with multi-crop queries, optional kNN-MoCo loss and MoCHi negatives.

    ``MoCo(cfg)`` takes a whole config (keys ``model``, ``moco``, ``knn``, ``mochi``), or pass the four groups.
    """

    def __init__(
        self, model_cfg: Any = None, moco_cfg: Any = None, knn_cfg: Any = None, mochi_cfg: Any = None
    ):
        super().__init__()
        if (
            moco_cfg is None
            and knn_cfg is None
            and mochi_cfg is None
            and cfg_get(model_cfg, "moco") is not None
        ):
            full = model_cfg
            model_cfg, moco_cfg = cfg_get(full, "model"), cfg_get(full, "moco")
            knn_cfg, mochi_cfg = cfg_get(full, "knn"), cfg_get(full, "mochi")
        self.K = int(cfg_get(moco_cfg, "K", 4096))
        self.m = float(cfg_get(moco_cfg, "m", 0.999))
        self.T = float(cfg_get(moco_cfg, "T", 0.2))
        self.shuffle_bn, self.bn_splits = shuffle_bn_settings(moco_cfg)

        self.knn_enabled = bool(cfg_get(knn_cfg, "enabled", False))
        self.knn_k = int(cfg_get(knn_cfg, "k", 20))
        self.knn_lam = float(cfg_get(knn_cfg, "lam", 0.4))
        self.knn_warmup = float(cfg_get(knn_cfg, "warmup_epochs", 0))
        self.knn_mine_before_enqueue = bool(cfg_get(knn_cfg, "mine_before_enqueue", True))
        self.mochi_enabled = bool(cfg_get(mochi_cfg, "enabled", False))
        self.mochi_n = int(cfg_get(mochi_cfg, "n", 128))
        self.mochi_s = int(cfg_get(mochi_cfg, "s", 1024))
        self.mochi_s_prime = int(cfg_get(mochi_cfg, "s_prime", 512))
        self.mochi_warmup = float(cfg_get(mochi_cfg, "warmup_epochs", 0))
        # Oracle (MoCHi slides): drop same-class queue negatives, whether or not synthetic negatives are on.
        self.mochi_oracle = bool(cfg_get(mochi_cfg, "oracle", False))
        if self.knn_enabled and not 1 <= self.knn_k <= self.K:
            raise MoCoConfigError(f"knn.k={self.knn_k} must be in [1, moco.K={self.K}]")
        if self.mochi_enabled and not 1 <= self.mochi_n <= self.K:
            raise MoCoConfigError(f"mochi.n={self.mochi_n} must be in [1, moco.K={self.K}]")

        self.encoder_q: Encoder = build_encoder(model_cfg, moco_cfg)
        self.encoder_k: Encoder = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        dim, feat_dim = self.encoder_q.dim, self.encoder_q.feat_dim
        self.register_buffer("queue", F.normalize(torch.randn(dim, self.K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        if self.knn_enabled:  # Q_g only when used: 2048 x 65536 floats is 512 MiB
            self.register_buffer("queue_g", F.normalize(torch.randn(feat_dim, self.K), dim=0))
        if self.mochi_oracle:  # class of each queue entry, aligned with `queue`; -1 = unknown (never dropped)
            self.register_buffer("queue_labels", torch.full((self.K,), -1, dtype=torch.long))
        self.last_shuffle: torch.Tensor | None = None  # key permutation of the last step (for inspection)

    # ---------------------------------------------------------------- helpers
    def _mode(self, world: int) -> str:
        if self.shuffle_bn == "auto":
            return "ddp" if world > 1 else "split"
        if self.shuffle_bn == "ddp" and world == 1:
            raise MoCoConfigError("moco.shuffle_bn=ddp needs torch.distributed with world size > 1; use auto")
        return self.shuffle_bn

    def _fmt(self, x: torch.Tensor) -> torch.Tensor:
        """Match the input memory format to the conv weights (channels_last when the model was converted)."""
        w = self.encoder_q.backbone.conv1.weight
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q for parameters; buffers (BN statistics) are copied."""
        pk, pq = list(self.encoder_k.parameters()), list(self.encoder_q.parameters())
        torch._foreach_mul_(pk, self.m)
        torch._foreach_add_(pk, pq, alpha=1.0 - self.m)
        for bk, bq in zip(self.encoder_k.buffers(), self.encoder_q.buffers(), strict=True):
            bk.copy_(bq)

    @torch.no_grad()
    def enqueue(
        self, keys: torch.Tensor, feats: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> None:
        """Write the global batch of keys over the oldest entries; the pointer wraps modulo K.

        With the oracle on, the keys' labels go to the same slots of ``queue_labels`` (-1 when not given).
        """
        n = keys.shape[0]
        if self.K % n:
            raise MoCoConfigError(
                f"moco.K={self.K} is not a multiple of the global batch {n}; pick K = multiple of the batch "
                "and use drop_last so every batch is full"
            )
        p = int(self.queue_ptr)
        self.queue[:, p : p + n] = keys.t().to(self.queue.dtype)
        if feats is not None and hasattr(self, "queue_g"):
            self.queue_g[:, p : p + n] = F.normalize(feats.float(), dim=1).t()
        if hasattr(self, "queue_labels"):
            self.queue_labels[p : p + n] = -1 if labels is None else labels.to(self.queue_labels)
        self.queue_ptr[0] = (p + n) % self.K

    def _encode_queries(self, views: list[torch.Tensor], groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode all query views, batching views of equal size; BN groups are contiguous sample chunks.

        Returns (g, z) of shape (L * B, .) in view-major order (view 1 first).
        """
        B = views[0].shape[0]
        bounds = list(itertools.accumulate(group_sizes(B, groups), initial=0))
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, v in enumerate(views):
            by_size.setdefault(tuple(v.shape[-2:]), []).append(i)
        gs: list[torch.Tensor | None] = [None] * len(views)
        zs: list[torch.Tensor | None] = [None] * len(views)
        for idxs in by_size.values():
            g_parts, z_parts = [], []
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                x = self._fmt(torch.cat([views[i][a:b] for i in idxs]))
                g, z = self.encoder_q(x)
                g_parts.append(g.float().reshape(len(idxs), b - a, -1))
                z_parts.append(z.reshape(len(idxs), b - a, -1))
            g_all, z_all = torch.cat(g_parts, dim=1), torch.cat(z_parts, dim=1)
            for t, i in enumerate(idxs):
                gs[i], zs[i] = g_all[t], z_all[t]
        return torch.cat(gs), torch.cat(zs)

    @torch.no_grad()
    def _encode_keys(self, x: torch.Tensor, mode: str, world: int, rank: int):
        """Keys with shuffle BN. Returns (g_local, k_local, g_global, k_global) in the batch's own order."""
        B = x.shape[0]
        if mode == "none":
            g, k = self.encoder_k(self._fmt(x))
            return g.float(), k, g.float(), k
        if mode == "split":
            G = self.bn_splits
            perm = split_shuffle_perm(B, G, x.device)
            self.last_shuffle = perm
            outs = [self.encoder_k(self._fmt(c)) for c in torch.split(x[perm], group_sizes(B, G))]
            inv = invert_perm(perm)
            g = torch.cat([o[0].float() for o in outs])[inv]
            k = torch.cat([o[1] for o in outs])[inv]
            return g, k, g, k
        # ddp: gather images, shuffle with rank 0's permutation, encode this rank's slice, gather, unshuffle
        x_all = _all_gather(x)
        perm = (
            split_shuffle_perm(B * world, world, x.device)
            if rank == 0
            else torch.empty(B * world, dtype=torch.long, device=x.device)
        )
        dist.broadcast(perm, src=0)
        self.last_shuffle = perm
        mine = perm.view(world, B)[rank]
        g, k = self.encoder_k(self._fmt(x_all[mine]))
        inv = invert_perm(perm)
        g_all, k_all = _all_gather(g.float())[inv], _all_gather(k)[inv]
        return g_all[rank * B : (rank + 1) * B], k_all[rank * B : (rank + 1) * B], g_all, k_all

    # ---------------------------------------------------------------- forward
    def forward(
        self, views: list[torch.Tensor], epoch: float = 0.0, labels: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One MoCo step on ``views`` (0: key crop, 1: main query, 2+: small queries); see module docstring.

        ``labels`` (B,) class indices (-1: unknown) are read only by the oracle (``mochi.oracle``), which needs
        them: each query's same-class queue negatives are dropped and the keys' labels enqueued with the keys.
        ``index`` (the samples' dataset positions) is accepted for the trainer and read only by the memory bank.

        In training mode it also updates the key encoder (before encoding keys) and enqueues the keys (after
        the losses are built, or before the kNN mining when ``knn.mine_before_enqueue`` is false).
        """
        if not isinstance(views, (list, tuple)) or len(views) < 2:
            raise ValueError("MoCo.forward needs views = [key crop, query crop, *small crops] (>= 2 tensors)")
        B = views[0].shape[0]
        if any(v.dim() != 4 or v.shape[0] != B for v in views):
            raise ValueError(
                f"every view must be (B, 3, H, W) with the same B; got {[tuple(v.shape) for v in views]}"
            )
        world, rank = _world()
        mode = self._mode(world)
        if self.K % (B * world):
            raise MoCoConfigError(
                f"moco.K={self.K} is not a multiple of the global batch {B * world} (batch {B} x world {world})"
            )
        local_groups = self.bn_splits if mode == "split" else 1
        if local_groups > 1 and B < 2 * local_groups:
            raise MoCoConfigError(
                f"split-batch shuffle BN with moco.bn_splits={local_groups} needs a batch >= {2 * local_groups}"
                f" (got {B}); lower bn_splits or set moco.shuffle_bn=none"
            )
        if self.mochi_oracle:
            if labels is None:
                raise MoCoConfigError(
                    "mochi.oracle=true drops same-class negatives and needs the batch's class labels: pass "
                    "labels=batch['label'] (-1 for unknown) to MoCo.forward, or set mochi.oracle=false"
                )
            if labels.shape != (B,):
                raise ValueError(f"labels must be (B,) = ({B},) class indices; got {tuple(labels.shape)}")
            labels = labels.to(views[0].device).long()
        knn_on = self.knn_enabled and epoch >= self.knn_warmup
        mochi_on = self.mochi_enabled and epoch >= self.mochi_warmup
        n_q = len(views) - 1

        g_q, q = self._encode_queries(list(views[1:]), local_groups)
        with torch.no_grad():
            if self.training:
                self.momentum_update()
            _, k, g_k_all, k_all = self._encode_keys(views[0], mode, world, rank)

        dev = q.device
        amp_off = (
            torch.autocast(dev.type, enabled=False) if torch.is_autocast_enabled(dev.type) else nullcontext()
        )
        with amp_off:
            q = q.float()
            queue = self.queue.clone()
            k_rep = k.float().repeat(n_q, 1)
            mochi = (self.mochi_n, self.mochi_s, self.mochi_s_prime) if mochi_on else None
            drop = labels_all = None
            if self.mochi_oracle:  # queries are view-major (n_q copies of the batch); keys as k_all is ordered
                drop = oracle_mask(labels.repeat(n_q), self.queue_labels.clone())
                labels_all = _all_gather(labels) if mode == "ddp" else labels
            logits, all_logits = moco_logits(q, k_rep, queue, self.T, mochi, drop=drop)
            target = torch.zeros(all_logits.shape[0], dtype=torch.long, device=dev)
            loss_inst = F.cross_entropy(all_logits, target)

            loss_nn = torch.zeros((), device=dev)
            enqueued = False
            if knn_on:
                g_qd = g_q.detach()
                if self.knn_mine_before_enqueue:
                    idx = knn_neighbours(g_qd, self.queue_g, self.knn_k)
                    loss_nn = knn_loss(logits[:, 1:], idx)
                else:  # public-code order (a bug): this step's keys are already in Q_g / Q_h when mining
                    if self.training:
                        self.enqueue(k_all, g_k_all, labels_all)
                        enqueued = True
                    idx = knn_neighbours(g_qd, self.queue_g, self.knn_k)
                    loss_nn = knn_loss((q @ self.queue.clone()) / self.T, idx)
            loss = loss_inst + self.knn_lam * loss_nn if knn_on else loss_inst
            if self.training and not enqueued:
                self.enqueue(k_all, g_k_all, labels_all)

            pos = logits[:, 0].detach() * self.T
            neg = logits[:, 1:].detach() * self.T
        return {
            "loss": loss,
            "loss_inst": loss_inst.detach(),
            "loss_nn": loss_nn.detach(),
            "pos_logit": pos.mean(),
            "neg_logit": neg.mean(),
        }


__all__ = [
    "MoCo",
    "MoCoConfigError",
    "MochiNegatives",
    "infonce_logits",
    "invert_perm",
    "key_groups",
    "knn_loss",
    "knn_neighbours",
    "mochi_negatives",
    "oracle_mask",
    "group_sizes",
    "query_groups",
    "moco_logits",
    "split_shuffle_perm",
]
