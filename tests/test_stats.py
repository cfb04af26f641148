"""Table-1 statistics against independent computations (pairwise-difference Gini, explicit shot bins, the
annotation files minus the images the shard step skipped)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from format_fixtures import make_coco, make_openimages

from data_prep import stats
from data_prep.readers import read_records
from data_prep.records import Box, Record, write_subset_csv
from data_prep.shards import write_shards


def _pairwise_gini(xs):
    n, mean = len(xs), sum(xs) / len(xs)
    return sum(abs(a - b) for a in xs for b in xs) / (2 * n * n * mean)


def _records(hist, objects=lambda i: 1):
    recs = []
    for c, n in hist.items():
        for i in range(n):
            k = objects(i)
            recs.append(Record(f"{c}_{i}", f"/x/{c}/{i}.jpg", c, [Box(0, 0, 1, 1, c)] * k, "train"))
    return recs


def test_class_labelled_row():
    hist = {"a": 150, "b": 101, "c": 100, "d": 20, "e": 19, "f": 3}
    recs = _records(hist, objects=lambda i: i % 3)
    row = stats.dataset_stats(recs, "lt")
    assert row["images"] == sum(hist.values()) and row["classes"] == 6
    assert row["class_histogram"] == hist
    assert row["imbalance"]["gini"] == pytest.approx(_pairwise_gini(list(hist.values())))
    assert (
        row["imbalance"]["max_min_ratio"] == 50
        and row["imbalance"]["max"] == 150
        and row["imbalance"]["min"] == 3
    )
    assert row["shots"] == {"many": 2, "medium": 2, "few": 2}
    assert row["uniform"] is False
    n_obj = [i % 3 for n in hist.values() for i in range(n)]
    assert row["objects_per_image"] == {
        "mean": pytest.approx(sum(n_obj) / len(n_obj)),
        "median": statistics.median(n_obj),
    }
    scaled = stats.dataset_stats(recs, "lt", many=50, few=10)
    assert scaled["shots"] == {"many": 3, "medium": 2, "few": 1}


def test_uniform_and_scene_rows():
    row = stats.dataset_stats(_records({"a": 5, "b": 5}), "u")
    assert row["uniform"] is True and row["imbalance"]["gini"] == pytest.approx(0.0)
    scene = [Record(f"k{i}", "/p", None, [Box(0, 0, 1, 1, "car")] * i, "train") for i in range(4)]
    row = stats.dataset_stats(scene, "coco")
    assert row["classes"] == 0 and row["shots"] is None and row["uniform"] is None
    assert row["objects_per_image"] == {"mean": 1.5, "median": 1.5} and row["box_labels"] == 1


def test_gini_extremes():
    assert stats.gini([1, 0, 0, 0]) == pytest.approx(_pairwise_gini([1, 0, 0, 0]))
    assert stats.gini([7, 7, 7]) == pytest.approx(0.0)


def test_cli(tmp_path):
    write_subset_csv(_records({"a": 3, "b": 1}), tmp_path / "subset.csv")
    stats.main(
        [
            "--subset",
            str(tmp_path / "subset.csv"),
            "--name",
            "x",
            "--out",
            str(tmp_path / "stats.json"),
            "--many",
            "2",
            "--few",
            "2",
        ]
    )
    row = json.loads((tmp_path / "stats.json").read_text())
    assert row["dataset"] == "x" and row["shots"] == {"many": 1, "medium": 0, "few": 1}


# ------------------------------------------------------------- issue 12: count what the shards hold, not the list


def _coco_with_bad_images(tmp_path):
    """COCO fixture + subset.csv, then two listed images made unreadable (empty, garbage) before sharding."""
    root = make_coco(tmp_path / "coco", n_images=8)
    recs = read_records("coco", root).records
    write_subset_csv(recs, tmp_path / "subset.csv")
    bad = {recs[1].key: b"", recs[3].key: b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4}
    for r in recs:
        if r.key in bad:
            Path(r.path).write_bytes(bad[r.key])
    write_shards(recs, tmp_path / "shards", "coco", max_per_shard=3, progress=False)
    return root, recs, bad


def test_stats_count_the_shards_and_report_the_skips(tmp_path):
    root, recs, bad = _coco_with_bad_images(tmp_path)
    # Independent: straight from the COCO JSON, minus the two images made unreadable.
    data = json.loads((root / "annotations/instances_train2017.json").read_text())
    cats = {c["id"] for c in data["categories"]}
    on_disk = {p.name for p in (root / "train2017").iterdir()}
    bad_names = {Path(r.path).name for r in recs if r.key in bad}
    kept_ids = {im["id"] for im in data["images"] if im["file_name"] in on_disk - bad_names}
    lost_ids = {im["id"] for im in data["images"] if im["file_name"] in bad_names}
    anns = [a for a in data["annotations"] if a["category_id"] in cats]
    out = tmp_path / "stats.json"
    argv = ["--shards", str(tmp_path / "shards"), "--subset", str(tmp_path / "subset.csv")]
    stats.main([*argv, "--name", "coco", "--out", str(out)])
    row = json.loads(out.read_text())
    assert row["source"] == "shards"
    assert row["images"] == len(kept_ids) == len(recs) - 2
    assert row["objects"] == sum(a["image_id"] in kept_ids for a in anns)
    assert row["crowd_boxes"] == sum(a["image_id"] in kept_ids and a["iscrowd"] for a in anns)
    assert "crowd" in row["object_convention"]
    sk = row["skipped"]
    assert sk["images"] == 2 and sk["by_reason"] == {"corrupt": 1, "empty": 1}
    assert sorted(sk["keys"]) == sorted(bad)
    assert sk["objects"] == sum(a["image_id"] in lost_ids for a in anns)
    assert sk["subset_images"] == len(recs) and sk["input_records"] == len(recs)
    assert sk["subset_objects"] == row["objects"] + sk["objects"] and "note" not in sk
    # subset.csv alone still counts the list, and says so.
    stats.main(["--subset", str(tmp_path / "subset.csv"), "--name", "coco", "--out", str(out)])
    listed = json.loads(out.read_text())
    assert listed["images"] == len(recs) and listed["source"].startswith("subset.csv")


def test_stats_refuse_shards_that_changed_after_writing(tmp_path):
    _coco_with_bad_images(tmp_path)
    manifest = tmp_path / "shards" / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["totals"]["images"] += 1
    manifest.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shards hold .* samples, manifest.json says"):
        stats.shard_records(tmp_path / "shards")


def test_group_of_boxes_survive_sharding_and_are_counted(tmp_path):
    root = make_openimages(tmp_path / "oi")
    recs = read_records("openimages", root).records
    write_shards(recs, tmp_path / "shards", "oi", progress=False)
    # Independent: IsGroupOf == 1 rows of images on disk whose LabelName is known.
    with open(root / "oidv6-train-annotations-bbox.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    on_disk = {p.stem for p in (root / "train").iterdir()}
    known = {"/m/01", "/m/02", "/m/03"}
    kept = [r for r in rows if r["ImageID"] in on_disk and r["LabelName"] in known]
    held, _ = stats.shard_records(tmp_path / "shards")
    row = stats.dataset_stats(held, "oi")
    assert row["objects"] == len(kept)
    assert row["crowd_boxes"] == sum(r["IsGroupOf"] == "1" for r in kept) > 0
    flags = [d["IsDepiction"] for r in held for d in r.attributes["box_attributes"]]
    assert sorted(flags, key=str) == sorted(
        ({"1": True, "0": False, "-1": None}[r["IsDepiction"]] for r in kept), key=str
    )
