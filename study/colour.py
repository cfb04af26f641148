"""Batched colour stage: MoCo's colour augmentation as tensor ops over whole batches, on the step's device.

Why: per-image PIL colour ops (ColorJitter's four passes, hue through HSV, a 23-tap blur at 224 px) cost more CPU
than decoding and cropping together, and at paper scale the CPU cannot feed a GPU with them. The fast SSL stacks
split the pipeline the same way: DALI and FFCV decode and crop on the CPU (or nvJPEG) and do the per-pixel
colour maths on the GPU over the batch; Kornia-style GPU augmentation draws per-sample parameters and applies
them as batched tensor ops. Here the loader workers decode, crop, resize and flip (``data.render: batched``),
and this module applies the rest on uint8 batches ``(B, 3, S, S)``:

* v2: ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8 -> RandomGrayscale(0.2) -> GaussianBlur(kernel
  ``blur_kernel_size(S)``, sigma U(0.1, 2)) with p=0.5 (if ``aug.blur``);
* v1: RandomGrayscale(0.2) -> ColorJitter(0.4, 0.4, 0.4, 0.4);
* then float32 and ``aug.mean``/``aug.std`` normalisation.

Same distribution as ``study.augment.standard_pipeline``: per sample, jitter factors U(max(0, 1-x), 1+x), hue
U(-h, h), a uniformly random order of the four jitter ops (torchvision draws ``randperm(4)`` per call), the same
coin flips; each op follows torchvision's float-tensor formula (``transforms._functional_tensor``), so given the
parameters the pixels agree with torchvision to float rounding (``tests/test_colour.py``). The chain stays in
float from the first op to the normalisation (as DALI and Kornia do): no uint8 rounding between ops, which in
torchvision's uint8 tensor path truncates (a bias of up to -1/255 per op) and in PIL rounds.

Randomness: every parameter comes from the ``torch.Generator`` passed in; ``colour_generator(seed, step, rank)``
makes one from the step, so a resumed run draws the same parameters (exact resume). Samples marked
``autoaug`` (A+ views that took the AutoAugment branch in the worker) get normalisation only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from study.augment import aug_settings, blur_kernel_size

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
# jitter op ids, as torchvision's ColorJitter fn_idx
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_STREAM_TAG = 0xC010  # separates the colour stream from any other stream seeded with (seed, step, rank)


# ------------------------------------------------------------------------------------------- ops (float)
# All take float images in [0, 1], shape (n, 3, H, W), and per-sample factors of shape (n,). The jitter ops end
# in ``_`` because they overwrite ``x`` (the stage passes each a fresh gathered copy): at 224 px the batch is
# far larger than the caches, so every temporary pass costs as much as the arithmetic.


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (n, 1, H, W), torchvision's weights and summation order."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend_(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * a + (1 - ratio) * b, clamped to [0, 1]: torchvision's ``_blend``, in place in ``a``."""
    r = ratio.view(-1, 1, 1, 1).to(a.dtype)
    return a.mul_(r).add_(b * (1.0 - r)).clamp_(0.0, 1.0)


