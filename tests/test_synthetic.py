"""The synthetic world: determinism, and every format parsed back independently (json / csv / xml / PIL)."""

from __future__ import annotations

import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image

from data_prep import render, synthetic
from data_prep.synthetic import VOC_CLASSES, SpecError, WorldSpec, make_world, tiny_spec


@pytest.fixture(scope="module")
def spec() -> WorldSpec:
    return tiny_spec()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, spec: WorldSpec) -> Path:
    return make_world(tmp_path_factory.mktemp("world"), spec)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _inside(box: tuple[float, float, float, float], w: int, h: int) -> bool:
    x1, y1, x2, y2 = box
    return 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


# ----------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes(world: Path, tmp_path: Path, spec: WorldSpec) -> None:
    again = make_world(tmp_path / "again", spec)
    a, b = _files(world), _files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_different_seed_changes_images(world: Path, tmp_path: Path) -> None:
    other = make_world(tmp_path / "other", tiny_spec(seed=1), only=["imagenet", "coco"])
    a, b = _files(world / "coco"), _files(other / "coco")
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert jpgs and all(a[k] != b[k] for k in jpgs)
    a, b = _files(world / "imagenet"), _files(other / "imagenet")
    assert sum(a[k] != b.get(k) for k in a if k.endswith(".JPEG")) == sum(k.endswith(".JPEG") for k in a)


def test_each_dataset_reproducible_on_its_own(world: Path, tmp_path: Path, spec: WorldSpec) -> None:
    alone = make_world(tmp_path / "alone", spec, only=["voc"])
    assert _files(alone / "voc") == _files(world / "voc")
    manifest = json.loads((alone / "world.json").read_text())
    assert list(manifest["datasets"]) == ["voc"]


def test_manifest_lists_counts_and_spec(world: Path, spec: WorldSpec) -> None:
    m = json.loads((world / "world.json").read_text())
    assert m["version"] == synthetic.WORLD_VERSION
    assert WorldSpec.from_dict(m["spec"]) == spec
    assert list(m["datasets"]) == list(synthetic.DATASETS)
    assert m["datasets"]["coco"]["images"] == spec.coco.splits
    assert not [p for p in world.iterdir() if p.name.startswith(".")]  # no temp / trash folders left


def test_make_world_is_idempotent_and_atomic(tmp_path: Path, spec: WorldSpec,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = make_world(tmp_path / "w", spec, only=["davis"])
    stamp = (out / "world.json").stat().st_mtime_ns
    assert make_world(out, spec, only=["davis"]) == out
    assert (out / "world.json").stat().st_mtime_ns == stamp  # nothing rewritten

    def boom(root: Path, spec: WorldSpec) -> dict:
        (root / "half.txt").write_text("partial")
        raise KeyboardInterrupt  # a kill mid-dataset

    monkeypatch.setitem(synthetic.WRITERS, "davis", boom)
    with pytest.raises(KeyboardInterrupt):
        make_world(out, spec, only=["davis"], force=True)
    assert "davis" not in json.loads((out / "world.json").read_text())["datasets"]
    assert not (out / "davis" / "half.txt").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ----------------------------------------------------------------------------------------------- formats


def test_imagenet_layout(world: Path, spec: WorldSpec) -> None:
    s = spec.imagenet
    root = world / "imagenet"
    wnids = [line.split()[0] for line in (root / "LOC_synset_mapping.txt").read_text().splitlines()]
    assert wnids == [f"n{k:08d}" for k in range(s.n_classes)]
    assert sorted(p.name for p in (root / "train").iterdir()) == wnids
    images = sorted((root / "train").glob("*/*.JPEG"))
    assert len(images) == s.n_classes * s.splits["train"]
    with open(root / "LOC_train_solution.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["ImageId"] for r in rows} == {p.stem for p in images}
    for r in rows:
        tok = r["PredictionString"].split()
        assert len(tok) == 5 and tok[0] == r["ImageId"].split("_")[0]  # exactly one object, its own class
        box = tuple(map(int, tok[1:]))
        assert _inside(box, s.width, s.height)
        # object-centric: the object is large
        assert (box[2] - box[0]) * (box[3] - box[1]) > 0.2 * s.width * s.height
    with Image.open(images[0]) as im:
        assert im.format == "JPEG" and im.size == (s.width, s.height) and im.mode == "RGB"


def _poly_area(flat: list[float]) -> float:
    x, y = np.asarray(flat[0::2]), np.asarray(flat[1::2])
    return abs(float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))) / 2


