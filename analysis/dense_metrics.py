"""Metrics of the fine-tuned dense transfers: VOC object detection AP and NYUD-v2 depth errors.

Written out in numpy (like ``analysis/metrics.py``) so the rules are visible and hand-testable. All scores are
fractions in [0, 1] (the tables scale them); depth errors are in the units of the inputs (metres on NYUD-v2).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

# detectron2 loops thresh / 100.0 over range(50, 100, 5); 0.5 + 0.05 * 7 would give 0.8500000000000001
IOU_THRESHOLDS: tuple[float, ...] = tuple(t / 100 for t in range(50, 100, 5))
DEPTH_MIN = 1e-9  # predictions are clamped to this before ratios / logs (as eval_depth.py of the MTL code)


def _np(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def box_iou_voc(a: Any, b: Any, *, zero_based: bool = True) -> np.ndarray:
    """IoU matrix [n, m] with VOC's inclusive-pixel rule (``w = x2 - x1 + 1``) of voc_eval.

    ``zero_based=True`` (model outputs, detectron2's dataset boxes): detectron2's evaluator first maps a box
    to VOC's 1-based inclusive pixels by ``xmin + 1, ymin + 1`` (its loader did ``xmin - 1, ymin - 1`` to the
    XML), so the +1 rule then reduces to the plain continuous IoU of the 0-based boxes. ``zero_based=False``
    applies the +1 rule to the boxes as given (raw VOC XML coordinates, as voc_eval reads the GT).
    """
    a, b = _np(a).reshape(-1, 4).copy(), _np(b).reshape(-1, 4).copy()
    if zero_based:
        a[:, :2] += 1.0
        b[:, :2] += 1.0
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.maximum(hi - lo + 1, 0), axis=-1)
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def voc_class_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """AP of one class from its cumulative recall / precision (detectron2 ``voc_ap``).

    VOC07: mean over recall levels ``np.arange(0, 1.1, 0.1)`` of the best precision at recall >= level (0 if
    none); the levels are kept as that float arange, so a recall of exactly 0.3 / 0.6 / 0.7 falls just short
    of its level, as in voc_eval. VOC2010+: area under the monotone precision envelope, summed where recall
    changes.
    """
    rec, prec = np.asarray(rec, np.float64), np.asarray(prec, np.float64)
    if use_07_metric:
        levels = np.arange(0.0, 1.1, 0.1)
        return float(sum(prec[rec >= t].max() if (rec >= t).any() else 0.0 for t in levels) / 11)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _image(entry: Mapping, i: int, what: str, n_classes: int) -> dict[str, np.ndarray]:
    boxes = _np(entry["boxes"])
    boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
    labels = _np(entry["labels"], np.int64).reshape(-1)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(labels):
        raise ValueError(
            f"detection_ap: {what}[{i}] has boxes {boxes.shape} for {len(labels)} labels, need [k, 4]"
        )
    if len(labels) and (labels.min() < 1 or labels.max() > n_classes):
        raise ValueError(f"detection_ap: {what}[{i}] labels must lie in 1..{n_classes} (0 = background)")
    out = {"boxes": boxes, "labels": labels}
    key = "scores" if what == "predictions" else "difficult"
    default = None if key == "scores" else np.zeros(len(labels), bool)
    val = entry.get(key, default)
    if val is None:
        raise ValueError(f"detection_ap: {what}[{i}] has no 'scores'")
    out[key] = _np(val, np.float64 if key == "scores" else bool).reshape(-1)
    if len(out[key]) != len(labels):
        raise ValueError(f"detection_ap: {what}[{i}] has {len(out[key])} {key} for {len(labels)} labels")
    return out


def detection_ap(
    predictions: Sequence[Mapping],
    ground_truth: Sequence[Mapping],
    n_classes: int,
    *,
    use_07_metric: bool = True,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> dict[str, Any]:
    """VOC detection AP with the rules of detectron2's ``PascalVOCDetectionEvaluator`` / ``voc_eval``.

    Per class, the detections of all images are sorted by descending score (stable: ties keep input order;
    voc_eval's quicksort leaves them unspecified). Each detection takes the GT of its image (same class) of
    max IoU (``box_iou_voc``, first on ties) over all of them, already matched or not: voc_eval does not fall
    back to the next-best free GT. If IoU > threshold (strict): on a difficult GT it is ignored (neither TP
    nor FP), on a free GT it is a TP that marks the GT, on an already marked GT a FP (duplicate); otherwise a
    FP. npos counts non-difficult GTs; precision is ``tp / max(tp + fp, eps)``. Boxes are 0-based
    [x1, y1, x2, y2] (see ``box_iou_voc``); detectron2's rounding of scores to 3 and boxes to 1 decimal in its
    text files is not reproduced.

    A class with no non-difficult GT gets nan (voc_eval divides by npos = 0) and is left out of the class
    mean (detectron2 would average voc_eval's 0 or nan in; every VOC07 test class has GT, so this never
    differs there).
    Returns ``AP50``, ``AP75`` (class means at IoU 0.5 / 0.75), ``AP`` (mean over ``thresholds`` of the class
    means, detectron2's VOC "AP"), ``per_class_AP50`` (index c - 1 for label c) and ``n_pos`` per class.
    Thresholds are rounded to 6 decimals, so ``0.5 + 0.05 * 7`` is used as detectron2's 0.85.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"detection_ap: {len(predictions)} prediction entries, {len(ground_truth)} images")
    if not len(thresholds):
        raise ValueError("detection_ap: no IoU threshold given")
    preds = [_image(p, i, "predictions", n_classes) for i, p in enumerate(predictions)]
    gts = [_image(g, i, "ground_truth", n_classes) for i, g in enumerate(ground_truth)]
    levels = sorted({round(float(t), 6) for t in (*thresholds, 0.5, 0.75)})
    aps = {t: np.full(n_classes, np.nan) for t in levels}
    n_pos = np.zeros(n_classes, np.int64)
    for c in range(1, n_classes + 1):
        gt_boxes = [g["boxes"][g["labels"] == c] for g in gts]
        gt_diff = [g["difficult"][g["labels"] == c] for g in gts]
        offsets = np.cumsum([0] + [len(b) for b in gt_boxes])  # global GT id = offset of its image + index
        difficult = np.concatenate(gt_diff) if offsets[-1] else np.zeros(0, bool)
        n_pos[c - 1] = int((~difficult).sum())
        if n_pos[c - 1] == 0:
            continue
        scores, ovmax, gt_id = [], [], []
        for i, p in enumerate(preds):
            keep = p["labels"] == c
            if not keep.any():
                continue
            scores.append(p["scores"][keep])
            if len(gt_boxes[i]):
                iou = box_iou_voc(p["boxes"][keep], gt_boxes[i])
                ovmax.append(iou.max(1))
                gt_id.append(offsets[i] + iou.argmax(1))
            else:
                ovmax.append(np.full(int(keep.sum()), -np.inf))
                gt_id.append(np.zeros(int(keep.sum()), np.int64))
        if scores:
            order = np.argsort(-np.concatenate(scores), kind="mergesort")
            ovmax_s, gt_s = np.concatenate(ovmax)[order], np.concatenate(gt_id)[order]
        else:
            ovmax_s, gt_s = np.zeros(0), np.zeros(0, np.int64)
        for t in levels:
            # a det above threshold on a free GT is a TP only if it is the first such det on that GT: the
            # sequential "det" flags of voc_eval, vectorised (the max-IoU GT does not depend on the threshold)
            hit = ovmax_s > t
            on_free = hit & ~difficult[gt_s]
            tp = np.zeros(len(hit))
            first = np.unique(gt_s[on_free], return_index=True)[1]
            tp[np.nonzero(on_free)[0][first]] = 1.0
            fp = (~hit | on_free).astype(np.float64) - tp
            tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
            rec = tp_c / n_pos[c - 1]
            prec = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps)
            aps[t][c - 1] = voc_class_ap(rec, prec, use_07_metric)
    if not n_pos.any():
        raise ValueError("detection_ap: no class has a non-difficult ground-truth box, AP is undefined")
    mean = {t: float(np.nanmean(v)) for t, v in aps.items()}
    return {
        "AP": float(np.mean([mean[round(float(t), 6)] for t in thresholds])),
        "AP50": mean[0.5],
        "AP75": mean[0.75],
        "per_class_AP50": aps[0.5].tolist(),
        "n_pos": n_pos.tolist(),
    }


class DepthMeter:
    """Streams depth errors over a test set; every metric is pooled over all valid pixels of all images.

    Pooling follows ``eval_depth.py`` of SimonVandenhende/Multi-Task-Learning-PyTorch (from facebookresearch/
    astmt), which sums squared errors and valid-pixel counts over the loader and returns
    ``rmse = sqrt(total / n_valid)``, not a mean of per-image rmse. Valid pixels: gt > 0 (NYUD marks missing
    depth with 0, as that eval_depth) and finite. Predictions are clamped to ``DEPTH_MIN`` = 1e-9 (same code).
    The other metrics are the Eigen et al. definitions, pooled the same way: ``abs_rel`` = mean |p - g| / g,
    ``log10`` = mean |log10 p - log10 g|, ``log_rmse`` (natural log, as the MTL code), ``delta_k`` = share of
    pixels with max(p / g, g / p) < 1.25 ** k. Predictions must already be at the GT resolution.
    """

    def __init__(self) -> None:
        self.n = 0
        self._sums = np.zeros(7)  # sq, log_sq, abs_rel, log10, delta1, delta2, delta3

    def update(self, pred: Any, gt: Any) -> None:
        pred, gt = _np(pred), _np(gt)
        if pred.shape != gt.shape or pred.ndim not in (2, 3):
            raise ValueError(f"DepthMeter: prediction {pred.shape}, gt {gt.shape}: need equal HxW or NxHxW")
        valid = np.isfinite(gt) & (gt > 0)
        p, g = pred[valid], gt[valid]
        if not np.isfinite(p).all():
            raise ValueError("DepthMeter: non-finite prediction at a valid pixel")
        p = np.maximum(p, DEPTH_MIN)
        ratio = np.maximum(p / g, g / p)
        self.n += int(valid.sum())
        self._sums += [
            np.sum((p - g) ** 2),
            np.sum((np.log(p) - np.log(g)) ** 2),
            np.sum(np.abs(p - g) / g),
            np.sum(np.abs(np.log10(p) - np.log10(g))),
            *(np.sum(ratio < 1.25**k) for k in (1, 2, 3)),
        ]

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("DepthMeter: no valid (gt > 0, finite) pixel seen, depth metrics are undefined")
        m = self._sums / self.n
        return {
            "rmse": float(np.sqrt(m[0])),
            "log_rmse": float(np.sqrt(m[1])),
            "abs_rel": float(m[2]),
            "log10": float(m[3]),
            "delta1": float(m[4]),
            "delta2": float(m[5]),
            "delta3": float(m[6]),
        }


def depth_metrics(pred: Any, gt: Any) -> dict[str, float]:
    """One-shot ``DepthMeter`` over a single HxW or NxHxW batch."""
    meter = DepthMeter()
    meter.update(pred, gt)
    return meter.compute()
