"""The network classes behind the bundled models: a reduced-width ResNet-18 for brain MRI, small CNNs for phantoms,
and a small hybrid vision transformer (a convolutional stem, then torchvision's ViT encoder) for brain MRI, and a small
U-Net that segments the phantoms' lesions.

The classifiers use torchvision building blocks and attribute names, so layer auto-selection works on them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from medlens.errors import ModelError


# torchvision's `BasicBlock` and `conv1x1` (its ResNet module, BSD-3-Clause licence), copied so that loading a
# bundled model does not import torchvision: its import pulls in torch._dynamo and sympy, about 40% of the start-up
# of `medlens batch` (python -X importtime). Same submodule names, parameters and forward as torchvision's.
def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (torchvision's)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1, without bias (torchvision's)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the (downsampled) input, then ReLU."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)  # after the branch, in torchvision's order
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    """ResNet-18 layout (torchvision `BasicBlock`, [2, 2, 2, 2]) with configurable width and input channels.

    Attribute names match `torchvision.models.resnet18` (conv1, bn1, relu, maxpool, layer1-4, avgpool, fc);
    `widths=(64, 128, 256, 512)` and `in_channels=3` give exactly torchvision's resnet18. `last_stride=1` gives the
    last stage twice the grid (finer class activation maps) with the same parameters.
    """

    def __init__(
        self,
        num_classes: int = 3,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks: Sequence[int] = (2, 2, 2, 2),
        dropout: float = 0.0,
        last_stride: int = 2,
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], blocks[0], stride=1)
        self.layer2 = self._make_layer(widths[1], blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[2], blocks[2], stride=2)
        # last_stride=1 keeps the last stage at 1/16 of the input (a 10 x 10 grid at 160 px instead of 5 x 5)
        self.layer4 = self._make_layer(widths[3], blocks[3], stride=int(last_stride))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # zero-init the last BN of each residual branch (stabler small-data training)
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


class PhantomCNN(nn.Module):
    """A small CNN for phantom images (2-D or 3-D): conv-BN-ReLU blocks with pooling, then GAP and a linear head.

    The last conv block (`features[-1]`'s ReLU output, module `features`) is the natural CAM layer.
    """

    def __init__(self, num_classes: int = 2, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64), dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
        layers: list[nn.Module] = []
        prev = in_channels
        for i, w in enumerate(widths):
            if i > 0:
                layers.append(pool(2))
            layers += [conv(prev, w, 3, padding=1, bias=False), bn(w), nn.ReLU(inplace=True)]
            layers += [conv(w, w, 3, padding=1, bias=False), bn(w), nn.ReLU(inplace=True)]
            prev = w
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def _double_conv(conv: type, bn: type, c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(conv(c_in, c_out, 3, padding=1, bias=False), bn(c_out), nn.ReLU(inplace=True),
                         conv(c_out, c_out, 3, padding=1, bias=False), bn(c_out), nn.ReLU(inplace=True))


class PhantomUNet(nn.Module):
    """A small U-Net for phantom segmentation (2-D or 3-D): an encoder of conv-BN-ReLU blocks with pooling, a decoder
    that upsamples and concatenates the encoder's maps, and a 1x1 head giving logits (B, classes, *spatial).

    The last decoder block (`decoders.0`) is where the automatic CAM layer falls for segmentation targets.
    """

    def __init__(self, num_classes: int = 2, in_channels: int = 1, widths: Sequence[int] = (8, 16, 32), dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)
        self.mode = "bilinear" if dims == 2 else "trilinear"
        self.encoders = nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.encoders.append(_double_conv(conv, bn, prev, w))
            prev = w
        self.decoders = nn.ModuleList(_double_conv(conv, bn, widths[i] + widths[i + 1], widths[i])
                                      for i in range(len(widths) - 1))
        self.head = conv(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, encoder in enumerate(self.encoders):
            x = encoder(x if i == 0 else self.pool(x))
            skips.append(x)
        for i in reversed(range(len(self.decoders))):
            up = nn.functional.interpolate(x, size=skips[i].shape[2:], mode=self.mode, align_corners=False)
            x = self.decoders[i](torch.cat([skips[i], up], dim=1))
        return self.head(x)


ARCHITECTURES = {"SmallResNet": SmallResNet, "PhantomCNN": PhantomCNN, "PhantomUNet": PhantomUNet}
