"""Dense fine-tuning targets (analysis.dense_targets): VOC detection / segmentation (train_aug), Cityscapes,
NYU Depth v2, each from a tiny hand-written tree in the real layout, plus the synthetic world's NYUD."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat, savemat

from analysis import dense_targets as dt
from analysis.targets import EmptySplitError, TargetError, TargetNotFoundError, load_split
from data_prep import render
from data_prep.synthetic import WorldSpec, make_world, tiny_spec


def _jpg(path: Path, w: int = 8, h: int = 6, colour: tuple[int, int, int] = (10, 200, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


def _png(path: Path, arr: np.ndarray, mode: str = "P") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8)).convert(mode)
    if mode == "P":  # a full palette, as VOC's PNGs have (else the writer may renumber the used indices)
        im.putpalette([(k * 37 + c * 91) % 256 for k in range(256) for c in range(3)])
    im.save(path)


def _lines(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids))


# ----------------------------------------------------------------------------------------------- voc_det


def _xml(objs: list[tuple[str, int, tuple[str, str, str, str]]]) -> str:
    body = "".join(
        f"<object><name>{n}</name><pose>Left</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, d, b in objs
    )
    return f"<annotation><folder>VOC</folder><size><width>8</width><height>6</height></size>{body}</annotation>"


def _voc_det_year(root: Path, year: int, images: dict[str, str], sets: dict[str, list[str]]) -> Path:
    voc = root / f"VOC{year}"
    for i, xml in images.items():
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{i}.xml").write_text(xml)
        _jpg(voc / "JPEGImages" / f"{i}.jpg")
    for name, ids in sets.items():
        _lines(voc / "ImageSets" / "Main" / f"{name}.txt", ids)
    return voc


@pytest.fixture()
def voc_det_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit"
    _voc_det_year(root, 2007, {
        "000005": _xml([("chair", 0, ("263", "211", "324", "339")), ("person", 1, ("5", "1", "8", "6"))]),
        "000007": _xml([("car", 0, ("141.5", "50", "500", "330"))]),
        "000009": _xml([]),  # no object: kept
    }, {"trainval": ["000005", "000007", "000009"], "test": ["000007"]})
    _voc_det_year(root, 2012, {"2008_000002": _xml([("tvmonitor", 0, ("34", "11", "448", "293"))])},
                  {"trainval": ["2008_000002"]})
    return root


def test_voc_det_boxes_labels_difficult(voc_det_root: Path) -> None:
    s = dt.read_voc_det("det", voc_det_root, "2007_trainval")
    assert s.ids == ["2007/000005", "2007/000007", "2007/000009"] and len(s) == 3
    assert s.classes[0] == "aeroplane" and len(s.classes) == 20
    b = s.boxes[0]
    assert b.dtype == np.float32 and b.shape == (2, 4)
    np.testing.assert_array_equal(b, [[262, 210, 324, 339], [4, 0, 8, 6]])  # xmin/ymin - 1, xmax/ymax as is
    assert s.labels[0].dtype == np.int64 and s.labels[0].tolist() == [9, 15]  # chair, person (1-based)
    assert s.difficult[0].tolist() == [False, True]
    np.testing.assert_allclose(s.boxes[1], [[140.5, 49, 500, 330]])
    assert s.boxes[2].shape == (0, 4) and s.labels[2].shape == (0,) and s.difficult[2].shape == (0,)
    assert s.load(0).mode == "RGB" and s.load(0).size == (8, 6)
    assert s.fingerprint != dt.read_voc_det("det", voc_det_root, "2007_test").fingerprint


def test_voc_det_07_plus_12_and_dispatch(voc_det_root: Path) -> None:
    s = dt.read_voc_det("det", voc_det_root, "2007_trainval+2012_trainval")
    assert s.ids == ["2007/000005", "2007/000007", "2007/000009", "2012/2008_000002"]
    assert s.labels[3].tolist() == [20] and s.paths[3].endswith("VOC2012/JPEGImages/2008_000002.jpg")
    cfg = {"format": "voc_det", "root": str(voc_det_root)}
    assert load_split("det", cfg, "train").ids == s.ids  # default train split is 07+12
    assert load_split("det", cfg, "test").ids == ["2007/000007"]
    # a part without a year takes the config's `year`
    assert load_split("det", {**cfg, "splits": {"train": "trainval"}, "year": 2012}, "train").ids == ["2012/2008_000002"]


def test_voc_det_errors(voc_det_root: Path, tmp_path: Path) -> None:
    import shutil

    shutil.rmtree(voc_det_root / "VOC2012")
    with pytest.raises(TargetNotFoundError, match=r"VOC2012 does not exist.*Annotations"):
        dt.read_voc_det("det", voc_det_root, "2007_trainval+2012_trainval")
    bad = voc_det_root / "VOC2007" / "Annotations" / "000007.xml"
    bad.write_text(_xml([("unicorn", 0, ("1", "1", "2", "2"))]))
    with pytest.raises(TargetError, match=r"000007\.xml.*unknown class 'unicorn'"):
        dt.read_voc_det("det", voc_det_root, "2007_trainval")
    bad.write_text("<annotation><object>")
    with pytest.raises(TargetError, match=r"000007\.xml is malformed XML"):
        dt.read_voc_det("det", voc_det_root, "2007_trainval")
    with pytest.raises(TargetNotFoundError, match=r"ImageSets/Main/val\.txt"):
        dt.read_voc_det("det", voc_det_root, "2007_val")
    with pytest.raises(TargetError, match="<year>_<imageset>"):
        dt.read_voc_det("det", voc_det_root, "2007-trainval")


# ----------------------------------------------------------------------------------------------- voc_seg


def _voc_seg_2012(root: Path) -> Path:
    voc = root / "VOC2012"
    seg = voc / "ImageSets" / "Segmentation"
    _lines(seg / "train.txt", ["2007_000032", "2007_000039"])
    _lines(seg / "val.txt", ["2007_000033", "2008_000003"])
    for i in ["2007_000032", "2007_000039", "2007_000033", "2008_000003", "2008_000001", "2008_000002"]:
        _jpg(voc / "JPEGImages" / f"{i}.jpg")
    for k, i in enumerate(["2007_000032", "2007_000039", "2007_000033", "2008_000003"]):
        _png(voc / "SegmentationClass" / f"{i}.png", np.full((6, 8), k + 1))
    return root


def _sbd(root: Path, masks: dict[str, np.ndarray], train: list[str], val: list[str]) -> Path:
    ds = root / "benchmark_RELEASE" / "dataset"
    (ds / "cls").mkdir(parents=True)
    for i, m in masks.items():
        savemat(ds / "cls" / f"{i}.mat", {"GTcls": {"Segmentation": m.astype(np.uint8), "CategoriesPresent": 1}})
    _lines(ds / "train.txt", train)
    _lines(ds / "val.txt", val)
    return root / "benchmark_RELEASE"


def test_voc_seg_year_and_backwards_compatible_default(tmp_path: Path) -> None:
    root = _voc_seg_2012(tmp_path / "devkit")
    s = load_split("seg", {"format": "voc_seg", "root": str(root), "year": 2012}, "train")
    assert s.images[0].endswith("VOC2012/JPEGImages/2007_000032.jpg") and s.load_mask(1).max() == 2
    with pytest.raises(TargetNotFoundError, match="VOC2007"):  # year defaults to 2007 as before
        load_split("seg", {"format": "voc_seg", "root": str(root)}, "train")


def test_voc_seg_train_aug_from_segmentation_class_aug(tmp_path: Path) -> None:
    root = _voc_seg_2012(tmp_path / "devkit")
    voc = root / "VOC2012"
    _lines(voc / "ImageSets" / "Segmentation" / "train_aug.txt", ["2007_000032", "2008_000001"])
    aug = np.array([[0, 1, 255], [15, 15, 0]])
    _png(voc / "SegmentationClassAug" / "2008_000001.png", aug, "L")  # DeepLab ships grey PNGs
    _png(voc / "SegmentationClassAug" / "2007_000032.png", np.ones((6, 8)), "L")
    s = dt.read_voc_seg("seg", root, "train_aug", year=2012)
    assert s.ids == [str(voc / "JPEGImages" / f"{i}.jpg") for i in ["2007_000032", "2008_000001"]]
    m = s.load_mask(1)
    assert m.dtype == np.uint8 and m.shape == (2, 3) and (m == aug).all()
    assert s.classes[0] == "background" and len(s.classes) == 21


def test_voc_seg_train_aug_from_sbd(tmp_path: Path) -> None:
    root = _voc_seg_2012(tmp_path / "devkit")
    sbd_masks = {i: np.full((6, 8), 7 + k) for k, i in enumerate(["2007_000039", "2008_000001", "2008_000002",
                                                                  "2008_000003"])}
    sbd_masks["2008_000002"][0, :3] = [0, 12, 20]
    sbd = _sbd(tmp_path, sbd_masks, train=["2008_000001", "2008_000003", "2007_000039"], val=["2008_000002"])
    with pytest.raises(TargetNotFoundError, match=r"train_aug\.txt.*sbd_root"):
        dt.read_voc_seg("seg", root, "train_aug", year=2012)
    cfg = {"format": "voc_seg", "root": str(root), "year": 2012, "sbd_root": str(sbd), "splits": {"train": "train_aug"}}
    s = load_split("seg", cfg, "train")
    ids = [Path(p).stem for p in s.images]
    # VOC train + SBD train + SBD val, minus VOC val (2008_000003), de-duplicated and sorted
    assert ids == ["2007_000032", "2007_000039", "2008_000001", "2008_000002"]
    assert s.masks[1].endswith("SegmentationClass/2007_000039.png")  # VOC train ids keep their VOC mask
    assert s.masks[2].endswith("dataset/cls/2008_000001.mat")
    assert (s.load_mask(1) == 2).all()
    m = s.load_mask(3)
    assert m.dtype == np.uint8 and m.shape == (6, 8) and m[0, :4].tolist() == [0, 12, 20, 9]
    assert s.load(2).mode == "RGB" and len(s) == 4 and s.fingerprint
    (sbd / "dataset" / "cls" / "2008_000002.mat").unlink()
    with pytest.raises(TargetNotFoundError, match=r"2008_000002\.mat"):
        load_split("seg", cfg, "train")


# ----------------------------------------------------------------------------------------------- cityscapes


def test_cityscapes_train_ids(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    stem = "aachen_000000_000019"
    _jpg(root / "leftImg8bit" / "train" / "aachen" / f"{stem}_leftImg8bit.png")
    ids = np.array([[7, 26, 0], [24, 7, 1]])  # road, car, unlabeled / person, road, ego vehicle
    _png(root / "gtFine" / "train" / "aachen" / f"{stem}_gtFine_labelIds.png", ids, "L")
    s = load_split("city", {"format": "cityscapes", "root": str(root)}, "train")
    assert len(s) == 1 and s.classes[0] == "road" and s.classes[13] == "car" and len(s.classes) == 19
    m = s.load_mask(0)
    assert m.dtype == np.uint8 and m.tolist() == [[0, 13, 255], [11, 0, 255]]
    assert s.load(0).mode == "RGB"
    with pytest.raises(TargetNotFoundError, match=r"leftImg8bit/val does not exist.*_gtFine_labelIds\.png"):
        load_split("city", {"format": "cityscapes", "root": str(root)}, "test")  # default test split: val
    with pytest.raises(TargetNotFoundError, match=r"missing.*leftImg8bit/<split>/<city>/\*_leftImg8bit\.png"):
        dt.read_cityscapes("city", tmp_path / "missing", "train")


# ----------------------------------------------------------------------------------------------- nyud_depth


def _nyud(root: Path, n: int = 3, h: int = 3, w: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB stores H x W x 3 x N; h5py sees it reversed: (N, 3, W, H)."""
    root.mkdir(parents=True, exist_ok=True)
    rgb = np.arange(n * h * w * 3, dtype=np.uint8).reshape(n, h, w, 3)
    depth = (np.arange(n * h * w, dtype=np.float32).reshape(n, h, w) + 1) / 10
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "w") as f:
        f["images"] = rgb.transpose(0, 3, 2, 1)
        f["depths"] = depth.transpose(0, 2, 1)
    savemat(root / "splits.mat", {"trainNdxs": np.array([[1.0], [3.0]]), "testNdxs": np.array([[2.0]])})
    return rgb, depth


