"""The two other contrastive mechanisms of MoCo's ablation (He et al. 2020, Sec 4.1 and Fig 3).

MoCo compares three ways of keeping a dictionary of K keys, all with the same InfoNCE loss and temperature:

- ``EndToEnd``: one encoder with gradient for queries and keys; the dictionary is the current global batch, so
  K = batch and each query has K - 1 negatives (the other samples' keys). Only large batches give a large K,
  so MoCo scales the learning rate linearly with the batch ("linear lr scaling rule", Goyal et al.): set
  ``optim.lr_scale_batch=256`` for lr * global_batch / 256. Shuffle BN as in MoCo's ablation: keys are encoded
  as a permutation of the batch in ``moco.bn_splits`` BN groups (``split_shuffle_perm``), so a key is never
  normalised with its own query's group; under DDP each rank shuffles its own batch and the keys of all ranks
  are gathered *with* gradient (every query's negatives are the whole global batch).
- ``MemoryBank`` (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"):
  a bank of one L2-normalised ``moco.dim`` feature per training sample, keyed by the sample's position in the
  manifest order (``batch["index"]``, study/data.py). The positive of a query is its own sample's (stale) bank
  entry, the K negatives are entries drawn uniformly per step. After the step the batch's entries are updated,
  ``v <- normalise(m v + (1 - m) f)`` with ``bank.momentum`` m = 0.5 (Wu et al.'s memory momentum) and f the
  query encoder's detached features of the main query view. No key encoder, hence no shuffle BN.

Memory-bank sampling. One draw of K entries per step (with replacement, as Wu et al.'s alias sampler), shared
by the batch as MoCo's queue is: a per-query draw would gather B x K x 128 floats (8 GiB at B=256, K=65536).
The draw never contains an entry of the (local) batch, so no query meets its own entry as a negative, unless
``bank.allow_self=true``, which draws from all N entries. Under DDP each rank draws its own negatives and the
bank updates of all ranks are gathered, so every rank holds the same bank. The bank is a registered buffer:
it is saved in ``last.pt`` / ``checkpoint.pt`` with the model state and restored on resume.

``build_model(cfg, n_samples)`` picks the class from the top-level ``mechanism`` key (``queue``: ``MoCo``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from study.moco import (
    MoCo,
    MoCoConfigError,
    _all_gather,
    _world,
    group_sizes,
    infonce_logits,
    invert_perm,
    shuffle_bn_settings,
    split_shuffle_perm,
)
from study.models import Encoder, build_encoder, cfg_get

MECHANISMS = ("queue", "end_to_end", "memory_bank")

__all__ = ["MECHANISMS", "EndToEnd", "MemoryBank", "bank_update", "build_model", "end_to_end_logits",
           "sample_bank_negatives"]  # fmt: skip


# --------------------------------------------------------------------------------------------- loss math


def end_to_end_logits(q: torch.Tensor, keys: torch.Tensor, pos_idx: torch.Tensor, T: float) -> torch.Tensor:
    """``[q.k_pos, q.k_other...] / T`` of shape (N, K): column 0 the query's own key ``keys[pos_idx]``, then the
    other K - 1 keys of the batch in batch order (the end-to-end dictionary is the batch itself)."""
    sim = q @ keys.t()  # (N, K)
    N, K = sim.shape
    own = F.one_hot(pos_idx, K).bool()
    pos = sim.gather(1, pos_idx[:, None])
    neg = sim[~own].view(N, K - 1)
    return torch.cat([pos, neg], dim=1) / T


def sample_bank_negatives(n_entries: int, K: int, exclude: torch.Tensor | None,
                          generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """K bank indices drawn uniformly with replacement from ``[0, n_entries)`` minus ``exclude`` (None: all)."""
    if exclude is None:
        return torch.randint(0, n_entries, (K,), generator=generator, device=device)
    allowed = torch.ones(n_entries, dtype=torch.bool, device=device)
    allowed[exclude.to(device)] = False
    pool = allowed.nonzero().squeeze(1)
    if pool.numel() == 0:
        raise MoCoConfigError(f"the memory bank has {n_entries} entries, all in the batch: no negative to draw; "
                              "use a smaller batch or bank.allow_self=true")
    pick = torch.randint(0, pool.numel(), (K,), generator=generator, device=device)
    return pool[pick]


def bank_update(bank: torch.Tensor, index: torch.Tensor, feats: torch.Tensor, momentum: float) -> None:
    """In place: ``bank[i] <- normalise(m bank[i] + (1 - m) f_i)`` (Wu et al. 2018, Sec 3.2's proximal update)."""
    v = momentum * bank[index] + (1.0 - momentum) * feats.detach().to(bank.dtype)
    bank[index] = F.normalize(v, dim=1)


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` along dim 0, differentiable (the end-to-end keys of other ranks get gradient too)."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


# ------------------------------------------------------------------------------------------------ models


class _QueryEncoding(nn.Module):
    """The query side shared with MoCo (multi-crop query views, contiguous BN groups)."""

    encoder_q: Encoder
    _fmt = MoCo._fmt
    _encode_queries = MoCo._encode_queries

    @staticmethod
    def _check_views(views: Any) -> int:
        if not isinstance(views, (list, tuple)) or len(views) < 2:
            raise ValueError("forward needs views = [key crop, query crop, *small crops] (>= 2 tensors)")
        B = views[0].shape[0]
        if any(v.dim() != 4 or v.shape[0] != B for v in views):
            raise ValueError(f"every view must be (B, 3, H, W) with the same B; got {[tuple(v.shape) for v in views]}")
        return B

    @staticmethod
    def _out(loss: torch.Tensor, logits: torch.Tensor, T: float) -> dict[str, torch.Tensor]:
        return {"loss": loss, "loss_inst": loss.detach(), "loss_nn": torch.zeros((), device=loss.device),
                "pos_logit": (logits[:, 0].detach() * T).mean(), "neg_logit": (logits[:, 1:].detach() * T).mean()}


class EndToEnd(_QueryEncoding):
    """MoCo's end-to-end mechanism: keys from the same encoder, with gradient; negatives = the rest of the batch."""

    def __init__(self, model_cfg: Any = None, moco_cfg: Any = None):
        super().__init__()
        self.T = float(cfg_get(moco_cfg, "T", 0.2))
        self.shuffle_bn, self.bn_splits = shuffle_bn_settings(moco_cfg)
        self.encoder_q: Encoder = build_encoder(model_cfg, moco_cfg)
        self.last_shuffle: torch.Tensor | None = None

    def _groups(self) -> int:
        """BN groups per process: ``bn_splits`` unless shuffle BN is off (DDP shuffles inside each rank too)."""
        return 1 if self.shuffle_bn == "none" else self.bn_splits

    def _encode_keys(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """Keys (B, dim) with gradient, in the batch's order; encoded as ``x[perm]`` in ``groups`` BN groups."""
        B = x.shape[0]
        if groups == 1:
            return self.encoder_q(self._fmt(x))[1]
        perm = split_shuffle_perm(B, groups, x.device)
        self.last_shuffle = perm
        outs = [self.encoder_q(self._fmt(c))[1] for c in torch.split(x[perm], group_sizes(B, groups))]
        return torch.cat(outs)[invert_perm(perm)]

    def forward(self, views: list[torch.Tensor], epoch: float = 0.0, labels: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One end-to-end step; ``epoch``, ``labels`` and ``index`` are accepted for the trainer and unused."""
        B = self._check_views(views)
        world, rank = _world()
        G = self._groups()
        if G > 1 and B < 2 * G:
            raise MoCoConfigError(f"end-to-end shuffle BN with moco.bn_splits={G} needs a batch >= {2 * G} (got {B})")
        n_q = len(views) - 1
        _, q = self._encode_queries(list(views[1:]), G)
        k = self._encode_keys(views[0], G)
        dev = q.device
        amp_off = torch.autocast(dev.type, enabled=False) if torch.is_autocast_enabled(dev.type) else nullcontext()
        with amp_off:
            q, k = q.float(), k.float()
            keys = _gather_with_grad(k) if world > 1 else k
            pos = (torch.arange(B, device=dev) + rank * B).repeat(n_q)
            logits = end_to_end_logits(q, keys, pos, self.T)
            loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=dev))
        return self._out(loss, logits, self.T)


class MemoryBank(_QueryEncoding):
    """Wu et al.'s memory bank with MoCo's InfoNCE: one stale feature per sample, K uniform negatives per step."""

    def __init__(self, model_cfg: Any = None, moco_cfg: Any = None, bank_cfg: Any = None, n_samples: int = 0):
        super().__init__()
        self.K = int(cfg_get(moco_cfg, "K", 4096))
        self.T = float(cfg_get(moco_cfg, "T", 0.2))
        self.momentum = float(cfg_get(bank_cfg, "momentum", 0.5))
        self.allow_self = bool(cfg_get(bank_cfg, "allow_self", False))
        if n_samples < 2:
            raise MoCoConfigError(f"the memory bank needs the training set size (>= 2 samples), got {n_samples}")
        self.encoder_q: Encoder = build_encoder(model_cfg, moco_cfg)
        # Wu et al. initialise the bank with random unit vectors
        self.register_buffer("bank", F.normalize(torch.randn(n_samples, self.encoder_q.dim), dim=1))

    def forward(self, views: list[torch.Tensor], epoch: float = 0.0, labels: torch.Tensor | None = None,
                index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One step; ``index`` (B,) holds the samples' bank entries (``batch["index"]``). views[0] (the key crop)
        is not used: the positive is the sample's bank entry. Updates the bank in training mode."""
        B = self._check_views(views)
        N = self.bank.shape[0]
        if index is None or index.shape != (B,):
            raise MoCoConfigError("mechanism=memory_bank needs each sample's index (batch['index'], its position in "
                                  "the manifest order); pass index= to forward")
        index = index.to(self.bank.device).long()
        if bool(((index < 0) | (index >= N)).any()):
            raise MoCoConfigError(f"sample indices {index.min().item()}..{index.max().item()} outside the memory bank "
                                  f"of {N} entries: the loader's shards are not those the bank was sized for")
        world, _ = _world()
        n_q = len(views) - 1
        _, q = self._encode_queries(list(views[1:]), 1)
        dev = q.device
        amp_off = torch.autocast(dev.type, enabled=False) if torch.is_autocast_enabled(dev.type) else nullcontext()
        with amp_off:
            q = q.float()
            neg_idx = sample_bank_negatives(N, self.K, None if self.allow_self else index, device=self.bank.device)
            bank = self.bank.detach()
            positives = bank[index].repeat(n_q, 1)
            logits = infonce_logits(q, positives, bank[neg_idx].t(), self.T)
            loss = F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=dev))
            if self.training:
                with torch.no_grad():
                    f, idx = q[:B].detach(), index  # the main query view's features
                    if world > 1:
                        f, idx = _all_gather(f), _all_gather(idx)
                    bank_update(self.bank, idx, f, self.momentum)
        return self._out(loss, logits, self.T)


def build_model(cfg: Any, n_samples: int = 0) -> nn.Module:
    """The model of ``cfg.mechanism`` (default ``queue``: MoCo and its kNN / MoCHi variants)."""
    mech = str(cfg_get(cfg, "mechanism", "queue"))
    if mech == "queue":
        return MoCo(cfg_get(cfg, "model"), cfg_get(cfg, "moco"), cfg_get(cfg, "knn"), cfg_get(cfg, "mochi"))
    if mech == "end_to_end":
        return EndToEnd(cfg_get(cfg, "model"), cfg_get(cfg, "moco"))
    if mech == "memory_bank":
        return MemoryBank(cfg_get(cfg, "model"), cfg_get(cfg, "moco"), cfg_get(cfg, "bank"), n_samples)
    raise MoCoConfigError(f"mechanism={mech!r}; choose one of {MECHANISMS}")
