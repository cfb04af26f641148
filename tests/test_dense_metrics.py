"""Hand-checked cases for the VOC detection AP and NYUD depth metrics of analysis/dense_metrics.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from analysis.dense_metrics import DepthMeter, box_iou_voc, depth_metrics, detection_ap, voc_class_ap


def _pred(boxes, scores, labels=None):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    labels = np.ones(len(boxes), int) if labels is None else np.asarray(labels)
    return {"boxes": boxes, "scores": np.asarray(scores, float), "labels": labels}


def _gt(boxes, labels=None, difficult=None):
    boxes = np.asarray(boxes, float).reshape(-1, 4)
    labels = np.ones(len(boxes), int) if labels is None else np.asarray(labels)
    difficult = np.zeros(len(boxes), bool) if difficult is None else np.asarray(difficult, bool)
    return {"boxes": boxes, "labels": labels, "difficult": difficult}


A, B, FAR = [0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]


# ---------------------------------------------------------------- IoU


def test_box_iou_plus_one_convention_hand_case():
    # 0-based [0,0,9,9] and [5,0,14,9]; detectron2's xmin+1, ymin+1 gives [1,1,9,9] and [6,1,14,9]:
    # iw = 9 - 6 + 1 = 4, ih = 9 - 1 + 1 = 9, inter 36; areas 9 * 9 = 81 each; IoU = 36 / 126 = 2 / 7
    a, b = np.array([[0, 0, 9, 9]]), np.array([[5, 0, 14, 9]])
    assert box_iou_voc(a, b)[0, 0] == pytest.approx(2 / 7)
    # the same numbers read as VOC XML (1-based inclusive): iw = 5, ih = 10, inter 50, areas 100; 50 / 150
    assert box_iou_voc(a, b, zero_based=False)[0, 0] == pytest.approx(1 / 3)


def test_box_iou_zero_based_equals_continuous_iou():
    # (x2 - (x1 + 1) + 1) = x2 - x1: on 0-based boxes the +1 rule is the plain continuous IoU (torchvision's)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (2, 7, 2))
    a, b = np.concatenate([xy, xy + rng.uniform(1, 40, (2, 7, 2))], axis=-1)
    got = box_iou_voc(torch.from_numpy(a), b)
    assert got.shape == (7, 7)
    for i in range(7):
        for j in range(7):
            w = max(min(a[i, 2], b[j, 2]) - max(a[i, 0], b[j, 0]), 0)
            h = max(min(a[i, 3], b[j, 3]) - max(a[i, 1], b[j, 1]), 0)
            area = (a[i, 2] - a[i, 0]) * (a[i, 3] - a[i, 1]) + (b[j, 2] - b[j, 0]) * (b[j, 3] - b[j, 1])
            assert got[i, j] == pytest.approx(w * h / (area - w * h), abs=1e-12)


# ---------------------------------------------------------------- AP


def test_pr_curve_11_point_and_area_ap_by_hand():
    # GT A in image 0, GT B in image 1; detections 0.9 -> A (TP), 0.8 far away in image 1 (FP), 0.7 -> B (TP),
    # given out of score order. cum tp [1, 1, 2], fp [0, 1, 1]: rec [.5, .5, 1], prec [1, .5, 2/3].
    # VOC07: levels 0 .. 0.5 (6 of them) see max prec 1, levels 0.6 .. 1.0 (5) see 2/3:
    # (6 + 10/3) / 11 = 28/33
    # VOC2010: envelope [1, 1, 2/3, 2/3]: 0.5 * 1 + 0.5 * 2/3 = 5/6 -- the two rules must differ here
    preds = [_pred([A], [0.9]), _pred([B, FAR], [0.7, 0.8])]
    gts = [_gt([A]), _gt([B])]
    r07 = detection_ap(preds, gts, 1, use_07_metric=True)
    r10 = detection_ap(preds, gts, 1, use_07_metric=False)
    assert r07["AP50"] == pytest.approx(28 / 33)
    assert r10["AP50"] == pytest.approx(5 / 6)
    # exact boxes: IoU 1 passes every threshold, so AP = AP50 = AP75
    assert r07["AP"] == pytest.approx(28 / 33) and r07["AP75"] == pytest.approx(28 / 33)
    assert r07["per_class_AP50"] == [pytest.approx(28 / 33)] and r07["n_pos"] == [2]


def test_voc_class_ap_direct_and_float_levels():
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_class_ap(rec, prec, True) == pytest.approx(28 / 33)
    assert voc_class_ap(rec, prec, False) == pytest.approx(5 / 6)
    # voc_eval's np.arange(0, 1.1, 0.1) holds 0.30000000000000004: recall exactly 3/10 misses that level
    # 10 GTs, 3 exact TPs: rec reaches 0.3 with prec 1 -> levels 0, 0.1, 0.2 only -> 3/11 (not 4/11)
    gts = [_gt([[20 * k, 0, 20 * k + 10, 10] for k in range(10)])]
    preds = [_pred([[20 * k, 0, 20 * k + 10, 10] for k in range(3)], [0.9, 0.8, 0.7])]
    assert detection_ap(preds, gts, 1)["AP50"] == pytest.approx(3 / 11)


def test_detection_on_difficult_gt_is_ignored():
    # 0.9 on the difficult B: neither TP nor FP; 0.8 on A: TP. npos = 1, tp [0, 1], fp [0, 0]:
    # rec [0, 1], prec [0, 1] -> AP 1 (had it been a FP: prec [0, .5] -> AP 0.5)
    preds = [_pred([B, A], [0.9, 0.8])]
    gts = [_gt([A, B], difficult=[False, True])]
    for use07 in (True, False):
        out = detection_ap(preds, gts, 1, use_07_metric=use07)
        assert out["AP50"] == pytest.approx(1.0) and out["n_pos"] == [1]


def test_duplicate_detection_is_false_positive():
    # 0.9 -> A (TP), 0.8 -> A again (FP duplicate), 0.7 -> B (TP): the same curve as the hand case, 28/33
    preds = [_pred([A, A, B], [0.9, 0.8, 0.7])]
    out = detection_ap(preds, [_gt([A, B])], 1)
    assert out["AP50"] == pytest.approx(28 / 33)


def test_no_fallback_to_next_best_free_gt():
    # A = [0,0,10,10], C = [2,0,12,10]. det2 [0.5,0,10.5,10]: IoU(A) = 95/105, IoU(C) = 85/115 = 0.739,
    # > 0.5, but its max-IoU GT is A, already taken by det1 -> FP (voc_eval never tries C).
    # rec [.5, .5], prec [1, .5]
    # -> VOC07: levels 0 .. 0.5 see 1, the rest 0 -> 6/11 (a fallback would give 1)
    C = [2, 0, 12, 10]
    out = detection_ap([_pred([A, [0.5, 0, 10.5, 10]], [0.9, 0.8])], [_gt([A, C])], 1)
    assert out["AP50"] == pytest.approx(6 / 11)


def test_iou_threshold_is_strict_and_ap75_below_ap50():
    # det [0,0,10,6] on GT [0,0,10,10]: IoU 60/100 = 0.6 -> TP at 0.5 and 0.55, FP from 0.6 (0.6 > 0.6 false)
    preds = [{"boxes": torch.tensor([[0.0, 0, 10, 6]]), "scores": torch.tensor([0.9]),
              "labels": torch.tensor([1])}]
    gts = [{"boxes": torch.tensor([A], dtype=torch.float32), "labels": torch.tensor([1])}]  # no 'difficult'
    out = detection_ap(preds, gts, 1)
    assert out["AP50"] == 1.0 and out["AP75"] == 0.0 and out["AP75"] < out["AP50"]
    assert out["AP"] == pytest.approx(2 / 10)
    # IoU exactly 0.5 is not a match at 0.5
    assert detection_ap([_pred([[0, 0, 10, 5]], [0.9])], [_gt([A])], 1)["AP50"] == 0.0


def test_class_without_gt_is_skipped_and_class_without_detection_counts_zero():
    # class 1: one exact TP (AP 1); class 2: detections but no GT (nan, skipped);
    # class 3: GT never detected (AP 0, counted)
    preds = [_pred([A, B], [0.9, 0.8], labels=[1, 2])]
    gts = [_gt([A, FAR], labels=[1, 3])]
    out = detection_ap(preds, gts, 3)
    assert out["per_class_AP50"][0] == 1.0 and math.isnan(out["per_class_AP50"][1])
    assert out["per_class_AP50"][2] == 0.0 and out["n_pos"] == [1, 0, 1]
    assert out["AP50"] == pytest.approx(0.5) and out["AP"] == pytest.approx(0.5)


def _sequential_ap(preds, gts, thr, use07):
    """Straight per-detection loop with 'matched' flags (one class), to check the vectorised matching."""
    dets = [(s, i, b) for i, p in enumerate(preds) for b, s in zip(p["boxes"], p["scores"], strict=True)]
    dets.sort(key=lambda d: -d[0])
    used = [np.zeros(len(g["boxes"]), bool) for g in gts]
    npos = sum(int((~g["difficult"]).sum()) for g in gts)
    tp, fp = [], []
    for _, i, b in dets:
        g = gts[i]
        iou = box_iou_voc(b[None], g["boxes"])[0] if len(g["boxes"]) else np.zeros(0)
        j = int(iou.argmax()) if len(iou) else -1
        t = f = 0.0
        if j < 0 or iou[j] <= thr:
            f = 1.0
        elif not g["difficult"][j]:
            t, f = (0.0, 1.0) if used[i][j] else (1.0, 0.0)
            used[i][j] = True
        tp.append(t)
        fp.append(f)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    return voc_class_ap(tp / npos, tp / np.maximum(tp + fp, np.finfo(float).eps), use07)


def test_matches_sequential_loop_on_random_cases():
    rng = np.random.default_rng(1)
    for _ in range(30):
        preds, gts = [], []
        for _ in range(3):
            xy = rng.uniform(0, 30, (4, 2))
            g = np.round(np.c_[xy, xy + rng.uniform(4, 20, (4, 2))])
            gts.append(_gt(g, difficult=rng.random(4) < 0.25))
            p = g[rng.integers(0, 4, 6)] + rng.normal(0, 2.5, (6, 4))
            preds.append(_pred(p, rng.random(6)))
        if sum(int((~g["difficult"]).sum()) for g in gts) == 0:
            continue
        for use07 in (True, False):
            out = detection_ap(preds, gts, 1, use_07_metric=use07, thresholds=(0.5, 0.75))
            assert out["AP50"] == pytest.approx(_sequential_ap(preds, gts, 0.5, use07))
            assert out["AP75"] == pytest.approx(_sequential_ap(preds, gts, 0.75, use07))


def test_detection_ap_errors():
    with pytest.raises(ValueError, match="images"):
        detection_ap([_pred([A], [0.9])], [], 1)
    with pytest.raises(ValueError, match=r"\[k, 4\]"):
        detection_ap([{"boxes": np.zeros((1, 3)), "scores": [0.5], "labels": [1]}], [_gt([A])], 1)
    with pytest.raises(ValueError, match="1..2"):
        detection_ap([_pred([A], [0.9], labels=[0])], [_gt([A])], 2)
    with pytest.raises(ValueError, match="scores"):
        detection_ap([_pred([A, B], [0.9])], [_gt([A])], 1)
    with pytest.raises(ValueError, match="no class"):
        detection_ap([_pred([A], [0.9])], [_gt([A], difficult=[True])], 1)


# ---------------------------------------------------------------- depth


def test_depth_hand_case():
    # gt 0 is missing depth: three valid pixels, pred 2 vs gt 1, 2, 3 -> errors 1, 0, 1
    out = depth_metrics(np.full((2, 2), 2.0), np.array([[1.0, 2.0], [3.0, 0.0]]))
    assert out["rmse"] == pytest.approx(math.sqrt(2 / 3))
    # ratios max(p/g, g/p) = 2, 1, 1.5: < 1.25 -> 1 pixel; < 1.5625 -> 2; < 1.953125 -> 2
    assert (out["delta1"], out["delta2"], out["delta3"]) == pytest.approx((1 / 3, 2 / 3, 2 / 3))
    assert out["abs_rel"] == pytest.approx((1 / 1 + 0 + 1 / 3) / 3)
    assert out["log10"] == pytest.approx(math.log10(3) / 3)  # log10 2 + log10 1.5 = log10 3
    assert out["log_rmse"] == pytest.approx(math.sqrt((math.log(2) ** 2 + math.log(1.5) ** 2) / 3))


def test_depth_pooled_over_pixels_not_per_image_and_clamp():
    meter = DepthMeter()
    meter.update(np.array([[2.0]]), np.array([[1.0]]))  # image 1: error 1 on 1 pixel
    meter.update(torch.tensor([[1.0]]), torch.tensor([[1.0]]))  # image 2: error 0
    assert meter.compute()["rmse"] == pytest.approx(math.sqrt(1 / 2))  # per-image mean would be 0.5
    # a 0 (or negative) prediction is clamped to 1e-9: |log10 1e-9 - log10 1| = 9, finite
    assert depth_metrics(np.array([[0.0, -1.0]]), np.ones((1, 2)))["log10"] == pytest.approx(9.0)


def test_depth_meter_streams_like_one_shot():
    rng = np.random.default_rng(2)
    gt = rng.uniform(0.5, 10, (6, 8, 9))
    gt[rng.random(gt.shape) < 0.2] = 0.0
    gt[0, 0, 0] = np.nan  # non-finite gt is invalid too
    pred = gt * rng.uniform(0.7, 1.4, gt.shape) + 0.01
    pred[0, 0, 0] = 1.0
    meter = DepthMeter()
    for k in range(0, 6, 2):
        meter.update(torch.from_numpy(pred[k : k + 2]), gt[k : k + 2])
    meter.update(pred[5], gt[5])  # an HxW image too (counted a second time in both)
    one = depth_metrics(np.concatenate([pred, pred[5:]]), np.concatenate([gt, gt[5:]]))
    assert meter.compute() == pytest.approx(one)


def test_depth_errors():
    with pytest.raises(ValueError, match="no valid"):
        depth_metrics(np.ones((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="no valid"):
        DepthMeter().compute()
    with pytest.raises(ValueError, match="HxW"):
        depth_metrics(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        depth_metrics(np.array([[np.nan]]), np.ones((1, 1)))
