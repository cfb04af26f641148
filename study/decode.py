"""``data.decode: device``: JPEG decode, crop, resize and flip of whole batches on the training device.

Why: with ``data.render: batched`` the colour stage already runs on the device, and what is left in the loader
workers is mostly JPEG decoding; at paper scale (about 4,000 img/s per H100/H200) a CPU may still not keep up.
DALI and FFCV answer that with nvJPEG; here ``torchvision.io.decode_jpeg(list, device=...)`` decodes a batch in
one call (nvJPEG's batched decoder on CUDA, libjpeg-turbo on the CPU, the same API, which is what the CPU tests
exercise). The workers then only parse the JPEG header for the size, sample the crop geometry with the same
draws as ``data.decode: cpu`` (so the crops and flips are identical given the seed) and pass the encoded bytes,
the boxes and the flips (``study.data``).

Numerics: the CPU path decodes with PIL's DCT-domain downscaling (``draft``) and resizes with PIL's antialiased
bilinear filter, reading real pixels just outside the box; here the full-resolution image is cropped exactly at
the box and resized with ``interpolate(bilinear, antialias=True)`` (the same triangle filter, clamped at the
box edge). Views differ by a few levels on average, mostly on high-frequency content (``tests/test_decode.py``
bounds it); the distribution of crops and the colour stage are unchanged.

Non-JPEG members (``.png``) are decoded on the CPU with ``decode_image`` and moved to the device. A JPEG that
does not decode stops the run with ``CorruptImageError`` naming the sample and its shard: the workers already
skip (and count) what they can see without decoding (unreadable headers, truncated files), as ``data.decode:
cpu`` does, but a batch cannot lose a sample on the device without changing the batch size.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from study.data import ShardDataError, _rebuild

ENCODED_KEYS = ("encoded", "offsets", "jpeg", "boxes", "flips", "size", "url")  # what the workers send instead


class CorruptImageError(ShardDataError):
    """A sample's image passed the workers' header checks but does not decode; names the sample and its shard."""


@contextmanager
def _quiet() -> Iterator[None]:
    """torchvision 0.29 warns on every decode call that its decoders move to TorchCodec; say it once, not per batch."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision.*")
        yield


def encoded_samples(batch: dict) -> list[torch.Tensor]:
    """The batch's encoded images: 1-D uint8 slices of the packed ``encoded`` buffer (one shared tensor
    crosses the worker boundary instead of B small ones)."""
    data, off = batch["encoded"], batch["offsets"].tolist()
    return [data[off[i]:off[i + 1]] for i in range(len(off) - 1)]


def _corrupt(batch: dict, i: int, err: Exception) -> CorruptImageError:
    key, url = batch["key"][i], batch["url"][i]
    why = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return CorruptImageError(
        f"sample {key!r} in shard {url} does not decode on the device ({why}); data.decode=cpu would skip it "
        f"and count it, data.decode=device cannot drop a sample from a batch: {_rebuild(url)}, "
        "or train with data.decode=cpu"
    )


def decode_images(batch: dict, device: torch.device | str) -> list[torch.Tensor]:
    """Every sample's full image as uint8 (3, H, W) RGB on ``device``: the JPEGs in one batched
    ``decode_jpeg`` call (grayscale and CMYK converted to RGB), other formats with ``decode_image`` on the CPU."""
    device = torch.device(device)
    enc = encoded_samples(batch)
    is_jpeg = batch["jpeg"].tolist()
    out: list[torch.Tensor | None] = [None] * len(enc)
    jpegs = [i for i, j in enumerate(is_jpeg) if j]
    with _quiet():
        if jpegs:
            try:
                imgs = decode_jpeg([enc[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:  # one bad member fails the whole call: find it (rare, so one by one is fine)
                for i in jpegs:
                    try:
                        decode_jpeg(enc[i], mode=ImageReadMode.RGB, device=device)
                    except RuntimeError as err:
                        raise _corrupt(batch, i, err) from None
                raise
            for i, img in zip(jpegs, imgs, strict=True):
                out[i] = img
        for i, j in enumerate(is_jpeg):
            if not j:
                try:
                    out[i] = decode_image(enc[i], mode=ImageReadMode.RGB).to(device, non_blocking=True)
                except RuntimeError as err:
                    raise _corrupt(batch, i, err) from None
    return out  # type: ignore[return-value]


def crop_resize(img: torch.Tensor, box: Sequence[float], size: int, flip: bool) -> torch.Tensor:
    """float (3, size, size) in [0, 255]: the source box ``[top, left, h, w]`` of a uint8 (3, H, W) image,
    resized with antialiased bilinear (PIL's filter for downscaling), mirrored if ``flip``."""
    top, left, h, w = (int(round(float(b))) for b in box)
    crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()
    view = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return view.flip(-1) if flip else view


def decode_crops(batch: dict, sizes: Sequence[int], device: torch.device | str) -> list[torch.Tensor]:
    """The views of a ``data.decode: device`` batch: per view a uint8 (B, 3, S_v, S_v) on ``device``, the same
    crops and flips ``data.decode: cpu`` renders in the workers (pixels within resampling differences)."""
    device = torch.device(device)
    boxes, flips, size = batch["boxes"], batch["flips"], batch["size"]
    B, V = int(boxes.shape[0]), len(sizes)
    if tuple(boxes.shape) != (B, V, 4) or tuple(flips.shape) != (B, V):
        raise ValueError(f"batch has boxes {tuple(boxes.shape)} and flips {tuple(flips.shape)} for {V} view "
                         f"sizes {list(sizes)}; expected ({B}, {V}, 4) and ({B}, {V})")
    imgs = decode_images(batch, device)
    box_l, flip_l, size_l = boxes.tolist(), flips.tolist(), size.tolist()
    views = [torch.empty(B, 3, s, s, device=device) for s in sizes]
    for i, img in enumerate(imgs):
        if list(img.shape[1:]) != size_l[i]:  # the boxes were sampled on the header's size
            raise _corrupt(batch, i, ValueError(f"decoded {tuple(img.shape[1:])}, header says {tuple(size_l[i])}"))
        for v, s in enumerate(sizes):
            views[v][i] = crop_resize(img, box_l[i][v], int(s), bool(flip_l[i][v]))
    return [x.round_().clamp_(0, 255).to(torch.uint8) for x in views]
