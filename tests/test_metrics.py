"""Metrics against independent computations: sklearn, brute-force loops and hand-counted contours."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from analysis import metrics


def test_top1_accuracy_from_indices_and_scores():
    labels = np.array([0, 1, 2, 1])
    assert metrics.top1_accuracy(np.array([0, 1, 1, 1]), labels) == pytest.approx(0.75)
    scores = np.eye(3)[[0, 2, 2, 1]]
    assert metrics.top1_accuracy(scores, labels) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="empty split"):
        metrics.top1_accuracy(np.zeros(0), np.zeros(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 60)
    y[0] = 1
    scores = rng.integers(0, 8, 60).astype(float)  # many ties
    assert metrics.average_precision(scores, y) == pytest.approx(average_precision_score(y, scores))
    scores = rng.normal(size=60)
    assert metrics.average_precision(scores, y) == pytest.approx(average_precision_score(y, scores))


def test_interpolated_ap_matches_pointwise_definition():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    y[:2] = 1
    s = rng.normal(size=40)
    # brute force: AP = sum over positives (in rank order) of 1/P * max precision at any rank >= its rank
    order = np.argsort(-s)
    ys = y[order]
    prec = np.cumsum(ys) / np.arange(1, 41)
    expected = sum(prec[i:].max() for i in range(40) if ys[i]) / ys.sum()
    got = metrics.average_precision(s, y, interpolated=True)
    assert got == pytest.approx(expected)
    assert got >= metrics.average_precision(s, y) - 1e-12


def test_mean_average_precision_skips_classes_without_positives():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, (30, 3))
    y[:, 2] = 0
    s = rng.normal(size=(30, 3))
    m, aps = metrics.mean_average_precision(s, y)
    assert np.isnan(aps[2])
    assert m == pytest.approx(np.mean([average_precision_score(y[:, c], s[:, c]) for c in range(2)]))
    with pytest.raises(ValueError, match="no class has a positive"):
        metrics.mean_average_precision(s, np.zeros_like(y))


def test_knn_matches_brute_force_loop():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 8, generator=g), torch.randn(9, 8, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    k, temp = 5, 0.07
    votes = metrics.knn_predict(train, labels, test, 4, k=k, temperature=temp, chunk=4)
    for i in range(9):
        sims = []
        for j in range(40):
            a, b = test[i], train[j]
            sims.append((float(a @ b / (a.norm() * b.norm())), j))
        sims.sort(reverse=True)
        expect = np.zeros(4)
        for sim, j in sims[:k]:
            expect[int(labels[j])] += np.exp(sim / temp)
        np.testing.assert_allclose(votes[i].numpy(), expect, rtol=1e-4)
        assert int(votes[i].argmax()) == int(expect.argmax())


def test_region_similarity_is_mask_iou():
    rng = np.random.default_rng(5)
    a, b = rng.random((20, 30)) > 0.5, rng.random((20, 30)) > 0.4
    inter = sum(1 for i in range(20) for j in range(30) if a[i, j] and b[i, j])
    union = sum(1 for i in range(20) for j in range(30) if a[i, j] or b[i, j])
    assert metrics.region_similarity(a, b) == pytest.approx(inter / union)
    empty = np.zeros((4, 4), bool)
    assert metrics.region_similarity(empty, empty) == 1.0
    assert metrics.region_similarity(empty, ~empty) == 0.0


def _square(top, left, size=20, shape=(100, 100)):
    m = np.zeros(shape, bool)
    m[top : top + size, left : left + size] = True
    return m


def test_contour_accuracy_small_shift_within_tolerance():
    # 100x100: tolerance ceil(0.008 * 141.4) = 2 px, so a 1 px shift matches every boundary pixel
    gt = _square(20, 20)
    assert metrics.contour_accuracy(_square(20, 21), gt) == pytest.approx(1.0)
    assert metrics.contour_accuracy(_square(21, 21), gt) == pytest.approx(1.0)
    assert metrics.contour_accuracy(gt, gt) == 1.0


def _brute_boundary(m):
    """seg2bmap by its definition, pixel by pixel: differs from the right, lower or lower-right neighbour;
    the last row compares only right, the last column only down, the corner never."""
    h, w = m.shape
    b = np.zeros_like(m, bool)
    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue
            if y == h - 1:
                b[y, x] = m[y, x] != m[y, x + 1]
            elif x == w - 1:
                b[y, x] = m[y, x] != m[y + 1, x]
            else:
                b[y, x] = m[y, x] != m[y, x + 1] or m[y, x] != m[y + 1, x] or m[y, x] != m[y + 1, x + 1]
    return b


def _brute_f(pred, gt, r):
    bp, bg = np.argwhere(_brute_boundary(pred)), np.argwhere(_brute_boundary(gt))

    def near(a, bs):
        return any((a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 <= r * r for b in bs)

    p = sum(near(a, bg) for a in bp) / len(bp)
    rc = sum(near(a, bp) for a in bg) / len(bg)
    return 0.0 if p + rc == 0 else 2 * p * rc / (p + rc)


def test_boundary_is_the_toolkit_seg2bmap():
    # 2x2 square at rows/cols 1-2 of a 5x5 image: its right column and bottom row inside, plus the column left
    # of it, the row above it and the top-left diagonal outside (half a pixel towards the origin): 8 pixels
    m = np.zeros((5, 5), bool)
    m[1:3, 1:3] = True
    expect = np.zeros((5, 5), bool)
    for y, x in [(1, 2), (2, 1), (2, 2), (0, 0), (0, 1), (0, 2), (1, 0), (2, 0)]:
        expect[y, x] = True
    np.testing.assert_array_equal(metrics.mask_boundary(m), expect)
    rng = np.random.default_rng(3)
    r = rng.random((9, 11)) > 0.5
    np.testing.assert_array_equal(metrics.mask_boundary(r), _brute_boundary(r))


def test_contour_accuracy_far_shift_against_brute_force():
    # 20x20 squares, rows 20-39 vs 30-49: boundary 80 pixels each (39 inside + 41 outside), disk radius 2
    gt, pred = _square(20, 20), _square(30, 20)
    assert metrics.mask_boundary(gt).sum() == 80
    assert metrics.contour_accuracy(pred, gt) == pytest.approx(_brute_f(pred, gt, 2))
    rng = np.random.default_rng(4)
    a, b = rng.random((30, 30)) > 0.6, rng.random((30, 30)) > 0.6
    assert metrics.contour_accuracy(a, b, bound_th=1) == pytest.approx(_brute_f(a, b, 1))
    # disjoint and far apart: nothing matches
    assert metrics.contour_accuracy(_square(70, 70), gt) == 0.0


def test_void_pixels_are_excluded_from_j_and_f():
    # object 2x2 at the top-left; the prediction adds (0, 2) (void) and (3, 3) (not void)
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    pred = gt.copy()
    pred[0, 2] = pred[3, 3] = True
    void = np.zeros((4, 4), bool)
    void[0, 2] = True
    assert metrics.region_similarity(pred, gt) == pytest.approx(4 / 6)
    assert metrics.region_similarity(pred, gt, void) == pytest.approx(4 / 5)
    # F: void pixels are cleared from both masks, so a blob predicted in void only (far from the object) is
    # no boundary error; without the void mask its boundary is unmatched
    gt, void = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    gt[2:4, 2:4] = True
    void[2:6, 7:11] = True
    spill = gt | void
    assert metrics.contour_accuracy(spill, gt, bound_th=1) < 0.6
    assert metrics.contour_accuracy(spill, gt, bound_th=1, void=void) == 1.0
    assert metrics.region_similarity(spill, gt, void) == 1.0


def test_contour_accuracy_empty_cases():
    empty = np.zeros((10, 10), bool)
    assert metrics.contour_accuracy(empty, empty) == 1.0
    assert metrics.contour_accuracy(empty, _square(2, 2, 4, (10, 10))) == 0.0


def test_confusion_matrix_and_miou_against_direct_counts():
    rng = np.random.default_rng(6)
    gt = rng.integers(0, 4, (15, 15))
    gt[0, :5] = 255
    pred = rng.integers(0, 4, (15, 15))
    conf = metrics.confusion_matrix(pred, gt, 4, ignore_index=255)
    assert conf.sum() == (gt != 255).sum()
    ious = []
    for c in range(4):
        valid = gt != 255
        tp = np.sum((pred == c) & (gt == c) & valid)
        fp = np.sum((pred == c) & (gt != c) & valid)
        fn = np.sum((pred != c) & (gt == c) & valid)
        ious.append(tp / (tp + fp + fn))
    assert metrics.mean_iou(conf) == pytest.approx(np.mean(ious))
    assert metrics.mean_iou(conf, [1, 3]) == pytest.approx((ious[1] + ious[3]) / 2)
    with pytest.raises(ValueError, match="outside"):
        metrics.confusion_matrix(np.full(3, 7), np.zeros(3, int), 4)


def test_miou_ignores_absent_classes():
    conf = metrics.confusion_matrix(np.array([0, 0, 1]), np.array([0, 0, 1]), 5)
    assert metrics.mean_iou(conf) == pytest.approx(1.0)
