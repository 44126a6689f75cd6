"""Convolution layers: static, CondConv, DY-Conv and ODConv, each fully or partially dynamic (PAD).

Every dynamic layer is split the timm way: an *attention* submodule maps the input
to routing weights, and the layer turns the input and those weights into an output.
The kernels live in a :mod:`pad` bank:

* ``pad=False``: :class:`pad.DynamicWeights`, ``W~(x) = sum_k pi_k(x) W_k``,
* ``pad=True``: :class:`PartiallyDynamicWeights`, the bank returns
  ``lambda_d M W_k`` and ``lambda_s (1 - M) W_s``, so the layer computes
  ``Omega(x) = lambda_d M ⊙ W~(x) + lambda_s (1 - M) ⊙ W_s`` without knowing about masks.

**PAD folded.**  Where the routing sums to 1 (DY-Conv's softmax), the static part is
folded into the kernels once per forward pass, ``W'_k = lambda_d M W_k + lambda_s (1 - M) W_s``
(``bank(fold=True)``, :func:`pad.pad_kernels`: one ``K |W|`` pass, nothing of that size kept
for backward), and the layer runs exactly as a fully dynamic one over ``W'_k``:
``sum_k pi_k W'_k = Omega``.  CondConv's sigmoids do not sum to 1, and ODConv's channel,
filter and spatial attentions scale ``W~`` but not the static part, so there the static
part stays a separate term: one more kernel with routing 1 (CondConv) or one static conv
(ODConv under the ``stacked``/``bmm`` schemes; added to the per-sample weight under ``grouped``).
ODConv with ``static_attention="channel-filter"`` (the authors' release) scales the static part
by the channel and filter attentions too: folded where it has no spatial attention (1x1 convs),
else added to the per-sample weight after the spatial attention; with ``"all"`` it is ODConv over
the folded kernels.

**Execution.**  The layer reduces its forward pass to :class:`dyconv.schemes.ConvTerms`
and runs one of the exact schemes of :mod:`dyconv.schemes` (``grouped``: per-sample
weights and one grouped conv; ``stacked``: one conv over the K stacked kernels, outputs
mixed by the routing; ``bmm``: 1x1 convs as a batched matmul).  ``scheme`` (``auto`` or
a scheme's name, forced where exact) picks it; ``auto`` uses the cost model of
:func:`dyconv.schemes.choose_scheme` (batch 1: grouped; 1x1: bmm; otherwise the cheaper
of grouped, ``1 + GROUPED_OVERHEAD (C/g) k^2 / (H' W')`` static convs with
:data:`dyconv.schemes.GROUPED_OVERHEAD`, and stacked, ``K + 1``; memory break-even
``(C/g) k^2 = K H' W'``).  The layer's :class:`dyconv.schemes.SchemeChooser` makes and records
each choice (keyed by batch class and input size; ``chooser.schemes``), saved with
:func:`conv_schemes` / :func:`restore_conv_schemes`, so a resumed or re-evaluated run computes
with the same schemes.  Nothing of size ``B x K x |W|`` is ever materialised.

**Unit-structured PAD.**  When a PAD bank's mask is structured by output filters
(granularity ``unit``, :meth:`RoutedConv2d.unit_split`), the static filters are one ordinary
conv with ``lambda_s W_s[static]`` and only the dynamic filters run through the scheme, over
``lambda_d W_k[dynamic]`` (ODConv: with those filters' attention); the two outputs are put
back in channel order.  Exactly the element-path output and gradients for the same mask.
Depthwise convs slice the input channels alike; other grouped convs, ``kernel`` granularity
(storage only), layers whose every filter is dynamic and masks being scored (``requires_grad``,
IMP) take the element path.  Otherwise the chooser picks the path per batch class and input size by
:func:`dyconv.schemes.prefers_unit_path`: the unit path only where its scheme costs at least
:data:`dyconv.schemes.UNIT_PATH_MIN_COST` static convs (the split saves nothing on 1x1 ``bmm`` or
depthwise layers), at every batch size; the choice is recorded in ``chooser.paths`` and saved with the schemes.

**Registry.**  :func:`conv_factory` builds the convs registered in :data:`CONV_TYPES` (``static``:
``nn.Conv2d``; ``condconv``, ``dyconv``, ``odconv``); the CLI's ``--conv`` offers the same names.  A new
dynamic conv is one :class:`RoutedConv2d` subclass that sets its ``attention``, decorated with
:func:`register_conv`; it overrides :meth:`RoutedConv2d.factory_kwargs` only if its constructor takes more
of the factory's options than the base's, and the hooks below only where its attention does more than route.

Biases (``bias=True``) are static, one ``(out,)`` vector per layer, and are not
mixed; the models never use them (every conv is followed by BatchNorm).

**Geometry.**  Square kernels, strides and dilations (ints); ``padding`` an int, ``"same"`` or
``"valid"`` and ``padding_mode`` any of ``nn.Conv2d``'s (:data:`PADDING_MODES`).  Symmetric zero
padding is the conv's own; any other padding (another mode, or ``"same"`` with an odd total
``dilation (k - 1)``) is applied to the input once, before the scheme runs (the attention sees
the unpadded input), so every scheme and the unit path compute with it alike.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pad import DynamicWeights, PartiallyDynamicWeights
from pad.mixing import SCALE_FACTOR_VARIANTS, UnitSplit, unit_split_applies, zero_tie

from .schemes import (SCHEME_FUNCTIONS, ConvGeometry, ConvTerms, LayerCost, SchemeChooser, applicable_schemes,
                      check_policy, scheme_key)  # noqa: F401  (scheme_key re-exported for callers)
from .unit_path import dynamic_units_conv, static_units_conv

# Which of ODConv's attentions also scale PAD's static part: "none" (the static part of DESIGN's Omega, no
# attention), "channel-filter" (the authors' release: the input-channel and filter attentions scale the whole
# conv, the spatial and kernel attentions the dynamic part only) or "all" (ODConv over the folded kernels W'_k,
# DESIGN's folding remark: every attention but the kernel one scales the static part too).
ODCONV_STATIC_ATTENTIONS = ("none", "channel-filter", "all")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")  # nn.Conv2d's

ConvMaker = Callable[..., nn.Module]

# ---------------------------------------------------------------- registry

# ``{name: class}`` of every conv :func:`conv_factory` (and the CLI's ``--conv``) can build, in registration order.
CONV_TYPES: dict[str, type[nn.Module]] = {}


def register_conv(name: str):
    """Class decorator: :func:`conv_factory` builds the class as conv ``name``.

    A :class:`RoutedConv2d` subclass is built with its geometry and its :meth:`~RoutedConv2d.factory_kwargs`;
    any other class is a static conv, built with ``nn.Conv2d``'s arguments.  ``ValueError`` for a name
    already registered.
    """
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if name in CONV_TYPES:
            raise ValueError(f"conv {name!r} is registered already (as {CONV_TYPES[name].__name__})")
        CONV_TYPES[name] = cls
        return cls
    return register


register_conv("static")(nn.Conv2d)


def dynamic_conv_names() -> tuple[str, ...]:
    """The registered convs that are dynamic (:class:`RoutedConv2d` subclasses), in registration order."""
    return tuple(name for name, cls in CONV_TYPES.items() if issubclass(cls, RoutedConv2d))


def named_dynamic_convs() -> str:
    """The registered dynamic convs as a message names them, e.g. ``"condconv, dyconv or odconv"``."""
    *rest, last = dynamic_conv_names()
    return f"{', '.join(rest)} or {last}" if rest else last


def static_attention_applies(conv: str, pad: bool) -> bool:
    """Whether ``odconv_static_attention`` applies to conv ``conv`` (a :data:`CONV_TYPES` name): with PAD, to
    :class:`ODConv2d` and its registered subclasses."""
    return pad and issubclass(CONV_TYPES.get(conv, nn.Module), ODConv2d)


class ConvOptions(NamedTuple):
    """What :func:`conv_factory` gives every dynamic conv it makes beside the geometry; each layer type takes
    the ones its constructor has (:meth:`RoutedConv2d.factory_kwargs`)."""
    pad: bool
    kernels: int
    reduction: int
    scale_factors: str
    temperature: float
    scheme: str
    odconv_static_attention: str


# ---------------------------------------------------------------- shared maths

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
    one when ``K = 1``.  A training batch of one sample is normalised with the running
    statistics (see :meth:`normalise`).
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

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        """BatchNorm of the hidden features ``(B, hidden)``.  A training batch of one sample
        has no batch statistics (the authors' ``BatchNorm2d`` raises there): it is normalised
        with the running statistics, which it leaves unchanged."""
        bn = self.bn
        if self.training and z.shape[0] == 1:
            return F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return bn(z)

    def forward(self, x: torch.Tensor) -> ODConvAttentionWeights:
        hidden = F.relu(self.normalise(self.fc(x.mean(dim=(2, 3)))))
        t = self.temperature
        return ODConvAttentionWeights(
            channel=torch.sigmoid(self.channel_fc(hidden) / t),
            filter=None if self.filter_fc is None else torch.sigmoid(self.filter_fc(hidden) / t),
            spatial=None if self.spatial_fc is None else torch.sigmoid(self.spatial_fc(hidden) / t),
            kernel=None if self.kernel_fc is None else torch.softmax(self.kernel_fc(hidden) / t, dim=1),
        )


# ---------------------------------------------------------------- layers

def _check_static_attention(static_attention: str) -> str:
    if static_attention not in ODCONV_STATIC_ATTENTIONS:
        raise ValueError(f"unknown ODConv static attention {static_attention!r}; expected one of "
                         f"{ODCONV_STATIC_ATTENTIONS}")
    return static_attention


def _resolve_padding(padding: int | str, padding_mode: str, kernel_size: int, stride: int,
                     dilation: int) -> tuple[int, tuple[int, int, int, int] | None]:
    """``(the conv's own zero padding, the explicit input padding (left, right, top, bottom) or None)``.

    As ``nn.Conv2d``: ``padding`` is an int or ``"valid"`` (0) or ``"same"`` (stride 1 only; a total
    of ``dilation (k - 1)``, the extra one on the right and bottom when it is odd).  Symmetric zero
    padding stays inside the conv (no copy of the input); every other padding is applied to the
    input by ``F.pad`` and the conv pads nothing, so every scheme sees one padded input.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"unknown padding mode {padding_mode!r}; expected one of {PADDING_MODES}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"unknown padding {padding!r}; expected an int, 'same' or 'valid'")
        if padding == "same" and stride != 1:
            raise ValueError(f"padding 'same' needs stride 1, got stride {stride}")
        total = dilation * (kernel_size - 1) if padding == "same" else 0
        before, after = total // 2, total - total // 2
    elif isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0:
        before = after = padding
    else:
        raise ValueError(f"padding must be an int >= 0, 'same' or 'valid', got {padding!r}")
    if padding_mode == "zeros" and before == after:
        return before, None
    return 0, (before, after, before, after)


class EvalCache:
    """Values computed from a bank's tensors, kept while its layer is in eval mode without autograd (and not
    being compiled) and recomputed once any of the tensors changes: an entry's key holds their version
    counters and storage, so a stale entry is never hit."""

    def __init__(self):
        self._entries: dict[str, tuple] = {}

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, bank: nn.Module, training: bool, compute: Callable[[], object]):
        """``compute()``, or the entry ``name`` computed from the bank's present tensors."""
        if training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return compute()
        tensors = [*bank.parameters(), *bank.buffers()]
        key = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            entry = self._entries[name] = (key, compute())
        return entry[1]


class RoutedConv2d(nn.Module):
    """Shared state of a conv whose ``K`` kernels live in a (partially) dynamic bank.

    Attributes:
        bank: :class:`pad.DynamicWeights` or :class:`PartiallyDynamicWeights` of static
            shape ``(out, in // groups, k, k)`` (or any module whose ``forward(fold=False)``
            returns ``(kernels, static)`` and ``forward(fold=True)`` ``(kernels + static, None)``,
            e.g. the inference bank of :mod:`dyconv.inference`).
        bias: ``(out,)`` static bias or ``None``.
        attention: the routing submodule (set by subclasses).
        chooser: the :class:`dyconv.schemes.SchemeChooser` that picks and records the scheme per batch
            class and input size and, for a unit-structured PAD layer (:meth:`unit_split` not ``None``),
            the unit or element path (its ``policy``, ``schemes`` and ``paths``).
        cache: the :class:`EvalCache` of the fold and the unit split.

    The scheme is chosen by the cost model of :func:`dyconv.schemes.choose_scheme`, the path by
    :func:`dyconv.schemes.prefers_unit_path` (a layer without dynamic filters is one static conv: unit
    path); the scheme is the same on both paths, and the path does not depend on the batch size, so the
    eval caches of a batch-32 and a batch-1 call are the same.
    """

    routing_sums_to_one = False  # True where PAD's static part folds into the kernels

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | str = 0, groups: int = 1, bias: bool = False, kernels: int = 4, pad: bool = False,
                 scale_factors: str = "both", dilation: int = 1, scheme: str = "auto", padding_mode: str = "zeros"):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in ({in_channels}) and out ({out_channels}) channels must be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode = padding_mode
        self._conv_padding, self._input_pads = _resolve_padding(padding, padding_mode, kernel_size, stride, dilation)
        self.chooser = SchemeChooser(scheme)
        self.cache = EvalCache()
        shape = (out_channels, in_channels // groups, kernel_size, kernel_size)
        # The bank initialises its kernels and W_s like conv weights (pad.mixing.init_like_conv).
        self.bank = PartiallyDynamicWeights(kernels, shape, scale_factors) if pad else DynamicWeights(kernels, shape)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._init_bias()

    @classmethod
    def factory_kwargs(cls, options: ConvOptions) -> dict:
        """The constructor's keyword arguments that come from :func:`conv_factory`'s options (the geometry
        comes as for ``nn.Conv2d``); a subclass whose constructor takes more options adds them."""
        return dict(kernels=options.kernels, pad=options.pad, scale_factors=options.scale_factors,
                    scheme=options.scheme)

    def _init_bias(self) -> None:
        if self.bias is not None:
            bound = 1 / math.sqrt(self.bank.shape[1:].numel())
            with torch.no_grad():
                self.bias.uniform_(-bound, bound)

    def reset_parameters(self) -> None:
        """Every kernel, and ``W_s`` for PAD, initialised again like a conv weight (the bank's
        :meth:`~pad.DynamicWeights.reset_parameters`), then the bias."""
        self.bank.reset_parameters()
        self._init_bias()

    @property
    def num_kernels(self) -> int:
        return self.bank.num_kernels

    @property
    def geometry(self) -> ConvGeometry:
        """What the schemes convolve with: the conv's own zero padding, 0 where :meth:`pad_input` pads."""
        return ConvGeometry(self.stride, self._conv_padding, self.dilation, self.groups)

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` padded explicitly where the conv's padding is not symmetric zeros (``padding_mode``
        other than ``zeros``, or ``"same"`` with an odd total ``dilation (k - 1)``), else ``x`` itself:
        ``(B, C, H, W) -> (B, C, H + top + bottom, W + left + right)``."""
        if self._input_pads is None:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self._input_pads, mode=mode)

    def kernel_terms(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(kernels (K, *S), static (*S) or None)``, with PAD's static part folded into
        the kernels where the routing sums to 1 (``W'_k = lambda_d M W_k + lambda_s (1 - M) W_s``);
        kept in :attr:`cache`, so evaluating a PAD model folds once, not once per batch."""
        if type(self.bank) is DynamicWeights:  # (a plain bank returns its parameter: nothing to cache)
            return self._fold()
        return self.cache.get("fold", self.bank, self.training, self._fold)

    def train(self, mode: bool = True):
        if mode:  # (eval() keeps the cache: its keys still tell whether an entry is stale)
            self.cache.clear()
        return super().train(mode)

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.bank(fold=self.routing_sums_to_one)

    def conv_terms(self, attention) -> ConvTerms:
        """The :class:`ConvTerms` of a batch from the attention's output (routing ``(B, K)``)."""
        return self.routed_terms(attention, *self.kernel_terms())

    def routed_terms(self, routing: torch.Tensor, kernels: torch.Tensor, static: torch.Tensor | None) -> ConvTerms:
        """The :class:`ConvTerms` of the attention's output over the given kernels ``(K, O', ...)``."""
        return ConvTerms(routing, kernels, static)

    def has_spatial_attention(self, attention) -> bool:
        """Whether the attention's output scales kernel positions (ODConv's spatial attention)."""
        return False

    @property
    def static_units_are_one_conv(self) -> bool:
        """Whether static output units are one ordinary conv of the (scaled) input, the unit path's
        premise; not where an attention scales the static kernel positions per sample."""
        return True

    def static_scales(self, attention) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(in_scale (B, C), out_scale (B, O))`` that PAD's static part gets from the attention's
        output, each ``None`` where it gets none (every layer but ODConv's ``channel-filter``)."""
        return None, None

    def _out_pixels(self, x: torch.Tensor) -> int:
        """Output pixels of the layer for its input ``x`` (before :meth:`pad_input`)."""
        extent = self.dilation * (self.kernel_size - 1) + 1
        left, right, top, bottom = self._input_pads or (0, 0, 0, 0)
        height = x.shape[-2] + top + bottom + 2 * self._conv_padding
        width = x.shape[-1] + left + right + 2 * self._conv_padding
        return ((height - extent) // self.stride + 1) * ((width - extent) // self.stride + 1)

    def cost(self, x: torch.Tensor) -> LayerCost:
        """What the cost model reads of the layer for its input ``x`` ``(B, C, H, W)``."""
        return LayerCost(self.num_kernels, self.in_channels // self.groups, self.kernel_size, self._out_pixels(x))

    def weighted_conv(self, x: torch.Tensor, attention) -> torch.Tensor:
        """The conv of ``x`` ``(B, C, H, W)`` with the kernels the attention's output selects."""
        key, cost = scheme_key(x), self.cost(x)
        applicable = applicable_schemes(self.kernel_size, self.has_spatial_attention(attention))
        scheme = self.chooser.scheme(key, applicable, x.shape[0], cost)
        split = self.unit_split()
        unit = split is not None and self.chooser.path(key, scheme, split.dynamic.numel() > 0, cost) == "unit"
        x = self.pad_input(x)  # (after the choices: they are keyed by the layer's input size)
        if unit:
            out = self._unit_conv(x, attention, split, scheme)
        else:
            out = SCHEME_FUNCTIONS[scheme](x, self.conv_terms(attention), self.geometry)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    # ------------------------------------------------------------ unit-structured PAD

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels

    def unit_split(self) -> UnitSplit | None:
        """The :class:`UnitSplit` the layer computes with, or ``None`` for the element path.

        A PAD bank is split where :func:`pad.mixing.unit_split_applies` (``unit`` granularity, some unit
        static, the mask not being scored), the layer's groups allow one ordinary conv per side (``groups``
        1 or depthwise) and its static units are one conv (:attr:`static_units_are_one_conv`); an inference
        bank holding a split gives that.  Otherwise the element path computes the same output.  A split does
        not mean the unit path is taken: the chooser decides (:meth:`dyconv.schemes.SchemeChooser.path`).
        Cached like the fold (eval mode without autograd) and the unit indices until the mask changes.
        """
        bank = self.bank
        if not isinstance(bank, PartiallyDynamicWeights):
            return bank.unit_split() if hasattr(bank, "unit_split") else None  # the inference form's
        one_conv_per_side = (self.groups == 1 or self.depthwise) and self.static_units_are_one_conv
        if not one_conv_per_side or not unit_split_applies(bank):
            return None
        return self.cache.get("split", bank, self.training, bank.unit_split)

    def _unit_conv(self, x: torch.Tensor, attention, split: UnitSplit, scheme: str) -> torch.Tensor:
        """The output of :mod:`dyconv.unit_path` (static and dynamic filters apart), in channel order (no bias)."""
        static_out = static_units_conv(x, split, self.geometry, self.depthwise, *self.static_scales(attention))
        if split.dynamic.numel() == 0:
            return static_out.index_select(1, split.order) + self._zero_tie(attention)
        terms = self.routed_terms(attention, split.kernels, None)
        dynamic_out = dynamic_units_conv(x, split, terms, self.geometry, self.depthwise, scheme)
        return torch.cat([dynamic_out, static_out], 1).index_select(1, split.order)

    def _zero_tie(self, attention) -> torch.Tensor | float:
        """:func:`pad.mixing.zero_tie` of the attention's outputs and the bank's kernels: a layer without dynamic
        units gives them zero gradients, as the element path does."""
        parts = attention if isinstance(attention, tuple) else (attention,)
        kernels = getattr(self.bank, "kernels", None)
        return zero_tie(*parts, kernels if isinstance(kernels, nn.Parameter) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weighted_conv(x, self.attention(x))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding!r}, dilation={self.dilation}, padding_mode={self.padding_mode!r}, "
                f"groups={self.groups}, kernels={self.num_kernels}, "
                f"pad={isinstance(self.bank, PartiallyDynamicWeights)}, bias={self.bias is not None}, "
                f"scheme={self.chooser.policy!r}")


@register_conv("condconv")
class CondConv2d(RoutedConv2d):
    """CondConv (Yang et al. 2019): ``W(x) = sum_k sigmoid(FC(GAP(x)))_k W_k``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | str = 0, groups: int = 1, bias: bool = False, kernels: int = 4, pad: bool = False,
                 scale_factors: str = "both", scheme: str = "auto",
                 dilation: int = 1, padding_mode: str = "zeros"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, bias, kernels, pad,
                         scale_factors, dilation, scheme, padding_mode)
        self.attention = CondConvRouting(in_channels, kernels)


@register_conv("dyconv")
class DynamicConv2d(RoutedConv2d):
    """DY-Conv (Chen et al. 2020): ``W(x) = sum_k softmax(z(x) / tau)_k W_k``; PAD folded."""

    routing_sums_to_one = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | str = 0, groups: int = 1, bias: bool = False, kernels: int = 4, pad: bool = False,
                 scale_factors: str = "both", reduction: int = 4, temperature: float = 30.0, scheme: str = "auto",
                 dilation: int = 1, padding_mode: str = "zeros"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, bias, kernels, pad,
                         scale_factors, dilation, scheme, padding_mode)
        self.attention = DynamicConvAttention(in_channels, kernels, reduction, temperature)

    @classmethod
    def factory_kwargs(cls, options: ConvOptions) -> dict:
        return {**super().factory_kwargs(options), "reduction": options.reduction, "temperature": options.temperature}


@register_conv("odconv")
class ODConv2d(RoutedConv2d):
    """ODConv (Li et al. 2022): ``W~(x) = a_s ⊙ a_c ⊙ a_f ⊙ sum_k a_w,k W_k``.

    The input-channel attention scales the input and the filter attention the output
    (exact, as in the authors' code); the spatial attention scales kernel positions, so
    layers with one (k > 1) run the ``grouped`` scheme.  With PAD, ``static_attention``
    (:data:`ODCONV_STATIC_ATTENTIONS`) says which attentions scale the static part
    ``S = lambda_s (1 - M) W_s``:

    * ``"none"`` (default, DESIGN's ``Omega``): ``W~(x) ⊙ lambda_d M + S``, no attention on ``S``;
      ``S`` is not folded into the kernels (see the module docstring);
    * ``"channel-filter"`` (the authors' release): ``a_c ⊙ a_f ⊙ (lambda_d M ⊙ a_s ⊙ sum_k a_w,k W_k + S)``,
      the input-channel and filter attentions scale the whole conv; folded into the kernels where
      the layer has no spatial attention (the kernel attention sums to 1);
    * ``"all"``: ``a_c ⊙ a_f ⊙ a_s ⊙ sum_k a_w,k W'_k``, ODConv over the folded kernels
      ``W'_k = lambda_d M W_k + S`` (DESIGN's folding remark); unit-structured masks take the
      element path where a spatial attention scales the static filters.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int | str = 0, groups: int = 1, bias: bool = False, kernels: int = 4, pad: bool = False,
                 scale_factors: str = "both", reduction: int = 4, temperature: float = 30.0, scheme: str = "auto",
                 static_attention: str = "none", dilation: int = 1, padding_mode: str = "zeros"):
        _check_static_attention(static_attention)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups, bias, kernels, pad,
                         scale_factors, dilation, scheme, padding_mode)
        self.attention = ODConvAttention(in_channels, out_channels, kernel_size, groups, kernels, reduction,
                                         temperature)
        self.static_attention = static_attention

    @classmethod
    def factory_kwargs(cls, options: ConvOptions) -> dict:
        return {**super().factory_kwargs(options), "reduction": options.reduction, "temperature": options.temperature,
                "static_attention": options.odconv_static_attention}

    @property
    def _static_scaled(self) -> bool:
        return self.static_attention != "none"

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        no_spatial = self.attention.spatial_fc is None
        return self.bank(fold=self.static_attention == "all" or (self._static_scaled and no_spatial))

    @property
    def static_units_are_one_conv(self) -> bool:
        return not (self.static_attention == "all" and self.attention.spatial_fc is not None)

    def has_spatial_attention(self, attention: ODConvAttentionWeights) -> bool:
        return attention.spatial is not None

    def static_scales(self, attention: ODConvAttentionWeights) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (attention.channel, attention.filter) if self._static_scaled else (None, None)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", static_attention={self.static_attention!r}"

    def routed_terms(self, attention: ODConvAttentionWeights, kernels: torch.Tensor,
                     static: torch.Tensor | None) -> ConvTerms:
        batch = attention.channel.shape[0]
        routing = attention.kernel if attention.kernel is not None else attention.channel.new_ones(batch, 1)
        return ConvTerms(routing, kernels, static, in_scale=attention.channel, out_scale=attention.filter,
                         spatial=attention.spatial, static_scaled=self._static_scaled)


def dynamic_convs(model: nn.Module):
    """Yields ``(name, layer)`` for every dynamic conv (:class:`RoutedConv2d`) of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, RoutedConv2d):
            yield name, module


def set_conv_scheme(model: nn.Module, scheme: str) -> None:
    """Sets every dynamic conv's scheme policy (``auto`` or a scheme's name) and forgets past choices
    (schemes and unit/element paths)."""
    check_policy(scheme)
    for _, layer in dynamic_convs(model):
        layer.chooser.reset(scheme)


def conv_schemes(model: nn.Module) -> dict[str, dict]:
    """``{layer name: {"policy": ..., "chosen": {scheme_key: scheme}, "paths": {scheme_key: path}}}``:
    what a checkpoint records (``paths``: the unit/element path of a unit-structured PAD layer)."""
    return {name: layer.chooser.record() for name, layer in dynamic_convs(model)}


def restore_conv_schemes(model: nn.Module, recorded: dict[str, dict] | None) -> None:
    """Restores :func:`conv_schemes` output; ``None`` (a checkpoint written before schemes
    were recorded) keeps the model's own policy, whose choices are then made afresh; an entry
    without ``paths`` (written before paths were chosen) chooses its paths afresh."""
    if recorded is None:
        return
    layers = dict(dynamic_convs(model))
    if set(recorded) != set(layers):
        raise ValueError("the recorded conv schemes name other layers than this model's")
    for name, entry in recorded.items():
        layers[name].chooser.restore(entry, name)


# ---------------------------------------------------------------- factory and temperature

def conv_factory(conv: str, pad: bool = False, kernels: int = 4, reduction: int = 4, scale_factors: str = "both",
                 temperature: float = 30.0, scheme: str = "auto", odconv_static_attention: str = "none") -> ConvMaker:
    """A constructor ``make(in_ch, out_ch, kernel_size, stride=1, padding=0, groups=1, bias=False, dilation=1,
    padding_mode="zeros")`` (``padding`` also ``"same"`` or ``"valid"``, as for ``nn.Conv2d``) of the conv
    registered as ``conv`` (:data:`CONV_TYPES`).

    ``static`` gives ``nn.Conv2d``; the dynamic convs their layer, partially dynamic when ``pad``.
    ``reduction`` and ``temperature`` are used by DY-Conv and ODConv (CondConv has neither);
    ``scheme`` is every dynamic layer's execution scheme policy (``auto`` or a scheme's name);
    ``odconv_static_attention`` is PAD-ODConv's ``static_attention`` (other than ``"none"`` only where
    :func:`static_attention_applies`).
    """
    if conv not in CONV_TYPES:
        raise ValueError(f"unknown conv {conv!r}; expected one of {tuple(CONV_TYPES)}")
    layer_type = CONV_TYPES[conv]
    dynamic = issubclass(layer_type, RoutedConv2d)
    if pad and not dynamic:
        raise ValueError(f"PAD needs a dynamic conv ({named_dynamic_convs()}), not {conv}")
    if kernels < 1:
        raise ValueError(f"number of kernels must be >= 1, got {kernels}")
    if reduction < 1:
        raise ValueError(f"attention reduction must be >= 1, got {reduction}")
    if scale_factors not in SCALE_FACTOR_VARIANTS:
        raise ValueError(f"unknown scale factors {scale_factors!r}; expected one of {SCALE_FACTOR_VARIANTS}")
    _check_positive_temperature(temperature)
    check_policy(scheme)
    _check_static_attention(odconv_static_attention)
    if odconv_static_attention != "none" and not static_attention_applies(conv, pad):
        raise ValueError(f"the ODConv static attention {odconv_static_attention!r} needs PAD-ODConv (conv odconv "
                         f"with pad), not conv {conv} with pad={pad}")
    options = ConvOptions(pad, kernels, reduction, scale_factors, temperature, scheme, odconv_static_attention)

    def make(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int | str = 0, groups: int = 1,
             bias: bool = False, dilation: int = 1, padding_mode: str = "zeros") -> nn.Module:
        if not dynamic:
            return layer_type(in_ch, out_ch, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
        return layer_type(in_ch, out_ch, kernel_size, stride=stride, padding=padding, groups=groups, bias=bias,
                          dilation=dilation, padding_mode=padding_mode, **layer_type.factory_kwargs(options))

    return make


def _tempered(model: nn.Module) -> list[nn.Module]:
    """The attentions of ``model``'s dynamic convs that have a ``temperature`` (DY-Conv's, ODConv's)."""
    return [layer.attention for _, layer in dynamic_convs(model) if hasattr(layer.attention, "temperature")]


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
