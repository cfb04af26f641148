"""Per-view pipelines: recipe contents, A+ branch choice, key never AutoAugmented, tensor outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from omegaconf import OmegaConf
from PIL import Image

from study.augment import (
    AugConfigError,
    EitherPipeline,
    batch_normalizer,
    blur_kernel_size,
    standard_pipeline,
    view_pipelines,
)


def _img(size=64, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _ops(pipe):
    """All transform objects inside a Compose / RandomApply tree."""
    out = []
    for t in pipe.transforms:
        out.append(t)
        if isinstance(t, T.RandomApply):
            out.extend(t.transforms)
    return out


def test_blur_kernel_is_odd_tenth_of_size():
    for size in [16, 32, 64, 96, 160, 224]:
        k = blur_kernel_size(size)
        assert k % 2 == 1 and k >= 3 and abs(k - 0.1 * size) <= 1.5


def test_recipes():
    v2 = _ops(standard_pipeline({"pipeline": "v2"}, 64))
    jit = [t for t in v2 if isinstance(t, T.ColorJitter)]
    assert len(jit) == 1 and jit[0].hue == (-0.1, 0.1) and jit[0].brightness == (0.6, 1.4)
    blur = [t for t in v2 if isinstance(t, T.GaussianBlur)]
    assert len(blur) == 1 and blur[0].kernel_size == (7, 7) and blur[0].sigma == (0.1, 2.0)
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in v2)
    v1 = _ops(standard_pipeline({"pipeline": "v1"}, 64))
    assert [t for t in v1 if isinstance(t, T.ColorJitter)][0].hue == (-0.4, 0.4)
    assert not any(isinstance(t, T.GaussianBlur) for t in v1)
    assert not any(isinstance(t, T.GaussianBlur) for t in _ops(standard_pipeline({"blur": False}, 64)))
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in _ops(standard_pipeline({}, 64, flip=False)))
    with pytest.raises(AugConfigError):
        standard_pipeline({"pipeline": "v3"}, 64)


def test_outputs_and_batch_normalisation():
    torch.manual_seed(0)
    cfg = OmegaConf.create({"pipeline": "v2", "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]})
    full = standard_pipeline(cfg, 64)(_img())
    assert full.dtype == torch.float32 and full.shape == (3, 64, 64)
    raw = view_pipelines(cfg, [64, 64, 32])[2](_img(32))
    assert raw.dtype == torch.uint8 and raw.shape == (3, 32, 32)
    batch = torch.stack([raw, raw])
    want = (batch.double() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1).double()) / torch.tensor(
        [0.2, 0.25, 0.3]
    ).view(3, 1, 1).double()
    torch.testing.assert_close(batch_normalizer(cfg)(batch), want.float())


@pytest.fixture
def one_thread():
    """Tiny images: intra-op threads only add contention on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_key_never_autoaugmented_and_aplus_half(monkeypatch, one_thread):
    calls = {"n": 0}

    def spy(self, img):
        calls["n"] += 1
        return img

    monkeypatch.setattr(T.AutoAugment, "forward", spy)
    pipes = view_pipelines({"aplus": True, "aplus_p": 0.5}, [16, 16, 16, 16])
    assert not isinstance(pipes[0], EitherPipeline)
    assert all(isinstance(p, EitherPipeline) for p in pipes[1:])
    torch.manual_seed(0)
    img = _img(16)  # small: the standard branch's colour ops dominate the test time
    for _ in range(300):
        pipes[0](img)
    assert calls["n"] == 0
    n = 600
    for _ in range(n):
        pipes[1](img)
    # binomial(600, 0.5): 3.5 sigma ~ 43
    assert abs(calls["n"] - n / 2) < 45
    calls["n"] = 0
    off = view_pipelines({"aplus": False}, [16, 16])
    assert not any(isinstance(p, EitherPipeline) for p in off)
    for _ in range(50):
        off[1](img)
    assert calls["n"] == 0


def test_aplus_p_extremes(monkeypatch):
    seen = []
    monkeypatch.setattr(T.AutoAugment, "forward", lambda self, img: seen.append(1) or img)
    img = _img(32)
    view_pipelines({"aplus": True, "aplus_p": 1.0}, [32, 32])[1](img)
    assert not seen
    out = view_pipelines({"aplus": True, "aplus_p": 0.0}, [32, 32])[1](img)
    assert seen and out.dtype == torch.uint8
