"""Backbones, heads and backbone checkpoints (tiny inputs, CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from study.models import (
    CheckpointError,
    Encoder,
    backbone_state,
    build_backbone,
    build_encoder,
    build_head,
    load_backbone,
)


@pytest.mark.parametrize("arch,feat", [("resnet18", 512), ("resnet50", 2048)])
def test_backbone_returns_pooled_feature(arch: str, feat: int) -> None:
    net, feat_dim = build_backbone(arch)
    assert feat_dim == feat and isinstance(net.fc, nn.Identity)
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, feat)


def test_backbone_pooled_matches_manual_stages() -> None:
    net, _ = build_backbone("resnet18")
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        h = net.layer4(net.layer3(net.layer2(net.layer1(h))))
        manual = h.mean(dim=(2, 3))
        assert torch.allclose(net(x), manual, atol=1e-5)


def test_small_input_stem_keeps_resolution() -> None:
    net, _ = build_backbone("resnet18", small_input=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    net.eval()
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(torch.randn(1, 3, 16, 16)))))
    assert h.shape[-2:] == (16, 16)  # the default stem would give 4x4


def test_heads_shapes() -> None:
    v1 = build_head(512, 128, mlp=False)
    v2 = build_head(2048, 128, mlp=True)
    assert isinstance(v1, nn.Linear) and (v1.in_features, v1.out_features) == (512, 128)
    linears = [m for m in v2 if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 2048), (2048, 128)]
    assert any(isinstance(m, nn.ReLU) for m in v2)


def test_encoder_outputs_normalised_embedding() -> None:
    enc = build_encoder({"arch": "resnet18", "small_input": False}, {"dim": 16, "mlp": True})
    enc.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        g, z = enc(x)
        assert g.shape == (3, 512) and z.shape == (3, 16)
        assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
        assert torch.allclose(z, F.normalize(enc.head(enc.backbone(x)), dim=1), atol=1e-6)


def test_checkpoint_roundtrip_weights_only(tmp_path) -> None:
    enc = Encoder("resnet18", small_input=True, dim=8)
    path = tmp_path / "ckpt.pt"
    torch.save({**backbone_state(enc), "epoch": 3, "method": "moco_v2"}, path)
    raw = torch.load(path, weights_only=True)  # must not need pickled classes
    assert {"backbone", "arch", "small_input", "feat_dim"} <= raw.keys()
    net, info = load_backbone(path, arch="resnet18")
    assert info == {"arch": "resnet18", "small_input": True, "feat_dim": 512, "width": 64, "epoch": 3,
                    "method": "moco_v2"}
    x = torch.randn(2, 3, 16, 16)
    enc.eval()
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), enc.backbone(x))


def test_wrong_arch_names_both(tmp_path) -> None:
    path = tmp_path / "r18.pt"
    torch.save(backbone_state(Encoder("resnet18", dim=8)), path)
    with pytest.raises(CheckpointError, match="resnet18.*resnet50"):
        load_backbone(path, arch="resnet50")
    with pytest.raises(CheckpointError, match="small_input"):
        load_backbone(path, small_input=True)


def test_bad_checkpoints_have_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_backbone(tmp_path / "missing.pt")
    state = backbone_state(Encoder("resnet18", dim=8))
    with pytest.raises(CheckpointError, match="lacks"):
        load_backbone({"backbone": state["backbone"]})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_backbone({**state, "backbone": {"conv1.weight": torch.zeros(1)}})
    with pytest.raises(ValueError, match="model.arch"):
        build_backbone("vgg11")


def test_narrow_resnet_is_a_proportional_torchvision_resnet_and_round_trips(tmp_path) -> None:
    """model.width: the embedded scale model; every stage narrows by width / 64, module names stay torchvision's."""
    full, fd = build_backbone("resnet18")
    narrow, nd = build_backbone("resnet18", width=16)
    assert (fd, nd) == (512, 128)
    assert [getattr(narrow, f"layer{i}")[0].conv1.out_channels for i in range(1, 5)] == [16, 32, 64, 128]
    n_full = sum(p.numel() for p in full.parameters())
    n_narrow = sum(p.numel() for p in narrow.parameters())
    assert 0.05 < n_narrow / n_full < 0.08  # ~ (16 / 64) ** 2 of the conv weights
    assert narrow(torch.randn(2, 3, 64, 64)).shape == (2, 128)
    enc = Encoder("resnet18", small_input=True, dim=8, width=16)
    path = tmp_path / "narrow.pt"
    torch.save(backbone_state(enc), path)
    net, info = load_backbone(path)
    assert info["width"] == 16 and info["feat_dim"] == 128
    x = torch.randn(2, 3, 16, 16)
    enc.eval()
    net.eval()
    assert torch.equal(net(x), enc.backbone(x))
    with pytest.raises(ValueError, match="model.width"):
        build_backbone("resnet18", width=10)
