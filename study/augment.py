"""Per-view colour pipelines (MoCo v1 / v2, A+) built from torchvision transforms.

Two ways to use them:

* ``standard_pipeline(aug_cfg, size)`` / ``aplus_pipeline`` with the defaults give complete torchvision-style
  transforms (PIL in, flip included, normalised float tensor out), e.g. for a reference loader.
* The shard loader (``study.data``) decides crops *and flips* in ``study.crops`` (a flip before cropping moves
  the source region), so it builds ``view_pipelines(aug_cfg, sizes)`` with ``flip=False, to_float=False``:
  PIL in, uint8 CHW tensor out, and normalises whole batches once with ``batch_normalizer``.

* With ``data.render: batched`` the workers stop at uint8 pixels (``worker_pipelines``: only A+'s AutoAugment
  branch stays per image, flagged) and ``study.colour.BatchColour`` applies these same recipes to whole batches
  as tensor ops on the training device.

Moving the flip out of the pipeline does not change the distribution: horizontal flip commutes with colour
jitter, grayscale and the (symmetric) Gaussian blur, and AutoAugment's geometric ops draw their sign at random.
Colour ops run on PIL (cheapest at these sizes on CPU); the blur runs on the uint8 tensor so the image is not
converted back to PIL. torchvision v1 transform classes are used because their per-call overhead is lower than
v2's on small PIL images (measured: ~640 us vs ~710 us per 64 px view on this machine).

Config: ``aug:`` keys ``pipeline`` (v1 | v2), ``aplus``, ``aplus_p``, ``blur``, ``mean``, ``std`` read from an
OmegaConf DictConfig or a plain dict. ``blur`` only affects the v2 recipe (v1 has no blur).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as T2

PIPELINES = ("v1", "v2")
_DEFAULTS: dict[str, Any] = {
    "pipeline": "v2",
    "aplus": False,
    "aplus_p": 0.5,
    "blur": True,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


class AugConfigError(ValueError):
    """An ``aug:`` config value is unknown or out of range."""


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return _DEFAULTS[key]
    if isinstance(cfg, Mapping):
        return cfg.get(key, _DEFAULTS[key])
    return getattr(cfg, key, _DEFAULTS[key])


def aug_settings(aug_cfg: Any) -> dict[str, Any]:
    """Validated ``aug:`` settings as a plain dict (missing keys take the MoCo-v2 defaults)."""
    out = {k: _get(aug_cfg, k) for k in _DEFAULTS}
    out["pipeline"] = str(out["pipeline"])
    out["aplus"] = bool(out["aplus"])
    out["aplus_p"] = float(out["aplus_p"])
    out["blur"] = bool(out["blur"])
    out["mean"] = [float(v) for v in out["mean"]]
    out["std"] = [float(v) for v in out["std"]]
    if out["pipeline"] not in PIPELINES:
        raise AugConfigError(f"aug.pipeline must be one of {PIPELINES}, got {out['pipeline']!r}")
    if not 0.0 <= out["aplus_p"] <= 1.0:
        raise AugConfigError(f"aug.aplus_p is a probability, got {out['aplus_p']}")
    if len(out["mean"]) != 3 or len(out["std"]) != 3 or min(out["std"]) <= 0:
        raise AugConfigError("aug.mean and aug.std need 3 values each, std > 0")
    return out


def blur_kernel_size(size: int) -> int:
    """Odd kernel of ~10% of the crop side (SimCLR / MoCo-v2 practice), at least 3."""
    k = max(3, int(round(0.1 * size)))
    return k if k % 2 == 1 else k + 1


def _tail(flip: bool) -> list[Callable]:
    """Shared end of every pipeline; the head works on PIL, this turns it into a tensor."""
    ops: list[Callable] = []
    if flip:
        ops.append(T.RandomHorizontalFlip())
    ops.append(T.PILToTensor())
    return ops


def _finish(aug: Mapping[str, Any], ops: list[Callable], to_float: bool) -> T.Compose:
    if to_float:
        ops = ops + [T2.ToDtype(torch.float32, scale=True), T2.Normalize(aug["mean"], aug["std"])]
    return T.Compose(ops)


def standard_pipeline(aug_cfg: Any, size: int, flip: bool = True, to_float: bool = True) -> T.Compose:
    """The MoCo colour recipe for one view of side ``size`` (the crop/resize happens before this).

    v1: RandomGrayscale(0.2) -> ColorJitter(0.4, 0.4, 0.4, 0.4). v2: ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8 ->
    RandomGrayscale(0.2) -> GaussianBlur(sigma 0.1-2, p=0.5) (if ``aug.blur``). Then flip, then tensor.
    """
    aug = aug_settings(aug_cfg)
    if aug["pipeline"] == "v1":
        head: list[Callable] = [T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4, 0.4)]
        return _finish(aug, head + _tail(flip), to_float)
    head = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    ops = head + _tail(flip)
    if aug["blur"]:
        # on the uint8 tensor: flip commutes with the symmetric blur, and this avoids a PIL round trip
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=0.5))
    return _finish(aug, ops, to_float)


def autoaugment_pipeline(aug_cfg: Any, flip: bool = True, to_float: bool = True) -> T.Compose:
    """A+'s alternative branch: flip + torchvision AutoAugment (ImageNet policy), no jitter/blur/grayscale."""
    aug = aug_settings(aug_cfg)
    ops: list[Callable] = [T.AutoAugment(T.AutoAugmentPolicy.IMAGENET)] + _tail(flip)
    return _finish(aug, ops, to_float)


