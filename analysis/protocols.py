"""Transfer protocols on frozen features; each returns ``{metric: value, ..., "settings": {...}}``.

The functions take feature tensors, not checkpoints, so they are testable on hand-made features and reusable
for any backbone; ``analysis.transfer`` wires them to the feature cache and the target readers. Metrics are
fractions in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from analysis import metrics

DEFAULT_WD_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
# The paper does not list its 7-class subset of VOC; SegSort / MaskContrast's segment retrieval used (as far as
# we can tell) these seven object classes. A config value, not a fact: override with `subset_classes`.
DEFAULT_SUBSET_CLASSES = ("aeroplane", "bottle", "bus", "car", "cat", "cow", "person")


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def _check_nonempty(name: str, *arrays: torch.Tensor | np.ndarray | Sequence) -> None:
    for a in arrays:
        if len(a) == 0:
            raise ValueError(f"{name}: a split has no sample; check the target's split lists")


# ------------------------------------------------------------------------------------------ linear probe


@dataclass
class LinearProbe:
    """Logistic regression on standardised features; ``effective_weight`` folds the standardisation in so
    ``logits = x @ effective_weight.T + effective_bias`` on raw features (what CAMs need)."""

    weight: torch.Tensor  # (C, D), on standardised features
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)
    weight_decay: float
    val_scores: dict[str, float]
    multilabel: bool

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float().to(self.weight.device) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    @property
    def effective_weight(self) -> torch.Tensor:
        return self.weight / self.std

    @property
    def effective_bias(self) -> torch.Tensor:
        return self.bias - (self.weight * (self.mean / self.std)).sum(1)


def _loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y.float())
    return F.cross_entropy(logits, y)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    multilabel: bool,
    max_iter: int = 300,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch L-BFGS on mean cross-entropy (softmax, or one-vs-rest sigmoid) + wd/2 * ||W||^2."""
    w = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-7, tolerance_change=1e-10,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(x @ w.T + b, y, multilabel) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _score(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> float:
    if multilabel:
        yy = y.cpu().numpy()
        if not (yy > 0).any():
            return float("nan")
        return metrics.mean_average_precision(logits.cpu().numpy(), yy)[0]
    return metrics.top1_accuracy(logits.cpu(), y.cpu())


def train_linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    *,
    multilabel: bool = False,
    wd_grid: Sequence[float] = DEFAULT_WD_GRID,
    val_fraction: float = 0.2,
    max_iter: int = 300,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> LinearProbe:
    """Select weight decay on a seeded held-out part of train (best metric, then lowest held-out loss), then
    refit on all of train with it."""
    _check_nonempty("linear probe", train_x)
    dev = _device(device)
    x = train_x.float().to(dev)
    y = torch.as_tensor(train_y).to(dev)
    y = y.float() if multilabel else y.long()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    xs = (x - mean) / std
    grid = [float(w) for w in wd_grid]
    if not grid:
        raise ValueError("linear probe: wd_grid is empty; give at least one weight decay")
    val_scores: dict[str, float] = {}
    best = grid[len(grid) // 2]
    n = x.shape[0]
    n_val = int(round(val_fraction * n))
    if len(grid) > 1 and n >= 4 and 0 < n_val < n:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(dev)
        va, tr = perm[:n_val], perm[n_val:]
        best_key = None
        for wd in grid:
            w, b = fit_logistic(xs[tr], y[tr], num_classes, wd, multilabel, max_iter)
            logits = xs[va] @ w.T + b
            score = _score(logits, y[va], multilabel)
            vloss = float(_loss(logits, y[va], multilabel))
            val_scores[f"{wd:g}"] = score
            key = (-math.inf if math.isnan(score) else score, -vloss)
            if best_key is None or key > best_key:
                best_key, best = key, wd
    w, b = fit_logistic(xs, y, num_classes, best, multilabel, max_iter)
    return LinearProbe(w, b, mean, std, best, val_scores, multilabel)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    multilabel: bool = False,
    wd_grid: Sequence[float] = DEFAULT_WD_GRID,
    val_fraction: float = 0.2,
    max_iter: int = 300,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """Linear classification on frozen features: top-1 (single-label) or mAP (multi-label)."""
    _check_nonempty("linear probe", train_x, test_x)
    probe = train_linear_probe(
        train_x, train_y, num_classes, multilabel=multilabel, wd_grid=wd_grid, val_fraction=val_fraction,
        max_iter=max_iter, seed=seed, device=device,
    )  # fmt: skip
    with torch.no_grad():
        logits = probe.logits(test_x).cpu()
    settings = {
        "multilabel": multilabel, "wd_grid": list(wd_grid), "val_fraction": val_fraction, "max_iter": max_iter,
        "seed": seed, "weight_decay": probe.weight_decay, "val_scores": probe.val_scores, "optimizer": "lbfgs",
    }  # fmt: skip
    if multilabel:
        m, aps = metrics.mean_average_precision(logits.numpy(), np.asarray(test_y))
        return {
            "mAP": m,
            "ap_per_class": [None if np.isnan(a) else float(a) for a in aps],
            "settings": settings,
        }
    return {"top1": metrics.top1_accuracy(logits, torch.as_tensor(test_y)), "settings": settings}


# ----------------------------------------------------------------------------------------------------- kNN


def knn_classify(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    device: str | torch.device | None = None,
) -> dict:
    """Weighted kNN top-1 (cosine, exp(sim / T) votes)."""
    _check_nonempty("kNN", train_x, test_x)
    dev = _device(device)
    votes = metrics.knn_predict(
        train_x.to(dev), torch.as_tensor(train_y).to(dev), test_x.to(dev), num_classes, k, temperature
    )
    return {
        "top1": metrics.top1_accuracy(votes.cpu(), torch.as_tensor(test_y)),
        "settings": {"k": k, "temperature": temperature, "k_used": min(k, len(train_x))},
    }


# ---------------------------------------------------------------------------------------------- VOC07 SVM


def voc07_svm(
    train_x: torch.Tensor,
    train_y: np.ndarray,
    test_x: torch.Tensor,
    test_y: np.ndarray,
    *,
    cost: float = 0.5,
    pos_weight: float = 2.0,
    max_iter: int = 2000,
    ap: str = "voc",
) -> dict:
    """One LinearSVC per class on L2-normalised features (public VOC07 SVM benchmark); mAP on test.

    Labels are (N, C) in {0, 1} with difficult already negative. ``ap``: "voc" = interpolated all-points AP
    (the public code), "sklearn" = non-interpolated.
    """
    from sklearn.svm import LinearSVC

    _check_nonempty("VOC07 SVM", train_x, test_x)
    if ap not in ("voc", "sklearn"):
        raise ValueError(f"voc07_svm: ap must be 'voc' or 'sklearn', got {ap!r}")
    xtr = F.normalize(train_x.float(), dim=1).numpy()
    xte = F.normalize(test_x.float(), dim=1).numpy()
    ytr, yte = np.asarray(train_y), np.asarray(test_y)
    scores = np.zeros((len(xte), ytr.shape[1]))
    skipped = []
    for c in range(ytr.shape[1]):
        yc = np.where(ytr[:, c] > 0, 1, -1)
        if len(np.unique(yc)) < 2:
            skipped.append(c)
            continue
        svm = LinearSVC(
            C=cost,
            class_weight={1: pos_weight, -1: 1},
            loss="squared_hinge",
            max_iter=max_iter,
            random_state=0,
        )
        svm.fit(xtr, yc)
        scores[:, c] = svm.decision_function(xte)
    keep = [c for c in range(ytr.shape[1]) if c not in skipped]
    if not keep:
        raise ValueError("voc07_svm: no class has both positives and negatives in the train split")
    m, aps = metrics.mean_average_precision(scores[:, keep], yte[:, keep], interpolated=(ap == "voc"))
    per_class: list[float | None] = [None] * ytr.shape[1]
    for c, a in zip(keep, aps, strict=True):
        per_class[c] = None if np.isnan(a) else float(a)
    return {
        "mAP": m,
        "ap_per_class": per_class,
        "settings": {
            "C": cost, "class_weight": {"1": pos_weight, "-1": 1}, "loss": "squared_hinge", "max_iter": max_iter,
            "ap": ap, "l2_normalised": True, "classes_without_train_positives": skipped,
        },
    }  # fmt: skip


# ------------------------------------------------------------------------------------ segment retrieval


def kmeans(x: torch.Tensor, k: int, iters: int = 30, seed: int = 0) -> torch.Tensor:
    """Seeded k-means (k-means++ init, Lloyd steps) on rows of ``x``; returns cluster ids (n,)."""
    n = x.shape[0]
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    centres = [x[torch.randint(n, (1,), generator=g).item()]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        if d2.sum() <= 0:  # fewer distinct points than k: the remaining clusters would be duplicates
            break
        i = torch.multinomial(d2.cpu() / d2.sum().cpu(), 1, generator=g).item()
        centres.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(centres)
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=len(c)).unsqueeze(1).to(x.dtype)
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c)  # an emptied cluster keeps its centre
        new_assign = torch.cdist(x, c).argmin(1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return assign


def _regions(
    feat: torch.Tensor, k: int, iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segments of one (C, h, w) map: (assign (h*w,), region ids (r,), descriptors (r, C) L2-normalised)."""
    emb = F.normalize(feat.float().flatten(1).T, dim=1)
    assign = kmeans(emb, k, iters, seed)
    ids = torch.unique(assign)
    desc = torch.stack([emb[assign == r].mean(0) for r in ids])
    return assign, ids, F.normalize(desc, dim=1)


def _mask_at(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(np.asarray(mask, np.uint8).copy())[None, None].float()
    return F.interpolate(t, size=hw, mode="nearest")[0, 0].to(torch.uint8).numpy()


def segment_retrieval(
    train_feats: torch.Tensor | Sequence[torch.Tensor],
    train_masks: Sequence[np.ndarray],
    val_feats: torch.Tensor | Sequence[torch.Tensor],
    val_masks: Sequence[np.ndarray],
    *,
    classes: Sequence[str],
    subset_classes: Sequence[str] = DEFAULT_SUBSET_CLASSES,
    n_segments: int = 15,
    kmeans_iters: int = 30,
    seed: int = 0,
    ignore_index: int = 255,
) -> dict:
    """Semantic segment retrieval (paper Table 6).

    Per image, K-means on the L2-normalised spatial embeddings gives segments; a segment's descriptor is the
    mean embedding inside it. Train regions are labelled with the majority ground-truth class of their cells
    (ground truth resized to the feature grid, ``ignore_index`` skipped; all-void regions are dropped). Each val
    region takes the label of its most similar (cosine) train region; the label map is upsampled (nearest) to
    the ground-truth size and scored by mIoU over all classes and over ``subset_classes``.
    """
    _check_nonempty("segment retrieval", train_feats, val_feats)
    if len(train_feats) != len(train_masks) or len(val_feats) != len(val_masks):
        raise ValueError("segment retrieval: features and masks differ in number")
    unknown = [c for c in subset_classes if c not in classes]
    if unknown:
        raise ValueError(
            f"segment retrieval: subset_classes {unknown} are not among the classes {list(classes)}"
        )
    nc = len(classes)
    bank, bank_labels = [], []
    for i, (feat, mask) in enumerate(zip(train_feats, train_masks, strict=True)):
        assign, ids, desc = _regions(feat, n_segments, kmeans_iters, seed + i)
        gt = torch.from_numpy(_mask_at(mask, tuple(feat.shape[-2:])).reshape(-1).astype(np.int64))
        for r, d in zip(ids, desc, strict=True):
            lab = gt[assign == r]
            lab = lab[lab != ignore_index]
            if lab.numel():
                bank.append(d)
                bank_labels.append(int(torch.bincount(lab, minlength=nc).argmax()))
    if not bank:
        raise ValueError("segment retrieval: no train region has a non-void ground-truth label")
    bank_t, bank_l = torch.stack(bank), torch.tensor(bank_labels)
    conf = np.zeros((nc, nc), dtype=np.int64)
    for i, (feat, mask) in enumerate(zip(val_feats, val_masks, strict=True)):
        h, w = feat.shape[-2:]
        assign, ids, desc = _regions(feat, n_segments, kmeans_iters, seed + 100_003 + i)
        nearest = (desc @ bank_t.T).argmax(1)
        lut = torch.zeros(int(assign.max()) + 1, dtype=torch.long)
        lut[ids] = bank_l[nearest]
        pred = lut[assign].reshape(1, 1, h, w).float()
        mask = np.asarray(mask)
        pred_full = F.interpolate(pred, size=mask.shape, mode="nearest")[0, 0].long().numpy()
        conf += metrics.confusion_matrix(pred_full, mask, nc, ignore_index)
    subset_idx = [list(classes).index(c) for c in subset_classes]
    iou = metrics.iou_per_class(conf)
    return {
        f"mIoU_{nc}": metrics.mean_iou(conf),
        f"mIoU_{len(subset_idx)}": metrics.mean_iou(conf, subset_idx),
        "iou_per_class": {c: (None if np.isnan(v) else float(v)) for c, v in zip(classes, iou, strict=True)},
        "settings": {
            "n_segments": n_segments, "kmeans_iters": kmeans_iters, "seed": seed, "subset_classes": list(subset_classes),
            "n_train_regions": len(bank_labels), "region_label": "majority at feature resolution",
        },
    }  # fmt: skip


# ---------------------------------------------------------------------------------- video propagation


@torch.no_grad()
def propagate_labels(
    feats: torch.Tensor,
    first_labels: np.ndarray,
    n_labels: int,
    out_size: tuple[int, int],
    *,
    topk: int = 10,
    context: int = 20,
    radius: float = 12,
    temperature: float = 0.05,
    chunk: int = 512,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Videowalk-style label propagation with frozen features.

    ``feats`` (T, C, h, w); ``first_labels`` (H0, W0) ints in [0, n_labels). Each position of frame t attends
    to the first frame and the previous ``context`` frames, restricted to keys within ``radius`` feature cells;
    the top-k affinities are softmaxed at ``temperature`` and average the keys' label distributions. The
    distributions are upsampled (bilinear) to ``out_size`` and argmaxed. Returns (T, H, W) int64 (frame 0 is
    the given labels resized). The affinities are dense (T x hw x context*hw): run it on a GPU at DAVIS scale.
    """
    dev = _device(device)
    t_len, _, h, w = feats.shape
    emb = F.normalize(feats.to(dev).float(), dim=1).flatten(2).transpose(1, 2)  # (T, hw, C)
    onehot = (
        F.one_hot(torch.from_numpy(np.asarray(first_labels, np.int64)), n_labels).permute(2, 0, 1).float()
    )
    probs = [F.interpolate(onehot[None], size=(h, w), mode="area")[0].flatten(1).T.to(dev)]  # (hw, L)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).float()
    within = (torch.cdist(pos, pos) <= radius).to(dev)  # (hw, hw)
    for t in range(1, t_len):
        ctx = [0, *range(max(1, t - context), t)]
        keys = emb[ctx]  # (m, hw, C)
        labels = torch.cat([probs[i] for i in ctx])  # (m*hw, L)
        out = []
        for s in range(0, h * w, chunk):
            q = emb[t, s : s + chunk]  # (b, C)
            sim = torch.einsum("bc,mkc->bmk", q, keys)
            sim = sim.masked_fill(~within[s : s + chunk, None, :], float("-inf")).flatten(1)
            vals, idx = sim.topk(min(topk, sim.shape[1]), dim=1)
            wts = torch.softmax(vals / temperature, dim=1)
            out.append((wts.unsqueeze(2) * labels[idx]).sum(1))
        probs.append(torch.cat(out))
    maps = torch.stack([p.T.reshape(n_labels, h, w) for p in probs]).cpu()
    up = F.interpolate(maps, size=out_size, mode="bilinear", align_corners=False)
    pred = up.argmax(1).numpy()
    if tuple(np.shape(first_labels)) == tuple(out_size):
        pred[0] = first_labels  # the given frame is not a prediction
    return pred


def davis_scores(
    preds: Sequence[np.ndarray],
    gts: Sequence[np.ndarray | None],
    object_ids: Sequence[int],
    *,
    bound_th: float = 0.008,
    exclude_last: bool = True,
) -> tuple[list[float], list[float]]:
    """Per-object mean J and F of one video over frames 1..T-1 (the DAVIS-2017 toolkit also drops the last
    frame: ``exclude_last``); frames without a ground-truth file are skipped."""
    end = len(preds) - 1 if exclude_last else len(preds)
    frames = [f for f in range(1, end) if gts[f] is not None]
    if not frames:
        raise ValueError(
            "DAVIS: a video has no annotated frame to score after the first one (need >= 3 frames)"
        )
    j_obj, f_obj = [], []
    for o in object_ids:
        js = [metrics.region_similarity(preds[f] == o, gts[f] == o) for f in frames]
        fs = [metrics.contour_accuracy(preds[f] == o, gts[f] == o, bound_th) for f in frames]
        j_obj.append(float(np.mean(js)))
        f_obj.append(float(np.mean(fs)))
    return j_obj, f_obj


def summarise_davis(per_video: dict[str, tuple[list[float], list[float]]], settings: dict) -> dict:
    """J&F mean over all objects of all videos (DAVIS-2017 semi-supervised convention)."""
    j = [v for js, _ in per_video.values() for v in js]
    f = [v for _, fs in per_video.values() for v in fs]
    if not j:
        raise ValueError("DAVIS: no object found in any first-frame annotation")
    jm, fm = float(np.mean(j)), float(np.mean(f))
    return {
        "JF_mean": (jm + fm) / 2, "J_mean": jm, "F_mean": fm, "n_objects": len(j),
        "per_video": {k: {"J": float(np.mean(a)), "F": float(np.mean(b))} for k, (a, b) in per_video.items()},
        "settings": settings,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------- CAMs


def class_activation_maps(maps: torch.Tensor, weight: torch.Tensor, class_idx: Sequence[int]) -> np.ndarray:
    """CAM_c = sum_k w_ck A_k on layer4 maps (n, D, h, w) with linear-probe weights on raw pooled features
    (``LinearProbe.effective_weight``); returned min-max normalised to [0, 1] per image, (n, h, w)."""
    w = weight.float().cpu()[torch.as_tensor(list(class_idx), dtype=torch.long)]  # (n, D)
    cam = torch.einsum("nd,ndhw->nhw", w, maps.float().cpu())
    lo = cam.flatten(1).min(1).values[:, None, None]
    hi = cam.flatten(1).max(1).values[:, None, None]
    return ((cam - lo) / (hi - lo).clamp_min(1e-12)).numpy()
