"""Batched colour stage (study/colour.py) against torchvision: per-op pixels, the composed recipe with forced
parameters, the parameter distributions by sampling, and seeding."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from study import colour as C
from study.augment import blur_kernel_size, standard_pipeline

N = 6


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: intra-op threads only add contention on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n=N, size=37, seed=0):
    """Random uint8 images, with some gray pixels and channel ties (hue's special cases) mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    x[:, :, :4] = x[:, :1, :4]  # gray rows: max == min
    x[:, 1, 4:8] = x[:, 0, 4:8]  # r == g ties
    x[:, 2, 8:10] = x[:, 1, 8:10]  # g == b ties
    return x


def _factors(lo, hi, n=N, seed=1):
    return lo + (hi - lo) * torch.rand(n, generator=torch.Generator().manual_seed(seed))


def _per_image(fn, x, factors):
    return torch.stack([fn(x[i], float(factors[i])) for i in range(len(x))])


def _levels(a: torch.Tensor, b_uint8: torch.Tensor) -> float:
    """Max difference in uint8 levels between our float result (rounded) and a uint8 reference."""
    return float(((a * 255).round() - b_uint8.float()).abs().max())


JITTER = [
    ("brightness", C.adjust_brightness_, TF.adjust_brightness, (0.0, 2.0)),
    ("contrast", C.adjust_contrast_, TF.adjust_contrast, (0.0, 2.0)),
    ("saturation", C.adjust_saturation_, TF.adjust_saturation, (0.0, 2.0)),
    ("hue", C.adjust_hue, TF.adjust_hue, (-0.5, 0.5)),
]


@pytest.mark.parametrize("name,ours,ref,rng", JITTER, ids=[j[0] for j in JITTER])
def test_jitter_ops_match_torchvision(name, ours, ref, rng):
    x = _images()
    f = _factors(*rng)
    xf = x.float() / 255
    got = ours(xf.clone(), f)
    # float input: the same formula up to float rounding. Hue is fused (one pass from RGB to the shifted RGB
    # instead of torchvision's HSV stack and back), so its operations differ and it gets a few float ulps.
    torch.testing.assert_close(got, _per_image(ref, xf, f), atol=1e-5 if name == "hue" else 2e-6, rtol=0)
    # uint8 input: torchvision rounds down to uint8 (blend: .to(uint8) truncates; hue: x * (256 - 1e-3)
    # floored), we keep floats until the end: within one level after rounding. Contrast and saturation also
    # blend with a luma that torchvision first truncates to uint8 (up to -1 level, weighted by 1 - factor),
    # so two levels there.
    assert _levels(got, _per_image(ref, x, f)) <= (2 if name in ("contrast", "saturation") else 1)


def test_grayscale_matches_torchvision():
    x = _images()
    xf = x.float() / 255
    torch.testing.assert_close(C.grayscale(xf), TF.rgb_to_grayscale(xf), atol=0, rtol=0)
    three = C.grayscale(xf).expand(-1, 3, -1, -1)
    torch.testing.assert_close(three, TF.rgb_to_grayscale(xf, num_output_channels=3), atol=0, rtol=0)
    assert _levels(C.grayscale(xf), TF.rgb_to_grayscale(x)) <= 1


@pytest.mark.parametrize("size,kernel", [(16, 3), (37, 5), (64, blur_kernel_size(224))])
def test_blur_matches_torchvision_per_sample_sigma(size, kernel):
    x = _images(size=size)
    sigma = _factors(0.1, 2.0)
    xf = x.float() / 255
    got = C.gaussian_blur(xf, kernel, sigma)

    def ref(img, s):
        return TF.gaussian_blur(img, [kernel, kernel], [s, s])

    # separable vs torchvision's 2-D outer-product kernel: same sum, different float order
    torch.testing.assert_close(got, _per_image(ref, xf, sigma), atol=2e-6, rtol=0)
    assert _levels(got, _per_image(ref, x, sigma)) <= 1


def test_hsv_round_trip_and_torchvision_hsv():
    from torchvision.transforms import _functional_tensor as FT

    xf = _images().float() / 255
    hsv = C.rgb_to_hsv(xf)
    torch.testing.assert_close(hsv, FT._rgb2hsv(xf), atol=1e-6, rtol=0)
    torch.testing.assert_close(C.hsv_to_rgb(hsv), FT._hsv2rgb(hsv), atol=1e-6, rtol=0)
    torch.testing.assert_close(C.hsv_to_rgb(hsv), xf, atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------ full recipe, forced params


def _force(monkeypatch, p: C.ColourParams, i: int, recipe: C.Recipe) -> None:
    """Make torchvision's random draws for one call of ``standard_pipeline`` return sample i's parameters:
    the coin flips (``torch.rand(1)``, in the recipe's call order), ColorJitter's (order, factors) and the
    blur's sigma."""
    flips = []
    if recipe.gray_first:
        flips.append(bool(p.gray[i]))
    else:
        flips += [bool(p.jitter[i]), bool(p.gray[i])]
        if recipe.blur_p > 0:
            flips.append(bool(p.blur[i]))
    queue = [torch.tensor([0.0 if on else 1.0]) for on in flips]  # 0 < p applies, 1 > p skips

    def rand(*shape, **kw):
        assert shape in ((1,), ((1,),)), shape
        return queue.pop(0)

    fac = [float(v) for v in p.factors[i]]
    monkeypatch.setattr(torch, "rand", rand)
    monkeypatch.setattr(T.ColorJitter, "get_params", staticmethod(lambda *a: (p.order[i].clone(), *fac)))
    monkeypatch.setattr(T.GaussianBlur, "get_params", staticmethod(lambda lo, hi: float(p.sigma[i])))


def _reference_ops(aug, size):
    """``standard_pipeline``'s own transforms (flip off), minus PIL->tensor: torchvision's composed recipe."""
    return T.Compose([t for t in standard_pipeline(aug, size, flip=False, to_float=False).transforms
                      if not isinstance(t, T.PILToTensor)])


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "grouped"])
@pytest.mark.parametrize("aug", [{"pipeline": "v2"}, {"pipeline": "v1"}, {"pipeline": "v2", "blur": False}],
                         ids=["v2", "v1", "v2-noblur"])
