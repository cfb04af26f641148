"""Feature cache, checkpoint checks, target readers and the transfer CLI on tiny real-layout fixtures."""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from analysis import features, targets, transfer
from analysis.features import CheckpointArchError, FeatureExtractor, FeatureSpec

PALETTE = [v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)]


def make_checkpoint(path, arch="resnet18", small_input=True, seed=0):
    """Backbone checkpoint in the contract's format, built without study/ so these tests stand alone."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, arch)(weights=None)
    if small_input:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    torch.save(
        {"backbone": net.state_dict(), "arch": arch, "small_input": small_input, "feat_dim": feat_dim}, path
    )
    return path


def _jpg(path, colour, size=(40, 40), seed=0):
    rng = np.random.default_rng(seed)
    arr = np.clip(np.asarray(colour)[None, None] + rng.integers(-20, 20, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _png(path, labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = labels.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(labels, np.uint8).tobytes())
    im.putpalette(PALETTE)
    im.save(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """Small-input stem (no downsampling before layer1): spatial maps at 16 px inputs, but costlier convs."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt")


@pytest.fixture(scope="module")
def ckpt_std(tmp_path_factory):
    """Standard stem (stride 4): cheap pooled features for the classification tests."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt_std") / "checkpoint.pt", small_input=False)


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
    for split, n in (("train", 6), ("val", 3)):
        for c, col in colours.items():
            for i in range(n):
                _jpg(root / split / c / f"{c}_{i}.jpg", col, seed=i + 10 * (split == "val"))
    return root


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    voc = root / "VOC2007"
    ids = {"trainval": [f"00{i:04d}" for i in range(9)], "test": [f"01{i:04d}" for i in range(6)]}
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]
    main = voc / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for split, names in ids.items():
        (main / f"{split}.txt").write_text("".join(n + "\n" for n in names))
        for c, cls in enumerate(targets.VOC_CLASSES):
            lines = []
            for i, n in enumerate(names):
                flag = " 1" if i % 3 == c else "-1"
                if split == "trainval" and c == 0 and i == 1:
                    flag = " 0"  # difficult
                lines.append(f"{n} {flag}\n")
            (main / f"{cls}_{split}.txt").write_text("".join(lines))
        for i, n in enumerate(names):
            _jpg(voc / "JPEGImages" / f"{n}.jpg", colours[i % 3], seed=i)
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    for split, names in (("train", ids["trainval"][:4]), ("val", ids["test"][:3])):
        (seg / f"{split}.txt").write_text("".join(n + "\n" for n in names))
        for i, n in enumerate(names):
            mask = np.zeros((40, 40), np.uint8)
            mask[8:32, 8:24] = 1 if i % 2 == 0 else 15  # aeroplane / person
            mask[8:32, 7] = 255
            _png(voc / "SegmentationClass" / f"{n}.png", mask)
    return root


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    root = tmp_path_factory.mktemp("davis")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("blob\n")
    for t in range(4):
        frame = np.full((32, 48, 3), 40, np.uint8)
        mask = np.zeros((32, 48), np.uint8)
        frame[8:24, 8 + 2 * t : 20 + 2 * t] = (230, 200, 20)
        mask[8:24, 8 + 2 * t : 20 + 2 * t] = 1
        fdir = root / "JPEGImages" / "480p" / "blob"
        fdir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(fdir / f"{t:05d}.jpg")
        _png(root / "Annotations" / "480p" / "blob" / f"{t:05d}.png", mask)
    return root


def _count_forwards(monkeypatch):
    calls = {"n": 0}
    real = features._run_model

    def counting(net, x, spec):
        calls["n"] += 1
        return real(net, x, spec)

    monkeypatch.setattr(features, "_run_model", counting)
    return calls


def test_cache_hit_then_miss_when_checkpoint_bytes_change(tmp_path, imagefolder, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "c.pt", small_input=False, seed=1)
    calls = _count_forwards(monkeypatch)
    split = targets.read_imagefolder("toy", imagefolder, "train")
    spec = FeatureSpec(size=32)
    ext = FeatureExtractor(ckpt, tmp_path / "cache", batch_size=5, progress=False)
    first = ext.get(split, spec)["features"]
    assert first.shape == (12, 512) and calls["n"] == 3
    again = FeatureExtractor(ckpt, tmp_path / "cache", progress=False).get(split, spec)["features"]
    assert calls["n"] == 3  # served from the cache, no forward pass
    torch.testing.assert_close(first, again)
    assert ext.sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert len(list((tmp_path / "cache" / "checkpoints").glob("*.json"))) == 1
    # other transform settings are another cache entry
    ext.get(split, FeatureSpec(size=32, resize_ratio=1.0))
    assert calls["n"] == 6
    make_checkpoint(ckpt, small_input=False, seed=2)  # same path, new bytes
    ext2 = FeatureExtractor(ckpt, tmp_path / "cache", batch_size=12, progress=False)
    changed = ext2.get(split, spec)["features"]
    assert calls["n"] == 7 and ext2.sha256 != ext.sha256
    assert not torch.allclose(first, changed)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_an_edited_cache_tensor_is_caught_by_its_content_hash_and_recomputed(tmp_path, imagefolder, monkeypatch,
                                                                              caplog):  # fmt: skip
    """Overwriting floats inside a valid cache file (fault 17) changed kNN 0.205 -> 0.200 with no warning."""
    ckpt = make_checkpoint(tmp_path / "c.pt", small_input=False, seed=1)
    calls = _count_forwards(monkeypatch)
    split, spec = targets.read_imagefolder("toy", imagefolder, "train"), FeatureSpec(size=32)
    first = FeatureExtractor(ckpt, tmp_path / "cache", batch_size=12, progress=False).get(split, spec)["features"]
    path = FeatureExtractor(ckpt, tmp_path / "cache", progress=False).cache_path(split, spec)
    blob = torch.load(path, weights_only=True)
    assert blob["content_sha256"] == features.tensor_sha256(first)
    blob["features"][0, :64] = 0.0  # a valid file whose tensor bytes changed
    torch.save(blob, path)
    caplog.set_level("WARNING", logger="analysis.features")
    ext = FeatureExtractor(ckpt, tmp_path / "cache", batch_size=12, progress=False)
    again = ext.get(split, spec)["features"]
    assert calls["n"] == 2 and ext.misses == 1  # recomputed, not served
    torch.testing.assert_close(again, first)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "content hash" in warnings[0]
    # a file from before content hashes is recomputed too, then served
    blob = torch.load(path, weights_only=True)
    del blob["content_sha256"]
    torch.save(blob, path)
    ext = FeatureExtractor(ckpt, tmp_path / "cache", batch_size=12, progress=False)
    ext.get(split, spec), ext.get(split, spec)
    assert (ext.misses, ext.hits, calls["n"]) == (1, 1, 3)


def test_an_unreadable_checkpoint_is_refused_in_one_line(tmp_path, imagefolder, capsys):
    """Fault 4: a damaged checkpoint ended the transfer CLI in 47 lines with two tracebacks."""
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 not a zip archive" * 10)
    specs = {n: {"protocol": "knn", "format": "imagefolder", "root": str(imagefolder), "image_size": 32}
             for n in ("a", "b")}  # fmt: skip
    out_dir = tmp_path / "out"
    argv = ["--checkpoint", str(bad), "--targets-json", json.dumps(specs), "--out-dir", str(out_dir),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    assert transfer.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"error: checkpoint {bad} cannot be read"), err
    assert "remake it" in err[0] and not out_dir.exists()


def test_a_bad_target_spec_fails_its_target_in_one_line_and_writes_nothing(tmp_path, ckpt_std, imagefolder, caplog):
    specs = {"no_size": {"protocol": "knn", "format": "imagefolder", "root": str(imagefolder)},
             "typo": {"protocol": "knn", "format": "imagefolder", "root": str(imagefolder), "image_size": 32, "kk": 5}}
    out_dir = tmp_path / "out"
    argv = ["--checkpoint", str(ckpt_std), "--targets-json", json.dumps(specs), "--out-dir", str(out_dir),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    caplog.set_level("INFO", logger="analysis.transfer")
    assert transfer.main(argv) == 1 and not out_dir.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        "target no_size failed: config key targets.no_size.image_size: required for protocol 'knn': the input size "
        "depends on the data (the paper's protocol: 224 on ImageNet-size images (Resize 256 -> CenterCrop 224))",
        "target typo failed: config key targets.typo.kk: unknown key for protocol 'knn'; did you mean 'k'?",
    ]
    assert not any(r.exc_info for r in caplog.records)  # no traceback for a config problem


def test_arch_mismatch_names_both(ckpt, tmp_path):
    with pytest.raises(CheckpointArchError, match="resnet18.*resnet50"):
        FeatureExtractor(ckpt, tmp_path, expect_arch="resnet50", target="cifar")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FeatureExtractor(tmp_path / "none.pt", tmp_path)


def test_spatial_maps_and_output_stride(ckpt, tmp_path, imagefolder):
    split = targets.read_imagefolder("toy", imagefolder, "val")
    ext = FeatureExtractor(ckpt, tmp_path, progress=False)
    native = ext.get(split, FeatureSpec(size=16, pooled=False, crop=False, layer="layer4"))
    assert native["features"].shape == (6, 512, 2, 2) and native["stride"] == 8
    finer = ext.get(split, FeatureSpec(size=16, pooled=False, crop=False, layer="layer4", stride=4))
    assert finer["features"].shape[-2:] == (4, 4) and finer["stride"] == 4
    l3 = ext.get(split, FeatureSpec(size=16, pooled=False, crop=False, layer="layer3", stride=8))
    assert l3["features"].shape[1:] == (256, 4, 4) and l3["stride"] == 4
    # the pooled feature is the spatial average of the layer4 map of the same (centre-cropped) input
    pooled = ext.get(split, FeatureSpec(size=16))["features"]
    maps = ext.get(split, FeatureSpec(size=16, pooled=False, crop=True))["features"]
    torch.testing.assert_close(maps.mean((2, 3)), pooled, atol=1e-4, rtol=1e-4)


def test_target_errors(tmp_path, imagefolder):
    with pytest.raises(targets.TargetNotFoundError, match=r"'pets'.*nowhere"):
        targets.load_split("pets", {"format": "imagefolder", "root": str(tmp_path / "nowhere")}, "train")
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    with pytest.raises(targets.EmptySplitError, match="holds no image"):
        targets.read_imagefolder("e", empty, "val")
    with pytest.raises(targets.TargetError, match="unknown target format"):
        targets.load_split("x", {"format": "tiff", "root": "/"}, "train")
    with pytest.raises(targets.TargetNotFoundError, match="CIFAR10"):
        targets.load_split("c10", {"format": "cifar10", "root": str(tmp_path)}, "train")
    with pytest.raises(targets.TargetError, match="no 'train' split"):
        targets.load_split("d", {"format": "davis", "root": str(tmp_path)}, "train")


def test_voc_readers(voc):
    tv = targets.read_voc07("voc07", voc, "trainval")
    assert tv.multilabel and tv.labels.shape == (9, 20)
    assert tv.raw_labels[1, 0] == 0 and tv.labels[1, 0] == 0  # difficult counts as negative
    assert tv.labels[:, 0].tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0]
    seg = targets.read_voc_seg("vocseg", voc, "val")
    assert len(seg) == 3 and seg.classes[0] == "background" and len(seg.classes) == 21
    m = seg.load_mask(1)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 15, 255}
    (voc / "VOC2007" / "ImageSets" / "Segmentation" / "empty.txt").write_text("")
    with pytest.raises(targets.EmptySplitError, match="empty.txt"):
        targets.read_voc_seg("vocseg", voc, "empty")


def test_davis_reader(davis):
    split = targets.read_davis("davis", davis, "val")
    assert [v.name for v in split.videos] == ["blob"] and len(split.videos[0].frames) == 4
    assert all(a is not None for a in split.videos[0].annotations)


def _cli(tmp_path, ckpt, name, cfg):
    out = tmp_path / "transfer" / "D" / "V" / f"{name}.json"
    argv = ["--checkpoint", str(ckpt), "--name", name, "--target-json", json.dumps(cfg),
            "--cache-dir", str(tmp_path / "features"), "--out", str(out), "--log", str(tmp_path / "log.txt"),
            "--no-progress"]  # fmt: skip
    assert transfer.main(argv) == 0
    res = json.loads(out.read_text())
    assert not list(out.parent.glob("*.tmp"))
    assert {"target", "protocol", "metric", "value", "settings", "defaulted", "seconds", "checkpoint_sha256", "n_train",
            "n_test"} <= set(res)  # fmt: skip
    assert res["target"] == name and 0.0 <= res["value"] <= 1.0
    return res, out


def test_cli_classification_protocols(tmp_path, ckpt, ckpt_std, imagefolder, voc):
    base = {"format": "imagefolder", "root": str(imagefolder), "image_size": 32, "arch": "resnet18"}
    lin, _ = _cli(
        tmp_path, ckpt_std, "toy_linear", {**base, "protocol": "linear", "wd_grid": [1e-3], "max_iter": 30}
    )
    assert lin["metric"] == "top1" and lin["n_train"] == 12 and lin["n_test"] == 6
    assert lin["checkpoint_sha256"] == hashlib.sha256(ckpt_std.read_bytes()).hexdigest()
    knn, _ = _cli(tmp_path, ckpt_std, "toy_knn", {**base, "protocol": "knn", "k": 5})
    assert knn["metric"] == "top1" and knn["settings"]["k"] == 5
    assert knn["feature_cache"] == {"hits": 2, "misses": 0}  # the linear probe's features are reused
    svm, _ = _cli(
        tmp_path,
        ckpt_std,
        "voc07",
        {"format": "voc07", "root": str(voc), "protocol": "voc07_svm", "image_size": 32},
    )
    assert svm["metric"] == "mAP" and svm["n_train"] == 9 and svm["settings"]["C"] == 0.5
    cam_cfg = {**base, "image_size": 16, "protocol": "cam", "images": [0, "blue_1.jpg"], "max_iter": 20}
    cam, out = _cli(tmp_path, ckpt, "toy_cam", cam_cfg)
    maps = np.load(out.with_suffix(".cam.npz"))
    # CAMs at the input size whose layer4 map is >= 7 x 7 (cam_size: auto), as the paper's 224 px figures
    assert maps["cams"].shape == (2, 7, 7) and maps["images"].shape == (2, 56, 56, 3)
    assert maps["ids"][1].endswith("blue_1.jpg")


def test_cli_dense_protocols(tmp_path, ckpt, voc, davis):
    seg, _ = _cli(tmp_path, ckpt, "vocseg", {
        "format": "voc_seg", "root": str(voc), "protocol": "segment_retrieval", "image_size": 16, "stride": 4,
        "n_segments": 4,
    })  # fmt: skip
    assert (
        seg["metric"] == "mIoU_21"
        and "mIoU_7" in seg["metrics"]
        and seg["settings"]["feature_grid"] == [4, 4]
    )
    vid, _ = _cli(tmp_path, ckpt, "davis", {
        "format": "davis", "root": str(davis), "protocol": "video_propagation", "short_side": 16, "radius": 3,
    })  # fmt: skip
    assert vid["metric"] == "JF_mean" and vid["metrics"]["n_objects"] == 1 and vid["n_test"] == 4
    with pytest.raises(targets.TargetError, match="protocol 'nope' is unknown"):
        transfer.run_target(ckpt, "x", {"protocol": "nope", "format": "davis", "root": str(davis)}, tmp_path)


def test_recalibrate_bn_sets_the_exact_batch_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    batches = [torch.randn(5, 3, 8, 8) * 2 + 1 for _ in range(3)]
    assert features.recalibrate_bn(net, batches) == 15 and not net.training
    with torch.no_grad():  # independent: the first BN's input over all images at once
        h = net[0](torch.cat(batches))
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, h.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    # BN's running_var is the unbiased per-batch variance averaged over batches
    per_batch = torch.stack([net[0](b).detach().var(dim=(0, 2, 3), unbiased=True) for b in batches])
    torch.testing.assert_close(bn.running_var, per_batch.mean(0), rtol=1e-4, atol=1e-5)
    assert net[0].weight.grad is None


def test_cli_bn_recalibration_is_a_separate_cached_protocol(tmp_path, ckpt_std, imagefolder):
    base = {"format": "imagefolder", "root": str(imagefolder), "image_size": 32, "protocol": "knn", "k": 5}
    plain, _ = _cli(tmp_path, ckpt_std, "toy_knn", base)
    recal, _ = _cli(tmp_path, ckpt_std, "toy_knn_bn", {**base, "bn_recalibrate": True})
    assert recal["settings"]["bn_recalibrate"] is True and plain["settings"]["bn_recalibrate"] is False
    assert recal["feature_cache"] == {"hits": 0, "misses": 2}  # not served the eval-statistics features
    cached = sorted(p.name for p in (tmp_path / "features").rglob("*.pt"))
    assert len(cached) == 4


def test_cli_batch_evaluates_every_target_of_a_checkpoint_and_names_the_failed_one(tmp_path, ckpt_std, imagefolder):
    base = {"format": "imagefolder", "root": str(imagefolder), "image_size": 32, "arch": "resnet18"}
    specs = {
        "toy_knn": {**base, "protocol": "knn", "k": 5},
        "broken": {**base, "protocol": "knn", "root": str(tmp_path / "missing")},
        "toy_linear": {**base, "protocol": "linear", "wd_grid": [1e-3], "max_iter": 30},
    }
    out_dir = tmp_path / "transfer" / "D" / "V"
    manifest = out_dir / "frozen-targets.json"
    argv = ["--checkpoint", str(ckpt_std), "--targets-json", json.dumps(specs), "--cache-dir",
            str(tmp_path / "features"), "--out-dir", str(out_dir), "--manifest", str(manifest), "--no-progress"]  # fmt: skip
    assert transfer.main(argv) == 1  # one failed target fails the job ...
    assert sorted(p.name for p in out_dir.iterdir()) == ["toy_knn.json", "toy_linear.json"]  # ... not the others
    lin = json.loads((out_dir / "toy_linear.json").read_text())
    assert lin["target"] == "toy_linear" and lin["feature_cache"] == {"hits": 2, "misses": 0}  # one process
    del specs["broken"]
    assert transfer.main(argv[:3] + [json.dumps(specs)] + argv[4:]) == 0
    listed = json.loads(manifest.read_text())["targets"]  # written once every target is done
    assert sorted(listed) == ["toy_knn", "toy_linear"]
    assert listed["toy_linear"] == {"result": str(out_dir / "toy_linear.json"), "metric": "top1",
                                    "value": json.loads((out_dir / "toy_linear.json").read_text())["value"]}
    with pytest.raises(SystemExit):  # --targets-json without --out-dir
        transfer.main(["--checkpoint", str(ckpt_std), "--targets-json", json.dumps(specs)])


def _hash_repeatedly(ckpt: str, cache: str, times: int) -> set[str]:
    sidecars = os.path.join(cache, "checkpoints")
    seen = set()
    for _ in range(times):
        for name in os.listdir(sidecars) if os.path.isdir(sidecars) else []:
            if name.endswith(".json"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(sidecars, name))  # force a fresh write every time
        seen.add(features.file_sha256(ckpt, cache))
    return seen


def test_jobs_hashing_one_checkpoint_at_once_share_the_cache_without_failing(tmp_path):
    """A checkpoint's transfer, SGD-linear and fine-tuning jobs start together on a GPU cluster, and each
    writes the checkpoint's hash into the shared cache. With one fixed temp name the second rename found no
    temp file and failed its job (seen on the local SLURM); each writer now has its own temp file."""
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(np.random.default_rng(0).bytes(1 << 16))
    cache = tmp_path / "cache"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        got = pool.starmap(_hash_repeatedly, [(str(ckpt), str(cache), 150)] * 3)
    assert set().union(*got) == {hashlib.sha256(ckpt.read_bytes()).hexdigest()}
    assert [p.name for p in (cache / "checkpoints").iterdir() if p.name.endswith(".tmp")] == []