def adjust_brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black: x * factor, clamped."""
    return x.mul_(factor.view(-1, 1, 1, 1).to(x.dtype)).clamp_(0.0, 1.0)


def adjust_contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the mean luma of each image."""
    return _blend_(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's own luma."""
    return _blend_(x, grayscale(x), factor)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) RGB -> HSV with h in [0, 1): torchvision's ``_rgb2hsv`` (after Pillow), including its tie rule
    (red wins over green over blue when channels share the maximum) and 0 hue/saturation for grays."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    gray = maxc == minc
    chroma = maxc - minc
    one = torch.ones_like(maxc)
    s = chroma / torch.where(gray, one, maxc)
    div = torch.where(gray, one, chroma)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def _sector_weight(h6: torch.Tensor, n: float) -> torch.Tensor:
    """clamp(min(k, 4 - k), 0, 1) with k = (n + h6) mod 6: how far channel n (5 r, 3 g, 1 b) sits below v."""
    k = torch.remainder(h6 + n, 6.0)
    return torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_hsv``. Closed form per channel: c = v (1 - s w), w = ``_sector_weight``; equal to
    torchvision's six-sector table (its p, q, t are v(1-s), v(1-s f), v(1-s(1-f))) without building and
    contracting a (3, 6) stack per pixel."""
    h, s, v = hsv.unbind(dim=1)
    h6 = h * 6.0
    return torch.stack([v * (1.0 - s * _sector_weight(h6, n)) for n in (5.0, 3.0, 1.0)], dim=1).clamp_(0.0, 1.0)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` (fraction of a turn, in [-0.5, 0.5]): torchvision's HSV round trip
    (h' = (h + factor) mod 1, then ``hsv_to_rgb``), fused. With v = max, v s = max - min = chroma, every
    output channel is max - chroma * w(6 h'), and 6 h is the Pillow/torchvision sector formula
    ((g - b) / chroma if red is the max, 2 + (b - r) / chroma if green, 4 + (r - g) / chroma otherwise);
    differs from the unfused round trip by float rounding only (about 1e-7)."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)
    # sector masks as 0/1 floats (red wins ties, then green): cheaper than nested where() on CPU
    m_r = (maxc == r).to(x.dtype)
    m_g = (maxc == g).to(x.dtype).mul_(1.0 - m_r)
    m_b = 1.0 - m_r - m_g
    num = (g - b).mul_(m_r).add_((b - r).mul_(m_g)).add_((r - g).mul_(m_b))
    off = m_g.mul(2.0).add_(m_b.mul(4.0))
    h6 = num.div_(torch.where(chroma == 0, 1.0, chroma)).add_(off).add_(6.0 * factor.view(-1, 1, 1).to(x.dtype))
    out = torch.stack([maxc - chroma * _sector_weight(h6, n) for n in (5.0, 3.0, 1.0)], dim=1)
    return out.clamp_(0.0, 1.0)


def gaussian_kernels(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """(n, kernel_size) normalised 1-D Gaussians, one per sigma (torchvision's sampling points)."""
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, steps=kernel_size, dtype=sigma.dtype, device=sigma.device)
    pdf = torch.exp(-0.5 * (t / sigma.view(-1, 1)).pow(2))
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample sigma blur: reflect padding as torchvision, the 2-D kernel applied separably (rows then
    columns, the same sum as torchvision's outer-product kernel) as grouped convs, one group per (sample,
    channel)."""
    n, c, hh, ww = x.shape
    p = kernel_size // 2
    k = gaussian_kernels(kernel_size, sigma.to(x.dtype)).repeat_interleave(c, dim=0)  # (n*c, K)
    y = F.pad(x, [p, p, p, p], mode="reflect").reshape(1, n * c, hh + 2 * p, ww + 2 * p)
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.reshape(n, c, hh, ww)


_JITTER_OPS = {BRIGHTNESS: adjust_brightness_, CONTRAST: adjust_contrast_, SATURATION: adjust_saturation_,
               HUE: adjust_hue}


# --------------------------------------------------------------------------------------- recipe, params


@dataclass(frozen=True)
class Recipe:
    """One view's colour recipe (the parameters of ``standard_pipeline``'s transforms)."""

    jitter_p: float  # probability of ColorJitter (v1: always)
    strength: tuple[float, float, float, float]  # ColorJitter(brightness, contrast, saturation, hue)
    gray_p: float
    gray_first: bool  # v1: grayscale before the jitter
    blur_p: float  # 0: no blur
    kernel_size: int
    sigma: tuple[float, float] = (0.1, 2.0)

    def ranges(self) -> tuple[tuple[float, float], ...]:
        """(lo, hi) of the brightness, contrast, saturation factors and the hue shift, as ColorJitter's."""
        b, c, s, h = self.strength
        return tuple((max(0.0, 1.0 - x), 1.0 + x) for x in (b, c, s)) + ((-h, h),)


def recipe_for(aug_cfg: Any, size: int) -> Recipe:
    """The MoCo v1/v2 recipe of ``study.augment.standard_pipeline`` for views of side ``size``."""
    aug = aug_settings(aug_cfg)
    k = blur_kernel_size(size)
    if aug["pipeline"] == "v1":
        return Recipe(1.0, (0.4, 0.4, 0.4, 0.4), 0.2, True, 0.0, k)
    return Recipe(0.8, (0.4, 0.4, 0.4, 0.1), 0.2, False, 0.5 if aug["blur"] else 0.0, k)


@dataclass
class ColourParams:
    """Per-sample parameters of one view's batch (all shape (B,), ``order`` (B, 4); on the generator's device).

    ``order[i]`` is sample i's jitter order as op ids (0 brightness, 1 contrast, 2 saturation, 3 hue), like
    torchvision's ``fn_idx``. ``skip`` marks samples that get no colour op (A+ AutoAugment views).
    """

    jitter: torch.Tensor
    order: torch.Tensor
    factors: torch.Tensor  # (B, 4): brightness, contrast, saturation factor, hue shift
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    skip: torch.Tensor


