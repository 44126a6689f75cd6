"""Execution schemes of a dynamic convolution: exact ways to compute one layer's output.

Every dynamic conv of :mod:`dyconv.layers` reduces its forward pass to one
:class:`ConvTerms` and hands it to a scheme.  With ``x_b`` sample ``b`` of the input,
every scheme computes the same ``(B, O, H', W')`` output::

    y_b = out_scale_b ⊙ conv(in_scale_b ⊙ x_b,  spatial_b ⊙ sum_k routing[b, k] W_k)  +  conv(x_b, static)

(``⊙`` broadcasts over the channel axis; missing terms are ones / zero), or, with ``static_scaled``
(the static part inside the input and output scales, not the spatial one: PAD-ODConv as the
authors' release computes it)::

    y_b = out_scale_b ⊙ conv(in_scale_b ⊙ x_b,  spatial_b ⊙ sum_k routing[b, k] W_k  +  static)

The schemes differ in cost only:

* ``grouped``: per-sample weights ``routing @ W.flatten(1)`` (``B x |W|`` memory), one
  conv with ``groups = B * groups`` over the input viewed as ``(1, B*C, H, W)``.  Same
  MACs as a static conv, but a poorly parallel conv and weights of ``B |W|``.  Always
  applicable; at ``B = 1`` it is one plain conv.
* ``stacked``: one ordinary conv over the ``K`` kernels stacked on the output axis
  (``K x`` the MACs, ``K x B x O x H' x W'`` outputs), outputs mixed by the routing
  (a batched matmul).  Never builds per-sample weights.  Not exact with a spatial
  attention (ODConv's ``spatial_b`` scales kernel positions, not outputs).
* ``bmm``: 1x1 convs as a per-sample batched matmul ``W_b (O, C) @ x_b (C, H'W')``
  (strided input for stride > 1).

The static part is added as a ``(K+1)``-th kernel with routing 1 where that is exact (no input or
output scale applies, as for CondConv PAD, or the scales apply to it too and there is no spatial
attention), else by one ordinary conv (ODConv PAD) or into the per-sample weight (``grouped``).

Which scheme a layer runs (:func:`choose_scheme`, by the cost model of :func:`modelled_cost`) and, for a
unit-structured PAD layer, which path (:func:`prefers_unit_path`) is decided by the layer's
:class:`SchemeChooser`, once per batch class and input size, and recorded.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

SCHEMES = ("grouped", "stacked", "bmm")
POLICIES = ("auto",) + SCHEMES


def check_policy(policy: str) -> str:
    """``policy`` itself if it is one of :data:`POLICIES`, else ``ValueError``."""
    if policy not in POLICIES:
        raise ValueError(f"unknown conv scheme {policy!r}; expected one of {POLICIES}")
    return policy


# Cost model, in units of the layer's static conv (forward + backward), fitted on CPU with the default
# allocator (K = 4; the 3x3 convs of ResNet-18 at batch 32, results/measured/bench_dyconv-full-layers.txt, and of
# the --mini suite's ResNet-10 at width 16, 28 px, batch 64, one thread):
#   grouped ~ 1 + GROUPED_OVERHEAD * (C/g) k^2 / (H' W')   (1.2x at 64 ch/28x28 ... 5.5x at 128 ch/7x7,
#                                                            14x at 64 ch/4x4, 18x at 256 ch/4x4)
#   stacked ~ K + 1                                         (3.3x to 6x everywhere at K = 4)
# Every coefficient between about 0.17 and 0.34 picks the faster of the two on every measured layer where they
# differ by more than 10%; 0.2 is a round value in that range. A fit on ResNet-18's layers alone (0.1) keeps
# grouped on 7x7 and 4x4 outputs of 64-128 input channels, where it costs 1.6x-4x stacked.
GROUPED_OVERHEAD = 0.2

# Unit-structured PAD layers: the two exact ways of computing one (see ``prefers_unit_path``)
PATHS = ("element", "unit")
# The modelled cost (static convs) from which a unit-structured layer takes the unit path: its own work (index
# selects, a cat, a second scheme call) is only repaid where the scheme costs clearly more than a static conv.
UNIT_PATH_MIN_COST = 1.5


class ConvGeometry(NamedTuple):
    stride: int
    padding: int
    dilation: int
    groups: int


class ConvTerms(NamedTuple):
    """What a dynamic conv convolves, for a batch of ``B`` samples.

    routing: ``(B, K)``; kernels: ``(K, O, C // groups, kh, kw)``; static: ``(O, C // groups, kh, kw)``
    or ``None``; in_scale: ``(B, C)`` or ``None``; out_scale: ``(B, O)`` or ``None``;
    spatial: ``(B, kh * kw)`` or ``None``; static_scaled: whether ``in_scale`` and ``out_scale``
    scale the static part too (see the module docstring).
    """
    routing: torch.Tensor
    kernels: torch.Tensor
    static: torch.Tensor | None = None
    in_scale: torch.Tensor | None = None
    out_scale: torch.Tensor | None = None
    spatial: torch.Tensor | None = None
    static_scaled: bool = False

    @property
    def scaled(self) -> bool:
        return self.in_scale is not None or self.out_scale is not None

    def static_as_kernel(self) -> "ConvTerms":
        """The static part moved into the kernels as one more kernel with routing 1, where that is
        exact: the input/output scales apply to it as to the kernels (none, or ``static_scaled``) and
        no spatial attention scales the kernels alone; otherwise the terms unchanged."""
        if self.static is None or (self.scaled and not self.static_scaled) or self.spatial is not None:
            return self
        ones = self.routing.new_ones(self.routing.shape[0], 1)
        return self._replace(routing=torch.cat([self.routing, ones], 1),
                             kernels=torch.cat([self.kernels, self.static.unsqueeze(0)]), static=None)


def mix_kernels(routing: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """``sum_k routing[b, k] * kernels[k]`` as one matmul: ``(B, K), (K, *S) -> (B, *S)``."""
    return (routing @ kernels.flatten(1)).view(routing.shape[0], *kernels.shape[1:])


def _static_conv(x: torch.Tensor, terms: ConvTerms, geometry: ConvGeometry) -> torch.Tensor | None:
    if terms.static is None:
        return None
    return F.conv2d(x, terms.static, None, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)


def _finish(out: torch.Tensor, x: torch.Tensor, terms: ConvTerms, geometry: ConvGeometry) -> torch.Tensor:
    """Applies the output scale and adds the static conv of ``x``."""
    if terms.out_scale is not None:
        out = out * terms.out_scale[:, :, None, None]
    static = _static_conv(x, terms, geometry)
    return out if static is None else out + static


def _channel_scale_per_weight(in_scale: torch.Tensor, out_channels: int, groups: int) -> torch.Tensor:
    """``(B, C) -> (B, O, C // groups, 1, 1)``: the input-channel scale each weight entry reads."""
    batch, channels = in_scale.shape
    per_group = channels // groups
    scale = in_scale.view(batch, groups, 1, per_group).expand(batch, groups, out_channels // groups, per_group)
    return scale.reshape(batch, out_channels, per_group, 1, 1)


def per_sample_weight(terms: ConvTerms) -> torch.Tensor:
    """``Omega_b`` ``(B, O, C // groups, kh, kw)``: everything folded into one weight per sample."""
    weight = mix_kernels(terms.routing, terms.kernels)
    batch, out_channels, _, kh, kw = weight.shape
    if terms.spatial is not None:
        weight = weight * terms.spatial.view(batch, 1, 1, kh, kw)
    if terms.static is not None and terms.static_scaled:
        weight = weight + terms.static
    if terms.in_scale is not None:
        groups = terms.in_scale.shape[1] // weight.shape[2]
        weight = weight * _channel_scale_per_weight(terms.in_scale, out_channels, groups)
    if terms.out_scale is not None:
        weight = weight * terms.out_scale.view(batch, out_channels, 1, 1, 1)
    return weight if terms.static is None or terms.static_scaled else weight + terms.static


def _static_unscaled(terms: ConvTerms) -> bool:
    """Whether the static part must stay outside the input/output scales that the kernels get."""
    return terms.static is not None and terms.scaled and not terms.static_scaled


def grouped(x: torch.Tensor, terms: ConvTerms, geometry: ConvGeometry) -> torch.Tensor:
    """Per-sample weights, one conv with ``groups = B * groups``.  Input and output
    scales are applied to the activations unless a static part must stay unscaled,
    in which case everything is folded into the per-sample weight."""
    batch, channels, height, width = x.shape
    if _static_unscaled(terms):
        weight, inputs = per_sample_weight(terms), x
    else:
        weight = per_sample_weight(terms._replace(in_scale=None, out_scale=None))
        inputs = x if terms.in_scale is None else x * terms.in_scale[:, :, None, None]
    out_channels = weight.shape[1]
    out = F.conv2d(inputs.reshape(1, batch * channels, height, width),
                   weight.reshape(batch * out_channels, *weight.shape[2:]), None, geometry.stride,
                   geometry.padding, geometry.dilation, batch * geometry.groups)
    out = out.view(batch, out_channels, *out.shape[-2:])
    if _static_unscaled(terms):
        return out
    return out if terms.out_scale is None else out * terms.out_scale[:, :, None, None]


def stacked(x: torch.Tensor, terms: ConvTerms, geometry: ConvGeometry) -> torch.Tensor:
    """One conv over the ``K`` kernels stacked on the output axis, outputs mixed by the routing."""
    if terms.spatial is not None:
        raise ValueError("the stacked scheme is not exact with a spatial attention")
    terms = terms.static_as_kernel()
    kernels, groups = terms.kernels, geometry.groups
    num, out_channels, per_group_in, kh, kw = kernels.shape
    per_group_out = out_channels // groups
    # (K, g, O/g, ...) -> (g, K, O/g, ...): each group's K * O/g outputs stay contiguous for the grouped conv
    weight = kernels.view(num, groups, per_group_out, per_group_in, kh, kw).transpose(0, 1)
    weight = weight.reshape(groups * num * per_group_out, per_group_in, kh, kw)
    inputs = x if terms.in_scale is None else x * terms.in_scale[:, :, None, None]
    out = F.conv2d(inputs, weight, None, geometry.stride, geometry.padding, geometry.dilation, groups)
    batch, _, height, width = out.shape
    # reshape, not view: the output of a channels-last input (e.g. a permuted tensor) is channels-last too
    out = out.reshape(batch, groups, num, per_group_out * height * width)
    mixed = torch.einsum("bgkn,bk->bgn", out, terms.routing.to(out.dtype))
    return _finish(mixed.reshape(batch, out_channels, height, width), x, terms, geometry)


def bmm(x: torch.Tensor, terms: ConvTerms, geometry: ConvGeometry) -> torch.Tensor:
    """1x1 conv as a per-sample batched matmul ``(B, g, O/g, C/g) @ (B, g, C/g, H'W')``."""
    if terms.kernels.shape[-2:] != (1, 1):
        raise ValueError("the bmm scheme computes 1x1 convs only")
    strided = x
    if geometry.padding:
        strided = F.pad(strided, [geometry.padding] * 4)
    if geometry.stride > 1:
        strided = strided[:, :, ::geometry.stride, ::geometry.stride]
    own = terms.static_as_kernel()
    weight = per_sample_weight(own._replace(in_scale=None, out_scale=None, static=None))
    inputs = strided if own.in_scale is None else strided * own.in_scale[:, :, None, None]
    batch, channels, height, width = inputs.shape
    groups, out_channels = geometry.groups, weight.shape[1]
    out = torch.matmul(weight.view(batch, groups, out_channels // groups, channels // groups),
                       inputs.reshape(batch, groups, channels // groups, height * width))
    out = out.view(batch, out_channels, height, width)
    return _finish(out, x, own, geometry)


SCHEME_FUNCTIONS: dict[str, Callable[[torch.Tensor, ConvTerms, ConvGeometry], torch.Tensor]] = {
    "grouped": grouped, "stacked": stacked, "bmm": bmm}


def applicable_schemes(kernel_size: int, has_spatial: bool) -> tuple[str, ...]:
    """The schemes that are exact for a layer: grouped always, stacked without spatial
    attention, bmm for 1x1 kernels."""
    schemes = ["grouped"]
    if not has_spatial:
        schemes.append("stacked")
    if kernel_size == 1:
        schemes.append("bmm")
    return tuple(schemes)


def modelled_cost(scheme: str, kernels: int, in_per_group: int, kernel_size: int, out_pixels: int) -> float:
    """Estimated forward + backward time in units of the static conv (see ``GROUPED_OVERHEAD``)."""
    if scheme == "grouped":
        return 1.0 + GROUPED_OVERHEAD * in_per_group * kernel_size ** 2 / max(1, out_pixels)
    if scheme == "stacked":
        return kernels + 1.0
    return 1.0  # bmm: static MACs as one dense batched matmul


def choose_scheme(policy: str, applicable: tuple[str, ...], batch: int, kernels: int, in_per_group: int,
                  kernel_size: int, out_pixels: int) -> str:
    """The scheme a layer runs with.

    ``policy`` names a scheme to force it (``grouped`` where it is not exact for the
    layer); ``auto``: ``grouped`` at batch 1 (one plain conv), ``bmm`` for 1x1 convs,
    otherwise the cheaper of ``grouped`` and ``stacked`` by :func:`modelled_cost`:
    ``stacked`` wins once ``(C/g) k^2 > K H' W' / GROUPED_OVERHEAD`` (at ``K = 4``, ResNet-18's
    convs with 7x7 or smaller outputs and 128 or more input channels: from ``layer4`` at 224 px,
    from ``layer3`` at 112 px); the memory break-even, ``(C/g) k^2 = K H' W'``, lies lower, so
    ``auto`` never picks ``stacked`` where it would also cost more memory.  The choice depends on
    the batch only through ``batch == 1``.
    """
    check_policy(policy)
    if policy != "auto":
        return policy if policy in applicable else "grouped"
    if batch == 1:
        return "grouped"
    if "bmm" in applicable:
        return "bmm"
    costs = [(modelled_cost(s, kernels, in_per_group, kernel_size, out_pixels), s) for s in applicable]
    best_cost, best = costs[0]
    for cost, scheme in costs[1:]:  # a plain loop: torch.compile traces it without a graph break
        if cost < best_cost:
            best_cost, best = cost, scheme
    return best


def prefers_unit_path(scheme: str, kernels: int, in_per_group: int, kernel_size: int, out_pixels: int) -> bool:
    """Whether a unit-structured PAD layer running ``scheme`` should take the unit path.

    The element path runs the whole layer by ``scheme``: ``c`` static convs (:func:`modelled_cost`, at
    every batch size: at batch 1 ``grouped`` is one plain conv, but its per-sample weight still mixes
    all ``K`` kernels of every filter, the part of ``c`` the static filters save).
    The unit path runs its static share ``s`` of the filters as one ordinary conv and the rest by
    the scheme, ``s + (1 - s) c``, plus work of its own (an ``index_select`` and a ``cat`` of the
    outputs, forward and backward, the input's channels gathered twice for depthwise convs, the
    scheme's fixed per-call costs).  It saves ``s (c - 1)``: nothing where ``c ~ 1`` (1x1 convs by
    ``bmm``, depthwise and other grouped convs with many output pixels) while its own work remains.  So it
    is taken only where the scheme costs clearly more than a static conv, ``c >= UNIT_PATH_MIN_COST``:
    ``stacked``, or ``grouped`` with ``(C/g) k^2 >= (UNIT_PATH_MIN_COST - 1) H' W' / GROUPED_OVERHEAD``
    (ResNet-18's 3x3 convs with 128 or more input channels in ``layer3`` and ``layer4`` at 224 px, from
    ``layer2`` on at 112 px; no MobileNetV2 layer).  Both paths are exact.
    """
    return modelled_cost(scheme, kernels, in_per_group, kernel_size, out_pixels) >= UNIT_PATH_MIN_COST


# ---------------------------------------------------------------- a layer's choices

def scheme_key(x: torch.Tensor) -> str:
    """The key a layer's choice is recorded under: batch class and input size, e.g. ``"batch@56x56"``
    (the cost model depends on the batch only through ``B == 1``)."""
    return f"{'single' if x.shape[0] == 1 else 'batch'}@{x.shape[-2]}x{x.shape[-1]}"


class LayerCost(NamedTuple):
    """What the cost model reads of one layer for one input size (see :func:`modelled_cost`)."""
    kernels: int
    in_per_group: int
    kernel_size: int
    out_pixels: int


class SchemeChooser:
    """The scheme, and for a unit-structured PAD layer the path, that one dynamic conv runs with: chosen once
    per batch class and input size (:func:`scheme_key`) and recorded, so that a checkpoint can carry them and a
    resumed or re-evaluated run computes with the same choices.

    Attributes:
        policy: ``auto`` or the name of a scheme to force (:data:`POLICIES`).
        schemes: ``{scheme_key: scheme}``, by :func:`choose_scheme`.
        paths: ``{scheme_key: "unit" | "element"}`` (:data:`PATHS`), by :func:`prefers_unit_path`; empty for a
            layer that never had a unit split.

    Choices made while ``torch.compile`` traces are not recorded (the record is Python state the graph cannot
    write); the eager calls before and after record them.
    """

    def __init__(self, policy: str = "auto"):
        self.policy = check_policy(policy)
        self.schemes: dict[str, str] = {}
        self.paths: dict[str, str] = {}

    def scheme(self, key: str, applicable: tuple[str, ...], batch: int, cost: LayerCost) -> str:
        """The scheme for inputs under ``key``: the recorded one, else :func:`choose_scheme`'s (then recorded)."""
        chosen = self.schemes.get(key)
        if chosen is None:
            chosen = choose_scheme(self.policy, applicable, batch, *cost)
            if not torch.compiler.is_compiling():
                self.schemes[key] = chosen
        return chosen

    def path(self, key: str, scheme: str, has_dynamic_units: bool, cost: LayerCost) -> str:
        """``"unit"`` or ``"element"`` for inputs under ``key`` of a layer with a unit split: the recorded path,
        else the unit path where :func:`prefers_unit_path` says so or no unit is dynamic (the layer is one
        static conv), then recorded.  Both paths run ``scheme`` (the cost model does not depend on the
        filter count), and the path does not depend on the batch size."""
        chosen = self.paths.get(key)
        if chosen is None:
            chosen = "unit" if not has_dynamic_units or prefers_unit_path(scheme, *cost) else "element"
            if not torch.compiler.is_compiling():
                self.paths[key] = chosen
        return chosen

    def reset(self, policy: str) -> None:
        """Takes ``policy`` and forgets every past choice."""
        self.policy = check_policy(policy)
        self.schemes, self.paths = {}, {}

    def record(self) -> dict:
        """``{"policy": ..., "chosen": {scheme_key: scheme}, "paths": {scheme_key: path}}``: what a checkpoint holds."""
        return {"policy": self.policy, "chosen": dict(self.schemes), "paths": dict(self.paths)}

    def restore(self, entry: dict, layer: str) -> None:
        """Takes :meth:`record`'s output (``ValueError`` naming ``layer`` for an unknown scheme or path); an entry
        without ``paths`` (written before paths were chosen) chooses its paths afresh."""
        chosen = dict(entry.get("chosen", {}))
        unknown = [s for s in chosen.values() if s not in SCHEME_FUNCTIONS]
        if unknown:
            raise ValueError(f"recorded conv scheme {unknown[0]!r} of layer {layer!r} is unknown")
        paths = dict(entry.get("paths", {}))
        unknown = [p for p in paths.values() if p not in PATHS]
        if unknown:
            raise ValueError(f"recorded conv path {unknown[0]!r} of layer {layer!r} is unknown; expected one of {PATHS}")
        self.policy = check_policy(entry.get("policy", "auto"))
        self.schemes, self.paths = chosen, paths
