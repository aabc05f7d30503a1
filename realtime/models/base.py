"""Shared pieces of our segmentation models: input normalisation, layer description, conv blocks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

# Mean/std of the CamVid train split in [0,1] RGB (computed from the 367 train frames with
# realtime.data.CamVid.to_tensors); the models normalise internally so callers feed [0,1] images
# and "fill with the model's mean colour" means filling with CAMVID_MEAN.
CAMVID_MEAN: Tuple[float, float, float] = (0.4119, 0.4251, 0.4327)
CAMVID_STD: Tuple[float, float, float] = (0.3071, 0.3116, 0.3072)


@dataclass(frozen=True)
class LayerSpec:
    """Which modules Z-Mask may hook. ``shallow``/``deep`` are the defaults (the paper's choice where
    it made one); ``candidates`` is the wider pool automatic layer selection ranks; ``aliases`` maps
    the paper's stage names to our module names."""
    shallow: Tuple[str, ...]
    deep: Tuple[str, ...]
    candidates: Tuple[str, ...]
    aliases: Dict[str, str] = field(default_factory=dict)

    def resolve(self, names: Sequence[str]) -> List[str]:
        """Map aliases (e.g. ``rb1``) to module names, leaving module names untouched."""
        return [self.aliases.get(n, n) for n in names]


class SegmentationModel(nn.Module):
    """Base: takes ``x`` in [0,1] (N,3,H,W), normalises with its own mean/std, returns logits at HxW.

    In training mode subclasses return ``(main_logits, [aux_logits, ...])`` so the trainer can add
    auxiliary losses; in eval mode only the main logits.
    """

    arch: str = "base"
    task: str = "segmentation"
    aux_weights: Tuple[float, ...] = ()

    def __init__(self, num_classes: int, mean: Sequence[float] = CAMVID_MEAN,
                 std: Sequence[float] = CAMVID_STD) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch of shape (N,3,H,W), got {tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @property
    def mean_color(self) -> torch.Tensor:
        """(1,3,1,1) colour in [0,1] that normalises to zero: what masking fills patches with."""
        return self.mean

    def layers(self) -> LayerSpec:  # pragma: no cover - every subclass overrides
        raise NotImplementedError


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    mods: List[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


class BasicBlock(nn.Module):
    """ResNet basic block; ``no_relu`` leaves the final activation to the caller (DDRNet fusions)."""
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, no_relu: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        self.no_relu = no_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + idt
        return out if self.no_relu else self.relu(out)


class Bottleneck(nn.Module):
    """ResNet bottleneck with expansion 2 (DDRNet's residual bottleneck block, 'RBB')."""
    expansion = 2

    def __init__(self, cin: int, planes: int, stride: int = 1, no_relu: bool = True) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))
        self.no_relu = no_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y)) + idt
        return y if self.no_relu else self.relu(y)


def make_stage(block: type, cin: int, planes: int, blocks: int, stride: int = 1,
               last_relu: bool = False) -> nn.Sequential:
    """``blocks`` residual blocks; the last one skips its ReLU unless ``last_relu``."""
    layers: List[nn.Module] = []
    for i in range(blocks):
        last = i == blocks - 1
        layers.append(block(cin if i == 0 else planes * block.expansion, planes, stride if i == 0 else 1,
                            no_relu=last and not last_relu))
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> None:
    """Kaiming init for convs, unit BN: the from-scratch starting point (no pretrained weights here)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