def test_nyud_depth_orientation_and_splits(tmp_path: Path) -> None:
    rgb, depth = _nyud(tmp_path / "nyud")
    cfg = {"format": "nyud_depth", "root": str(tmp_path / "nyud")}
    tr, te = load_split("nyud", cfg, "train"), load_split("nyud", cfg, "test")
    assert tr.ids == ["nyud/00001", "nyud/00003"] and te.ids == ["nyud/00002"] and len(tr) == 2
    d = tr.load_depth(1)
    assert d.dtype == np.float32 and d.shape == (3, 4)
    np.testing.assert_array_equal(d, depth[2])
    assert d[0, 1] == pytest.approx(depth[2, 0, 1])  # row 0, column 1: not transposed
    im = te.load(0)
    assert im.mode == "RGB" and im.size == (4, 3)
    np.testing.assert_array_equal(np.asarray(im), rgb[1])
    assert tuple(np.asarray(im)[2, 3]) == tuple(rgb[1, 2, 3])
    # picklable for DataLoader workers after use: the copy reopens the file
    copy = pickle.loads(pickle.dumps(tr))
    np.testing.assert_array_equal(copy.load_depth(0), depth[0])
    assert tr.fingerprint != te.fingerprint
    tr.close()
    copy.close()


def test_nyud_depth_errors(tmp_path: Path) -> None:
    _nyud(tmp_path / "nyud")
    (tmp_path / "nyud" / "splits.mat").unlink()
    with pytest.raises(TargetNotFoundError, match=r"splits\.mat does not exist.*trainNdxs"):
        dt.read_nyud_depth("nyud", tmp_path / "nyud", "train")
    savemat(tmp_path / "nyud" / "splits.mat", {"trainNdxs": np.array([[0.0]]), "testNdxs": np.zeros((0, 1))})
    with pytest.raises(TargetError, match="1-based"):
        dt.read_nyud_depth("nyud", tmp_path / "nyud", "train")
    with pytest.raises(EmptySplitError):
        dt.read_nyud_depth("nyud", tmp_path / "nyud", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetNotFoundError, match=r"nyu_depth_v2_labeled\.mat does not exist"):
        dt.read_nyud_depth("nyud", tmp_path / "empty", "train")


