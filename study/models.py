"""Backbones, projection heads and backbone checkpoints for MoCo-style pretraining.

The backbone is a torchvision ResNet with ``fc = Identity`` so that ``backbone(x)`` is the pooled feature that
every transfer protocol consumes. Checkpoints store only plain tensors and primitives next to the state dict so
they load with ``torch.load(weights_only=True)`` and the architecture can be rebuilt without the training config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

ARCH_FEAT_DIM: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
CHECKPOINT_KEYS = ("backbone", "arch", "small_input", "feat_dim")
BASE_WIDTH = 64  # torchvision's stem / layer1 width; layer k has BASE_WIDTH * 2**(k-1) channels


class CheckpointError(ValueError):
    """A checkpoint is unreadable, incomplete or of another architecture than the one requested."""


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read ``key`` from a DictConfig, a dict or None alike (the pieces accept both)."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def build_backbone(arch: str = "resnet18", small_input: bool = False, width: int = BASE_WIDTH) -> tuple[nn.Module, int]:
    """Randomly initialised torchvision ResNet returning pooled features; never downloads weights.

    ``small_input`` swaps the 7x7/2 stem and max-pool for a 3x3/1 conv (CIFAR-style) so 32-64 px crops keep
    enough spatial resolution in layer4. ``width`` < 64 narrows every stage in proportion (stem and layer1
    ``width``, layer4 ``8 * width`` channels for basic blocks): the embedded study's scale model, which can
    train for many more steps on 2 CPU cores than a full-width ResNet-18. Module names stay torchvision's, so
    every consumer (features, CAMs, dense heads) treats it as a ResNet.
    """
    if arch not in ARCH_FEAT_DIM:
        raise ValueError(f"model.arch={arch!r} is not supported; choose one of {sorted(ARCH_FEAT_DIM)}")
    width = int(width)
    if width < 4 or width % 4:
        raise ValueError(f"model.width={width}: use a multiple of 4, at least 4 (64 is torchvision's ResNet)")
    net = getattr(torchvision.models, arch)(weights=None)
    if width != BASE_WIDTH:
        block = type(net.layer1[0])
        depths = [len(getattr(net, f"layer{i}")) for i in range(1, 5)]
        net.inplanes = width
        net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        net.bn1 = nn.BatchNorm2d(width)
        for i, depth in enumerate(depths):
            # torchvision's own stage builder (downsample shortcut where shape changes), at the new widths
            setattr(net, f"layer{i + 1}", net._make_layer(block, width * 2**i, depth, stride=1 if i == 0 else 2))
        net.fc = nn.Linear(width * 8 * block.expansion, 1)
        for m in net.modules():  # torchvision's initialisation for the replaced modules
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    if small_input:
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, feat_dim


def build_head(feat_dim: int, dim: int = 128, mlp: bool = True) -> nn.Module:
    """MoCo v1 linear head (feat -> dim) or v2 MLP head (feat -> feat -> dim with ReLU)."""
    if mlp:
        return nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True), nn.Linear(feat_dim, dim))
    return nn.Linear(feat_dim, dim)


class Encoder(nn.Module):
    """Backbone + head; ``forward`` returns ``(g, z)``: pooled feature and L2-normalised float32 embedding.

    ``g`` is kept because kNN-MoCo mines neighbours in backbone space; ``z`` is normalised in float32 so the
    contrastive math is stable under bf16 autocast.
    """

    def __init__(self, arch: str = "resnet18", small_input: bool = False, dim: int = 128, mlp: bool = True,
                 width: int = BASE_WIDTH):
        super().__init__()
        self.arch = arch
        self.small_input = bool(small_input)
        self.width = int(width)
        self.backbone, self.feat_dim = build_backbone(arch, small_input, width)
        self.head = build_head(self.feat_dim, dim, mlp)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.backbone(x)
        z = F.normalize(self.head(g).float(), dim=1)
        return g, z


def build_encoder(model_cfg: Any, moco_cfg: Any) -> Encoder:
    """Encoder from the ``model`` ({arch, small_input, width}) and ``moco`` ({dim, mlp}) config groups."""
    return Encoder(
        arch=str(cfg_get(model_cfg, "arch", "resnet18")),
        small_input=bool(cfg_get(model_cfg, "small_input", False)),
        dim=int(cfg_get(moco_cfg, "dim", 128)),
        mlp=bool(cfg_get(moco_cfg, "mlp", True)),
        width=int(cfg_get(model_cfg, "width", BASE_WIDTH) or BASE_WIDTH),
    )


def backbone_state(encoder: Encoder) -> dict:
    """Checkpoint payload ``{"backbone", "arch", "small_input", "feat_dim", "width"}`` of plain tensors/primitives.

    Tensors are detached CPU copies so the payload is loadable with ``weights_only=True`` on any machine.
    """
    state = {k: v.detach().to("cpu", copy=True) for k, v in encoder.backbone.state_dict().items()}
    return {
        "backbone": state,
        "arch": str(encoder.arch),
        "small_input": bool(encoder.small_input),
        "feat_dim": int(encoder.feat_dim),
        "width": int(encoder.width),
    }


def load_backbone(
    path_or_state: str | os.PathLike | Mapping, arch: str | None = None, small_input: bool | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild a backbone from a checkpoint path or payload; returns ``(backbone, info)``.

    ``info`` holds every non-weight entry of the checkpoint (arch, small_input, feat_dim, trainer extras).
    ``arch`` / ``small_input``, when given, are what the caller expects; a mismatch raises CheckpointError
    naming both instead of an opaque state-dict shape error.
    """
    source = "<state dict>"
    if isinstance(path_or_state, (str, os.PathLike)):
        source = os.fspath(path_or_state)
        if not os.path.isfile(source):
            raise FileNotFoundError(f"backbone checkpoint {source} does not exist; pretrain it first")
        try:
            ckpt = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors vary by content; re-raise with the file name
            raise CheckpointError(
                f"{source}: cannot be read with torch.load(weights_only=True) ({exc}); "
                "checkpoints must hold only tensors, dicts, lists and primitives"
            ) from exc
    else:
        ckpt = path_or_state
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(ckpt).__name__}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{source}: checkpoint lacks {missing}; save it with study.models.backbone_state(encoder)"
        )
    saved_arch, saved_small = str(ckpt["arch"]), bool(ckpt["small_input"])
    if arch is not None and arch != saved_arch:
        raise CheckpointError(
            f"{source}: checkpoint holds a {saved_arch} backbone but {arch} was requested; "
            f"set model.arch={saved_arch} or point to a {arch} checkpoint"
        )
    if small_input is not None and bool(small_input) != saved_small:
        raise CheckpointError(
            f"{source}: checkpoint has small_input={saved_small} but small_input={bool(small_input)} was "
            f"requested; set model.small_input={saved_small}"
        )
    saved_width = int(ckpt.get("width", BASE_WIDTH))  # checkpoints from before model.width are full width
    net, feat_dim = build_backbone(saved_arch, saved_small, saved_width)
    if feat_dim != int(ckpt["feat_dim"]):
        raise CheckpointError(
            f"{source}: feat_dim {ckpt['feat_dim']} does not match {saved_arch} of width {saved_width} ({feat_dim})"
        )
    try:
        net.load_state_dict(ckpt["backbone"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{source}: weights do not fit a {saved_arch} (small_input={saved_small}) backbone: {exc}"
        ) from exc
    info = {k: v for k, v in ckpt.items() if k != "backbone"}
    return net, info
