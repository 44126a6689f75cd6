"""Model zoo: ResNet-10/18/34/50 and MobileNetV2 (width 0.5/0.75/1.0), static or dynamic, with or without PAD."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pad.mixing import weight_banks
from pad.partition import select_dynamic

from ..layers import conv_factory, static_attention_applies
from .mobilenetv2 import MobileNetV2
from .resnet import RESNET_SPECS, ResNet

ARCHS = ("resnet10", "resnet18", "resnet34", "resnet50", "mobilenetv2_050", "mobilenetv2_075", "mobilenetv2_100")

_MOBILENET_WIDTHS = {"mobilenetv2_050": 0.5, "mobilenetv2_075": 0.75, "mobilenetv2_100": 1.0}


def build_model(arch: str, conv: str = "static", pad: bool = False, num_classes: int = 1000,
                small_input: bool = False, in_channels: int = 3, kernels: int = 4, reduction: int = 4,
                scale_factors: str = "both", temperature: float = 30.0, conv_scheme: str = "auto",
                resnet_width: int = 64, odconv_static_attention: str | None = None) -> nn.Module:
    """Builds ``arch`` with every block conv made by :func:`dyconv.layers.conv_factory`.

    ``conv_scheme``: the execution scheme of every dynamic conv, ``auto`` (chosen per
    layer, see :mod:`dyconv.schemes`) or one scheme forced wherever it is exact.
    ``resnet_width``: a ResNet's stem and first-stage channels (64 = the paper's ResNets; the
    stages double it); MobileNetV2 takes its width from the arch name and refuses another value.
    ``odconv_static_attention``: which attentions scale PAD-ODConv's static part
    (:data:`dyconv.layers.ODCONV_STATIC_ATTENTIONS`: the authors' ``channel-filter``, the default for PAD-ODConv,
    ``none`` or ``all``; ``None`` picks that default, ``none`` for every other conv).

    ``forward`` maps ``(B, in_channels, H, W)`` to logits ``(B, num_classes)``.
    Raises ``ValueError`` for an unknown arch or conv, a bad factory argument, or
    non-positive ``num_classes`` / ``in_channels`` / ``resnet_width``.
    """
    if odconv_static_attention is None:
        odconv_static_attention = "channel-filter" if static_attention_applies(conv, pad) else "none"
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes} and {in_channels}")
    make = conv_factory(conv, pad=pad, kernels=kernels, reduction=reduction, scale_factors=scale_factors,
                        temperature=temperature, scheme=conv_scheme, odconv_static_attention=odconv_static_attention)
    if arch in RESNET_SPECS:
        block, layers = RESNET_SPECS[arch]
        return ResNet(make, block, layers, num_classes, small_input, in_channels, resnet_width)
    if resnet_width != 64:
        raise ValueError(f"resnet_width applies to the ResNets only; {arch} takes its width from its name")
    return MobileNetV2(make, _MOBILENET_WIDTHS[arch], num_classes, small_input, in_channels)


def count_parameters(model: nn.Module) -> int:
    """Every parameter the model stores (dense count; masks are buffers and not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one sample, counted by ``torch.utils.flop_counter``.

    ``input_size``: ``(C, H, W)`` or ``(1, C, H, W)``.  The count follows the library:
    2 FLOPs per multiply-accumulate (so ResNet-18 at 224 px is about 2 x 1.82 G), over
    the ops it knows (convs, matmuls: for dynamic convs the kernel aggregation and the
    attention FCs are included; poolings and element-wise ops are not).  The model runs
    in eval mode and gets its mode back.
    """
    if len(input_size) == 4 and input_size[0] == 1:
        input_size = tuple(input_size[1:])
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (C, H, W), got {tuple(input_size)}")
    reference = next(model.parameters())
    x = torch.zeros(1, *input_size, dtype=reference.dtype, device=reference.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


__all__ = ["ARCHS", "build_model", "count_flops", "count_parameters", "MobileNetV2", "ResNet"]


def set_random_mask(model: nn.Module, dynamic_ratio: float, seed: int = 0, granularity: str = "element") -> None:
    """Keeps a uniformly random ``dynamic_ratio`` of all PAD positions dynamic (global scope), whole
    units of ``granularity`` at a time: a PAD model of the right structure without running IMP (benchmarks,
    checks of the execution schemes)."""
    banks = dict(weight_banks(model))
    generator = torch.Generator().manual_seed(seed)
    scores = {name: torch.rand(bank.mask.shape, generator=generator) for name, bank in banks.items()}
    with torch.no_grad():
        select_dynamic(banks, scores, dynamic_ratio, "global", granularity=granularity)
