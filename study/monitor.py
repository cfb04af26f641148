"""Online monitors: is pretraining learning features that transfer, and how fast in wall time?

Every ``monitor.every`` steps the trainer calls ``OnlineMonitor`` (rank 0) and writes to ``metrics.csv`` (and
TensorBoard):

- ``mon_knn_top1``: weighted kNN top-1 (%) of the query backbone's pooled features on a small labelled split:
  ``n_train`` images of the monitor target's train split are the memory, ``n_val`` of its test split are
  classified (cosine similarity, k = 20 neighbours voting with ``exp(sim / 0.07)``, InstDisc's rule and the
  kNN target's protocol in ``analysis.protocols.knn_classify``). The embedded study points it at the
  classification target, so the curve shows the quantity its transfer tables report; solo-learn and
  stable-pretraining run the same online kNN.
- ``mon_view_top1``: the pretext task on held-out images: for ``n_pairs`` test images, two augmented views
  (the run's own crop and colour recipe, drawn once with ``seed``); top-1 of "view 1's query retrieves view
  2's key" among all pairs. It rises as soon as instance discrimination is learnt, whether or not the
  features are semantic: a run whose ``mon_view_top1`` climbs while ``mon_knn_top1`` stays at chance learns
  a shortcut (e.g. per-instance colours), not classes.
- ``wall_s``: training wall seconds up to the row (monitor time excluded, carried across resumes), the x
  axis of Fig 5; ``mon_s``: what the monitor itself took.

Both metrics are computed in eval mode (BatchNorm running statistics, as the paper's frozen protocols use),
without drawing from any global RNG, so monitoring does not change the training run it watches: a run with
monitors ends with the same weights as one without.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn

log = logging.getLogger("study.monitor")

MONITOR_FIELDS = ["wall_s", "mon_knn_top1", "mon_view_top1", "mon_s"]
CHUNK = 256  # images per forward pass


class MonitorConfigError(ValueError):
    """A ``monitor:`` value is missing or unusable; the message names the key."""


@dataclass(frozen=True)
class MonitorSpec:
    every: int
    target: dict[str, Any]  # a transfer target entry: format, root (, splits)
    image_size: int
    n_train: int
    n_val: int
    n_pairs: int
    k: int
    temperature: float
    seed: int


def monitor_spec(cfg: Any) -> MonitorSpec | None:
    """The ``monitor:`` node as a spec, or None when monitoring is off (``every: 0`` or no ``root``)."""
    m = cfg.get("monitor") if hasattr(cfg, "get") else None
    if not m or int(m.get("every", 0) or 0) <= 0:
        return None
    if not m.get("root"):
        raise MonitorConfigError(
            "monitor.every > 0 needs monitor.root (and monitor.format): a labelled split to run the kNN monitor "
            "on, e.g. monitor.format=imagefolder monitor.root=results/synthetic/cls; or set monitor.every=0"
        )
    target: dict[str, Any] = {"format": str(m.get("format", "imagefolder")), "root": str(m.root)}
    if m.get("splits"):
        target["splits"] = dict(m.splits)
    return MonitorSpec(
        every=int(m.every), target=target, image_size=int(m.get("image_size", 64)),
        n_train=int(m.get("n_train", 1000)), n_val=int(m.get("n_val", 500)), n_pairs=int(m.get("n_pairs", 256)),
        k=int(m.get("k", 20)), temperature=float(m.get("temperature", 0.07)), seed=int(m.get("seed", 0)),
    )  # fmt: skip


def _pick(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices spread evenly over the classes (round robin over per-class seeded permutations), so a
    small memory still holds every class."""
    rng = np.random.default_rng(seed)
    per = [rng.permutation(np.flatnonzero(labels == c)).tolist() for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < n and any(per):
        for lst in per:
            if lst and len(out) < n:
                out.append(lst.pop())
    return np.sort(np.asarray(out, dtype=np.int64))


def _normalise(aug: Mapping[str, Any]) -> T.Normalize:
    return T.Normalize(list(aug["mean"]), list(aug["std"]))


class OnlineMonitor:
    """Held-out images loaded once; ``__call__(model)`` returns the monitor columns of one ``metrics.csv`` row."""

    def __init__(self, spec: MonitorSpec, crop_cfg: Any, aug_cfg: Any, device: torch.device):
        # the transfer stage's readers: same files, same labels
        from analysis.targets import ImageSplit, TargetError, load_split
        from study.augment import aug_settings, standard_pipeline

        self.spec, self.device = spec, device
        log.info("monitor: reading up to %d + %d images of %s", spec.n_train, spec.n_val, spec.target["root"])
        splits = {}
        for role in ("train", "test"):
            try:
                split = load_split("monitor", spec.target, role)
            except TargetError as exc:  # the reader names the path; the fix is a monitor key
                raise MonitorConfigError(
                    f"monitor.root / monitor.format: {exc}. Point monitor.root at a labelled split (in a study "
                    "config: pretrain.monitor.target names a `targets:` entry), or set monitor.every=0"
                ) from None
            if not isinstance(split, ImageSplit) or split.multilabel:
                raise MonitorConfigError(
                    f"monitor.format={spec.target['format']}: the kNN monitor needs a single-label classification "
                    "split (imagefolder or a torchvision classification format)"
                )
            splits[role] = split
        aug = aug_settings(aug_cfg)
        s = spec.image_size
        # the kNN target's transform (analysis.features.FeatureSpec): Resize(s * 256/224) -> CenterCrop(s); kept
        # as uint8 (a quarter of float32: 7,000 images at 224 px are 1 GB) and normalised per chunk
        plain = T.Compose([T.Resize(int(round(s * 256 / 224))), T.CenterCrop(s), T.PILToTensor()])
        self.normalise = _normalise(aug)
        tr, te = splits["train"], splits["test"]
        itr = _pick(np.asarray(tr.labels), spec.n_train, spec.seed)
        ite = _pick(np.asarray(te.labels), spec.n_val, spec.seed + 1)
        self.n_classes = len(tr.classes)
        self.x_train = torch.stack([plain(tr.load(int(i)).convert("RGB")) for i in itr])
        self.y_train = torch.as_tensor(np.asarray(tr.labels)[itr], dtype=torch.long)
        self.x_test = torch.stack([plain(te.load(int(i)).convert("RGB")) for i in ite])
        self.y_test = torch.as_tensor(np.asarray(te.labels)[ite], dtype=torch.long)
        # view pairs: the run's crop size / scale and colour recipe, drawn once from a private generator
        size = int(crop_cfg.size)
        crop = T.RandomResizedCrop(size, scale=tuple(crop_cfg.scale), ratio=tuple(crop_cfg.ratio))
        colour = standard_pipeline(aug, size, flip=True, to_float=True)
        ipairs = ite[: spec.n_pairs]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            pairs = [[colour(crop(te.load(int(i)).convert("RGB"))) for _ in range(2)] for i in ipairs]
        self.v1 = torch.stack([p[0] for p in pairs])
        self.v2 = torch.stack([p[1] for p in pairs])
        log.info("monitor: kNN on %d %s train / %d test images (%d classes, %d px), view matching on %d pairs, "
                 "every %d steps", len(itr), spec.target["root"], len(ite), self.n_classes, s, len(ipairs),
                 spec.every)

    def _embed(self, fn: nn.Module, x: torch.Tensor, mf: torch.memory_format) -> torch.Tensor:
        out = []
        for chunk in torch.split(x, CHUNK):
            chunk = chunk.to(self.device, non_blocking=True)
            if chunk.dtype == torch.uint8:
                chunk = self.normalise(chunk.float().div_(255))
            out.append(fn(chunk.contiguous(memory_format=mf)).float())
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, model: nn.Module, channels_last: bool = False) -> dict[str, float]:
        from analysis.metrics import knn_predict, top1_accuracy

        t0 = time.perf_counter()
        enc_q = model.encoder_q
        enc_k = getattr(model, "encoder_k", enc_q)  # end-to-end / memory bank: one encoder
        mf = torch.channels_last if channels_last else torch.contiguous_format
        modes = [m.training for m in (enc_q, enc_k)]
        enc_q.eval()
        enc_k.eval()
        try:
            ftr = F.normalize(self._embed(enc_q.backbone, self.x_train, mf), dim=1)
            fte = F.normalize(self._embed(enc_q.backbone, self.x_test, mf), dim=1)
            votes = knn_predict(ftr, self.y_train.to(ftr.device), fte, self.n_classes, self.spec.k,
                                self.spec.temperature)
            knn = 100.0 * top1_accuracy(votes.cpu(), self.y_test)
            q = self._embed(lambda x: enc_q(x)[1], self.v1, mf)
            k = self._embed(lambda x: enc_k(x)[1], self.v2, mf)
            hit = (q @ k.T).argmax(dim=1).cpu() == torch.arange(len(q))
            view = 100.0 * float(hit.float().mean())
        finally:
            enc_q.train(modes[0])
            enc_k.train(modes[1])
        return {"mon_knn_top1": round(knn, 3), "mon_view_top1": round(view, 3),
                "mon_s": round(time.perf_counter() - t0, 3)}

