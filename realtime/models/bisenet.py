"""BiSeNet V1 (Yu et al., ECCV 2018) with a (half-width) ResNet-18 context path, built from scratch.

A spatial path (three stride-2 convs, 1/8 resolution, rich detail) and a context path (ResNet-18
to 1/32 with attention refinement and a global-context vector) joined by a feature fusion module.
Z-Mask layer names (the paper's BiSeNet-X39 set, mapped to our modules):
  spatial_path.conv_7x7, spatial_path.conv_1x1   the spatial path's first and last conv
  context_level1 -> ``context_path.head32``       1/32 context refined and upsampled to 1/16
  context_level2 -> ``context_path.head16``       1/16 context refined and upsampled to 1/8
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .base import BasicBlock, LayerSpec, SegmentationModel, conv_bn_relu, init_weights, make_stage


class ResNet18(nn.Module):
    """ResNet-18 trunk (channels scaled by ``width``) returning the 1/16 and 1/32 feature maps."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c = [int(64 * width * m) for m in (1, 1, 2, 4, 8)]
        self.channels = c
        self.stem = nn.Sequential(conv_bn_relu(3, c[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        self.layer1 = make_stage(BasicBlock, c[0], c[1], 2, last_relu=True)
        self.layer2 = make_stage(BasicBlock, c[1], c[2], 2, stride=2, last_relu=True)
        self.layer3 = make_stage(BasicBlock, c[2], c[3], 2, stride=2, last_relu=True)
        self.layer4 = make_stage(BasicBlock, c[3], c[4], 2, stride=2, last_relu=True)

    def forward(self, x: torch.Tensor):
        x = self.layer2(self.layer1(self.stem(x)))
        f16 = self.layer3(x)
        return f16, self.layer4(f16)


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(cin, cout, 3)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cout, cout, 1, bias=False),
                                       nn.BatchNorm2d(cout), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x * self.attention(x)


class SpatialPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_7x7 = conv_bn_relu(3, 64, 7, 2)
        self.conv_3x3_1 = conv_bn_relu(64, 64, 3, 2)
        self.conv_3x3_2 = conv_bn_relu(64, 64, 3, 2)
        self.conv_1x1 = conv_bn_relu(64, 128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_1x1(self.conv_3x3_2(self.conv_3x3_1(self.conv_7x7(x))))


class ContextPath(nn.Module):
    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        self.backbone = ResNet18(width)
        c16, c32 = self.backbone.channels[3:]
        self.arm16 = AttentionRefinement(c16, 128)
        self.arm32 = AttentionRefinement(c32, 128)
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(c32, 128, 1))
        self.head32 = conv_bn_relu(128, 128, 3)
        self.head16 = conv_bn_relu(128, 128, 3)

    def forward(self, x: torch.Tensor, size8):
        f16, f32 = self.backbone(x)
        c32 = self.arm32(f32) + self.global_context(f32)
        c32 = self.head32(F.interpolate(c32, size=f16.shape[-2:], mode="nearest"))
        c16 = self.arm16(f16) + c32
        c16 = self.head16(F.interpolate(c16, size=size8, mode="nearest"))
        return c16, c32


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(cin, cout, 1)
        self.attention = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cout, cout // 4, 1),
                                       nn.ReLU(inplace=True), nn.Conv2d(cout // 4, cout, 1), nn.Sigmoid())

    def forward(self, sp: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.cat([sp, cp], 1))
        return x + x * self.attention(x)


class Head(nn.Sequential):
    def __init__(self, cin: int, mid: int, num_classes: int) -> None:
        super().__init__(conv_bn_relu(cin, mid, 3), nn.Dropout2d(0.1), nn.Conv2d(mid, num_classes, 1))


class BiSeNetV1(SegmentationModel):
    arch = "bisenetv1"
    aux_weights = (1.0, 1.0)

    def __init__(self, num_classes: int = 11, width: float = 1.0, **kw) -> None:
        super().__init__(num_classes, **kw)
        self.spatial_path = SpatialPath()
        self.context_path = ContextPath(width)
        self.ffm = FeatureFusion(256, 256)
        self.head = Head(256, 128, num_classes)
        self.aux16 = Head(128, 64, num_classes)
        self.aux32 = Head(128, 64, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        x = self.normalize(x)
        sp = self.spatial_path(x)
        c16, c32 = self.context_path(x, sp.shape[-2:])
        out = F.interpolate(self.head(self.ffm(sp, c16)), size=size, mode="bilinear", align_corners=False)
        if self.training:
            aux = [F.interpolate(h(f), size=size, mode="bilinear", align_corners=False)
                   for h, f in ((self.aux16, c16), (self.aux32, c32))]
            return out, aux
        return out

    def layers(self) -> LayerSpec:
        aliases = {"context_level1": "context_path.head32", "context_level2": "context_path.head16"}
        return LayerSpec(
            shallow=("spatial_path.conv_1x1", "spatial_path.conv_7x7", "context_path.head16"),
            deep=("context_path.head32", "context_path.head16", "spatial_path.conv_1x1"),
            candidates=("spatial_path.conv_7x7", "spatial_path.conv_3x3_1", "spatial_path.conv_3x3_2",
                        "spatial_path.conv_1x1", "context_path.backbone.layer1",
                        "context_path.backbone.layer2", "context_path.backbone.layer3",
                        "context_path.backbone.layer4", "context_path.head32", "context_path.head16", "ffm"),
            aliases=aliases)


@register_model("bisenetv1", description="BiSeNet V1, spatial path + half-width ResNet-18 context path")
def build_bisenetv1(num_classes: int = 11) -> BiSeNetV1:
    """BiSeNet V1 with a half-width ResNet-18 context path (32-256 channels, 4.2 M parameters in all):
    keeps the shipped fp16 weights near 8 MB (the full-width trunk: 13.4 M, 27 MB) and the CPU path fast."""
    return BiSeNetV1(num_classes=num_classes, width=0.5)
