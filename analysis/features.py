"""Frozen-feature extraction with an on-disk cache, one file per (checkpoint, dataset split, transform).

Several protocols read the same features (linear probe, kNN and CAMs all use the pooled train features), and
a fan-out of transfer jobs per checkpoint would otherwise run the backbone again and again. The cache key holds
the checkpoint's sha256 (not its path or mtime: a retrained checkpoint at the same path must miss), the split's
item fingerprint and every transform setting, so a stale hit is impossible by construction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from analysis.target_settings import IMAGENET_MEAN, IMAGENET_STD
from analysis.targets import ImageSplit, SegmentationSplit
from data_prep.records import atomic_write_text, temp_for
from study.runstate import first_line

log = logging.getLogger(__name__)

CACHE_VERSION = 1
LAYERS = ("layer1", "layer2", "layer3", "layer4")


class CheckpointArchError(ValueError):
    """The checkpoint's backbone architecture is not the one the target / experiment asks for."""


@dataclass(frozen=True)
class FeatureSpec:
    """How features are computed from images.

    ``pooled``: global average-pooled layer4 feature (the backbone's output) or a spatial map of ``layer``.
    ``crop``: Resize(s * resize_ratio) -> CenterCrop(s) (classification protocols) or a plain Resize to
    ``size`` (dense protocols, so the map covers the whole image and aligns with its label map).
    ``stride``: the largest output stride allowed for spatial maps; strides of the deepest layers are set to 1
    until the map is at most that coarse (videowalk-style, no dilation); ``None`` keeps the backbone's own.
    """

    size: int | tuple[int, int] = 224
    pooled: bool = True
    crop: bool = True
    resize_ratio: float = 256 / 224  # ~1.14: Resize 256 -> CenterCrop 224 exactly at s = 224
    layer: str = "layer4"
    stride: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    store_dtype: str = "float32"
    # Fingerprint of the split whose images re-estimate the BN running statistics before extraction (None: use
    # the checkpoint's own). Optional because the paper's protocol keeps them; see ``recalibrate_bn``.
    bn_calib: str | None = None

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise ValueError(f"feature layer {self.layer!r} is not one of {LAYERS}")
        if self.store_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"store_dtype {self.store_dtype!r} must be float32, float16 or bfloat16")

    def transform(self) -> T.Compose:
        norm = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        if self.crop:
            s = self.size if isinstance(self.size, int) else min(self.size)
            return T.Compose([T.Resize(int(round(s * self.resize_ratio))), T.CenterCrop(s), *norm])
        hw = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
        return T.Compose([T.Resize(hw), *norm])

    def key_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size) if not isinstance(self.size, int) else self.size
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.pooled:  # the pooled feature is always layer4's average: layer/stride do not apply
            d.pop("layer"), d.pop("stride")
        if not self.crop:
            d.pop("resize_ratio")
        if self.bn_calib is None:  # keeps the cache keys of the default protocol unchanged
            d.pop("bn_calib")
        return d


# ------------------------------------------------------------------------------------------- checkpoints


