"""Crop geometry, kept apart from pixels so that it can be sampled, tested and plotted in bulk.

Boxes are integer numpy arrays ``[top, left, height, width]`` (torchvision's ``(i, j, h, w)``) in source-image
pixels, batched as ``(n, 4)``. Everything here is pure numpy driven by an explicit ``np.random.Generator``;
the sampler follows ``torchvision.transforms.RandomResizedCrop.get_params`` rule for rule (10 tries, then the
centre-crop fallback), vectorised over boxes so that Figure 1's 10^6 pairs take well under a second.

Config: functions taking ``crop_cfg`` read the ``crop:`` keys of the study config (``scale``, ``ratio``,
``max_iou``, ``max_tries``, ``flip``, ``n_small``, ``small_scale``, ``constraint``, ``min_overlap``,
``constraint_tries``) from an OmegaConf DictConfig or a plain dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

RRC_TRIES = 10  # torchvision's RandomResizedCrop.get_params tries before its centre-crop fallback
CONSTRAINTS = ("none", "inside", "overlap")
FLIP_MODES = ("after", "before")

_DEFAULTS: dict[str, Any] = {
    "size": 224,
    "scale": (0.2, 1.0),
    "ratio": (3.0 / 4.0, 4.0 / 3.0),
    "max_iou": 1.0,
    "max_tries": 100,
    "flip": "after",
    "n_small": 0,
    "small_size": 96,
    "small_scale": (0.05, 0.14),
    "constraint": "none",
    "min_overlap": 0.1,
    "constraint_tries": 10,
}


class CropConfigError(ValueError):
    """A ``crop:`` config value is out of range or of the wrong kind."""


@dataclass(frozen=True)
class CropSpec:
    """Validated ``crop:`` settings; built once per loader so per-sample code does no config look-ups."""

    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    max_iou: float
    max_tries: int
    flip: str
    n_small: int
    small_size: int
    small_scale: tuple[float, float]
    constraint: str
    min_overlap: float
    constraint_tries: int

    @property
    def n_views(self) -> int:
        return 2 + self.n_small

    @property
    def sizes(self) -> list[int]:
        """Output side length per view: key and query at ``size``, small crops at ``small_size``."""
        return [self.size, self.size] + [self.small_size] * self.n_small


def _get(cfg: Any, key: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, _DEFAULTS[key])
    return getattr(cfg, key, _DEFAULTS[key])


def _pair(value: Any, key: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise CropConfigError(f"crop.{key} must be a pair [low, high], got {value!r}") from err
    if not 0 < lo <= hi:
        raise CropConfigError(f"crop.{key} must satisfy 0 < low <= high, got {value!r}")
    return lo, hi


def crop_spec(crop_cfg: Any) -> CropSpec:
    """Read and validate the ``crop:`` keys (DictConfig, dict or an existing CropSpec; missing keys default)."""
    if isinstance(crop_cfg, CropSpec):
        return crop_cfg
    if crop_cfg is None:
        crop_cfg = {}
    spec = CropSpec(
        size=int(_get(crop_cfg, "size")),
        scale=_pair(_get(crop_cfg, "scale"), "scale"),
        ratio=_pair(_get(crop_cfg, "ratio"), "ratio"),
        max_iou=float(_get(crop_cfg, "max_iou")),
        max_tries=int(_get(crop_cfg, "max_tries")),
        flip=str(_get(crop_cfg, "flip")),
        n_small=int(_get(crop_cfg, "n_small")),
        small_size=int(_get(crop_cfg, "small_size")),
        small_scale=_pair(_get(crop_cfg, "small_scale"), "small_scale"),
        constraint=str(_get(crop_cfg, "constraint")),
        min_overlap=float(_get(crop_cfg, "min_overlap")),
        constraint_tries=int(_get(crop_cfg, "constraint_tries")),
    )
    if spec.flip not in FLIP_MODES:
        raise CropConfigError(f"crop.flip must be one of {FLIP_MODES}, got {spec.flip!r}")
    if spec.constraint not in CONSTRAINTS:
        raise CropConfigError(f"crop.constraint must be one of {CONSTRAINTS}, got {spec.constraint!r}")
    if spec.max_tries < 1 or spec.constraint_tries < 1:
        raise CropConfigError("crop.max_tries and crop.constraint_tries must be >= 1")
    if spec.n_small < 0 or spec.size < 1 or spec.small_size < 1:
        raise CropConfigError("crop.n_small must be >= 0 and crop.size / crop.small_size >= 1")
    if spec.max_iou <= 0:
        raise CropConfigError(f"crop.max_iou must be > 0 (>= 1 disables the ceiling), got {spec.max_iou}")
    if not 0 <= spec.min_overlap <= 1:
        raise CropConfigError(f"crop.min_overlap is a fraction of the small crop's area, got {spec.min_overlap}")
    return spec


def sample_rrc_boxes(
    H: int | np.ndarray,
    W: int | np.ndarray,
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Sample ``n`` RandomResizedCrop boxes ``(n, 4)`` with torchvision's rule, vectorised over boxes.

    ``H``/``W`` may be scalars or length-``n`` arrays (one image size per box). Rounding is numpy's
    half-to-even, the same as Python's ``round`` that torchvision uses.
    """
    H = np.broadcast_to(np.asarray(H, dtype=np.int64), (n,))
    W = np.broadcast_to(np.asarray(W, dtype=np.int64), (n,))
    if n and (H.min() < 1 or W.min() < 1):
        raise ValueError(f"image sizes must be positive, got H>={H.min()}, W>={W.min()}")
    area = (H * W).astype(np.float64)[:, None]
    target = area * rng.uniform(scale[0], scale[1], size=(n, RRC_TRIES))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(rng.uniform(log_lo, log_hi, size=(n, RRC_TRIES)))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= W[:, None]) & (h > 0) & (h <= H[:, None])
    first = ok.argmax(axis=1)
    rows = np.arange(n)
    bw, bh = w[rows, first], h[rows, first]
    found = ok[rows, first]
    # torchvision's fallback: a centre crop of the whole image with the aspect clamped into ``ratio``
    in_ratio = W / H
    fw = np.where(in_ratio < ratio[0], W, np.where(in_ratio > ratio[1], np.round(H * ratio[1]), W))
    fh = np.where(in_ratio < ratio[0], np.round(W / ratio[0]), H)
    fw, fh = fw.astype(np.int64), fh.astype(np.int64)
    bw, bh = np.where(found, bw, fw), np.where(found, bh, fh)
    # randint(0, H - h + 1) for found boxes; centred for the fallback
    top = np.where(found, np.floor(rng.random(n) * (H - bh + 1)), (H - bh) // 2).astype(np.int64)
    left = np.where(found, np.floor(rng.random(n) * (W - bw + 1)), (W - bw) // 2).astype(np.int64)
    return np.stack([top, left, bh, bw], axis=1)


def box_area(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes)
    return boxes[..., 2].astype(np.int64) * boxes[..., 3]


def box_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise intersection area (in pixels) of two broadcastable box arrays ``(..., 4)``."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    ih = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    iw = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    return np.clip(ih, 0, None) * np.clip(iw, 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise IoU = inter / (area_a + area_b - inter) of ``(n, 4)`` x ``(n, 4)`` boxes (any broadcast)."""
    inter = box_intersection(a, b)
    union = box_area(a) + box_area(b) - inter
    return inter / np.maximum(union, 1)


def box_contains(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """True where ``inner`` lies entirely within ``outer`` (elementwise)."""
    o, i = np.asarray(outer), np.asarray(inner)
    return (
        (i[..., 0] >= o[..., 0])
        & (i[..., 1] >= o[..., 1])
        & (i[..., 0] + i[..., 2] <= o[..., 0] + o[..., 2])
        & (i[..., 1] + i[..., 3] <= o[..., 1] + o[..., 3])
    )


def flip_boxes(boxes: np.ndarray, flips: np.ndarray, W: int | np.ndarray) -> np.ndarray:
    """Mirror the flagged boxes horizontally in an image of width ``W``: ``j' = W - j - w``."""
    out = np.array(boxes, dtype=np.int64, copy=True)
    flips = np.asarray(flips, dtype=bool)
    mirrored = np.asarray(W) - out[..., 1] - out[..., 3]
    out[..., 1] = np.where(flips, mirrored, out[..., 1])
    return out


def source_boxes(boxes: np.ndarray, flips: np.ndarray, W: int | np.ndarray, mode: str) -> np.ndarray:
    """Where in the *source image* each view's pixels come from, given the flip mode.

    ``after``: the crop's pixels are flipped, the region is the sampled box. ``before``: the image is flipped and
    the box is sampled in the flipped frame, so the source region is the mirrored box. Either way the view's
    pixels are then mirrored when ``flips`` is set; only the source region (and hence the true overlap between
    views, which the IoU ceiling was enforced on in the sampling frame) differs.
    """
    if mode == "after":
        return np.array(boxes, dtype=np.int64, copy=True)
    if mode == "before":
        return flip_boxes(boxes, flips, W)
    raise CropConfigError(f"crop.flip must be one of {FLIP_MODES}, got {mode!r}")


def sample_pairs(
    H: int | np.ndarray,
    W: int | np.ndarray,
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    max_iou: float = 1.0,
    max_tries: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """Batched two-view sampling for the figures: ``(pairs (n, 2, 4), fell_back (n,) bool)``.

    Rows whose pair has IoU >= ``max_iou`` are resampled (only those rows) up to ``max_tries`` rounds; rows that
    never get under the ceiling keep the lowest-IoU pair seen and are flagged. ``max_iou >= 1`` disables it.
    """
    H = np.broadcast_to(np.asarray(H, dtype=np.int64), (n,))
    W = np.broadcast_to(np.asarray(W, dtype=np.int64), (n,))
    a = sample_rrc_boxes(H, W, n, scale, ratio, rng)
    b = sample_rrc_boxes(H, W, n, scale, ratio, rng)
    fell_back = np.zeros(n, dtype=bool)
    if max_iou >= 1.0:
        return np.stack([a, b], axis=1), fell_back
    iou = box_iou(a, b)
    todo = np.flatnonzero(iou >= max_iou)
    for _ in range(max_tries - 1):
        if todo.size == 0:
            break
        na = sample_rrc_boxes(H[todo], W[todo], todo.size, scale, ratio, rng)
        nb = sample_rrc_boxes(H[todo], W[todo], todo.size, scale, ratio, rng)
        niou = box_iou(na, nb)
        better = niou < iou[todo]
        idx = todo[better]
        a[idx], b[idx], iou[idx] = na[better], nb[better], niou[better]
        todo = todo[niou >= max_iou]
    fell_back[todo] = True
    return np.stack([a, b], axis=1), fell_back


def two_view_boxes(H: int, W: int, crop_cfg: Any, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Key (row 0) and query (row 1) boxes with IoU strictly below ``crop.max_iou`` (the paper's ceiling).

    Rejection sampling with ``crop.max_tries`` pairs, drawn in one vectorised call and taken in order (so the
    result is the first accepted pair, as sequential rejection would give). If none is accepted the lowest-IoU
    pair is returned with ``fell_back=True``.
    """
    spec = crop_spec(crop_cfg)
    if spec.max_iou >= 1.0:
        return sample_rrc_boxes(H, W, 2, spec.scale, spec.ratio, rng), False
    boxes = sample_rrc_boxes(H, W, 2 * spec.max_tries, spec.scale, spec.ratio, rng).reshape(-1, 2, 4)
    iou = box_iou(boxes[:, 0], boxes[:, 1])
    ok = np.flatnonzero(iou < spec.max_iou)
    if ok.size:
        return boxes[ok[0]], False
    return boxes[int(iou.argmin())], True


def _small_inside(
    H: int, W: int, key: np.ndarray, spec: CropSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Small crops forced to lie within the key box (paper, Fig. 4).

    The size follows the RRC rule with the area relative to the *image* (so small crops keep 5-14% of the
    image, as in the paper), retried ``constraint_tries`` times until it fits in the key box; the position is
    then uniform over the placements inside the key box. If no size fits, the last one is clipped to the key box
    (still inside, aspect changed) and the crop is counted as a fallback.
    """
    n, tries = spec.n_small, spec.constraint_tries
    cand = sample_rrc_boxes(H, W, n * tries, spec.small_scale, spec.ratio, rng).reshape(n, tries, 4)
    fits = (cand[..., 2] <= key[2]) & (cand[..., 3] <= key[3])
    first = fits.argmax(axis=1)
    found = fits[np.arange(n), first]
    pick = np.where(found, first, tries - 1)
    h = np.minimum(cand[np.arange(n), pick, 2], key[2])
    w = np.minimum(cand[np.arange(n), pick, 3], key[3])
    top = key[0] + np.floor(rng.random(n) * (key[2] - h + 1)).astype(np.int64)
    left = key[1] + np.floor(rng.random(n) * (key[3] - w + 1)).astype(np.int64)
    return np.stack([top, left, h, w], axis=1), ~found


def _small_overlap(
    H: int, W: int, key: np.ndarray, spec: CropSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Public-code rule: accept when intersection with the key >= ``min_overlap`` x small-crop area.

    ``constraint_tries`` candidates per small crop, the first accepted one wins; otherwise the first
    (unconstrained) candidate is used and counted as a fallback.
    """
    n, tries = spec.n_small, spec.constraint_tries
    cand = sample_rrc_boxes(H, W, n * tries, spec.small_scale, spec.ratio, rng).reshape(n, tries, 4)
    ok = box_intersection(cand, key[None, None, :]) >= spec.min_overlap * box_area(cand)
    first = ok.argmax(axis=1)
    found = ok[np.arange(n), first]
    return cand[np.arange(n), np.where(found, first, 0)], ~found


def multi_crop_boxes(H: int, W: int, crop_cfg: Any, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Key, query and ``crop.n_small`` small boxes ``(2 + n_small, 4)``; row 0 is the key/anchor.

    The key/query pair obeys the IoU ceiling (``two_view_boxes``); small crops use ``crop.small_scale`` and the
    ``crop.constraint`` rule against the key box. ``fell_back`` is True if any sampler fell back.
    """
    spec = crop_spec(crop_cfg)
    pair, fell_back = two_view_boxes(H, W, spec, rng)
    if spec.n_small == 0:
        return pair, fell_back
    if spec.constraint == "inside":
        small, fb = _small_inside(H, W, pair[0], spec, rng)
    elif spec.constraint == "overlap":
        small, fb = _small_overlap(H, W, pair[0], spec, rng)
    else:
        small = sample_rrc_boxes(H, W, spec.n_small, spec.small_scale, spec.ratio, rng)
        fb = np.zeros(spec.n_small, dtype=bool)
    return np.concatenate([pair, small], axis=0), bool(fell_back or fb.any())


def sample_views(
    H: int, W: int, crop_cfg: Any, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, bool]:
    """All geometry for one image: ``(source boxes (V, 4), flips (V,) bool, fell_back)``.

    Flips are decided here (p = 0.5 per view) rather than inside the colour pipeline, because with
    ``crop.flip: before`` the flip moves the source region; the pixel stage mirrors each flagged view.
    """
    spec = crop_spec(crop_cfg)
    boxes, fell_back = multi_crop_boxes(H, W, spec, rng)
    flips = rng.random(len(boxes)) < 0.5
    return source_boxes(boxes, flips, W, spec.flip), flips, fell_back