def test_coco_json(world: Path, spec: WorldSpec) -> None:
    s = spec.coco
    data = json.loads((world / "coco" / "annotations" / "instances_train2017.json").read_text())
    assert len(data["images"]) == s.splits["train2017"]
    assert [c["name"] for c in data["categories"]] == [c.name for c in render.CATALOGUE[: s.n_classes]]
    images = {im["id"]: im for im in data["images"]}
    for im in data["images"]:
        assert re.fullmatch(r"\d{12}\.jpg", im["file_name"])
        with Image.open(world / "coco" / "train2017" / im["file_name"]) as pil:
            assert pil.size == (im["width"], im["height"])
    cat_ids = {c["id"] for c in data["categories"]}
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for a in data["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert a["category_id"] in cat_ids and a["iscrowd"] == 0
        assert _inside((x, y, x + w, y + h), im["width"], im["height"])
        assert a["segmentation"] and all(len(p) >= 8 and len(p) % 2 == 0 for p in a["segmentation"])
        poly_area = sum(_poly_area(p) for p in a["segmentation"])
        assert poly_area == pytest.approx(a["area"], rel=0.02)
        # rasterise the polygons independently at pixel centres: they must reproduce a mask with this area,
        # whose tight box is the annotated bbox
        yy, xx = np.mgrid[0 : im["height"], 0 : im["width"]] + 0.5
        pts = np.stack([xx.ravel(), yy.ravel()], 1)
        mask = np.zeros(pts.shape[0], bool)
        for p in a["segmentation"]:
            mask |= MplPath(np.asarray(p).reshape(-1, 2)).contains_points(pts)
        mask = mask.reshape(yy.shape)
        assert mask.sum() == a["area"]
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert (cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]) == (x, y, w, h)


def test_openimages_csv(world: Path, spec: WorldSpec) -> None:
    s = spec.openimages
    root = world / "openimages"
    with open(root / "oidv7-class-descriptions-boxable.csv", newline="") as f:
        classes = list(csv.DictReader(f))
    assert len(classes) == s.n_classes and all(re.fullmatch(r"/m/0[0-9a-z]+", c["LabelName"]) for c in classes)
    mids = {c["LabelName"] for c in classes}
    with open(root / "oidv6-train-annotations-bbox.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
                                 "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside"]
    files = {p.stem for p in (root / "train").glob("*.jpg")}
    assert len(files) == s.splits["train"]
    assert all(re.fullmatch(r"[0-9a-f]{16}", f) for f in files)
    assert {r["ImageID"] for r in rows} <= files
    for r in rows:
        assert r["LabelName"] in mids
        x1, x2, y1, y2 = (float(r[k]) for k in ("XMin", "XMax", "YMin", "YMax"))
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        assert all(r[k] in ("0", "1") for k in ("IsOccluded", "IsTruncated", "IsGroupOf"))


def test_objects_per_image_ordering(world: Path, spec: WorldSpec) -> None:
    """Object-centric < scene-centric < many-object scenes, measured from the written annotations."""
    sol = (world / "imagenet" / "LOC_train_solution.csv").read_text().splitlines()[1:]
    imagenet = np.mean([len(line.split(",")[1].split()) / 5 for line in sol])
    data = json.loads((world / "coco" / "annotations" / "instances_train2017.json").read_text())
    coco = len(data["annotations"]) / len(data["images"])
    with open(world / "openimages" / "oidv6-train-annotations-bbox.csv", newline="") as f:
        oi = len(list(csv.DictReader(f))) / spec.openimages.splits["train"]
    assert imagenet == 1 < coco < oi


def test_bdd100k_json(world: Path, spec: WorldSpec) -> None:
    s = spec.bdd100k
    root = world / "bdd100k"
    frames = json.loads((root / "labels" / "det_20" / "det_train.json").read_text())
    assert len(frames) == s.splits["train"] == len(list((root / "images" / "100k" / "train").glob("*.jpg")))
    for fr in frames:
        assert set(fr["attributes"]) == {"weather", "scene", "timeofday"}
        assert fr["attributes"]["timeofday"] in s.timeofday and fr["attributes"]["weather"] in s.weather
        with Image.open(root / "images" / "100k" / "train" / fr["name"]) as im:
            assert im.size == (s.width, s.height)
        for lab in fr["labels"]:
            assert lab["category"] in render.STREET_CATEGORIES
            assert set(lab["attributes"]) == {"occluded", "truncated"}
            b = lab["box2d"]
            assert _inside((b["x1"], b["y1"], b["x2"], b["y2"]), s.width, s.height)