def test_full_recipe_matches_torchvision_composed_with_same_params(aug, per_sample, monkeypatch):
    """Both application strategies (image by image on the CPU; grouped rows per op, as on a GPU)."""
    size, n = 24, 24
    stage = C.BatchColour(aug, [size])
    recipe = stage.recipes[0]
    x = _images(n, size, seed=3)
    p = stage.params(0, n, C.colour_generator(0, 7))
    # every branch occurs in the sample (else the comparison would not cover it)
    assert p.gray.any() and (~p.gray).any() and (p.jitter.all() if recipe.jitter_p == 1 else (~p.jitter).any())
    got = C.apply_colour(x.float() / 255, recipe, p, per_sample=per_sample)
    ref_ops = _reference_ops(aug, size)
    refs = []
    with monkeypatch.context() as m:
        for i in range(n):
            _force(m, p, i, recipe)
            refs.append(ref_ops(x[i].float() / 255))
    ref = torch.stack(refs)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
    # and the normalised output is torchvision's Normalize of it
    out = stage.render(0, x, p)
    want = TF.normalize(ref, stage.mean.flatten().tolist(), stage.std.flatten().tolist())
    torch.testing.assert_close(out, want, atol=1e-4, rtol=0)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("aug", [{"pipeline": "v2"}, {"pipeline": "v1"}, {"pipeline": "v2", "aplus": True}],
                         ids=["v2", "v1", "v2-aplus"])
@pytest.mark.parametrize("size", [16, 32, 112])
def test_the_cpu_strategy_chosen_by_image_size_changes_no_bit(aug, size):
    """The CPU renders small images batched and large ones image by image (PER_SAMPLE_MIN_SIDE), for speed
    only: both strategies give the same tensor to the bit, so the choice changes no result."""
    stage = C.BatchColour(aug, [size])
    x = _images(32, size, seed=5).float() / 255
    p = stage.params(0, 32, C.colour_generator(1, 11))
    per_image = C.apply_colour(x, stage.recipes[0], p, per_sample=True)
    grouped = C.apply_colour(x, stage.recipes[0], p, per_sample=False)
    assert torch.equal(per_image, grouped)
    assert torch.equal(C.apply_colour(x, stage.recipes[0], p), per_image)  # the default choice, whichever it is