def file_sha256(path: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 of a file, hashed once: the digest is stored in ``cache_dir/checkpoints/`` with the file's size,
    mtime and inode, and reused while all are unchanged (an atomic rewrite changes the inode)."""
    path = Path(path).resolve()
    st = path.stat()
    sidecar = None
    if cache_dir is not None:
        sidecar = (
            Path(cache_dir) / "checkpoints" / (hashlib.sha1(str(path).encode()).hexdigest()[:16] + ".json")
        )
        with contextlib.suppress(OSError, ValueError):
            rec = json.loads(sidecar.read_text())
            if rec["stat"] == [str(path), st.st_size, st.st_mtime_ns, st.st_ino]:
                return str(rec["sha256"])
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    if sidecar is not None:
        rec = {"stat": [str(path), st.st_size, st.st_mtime_ns, st.st_ino], "sha256": digest}
        atomic_write_text(sidecar, json.dumps(rec))
    return digest


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (the feature cache's content check)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def read_checkpoint(path: str | Path, expect_arch: str | None = None, target: str | None = None) -> dict:
    """Load a backbone checkpoint (``weights_only=True``) and check its architecture against ``expect_arch``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pretrain it first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors vary with the content (torch's run to 65 lines); name the file
        raise ValueError(
            f"checkpoint {path} cannot be read with torch.load(weights_only=True) ({first_line(exc, limit=160)}); "
            "remake it (`snakemake --forcerun pretrain <checkpoint>` for a pipeline checkpoint) or pass a valid file"
        ) from exc
    if not isinstance(ckpt, Mapping) or "backbone" not in ckpt or "arch" not in ckpt:
        raise ValueError(f"checkpoint {path} lacks the 'backbone' / 'arch' entries of a backbone checkpoint")
    if expect_arch is not None and str(ckpt["arch"]) != str(expect_arch):
        who = f"target {target!r}" if target else "the experiment"
        raise CheckpointArchError(
            f"checkpoint {path} holds a {ckpt['arch']} backbone but {who} expects {expect_arch}; "
            f"evaluate a {expect_arch} checkpoint or set the target's `arch` to {ckpt['arch']}"
        )
    return dict(ckpt)


def build_backbone_from_checkpoint(ckpt: Mapping[str, Any]) -> nn.Module:
    """torchvision ResNet (fc = Identity) holding the checkpoint's weights; ``study.models`` rebuilds it, so the
    stem and width definitions stay in one place."""
    from study.models import load_backbone

    net, _ = load_backbone(ckpt)
    return net


def _as_int(v: Any) -> int:
    return int(v[0]) if isinstance(v, (tuple, list)) else int(v)


def set_output_stride(net: nn.Module, layer: str, max_stride: int | None) -> int:
    """Set the strides of the deepest stages up to ``layer`` to 1 until its output stride is <= max_stride;
    returns the resulting stride (the backbone's own when it is already fine enough)."""
    names = LAYERS[: LAYERS.index(layer) + 1]
    stem = _as_int(net.conv1.stride) * (
        _as_int(net.maxpool.stride) if isinstance(net.maxpool, nn.MaxPool2d) else 1
    )
    strides = {n: _as_int(getattr(net, n)[0].stride) for n in names}
    total = stem
    for s in strides.values():
        total *= s
    for name in reversed(names):
        if max_stride is None or total <= max_stride:
            break
        block = getattr(net, name)[0]
        s = strides[name]
        if s == 1:
            continue
        conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck strides its 3x3 conv2
        conv.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
        block.stride = 1
        total //= s
    return total


def forward_map(net: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """Spatial output of ``layer`` of a torchvision ResNet."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    for name in LAYERS[: LAYERS.index(layer) + 1]:
        x = getattr(net, name)(x)
    return x


def _run_model(net: nn.Module, x: torch.Tensor, spec: FeatureSpec) -> torch.Tensor:
    """One forward pass (a module-level function so tests can count calls)."""
    return net(x) if spec.pooled else forward_map(net, x, spec.layer)


# ----------------------------------------------------------------------------------------------- extractor


class _Images(Dataset):
    def __init__(self, split: ImageSplit | SegmentationSplit, transform: T.Compose):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.split.load(i))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def auto_device(device: str | None = None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@torch.no_grad()
def recalibrate_bn(net: nn.Module, batches: Any, device: torch.device | str = "cpu") -> int:
    """Replace every BN layer's running statistics by the exact average over ``batches``; weights untouched.

    Frozen-feature protocols run the backbone in eval mode, i.e. with the statistics collected on the
    pretraining crops. When the target's resolution or domain differs (the embedded study: 48 px training
    crops, 64 px targets; an untrained network keeps the identity statistics), re-estimating them on the
    target's train split compares backbones rather than BN bookkeeping. Returns the number of images seen.
    """
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over all batches
    net.train()
    n = 0
    for x in batches:
        net(x.to(device))
        n += x.shape[0]
    net.eval()
    if n == 0:
        raise ValueError("recalibrate_bn got no images: the calibration split is empty")
    return n


class FeatureExtractor:
    """Frozen features of one checkpoint, computed on demand and cached under ``cache_dir``.

    The checkpoint is read (and its architecture checked) at construction; the network itself is built only on
    a cache miss, once per (layer, stride) configuration.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        cache_dir: str | Path,
        *,
        expect_arch: str | None = None,
        target: str | None = None,
        device: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        progress: bool = True,
    ):
        self.checkpoint = Path(checkpoint)
        self.cache_dir = Path(cache_dir)
        self._ckpt = read_checkpoint(self.checkpoint, expect_arch, target)
        self.arch = str(self._ckpt["arch"])
        self.sha256 = file_sha256(self.checkpoint, self.cache_dir)
        self.device = auto_device(device)
        self.batch_size, self.num_workers, self.progress = int(batch_size), int(num_workers), progress
        self._nets: dict[tuple[str, int | None], tuple[nn.Module, int]] = {}
        self.hits = self.misses = 0

    def network(self, spec: FeatureSpec, calib: ImageSplit | SegmentationSplit | None = None) -> tuple[nn.Module, int]:
        """Eval-mode backbone for ``spec`` and the output stride of its spatial maps."""
        key = ("pooled", None, spec.bn_calib) if spec.pooled else (spec.layer, spec.stride, spec.bn_calib)
        if key not in self._nets:
            net = build_backbone_from_checkpoint(self._ckpt)
            stride = set_output_stride(
                net, "layer4" if spec.pooled else spec.layer, None if spec.pooled else spec.stride
            )
            net = net.to(self.device)
            if self.device.type == "cuda":
                net = net.to(memory_format=torch.channels_last)
            if spec.bn_calib is not None:
                if calib is None or calib.fingerprint != spec.bn_calib:
                    raise ValueError("FeatureSpec.bn_calib is set: pass the calibration split it names")
                loader = DataLoader(_Images(calib, spec.transform()), batch_size=self.batch_size,
                                    num_workers=self.num_workers)
                n = recalibrate_bn(net, loader, self.device)
                log.info("re-estimated BN statistics of %s on %d images of %s/%s", self.checkpoint, n,
                         calib.target, calib.split)
            self._nets[key] = (net.eval(), stride)
        return self._nets[key]

    def cache_path(self, split: ImageSplit | SegmentationSplit, spec: FeatureSpec) -> Path:
        # The target key is deliberately not part of the key: a linear and a kNN target on the same data share
        # features. The item fingerprint (absolute paths) identifies the data.
        key = {
            "version": CACHE_VERSION,
            "checkpoint_sha256": self.sha256,
            "split": split.split,
            "items": split.fingerprint,
            "n": len(split),
            "spec": spec.key_dict(),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        kind = "pooled" if spec.pooled else f"{spec.layer}"
        data = _safe(Path(split.source).name if split.source else split.target)
        return self.cache_dir / self.sha256[:16] / data / f"{_safe(split.split)}__{kind}__{digest}.pt"

    def get(self, split: ImageSplit | SegmentationSplit, spec: FeatureSpec,
            calib: ImageSplit | SegmentationSplit | None = None) -> dict[str, Any]:
        """``{"features": (N, D) or (N, C, h, w) tensor, "stride": int, "sha256": str}``, cached.

        ``calib``: the split named by ``spec.bn_calib`` (needed only when it is set and not cached).
        """
        path = self.cache_path(split, spec)
        if path.is_file():
            problem = None
            try:
                blob = torch.load(path, map_location="cpu", weights_only=True)
                if blob.get("sha256") != self.sha256 or blob["features"].shape[0] != len(split):
                    problem = "it belongs to another checkpoint or split"
                elif "content_sha256" not in blob:
                    problem = "it has no content hash (written before they were stored)"
                elif tensor_sha256(blob["features"]) != blob["content_sha256"]:
                    problem = "its feature tensor does not match the content hash written with it (edited or damaged)"
                else:
                    self.hits += 1
                    return blob
            except Exception as exc:  # a torn or foreign file: recompute and overwrite it
                problem = f"it is unreadable ({first_line(exc)})"
            log.warning("feature cache %s: %s; recomputing", path, problem)
        self.misses += 1
        feats, stride = self._compute(split, spec, calib)
        blob = {
            "features": feats,
            "stride": stride,
            "sha256": self.sha256,
            "spec": json.dumps(spec.key_dict()),
            "content_sha256": tensor_sha256(feats),  # checked on every read: any change to the tensor is caught
        }
        tmp = temp_for(path)  # per process: another job may be writing the same cache entry
        try:
            torch.save(blob, tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return blob

    @torch.no_grad()
    def _compute(self, split: ImageSplit | SegmentationSplit, spec: FeatureSpec,
                 calib: ImageSplit | SegmentationSplit | None = None) -> tuple[torch.Tensor, int]:
        net, stride = self.network(spec, calib)
        loader = DataLoader(
            _Images(split, spec.transform()),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        cuda = self.device.type == "cuda"
        out = []
        desc = f"features {split.target}/{split.split} ({'pooled' if spec.pooled else spec.layer})"
        for x in tqdm(loader, desc=desc, disable=not self.progress, mininterval=5):
            x = x.to(self.device, non_blocking=True)
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
            with ctx:
                y = _run_model(net, x, spec)
            out.append(y.float().cpu().to(getattr(torch, spec.store_dtype)))
        return torch.cat(out), stride
