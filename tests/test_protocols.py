"""Protocols on hand-made features whose correct answer is known in advance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import protocols
from analysis.targets import VOC_SEG_CLASSES, TargetError


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


def _cells(vectors, labels):
    """A 2x2 feature grid (C, 2, 2) from four vectors and its 4x4 ground truth from four 2x2 label blocks."""
    feat = torch.tensor(vectors, dtype=torch.float32).T.reshape(-1, 2, 2)
    mask = np.block([[np.array(labels[0]), np.array(labels[1])], [np.array(labels[2]), np.array(labels[3])]])
    return feat, mask.astype(np.uint8)


def test_segment_retrieval_hand_computed_settings():
    # One train and one val image of four one-cell segments (distinct one-hot-like features, K = 4).
    e = np.eye(4).tolist()
    tr_f, tr_m = _cells(e, [[[6, 6], [6, 0]], [[12, 12], [15, 0]], [[0, 0], [0, 0]], [[255] * 2] * 2])
    v2 = (np.array(e[2]) + 0.1 * np.array(e[1])).tolist()  # nearest e2, then e1
    v3 = (np.array(e[0]) + 0.1 * np.array(e[3])).tolist()  # nearest e0
    va_f, va_m = _cells(
        [e[0], e[1], v2, v3], [[[6] * 2] * 2, [[12, 12], [15, 15]], [[0, 0], [0, 8]], [[0] * 2] * 2]
    )
    kw = {"classes": VOC_SEG_CLASSES, "n_segments": 4}
    res = protocols.segment_retrieval([tr_f], [tr_m], [va_f], [va_m], **kw)
    # 21 classes, bank: bus (3 of 4), dog (2 of 4), background (4 of 4); the all-void segment is dropped.
    # val: bus 4 TP + 4 FP -> 1/2; dog 2 TP + 2 FP -> 1/2; person 2 FN -> 0; background TP 3, FP 1, FN 4 ->
    # 3/8; cat 1 FN -> 0.  mean over the 5 occurring classes.
    assert res["settings"]["n_train_regions"] == 3
    assert res["mIoU_21"] == pytest.approx((0.5 + 0.5 + 0 + 3 / 8 + 0) / 5)
    # 7 classes: dog -> ignore in bank and val. Bank: bus, person (person 1 vs background 1, tie to the higher
    # id as MaskContrast's max((count, class))), background. val: bus 1/2, person 2 TP (dog pixels ignored) ->
    # 1, cat 0; background is not in the mean.
    assert res["mIoU_7"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert res["iou_per_class_7"]["person"] == pytest.approx(1.0) and res["iou_per_class"]["person"] == 0.0
    # MaskContrast's literal vote: background never in the bank, so v2 retrieves dog: dog 2 TP + 6 FP -> 1/4,
    # background 0
    drop = protocols.segment_retrieval([tr_f], [tr_m], [va_f], [va_m], background="drop", **kw)
    assert drop["settings"]["n_train_regions"] == 2 and drop["settings"]["background"] == "drop"
    assert drop["mIoU_21"] == pytest.approx((0.5 + 0.25 + 0 + 0 + 0) / 5)


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


def test_context_frames_match_videowalk_padding():
    # videowalk: pad with n copies of frame 0 (vos.make_paths), padded query t + n has keys t .. t + n - 1
    # (context_index_bank) plus the long memory frame 0
    n, t_len = 3, 6
    padded = [max(0, i - n) for i in range(t_len + n)]
    for t in range(1, t_len):
        assert protocols.context_frames(t, n) == [0, *(padded[t + i] for i in range(n))]
    assert protocols.context_frames(1, 3) == [0, 0, 0, 0]
    assert protocols.context_frames(2, 3) == [0, 0, 0, 1]
    assert protocols.context_frames(5, 3) == [0, 2, 3, 4]
    assert protocols.context_frames(4, 0) == [0]


def test_radius_mask_is_strict():
    assert torch.equal(protocols.radius_mask(1, 3, 1), torch.eye(3, dtype=torch.bool))
    near = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    assert torch.equal(protocols.radius_mask(1, 3, 2), near)  # distance 2 is not < 2
    assert torch.equal(protocols.radius_mask(1, 3, 2.01), torch.ones(3, 3, dtype=torch.bool))


_E1, _E2 = [1.0, 0.0], [0.0, 1.0]


def _frames(*rows):
    """(T, C=2, 1, w) features from per-frame lists of 2-d vectors."""
    return torch.tensor(rows).permute(0, 2, 1)[:, :, None, :]


def test_propagation_hand_computed_long_memory_and_strict_radius():
    # frame 0: cells (e1 label 1, e2 label 0); frame 1 swaps them. radius 1 keeps only the same cell in the
    # recent frames (two frame-0 copies, context 2); frame 0 as long memory is not masked. T = 1, top-2.
    # cell 0 of frame 1 (e2): candidates long (0: sim 0, label 1), (1: sim 1, label 0), copies (0: sim 0, l 1)
    # -> top-2 = sim 1 (label 0) + a sim 0 (label 1): p(label 0) = e / (e + 1). Masking frame 0 too would
    # give label 1 only; radius <= 1 would add the copies' cell 1 (sim 1, label 0) -> p(label 0) = 1.
    feats = _frames([_E1, _E2], [_E2, _E1])
    soft = protocols.propagate_soft(
        feats, np.array([[1, 0]]), 2, topk=2, context=2, radius=1, temperature=1.0
    )
    p = np.e / (np.e + 1)
    np.testing.assert_allclose(soft[0, :, 0].numpy(), [[0, 1], [1, 0]], atol=1e-6)
    np.testing.assert_allclose(soft[1, :, 0].numpy(), [[p, 1 - p], [1 - p, p]], rtol=1e-5)
    pred = protocols.propagate_labels(feats, np.array([[1, 0]]), 2, (1, 2), topk=2, context=2, radius=1,
                                      temperature=1.0)  # fmt: skip
    np.testing.assert_array_equal(pred, [[[1, 0]], [[0, 1]]])


def test_propagation_counts_the_frame0_padding_copies():
    # frame 1 = frame 0. cell 0 (e1) at top-3: long (0: sim 1, l 1), (1: sim 0, l 0) and the two padded copies'
    # cell 0 (sim 1, label 1) -> three sim-1 keys of label 1: p(label 1) = 1. Without the padding only two keys
    # exist and p(label 1) = e / (e + 1).
    feats = _frames([_E1, _E2], [_E1, _E2])
    soft = protocols.propagate_soft(
        feats, np.array([[1, 0]]), 2, topk=3, context=2, radius=1, temperature=1.0
    )
    np.testing.assert_allclose(soft[1, :, 0].numpy(), [[0, 1], [1, 0]], atol=1e-6)
    no_pad = protocols.propagate_soft(feats, np.array([[1, 0]]), 2, topk=3, context=0, radius=1,
                                      temperature=1.0)  # fmt: skip
    p = np.e / (np.e + 1)
    np.testing.assert_allclose(no_pad[1, :, 0].numpy(), [[1 - p, p], [p, 1 - p]], rtol=1e-5)


def test_first_frame_labels_resized_bilinearly():
    # 1x8 labels -> 1x2 grid: half-pixel centres sample x = 1.5 and 5.5, the mean of pixels (1, 2) and (5, 6)
    # (cv2 INTER_LINEAR in videowalk); area averaging would give 0.25 for the first cell
    labels = np.array([[0, 1, 0, 0, 0, 0, 1, 1]])
    soft = protocols.propagate_soft(_frames([_E1, _E2]), labels, 2)
    np.testing.assert_allclose(soft[0, 1, 0].numpy(), [0.5, 0.5], atol=1e-6)


def test_label_propagation_radius_does_not_restrict_frame0():
    # radius 0 masks every recent key; the long memory (frame 0) still finds the moving object anywhere
    feats, masks = _toy_video(stride=1)
    pred = protocols.propagate_labels(feats, masks[0], 3, masks.shape[1:], radius=0, context=3)
    np.testing.assert_array_equal(pred, masks)


def test_davis_scores_exclude_void_pixels():
    gt = np.zeros((10, 10), np.int64)
    gt[2:6, 2:6] = 1
    gt[2:6, 6:8] = 255  # void next to the object
    pred = np.zeros((10, 10), np.int64)
    pred[2:6, 2:8] = 1  # the object spills into the void only
    j, f = protocols.davis_scores([gt, pred, gt], [gt, gt, gt], [1])
    assert j == [1.0] and f == [1.0]
    j, f = protocols.davis_scores([gt, pred, gt], [gt, gt, gt], [1], void_label=None)
    assert j == [pytest.approx(16 / 24)] and f[0] < 1.0


def test_davis_instances_palette_and_binary_masks():
    lut, n, binary = protocols.davis_instances(np.array([[0, 2, 5], [255, 0, 2]], np.uint8))
    assert (n, binary) == (2, False) and lut[2] == 1 and lut[5] == 2 and lut[255] == 255 and lut[0] == 0
    lut, n, binary = protocols.davis_instances(np.array([[0, 255], [255, 0]], np.uint8))  # DAVIS-2016 style
    assert (n, binary) == (1, True) and lut[255] == 1 and lut[0] == 0
    assert protocols.davis_instances(np.zeros((2, 2), np.uint8))[1] == 0


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


def test_one_image_per_class_takes_the_first_id_of_each_class():
    ids = ["b/3.jpg", "a/2.jpg", "a/1.jpg", "c/9.jpg", "b/0.jpg", "a/0.jpg"]
    labels = np.array([1, 0, 0, 2, 1, 0])
    assert protocols.one_image_per_class(ids, labels, 10) == [5, 4, 3]  # a/0, b/0, c/9: class order
    assert protocols.one_image_per_class(ids, labels, 2) == [5, 4]
    # a class without a test image is skipped, the next one fills its column
    assert protocols.one_image_per_class(ids, labels, 2, n_classes=4) == [5, 4]
    assert protocols.one_image_per_class(ids, np.array([0, 0, 0, 3, 0, 0]), 3, n_classes=4) == [5, 3]
    # multi-label: an image counts for each of its classes but is shown once
    multi = np.array([[1, 1], [1, 0], [0, 1]], np.int8)
    assert protocols.one_image_per_class(["x0", "x1", "x2"], multi, 5) == [0, 2]


def _cam_world(root, n_train=2, n_val=2):
    """Three colour classes on 40 px images; val files written in reverse name order."""
    from PIL import Image

    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, col in colours.items():
            for i in reversed(range(n)):
                arr = np.clip(np.asarray(col)[None, None] + rng.integers(-30, 30, (40, 40, 3)), 0, 255)
                path = root / split / c / f"{c}_{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr.astype(np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def cam_setup(tmp_path_factory):
    import torchvision

    tmp = tmp_path_factory.mktemp("cam")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)  # standard stem: stride 32, 2 x 2 maps at 64 px
    net.fc = torch.nn.Identity()
    ckpt = tmp / "checkpoint.pt"
    torch.save({"backbone": net.state_dict(), "arch": "resnet18", "small_input": False, "feat_dim": 512}, ckpt)
    return ckpt, _cam_world(tmp / "cls"), tmp


def test_cam_protocol_one_image_per_class_at_7x7_with_predictions(cam_setup):
    from analysis import transfer

    ckpt, root, tmp = cam_setup
    cfg = {"protocol": "cam", "format": "imagefolder", "root": str(root), "image_size": 64, "max_iter": 30,
           "wd_grid": [1e-3]}  # fmt: skip
    out = tmp / "transfer" / "syn_cams.json"
    res = transfer.run_target(ckpt, "syn_cams", cfg, tmp / "features", device="cpu", out=out, progress=False)
    s = res["settings"]
    assert s["cam_size"] == 224 and s["cam_map_shape"] == [7, 7] and res["metrics"]["n_maps"] == 3
    with np.load(out.with_suffix(".cam.npz")) as z:
        assert z["cams"].shape == (3, 7, 7) and z["images"].shape == (3, 224, 224, 3)
        assert [str(i).split("/")[-1] for i in z["ids"]] == ["blue_0.jpg", "green_0.jpg", "red_0.jpg"]
        assert z["class_names"].tolist() == ["blue", "green", "red"]  # the true labels, one class per image
        assert len(z["pred_names"]) == 3 and set(z["pred_names"]) <= {"blue", "green", "red"}
        assert z["pred_names"].tolist() == s["pred_names"] and z["class_names"].tolist() == s["true_names"]
        assert z["cams"].min() == 0.0 and z["cams"].max() == 1.0
    # cam_size: null falls back to image_size (the old 2 x 2 maps), with n_images classes only
    out2 = tmp / "transfer" / "small.json"
    res2 = transfer.run_target(ckpt, "syn_cams", {**cfg, "cam_size": None, "n_images": 2}, tmp / "features",
                               device="cpu", out=out2, progress=False)  # fmt: skip
    assert res2["settings"]["cam_size"] == 64 and res2["settings"]["cam_map_shape"] == [2, 2]
    assert res2["settings"]["true_names"] == ["blue", "green"]
    res3 = transfer.run_target(ckpt, "syn_cams", {**cfg, "cam_size": 96, "n_images": 1}, tmp / "features",
                               device="cpu", out=tmp / "transfer" / "s96.json", progress=False)  # fmt: skip
    assert res3["settings"]["cam_size"] == 96 and res3["settings"]["cam_map_shape"] == [3, 3]
    with pytest.raises(TargetError, match="cam_size: must be 'auto'"):
        transfer.run_target(ckpt, "syn_cams", {**cfg, "cam_size": "big"}, tmp / "features", device="cpu",
                            progress=False)  # fmt: skip
