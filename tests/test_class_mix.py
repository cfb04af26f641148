"""Class-mixed batches: shards of a syn_in-style subset, read by the real loader, give batches with as many
distinct classes as random batches would.

Why: the query encoder's BatchNorm normalises with per-batch statistics. ImageNet-format subsets are sorted by
key, i.e. by class, so shards written in that order hold runs of one class, and a streaming reader (shuffle
buffer or not) then builds batches from a handful of classes: class-specific BN statistics that bias the
study. The writer therefore writes records in a seeded random order (``data_prep.shards.shuffle_order``) and
the reader interleaves its shards (``study.data.interleave_shards``). Reference: for B images drawn
uniformly without replacement from N with class counts n_c, E[distinct classes] = sum_c 1 - C(N-n_c, B)/C(N, B).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest
from test_data import CROP
from test_shards import _read_wds

from data_prep import shards
from data_prep.readers import read_records
from data_prep.records import read_subset_csv, write_subset_csv
from data_prep.shards import load_manifest, write_shards
from data_prep.subsets import select
from data_prep.synthetic import WorldSpec, make_world
from study.data import make_loader

N_CLASSES, PER_CLASS, BATCH = 20, 30, 32  # 600 images; random batches of 32 hold ~16.3 classes


def expected_distinct(counts: list[int], batch: int) -> float:
    """Exact E[#distinct classes] in `batch` draws without replacement from a population with class `counts`."""
    n = sum(counts)
    return sum(1 - math.comb(n - c, batch) / math.comb(n, batch) for c in counts)


@pytest.fixture(scope="module")
def syn_in(tmp_path_factory) -> tuple[Path, list]:
    """The syn_in analogue: a synthetic ImageNet world, a uniform per-class subset, through subset.csv."""
    tmp = tmp_path_factory.mktemp("class_mix")
    spec = WorldSpec.from_dict(
        {"imagenet": {"splits": {"train": PER_CLASS + 2}, "n_classes": N_CLASSES, "width": 24, "height": 24}}
    )
    root = make_world(tmp / "world", spec, only=["imagenet"]) / "imagenet"
    chosen = select(read_records("imagenet", root).records, {"rule": "uniform", "per_class": PER_CLASS, "seed": 0})
    write_subset_csv(chosen, tmp / "subset.csv")
    return tmp, read_subset_csv(tmp / "subset.csv")


def _labels(out: Path) -> list[int]:
    """class_index of every sample, in written order (shards in manifest order)."""
    return [json.loads(s["json"])["class_index"] for s in _read_wds(out)]


def _labels_of(out: Path, name: str) -> list[int]:
    return [json.loads(s["json"])["class_index"] for s in _read_wds(out) if s["__url__"].endswith(name)]


def _runs(seq: list) -> int:
    return sum(1 for _ in itertools.groupby(seq))


def _mean_distinct(out: Path, n_images: int, num_workers: int = 0, **kw) -> float:
    """Mean number of distinct labels per batch over one pass of the real loader."""
    _, tars = load_manifest(out)
    loader = make_loader([str(t) for t in tars], CROP, {}, batch_size=BATCH, num_workers=num_workers, seed=0,
                         epoch_len=n_images // BATCH, shuffle_buffer=BATCH, **kw)
    distinct = [len(set(b["label"].tolist())) for b in loader]
    assert len(distinct) == n_images // BATCH
    return sum(distinct) / len(distinct)


def test_expected_distinct_is_exact():
    counts, batch = [3, 2, 1, 1], 3
    pop = [c for c, n in enumerate(counts) for _ in range(n)]
    draws = list(itertools.combinations(range(len(pop)), batch))
    brute = sum(len({pop[i] for i in d}) for d in draws) / len(draws)
    assert expected_distinct(counts, batch) == pytest.approx(brute, rel=1e-12)


def test_shuffled_shards_give_random_like_batches(syn_in):
    tmp, recs = syn_in
    out = tmp / "shuffled"
    write_shards(recs, out, "syn_in", max_per_shard=100, min_shards=2, progress=False)
    counts = list(Counter(r.cls for r in recs).values())
    want = expected_distinct(counts, BATCH)
    got = _mean_distinct(out, len(recs), num_workers=2)  # two workers, three shards each
    print(f"distinct classes per batch of {BATCH}: {got:.2f} (random: {want:.2f})")
    assert got >= 0.9 * want


def test_written_order_is_seeded_reproducible_and_not_class_sorted(syn_in):
    tmp, recs = syn_in
    m = write_shards(recs, tmp / "a", "syn_in", max_per_shard=100, min_shards=2, progress=False, shuffle_seed=0)
    assert m["options"]["shuffle_seed"] == 0 and "sha256" in m["order"]
    keys = [s["__key__"] for s in _read_wds(tmp / "a")]
    # the documented rule, recomputed here: sort by sha256("<seed>:<key>")
    assert keys == sorted((r.key for r in recs), key=lambda k: hashlib.sha256(f"0:{k}".encode()).digest())
    labels = _labels(tmp / "a")
    assert _runs(labels) > len(recs) // 2  # class-sorted would be N_CLASSES runs

    again = write_shards(recs, tmp / "b", "syn_in", max_per_shard=100, min_shards=2, progress=False)
    assert again["shards"] == m["shards"]  # same seed: byte-identical (sha256 per shard)
    write_shards(recs, tmp / "c", "syn_in", max_per_shard=100, min_shards=2, progress=False, shuffle_seed=1)
    assert [s["__key__"] for s in _read_wds(tmp / "c")] != keys and sorted(_labels(tmp / "c")) == sorted(labels)

    old = write_shards(recs, tmp / "d", "syn_in", max_per_shard=100, min_shards=2, progress=False,
                       shuffle_seed=None)
    assert old["options"]["shuffle_seed"] is None
    assert [s["__key__"] for s in _read_wds(tmp / "d")] == [r.key for r in recs]
    assert _runs(_labels(tmp / "d")) == N_CLASSES  # what the writer used to do: class runs

    base = ["--subset", str(tmp / "subset.csv"), "--name", "syn_in", "--max-per-shard", "100"]
    shards.main([*base, "--out", str(tmp / "cli3"), "--shuffle-seed", "3"])
    shards.main([*base, "--out", str(tmp / "cli_off"), "--no-shuffle"])
    assert json.loads((tmp / "cli3" / "manifest.json").read_text())["options"]["shuffle_seed"] == 3
    assert json.loads((tmp / "cli_off" / "manifest.json").read_text())["options"]["shuffle_seed"] is None


def test_interleaving_reader_mixes_old_class_ordered_shards(syn_in, caplog):
    """Shards written in class order by an older writer, one class per shard, and one reader holding all 20:
    the reader's round robin over its shards alone restores class diversity; reading them one after another
    does not. (A reader can only mix the classes of its own shards: with a few multi-class shards per reader,
    as at paper scale, old shard sets must be rebuilt.)"""
    tmp, recs = syn_in
    out = tmp / "class_ordered"
    write_shards(recs, out, "syn_in", max_per_shard=PER_CLASS, progress=False, shuffle_seed=None)
    assert all(len(set(_labels_of(out, s["name"]))) == 1 for s in load_manifest(out)[0]["shards"])
    assert "rebuild them" in caplog.text  # load_manifest flags shard sets written without a shuffle
    want = expected_distinct(list(Counter(r.cls for r in recs).values()), BATCH)
    mixed = _mean_distinct(out, len(recs))
    sequential = _mean_distinct(out, len(recs), interleave=1)  # the reader before interleaving
    print(f"class-ordered shards: {mixed:.2f} interleaved, {sequential:.2f} sequential (random: {want:.2f})")
    assert mixed >= 0.9 * want
    assert sequential < 0.5 * want  # the measurement does see class-sorted batches
