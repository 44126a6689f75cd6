"""Any CNN, dynamic or PAD, in one call: :func:`convert_to_dynamic`.

The converter replaces ``nn.Conv2d`` modules of any module tree (torchvision's and timm's
models, one's own) by the CondConv, DY-Conv or ODConv layers of :mod:`dyconv.layers`, fully
or partially dynamic (PAD), in place.  ``init="upcycle"`` starts every layer from the conv it
replaces so that the converted model computes what the original computed (up to float
rounding, in training and in eval mode); ``init="fresh"`` keeps the layers' own initialisation.

Which convs (``include``).  By default every ``nn.Conv2d`` except

* the stem: the first ``nn.Conv2d`` in module order (``model.named_modules()``, the order the
  modules were assigned in ``__init__``; for torchvision's and timm's CNNs the first conv the
  forward pass applies), static as in the paper's models;
* a conv classifier: the last ``nn.Conv2d`` in module order when no ``nn.Linear`` follows it
  there (SqueezeNet's final 1x1 conv).  ``nn.Linear`` classifiers are never converted;
* convs the layers cannot compute (see below), which stay static.

``include`` may instead be a callable ``include(name, conv) -> bool`` over every ``nn.Conv2d``
(the stem and classifier too) or a collection of module names; a conv selected that way that
the layers cannot compute is a ``ValueError`` naming it.  :func:`default_selection` lists the
names the default converts, e.g. to leave out squeeze-excitation convs with
``include=[n for n in default_selection(model) if ".fc" not in n]``.

What the layers compute: square kernels, strides and dilations, any groups (depthwise
included), bias, ``padding`` an int, a pair of equal ints, ``"same"`` or ``"valid"``, and every
``padding_mode``.  Non-square kernels, strides, dilations or paddings, and subclasses of
``nn.Conv2d`` (whose own ``forward``, e.g. timm's dynamic "same" padding, a dynamic layer would
not keep) stay static.

Upcycling (``init="upcycle"``), layer by layer (``W``, ``b``: the pretrained weight and bias;
the bias is copied and stays static):

* DY-Conv: every kernel and ``W_s`` are ``W``; the attention keeps its own (random)
  initialisation: its softmax sums to 1, so ``sum_k pi_k W = W`` whatever it routes and at any
  temperature, and its different routing per sample makes the kernels' gradients, hence the
  kernels, differ after the first step.
* CondConv: its sigmoids do not sum to 1, and a constant routing (zero weights) would give
  every kernel the same gradient forever.  So the routing logits come in antisymmetric pairs,
  ``z_{2i+1} = -z_{2i}`` (the second row of each pair of the routing layer is the negated first,
  weight and bias), so that ``sigmoid(z) + sigmoid(-z) = 1`` for every input; an odd ``K``'s last
  row is zero (``sigmoid(0) = 1/2``).  The routing then sums to ``K / 2`` for every input, and
  every kernel starts at ``(2 / K) W`` (exact for powers of two), ``W_s`` at ``W``.
* ODConv: the last layers of the channel, filter and spatial attentions start at zero (weight
  and bias), so each of them is ``sigmoid(0) = 1/2`` at any temperature; the kernel attention is a
  softmax and keeps its own initialisation (as DY-Conv's).  With ``n`` such attentions present
  (the layer skips the filter one in depthwise convs, the spatial one in 1x1 convs) every kernel
  starts at ``2^n W``, and ``W_s`` at ``2^m W`` with ``m`` the number of them that also scale PAD's
  static part: none for ``static_attention="none"``, channel and filter for ``"channel-filter"``
  (the authors' release, this converter's default for PAD-ODConv; the layer's own default is
  ``"none"``), all for ``"all"``.  Powers of two keep the scaling exact.
* PAD: the mask starts all ones and the scale factors at ``lambda_d = lambda_s = 1`` (the
  layers' initialisation), so a PAD layer computes what its dynamic part does, ``W``.

Partitioning an upcycled PAD model.  Every dynamic kernel starts as a copy of ``W`` and the
dynamic part computes what the static part does, so IMP's taylor score
``|sum g ⊙ (lambda_d W~ - lambda_s W_s)|`` is zero up to float rounding everywhere before
training: IMP would rank rounding noise.  It says so (a warning, and the layers named in
:attr:`pad.PartitionReport.identical_kernels`).  Train a few steps first (a partition warm-up,
as ``moe``'s ``--partition_warmup_steps``: the attention's per-sample routing makes the kernels
differ), then run :func:`pad.iterative_mode_partition`.
"""
from __future__ import annotations

