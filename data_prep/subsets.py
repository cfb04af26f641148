"""Deterministic subset selection: (records, rule dict) -> the list of images a model is pretrained on.

The list is the artefact (REFERENCE.md: the ImageNet-LT sampling code and seed were never published, only file
lists), so it is written to subset.csv before any shard exists. Every rule is a pure function of the records
and the rule dict; the seed lives in the rule.

Random streams (documented so the lists can be re-derived elsewhere):
  * `pareto_counts`: numpy `default_rng(seed)`, one `pareto(alpha, n_classes)` draw.
  * `long_tailed` class assignment and image draws: `default_rng([seed, 1])`: a permutation of the sorted
    class names, then per class (in sorted-name order) `choice(n_available, count, replace=False)` over that
    class's images sorted by key.
  * `uniform`: `default_rng(seed)`, per class in sorted-name order, the same `choice` draw.
  * `random`: `default_rng(seed).choice(n, N, replace=False)` over all records sorted by key.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from data_prep.readers import file_options, read_records
from data_prep.records import Record, configure_logging, write_subset_csv

log = logging.getLogger(__name__)

RULE_KEYS = {
    "all": set(),
    "uniform": {"per_class", "seed"},
    "long_tailed": {"alpha", "total", "min_per_class", "max_per_class", "seed"},
    "random": {"n", "seed"},
}
REQUIRED = {
    "all": set(),
    "uniform": {"per_class"},
    "long_tailed": {"alpha", "total", "min_per_class", "max_per_class"},
    "random": {"n"},
}


class SubsetRuleError(ValueError):
    """The rule dict is malformed or cannot be satisfied by the records."""


def pareto_curve(
    n_classes: int, alpha: float, min_per_class: float, max_per_class: float, seed: int
) -> np.ndarray:
    """Pareto(alpha) draws for each class, sorted descending and linearly rescaled to [min, max].

    numpy's `pareto` is the Lomax (shifted) form; the shift is irrelevant after the affine rescale.
    """
    if n_classes < 1:
        raise SubsetRuleError("long_tailed needs at least one class")
    draws = np.sort(np.random.default_rng(seed).pareto(alpha, n_classes))[::-1]
    span = draws[0] - draws[-1]
    if span <= 0:
        return np.full(n_classes, float(max_per_class))
    return min_per_class + (draws - draws[-1]) / span * (max_per_class - min_per_class)


def _fit_total(curve: np.ndarray, lower: float, upper: np.ndarray, total: int) -> np.ndarray:
    """Integer counts, non-increasing, lower <= c <= upper, summing to `total`, following the curve's shape.

    The curve's excess over `lower` is scaled by one factor f (found by bisection) and clipped to the bounds;
    floors are topped up by largest remainder, then sorted descending (safe: upper is non-increasing, so the
    sorted counts still respect it).
    """
    excess = curve - lower

    def filled(f: float) -> np.ndarray:
        return np.clip(lower + f * excess, lower, upper)

    lo, hi = 0.0, 1.0
    while filled(hi).sum() < total and hi < 1e12:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if filled(mid).sum() < total:
            lo = mid
        else:
            hi = mid
    x = filled(hi)
    counts = np.floor(x + 1e-9).astype(np.int64)
    counts = np.minimum(counts, upper.astype(np.int64))
    remaining = int(total - counts.sum())
    frac = x - counts
    while remaining > 0:
        room = np.flatnonzero(counts < upper)
        order = room[np.argsort(-frac[room], kind="stable")][:remaining]
        counts[order] += 1
        frac[order] = -1.0
        remaining -= len(order)
    while remaining < 0:  # only from float error in the bisection; take from the smallest remainders
        room = np.flatnonzero(counts > lower)
        order = room[np.argsort(frac[room], kind="stable")][:-remaining]
        counts[order] -= 1
        remaining += len(order)
    return np.sort(counts)[::-1]


def pareto_counts(
    n_classes: int,
    alpha: float,
    total: int,
    min_per_class: int,
    max_per_class: int,
    seed: int,
    upper: Sequence[int] | None = None,
) -> np.ndarray:
    """Per-rank image counts of the ImageNet-LT recipe, sorted descending, summing exactly to `total`.

    `upper` optionally caps each rank further (e.g. by the images available to the class at that rank).
    """
    if not 0 < min_per_class <= max_per_class:
        raise SubsetRuleError(
            f"need 0 < min_per_class <= max_per_class, got {min_per_class}, {max_per_class}"
        )
    cap = np.full(n_classes, max_per_class, dtype=np.int64)
    if upper is not None:
        cap = np.minimum(cap, np.asarray(upper, dtype=np.int64))
    cap = np.minimum.accumulate(cap)  # counts are non-increasing, so rank r can never exceed ranks above it
    lo_total, hi_total = n_classes * min_per_class, int(cap.sum())
    if not lo_total <= total <= hi_total:
        raise SubsetRuleError(
            f"long_tailed total {total} is not reachable with {n_classes} classes: must lie in "
            f"[{lo_total}, {hi_total}] given min_per_class={min_per_class}, max_per_class={max_per_class} "
            "and the "
            "images available per class; change total or the bounds"
        )
    if (cap < min_per_class).any():
        raise SubsetRuleError(f"a class has fewer than min_per_class={min_per_class} images available")
    curve = pareto_curve(n_classes, alpha, min_per_class, max_per_class, seed)
    return _fit_total(curve, float(min_per_class), cap.astype(float), int(total))


def _by_class(records: Sequence[Record], rule: str) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = defaultdict(list)
    unlabelled = 0
    for r in records:
        if r.cls is None:
            unlabelled += 1
        else:
            groups[r.cls].append(r)
    if unlabelled:
        raise SubsetRuleError(
            f"rule {rule!r} needs an image-level class, but {unlabelled} records have none "
            "(scene datasets: use 'all' or 'random')"
        )
    for v in groups.values():
        v.sort(key=lambda r: r.key)
    return dict(sorted(groups.items()))


def _assign_ranks(
    classes: list[str], avail: dict[str, int], counts: np.ndarray, rng: np.random.Generator
) -> list[str]:
    """Seeded permutation of classes onto ranks, repaired so each rank's class has enough images: a class that
    is too small for its rank swaps with the first later class that is large enough."""
    order = [classes[i] for i in rng.permutation(len(classes))]
    for r in range(len(order)):
        if avail[order[r]] >= counts[r]:
            continue
        for s in range(r + 1, len(order)):
            if avail[order[s]] >= counts[r]:
                order[r], order[s] = order[s], order[r]
                break
    return order


def _long_tailed(records: Sequence[Record], rule: dict) -> list[Record]:
    groups = _by_class(records, "long_tailed")
    classes = list(groups)
    avail = {c: len(v) for c, v in groups.items()}
    seed = int(rule.get("seed", 0))
    small = [c for c in classes if avail[c] < rule["min_per_class"]]
    if small:
        raise SubsetRuleError(
            f"long_tailed: classes {small[:10]} have fewer than min_per_class="
            f"{rule['min_per_class']} images; lower min_per_class or drop those classes"
        )
    args = (
        len(classes),
        float(rule["alpha"]),
        int(rule["total"]),
        int(rule["min_per_class"]),
        int(rule["max_per_class"]),
        seed,
    )
    counts = pareto_counts(*args)
    rng = np.random.default_rng([seed, 1])
    perm_state = rng.bit_generator.state
    for _ in range(10):
        rng.bit_generator.state = perm_state
        order = _assign_ranks(classes, avail, counts, rng)
        upper = [avail[c] for c in order]
        if all(counts[r] <= upper[r] for r in range(len(order))):
            break
        counts = pareto_counts(*args, upper=upper)
    else:
        raise SubsetRuleError("long_tailed: could not fit the counts to the images available per class")
    n_for = dict(zip(order, counts.tolist(), strict=True))
    chosen = []
    for c in classes:
        pool = groups[c]
        idx = rng.choice(len(pool), n_for[c], replace=False)
        chosen.extend(pool[i] for i in np.sort(idx))
    return chosen


def _uniform(records: Sequence[Record], rule: dict) -> list[Record]:
    groups = _by_class(records, "uniform")
    n = int(rule["per_class"])
    short = {c: len(v) for c, v in groups.items() if len(v) < n}
    if short:
        c, k = next(iter(short.items()))
        raise SubsetRuleError(
            f"uniform: class {c!r} has {k} images, fewer than per_class={n} "
            f"({len(short)} classes short in total); lower per_class"
        )
    rng = np.random.default_rng(int(rule.get("seed", 0)))
    chosen = []
    for pool in groups.values():
        idx = rng.choice(len(pool), n, replace=False)
        chosen.extend(pool[i] for i in np.sort(idx))
    return chosen


def _random(records: Sequence[Record], rule: dict) -> list[Record]:
    n = int(rule["n"])
    pool = sorted(records, key=lambda r: r.key)
    if n > len(pool):
        raise SubsetRuleError(f"random: n={n} exceeds the {len(pool)} images available; lower n or use 'all'")
    idx = np.random.default_rng(int(rule.get("seed", 0))).choice(len(pool), n, replace=False)
    return [pool[i] for i in np.sort(idx)]


def validate_rule(rule: dict) -> str:
    name = rule.get("rule")
    if name not in RULE_KEYS:
        raise SubsetRuleError(f"unknown subset rule {name!r}; known rules: {', '.join(sorted(RULE_KEYS))}")
    extra = set(rule) - RULE_KEYS[name] - {"rule"}
    if extra:
        raise SubsetRuleError(
            f"rule {name!r}: unknown keys {sorted(extra)}; allowed: {sorted(RULE_KEYS[name])}"
        )
    missing = REQUIRED[name] - set(rule)
    if missing:
        raise SubsetRuleError(f"rule {name!r}: missing keys {sorted(missing)}")
    return name


def select(records: Sequence[Record], rule: dict) -> list[Record]:
    """Apply a subset rule; the result is sorted by key and depends only on (records, rule)."""
    name = validate_rule(rule)
    if name == "all":
        chosen = list(records)
    elif name == "uniform":
        chosen = _uniform(records, rule)
    elif name == "long_tailed":
        chosen = _long_tailed(records, rule)
    else:
        chosen = _random(records, rule)
    return sorted(chosen, key=lambda r: r.key)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Read a dataset, select a subset, write subset.csv")
    p.add_argument("--format", required=True, help="imagenet | coco | openimages | bdd100k")
    p.add_argument("--root", required=True)
    p.add_argument("--split", default="train")
    p.add_argument(
        "--rule-json", required=True, help='e.g. \'{"rule": "uniform", "per_class": 118, "seed": 0}\''
    )
    p.add_argument("--reader-json", default="{}", help="extra reader keyword options as JSON")
    p.add_argument(
        "--files-json",
        default="{}",
        help="annotation file names (config datasets.<name>.files), e.g. "
        '\'{"boxes_csv": "my-boxes.csv", "classes_csv": "my-classes.csv"}\'; relative to --root',
    )
    p.add_argument("--out", required=True)
    p.add_argument("--log", default=None)
    a = p.parse_args(argv)
    configure_logging(a.log)
    try:
        rule = json.loads(a.rule_json)
        opts = json.loads(a.reader_json)
        files = json.loads(a.files_json)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--rule-json/--reader-json/--files-json is not valid JSON: {e}") from None
    try:
        opts.update(file_options(a.format, files))
    except ValueError as e:
        raise SystemExit(str(e)) from None
    result = read_records(a.format, a.root, a.split, **opts)
    chosen = select(result.records, rule)
    write_subset_csv(chosen, a.out)
    per_class = Counter(r.cls for r in chosen if r.cls is not None)
    log.info(
        "read %d records, kept %d (rule %s), skipped %s%s -> %s",
        len(result.records),
        len(chosen),
        json.dumps(rule, sort_keys=True),
        dict(result.skipped) or "nothing",
        f", {len(per_class)} classes" if per_class else "",
        a.out,
    )


if __name__ == "__main__":
    main()
