"""data.decode: device (study/decode.py) against the workers' CPU decode, on tiny shards; CUDA when present."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import study.data as sdata
from study.colour import BatchColour, device_views
from study.data import make_loader
from study.decode import CorruptImageError, decode_crops

CROP = {"size": 48, "n_small": 2, "small_size": 24, "constraint": "inside", "max_iou": 1.0}
SIZES = [48, 48, 24, 24]
BS = 4


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Photo-like: low-frequency structure plus mild noise."""
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([128 + 100 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], -1)
    return np.clip(a + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def _encode(arr: np.ndarray, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _bad_huffman(data: bytes) -> bytes:
    """A JPEG whose header parses (size, EOI present) but whose Huffman table is bogus: only decoding finds it."""
    d = bytearray(data)
    i = d.find(b"\xff\xc4")
    d[i + 5:i + 21] = b"\xff" * 16
    return bytes(d)


def _write(url: str, members: list[tuple[str, str, bytes]]) -> str:
    with wds.TarWriter(url) as sink:
        for key, ext, data in members:
            sink.write({"__key__": key, ext: data, "json": json.dumps({"class_index": 1}).encode()})
    return url


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """``smooth``: photo-like JPEGs with a grayscale JPEG, a CMYK JPEG and a PNG among them; ``noise``: uniform
    noise JPEGs (worst case for resampler differences); ``bad``: one truncated and one undecodable JPEG."""
    root = tmp_path_factory.mktemp("decode")
    rng = np.random.default_rng(0)

    def hw() -> tuple[int, int]:
        return tuple(int(v) for v in rng.integers(120, 260, 2))  # type: ignore[return-value]

    smooth = []
    for i in range(12):
        arr = _smooth(rng, *hw())
        ext, data = "jpg", _encode(arr)
        if i == 3:
            data = _encode(arr, mode="L")
        elif i == 5:
            data = _encode(arr, mode="CMYK")
        elif i == 7:
            ext, data = "png", _encode(arr, "PNG")
        smooth.append((f"sm{i:02d}", ext, data))
    noise = [(f"no{i:02d}", "jpg", _encode(rng.integers(0, 256, (*hw(), 3), dtype=np.uint8))) for i in range(8)]
    good = [(f"ok{i:02d}", "jpg", _encode(_smooth(rng, *hw()))) for i in range(8)]
    truncated = good[:3] + [("trunc", "jpg", good[3][2][: len(good[3][2]) // 2])] + good[3:]
    broken = good[:3] + [("broken", "jpg", _bad_huffman(good[3][2]))] + good[3:]
    return {name: _write(str(root / f"{name}.tar"), m)
            for name, m in [("smooth", smooth), ("noise", noise), ("truncated", truncated), ("broken", broken)]}


def _loader(url: str, decode: str, seed: int = 3, epoch_len: int = 3, **kw):
    return make_loader([url], CROP, {}, BS, kw.pop("num_workers", 0), seed, epoch_len, shuffle_buffer=4,
                       render="batched", decode=decode, **kw)


def _recorded(url: str, decode: str, monkeypatch) -> tuple[list[dict], list[tuple[np.ndarray, np.ndarray]]]:
    """Batches plus every (boxes, flips) ``sample_views`` returned, in order."""
    seen = []
    real = sdata.sample_views

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append((out[0].copy(), out[1].copy()))
        return out

    monkeypatch.setattr(sdata, "sample_views", spy)
    batches = list(_loader(url, decode))
    monkeypatch.setattr(sdata, "sample_views", real)
    return batches, seen


@pytest.mark.parametrize("name, bound", [("smooth", 1.5), ("noise", 6.0)])
def test_device_decode_matches_cpu_decode(shards, monkeypatch, name, bound):
    """Same samples, boxes and flips exactly; pixels within resampling differences. The CPU path decodes with
    PIL's DCT-domain downscaling (``draft``) and resizes reading a pixel beyond the box; the device path resizes
    the full-resolution crop (clamped at its edge). On photo-like content that is under a level or so on
    average (measured ~0.5); on uniform noise, whose energy sits at the frequencies where the two low-pass
    filters differ most, a few levels (measured 3-5): 6 bounds that worst case, while a wrong box, flip or
    channel order gives tens of levels."""
    cpu, geo_cpu = _recorded(shards[name], "cpu", monkeypatch)
    dev, geo_dev = _recorded(shards[name], "device", monkeypatch)
    assert len(geo_cpu) == len(geo_dev) and len(cpu) == len(dev) == 3
    for (bc, fc), (bd, fd) in zip(geo_cpu, geo_dev, strict=True):
        assert np.array_equal(bc, bd) and np.array_equal(fc, fd)
    if name == "smooth":  # the PNG member goes through decode_image on the CPU; gray and CMYK JPEGs become RGB
        assert sum(int((~d["jpeg"]).sum()) for d in dev) == 1
    n = 0
    for c, d in zip(cpu, dev, strict=True):
        assert c["key"] == d["key"] and "views" not in d
        for k in ("label", "fallbacks", "iou", "index"):
            assert torch.equal(c[k], d[k])
        assert [a.tolist() for a in d["autoaug"]] == [[False] * BS] * len(SIZES)
        # the batch's geometry is what the sampler drew for these samples, exactly
        assert d["boxes"].dtype == torch.float32 and tuple(d["boxes"].shape) == (BS, len(SIZES), 4)
        for i in range(BS):
            assert np.array_equal(d["boxes"][i].numpy(), geo_dev[n][0].astype(np.float32))
            assert np.array_equal(d["flips"][i].numpy(), geo_dev[n][1])
            n += 1
        views = decode_crops(d, SIZES, "cpu")
        assert [(v.dtype, tuple(v.shape)) for v in views] == [(torch.uint8, (BS, 3, s, s)) for s in SIZES]
        for a, b in zip(c["views"], views, strict=True):
            assert (a.float() - b.float()).abs().mean() < bound


def test_flip_flags_drive_the_pixels(shards):
    """Inverted flip flags give exactly the mirrored views: the device path mirrors by the batch's flags."""
    d = next(iter(_loader(shards["smooth"], "device")))
    base = decode_crops(d, SIZES, "cpu")
    flipped = dict(d, flips=~d["flips"])
    assert all(torch.equal(a.flip(-1), b) for a, b in zip(base, decode_crops(flipped, SIZES, "cpu"), strict=True))


def test_device_views_decodes_then_colours(shards):
    """study.colour.device_views runs the decode stage for such batches: normalised float views, and the same
    colour draws as a CPU-decoded batch (so the difference stays a resampling one)."""
    colour = BatchColour({}, SIZES)
    c = next(iter(_loader(shards["smooth"], "cpu")))
    d = next(iter(_loader(shards["smooth"], "device")))
    vc = device_views(c, torch.device("cpu"), torch.contiguous_format, colour, 0, 5, 0)
    vd = device_views(d, torch.device("cpu"), torch.contiguous_format, colour, 0, 5, 0)
    for a, b in zip(vc, vd, strict=True):
        assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
        assert (a - b).abs().mean() < 0.1  # ~1.5 levels / 255 / std(0.22) plus blur; wrong pixels give ~1
    with pytest.raises(ValueError, match=r"data.decode=device batch needs the colour stage"):
        device_views(d, torch.device("cpu"), torch.contiguous_format, None, 0, 5, 0)


@pytest.mark.filterwarnings("ignore:1 shards < 1 ranks x 2 workers")
def test_workers_send_packed_bytes(shards):
    """Through DataLoader workers (one packed buffer per batch), deterministic given the seed."""
    def run():
        return list(_loader(shards["noise"], "device", num_workers=2, epoch_len=2))

    a, b = run(), run()
    for x, y in zip(a, b, strict=True):
        assert x["key"] == y["key"] and torch.equal(x["encoded"], y["encoded"]) and torch.equal(x["boxes"], y["boxes"])
        assert x["offsets"][-1] == x["encoded"].numel() and x["jpeg"].all()
        assert all(torch.equal(u, v) for u, v in zip(decode_crops(x, SIZES, "cpu"), decode_crops(y, SIZES, "cpu"),
                                                      strict=True))


def test_truncated_jpeg_is_a_counted_skip_as_on_the_cpu(shards):
    """The workers see a truncated file without decoding it (no end-of-image marker) and skip it like the CPU
    path does, with the same geometry draws consumed, so both modes give the same batches."""
    out = {}
    for decode in ("cpu", "device"):
        loader = _loader(shards["truncated"], decode, epoch_len=2)
        with pytest.warns(UserWarning, match=r"skipping sample 'trunc'"):
            out[decode] = list(loader)
        assert loader.dataset.skipped >= 1
    assert [b["key"] for b in out["cpu"]] == [b["key"] for b in out["device"]]
    assert all("trunc" not in b["key"] for b in out["device"])


def test_undecodable_jpeg_is_a_clear_error_naming_sample_and_shard(shards):
    """A JPEG whose header is fine but whose data is not: the CPU path skips it (PIL fails in the worker); on
    the device the batch cannot lose a sample, so the run stops naming the sample, its shard and the way out."""
    loader = _loader(shards["broken"], "cpu", epoch_len=2)
    with pytest.warns(UserWarning, match=r"skipping sample 'broken'"):
        list(loader)
    batches = list(_loader(shards["broken"], "device", epoch_len=2))
    bad = next(b for b in batches if "broken" in b["key"])
    with pytest.raises(CorruptImageError, match=r"sample 'broken' in shard .*broken\.tar .*data\.decode=cpu"):
        decode_crops(bad, SIZES, "cpu")


def test_bad_combinations_are_clear_errors(shards):
    from study.runconfig import ConfigError, compose_config, validate_config

    url = shards["smooth"]
    with pytest.raises(ValueError, match=r"data.decode=device needs data.render=batched .*got data.render=pil"):
        make_loader([url], CROP, {}, 2, 0, 0, None, render="pil", decode="device")
    with pytest.raises(ValueError, match=r"data.decode=device cannot run with aug.aplus=true"):
        make_loader([url], CROP, {"aplus": True}, 2, 0, 0, None, render="batched", decode="device")
    with pytest.raises(ValueError, match=r"data.decode must be one of cpu, device, got 'gpu'"):
        make_loader([url], CROP, {}, 2, 0, 0, None, render="batched", decode="gpu")
    base = ["out_dir=x", "data.shards=x"]
    assert compose_config(base).data.decode == "cpu"  # the default
    validate_config(compose_config(base + ["data.decode=device"]), world=1)
    for extra, msg in [(["data.decode=gpu"], r"data.decode='gpu': must be one of 'cpu', 'device'"),
                       (["data.decode=device", "data.render=pil"], r"data.decode=device needs data.render=batched"),
                       (["data.decode=device", "aug.aplus=true"], r"cannot run with aug.aplus=true")]:
        with pytest.raises(ConfigError, match=msg):
            validate_config(compose_config(base + extra), world=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG batched decode)")
def test_cuda_decode_matches_cpu_decode(shards):
    """nvJPEG and libjpeg-turbo differ in IDCT and chroma upsampling by about a level; crops, flips and the
    resize are the same ops."""
    for name in ("smooth", "noise"):
        for d in _loader(shards[name], "device"):
            cpu = decode_crops(d, SIZES, "cpu")
            gpu = decode_crops(d, SIZES, "cuda")
            for a, b in zip(cpu, gpu, strict=True):
                assert b.device.type == "cuda" and b.dtype == torch.uint8
                assert (a.float() - b.cpu().float()).abs().mean() < 2.0
    bad = next(b for b in _loader(shards["broken"], "device", epoch_len=2) if "broken" in b["key"])
    with pytest.raises(CorruptImageError, match=r"sample 'broken'"):
        decode_crops(bad, SIZES, "cuda")
