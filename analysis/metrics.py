"""Evaluation metrics for the transfer protocols, written out in numpy / torch.

They are implemented here (not imported from a benchmark toolkit) so every protocol runs from the venv alone
and each formula can be tested against an independent computation (sklearn, brute force, hand-counted cases).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def top1_accuracy(pred: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Share of correct predictions; ``pred`` is either class indices (N,) or scores (N, C)."""
    pred = np.asarray(torch.as_tensor(pred).cpu())
    labels = np.asarray(torch.as_tensor(labels).cpu()).reshape(-1)
    if pred.ndim == 2:
        pred = pred.argmax(1)
    if len(labels) == 0:
        raise ValueError("top1_accuracy: no samples; an empty split cannot be scored")
    if pred.shape[0] != labels.shape[0]:
        raise ValueError(f"top1_accuracy: {pred.shape[0]} predictions for {labels.shape[0]} labels")
    return float((pred.reshape(-1) == labels).mean())


def average_precision(scores: np.ndarray, targets: np.ndarray, interpolated: bool = False) -> float:
    """Average precision of one class from scores and binary targets.

    ``interpolated=False`` is the step-wise area ``sum_n (R_n - R_{n-1}) P_n`` over distinct score thresholds
    (what ``sklearn.metrics.average_precision_score`` computes). ``interpolated=True`` replaces each precision
    by the best precision at any higher recall (VOC2010+ "all points" AP, used by the public VOC07 SVM code).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    targets = np.asarray(targets).reshape(-1) > 0
    n_pos = int(targets.sum())
    if n_pos == 0:
        raise ValueError("average_precision: the class has no positive sample, AP is undefined")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], targets[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    # one operating point per distinct score: the last index of each run of tied scores
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp, fp = tp[last], fp[last]
    precision = tp / (tp + fp)
    recall = tp / n_pos
    if interpolated:
        precision = np.maximum.accumulate(precision[::-1])[::-1]
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def mean_average_precision(
    scores: np.ndarray, targets: np.ndarray, interpolated: bool = False
) -> tuple[float, np.ndarray]:
    """mAP over the classes (columns) that have at least one positive; returns (mAP, per-class AP with NaN
    for classes without positives)."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(
            f"mean_average_precision: scores {scores.shape} and targets {targets.shape} must be (N, C)"
        )
    aps = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        if (targets[:, c] > 0).any():
            aps[c] = average_precision(scores[:, c], targets[:, c], interpolated)
    if np.isnan(aps).all():
        raise ValueError("mean_average_precision: no class has a positive sample in the test split")
    return float(np.nanmean(aps)), aps


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted kNN (InstDisc / MoCo monitor): cosine similarity, top-k neighbours, each voting for its class
    with weight exp(sim / T). Returns the (N_test, C) vote matrix; argmax is the prediction."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    labels = torch.as_tensor(train_labels, device=train.device).long().reshape(-1)
    if train.shape[0] != labels.shape[0]:
        raise ValueError(f"knn_predict: {train.shape[0]} train features for {labels.shape[0]} labels")
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def _valid(void: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if void is None:
        return np.ones(shape, bool)
    void = np.asarray(void, bool)
    if void.shape != shape:
        raise ValueError(f"DAVIS metric: void mask {void.shape} differs from the masks {shape}")
    return ~void


def region_similarity(pred: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """DAVIS J: IoU of two binary masks over the non-void pixels; an empty union is J = 1.

    Void pixels count in neither intersection nor union (davis2017-evaluation ``davis2017/metrics.py``,
    ``db_eval_iou``: both sums are taken over ``& np.logical_not(void_pixels)``).
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    keep = _valid(void, gt.shape)
    union = (np.logical_or(pred, gt) & keep).sum()
    if union == 0:
        return 1.0
    return float((np.logical_and(pred, gt) & keep).sum() / union)


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """The toolkit's one-pixel boundary map (davis2017-evaluation ``davis2017/metrics.py``, ``_seg2bmap``):
    a pixel is on the boundary when it differs from its right, lower or lower-right neighbour, so the map sits
    half a pixel towards the origin; on the last row only the right neighbour and on the last column only the
    lower one count, and the bottom-right pixel never does (the image edge is not a boundary)."""
    seg = np.asarray(mask, bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1], s[:-1, :], se[:-1, :-1] = seg[:, 1:], seg[1:, :], seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = False
    return b


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy**2 + xx**2) <= radius**2


def contour_accuracy(
    pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008, void: np.ndarray | None = None
) -> float:
    """DAVIS F: F-measure of boundary precision / recall where a boundary pixel matches when the other
    boundary lies within a disk of radius ``ceil(bound_th * diagonal)`` pixels (``bound_th >= 1``: pixels).

    As davis2017-evaluation ``f_measure``: void pixels are cleared from both masks before the boundaries are
    taken; empty vs empty is F = 1, empty vs non-empty F = 0.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"contour_accuracy: mask shapes differ {pred.shape} vs {gt.shape}")
    keep = _valid(void, gt.shape)
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*gt.shape)))
    bp, bg = mask_boundary(pred & keep), mask_boundary(gt & keep)
    n_p, n_g = int(bp.sum()), int(bg.sum())
    if n_p == 0 and n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    from scipy import ndimage  # here, not at import: only DAVIS boundary F needs scipy (~0.3 s CPU per job)

    disk = _disk(radius)
    gt_dil = ndimage.binary_dilation(bg, structure=disk)
    pred_dil = ndimage.binary_dilation(bp, structure=disk)
    precision = (bp & gt_dil).sum() / n_p
    recall = (bg & pred_dil).sum() / n_g
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """(C, C) counts, rows = ground truth, columns = prediction; pixels labelled ``ignore_index`` are skipped."""
    pred, gt = np.asarray(pred).reshape(-1), np.asarray(gt).reshape(-1)
    if pred.shape != gt.shape:
        raise ValueError(f"confusion_matrix: {pred.shape[0]} predicted vs {gt.shape[0]} ground-truth pixels")
    keep = gt != ignore_index
    g, p = gt[keep].astype(np.int64), pred[keep].astype(np.int64)
    if g.size and (g.max() >= num_classes or g.min() < 0):
        raise ValueError(f"confusion_matrix: ground-truth label {int(g.max())} outside [0, {num_classes})")
    if p.size and (p.max() >= num_classes or p.min() < 0):
        raise ValueError(f"confusion_matrix: predicted label {int(p.max())} outside [0, {num_classes})")
    return np.bincount(g * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from both prediction and ground truth."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    denom = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def mean_iou(conf: np.ndarray, classes: list[int] | None = None) -> float:
    """Mean IoU over ``classes`` (default all) that occur in prediction or ground truth."""
    iou = iou_per_class(conf)
    if classes is not None:
        iou = iou[list(classes)]
    if np.isnan(iou).all():
        raise ValueError("mean_iou: none of the requested classes occurs in prediction or ground truth")
    return float(np.nanmean(iou))
