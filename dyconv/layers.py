"""Convolution layers: static, CondConv, DY-Conv and ODConv, each fully or partially dynamic (PAD).

Every dynamic layer is split the timm way: an *attention* submodule maps the input
to routing weights, and the layer's :meth:`weighted_conv` takes the input and those
routing weights.  The kernels live in a :mod:`pad` bank:

* ``pad=False``: :class:`pad.DynamicWeights`, ``W~(x) = sum_k pi_k(x) W_k``,
* ``pad=True``: :class:`PartiallyDynamicWeights`, the bank returns
  ``lambda_d M W_k`` and ``lambda_s (1 - M) W_s``, so the layer computes
  ``Omega(x) = lambda_d M ⊙ W~(x) + lambda_s (1 - M) ⊙ W_s`` without knowing about masks.

Aggregation is a matmul of the routing weights ``(B, K)`` with the flattened kernels
``(K, N)``, giving one weight per sample ``(B, N)``; the convolution is then one
grouped conv with ``groups = B * groups`` over the input viewed as ``(1, B*C, H, W)``.
Nothing of size ``B x K x |W|`` is ever materialised.

Biases (``bias=True``) are static, one ``(out,)`` vector per layer, and are not
mixed; the models never use them (every conv is followed by BatchNorm).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pad import SCALE_FACTOR_VARIANTS, DynamicWeights, PartiallyDynamicWeights

CONVS = ("static", "condconv", "dyconv", "odconv")

ConvMaker = Callable[..., nn.Module]


# ---------------------------------------------------------------- shared maths

def mix_kernels(routing: torch.Tensor, dynamic: torch.Tensor) -> torch.Tensor:
    """``sum_k routing[b, k] * dynamic[k]`` as one matmul.

    Args:
        routing: ``(B, K)``.
        dynamic: ``(K, *S)``.
    Returns:
        ``(B, *S)``.
    """
    return (routing @ dynamic.flatten(1)).view(routing.shape[0], *dynamic.shape[1:])


def per_sample_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      stride, padding, dilation, groups: int) -> torch.Tensor:
    """Convolves sample ``b`` of ``x`` with ``weight[b]``, all samples in one grouped conv.

    Args:
        x: ``(B, C, H, W)``.
        weight: ``(B, O, C // groups, kh, kw)``.
        bias: ``(O,)`` or ``None``.
    Returns:
        ``(B, O, H', W')``.
    """
    batch, channels, height, width = x.shape
    out_channels = weight.shape[1]
    out = F.conv2d(x.reshape(1, batch * channels, height, width), weight.reshape(batch * out_channels, *weight.shape[2:]),
                   None, stride, padding, dilation, batch * groups)
    out = out.view(batch, out_channels, *out.shape[-2:])
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def _kaiming_like_conv(weight: torch.Tensor) -> None:
    """Kaiming initialisation of one conv-shaped weight ``(O, I, kh, kw)``, as torchvision's
    ResNets and MobileNetV2 initialise their convs: ``normal(0, sqrt(2 / (O kh kw)))``."""
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


def _check_positive_temperature(value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"attention temperature must be > 0, got {value}")
    return value


# ---------------------------------------------------------------- attention modules

class CondConvRouting(nn.Module):
    """CondConv routing (Yang et al. 2019): ``sigmoid(FC(GAP(x)))``, ``(B, C, H, W) -> (B, K)``.

    Independent sigmoids, not a softmax, so CondConv has no temperature.
    """

    def __init__(self, in_channels: int, kernels: int):
        super().__init__()
        self.fc = nn.Linear(in_channels, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x.mean(dim=(2, 3))))


class DynamicConvAttention(nn.Module):
    """DY-Conv attention (Chen et al. 2020), ``(B, C, H, W) -> (B, K)``:
    ``softmax(FC(ReLU(FC(GAP(x)))) / temperature)`` with hidden width ``max(C // reduction, min_hidden)``.
    """

    def __init__(self, in_channels: int, kernels: int, reduction: int = 4, temperature: float = 30.0,
                 min_hidden: int = 4):
        super().__init__()
        hidden = max(in_channels // reduction, min_hidden)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, kernels)
        self.temperature = _check_positive_temperature(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))
        return torch.softmax(logits / self.temperature, dim=1)


class ODConvAttentionWeights(NamedTuple):
    """The four ODConv attentions of a batch; ``None`` where the layer skips one.

    channel: ``(B, C_in)``; filter: ``(B, C_out)``; spatial: ``(B, kh * kw)``; kernel: ``(B, K)``.
    """
    channel: torch.Tensor
    filter: torch.Tensor | None
    spatial: torch.Tensor | None
    kernel: torch.Tensor | None


class ODConvAttention(nn.Module):
    """ODConv's omni-dimensional attention (Li et al. 2022).

    ``GAP -> FC(C -> max(C // reduction, min_hidden)) -> BN -> ReLU`` then four heads:
    input-channel, filter (output-channel) and spatial attentions ``sigmoid(z / temperature)``,
    kernel attention ``softmax(z / temperature)``.  As in the authors' code, the filter
    attention is skipped for depthwise convs, the spatial one for 1x1 convs and the kernel
    one when ``K = 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int, kernels: int,
                 reduction: int = 4, temperature: float = 30.0, min_hidden: int = 16):
        super().__init__()
        hidden = max(in_channels // reduction, min_hidden)
        self.fc = nn.Linear(in_channels, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.channel_fc = nn.Linear(hidden, in_channels)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else nn.Linear(hidden, out_channels)
        self.spatial_fc = None if kernel_size == 1 else nn.Linear(hidden, kernel_size * kernel_size)
        self.kernel_fc = None if kernels == 1 else nn.Linear(hidden, kernels)
        self.temperature = _check_positive_temperature(temperature)

    def forward(self, x: torch.Tensor) -> ODConvAttentionWeights:
        hidden = F.relu(self.bn(self.fc(x.mean(dim=(2, 3)))))
        t = self.temperature
        return ODConvAttentionWeights(
            channel=torch.sigmoid(self.channel_fc(hidden) / t),
            filter=None if self.filter_fc is None else torch.sigmoid(self.filter_fc(hidden) / t),
            spatial=None if self.spatial_fc is None else torch.sigmoid(self.spatial_fc(hidden) / t),
            kernel=None if self.kernel_fc is None else torch.softmax(self.kernel_fc(hidden) / t, dim=1),
        )


# ---------------------------------------------------------------- layers

class _RoutedConv2d(nn.Module):
    """Shared state of a conv whose ``K`` kernels live in a (partially) dynamic bank.

    Attributes:
        bank: :class:`pad.DynamicWeights` or :class:`PartiallyDynamicWeights` of static
            shape ``(out, in // groups, k, k)``.
        bias: ``(out,)`` static bias or ``None``.
        attention: the routing submodule (set by subclasses).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = False, kernels: int = 4, pad: bool = False,
                 scale_factors: str = "both", dilation: int = 1):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in ({in_channels}) and out ({out_channels}) channels must be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        self.bank = PartiallyDynamicWeights(kernels, shape, scale_factors) if pad else DynamicWeights(kernels, shape)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every kernel, and ``W_s`` for PAD, initialised like a conv weight (Kaiming, see above)."""
        with torch.no_grad():
            for kernel in self.bank.kernels:
                _kaiming_like_conv(kernel)
            if isinstance(self.bank, PartiallyDynamicWeights):
                _kaiming_like_conv(self.bank.static_weight)
            if self.bias is not None:
                bound = 1 / math.sqrt(self.bank.shape[1:].numel())
                self.bias.uniform_(-bound, bound)

    @property
    def num_kernels(self) -> int:
        return self.bank.num_kernels

    def _conv(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return per_sample_conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def mixed_weight(self, routing: torch.Tensor) -> torch.Tensor:
        """``Omega`` per sample, ``(B, out, in // groups, k, k)``, from routing weights ``(B, K)``."""
        dynamic, static = self.bank()
        weight = mix_kernels(routing, dynamic)
        return weight if static is None else weight + static

    def weighted_conv(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """The conv of ``x`` ``(B, C, H, W)`` with the kernels mixed by ``routing`` ``(B, K)``."""
        return self._conv(x, self.mixed_weight(routing))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weighted_conv(x, self.attention(x))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, kernels={self.num_kernels}, "
                f"pad={isinstance(self.bank, PartiallyDynamicWeights)}, bias={self.bias is not None}")


class CondConv2d(_RoutedConv2d):
    """CondConv (Yang et al. 2019): ``W(x) = sum_k sigmoid(FC(GAP(x)))_k W_k``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = False, kernels: int = 4, pad: bool = False,
                 scale_factors: str = "both"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, bias, kernels, pad,
                         scale_factors)
        self.attention = CondConvRouting(in_channels, kernels)


class DynamicConv2d(_RoutedConv2d):
    """DY-Conv (Chen et al. 2020): ``W(x) = sum_k softmax(z(x) / tau)_k W_k``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = False, kernels: int = 4, pad: bool = False,
                 scale_factors: str = "both", reduction: int = 4, temperature: float = 30.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, bias, kernels, pad,
                         scale_factors)
        self.attention = DynamicConvAttention(in_channels, kernels, reduction, temperature)


class ODConv2d(_RoutedConv2d):
    """ODConv (Li et al. 2022): ``W~(x) = a_s ⊙ a_c ⊙ a_f ⊙ sum_k a_w,k W_k``.

    The spatial ``(k, k)``, input-channel and filter attentions scale the aggregated
    per-sample weight ``(B, O, I, kh, kw)`` (which materialises ``B x |W|``, not
    ``B x K x |W|``).  With PAD the static part ``lambda_s (1 - M) W_s`` is added after
    the attentions, i.e. it is not scaled by them.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 groups: int = 1, bias: bool = False, kernels: int = 4, pad: bool = False,
                 scale_factors: str = "both", reduction: int = 4, temperature: float = 30.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, bias, kernels, pad,
                         scale_factors)
        self.attention = ODConvAttention(in_channels, out_channels, kernel_size, groups, kernels, reduction,
                                         temperature)

    def mixed_weight(self, attention: ODConvAttentionWeights) -> torch.Tensor:
        """``Omega`` per sample ``(B, O, I, kh, kw)`` from the four attentions."""
        dynamic, static = self.bank()
        batch = attention.channel.shape[0]
        routing = attention.kernel if attention.kernel is not None else attention.channel.new_ones(batch, 1)
        weight = mix_kernels(routing, dynamic)
        out_channels, in_per_group, kh, kw = weight.shape[1:]
        # input channel c of group g feeds weight[:, o, c - g * in_per_group] for every o of group g
        channel = attention.channel.view(batch, self.groups, 1, in_per_group)
        channel = channel.expand(batch, self.groups, out_channels // self.groups, in_per_group)
        weight = weight * channel.reshape(batch, out_channels, in_per_group, 1, 1)
        if attention.filter is not None:
            weight = weight * attention.filter.view(batch, out_channels, 1, 1, 1)
        if attention.spatial is not None:
            weight = weight * attention.spatial.view(batch, 1, 1, kh, kw)
        return weight if static is None else weight + static

    def weighted_conv(self, x: torch.Tensor, attention: ODConvAttentionWeights) -> torch.Tensor:
        """The conv of ``x`` ``(B, C, H, W)`` with the weight the attentions select."""
        return self._conv(x, self.mixed_weight(attention))


# ---------------------------------------------------------------- factory and temperature

def conv_factory(conv: str, pad: bool = False, kernels: int = 4, reduction: int = 4, scale_factors: str = "both",
                 temperature: float = 30.0) -> ConvMaker:
    """A constructor ``make(in_ch, out_ch, kernel_size, stride=1, padding=0, groups=1, bias=False)``.

    ``static`` gives ``nn.Conv2d``; the others their dynamic layer, partially dynamic when ``pad``.
    ``reduction`` and ``temperature`` are used by DY-Conv and ODConv (CondConv has neither).
    """
    if conv not in CONVS:
        raise ValueError(f"unknown conv {conv!r}; expected one of {CONVS}")
    if conv == "static" and pad:
        raise ValueError("PAD needs a dynamic conv (condconv, dyconv or odconv), not static")
    if kernels < 1:
        raise ValueError(f"number of kernels must be >= 1, got {kernels}")
    if reduction < 1:
        raise ValueError(f"attention reduction must be >= 1, got {reduction}")
    if scale_factors not in SCALE_FACTOR_VARIANTS:
        raise ValueError(f"unknown scale factors {scale_factors!r}; expected one of {SCALE_FACTOR_VARIANTS}")
    _check_positive_temperature(temperature)

    def make(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0, groups: int = 1,
             bias: bool = False) -> nn.Module:
        if conv == "static":
            return nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=bias)
        common = dict(stride=stride, padding=padding, groups=groups, bias=bias, kernels=kernels, pad=pad,
                      scale_factors=scale_factors)
        if conv == "condconv":
            return CondConv2d(in_ch, out_ch, kernel_size, **common)
        layer = DynamicConv2d if conv == "dyconv" else ODConv2d
        return layer(in_ch, out_ch, kernel_size, reduction=reduction, temperature=temperature, **common)

    return make


def _tempered(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, (DynamicConvAttention, ODConvAttention))]


def set_temperature(model: nn.Module, value: float) -> None:
    """Sets the softmax/sigmoid temperature of every DY-Conv and ODConv attention in ``model``."""
    value = _check_positive_temperature(value)
    for module in _tempered(model):
        module.temperature = value


def get_temperature(model: nn.Module) -> float | None:
    """The attention temperature of ``model`` (``None`` when it has no tempered attention)."""
    modules = _tempered(model)
    return modules[0].temperature if modules else None


def temperature_schedule(step: int, total_anneal_steps: int, init: float = 30.0, final: float = 1.0) -> float:
    """Linear anneal from ``init`` at step 0 to ``final`` at ``total_anneal_steps``, then ``final``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_anneal_steps <= 0 or step >= total_anneal_steps:
        return float(final)
    return float(init + (final - init) * step / total_anneal_steps)
