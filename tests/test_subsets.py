"""Subset rules: the ImageNet-LT recipe re-derived independently, uniform/random/all, determinism, CLI."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from format_fixtures import make_imagenet

from data_prep import subsets
from data_prep.records import Record, read_subset_csv
from data_prep.subsets import SubsetRuleError, pareto_counts, select


def _records(per_class: dict[str, int]) -> list[Record]:
    return [
        Record(f"{c}_{i:04d}", f"/x/{c}/{i}.jpg", c, [], "train")
        for c, n in per_class.items()
        for i in range(n)
    ]


LT = {"rule": "long_tailed", "alpha": 6, "total": 700, "min_per_class": 3, "max_per_class": 80, "seed": 0}


def _independent_curve(n, alpha, lo, hi, seed):
    """The recipe written out longhand: Pareto draws, sorted descending, min-max rescaled."""
    draws = list(np.random.default_rng(seed).pareto(alpha, n))
    draws.sort(reverse=True)
    top, bottom = draws[0], draws[-1]
    return [lo + (d - bottom) * (hi - lo) / (top - bottom) for d in draws]


def test_pareto_counts_follow_recipe():
    n, alpha, total, lo, hi = 40, 6.0, 700, 3, 80
    counts = pareto_counts(n, alpha, total, lo, hi, seed=0)
    assert counts.sum() == total
    assert list(counts) == sorted(counts, reverse=True)
    assert counts.min() >= lo and counts.max() <= hi
    # Counts must be the rescaled curve with its excess over `lo` scaled by one common factor f, each rounded
    # to a neighbouring integer: the per-rank intervals of admissible f must intersect (bounded ranks aside).
    curve = _independent_curve(n, alpha, lo, hi, 0)
    f_lo, f_hi = 0.0, math.inf
    for c, v in zip(counts, curve, strict=True):
        if v - lo < 1e-9 or c in (lo, hi):
            continue
        f_lo = max(f_lo, (c - 1 - lo) / (v - lo))
        f_hi = min(f_hi, (c + 1 - lo) / (v - lo))
    assert f_lo < f_hi
    # Degenerate totals pin every class to a bound.
    assert set(pareto_counts(n, alpha, n * lo, lo, hi, seed=0)) == {lo}
    assert set(pareto_counts(n, alpha, n * hi, lo, hi, seed=0)) == {hi}
    with pytest.raises(SubsetRuleError, match="not reachable"):
        pareto_counts(n, alpha, n * hi + 1, lo, hi, seed=0)


def test_long_tailed_select_matches_recipe():
    per_class = {f"n{i:03d}": 100 for i in range(40)}
    recs = _records(per_class)
    chosen = select(recs, LT)
    hist = Counter(r.cls for r in chosen)
    assert sum(hist.values()) == LT["total"]
    assert len(hist) == 40 and min(hist.values()) >= 3 and max(hist.values()) <= 80
    counts = pareto_counts(40, 6, 700, 3, 80, seed=0)
    assert sorted(hist.values(), reverse=True) == list(counts)
    # Ranks are assigned along a seeded permutation of the sorted class names.
    perm = np.random.default_rng([0, 1]).permutation(40)
    order = [sorted(per_class)[i] for i in perm]
    assert [hist[c] for c in order] == list(counts)
    assert len({r.key for r in chosen}) == len(chosen)
    assert [r.key for r in chosen] == sorted(r.key for r in chosen)


def test_long_tailed_respects_available_images():
    per_class = {f"n{i:03d}": 100 for i in range(40)}
    head = [sorted(per_class)[i] for i in np.random.default_rng([0, 1]).permutation(40)[:2]]
    for c in head:  # the permutation puts these at the head ranks, but they are too small for them
        per_class[c] = 10
    chosen = select(_records(per_class), LT)
    hist = Counter(r.cls for r in chosen)
    assert sum(hist.values()) == LT["total"]
    assert all(hist[c] <= per_class[c] for c in hist)
    assert sorted(hist.values(), reverse=True) == list(pareto_counts(40, 6, 700, 3, 80, seed=0))
    assert all(hist[c] <= 10 for c in head)
    with pytest.raises(SubsetRuleError, match=head[0]):
        select(_records({**per_class, head[0]: 2}), LT)


def test_determinism_and_seed_sensitivity():
    recs = _records({f"n{i:03d}": 50 for i in range(30)})
    lt = {**LT, "total": 400, "max_per_class": 50}
    keys = lambda rule: [r.key for r in select(recs, rule)]  # noqa: E731
    for rule in (lt, {"rule": "uniform", "per_class": 7, "seed": 0}, {"rule": "random", "n": 100, "seed": 0}):
        assert keys(rule) == keys(dict(rule))
        assert keys(rule) != keys({**rule, "seed": 1})


def test_uniform_and_random_and_all():
    per_class = {"a": 10, "b": 12, "c": 9}
    recs = _records(per_class)
    hist = Counter(r.cls for r in select(recs, {"rule": "uniform", "per_class": 9, "seed": 3}))
    assert hist == {"a": 9, "b": 9, "c": 9}
    with pytest.raises(SubsetRuleError, match="class 'c' has 9 images"):
        select(recs, {"rule": "uniform", "per_class": 10})
    rnd = select(recs, {"rule": "random", "n": 20, "seed": 0})
    assert len(rnd) == len({r.key for r in rnd}) == 20
    with pytest.raises(SubsetRuleError, match="exceeds"):
        select(recs, {"rule": "random", "n": 32})
    assert [r.key for r in select(recs[::-1], {"rule": "all"})] == sorted(r.key for r in recs)
    with pytest.raises(SubsetRuleError, match="known rules"):
        select(recs, {"rule": "pareto"})
    with pytest.raises(SubsetRuleError, match="unknown keys"):
        select(recs, {"rule": "random", "n": 3, "N": 4})
    scene = [Record("k", "/p", None, [], "train")]
    with pytest.raises(SubsetRuleError, match="image-level class"):
        select(scene, {"rule": "uniform", "per_class": 1})


def test_cli_writes_subset_and_log(tmp_path):
    root = make_imagenet(tmp_path / "in", {"n001": 5, "n002": 6, "n003": 7})
    out = tmp_path / "results/data/x/subset.csv"
    log = tmp_path / "logs/x.log"
    rule = {"rule": "uniform", "per_class": 4, "seed": 0}
    subsets.main(
        [
            "--format",
            "imagenet",
            "--root",
            str(root),
            "--rule-json",
            json.dumps(rule),
            "--out",
            str(out),
            "--log",
            str(log),
        ]
    )
    recs = read_subset_csv(out)
    assert Counter(r.cls for r in recs) == {"n001": 4, "n002": 4, "n003": 4}
    text = log.read_text()
    assert "read 18 records, kept 12" in text and "annotation_without_image" in text