# ----------------------------------------------------------------------------------------------- synthetic NYUD


@pytest.fixture(scope="module")
def nyud_world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, WorldSpec]:
    spec = WorldSpec.from_dict({**tiny_spec().to_dict(), "nyud": {"splits": {"train": 24, "test": 8}}})
    return make_world(tmp_path_factory.mktemp("world"), spec, only=["nyud"]) / "nyud", spec


def test_synthetic_nyud_is_the_real_layout(nyud_world: tuple[Path, WorldSpec]) -> None:
    root, spec = nyud_world
    s = spec.nyud
    with pytest.raises(NotImplementedError, match="v7.3"):  # a MATLAB v7.3 file, as the real one
        loadmat(str(root / "nyu_depth_v2_labeled.mat"))
    with h5py.File(root / "nyu_depth_v2_labeled.mat", "r") as f:
        n = s.splits["train"] + s.splits["test"]
        assert f["images"].shape == (n, 3, s.width, s.height) and f["images"].dtype == np.uint8
        assert f["depths"].shape == (n, s.width, s.height) and f["depths"].dtype == np.float32
    m = loadmat(str(root / "splits.mat"))
    tr, te = m["trainNdxs"].ravel().astype(int), m["testNdxs"].ravel().astype(int)
    assert m["trainNdxs"].shape == (s.splits["train"], 1)
    assert sorted([*tr, *te]) == list(range(1, n + 1))