from typing import Callable, Collection

import torch
from torch import nn

from pad import PartiallyDynamicWeights
from .layers import (CondConv2d, DynamicConv2d, ODConv2d, conv_factory, dynamic_conv_names, dynamic_convs,
                     static_attention_applies)

INITS = ("upcycle", "fresh")

Include = Callable[[str, nn.Conv2d], bool] | Collection[str] | None


def convert_to_dynamic(model: nn.Module, conv: str = "dyconv", *, pad: bool = False, init: str = "upcycle",
                       include: Include = None, kernels: int = 4, reduction: int = 4, temperature: float = 30.0,
                       scale_factors: str = "both", scheme: str = "auto",
                       odconv_static_attention: str | None = None) -> nn.Module:
    """Replaces convs of ``model`` by dynamic (``pad``: partially dynamic) convs, in place, and returns ``model``.

    Args:
        model: any module tree holding ``nn.Conv2d`` modules, without dynamic convs yet.
        conv: a registered dynamic conv (:func:`dyconv.layers.dynamic_conv_names`); ``init="upcycle"``
            knows ``condconv``, ``dyconv`` and ``odconv``.
        pad: PAD layers (static weight ``W_s``, mask all ones, scale factors ``scale_factors``);
            partition them afterwards with :func:`pad.iterative_mode_partition` (after a warm-up
            when upcycled, see the module docstring).
        init: ``upcycle`` (the converted model computes what ``model`` did) or ``fresh`` (the
            layers' own initialisation).
        include: which convs to convert: ``None`` (the default rule: all but the stem, a conv
            classifier and convs the layers cannot compute), a callable ``include(name, conv) -> bool``
            or a collection of module names (see the module docstring).
        kernels, reduction, temperature, scheme: the layers' ``K``, attention reduction (DY-Conv and
            ODConv), initial attention temperature (DY-Conv and ODConv; the training schedule anneals
            it from 30 to 1) and execution scheme policy (:func:`dyconv.layers.conv_factory`).
        odconv_static_attention: which ODConv attentions scale PAD's static part; ``None`` means
            ``"channel-filter"`` (the authors' release) for PAD-ODConv and ``"none"`` otherwise.
    Returns:
        ``model``, each converted layer on its conv's device and dtype and in its train/eval mode.
    Raises:
        ValueError: a bad argument, a model with dynamic convs already, nothing to convert, or a
            conv selected by ``include`` that is not in the model or the layers cannot compute.
    """
    if conv not in dynamic_conv_names():
        raise ValueError(f"unknown dynamic conv {conv!r}; expected one of {dynamic_conv_names()}")
    if init not in INITS:
        raise ValueError(f"unknown initialisation {init!r}; expected one of {INITS}")
    if odconv_static_attention is None:
        odconv_static_attention = "channel-filter" if static_attention_applies(conv, pad) else "none"
    make = conv_factory(conv, pad, kernels, reduction, scale_factors, temperature, scheme, odconv_static_attention)
    if next(dynamic_convs(model), None) is not None:
        raise ValueError(f"{type(model).__name__} already has dynamic convs; convert a static model")
    selected = _selection(model, include)
    if not selected:
        raise ValueError(f"{type(model).__name__} has no conv to convert"
                         + (" (the default keeps the stem and a conv classifier static)" if include is None else ""))
    for name, module in selected:
        layer = _build(make, module).to(device=module.weight.device, dtype=module.weight.dtype)
        layer.train(module.training)
        if init == "upcycle":
            upcycle(layer, module)
        parent_name, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attribute, layer)
    return model


def default_selection(model: nn.Module) -> list[str]:
    """The names of the convs :func:`convert_to_dynamic` converts by default, in module order: every
    ``nn.Conv2d`` but the stem, a conv classifier and those the layers cannot compute."""
    return [name for name, module in _default_selection(model)]