def test_bdd_night_is_darker() -> None:
    def mean(tod: str) -> float:
        img = render.render_street(np.random.default_rng(3), 112, 64, 6, "clear", "city street", tod).image
        return float(img.mean())

    assert mean("night") < mean("dawn/dusk") < mean("daytime")


def test_cls_imagefolder(world: Path, spec: WorldSpec) -> None:
    s = spec.cls
    for split, per_class in s.splits.items():
        dirs = sorted(p.name for p in (world / "cls" / split).iterdir())
        assert dirs == sorted(c.name for c in render.CATALOGUE[: s.n_classes])
        for d in dirs:
            assert len(list((world / "cls" / split / d).glob("*.jpg"))) == per_class


def _voc_objects(xml_path: Path) -> tuple[tuple[int, int], list[dict]]:
    root = ET.parse(xml_path).getroot()
    size = (int(root.findtext("size/width")), int(root.findtext("size/height")))
    objs = []
    for o in root.iter("object"):
        bb = o.find("bndbox")
        objs.append({"name": o.findtext("name"), "difficult": int(o.findtext("difficult")),
                     "box": tuple(int(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))})
    return size, objs


def test_voc_layout_and_lists(world: Path, spec: WorldSpec) -> None:
    s = spec.voc
    base = world / "voc" / "VOC2007"
    main = base / "ImageSets" / "Main"
    lists = {k: (main / f"{k}.txt").read_text().split() for k in ("train", "val", "trainval", "test")}
    assert len(lists["trainval"]) == s.splits["trainval"] and len(lists["test"]) == s.splits["test"]
    assert sorted(lists["train"] + lists["val"]) == sorted(lists["trainval"])
    assert not set(lists["trainval"]) & set(lists["test"])
    objects = {}
    for stem in lists["trainval"] + lists["test"]:
        size, objs = _voc_objects(base / "Annotations" / f"{stem}.xml")
        assert size == (s.width, s.height)
        with Image.open(base / "JPEGImages" / f"{stem}.jpg") as im:
            assert im.size == size
        for o in objs:
            x1, y1, x2, y2 = o["box"]
            assert 1 <= x1 <= x2 <= s.width and 1 <= y1 <= y2 <= s.height and o["name"] in VOC_CLASSES
            assert o["difficult"] == int(min(x2 - x1 + 1, y2 - y1 + 1) < s.difficult_min_side)
        objects[stem] = objs
    for split, members in lists.items():
        for cls in VOC_CLASSES:
            lines = (main / f"{cls}_{split}.txt").read_text().splitlines()
            assert [ln.split()[0] for ln in lines] == members
            for ln in lines:
                stem, flag = ln.split()
                mine = [o for o in objects[stem] if o["name"] == cls]
                expect = -1 if not mine else (1 if any(not o["difficult"] for o in mine) else 0)
                assert int(flag) == expect, (cls, split, stem)
                assert re.fullmatch(r"\d{6} (-1| 1| 0)", ln)


