"""Shard loader on tiny tars written with webdataset.TarWriter from PIL-made JPEGs."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from study.data import decode_for_boxes, draft_factor, make_loader, views_from_image

PER_SHARD = 12


def _jpeg(rng, h, w):
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    labels, urls = {}, []
    for s in range(2):
        url = str(root / f"tiny-{s:06d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(PER_SHARD):
                key = f"s{s}_{i:03d}"
                h, w = (int(v) for v in rng.integers(48, 160, 2))
                label = -1 if i % 5 == 4 else int(rng.integers(0, 7))
                labels[key] = label
                meta = {"class_index": label, "width": w, "height": h}
                sink.write({"__key__": key, "jpg": _jpeg(rng, h, w), "json": json.dumps(meta).encode()})
        urls.append(url)
    return urls, labels


CROP = {"size": 32, "n_small": 2, "small_size": 16, "constraint": "inside", "max_iou": 1.0}


def _check_batch(batch, labels, bs, sizes):
    assert set(batch) == {"views", "label", "fallbacks", "iou", "key", "index"}
    assert [tuple(v.shape) for v in batch["views"]] == [(bs, 3, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 for v in batch["views"])
    assert batch["label"].dtype == torch.long and batch["fallbacks"].dtype == torch.long
    assert batch["label"].tolist() == [labels[k] for k in batch["key"]]
    assert batch["fallbacks"].shape == (bs,)
    assert batch["iou"].shape == (bs,) and ((batch["iou"] >= 0) & (batch["iou"] <= 1)).all()


def test_batches_main_process(shards):
    urls, labels = shards
    loader = make_loader(urls, CROP, {"aplus": True}, batch_size=4, num_workers=0, seed=0, epoch_len=5)
    batches = list(loader)
    assert len(batches) == len(loader) == 5
    for b in batches:
        _check_batch(b, labels, 4, [32, 32, 16, 16])
    # normalised: roughly zero-mean, not in [0, 1]
    assert batches[0]["views"][0].min() < 0
    # first pass over 24 samples = first 6 batches; all keys distinct within it
    keys = [k for b in batches for k in b["key"]]
    assert len(set(keys)) == len(keys)


def test_determinism_and_epochs(shards):
    urls, _ = shards

    def run(seed):
        loader = make_loader(urls, CROP, {}, batch_size=4, num_workers=0, seed=seed, epoch_len=3)
        first = list(loader)
        second = list(loader)  # the next epoch: a different order
        return first, second

    a1, a2 = run(7)
    b1, _ = run(7)
    c1, _ = run(8)
    assert [b["key"] for b in a1] == [b["key"] for b in b1]
    for x, y in zip(a1, b1, strict=True):
        for vx, vy in zip(x["views"], y["views"], strict=True):
            torch.testing.assert_close(vx, vy)
    assert [b["key"] for b in a1] != [b["key"] for b in a2]
    assert [b["key"] for b in a1] != [b["key"] for b in c1]


def test_fallbacks_reported(shards):
    urls, _ = shards
    crop = {"size": 16, "scale": [0.9, 1.0], "max_iou": 0.01, "max_tries": 3}
    batch = next(iter(make_loader(urls, crop, {}, batch_size=4, num_workers=0, seed=0, epoch_len=None)))
    assert batch["fallbacks"].tolist() == [1, 1, 1, 1]
    assert (batch["iou"] >= 0.01).all()  # the realised IoU shows the broken ceiling
    crop = {"size": 16, "max_iou": 0.1, "max_tries": 3}  # attainable: the ceiling holds however few tries
    batch = next(iter(make_loader(urls, crop, {}, batch_size=4, num_workers=0, seed=0, epoch_len=None)))
    assert batch["fallbacks"].sum() == 0 and (batch["iou"] < 0.1).all()


def test_two_workers_read_disjoint_shards(shards):
    urls, labels = shards
    bs = 4
    loader = make_loader(urls, CROP, {}, batch_size=bs, num_workers=2, seed=0, epoch_len=2 * PER_SHARD // bs)
    batches = list(loader)
    for b in batches:
        _check_batch(b, labels, bs, [32, 32, 16, 16])
    # the DataLoader alternates workers; within the first pass each worker owns one shard
    per_worker = [{k for b in batches[w::2] for k in b["key"]} for w in range(2)]
    assert not per_worker[0] & per_worker[1]
    prefixes = [{k.split("_")[0] for k in keys} for keys in per_worker]
    assert all(len(p) == 1 for p in prefixes) and prefixes[0] != prefixes[1]


def test_fewer_shards_than_workers_still_disjoint(shards):
    urls, labels = shards
    with pytest.warns(UserWarning, match="shards <"):
        loader = make_loader(urls[:1], CROP, {}, batch_size=3, num_workers=2, seed=0, epoch_len=4)
    batches = list(loader)
    per_worker = [{k for b in batches[w::2] for k in b["key"]} for w in range(2)]
    assert not per_worker[0] & per_worker[1] and len(per_worker[0] | per_worker[1]) == PER_SHARD


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_loader([str(tmp_path / "nope.tar")], CROP, {}, 2, 0, 0, None)


def test_draft_decode_keeps_needed_resolution():
    rng = np.random.default_rng(1)
    data = _jpeg(rng, 512, 640)
    boxes = np.array([[10, 20, 300, 280], [100, 50, 260, 400]])
    sizes = [64, 64]
    img, s = decode_for_boxes(data, boxes, sizes)
    assert s == draft_factor(boxes, sizes) == 4 and img.size == (160, 128) and img.mode == "RGB"
    scaled = boxes[:, 2:] / s
    assert (scaled.min(axis=1) >= np.array(sizes)).all()
    # a box just under 2x the output size forbids any reduction
    img1, s1 = decode_for_boxes(data, np.array([[0, 0, 127, 300]]), [64])
    assert s1 == 1 and img1.size == (640, 512)


def test_views_from_image_matches_crop_resize_flip():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    boxes = np.array([[5, 10, 30, 40], [0, 0, 50, 70]])
    ident = [np.asarray, np.asarray]
    out = views_from_image(img, boxes, [16, 24], [False, True], ident)
    want0 = np.asarray(img.crop((10, 5, 50, 35)).resize((16, 16), Image.Resampling.BILINEAR))
    want1 = np.asarray(img.resize((24, 24), Image.Resampling.BILINEAR))[:, ::-1]
    # one resample from the box (PIL's box=) equals crop-then-resize except where the filter support
    # reaches past the box edge: outside pixels are used instead of edge-clamping
    np.testing.assert_array_equal(out[0][2:-2, 2:-2], want0[2:-2, 2:-2])
    np.testing.assert_array_equal(out[1], want1)
    with pytest.raises(ValueError):
        views_from_image(img, boxes, [16], [False], ident[:1])


# ------------------------------------------------------------------------ data.render: batched


def test_batched_render_gives_uint8_views_with_the_same_geometry(shards):
    from study.colour import BatchColour, colour_generator

    urls, labels = shards
    pil = list(make_loader(urls, CROP, {}, batch_size=4, num_workers=0, seed=3, epoch_len=3))
    bat = list(make_loader(urls, CROP, {}, batch_size=4, num_workers=0, seed=3, epoch_len=3, render="batched"))
    sizes = [32, 32, 16, 16]
    stage = BatchColour({}, sizes)
    for p, b in zip(pil, bat, strict=True):
        # geometry is drawn from the numpy stream, untouched by where colour runs: same samples, same crops
        assert p["key"] == b["key"] and torch.equal(p["iou"], b["iou"]) and torch.equal(p["label"], b["label"])
        assert set(b) == set(p) | {"autoaug"}
        assert [tuple(v.shape) for v in b["views"]] == [(4, 3, s, s) for s in sizes]
        assert all(v.dtype == torch.uint8 for v in b["views"])
        assert [a.tolist() for a in b["autoaug"]] == [[False] * 4] * 4  # no A+: nothing AutoAugmented
        out = stage(b["views"], colour_generator(0, 0), b["autoaug"])
        assert [(v.dtype, tuple(v.shape)) for v in out] == [(p["views"][i].dtype, tuple(p["views"][i].shape))
                                                             for i in range(4)]
        _check_batch({k: v for k, v in b.items() if k != "autoaug"} | {"views": out}, labels, 4, sizes)


def test_batched_render_flags_aplus_autoaugment_views(shards):
    urls, _ = shards

    def flags(p):
        loader = make_loader(urls, CROP, {"aplus": True, "aplus_p": p}, batch_size=4, num_workers=0, seed=0,
                             epoch_len=4, render="batched")
        return torch.stack([torch.stack(b["autoaug"]) for b in loader], dim=1)  # (views, batches, B)

    every = flags(0.0)  # AutoAugment always: every view but the key
    assert not every[0].any() and every[1:].all()
    assert not flags(1.0).any()
    half = flags(0.5)
    assert not half[0].any() and 0 < half[1:].float().mean() < 1


def test_batched_render_with_workers_is_deterministic(shards):
    urls, _ = shards

    def run():
        return list(make_loader(urls, CROP, {"aplus": True}, batch_size=4, num_workers=2, seed=1, epoch_len=3,
                                render="batched"))

    a, b = run(), run()
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"]
        assert all(torch.equal(u, v) for u, v in zip(x["views"] + x["autoaug"], y["views"] + y["autoaug"],
                                                      strict=True))


def test_bad_render_is_a_clear_error(shards):
    from study.runconfig import ConfigError, compose_config, validate_config

    urls, _ = shards
    with pytest.raises(ValueError, match=r"data.render must be one of pil, batched, got 'foo'"):
        make_loader(urls, CROP, {}, 2, 0, 0, None, render="foo")
    cfg = compose_config(["out_dir=x", "data.shards=x", "data.render=foo"])
    with pytest.raises(ConfigError, match=r"data.render='foo': must be one of 'pil', 'batched'"):
        validate_config(cfg, world=1)
    assert compose_config(["out_dir=x", "data.shards=x"]).data.render == "batched"  # the default
