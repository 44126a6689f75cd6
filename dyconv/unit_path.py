"""The unit path of a unit-structured PAD conv (see :mod:`dyconv.layers`, "Unit-structured PAD").

The static output filters are one ordinary conv with ``lambda_s W_s[static]``; the dynamic ones run through
the layer's scheme over ``lambda_d W_k[dynamic]``; the layer puts the two outputs back in channel order.
Depthwise convs slice their input channels alike (output filter ``o`` reads input channel ``o`` only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pad.mixing import UnitSplit

from .schemes import SCHEME_FUNCTIONS, ConvGeometry, ConvTerms


def static_units_conv(x: torch.Tensor, split: UnitSplit, geometry: ConvGeometry, depthwise: bool,
                      in_scale: torch.Tensor | None = None, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The static filters' output ``(B, S, H', W')`` for the (padded) input ``x`` ``(B, C, H, W)``.

    ``in_scale`` ``(B, C)`` and ``out_scale`` ``(B, O)`` are the attention's scales of PAD's static part, where
    it gets any (ODConv's ``channel-filter``); ``out_scale`` is indexed by output filter over all ``O``.
    """
    static_in = x if in_scale is None else x * in_scale[:, :, None, None]
    if depthwise:
        static_in = static_in.index_select(1, split.static)
        geometry = geometry._replace(groups=split.static.numel())
    out = F.conv2d(static_in, split.weight, None, geometry.stride, geometry.padding, geometry.dilation,
                   geometry.groups)
    return out if out_scale is None else out * out_scale.index_select(1, split.static)[:, :, None, None]


def dynamic_units_conv(x: torch.Tensor, split: UnitSplit, terms: ConvTerms, geometry: ConvGeometry,
                       depthwise: bool, scheme: str) -> torch.Tensor:
    """The dynamic filters' output ``(B, D, H', W')`` by ``scheme``; ``terms`` are the layer's over
    ``split.kernels`` ``(K, D, ...)``, with per-filter scales over all ``O`` (indexed here)."""
    if terms.out_scale is not None:
        terms = terms._replace(out_scale=terms.out_scale.index_select(1, split.dynamic))
    if depthwise:
        x = x.index_select(1, split.dynamic)
        geometry = geometry._replace(groups=split.dynamic.numel())
        if terms.in_scale is not None:
            terms = terms._replace(in_scale=terms.in_scale.index_select(1, split.dynamic))
    return SCHEME_FUNCTIONS[scheme](x, terms, geometry)