def _default_selection(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    convs, after_last_conv_is_linear = [], False
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            convs.append((name, module))
            after_last_conv_is_linear = False
        elif isinstance(module, nn.Linear):
            after_last_conv_is_linear = True
    inner = convs[1:] if after_last_conv_is_linear else convs[1:-1]
    return [(name, module) for name, module in inner if _unsupported(module) is None]


def _selection(model: nn.Module, include: Include) -> list[tuple[str, nn.Conv2d]]:
    """``(name, conv)`` of the convs to convert, in module order; ``ValueError`` where ``include`` asks
    for a conv that is not there or that the layers cannot compute."""
    if include is None:
        return _default_selection(model)
    convs = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if callable(include):
        selected = [(name, module) for name, module in convs if include(name, module)]
    elif isinstance(include, str) or not isinstance(include, Collection):
        raise ValueError(f"include must be a callable include(name, conv) -> bool or a collection of module names, "
                         f"got {include!r}")
    else:
        names = dict(convs)
        missing = sorted(name for name in include if name not in names)
        if missing:
            raise ValueError(f"include names {missing} that are not nn.Conv2d modules of {type(model).__name__}")
        selected = [(name, module) for name, module in convs if name in include]
    for name, module in selected:
        reason = _unsupported(module)
        if reason is not None:
            raise ValueError(f"cannot convert {name!r}: {reason}")
    return selected


def _square(value, what: str) -> tuple[int | None, str | None]:
    """``(the int, None)`` for an int or a pair of equal ints, else ``(None, why not)``."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or pair[0] != pair[1]:
        return None, f"non-square {what} {tuple(pair)} (the dynamic layers are square)"
    return int(pair[0]), None


def _unsupported(conv: nn.Conv2d) -> str | None:
    """Why the dynamic layers cannot compute ``conv``, or ``None`` where they can."""
    if type(conv) is not nn.Conv2d:
        return (f"{type(conv).__name__} is a subclass of nn.Conv2d, whose own forward a dynamic layer would not "
                f"keep")
    for what in ("kernel_size", "stride", "dilation"):
        reason = _square(getattr(conv, what), what.replace("_", " "))[1]
        if reason is not None:
            return reason
    return None if isinstance(conv.padding, str) else _square(conv.padding, "padding")[1]


def _build(make, conv: nn.Conv2d) -> nn.Module:
    padding = conv.padding if isinstance(conv.padding, str) else conv.padding[0]
    return make(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], padding, conv.groups,
                conv.bias is not None, conv.dilation[0], conv.padding_mode)


@torch.no_grad()
def upcycle(layer: nn.Module, conv: nn.Conv2d) -> None:
    """Initialises the dynamic ``layer`` from ``conv`` (weight ``(O, I / groups, k, k)``, bias ``(O,)``) so
    that it computes what ``conv`` computes (see the module docstring); ``layer`` has ``conv``'s geometry."""
    if layer.bank.shape != conv.weight.shape:
        raise ValueError(f"cannot upcycle a conv of weight {tuple(conv.weight.shape)} into a layer of static "
                         f"shape {tuple(layer.bank.shape)}")
    if (layer.bias is None) != (conv.bias is None):
        raise ValueError("cannot upcycle: the layer and the conv differ in having a bias")
    kernel_scale, static_scale = 1.0, 1.0
    if isinstance(layer, CondConv2d):
        _pair_routing(layer.attention.fc)
        kernel_scale = 2.0 / layer.num_kernels
    elif isinstance(layer, ODConv2d):
        attention = layer.attention
        heads = {"channel": attention.channel_fc, "filter": attention.filter_fc, "spatial": attention.spatial_fc}
        on_static = {"none": (), "channel-filter": ("channel", "filter"),
                     "all": ("channel", "filter", "spatial")}[layer.static_attention]
        for head in heads.values():
            if head is not None:
                head.weight.zero_()
                head.bias.zero_()
        kernel_scale = 2.0 ** sum(head is not None for head in heads.values())
        static_scale = 2.0 ** sum(heads[name] is not None for name in on_static)
    elif not isinstance(layer, DynamicConv2d):
        raise ValueError(f"cannot upcycle into {type(layer).__name__}; expected a CondConv, DY-Conv or ODConv layer")
    bank = layer.bank
    bank.kernels.copy_(conv.weight.expand_as(bank.kernels) * kernel_scale)
    if isinstance(bank, PartiallyDynamicWeights):
        bank.static_weight.copy_(conv.weight * static_scale)
    if conv.bias is not None:
        layer.bias.copy_(conv.bias)


def _pair_routing(fc: nn.Linear) -> None:
    """Rows ``2i + 1`` of ``fc`` (weight and bias) become the negated rows ``2i``, an odd last row zero:
    the sigmoids of its outputs then sum to ``K / 2`` for every input."""
    pairs = fc.out_features // 2
    for parameter in (fc.weight, fc.bias):
        parameter[1:2 * pairs:2] = -parameter[0:2 * pairs:2]
        if fc.out_features % 2:
            parameter[-1] = 0
