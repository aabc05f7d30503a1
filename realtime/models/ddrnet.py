"""DDRNet-23-slim (Hong et al., 2021): two branches, high-resolution (1/8) and low-resolution
(down to 1/64), exchanging information through bilateral fusions, with a DAPPM context module.

Stage names used by Z-Mask (the paper hooks rb1, rb2, rbb1, rbb2). Our mapping to modules:
  rb1  -> ``layer3_``  residual blocks of the high-resolution branch in stage conv4 (1/8, 64 ch)
  rb2  -> ``layer4_``  residual blocks of the high-resolution branch in stage conv5_1 (1/8, 64 ch)
  rbb1 -> ``layer5_``  residual bottleneck block of the high-resolution branch (1/8, 128 ch)
  rbb2 -> ``layer5``   residual bottleneck block of the low-resolution branch (1/64, 512 ch)
"""
from __future__ import annotations

from typing import List, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model
from .base import BasicBlock, Bottleneck, LayerSpec, SegmentationModel, init_weights, make_stage


def _bn_relu_conv(cin: int, cout: int, k: int) -> List[nn.Module]:
    return [nn.BatchNorm2d(cin), nn.ReLU(inplace=True), nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)]


class DAPPM(nn.Module):
    """Deep Aggregation Pyramid Pooling Module: pooled context at 4 scales, aggregated hierarchically."""

    def __init__(self, cin: int, branch: int, cout: int) -> None:
        super().__init__()
        pools = [nn.AvgPool2d(5, 2, 2), nn.AvgPool2d(9, 4, 4), nn.AvgPool2d(17, 8, 8), nn.AdaptiveAvgPool2d(1)]
        self.scale0 = nn.Sequential(*_bn_relu_conv(cin, branch, 1))
        self.scales = nn.ModuleList(nn.Sequential(p, *_bn_relu_conv(cin, branch, 1)) for p in pools)
        self.process = nn.ModuleList(nn.Sequential(*_bn_relu_conv(branch, branch, 3)) for _ in pools)
        self.compression = nn.Sequential(*_bn_relu_conv(branch * 5, cout, 1))
        self.shortcut = nn.Sequential(*_bn_relu_conv(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = [self.scale0(x)]
        for scale, proc in zip(self.scales, self.process):
            up = F.interpolate(scale(x), size=size, mode="bilinear", align_corners=False)
            feats.append(proc(up + feats[-1]))
        return self.compression(torch.cat(feats, 1)) + self.shortcut(x)


class SegHead(nn.Sequential):
    def __init__(self, cin: int, mid: int, num_classes: int) -> None:
        super().__init__(*_bn_relu_conv(cin, mid, 3), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, num_classes, 1, bias=True))


class TrunkFeatures(NamedTuple):
    """DDRNet's branches after each fusion (strides for the input size)."""
    aux: torch.Tensor    # high-resolution branch after the conv4 fusion (the auxiliary head's input), 1/8
    lo4: torch.Tensor    # low-resolution branch after the conv4 fusion, 1/16
    lo5: torch.Tensor    # low-resolution branch after the conv5_1 fusion, 1/32
    hi: torch.Tensor     # high-resolution branch after layer5_ (rbb1), 1/8
    ctx: torch.Tensor    # DAPPM context of layer5 (rbb2), upsampled to 1/8


def ddrnet_trunk(m: nn.Module, x: torch.Tensor) -> TrunkFeatures:
    """The two-branch trunk on a normalised input. ``m`` holds DDRNet's stage modules under DDRNet's names:
    the segmenter itself, or a detector body sharing them (``realtime.models.detectors.DDRNetPyramid``)."""
    x = m.layer1(m.conv1(x))
    l2 = m.layer2(m.relu(x))
    l3 = m.layer3(m.relu(l2))
    hi = m.layer3_(m.relu(l2))
    hsize = hi.shape[-2:]
    lo = l3 + m.down3(m.relu(hi))
    hi = hi + F.interpolate(m.compression3(m.relu(l3)), size=hsize, mode="bilinear", align_corners=False)
    aux, lo4 = hi, lo
    l4 = m.layer4(m.relu(lo))
    hi = m.layer4_(m.relu(hi))
    lo = l4 + m.down4(m.relu(hi))
    hi = hi + F.interpolate(m.compression4(m.relu(l4)), size=hsize, mode="bilinear", align_corners=False)
    lo5 = lo
    hi = m.layer5_(m.relu(hi))
    ctx = F.interpolate(m.spp(m.layer5(m.relu(lo))), size=hsize, mode="bilinear", align_corners=False)
    return TrunkFeatures(aux, lo4, lo5, hi, ctx)


class DDRNet(SegmentationModel):
    """DDRNet-23 family; ``planes=32`` is the slim variant (~5.7 M parameters)."""

    arch = "ddrnet23_slim"
    aux_weights = (0.4,)

    def __init__(self, num_classes: int = 11, planes: int = 32, spp_planes: int = 128,
                 head_planes: int = 64, **kw) -> None:
        super().__init__(num_classes, **kw)
        p, hp = planes, planes * 2
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, p, 3, 2, 1, bias=False), nn.BatchNorm2d(p), nn.ReLU(inplace=True),
            nn.Conv2d(p, p, 3, 2, 1, bias=False), nn.BatchNorm2d(p), nn.ReLU(inplace=True))
        self.relu = nn.ReLU(inplace=False)
        self.layer1 = make_stage(BasicBlock, p, p, 2)
        self.layer2 = make_stage(BasicBlock, p, p * 2, 2, stride=2)
        self.layer3 = make_stage(BasicBlock, p * 2, p * 4, 2, stride=2)
        self.layer4 = make_stage(BasicBlock, p * 4, p * 8, 2, stride=2)
        self.compression3 = nn.Sequential(nn.Conv2d(p * 4, hp, 1, bias=False), nn.BatchNorm2d(hp))
        self.compression4 = nn.Sequential(nn.Conv2d(p * 8, hp, 1, bias=False), nn.BatchNorm2d(hp))
        self.down3 = nn.Sequential(nn.Conv2d(hp, p * 4, 3, 2, 1, bias=False), nn.BatchNorm2d(p * 4))
        self.down4 = nn.Sequential(
            nn.Conv2d(hp, p * 4, 3, 2, 1, bias=False), nn.BatchNorm2d(p * 4), nn.ReLU(inplace=True),
            nn.Conv2d(p * 4, p * 8, 3, 2, 1, bias=False), nn.BatchNorm2d(p * 8))
        self.layer3_ = make_stage(BasicBlock, p * 2, hp, 2)
        self.layer4_ = make_stage(BasicBlock, hp, hp, 2)
        self.layer5_ = make_stage(Bottleneck, hp, hp, 1)
        self.layer5 = make_stage(Bottleneck, p * 8, p * 8, 1, stride=2)
        self.spp = DAPPM(p * 16, spp_planes, p * 4)
        self.final_layer = SegHead(p * 4, head_planes, num_classes)
        self.seghead_extra = SegHead(hp, head_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        t = ddrnet_trunk(self, self.normalize(x))
        out = F.interpolate(self.final_layer(t.ctx + t.hi), size=size, mode="bilinear", align_corners=False)
        if self.training:
            aux = F.interpolate(self.seghead_extra(t.aux), size=size, mode="bilinear", align_corners=False)
            return out, [aux]
        return out

    def layers(self) -> LayerSpec:
        aliases = {"rb1": "layer3_", "rb2": "layer4_", "rbb1": "layer5_", "rbb2": "layer5"}
        return LayerSpec(
            shallow=("layer5", "layer5_", "layer3_", "layer4_"),  # paper: rbb2, rbb1, rb1, rb2
            deep=("layer5", "layer5_"),                            # paper: rbb2, rbb1
            candidates=("conv1", "layer1", "layer2", "layer3", "layer3_", "layer4", "layer4_",
                        "layer5_", "layer5", "spp"),
            aliases=aliases)


@register_model("ddrnet23_slim", description="DDRNet-23-slim, two-branch real-time segmenter")
def build_ddrnet23_slim(num_classes: int = 11) -> DDRNet:
    return DDRNet(num_classes=num_classes, planes=32, spp_planes=128, head_planes=64)