def sample_params(recipe: Recipe, batch: int, generator: torch.Generator) -> ColourParams:
    """Draw every parameter for all ``batch`` samples in a fixed order (the stream does not depend on the
    outcomes). The order is the argsort of 4 uniforms: a uniform random permutation, like ``randperm(4)``."""
    dev = generator.device

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    jitter = u(batch) < recipe.jitter_p
    order = u(batch, 4).argsort(dim=1)
    lo = torch.tensor([r[0] for r in recipe.ranges()], device=dev)
    hi = torch.tensor([r[1] for r in recipe.ranges()], device=dev)
    factors = lo + (hi - lo) * u(batch, 4)
    gray = u(batch) < recipe.gray_p
    blur = u(batch) < recipe.blur_p
    sigma = recipe.sigma[0] + (recipe.sigma[1] - recipe.sigma[0]) * u(batch)
    return ColourParams(jitter, order, factors, gray, blur, sigma, torch.zeros(batch, dtype=torch.bool, device=dev))


def _rows(mask: np.ndarray, device: torch.device) -> torch.Tensor | None:
    idx = np.flatnonzero(mask)
    return None if idx.size == 0 else torch.from_numpy(idx).to(device, non_blocking=True)


def _apply_rows(x: torch.Tensor, rows: torch.Tensor | None, fn: Any, *args: torch.Tensor) -> None:
    """x[rows] = fn(x[rows], *args[rows]) in place: each op runs only on the samples that draw it."""
    if rows is None:
        return
    x.index_copy_(0, rows, fn(x.index_select(0, rows), *(a.index_select(0, rows) for a in args)))


# From this side up the CPU renders image by image. 64 images, one thread (benchmarks/train_step.py's machine):
# per-image vs batched 12.7 vs 3.5 ms at 32 px, 21 vs 15 ms at 64 px, 31 vs 32 ms at 96 px, 316 vs 428 ms at 224.
PER_SAMPLE_MIN_SIDE = 96


def _per_sample(x: torch.Tensor, recipe: Recipe, p: ColourParams, jitter: np.ndarray, gray: np.ndarray,
                order: np.ndarray) -> torch.Tensor:
    """CPU, jitter and grayscale: one image at a time, in place in ``x``. An image (600 KB at 224 px) stays in
    cache through its chain, where whole-batch passes stream the batch through memory once per op and gathers
    copy it; the per-call overhead (~40 small ops per image) is small next to that. (The blur, last, stays
    batched: one grouped conv over the blurred rows beats per-image convs.)"""
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        if recipe.gray_first and gray[i]:
            xi.copy_(grayscale(xi).expand(-1, 3, -1, -1))
        if jitter[i]:
            for op in order[i]:
                y = _JITTER_OPS[int(op)](xi, p.factors[i:i + 1, int(op)])
                if y is not xi:
                    xi.copy_(y)
        if not recipe.gray_first and gray[i]:
            xi.copy_(grayscale(xi).expand(-1, 3, -1, -1))
    return x


def apply_colour(x: torch.Tensor, recipe: Recipe, p: ColourParams, per_sample: bool | None = None) -> torch.Tensor:
    """The recipe's colour ops on float images in [0, 1] (n, 3, H, W) with the given parameters; returns a new
    tensor in [0, 1]. The coin flips and orders go to the CPU in one transfer (one sync on a GPU). On a GPU
    each op then runs once per jitter position on the rows that draw it (a few large kernels instead of
    thousands of per-image ones), and so on the CPU for small images, where per-call overhead dominates; on
    the CPU from ``PER_SAMPLE_MIN_SIDE`` px up image by image (``_per_sample``). Both ways give the same
    tensor (tests/test_colour.py). ``per_sample`` overrides the choice."""
    x = x.clone()
    dev = x.device
    flags = torch.stack([p.jitter, p.gray, p.blur, p.skip], dim=1).long()
    host = torch.cat([flags, p.order.long()], dim=1).cpu().numpy()  # (B, 8)
    active = host[:, 3] == 0
    jitter, gray, blur = (host[:, 0] == 1) & active, (host[:, 1] == 1) & active, (host[:, 2] == 1) & active
    order = host[:, 4:]

    def do_gray() -> None:
        _apply_rows(x, _rows(gray, dev), lambda y: grayscale(y).expand(-1, 3, -1, -1))

    if per_sample is None:
        per_sample = dev.type == "cpu" and min(x.shape[-2:]) >= PER_SAMPLE_MIN_SIDE
    if per_sample:
        _per_sample(x, recipe, p, jitter, gray, order)
    else:
        if recipe.gray_first:
            do_gray()
        for pos in range(4):
            for op, fn in _JITTER_OPS.items():
                _apply_rows(x, _rows(jitter & (order[:, pos] == op), dev), fn, p.factors[:, op])
        if not recipe.gray_first:
            do_gray()
    if recipe.blur_p > 0:
        _apply_rows(x, _rows(blur, dev), lambda y, s: gaussian_blur(y, recipe.kernel_size, s), p.sigma)
    return x


