"""Shard writer: byte-identical round trip through webdataset, bad inputs counted, crash safety."""

from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from format_fixtures import jpeg_bytes, make_bad_images, make_coco, make_imagenet, make_openimages
from PIL import Image

from data_prep import shards
from data_prep.imageio import jpeg_header, read_bytes
from data_prep.readers import read_records
from data_prep.records import Box, Record, write_subset_csv
from data_prep.shards import shard_count, ustar_header, write_shards


def _read_wds(out: Path) -> list[dict]:
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _bad_records(tmp_path: Path) -> tuple[list[Record], dict[str, Path]]:
    files = make_bad_images(tmp_path / "img")
    recs = [Record(k, str(p), None, [], "train") for k, p in sorted(files.items())]
    recs.append(Record("missing", str(tmp_path / "img" / "gone.jpg"), None, [], "train"))
    return recs, files


def test_round_trip_through_webdataset(tmp_path):
    recs = read_records("imagenet", make_imagenet(tmp_path / "in", {"n001": 4, "n002": 3, "n003": 2})).records
    out = tmp_path / "shards"
    manifest = write_shards(recs, out, "inx", max_per_shard=4, min_shards=2, progress=False)
    n_shards = max(math.ceil(len(recs) / 4), 2)
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == [f"inx-{i:06d}.tar" for i in range(n_shards)]
    assert [s["name"] for s in manifest["shards"]] == names
    for s in manifest["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    classes = sorted({r.cls for r in recs})
    assert manifest["classes"] == classes and manifest["totals"]["images"] == len(recs)

    samples = _read_wds(out)
    recs = shards.shuffle_order(recs, 0)  # the written order (class mixing), recorded in the manifest
    assert manifest["options"]["shuffle_seed"] == 0
    assert [s["__key__"] for s in samples] == [r.key for r in recs]
    for s, r in zip(samples, recs, strict=True):
        assert s["jpg"] == Path(r.path).read_bytes()
        meta = json.loads(s["json"])
        assert meta["path"] == r.path and meta["class"] == r.cls
        assert meta["class_index"] == classes.index(r.cls)
        assert meta["boxes"] == [b.to_list() for b in r.boxes]
        assert meta["n_objects"] == r.n_objects
        with Image.open(r.path) as im:
            assert (meta["width"], meta["height"]) == im.size


def test_tar_layout_matches_tarfile_and_is_deterministic(tmp_path):
    recs = read_records("coco", make_coco(tmp_path / "coco")).records
    m1 = write_shards(recs, tmp_path / "a", "coco", progress=False)
    m2 = write_shards(recs, tmp_path / "b", "coco", progress=False, workers=2)
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    recs = shards.shuffle_order(recs, 0)
    with tarfile.open(tmp_path / "a" / "coco-000000.tar") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [f"{r.key}.{ext}" for r in recs for ext in ("jpg", "json")]
        assert all(m.mtime == 0 and m.isfile() for m in members)
        assert tf.extractfile(members[0]).read() == Path(recs[0].path).read_bytes()
    ti = tarfile.TarInfo("abc_1.json")
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = 1234, 0, 0o444, "", ""
    assert ustar_header("abc_1.json", 1234) == ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    assert (tmp_path / "a" / "coco-000000.tar").stat().st_size % (512 * 20) == 0


def test_coco_crowd_and_openimages_boxes_made_absolute(tmp_path):
    recs = read_records("openimages", make_openimages(tmp_path / "oi")).records
    write_shards(recs, tmp_path / "s", "oi", progress=False)
    for s, r in zip(_read_wds(tmp_path / "s"), shards.shuffle_order(recs, 0), strict=True):
        meta = json.loads(s["json"])
        w, h = Image.open(io.BytesIO(s["jpg"])).size
        assert meta["attributes"]["box_coords"] == "absolute"
        assert meta["boxes"] == [[b.x1 * w, b.y1 * h, b.x2 * w, b.y2 * h, b.label] for b in r.boxes]
        assert meta["class_index"] == -1 and meta["class"] is None


def test_bad_inputs_are_handled_and_counted(tmp_path):
    recs, files = _bad_records(tmp_path)
    out = tmp_path / "s"
    m = write_shards(recs, out, "bad", progress=False)
    assert m["skipped"] == {"corrupt": 2, "empty": 1, "missing": 1}  # truncated + garbage, zero-byte, gone
    assert m["converted"] == {"png": 1}
    assert m["kept_flags"]["grayscale"] == 1 and m["kept_flags"]["cmyk"] == 1
    got = {s["__key__"]: s["jpg"] for s in _read_wds(out)}
    assert set(got) == {"ok", "grayscale", "cmyk", "png_as_jpg", "trailing_bytes"}
    for k in ("ok", "grayscale", "cmyk", "trailing_bytes"):
        assert got[k] == files[k].read_bytes()  # original bytes, never re-encoded
    assert got["png_as_jpg"][:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(got["png_as_jpg"])) as im:
        assert im.format == "JPEG" and im.size == (30, 20)
    assert Image.open(io.BytesIO(got["cmyk"])).mode == "CMYK"
    assert Image.open(io.BytesIO(got["grayscale"])).mode == "L"
    # full_decode verifies every JPEG; the classification does not change.
    m2 = write_shards(recs, tmp_path / "s2", "bad", progress=False, full_decode=True)
    assert m2["skipped"] == m["skipped"] and m2["converted"] == m["converted"]


@pytest.mark.parametrize(
    "mode,opts",
    [
        ("RGB", {}),
        ("L", {}),
        ("CMYK", {}),
        ("RGB", {"progressive": True}),
        ("RGB", {"exif": b"Exif\0\0" + bytes(300)}),
    ],
)
def test_jpeg_header_agrees_with_pil(mode, opts):
    arr = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", **opts)
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        assert jpeg_header(buf.getvalue()) == (*im.size, len(im.getbands()))
    assert jpeg_header(buf.getvalue()[:20]) is None


@pytest.mark.parametrize("size", [0, 10, 65535, 65536, 65537, 300_001])
def test_read_bytes_any_size(tmp_path, size):
    blob = bytes(range(256)) * (size // 256) + bytes(size % 256)
    (tmp_path / "f").write_bytes(blob)
    assert read_bytes(str(tmp_path / "f")) == blob


def test_max_side_resizes_and_scales_boxes(tmp_path):
    p = tmp_path / "big.jpg"
    p.write_bytes(jpeg_bytes(200, 100, seed=1))
    small = tmp_path / "small.jpg"
    small.write_bytes(jpeg_bytes(40, 20, seed=2))
    recs = [
        Record("big", str(p), "a", [Box(20, 10, 100, 50, "a")], "train"),
        Record("small", str(small), "b", [], "train", object_count=1),
    ]
    m = write_shards(recs, tmp_path / "s", "r", max_side=50, progress=False)
    assert m["converted"] == {"resized": 1}
    samples = {s["__key__"]: s for s in _read_wds(tmp_path / "s")}
    meta = json.loads(samples["big"]["json"])
    assert Image.open(io.BytesIO(samples["big"]["jpg"])).size == (50, 25) == (meta["width"], meta["height"])
    assert meta["boxes"] == [[5.0, 2.5, 25.0, 12.5, "a"]]
    assert samples["small"]["jpg"] == small.read_bytes()
    assert json.loads(samples["small"]["json"])["n_objects"] == 1


@pytest.mark.parametrize("fail_at", [1, 4])
def test_kill_midway_leaves_no_partial_tar_and_no_manifest(tmp_path, monkeypatch, fail_at):
    recs = read_records("imagenet", make_imagenet(tmp_path / "in", {"n001": 3, "n002": 3})).records
    out = tmp_path / "s"
    write_shards(recs, out, "k", max_per_shard=2, progress=False)  # a finished earlier run
    assert (out / "manifest.json").exists()
    calls = {"n": 0}
    real = shards.TarStream.add_raw

    def dying(self, members):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt("simulated kill")
        return real(self, members)

    monkeypatch.setattr(shards.TarStream, "add_raw", dying)
    with pytest.raises(KeyboardInterrupt):
        write_shards(recs, out, "k", max_per_shard=2, progress=False)
    left = sorted(p.name for p in out.iterdir())
    assert "manifest.json" not in left and not [n for n in left if n.endswith(".tmp")]
    complete = (fail_at - 1) // 2  # shards finished before the failing sample
    assert left == [f"k-{i:06d}.tar" for i in range(complete)]
    for name in left:
        with tarfile.open(out / name) as tf:
            assert len(tf.getmembers()) == 4


def test_failure_while_preparing_samples_leaves_nothing(tmp_path, monkeypatch):
    recs = read_records("imagenet", make_imagenet(tmp_path / "in", {"n001": 3})).records

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(shards, "sample_json", broken)
    with pytest.raises(RuntimeError, match="boom"):
        write_shards(recs, tmp_path / "s", "k", progress=False)
    assert list((tmp_path / "s").iterdir()) == []


def test_sample_json_equals_json_dumps():
    from data_prep.imageio import CheckResult

    recs = [
        Record("a", '/d/é "q".jpg', "n01", [Box(1, 2.5, 3, 4, "n01")], "train", 10, 20, {"name": "ü"}),
        Record("b", "/d/b.jpg", None, [], "train", None, None, {}, object_count=1),
        Record(
            "c",
            "/d/c.jpg",
            "zz",
            [Box(0.1, 0.2, 0.3, 0.4, "Car")],
            "train",
            None,
            None,
            {"box_coords": "normalized", "crowd": [0]},
        ),
    ]
    res = CheckResult(b"", "ok", "jpeg", 50, 40)
    for r in recs:
        got = shards.sample_json(r, res, {"n01": 3})
        boxes, attrs = shards._scaled_boxes(r, res)
        meta = {
            "path": r.path,
            "class": r.cls,
            "class_index": 3 if r.cls == "n01" else -1,
            "boxes": boxes,
            "attributes": attrs,
            "width": 50,
            "height": 40,
            "n_objects": r.n_objects,
        }
        assert got == json.dumps(meta, separators=(",", ":")).encode()


def test_shard_count_and_cli(tmp_path):
    assert shard_count(10, 3, 1) == 4 and shard_count(10, 100, 4) == 4 and shard_count(0, 5, 2) == 2
    recs = read_records("imagenet", make_imagenet(tmp_path / "in", {"n001": 3})).records
    write_subset_csv(recs, tmp_path / "subset.csv")
    log = tmp_path / "shards.log"
    shards.main(
        [
            "--subset",
            str(tmp_path / "subset.csv"),
            "--out",
            str(tmp_path / "s"),
            "--name",
            "x",
            "--min-shards",
            "2",
            "--log",
            str(log),
        ]
    )
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [s["count"] for s in m["shards"]] == [2, 1]
    assert "3 images in 2 shards" in log.read_text()
    bad = [Record("a.b", recs[0].path, None, [], "train")]
    with pytest.raises(ValueError, match="a.b"):
        write_shards(bad, tmp_path / "t", "x", progress=False)