def test_voc_segmentation(world: Path) -> None:
    base = world / "voc" / "VOC2007"
    seg = {k: (base / "ImageSets" / "Segmentation" / f"{k}.txt").read_text().split() for k in ("train", "val")}
    main = {k: (base / "ImageSets" / "Main" / f"{k}.txt").read_text().split() for k in ("train", "val")}
    assert seg == main
    for stem in seg["train"] + seg["val"]:
        _, objs = _voc_objects(base / "Annotations" / f"{stem}.xml")
        with Image.open(base / "SegmentationClass" / f"{stem}.png") as im:
            assert im.mode == "P"
            cls_map = np.asarray(im)
        with Image.open(base / "SegmentationObject" / f"{stem}.png") as im:
            inst = np.asarray(im)
        assert set(np.unique(cls_map)) <= {0, 255} | {VOC_CLASSES.index(o["name"]) + 1 for o in objs}
        assert ((cls_map == 255) == (inst == 255)).all()
        if objs:
            assert (cls_map == 255).any()
        # every void pixel borders something else: the band hugs object boundaries, 1-2 px wide
        void = cls_map == 255
        assert void.sum() < 0.6 * void.size
        for k, o in enumerate(objs, start=1):
            ys, xs = np.nonzero(inst == k)
            x1, y1, x2, y2 = o["box"]  # 1-based inclusive
            if xs.size == 0:  # a sliver entirely covered by the void band
                assert min(x2 - x1, y2 - y1) <= 2
                continue
            assert x1 - 1 <= xs.min() and xs.max() <= x2 - 1 and y1 - 1 <= ys.min() and ys.max() <= y2 - 1
            # tight: every edge row/column of the box touches the object or its void band (thin tips may
            # be entirely void for a few pixels, like in real VOC)
            region = (inst == k) | (inst == 255)
            crop = region[y1 - 1 : y2, x1 - 1 : x2]
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()


def test_davis_layout_and_motion(world: Path, spec: WorldSpec) -> None:
    s = spec.davis
    root = world / "davis"
    for split, n in s.splits.items():
        videos = (root / "ImageSets" / "2017" / f"{split}.txt").read_text().split()
        assert len(videos) == n
        for v in videos:
            jpgs = sorted((root / "JPEGImages" / "480p" / v).glob("*.jpg"))
            pngs = sorted((root / "Annotations" / "480p" / v).glob("*.png"))
            assert [p.stem for p in jpgs] == [p.stem for p in pngs] == [f"{f:05d}" for f in range(s.n_frames)]
            masks = []
            for p in pngs:
                with Image.open(p) as im:
                    assert im.mode == "P" and im.size == (s.width, s.height)
                    masks.append(np.asarray(im))
            ids = [set(np.unique(m)) - {0} for m in masks]
            assert ids[0] and all(i == ids[0] for i in ids)
            assert ids[0] == set(range(1, len(ids[0]) + 1))
            for k in ids[0]:
                centres = np.array([np.argwhere(m == k).mean(0) for m in masks])
                steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
                assert np.linalg.norm(centres[-1] - centres[0]) > 0.5 or steps.sum() > 1  # it moves
                assert steps.max() < 3 * s.speed[1] + 0.5 * s.width * s.scale[1]  # smoothly, no teleports


# ----------------------------------------------------------------------------------------------- renderer


def test_rendered_masks_boxes_and_polygons() -> None:
    rng = np.random.default_rng(7)
    for _ in range(12):
        r = render.render_scene(rng, 96, 72, range(20), 6, (0.15, 0.45), hole_free=True)
        assert r.image.shape == (72, 96, 3) and r.image.dtype == np.uint8
        union = np.zeros((72, 96), int)
        for o in r.objects:
            ys, xs = np.nonzero(o.mask)
            x1, y1, x2, y2 = o.box
            assert _inside(o.box, 96, 72)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)  # tight box
            union += o.mask
            polys, holes = render.mask_to_polygons(o.mask)
            assert holes == 0 and sum(render.polygon_area(p) for p in polys) == o.area
        assert union.max() <= 1  # visible masks are disjoint
    one = render.render_centric(np.random.default_rng(1), 3, 64, 64)
    assert len(one.objects) == 1 and one.objects[0].label == 3


def test_mask_to_polygons_counts_components_and_holes() -> None:
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    ring[4, 4] = True  # an island inside the hole
    polys, holes = render.mask_to_polygons(ring)
    assert holes == 1 and len(polys) == 2
    assert sorted(render.polygon_area(p) for p in polys) == [1.0, 49.0]
    diag = np.array([[1, 0], [0, 1]], bool)  # diagonal pixels are separate (4-connectivity)
    polys, holes = render.mask_to_polygons(diag)
    assert len(polys) == 2 and holes == 0


def test_davis_instances_stable_in_renderer() -> None:
    frames = render.render_video(np.random.default_rng(0), 96, 64, range(10), 3, 6, (0.3, 0.5), (1.0, 3.0))
    labels = [[o.label for o in f.objects] for f in frames]
    assert all(lab == labels[0] for lab in labels)


# ----------------------------------------------------------------------------------------------- spec / CLI


