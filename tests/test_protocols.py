"""Protocols on hand-made features whose correct answer is known in advance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import protocols
from analysis.targets import VOC_SEG_CLASSES


def _blobs(n_per, n_classes, dim, seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(99)) * 5
    y = torch.arange(n_classes).repeat_interleave(n_per)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_linear_probe_separable_single_label():
    xtr, ytr = _blobs(20, 3, 10, 0)
    xte, yte = _blobs(10, 3, 10, 1)
    res = protocols.linear_probe(xtr, ytr, xte, yte, 3, wd_grid=[1e-4, 1e-2], max_iter=50)
    assert res["top1"] == pytest.approx(1.0)
    assert res["settings"]["weight_decay"] in (1e-4, 1e-2)
    assert set(res["settings"]["val_scores"]) == {"0.0001", "0.01"}


def test_linear_probe_multilabel_map():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(120, 6, generator=g)
    y = (x[:, :3] > 0).to(torch.int8)  # class c present iff feature c positive: linearly separable
    res = protocols.linear_probe(
        x[:80], y[:80], x[80:], y[80:], 3, multilabel=True, wd_grid=[1e-5], max_iter=100
    )
    assert res["mAP"] > 0.99


def test_probe_effective_weights_act_on_raw_features():
    xtr, ytr = _blobs(10, 2, 5, 3)
    probe = protocols.train_linear_probe(xtr, ytr, 2, wd_grid=[1e-3], max_iter=30)
    x = torch.randn(4, 5)
    torch.testing.assert_close(
        probe.logits(x), x @ probe.effective_weight.T + probe.effective_bias, atol=1e-4, rtol=1e-4
    )


def test_knn_protocol_on_clusters():
    xtr, ytr = _blobs(15, 4, 8, 4)
    xte, yte = _blobs(5, 4, 8, 5)
    res = protocols.knn_classify(xtr, ytr, xte, yte, 4)
    assert res["top1"] == pytest.approx(1.0)
    assert res["settings"] == {"k": 20, "temperature": 0.07, "k_used": 20}


def test_voc07_svm_separable():
    g = torch.Generator().manual_seed(6)
    y = (torch.rand(90, 4, generator=g) > 0.6).to(torch.int8)
    y[:4] = torch.eye(4, dtype=torch.int8)  # every class has a positive
    x = torch.cat(
        [y.float() * 3 + 0.1 * torch.randn(90, 4, generator=g), torch.randn(90, 4, generator=g) * 0.1], 1
    )
    x = x + 1.0  # keep features away from the origin so L2 normalisation keeps the classes apart
    res = protocols.voc07_svm(x[:60], y[:60].numpy(), x[60:], y[60:].numpy())
    assert res["mAP"] > 0.99
    assert res["settings"]["C"] == 0.5 and res["settings"]["class_weight"] == {"1": 2.0, "-1": 1}


def test_voc07_svm_skips_class_without_train_positive():
    x = torch.randn(20, 3) + 2
    y = np.zeros((20, 2), np.int8)
    y[::2, 0] = 1
    res = protocols.voc07_svm(x[:10], y[:10], x[10:], y[10:])
    assert res["settings"]["classes_without_train_positives"] == [1]
    assert res["ap_per_class"][1] is None


def test_kmeans_recovers_separated_blobs():
    x, y = _blobs(12, 3, 4, 7, spread=0.1)
    assign = protocols.kmeans(x, 3, seed=0)
    for c in range(3):
        assert len(torch.unique(assign[y == c])) == 1
    assert len(torch.unique(assign)) == 3


def _piecewise_image(seed, vectors, cls_ids, grid=(4, 4), stride=8):
    rng = np.random.default_rng(seed)
    cells = rng.choice(cls_ids, size=grid)
    feat = vectors[torch.from_numpy(cells)].permute(2, 0, 1)  # (C, h, w)
    mask = np.kron(cells, np.ones((stride, stride), np.uint8)).astype(np.uint8)
    mask[0, :3] = 255  # void pixels are ignored
    return feat, mask


def test_segment_retrieval_piecewise_constant_features_is_perfect():
    cls_ids = [0, 1, 6]  # background, aeroplane, bus
    vectors = torch.randn(21, 8, generator=torch.Generator().manual_seed(0))
    train = [_piecewise_image(s, vectors, cls_ids) for s in range(4)]
    val = [_piecewise_image(s, vectors, cls_ids) for s in range(10, 13)]
    res = protocols.segment_retrieval(
        [f for f, _ in train], [m for _, m in train], [f for f, _ in val], [m for _, m in val],
        classes=VOC_SEG_CLASSES,
    )  # fmt: skip
    assert res["mIoU_21"] == pytest.approx(1.0)
    assert res["mIoU_7"] == pytest.approx(1.0)
    assert res["iou_per_class"]["bus"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not among the classes"):
        protocols.segment_retrieval(
            [train[0][0]],
            [train[0][1]],
            [val[0][0]],
            [val[0][1]],
            classes=VOC_SEG_CLASSES,
            subset_classes=["dragon"],
        )


def _toy_video(t_len=5, h=4, w=12, stride=4):
    """Object 1 (rows 1-2) moves one cell right per frame, object 2 (row 3) is static. Features are one-hot
    codes of the scene content under each cell, so correspondences are exact."""
    feats = torch.zeros(t_len, h * w, h, w)
    cells = np.zeros((t_len, h, w), np.int64)
    for t in range(t_len):
        for y in range(h):
            for x in range(w):
                cx = max(x - t, 0) if y in (1, 2) else x
                feats[t, y * w + cx, y, x] = 1.0
        cells[t, 1:3, 2 + t : 5 + t] = 1
        cells[t, 3, 8:11] = 2
    masks = np.stack([np.kron(c, np.ones((stride, stride), np.int64)) for c in cells])
    return feats, masks


def test_label_propagation_follows_exact_correspondences():
    feats, masks = _toy_video(stride=1)  # at feature resolution no upsampling rounds the corners
    pred = protocols.propagate_labels(feats, masks[0], 3, masks.shape[1:], chunk=7)
    np.testing.assert_array_equal(pred, masks)
    j, f = protocols.davis_scores(list(pred), list(masks), [1, 2])
    assert j == [1.0, 1.0] and f == [1.0, 1.0]
    res = protocols.summarise_davis({"toy": (j, f)}, {})
    assert res["JF_mean"] == 1.0 and res["n_objects"] == 2


def test_label_propagation_upsampled_only_rounds_corners():
    # bilinear upsampling of one-hot cells flips at most the corner pixels of each object
    feats, masks = _toy_video(stride=4)
    pred = protocols.propagate_labels(feats, masks[0], 3, masks.shape[1:])
    wrong = (pred[1:] != masks[1:]).sum(axis=(1, 2))
    assert wrong.max() <= 2 * 4 * 3  # 2 objects x 4 corners x 3 pixels (the corner's own and two edge ones)
    j, _ = protocols.davis_scores(list(pred), list(masks), [1, 2])
    assert min(j) > 0.9


def test_label_propagation_radius_blocks_far_matches():
    # with radius 0 and no context, a moving object can only be found at its old place: it stays put
    feats, masks = _toy_video(stride=1)
    pred = protocols.propagate_labels(feats, masks[0], 3, masks.shape[1:], radius=0, context=0)
    assert not np.array_equal(pred[2], masks[2])
    j, _ = protocols.davis_scores(list(pred), list(masks), [1, 2])
    assert j[0] < 1.0 and j[1] == 1.0


def test_davis_scores_needs_frames_to_score():
    with pytest.raises(ValueError, match="no annotated frame"):
        protocols.davis_scores([np.zeros((2, 2))] * 2, [np.zeros((2, 2))] * 2, [1])


def test_cam_peaks_where_the_weighted_channel_fires():
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, 0, 1, 2] = 5.0
    maps[1, 2, 3, 0] = 2.0
    maps[1, 0] = 1.0
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    cams = protocols.class_activation_maps(maps, weight, [0, 1])
    assert cams.shape == (2, 4, 4)
    assert np.unravel_index(cams[0].argmax(), (4, 4)) == (1, 2)
    assert np.unravel_index(cams[1].argmax(), (4, 4)) == (3, 0)
    assert cams.min() == 0.0 and cams.max() == 1.0