def test_full_recipe_close_to_todays_pil_pipeline(monkeypatch):
    """Against the pipeline the workers ran until now (PIL colour ops rounding to uint8 after each op, blur on
    the uint8 tensor), same parameters. PIL's hue goes through 8-bit HSV (hue quantised to 1/256 of a turn,
    saturation and value to 1/255), so single pixels can move several levels."""
    aug, size, n = {"pipeline": "v2"}, 32, 16
    stage = C.BatchColour(aug, [size])
    x = _images(n, size, seed=5)
    p = stage.params(0, n, C.colour_generator(1, 2))
    got = C.apply_colour(x.float() / 255, stage.recipes[0], p) * 255
    pipe = standard_pipeline(aug, size, flip=False, to_float=False)
    refs = []
    with monkeypatch.context() as m:
        for i in range(n):
            _force(m, p, i, stage.recipes[0])
            refs.append(pipe(Image.fromarray(x[i].permute(1, 2, 0).numpy())).float())
    diff = (got - torch.stack(refs)).abs()
    # measured: mean 1.2, 99th percentile 5.9 levels (PIL's truncating blends alone give a mean of ~0.4, its
    # 8-bit hue ~1 on these saturated noise images). A wrong recipe fails both bounds: grayscale before the
    # jitter gives 2.7 / 34, the hue shift's sign flipped 14.6 / 138, a blur kernel 2 taps too wide 2.1 / 18.
    assert float(diff.mean()) < 1.5 and float(diff.quantile(0.99)) <= 8.0, (diff.mean(), diff.quantile(0.99))


def test_autoaugmented_samples_are_only_normalised():
    stage = C.BatchColour({"pipeline": "v2"}, [16, 16])
    x = [_images(8, 16, seed=s) for s in (0, 1)]
    aa = [torch.zeros(8, dtype=torch.bool), torch.tensor([True, False] * 4)]
    out = stage(x, C.colour_generator(0, 0), autoaug=aa)
    plain = stage.normalize(x[1].float() / 255)
    torch.testing.assert_close(out[1][aa[1]], plain[aa[1]], atol=1e-6, rtol=0)
    assert not torch.allclose(out[1][~aa[1]], plain[~aa[1]])  # the others got colour (P(no-op) is tiny)


# ------------------------------------------------------------------------------------- distributions


def _sample(aug, n=20000, seed=0):
    stage = C.BatchColour(aug, [64])
    return stage.recipes[0], stage.params(0, n, C.colour_generator(seed, 0))


def _assert_uniform(v: torch.Tensor, lo: float, hi: float) -> None:
    """Support, mean and variance of U(lo, hi), each to ~5 standard errors (n = 20000)."""
    v, n, w = v.double(), v.numel(), hi - lo
    assert lo <= float(v.min()) < lo + 0.01 * w and hi - 0.01 * w < float(v.max()) <= hi
    assert abs(float(v.mean()) - (lo + hi) / 2) < 5 * w / math.sqrt(12 * n)
    assert abs(float(v.var()) / (w * w / 12) - 1) < 5 * math.sqrt(0.8 / n)  # var of s^2/sigma^2 ~ 0.8/n


def _assert_rate(mask: torch.Tensor, p: float) -> None:
    n = mask.numel()
    tol = 5 * math.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(float(mask.double().mean()) - p) <= tol, (float(mask.double().mean()), p)


def _torchvision_recipe(aug):
    """ColorJitter ranges, p's and sigma range read off ``standard_pipeline``'s torchvision objects."""
    out = {"jitter_p": 1.0, "gray_p": None, "blur_p": 0.0, "sigma": None}
    for t in standard_pipeline(aug, 64).transforms:
        inner = t.transforms if isinstance(t, T.RandomApply) else [t]
        for op in inner:
            if isinstance(op, T.ColorJitter):
                out["jitter"] = (op.brightness, op.contrast, op.saturation, op.hue)
                if isinstance(t, T.RandomApply):
                    out["jitter_p"] = t.p
            elif isinstance(op, T.RandomGrayscale):
                out["gray_p"] = op.p
            elif isinstance(op, T.GaussianBlur):
                out["blur_p"], out["sigma"] = t.p, op.sigma
                assert op.kernel_size == (blur_kernel_size(64),) * 2
    return out


@pytest.mark.parametrize("aug", [{"pipeline": "v2"}, {"pipeline": "v1"}, {"pipeline": "v2", "blur": False}],
                         ids=["v2", "v1", "v2-noblur"])