def test_spec_validation_names_the_key() -> None:
    with pytest.raises(SpecError, match="coco.bogus"):
        WorldSpec.from_dict({"coco": {"bogus": 1}})
    with pytest.raises(SpecError, match="openimages.objects"):
        WorldSpec.from_dict({"openimages": {"objects": [5, 2]}})
    with pytest.raises(SpecError, match="imagenet.n_classes"):
        WorldSpec.from_dict({"imagenet": {"n_classes": 99}})
    with pytest.raises(SpecError, match="voc.splits"):
        WorldSpec.from_dict({"voc": {"splits": {"train": 3}}})
    with pytest.raises(SpecError, match="bdd100k.weather"):
        WorldSpec.from_dict({"bdd100k": {"weather": {"hail": 1.0}}})
    with pytest.raises(SpecError, match="nyud.splits"):
        WorldSpec.from_dict({"nyud": {"splits": {"trainval": 3}}})
    with pytest.raises(SpecError, match="nyud.depth_range"):
        WorldSpec.from_dict({"nyud": {"depth_range": [6.0, 2.0]}})
    assert WorldSpec.from_dict({"seed": 5}).coco == WorldSpec().coco


def test_cli(tmp_path: Path, spec: WorldSpec, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = json.dumps({"seed": 2, "davis": {"splits": {"val": 1}, "n_frames": 3}})
    assert synthetic.main(["--out", str(tmp_path / "w"), "--spec-json", tiny, "--only", "davis"]) == 0
    assert (tmp_path / "w" / "davis" / "ImageSets" / "2017" / "val.txt").exists()
    assert synthetic.main(["--out", str(tmp_path / "w"), "--only", "bogus"]) == 2
    yaml_file = tmp_path / "spec.yaml"
    yaml_file.write_text("seed: 3\ncoco:\n  splits: {train2017: 2}\n")
    assert synthetic.main(["--out", str(tmp_path / "x"), "--spec", str(yaml_file), "--print-spec"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 3 and printed["coco"]["splits"] == {"train2017": 2}
    assert synthetic.main(["--out", str(tmp_path / "x"), "--spec", str(tmp_path / "missing.yaml")]) == 2


# ----------------------------------------------------------------------------------------------- colour / background cues


def _centric(spec: WorldSpec, tmp_path: Path, name: str) -> list[np.ndarray]:
    root = make_world(tmp_path / name, spec, only=["cls"])
    return [np.asarray(Image.open(p), dtype=np.int16) for p in sorted((root / "cls").rglob("*.jpg"))]


def test_grey_world_stores_luminance_in_three_channels(tmp_path: Path) -> None:
    base = {"cls": {"splits": {"train": 2, "val": 1}, "n_classes": 3}}
    grey = _centric(WorldSpec.from_dict({**base, "colours": "grey"}), tmp_path, "grey")
    colour = _centric(WorldSpec.from_dict({**base, "colours": "random"}), tmp_path, "colour")
    assert all(im.ndim == 3 and im.shape[2] == 3 for im in grey)  # readers see an RGB JPEG as in the real sets
    chroma = [np.abs(im - im.mean(axis=2, keepdims=True)).mean() for im in grey]
    assert max(chroma) < 1.0 < min(np.abs(im - im.mean(axis=2, keepdims=True)).mean() for im in colour)
    with pytest.raises(SpecError, match="colours"):
        WorldSpec.from_dict({"colours": "gray"})


def test_background_pool_shares_backgrounds_across_images() -> None:
    """With a pool of one, every background is the same picture (up to the sensor noise); without, they differ."""

    def border(pool: int) -> list[np.ndarray]:
        out = []
        for i in range(4):  # objects sit near the centre: the 4 px frame is background
            img = render.render_centric(np.random.default_rng(i), i % 3, 64, 64, scale=(0.4, 0.5), jitter=0.0,
                                        colours="random", backgrounds=pool).image.astype(float)
            out.append(np.concatenate([img[:4].ravel(), img[-4:].ravel(), img[:, :4].ravel(), img[:, -4:].ravel()]))
        return out

    shared, own = border(1), border(0)
    diff = lambda xs: max(np.abs(a - xs[0]).mean() for a in xs[1:])  # noqa: E731
    assert diff(shared) < 8 < diff(own)
    with pytest.raises(SpecError, match="backgrounds"):
        WorldSpec.from_dict({"backgrounds": -1})
