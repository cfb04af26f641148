"""Readers against counts taken straight from the annotation files (not through the reader's code paths)."""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from format_fixtures import (
    OI_COLUMNS,
    make_bdd,
    make_coco,
    make_imagenet,
    make_openimages,
    oi_flags,
    resave_like_spreadsheet,
)

from data_prep import subsets
from data_prep.inspect import _detections
from data_prep.readers import AnnotationParseError, DatasetLayoutError, read_records
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


# ------------------------------------------------------------------- issue 12: what real annotation files taught


def _oi_rows(root: Path) -> list[dict]:
    with open(root / "oidv6-train-annotations-bbox.csv", newline="") as f:
        return list(csv.DictReader(f))


def _boxes(res):
    return {Path(r.path).name: ([b.to_list() for b in r.boxes], r.attributes) for r in res.records}


def test_openimages_spreadsheet_saved_csvs_parse_like_the_originals(tmp_path):
    """';' separators, CR line ends, a BOM and decimal commas: the same records as the original files."""
    root = make_openimages(tmp_path / "oi")
    want = _boxes(read_records("openimages", root))
    resave_like_spreadsheet(root / "oidv7-class-descriptions-boxable.csv", root / "classes-excel.csv")
    resave_like_spreadsheet(root / "oidv6-train-annotations-bbox.csv", root / "boxes-excel.csv")
    raw = (root / "classes-excel.csv").read_bytes()
    assert b";" in raw and b"\r" in raw and b"\n" not in raw  # the fixture really is a spreadsheet export
    got = _boxes(
        read_records("openimages", root, boxes_csv="boxes-excel.csv", classes_csv="classes-excel.csv")
    )
    assert got.keys() == want.keys()
    assert got == want  # same text digits, so the same floats


def test_class_list_that_parses_to_nothing_stops_naming_the_file(tmp_path):
    root = make_openimages(tmp_path / "oi")
    # One column per line (the separator was lost): no 'LabelName,DisplayName' row can be parsed.
    (root / "names-only.csv").write_bytes(b"Car\rPerson\rTree\r")
    with pytest.raises(AnnotationParseError) as e:
        read_records("openimages", root, classes_csv="names-only.csv")
    msg = str(e.value)
    assert "names-only.csv" in msg and "0 classes" in msg and "CR line ends" in msg and "spreadsheet" in msg


def test_mostly_skipped_rows_stop_naming_file_counts_and_cause(tmp_path):
    root = make_openimages(tmp_path / "oi")
    rows = _oi_rows(root)
    # A class list of another OpenImages version: only /m/01 matches the box file's LabelNames.
    (root / "other-version.csv").write_text("LabelName,DisplayName\n/m/01,Car\n/m/0x,Boat\n")
    unknown = sum(r["LabelName"] != "/m/01" for r in rows)
    assert unknown / len(rows) > 0.5
    with pytest.raises(AnnotationParseError) as e:
        read_records("openimages", root, classes_csv="other-version.csv")
    msg = str(e.value)
    assert "oidv6-train-annotations-bbox.csv" in msg and f"{unknown} of {len(rows)} box rows skipped" in msg
    assert "other-version.csv is not the class list of this box file" in msg
    # The same data is accepted when the threshold says so, and a reader yielding nothing always stops.
    assert read_records("openimages", root, classes_csv="other-version.csv", max_skip_fraction=1.0).records
    for p in (root / "train").iterdir():
        p.unlink()
    with pytest.raises(AnnotationParseError, match="no records from .*oidv6-train-annotations-bbox.csv"):
        read_records("openimages", root, max_skip_fraction=1.0)