def test_synthetic_nyud_depth_follows_objects(nyud_world: tuple[Path, WorldSpec]) -> None:
    root, spec = nyud_world
    s = spec.nyud
    split = load_split("nyud", {"format": "nyud_depth", "root": str(root)}, "train")
    room = render.room_depth(s.width, s.height, *s.depth_range)
    assert len(split) == s.splits["train"]
    per_class: dict[int, list[tuple[float, float]]] = {}
    for i in range(len(split)):
        d, lab = split.load_depth(i), split.load_labels(i)
        assert d.shape == (s.height, s.width) and (d > 0).all() and (d <= 10).all()
        assert np.asarray(split.load(i)).shape == (s.height, s.width, 3)
        bg = lab == 0
        np.testing.assert_allclose(d[bg], room[bg], rtol=1e-6)  # the room: far at the top, near at the bottom
        assert (d[~bg] <= room[~bg] + 1e-5).all() and (d[~bg] >= 1.0 - 1e-5).all()  # objects stand in front of it
        assert (d[~bg] < room[~bg] - 1e-3).mean() > 0.9
        with h5py.File(root / "nyu_depth_v2_labeled.mat", "r") as f:
            inst = np.asarray(f["instances"][split.rows[i]]).T
        for k in np.unique(inst[inst > 0]):
            obj = inst == k
            if obj.sum() >= 12:
                per_class.setdefault(int(lab[obj][0]), []).append((float(d[obj].max()), float(obj.sum())))
    # same class: the object that looks larger is nearer (rank correlation of distance and area < 0)
    corrs = []
    for pairs in per_class.values():
        if len(pairs) >= 4:
            dist, area = np.array(pairs).T
            corrs.append(np.corrcoef(np.argsort(np.argsort(dist)), np.argsort(np.argsort(area)))[0, 1])
    assert corrs and np.mean(corrs) < -0.3


def test_render_depth_scene_pinhole_rule() -> None:
    sizes = [0.15 + 0.03 * k for k in range(10)]
    seen = 0
    for seed in range(20):
        r = render.render_depth_scene(np.random.default_rng(seed), 64, 48, range(10), 4, (0.12, 0.45), sizes)
        assert len(r.objects) == len(r.radii) == len(r.distances) and r.depth.dtype == np.float32
        assert r.distances == sorted(r.distances, reverse=True)  # painted far to near
        for o, rad, dist in zip(r.objects, r.radii, r.distances, strict=True):
            want = sizes[o.label] * 48 / rad
            if 1.0 + 0.3 * sizes[o.label] < want < r.depth[o.mask].max() + 1e-3 and want < 5.9:
                assert dist == pytest.approx(want)  # distance = class size / apparent size
                seen += 1
            assert r.depth[o.mask].max() <= dist + 1e-5  # its visible surface is at or in front of it
        # two objects of one class: the larger one is nearer
        for a in range(len(r.objects)):
            for b in range(len(r.objects)):
                if r.objects[a].label == r.objects[b].label and r.radii[a] > r.radii[b]:
                    assert r.distances[a] <= r.distances[b]
    assert seen > 20
