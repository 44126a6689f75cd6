"""ResNet-10/18/34/50 over a conv factory (torchvision's layout and initialisation).

The stem conv and the classifier are always static ``nn.Conv2d`` / ``nn.Linear``;
every conv inside the residual blocks, the downsample shortcuts included, is built by
``make`` (see :func:`dyconv.layers.conv_factory`).  With ``make = conv_factory("static")``
the parameter names and shapes are torchvision's.
"""
from __future__ import annotations

from torch import nn

from ..layers import ConvMaker
from .init import init_weights

# (block, blocks per stage)
RESNET_SPECS = {
    "resnet10": ("basic", (1, 1, 1, 1)),
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, make: ConvMaker, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = make(in_planes, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = make(planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(make, in_planes, planes * self.expansion, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""
    expansion = 4

    def __init__(self, make: ConvMaker, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = make(in_planes, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = make(planes, planes, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = make(planes, planes * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(make, in_planes, planes * self.expansion, stride)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _shortcut(make: ConvMaker, in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(make(in_planes, out_planes, 1, stride), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """``(B, in_channels, H, W) -> (B, num_classes)`` logits.

    ``small_input=False``: ImageNet stem, 7x7 stride-2 conv + 3x3 stride-2 max-pool (224 px).
    ``small_input=True``: 3x3 stride-1 conv, no max-pool (28-32 px images).
    ``width``: channels of the stem and the first stage (64 in the paper's ResNets); each later
    stage doubles it, so ``width=16`` keeps the depth and costs about 1/16 of the MACs.
    """

    def __init__(self, make: ConvMaker, block: str, layers: tuple[int, ...], num_classes: int = 1000,
                 small_input: bool = False, in_channels: int = 3, width: int = 64):
        super().__init__()
        if width < 1:
            raise ValueError(f"ResNet width must be >= 1, got {width}")
        block_cls = BasicBlock if block == "basic" else Bottleneck
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        in_planes = width
        stages = []
        for i, (planes, blocks) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                stage.append(block_cls(make, in_planes, planes, stride if j == 0 else 1))
                in_planes = planes * block_cls.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self, linear_std=None)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
