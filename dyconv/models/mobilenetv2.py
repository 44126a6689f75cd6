"""MobileNetV2 (width 0.5 / 0.75 / 1.0) over a conv factory (torchvision's layout and initialisation).

The stem conv and the classifier are always static.  Built by ``make``: the expansion
(1x1), depthwise (3x3) and projection (1x1) convs of every inverted residual, and the
last 1x1 conv before pooling (dynamic too, as in DY-Conv and ODConv, which convert every
conv but the first).  With ``make = conv_factory("static")`` the parameter names and shapes
are torchvision's ``mobilenet_v2``.
"""
from __future__ import annotations

from torch import nn

from ..layers import ConvMaker
from .init import init_weights

# expansion t, output channels c, repeats n, first stride s (Sandler et al. 2018, Table 2)
INVERTED_RESIDUAL_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a channel count to a multiple of ``divisor``, never below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _conv_bn_relu6(conv: nn.Module, out_channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, make: ConvMaker, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(make(in_channels, hidden, 1), hidden))
        layers += [_conv_bn_relu6(make(hidden, hidden, 3, stride, 1, groups=hidden), hidden),
                   make(hidden, out_channels, 1), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """``(B, in_channels, H, W) -> (B, num_classes)`` logits.

    ``small_input=False``: 3x3 stride-2 stem (224 px, output stride 32).
    ``small_input=True``: stride-1 stem and stride 1 in the first stride-2 stage (24
    channels), output stride 8: a 28 px image ends at 4x4.
    """

    def __init__(self, make: ConvMaker, width: float = 1.0, num_classes: int = 1000, small_input: bool = False,
                 in_channels: int = 3, dropout: float = 0.2):
        super().__init__()
        channels = make_divisible(32 * width)
        self.last_channel = make_divisible(1280 * max(1.0, width))
        features = [_conv_bn_relu6(nn.Conv2d(in_channels, channels, 3, 1 if small_input else 2, 1, bias=False),
                                   channels)]
        for stage, (t, c, n, s) in enumerate(INVERTED_RESIDUAL_SETTING):
            out = make_divisible(c * width)
            if small_input and stage == 1:
                s = 1
            for i in range(n):
                features.append(InvertedResidual(make, channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(_conv_bn_relu6(make(channels, self.last_channel, 1), self.last_channel))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self, linear_std=0.01)

    def forward(self, x):
        return self.classifier(self.features(x).mean(dim=(2, 3)))
