"""Alignment / uniformity / false-negative share against direct double-loop computations and toy cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import embedding_stats as E


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(23, 5))
    labels = rng.integers(0, 4, size=23)
    return feats, labels


def test_alignment_matches_loop(data):
    feats, _ = data
    other = feats + np.random.default_rng(1).normal(scale=0.3, size=feats.shape)
    f, g = unit(feats), unit(other)
    want = sum(math.dist(f[i], g[i]) ** 2 for i in range(len(f))) / len(f)
    assert E.alignment(feats, other) == pytest.approx(want)
    assert E.alignment(feats, other, alpha=1) == pytest.approx(np.mean([math.dist(a, b) for a, b in zip(f, g, strict=True)]))


@pytest.mark.parametrize("alpha", [2.0, 1.0])
def test_class_alignment_matches_loop(data, alpha):
    feats, labels = data
    f = unit(feats)
    dists = [math.dist(f[i], f[j]) ** alpha for i in range(len(f)) for j in range(i + 1, len(f))
             if labels[i] == labels[j]]  # fmt: skip
    assert E.class_alignment(feats, labels, alpha=alpha) == pytest.approx(sum(dists) / len(dists))


@pytest.mark.parametrize("chunk", [3, 2048])
def test_uniformity_matches_loop(data, chunk):
    feats, _ = data
    f = unit(feats)
    pot = [math.exp(-2 * math.dist(f[i], f[j]) ** 2) for i in range(len(f)) for j in range(i + 1, len(f))]
    assert E.uniformity(feats, t=2, chunk=chunk) == pytest.approx(math.log(sum(pot) / len(pot)))


def test_uniformity_extremes():
    # identical embeddings: log E exp(0) = 0; two antipodal points: log exp(-2 * 4) = -8 (the minimum for a pair)
    assert E.uniformity(np.ones((4, 3))) == pytest.approx(0.0)
    assert E.uniformity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-8.0)


def toy():
    """Two tight classes on opposite sides of the circle: 3 items each."""
    ang = np.array([0.0, 0.1, 0.2, math.pi, math.pi + 0.1, math.pi + 0.2])
    return np.stack([np.cos(ang), np.sin(ang)], 1), np.array([0, 0, 0, 1, 1, 1])


def test_false_negative_share_toy_known_answer():
    feats, labels = toy()
    # the 2 hardest negatives of every query are its two class mates
    assert E.false_negative_share(feats, labels, top_k=2)["fn_share"] == pytest.approx(1.0)
    # top-3: both mates plus one item of the other class
    res = E.false_negative_share(feats, labels, top_k=3)
    assert res["fn_share"] == pytest.approx(2 / 3)
    assert res["fn_share_chance"] == pytest.approx(2 / 5)  # 2 mates among 5 negatives
    # all negatives: the share is the chance level
    assert E.false_negative_share(feats, labels, top_k=5)["fn_share"] == pytest.approx(2 / 5)
    with pytest.raises(ValueError, match="top_k"):
        E.false_negative_share(feats, labels, top_k=6)


def test_false_negative_share_with_queue_matches_loop(data):
    feats, labels = data
    f = unit(feats)
    res = E.false_negative_share(feats, labels, top_k=4, queue_size=10, seed=7, chunk=5)
    queue = np.sort(np.random.default_rng(7).choice(len(f), size=10, replace=False))
    shares, chances = [], []
    for i in range(len(f)):
        negs = [j for j in queue if j != i]
        ranked = sorted(negs, key=lambda j: -float(f[i] @ f[j]))[:4]
        shares.append(np.mean([labels[j] == labels[i] for j in ranked]))
        chances.append(np.mean([labels[j] == labels[i] for j in negs]))
    assert res["fn_share"] == pytest.approx(np.mean(shares))
    assert res["fn_share_chance"] == pytest.approx(np.mean(chances))


def test_embedding_stats_scales_top_k_with_the_queue(data):
    feats, labels = data
    res = E.embedding_stats(feats, labels, top_k=1024, queue_size=16384)
    assert res["queue_size"] == 22 and res["top_k"] == 1  # 1024/16384 of 22 negatives, at least one
    res = E.embedding_stats(feats, labels, top_k=8, queue_size=16)
    assert (res["queue_size"], res["top_k"]) == (16, 8)
    assert res["alignment"] == pytest.approx(E.class_alignment(feats, labels))


def test_cli_on_image_folder_with_random_backbone(tmp_path):
    from study.models import build_backbone

    net, dim = build_backbone("resnet18", small_input=True)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"backbone": net.state_dict(), "arch": "resnet18", "small_input": True, "feat_dim": dim}, ckpt)
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    out = tmp_path / "out" / "embedding_stats.json"
    rc = E.main(["--checkpoint", str(ckpt), "--image-folder", str(tmp_path / "imgs"), "--out", str(out),
                 "--settings-json", json.dumps({"image_size": 16, "top_k": 2, "queue_size": 5}), "--device", "cpu",
                 "--no-progress"])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_images"] == 6 and res["n_classes"] == 2 and res["feature_dim"] == dim and res["top_k"] == 2
    assert 0 <= res["fn_share"] <= 1 and res["fn_share_chance"] == pytest.approx(2 / 5)
    assert res["uniformity"] <= 0 and res["alignment"] >= 0


def test_scene_subset_without_classes_is_rejected(tmp_path):
    subset = tmp_path / "subset.csv"
    subset.write_text("key,path,class,n_objects,split,width,height,boxes,attributes\nk,/x.jpg,,3,train,4,4,[],{}\n")
    with pytest.raises(E.EmbeddingInputError, match="no row has an image-level class"):
        E.read_labelled_subset(subset)
