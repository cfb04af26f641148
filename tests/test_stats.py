"""Table-1 statistics against independent computations (pairwise-difference Gini, explicit shot bins)."""

from __future__ import annotations

import json
import statistics

import pytest

from data_prep import stats
from data_prep.records import Box, Record, write_subset_csv


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