class EitherPipeline:
    """A+: with probability ``p_standard`` the standard pipeline, otherwise the AutoAugment one.

    Draws from torch's RNG like the transforms it wraps, so one seed fixes every choice.
    """

    def __init__(self, standard: Callable, autoaugment: Callable, p_standard: float):
        self.standard, self.autoaugment, self.p_standard = standard, autoaugment, float(p_standard)

    def __call__(self, img: Any) -> Any:
        if torch.rand(()).item() < self.p_standard:
            return self.standard(img)
        return self.autoaugment(img)

    def __repr__(self) -> str:
        return f"EitherPipeline(p_standard={self.p_standard}, standard={self.standard}, aa={self.autoaugment})"


def aplus_pipeline(aug_cfg: Any, size: int, flip: bool = True, to_float: bool = True) -> EitherPipeline:
    aug = aug_settings(aug_cfg)
    return EitherPipeline(
        standard_pipeline(aug, size, flip=flip, to_float=to_float),
        autoaugment_pipeline(aug, flip=flip, to_float=to_float),
        aug["aplus_p"],
    )


def view_pipelines(
    aug_cfg: Any, sizes: Sequence[int], flip: bool = False, to_float: bool = False
) -> list[Callable]:
    """One pipeline per view. View 0 (the key) always gets the standard one; others A+ if ``aug.aplus``."""
    aug = aug_settings(aug_cfg)
    out: list[Callable] = []
    for v, size in enumerate(sizes):
        if v > 0 and aug["aplus"]:
            out.append(aplus_pipeline(aug, size, flip=flip, to_float=to_float))
        else:
            out.append(standard_pipeline(aug, size, flip=flip, to_float=to_float))
    return out


class _ToUint8:
    """``data.render: batched`` worker pipeline of a standard view: pixels only, colour comes later on the batch
    (``study.colour``); the flag says "not AutoAugmented"."""

    def __call__(self, img: Any) -> tuple[torch.Tensor, bool]:
        return T.functional.pil_to_tensor(img), False

    def __repr__(self) -> str:
        return "ToUint8()"


class AplusWorker:
    """``data.render: batched`` worker pipeline of an A+ view: draws the branch like ``EitherPipeline`` (same
    torch RNG, same probability); the AutoAugment branch runs here on PIL and is flagged so the batched colour
    stage only normalises it, the standard branch returns the plain pixels."""

    def __init__(self, autoaugment: Callable, p_standard: float):
        self.autoaugment, self.p_standard = autoaugment, float(p_standard)

    def __call__(self, img: Any) -> tuple[torch.Tensor, bool]:
        if torch.rand(()).item() < self.p_standard:
            return T.functional.pil_to_tensor(img), False
        return self.autoaugment(img), True

    def __repr__(self) -> str:
        return f"AplusWorker(p_standard={self.p_standard}, aa={self.autoaugment})"


def worker_pipelines(aug_cfg: Any, sizes: Sequence[int]) -> list[Callable[[Any], tuple[torch.Tensor, bool]]]:
    """Per view, the worker's part under ``data.render: batched``: PIL (already cropped, resized, flipped) ->
    ``(uint8 CHW tensor, autoaugmented)``. View 0 never takes A+'s AutoAugment branch, as in ``view_pipelines``."""
    aug = aug_settings(aug_cfg)
    out: list[Callable[[Any], tuple[torch.Tensor, bool]]] = []
    for v in range(len(sizes)):
        if v > 0 and aug["aplus"]:
            out.append(AplusWorker(autoaugment_pipeline(aug, flip=False, to_float=False), aug["aplus_p"]))
        else:
            out.append(_ToUint8())
    return out


def batch_normalizer(aug_cfg: Any) -> T2.Compose:
    """uint8 (B, 3, S, S) -> float32 normalised: done once per batch instead of once per view."""
    aug = aug_settings(aug_cfg)
    return T2.Compose([T2.ToDtype(torch.float32, scale=True), T2.Normalize(aug["mean"], aug["std"])])