def test_coco_annotation_file_of_another_split_stops(tmp_path):
    root = make_coco(tmp_path / "coco", n_images=6)
    data = json.loads((root / "annotations/instances_train2017.json").read_text())
    for im in data["images"]:
        im["file_name"] = "val_" + im["file_name"]
    (root / "annotations/instances_val2017.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationParseError, match=r"instances_val2017.json: 6 of 6 images listed skipped"):
        read_records("coco", root, annotations_json="annotations/instances_val2017.json")


def test_openimages_flags_kept_per_box_and_group_of_is_crowd(tmp_path):
    root = make_openimages(tmp_path / "oi")
    rows = _oi_rows(root)
    flag_cols = OI_COLUMNS[8:]
    value = {"1": True, "0": False, "-1": None}
    res = read_records("openimages", root)
    assert res.records
    n_group = 0
    for rec in res.records:
        mine = [(i, r) for i, r in enumerate(rows) if r["ImageID"] == Path(rec.path).stem]
        mine = [(i, r) for i, r in mine if r["LabelName"] != "/m/zzz"]
        want = [{c: value[v] for c, v in zip(flag_cols, oi_flags(i), strict=True)} for i, _ in mine]
        assert rec.attributes["box_attributes"] == want
        assert rec.attributes["crowd"] == [k for k, (i, _) in enumerate(mine) if oi_flags(i)[2] == "1"]
        n_group += len(rec.attributes["crowd"])
    assert n_group > 0 and any(
        None in d.values() for r in res.records for d in r.attributes["box_attributes"]
    )
    # FiftyOne detections get the flags as attributes and iscrowd = IsGroupOf (a stand-in fo: just the kwargs).
    fo = type(
        "fo", (), {"Detection": staticmethod(dict), "Detections": staticmethod(lambda detections: detections)}
    )
    rec = next(r for r in res.records if r.attributes["crowd"])
    dets = _detections(fo, rec, 32, 20)
    assert [d["IsGroupOf"] for d in dets] == [d["iscrowd"] for d in dets]
    assert [d["IsOccluded"] for d in dets] == [a["IsOccluded"] for a in rec.attributes["box_attributes"]]


def test_bdd_crowd_flag_surfaced_like_coco_iscrowd(tmp_path):
    root = make_bdd(tmp_path / "bdd")
    frames = json.loads((root / "labels/det_20/det_train.json").read_text())
    res = read_records("bdd100k", root)
    got = _by_path(res.records)
    for f in frames:
        if f["name"] not in got:
            continue
        boxed = [lab for lab in f["labels"] or [] if "box2d" in lab]
        rec = got[f["name"]]
        assert rec.attributes["crowd"] == [i for i, lab in enumerate(boxed) if lab["attributes"].get("crowd")]
    first = got[frames[0]["name"]]
    assert first.attributes["crowd"] == [first.n_objects - 1]
    fo = type(
        "fo", (), {"Detection": staticmethod(dict), "Detections": staticmethod(lambda detections: detections)}
    )
    dets = _detections(fo, first, 40, 24)
    assert [d["iscrowd"] for d in dets] == [False] * (first.n_objects - 1) + [True]


def test_files_mapping_reaches_the_reader_through_the_subset_cli(tmp_path):
    root = make_openimages(tmp_path / "oi")
    default = tmp_path / "default.csv"
    subsets.main(
        [
            "--format",
            "openimages",
            "--root",
            str(root),
            "--rule-json",
            '{"rule": "all"}',
            "--out",
            str(default),
        ]
    )
    (root / "oidv6-train-annotations-bbox.csv").rename(root / "my-boxes.csv")
    (root / "oidv7-class-descriptions-boxable.csv").rename(root / "my-classes.csv")
    files = json.dumps({"boxes_csv": "my-boxes.csv", "classes_csv": str(root / "my-classes.csv")})
    out = tmp_path / "renamed.csv"
    argv = [
        "--format",
        "openimages",
        "--root",
        str(root),
        "--rule-json",
        '{"rule": "all"}',
        "--out",
        str(out),
    ]
    subsets.main([*argv, "--files-json", files])
    assert read_subset_csv(out) == read_subset_csv(default)
    with pytest.raises(
        SystemExit, match="unknown annotation file option.*labels_json.*boxes_csv, classes_csv"
    ):
        subsets.main([*argv, "--files-json", '{"labels_json": "x.json"}'])


@pytest.mark.parametrize(
    "fmt, files, ok",
    [
        ("openimages", {"boxes_csv": "b.csv", "classes_csv": "c.csv"}, True),
        ("coco", {"annotations_json": "annotations/x.json"}, True),
        ("bdd100k", {"labels_json": "l.json"}, True),
        ("imagenet", {"loc_csv": "loc.csv", "synset_mapping": "map.txt"}, True),
        ("coco", {"boxes_csv": "b.csv"}, False),
        ("openimages", {"boxes": "b.csv"}, False),
    ],
)
def test_schema_accepts_per_format_file_names(fmt, files, ok):
    import yaml
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    repo = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((repo / "config.yaml").read_text())
    cfg["datasets"] = {"d": {"format": fmt, "root": "/data", "subset": {"rule": "all"}, "files": files}}
    schema = str(repo / "workflow/schemas/config.schema.yaml")
    if ok:
        validate(cfg, schema)
    else:
        with pytest.raises(WorkflowError):
            validate(cfg, schema)