def test_parameter_distributions_match_torchvision_recipe(aug):
    recipe, p = _sample(aug)
    tv = _torchvision_recipe(aug)
    for k, (lo, hi) in enumerate(tv["jitter"]):
        _assert_uniform(p.factors[:, k], lo, hi)
    _assert_rate(p.jitter, tv["jitter_p"])
    _assert_rate(p.gray, tv["gray_p"])
    _assert_rate(p.blur, tv["blur_p"])
    assert recipe.kernel_size == blur_kernel_size(64)
    if tv["sigma"] is not None:
        _assert_uniform(p.sigma, *tv["sigma"])
    # the draws are independent of each other (e.g. gray does not depend on jitter)
    if tv["jitter_p"] < 1:
        _assert_rate(p.gray[p.jitter], tv["gray_p"])


def test_expected_moco_numbers():
    """The recipe itself, spelled out (the torchvision objects above are read from the same study.augment)."""
    _, p = _sample({"pipeline": "v2"})
    _assert_rate(p.jitter, 0.8)
    _assert_rate(p.gray, 0.2)
    _assert_rate(p.blur, 0.5)
    for k in range(3):
        _assert_uniform(p.factors[:, k], 0.6, 1.4)
    _assert_uniform(p.factors[:, 3], -0.1, 0.1)
    _assert_uniform(p.sigma, 0.1, 2.0)
    _, p1 = _sample({"pipeline": "v1"})
    _assert_uniform(p1.factors[:, 3], -0.4, 0.4)
    assert bool(p1.jitter.all()) and not bool(p1.blur.any())


def test_jitter_orders_are_uniform_permutations():
    _, p = _sample({"pipeline": "v2"}, n=24000)
    order = p.order.numpy()
    assert (np.sort(order, axis=1) == np.arange(4)).all()
    counts = Counter(map(tuple, order))
    assert set(counts) == set(itertools.permutations(range(4)))
    expected = len(order) / 24
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 60, chi2  # 23 degrees of freedom: P(chi2 > 60) ~ 3e-5 for a uniform order
    # each op is equally likely at each position
    for pos in range(4):
        _assert_rate(torch.from_numpy(order[:, pos] == 3), 0.25)


# ---------------------------------------------------------------------------------------------- seeding


def test_same_seed_same_output_other_step_or_rank_differs():
    stage = C.BatchColour({"pipeline": "v2"}, [24, 24, 12])
    views = [_images(8, s, seed=i) for i, s in enumerate([24, 24, 12])]
    a = stage(views, C.colour_generator(3, 10))
    b = stage(views, C.colour_generator(3, 10))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    for other in (C.colour_generator(3, 11), C.colour_generator(3, 10, rank=1), C.colour_generator(4, 10)):
        c = stage(views, other)
        assert not torch.equal(a[0], c[0])
    assert [tuple(v.shape) for v in a] == [(8, 3, 24, 24), (8, 3, 24, 24), (8, 3, 12, 12)]
    assert all(v.dtype == torch.float32 for v in a)


def test_bad_inputs_are_clear_errors():
    stage = C.BatchColour({}, [16, 16])
    with pytest.raises(ValueError, match="built for 2 views"):
        stage([_images(2, 16)], C.colour_generator(0, 0))
    with pytest.raises(ValueError, match="expected uint8"):
        stage([_images(2, 16).float()] * 2, C.colour_generator(0, 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu_given_the_same_parameters():
    stage = C.BatchColour({"pipeline": "v2"}, [64])
    x = _images(16, 64)
    p = stage.params(0, 16, C.colour_generator(0, 0))
    cpu = stage.render(0, x, p)
    moved = C.ColourParams(**{k: v.cuda() for k, v in vars(p).items()})
    gpu = stage.render(0, x.cuda(), moved).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=0)
    g = C.colour_generator(0, 5, device="cuda")
    out = stage([x.cuda()], g)
    assert out[0].device.type == "cuda" and out[0].dtype == torch.float32


def test_params_follow_the_views_device_and_match_apply_colour():
    stage = C.BatchColour({"pipeline": "v2"}, [16])
    x = _images(4, 16)
    p = stage.params(0, 4, C.colour_generator(0, 1))
    want = stage.normalize(C.apply_colour(x.float().mul(1 / 255), stage.recipes[0], p))
    torch.testing.assert_close(stage.render(0, x, p), want, atol=0, rtol=0)
