"""Dense-prediction models built on a pretrained backbone, for fine-tuned transfer (paper Tables 3 and 9).

* Segmentation: FCN on a dilated ResNet (REFERENCE.md "Transfer protocols": layer4 stride 1 dilation 2; head two
  3x3 convs of 256 channels with BN + ReLU, dilation 6 for VOC and 1 for Cityscapes, then a 1x1 classifier).
* Detection: Faster R-CNN R50-C4, MoCo's detectron2 setup (facebookresearch/moco detection/configs): the backbone
  is the stem + layer1-3 (C4, stride 16), RoIAlign 14x14 on it, the box head is layer4 followed by the extra BN
  of MoCo's ``Res5ROIHeadsExtraNorm`` and global pooling; one-level anchors of sizes 32-512 and ratios 0.5/1/2.
  Built from torchvision's FasterRCNN parts, with every BN trained ("BN tuned", MoCo Sec. 4.2), not frozen.
* Depth: the fully convolutional residual network of Laina et al. (2016): the ResNet encoder, a 1x1 conv + BN
  halving the channels, four up-projection blocks (2x zero-filling unpooling; 5x5 conv, BN, ReLU, 3x3 conv, BN;
  plus a 5x5 conv + BN projection; sum, ReLU), a 3x3 conv to one channel, bilinear to the input size.

Every model takes the backbone that ``study.models.load_backbone`` rebuilds (a torchvision ResNet, any width,
with or without the small-input stem), so the embedded scale model and a ResNet-50 share one code path.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _trunk(net: nn.Module, upto: str) -> nn.Sequential:
    """The ResNet's stem and stages up to ``upto`` as one module (shares the backbone's parameters)."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names[: names.index(upto) + 1]))


def stage_channels(net: nn.Module, stage: str) -> int:
    """Output channels of a ResNet stage (the last BN of its last block)."""
    bns = [m for m in getattr(net, stage).modules() if isinstance(m, nn.BatchNorm2d)]
    return int(bns[-1].num_features)


def dilate_layer4(net: nn.Module, dilation: int = 2) -> nn.Module:
    """layer4 at stride 1 with dilated 3x3 convs, in place (the segmentation backbone of the paper).

    Same rule as torchvision's ``replace_stride_with_dilation=[False, False, True]``: the first block loses its
    stride (conv and shortcut) and keeps dilation 1 in its first 3x3 conv; every later 3x3 conv gets
    ``dilation`` (padding = dilation, so sizes are kept). Applied to the loaded weights, it works for basic
    blocks too, which torchvision's builder refuses.
    """
    first = True
    for block in net.layer4:
        for name in ("conv1", "conv2", "conv3"):
            conv = getattr(block, name, None)
            if conv is None:
                continue
            if conv.kernel_size == (3, 3):
                if first:
                    conv.stride, first = (1, 1), False
                else:
                    conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
            elif conv.stride != (1, 1):  # bottleneck's strided conv is conv2 (3x3); keep 1x1 convs at stride 1
                conv.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
    return net


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1, relu: bool = True) -> list[nn.Module]:
    pad = dilation * (k // 2)
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                               nn.BatchNorm2d(cout)]  # fmt: skip
    return layers + ([nn.ReLU(inplace=True)] if relu else [])


class FCN(nn.Module):
    """Dilated ResNet + FCN head; logits upsampled bilinearly to the input size."""

    def __init__(self, backbone: nn.Module, n_classes: int, head_channels: int = 256, head_dilation: int = 6,
                 dilate: bool = True) -> None:  # fmt: skip
        super().__init__()
        if dilate:
            dilate_layer4(backbone)
        cin = stage_channels(backbone, "layer4")
        self.trunk = _trunk(backbone, "layer4")
        self.head = nn.Sequential(
            *_conv_bn_relu(cin, head_channels, 3, head_dilation),
            *_conv_bn_relu(head_channels, head_channels, 3, head_dilation),
            nn.Conv2d(head_channels, n_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(self.trunk(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


class _C4(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.body = _trunk(backbone, "layer3")
        self.out_channels = stage_channels(backbone, "layer3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Res5Head(nn.Module):
    """layer4 on each 14x14 RoI feature (stride 2 -> 7x7), MoCo's extra BN, global average pooling."""

    def __init__(self, layer4: nn.Module, channels: int) -> None:
        super().__init__()
        self.res5 = layer4
        self.norm = nn.BatchNorm2d(channels)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.res5(x))).mean(dim=(2, 3))


def faster_rcnn_c4(
    backbone: nn.Module, n_classes: int, *, min_size: int | Sequence[int] = 800, max_size: int = 1333,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512), mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225), **kwargs,
) -> nn.Module:  # fmt: skip
    """torchvision Faster R-CNN in detectron2's R50-C4 layout; ``n_classes`` excludes the background."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    c5 = stage_channels(backbone, "layer4")
    head = _Res5Head(backbone.layer4, c5)
    sizes = tuple(int(s) for s in (min_size if isinstance(min_size, Sequence) else [min_size]))
    return FasterRCNN(
        _C4(backbone), num_classes=None,
        rpn_anchor_generator=AnchorGenerator(sizes=(tuple(int(a) for a in anchor_sizes),),
                                             aspect_ratios=((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=14, sampling_ratio=0),
        box_head=head, box_predictor=FastRCNNPredictor(c5, n_classes + 1),
        min_size=sizes, max_size=int(max_size), image_mean=list(mean), image_std=list(std), **kwargs,
    )  # fmt: skip


def _unpool(x: torch.Tensor) -> torch.Tensor:
    """Laina et al.'s 2x unpooling: each value at the top-left of a 2x2 cell, zeros elsewhere."""
    out = x.new_zeros(x.shape[0], x.shape[1], x.shape[2] * 2, x.shape[3] * 2)
    out[:, :, ::2, ::2] = x
    return out


class UpProjection(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.main = nn.Sequential(*_conv_bn_relu(cin, cout, 5), *_conv_bn_relu(cout, cout, 3, relu=False))
        self.proj = nn.Sequential(*_conv_bn_relu(cin, cout, 5, relu=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _unpool(x)
        return F.relu(self.main(x) + self.proj(x))


class FCRN(nn.Module):
    """ResNet encoder + up-projection decoder -> depth (metres) at the input size."""

    def __init__(self, backbone: nn.Module, decoder_channels: int | None = None, n_up: int = 4) -> None:
        super().__init__()
        cin = stage_channels(backbone, "layer4")
        ch = int(decoder_channels or cin // 2)
        self.trunk = _trunk(backbone, "layer4")
        self.reduce = nn.Sequential(*_conv_bn_relu(cin, ch, 1, relu=False))
        ups = []
        for _ in range(n_up):
            ups.append(UpProjection(ch, max(ch // 2, 1)))
            ch = max(ch // 2, 1)
        self.up = nn.Sequential(*ups)
        self.pred = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pred(self.up(self.reduce(self.trunk(x))))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def berhu_loss(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Reverse Huber (Laina et al. Eq. 3): L1 below c, (x^2 + c^2) / 2c above, c = 0.2 max |residual| (batch)."""
    r = (pred - gt)[valid].abs()
    if r.numel() == 0:
        return pred.sum() * 0.0
    c = (0.2 * r.max()).detach().clamp_min(1e-6)
    return torch.where(r <= c, r, (r * r + c * c) / (2 * c)).mean()
