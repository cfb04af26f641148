"""Readers against counts taken straight from the annotation files (not through the reader's code paths)."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from format_fixtures import make_bdd, make_coco, make_imagenet, make_openimages

from data_prep.readers import DatasetLayoutError, read_records
from data_prep.records import Box, Record, make_keys, read_subset_csv, write_subset_csv


def _by_path(records):
    return {Path(r.path).name: r for r in records}


def test_coco_objects_match_json(tmp_path, caplog):
    root = make_coco(tmp_path / "coco")
    data = json.loads((root / "annotations/instances_train2017.json").read_text())
    cat_ids = {c["id"] for c in data["categories"]}
    img_ids = {im["id"] for im in data["images"]}
    on_disk = {p.name for p in (root / "train2017").iterdir()}
    expected = Counter(a["image_id"] for a in data["annotations"] if a["category_id"] in cat_ids)
    crowd = Counter(a["image_id"] for a in data["annotations"] if a["iscrowd"])
    with caplog.at_level(logging.WARNING):
        res = read_records("coco", root)
    got = _by_path(res.records)
    want = {im["file_name"]: im for im in data["images"] if im["file_name"] in on_disk}
    assert set(got) == set(want)
    for fname, im in want.items():
        rec = got[fname]
        assert rec.n_objects == expected.get(im["id"], 0)
        assert (rec.width, rec.height) == (im["width"], im["height"])
        assert len(rec.attributes.get("crowd", [])) == crowd.get(im["id"], 0)
        assert rec.cls is None
    assert any(r.n_objects == 0 for r in res.records)  # images without annotations are kept
    assert res.skipped["missing_image"] == len(img_ids) - len(want)
    assert res.skipped["unknown_class"] == sum(a["category_id"] not in cat_ids for a in data["annotations"])
    assert res.skipped["annotation_without_image"] == sum(
        a["image_id"] not in img_ids for a in data["annotations"]
    )
    assert "missing_image" in caplog.text
    # xywh -> xyxy
    a = next(a for a in data["annotations"] if a["image_id"] == 2 and a["category_id"] in cat_ids)
    b = got[f"{2:012d}.jpg"].boxes[0]
    assert [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1] == a["bbox"]
    assert [r.key for r in res.records] == sorted(r.key for r in res.records)


def test_openimages_objects_match_csv(tmp_path):
    root = make_openimages(tmp_path / "oi")
    with open(root / "oidv6-train-annotations-bbox.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(root / "oidv7-class-descriptions-boxable.csv", newline="") as f:
        names = {r["LabelName"]: r["DisplayName"] for r in csv.DictReader(f)}
    on_disk = {p.stem for p in (root / "train").iterdir()}
    expected = Counter(r["ImageID"] for r in rows if r["LabelName"] in names)
    res = read_records("openimages", root)
    got = {Path(r.path).stem: r for r in res.records}
    assert set(got) == set(expected) & on_disk
    for image_id, rec in got.items():
        assert rec.n_objects == expected[image_id]
        assert rec.attributes["box_coords"] == "normalized"
        assert Counter(b.label for b in rec.boxes) == Counter(
            names[r["LabelName"]] for r in rows if r["ImageID"] == image_id and r["LabelName"] in names
        )
    assert res.skipped["missing_image"] == len(set(expected) - on_disk)
    assert res.skipped["unknown_class"] == sum(r["LabelName"] not in names for r in rows)
    assert res.skipped["image_without_annotations"] == len(on_disk - {r["ImageID"] for r in rows})
    everything = read_records("openimages", root, include_unannotated=True)
    assert len(everything.records) == len(on_disk)


def test_bdd_objects_match_json(tmp_path):
    root = make_bdd(tmp_path / "bdd")
    frames = json.loads((root / "labels/det_20/det_train.json").read_text())
    on_disk = {p.name for p in (root / "images/100k/train").iterdir()}
    res = read_records("bdd100k", root)
    got = _by_path(res.records)
    assert set(got) == {f["name"] for f in frames} & on_disk
    for f in frames:
        if f["name"] not in on_disk:
            continue
        rec = got[f["name"]]
        assert rec.n_objects == sum("box2d" in lab for lab in f["labels"] or [])
        assert rec.attributes["timeofday"] == f["attributes"]["timeofday"]
        assert len(rec.attributes.get("box_attributes", [])) == rec.n_objects
    assert res.skipped["missing_image"] == len({f["name"] for f in frames} - on_disk)
    assert res.skipped["label_without_box2d"] == 1


def test_imagenet_classes_and_loc(tmp_path):
    counts = {"n001": 4, "n002": 3, "n003": 5}
    root = make_imagenet(tmp_path / "in", counts)
    with open(root / "LOC_train_solution.csv", newline="") as f:
        loc = {r["ImageId"]: len(r["PredictionString"].split()) // 5 for r in csv.DictReader(f)}
    res = read_records("imagenet", root)
    assert Counter(r.cls for r in res.records) == Counter(counts)
    for r in res.records:
        assert r.n_objects == loc.get(Path(r.path).stem, 1)
        assert r.attributes["name"] == f"name of {r.cls}"
    assert res.skipped["annotation_without_image"] == len(set(loc) - {Path(r.path).stem for r in res.records})
    # No LOC file: one object per image.
    (root / "LOC_train_solution.csv").unlink()
    assert all(r.n_objects == 1 and not r.boxes for r in read_records("imagenet", root).records)


def test_imagenet_unknown_class_folder_counted(tmp_path):
    root = make_imagenet(tmp_path / "in", {"n001": 2})
    (root / "train" / "stray").mkdir()
    (root / "train" / "stray" / "x.JPEG").write_bytes(b"")
    res = read_records("imagenet", root)
    assert res.skipped["unknown_class"] == 1 and len(res.records) == 2


def test_missing_root_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="Expected layout"):
        read_records("coco", tmp_path / "nowhere")
    (tmp_path / "c").mkdir()
    with pytest.raises(DatasetLayoutError, match="train2017"):
        read_records("coco", tmp_path / "c")
    with pytest.raises(ValueError, match="known formats: bdd100k, coco, imagenet, openimages"):
        read_records("pascal", tmp_path)


def test_keys_are_safe_unique_and_order_independent():
    paths = ["a/x.y.jpg", "b/x.y.jpg", "c/x_y.jpg", "d/z.jpg", "e/" + "q" * 200 + ".jpg"]
    keys = make_keys(paths)
    assert len(set(keys)) == len(keys)
    assert all(k.replace("_", "").replace("-", "").isalnum() and len(k) <= 80 for k in keys)
    assert keys[3] == "z"
    assert make_keys(paths[::-1]) == keys[::-1]


def test_subset_csv_round_trip(tmp_path):
    recs = [
        Record("k1", "/a/b.jpg", "n01", [Box(1, 2, 3.5, 4, "n01")], "train", 10, 20, {"w": 'x, "y"'}),
        Record("k2", "/a/c.jpg", None, [], "train", attributes={}, object_count=1),
        Record("k3", "/a/d.jpg", None, [Box(0, 0, 1, 1, "car,red")], "val", None, None, {"crowd": [0]}),
    ]
    path = tmp_path / "sub" / "subset.csv"
    write_subset_csv(recs, path)
    assert path.read_text().splitlines()[0] == "key,path,class,n_objects,split,width,height,boxes,attributes"
    back = read_subset_csv(path)
    assert back == recs
    assert [r.n_objects for r in back] == [1, 1, 1]
    assert not list(path.parent.glob("*.tmp"))