# ---------------------------------------------------------------------------------------------- stage


class BatchColour:
    """The colour stage of ``data.render: batched``: one recipe per view size, normalisation at the end."""

    def __init__(self, aug_cfg: Any, sizes: Sequence[int]):
        aug = aug_settings(aug_cfg)
        self.sizes = [int(s) for s in sizes]
        self.recipes = [recipe_for(aug, s) for s in self.sizes]
        self.mean = torch.tensor(aug["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(aug["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def params(self, view: int, batch: int, generator: torch.Generator,
               autoaug: torch.Tensor | None = None) -> ColourParams:
        p = sample_params(self.recipes[view], batch, generator)
        if autoaug is not None:
            p.skip = autoaug.to(device=p.skip.device, dtype=torch.bool)
        return p

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def render(self, view: int, x: torch.Tensor, p: ColourParams) -> torch.Tensor:
        """uint8 (B, 3, S, S) + parameters -> float32 normalised."""
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"view {view}: expected uint8 (B, 3, S, S), got {x.dtype} {tuple(x.shape)}")
        if p.factors.device != x.device:  # a generator on another device than the views
            p = ColourParams(**{k: v.to(x.device) for k, v in vars(p).items()})
        y = x.to(torch.float32).mul_(1.0 / 255.0)
        return self.normalize(apply_colour(y, self.recipes[view], p))

    def __call__(self, views: list[torch.Tensor], generator: torch.Generator,
                 autoaug: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """uint8 (B, 3, S_v, S_v) per view, on any device -> float32 normalised, same device.

        ``autoaug``: per view a bool (B,) of samples already AutoAugmented in the worker (normalised only).
        Parameters are drawn view by view from ``generator`` (on the views' device for a GPU).
        """
        if len(views) != len(self.recipes):
            raise ValueError(f"BatchColour was built for {len(self.recipes)} views, got {len(views)}")
        out = []
        for v, x in enumerate(views):
            p = self.params(v, x.shape[0], generator, None if autoaug is None else autoaug[v])
            out.append(self.render(v, x, p))
        return out


def colour_generator(seed: int, step: int, rank: int = 0, device: Any = "cpu") -> torch.Generator:
    """A generator seeded from (seed, step, rank) only: a resumed run re-draws step s's parameters exactly,
    and ranks draw independent ones."""
    words = [int(w) & 0xFFFFFFFF for w in (seed, step, step >> 32, rank, _STREAM_TAG)]
    state = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(state)
    return g


def device_views(batch: dict, device: torch.device, memory_format: torch.memory_format,
                 colour: BatchColour | None, seed: int, step: int, rank: int) -> list[torch.Tensor]:
    """The trainer's views for one step: with ``colour`` (``data.render: batched``) the uint8 views go to the
    device first (4x fewer bytes than float) and get their colour there; otherwise they arrive normalised.
    A ``data.decode: device`` batch carries encoded images instead of views: they are decoded, cropped and
    flipped on the device first (``study.decode.decode_crops``)."""
    if "encoded" in batch:
        if colour is None:
            raise ValueError("a data.decode=device batch needs the colour stage (data.render=batched)")
        from study.decode import decode_crops  # torchvision.io only where it is used

        views = decode_crops(batch, colour.sizes, device)
    else:
        views = [v.to(device, non_blocking=True) for v in batch["views"]]
    if colour is not None:
        views = colour(views, colour_generator(seed, step, rank, device), batch.get("autoaug"))
    return [v.contiguous(memory_format=memory_format) for v in views]
