"""Kernel banks: the weights a dynamic layer mixes, fully or partially dynamic.

A *bank* owns ``K`` dynamic kernels of one static shape ``S`` (for a conv
``S = (out, in/groups, kh, kw)``, for a linear layer ``S = (out, in)``).  Calling
the bank returns the two parts a layer needs to build its weight:

* ``dynamic``: ``(K, *S)``, the kernels as they enter the input-dependent sum,
* ``static``: ``(*S)`` or ``None``, the input-independent part.

A layer that routes with weights ``pi`` of shape ``(B, K)`` then uses
``pi @ dynamic.flatten(1) + static.flatten()``; a Mixture of Experts uses
``dynamic[e] + static`` for expert ``e``.  The bank knows nothing of
convolutions or tokens.

PAD (partially dynamic) mixing, with a binary mask ``M`` of shape ``S``
(1 = dynamic position)::

    Omega(x) = lambda_d * M * W~(x) + lambda_s * (1 - M) * W_s

Because ``W~(x)`` is linear in the kernels, ``M * W~(x)`` is the same sum over
the masked kernels ``M * W_k``, which is what :class:`PartiallyDynamicWeights`
returns.  Where the routing sums to 1, ``bank(fold=True)`` returns the folded
kernels ``W'_k = lambda_d M W_k + lambda_s (1 - M) W_s`` instead (the static part
inside every kernel), so the layer runs as a fully dynamic one.  Both are computed
by :func:`pad_kernels`: one pass over the ``K |W|`` kernels forward, nothing of
size ``K |W|`` kept for backward.

Granularity.  The mask is always a full float buffer of shape ``S``; its
*granularity* says which blocks of it move together (see :func:`unit_view`):
``element`` (every position on its own, the paper's), ``kernel`` (one
``kh x kw`` slice per output-input pair of a bank of shape ``(O, I, kh, kw)``)
or ``unit`` (one output unit: a slice along dim 0, i.e. a conv's output filter
or a linear layer's output row).  :meth:`PartiallyDynamicWeights.unit_mask`
and :meth:`PartiallyDynamicWeights.dynamic_units` tell a layer which units are
dynamic, so that it can compute the static units with one ordinary op;
:meth:`PartiallyDynamicWeights.unit_split` gives a ``unit`` mask's two parts
(``lambda_d W_k`` on the dynamic units, ``lambda_s W_s`` on the static ones),
and :func:`unit_split_applies` says where a layer computes by them.  A bank keeps its
granularity in its state dict (the ``granularity_code`` buffer), so loading a bank's
state restores its partition whole.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

SCALE_FACTOR_VARIANTS = ("both", "s", "d", "none")
GRANULARITIES = ("element", "kernel", "unit")


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown partition granularity {granularity!r}; expected one of {GRANULARITIES}")


class UnrecordedGranularity(ValueError):
    """A PAD bank's state without its ``granularity_code``: written before banks recorded their partition
    granularity, so nothing tells how its mask is structured.  Loaders name the file (see
    :func:`pad.runtime.predates`)."""


def unit_grid(shape: tuple[int, ...], granularity: str) -> tuple[int, ...]:
    """The shape of the grid of units of a static shape ``S``: ``S`` (``element``),
    ``S[:2]`` (``kernel``, needs ``len(S) >= 3``) or ``S[:1]`` (``unit``)."""
    check_granularity(granularity)
    shape = tuple(shape)
    if granularity == "element":
        return shape
    if granularity == "kernel":
        if len(shape) < 3:
            raise ValueError(f"kernel granularity needs a static shape (out, in, *kernel), got {shape}")
        return shape[:2]
    return shape[:1]


def unit_view(tensor: torch.Tensor, granularity: str) -> torch.Tensor:
    """``tensor`` of a static shape ``S`` viewed as ``(units, positions per unit)``, units in
    row-major order of :func:`unit_grid`."""
    units = math.prod(unit_grid(tensor.shape, granularity))
    return tensor.reshape(units, -1)


def unit_mask(mask: torch.Tensor, granularity: str) -> torch.Tensor:
    """Boolean ``unit_grid(mask.shape, granularity)``: True where the unit of a 0/1 ``mask`` is dynamic.  Raises
    ``ValueError`` if some unit is only partly dynamic."""
    units = unit_view(mask.detach() > 0, granularity)
    dynamic = units.all(1)
    if not torch.equal(dynamic, units.any(1)):
        raise ValueError(f"the mask is not structured at {granularity} granularity: "
                         f"{int((dynamic != units.any(1)).sum())} units are partly dynamic")
    return dynamic.view(unit_grid(mask.shape, granularity))


class UnitSplit(NamedTuple):
    """A bank whose mask is structured by output units, cut into its dynamic and static units.

    dynamic: ``(O_d,)`` int64 indices of the dynamic output units; static: ``(O_s,)`` those of the
    static ones; order: ``(O,)``, the permutation that puts ``cat([dynamic, static] outputs)`` back
    in unit order; kernels: ``(K, O_d, *S[1:])`` ``lambda_d W_k[dynamic]``; weight:
    ``(O_s, *S[1:])`` ``lambda_s W_s[static]``, the same for every kernel (or expert): the static
    units' one ordinary weight.
    """
    dynamic: torch.Tensor
    static: torch.Tensor
    order: torch.Tensor
    kernels: torch.Tensor
    weight: torch.Tensor


def unit_order(dynamic_units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dynamic indices, static indices, order)`` of a boolean ``(O,)`` unit mask (see :class:`UnitSplit`)."""
    dynamic = dynamic_units.nonzero().squeeze(1)
    static = (~dynamic_units).nonzero().squeeze(1)
    order = torch.empty_like(dynamic_units, dtype=torch.long)
    order[torch.cat([dynamic, static])] = torch.arange(dynamic_units.numel(), device=dynamic_units.device)
    return dynamic, static, order


class _PadKernels(torch.autograd.Function):
    """``lambda_d M W_k + lambda_s (1 - M) W_s`` (or ``lambda_d M W_k`` without ``W_s``), see :func:`pad_kernels`.

    Every op is one pass over its operands; the ``|W|``-sized ones are cheap next to the
    ``K |W|`` ones, but there are several, so both kinds are kept few.  Forward: ``lambda_d M``
    and ``(1 - M) lambda_s W_s`` (as ``x - x M``, ``x = lambda_s W_s``), then one fused
    ``K |W|`` pass (``addcmul``).  Saves only its inputs.  Backward, ``G`` the ``(K, *S)``
    output gradient, each term only when its input needs a gradient: ``dW_k = lambda_d M G``
    (one ``K |W|`` pass); ``u = (1 - M) sum_k G_k`` (one read of ``G``), ``dW_s = lambda_s u``,
    ``dlambda_s = <u, W_s>``; ``dlambda_d = <M G, W_k>``, with ``M G`` then also giving ``dW_k``
    (three ops in all: on a GPU, where a small layer's step is bound by kernel launches, the
    number of ops counts, not only the passes).  A factor given as a float 1.0 costs
    no op.  The backward is made of differentiable ops on the saved inputs, so it can itself
    be differentiated (the mask gets no gradient: :func:`pad_kernels` does not use this
    Function when the mask requires one).
    """

    @staticmethod
    def forward(ctx, kernels, mask, lambda_d, static_weight, lambda_s):
        ctx.fixed = tuple(None if isinstance(v, torch.Tensor) else v for v in (lambda_d, lambda_s))
        ctx.save_for_backward(kernels, mask, static_weight,
                              *(v for v in (lambda_d, lambda_s) if isinstance(v, torch.Tensor)))
        dynamic_scale = _scaled(mask, lambda_d)                              # (*S) or broadcastable to it
        if static_weight is None:
            return kernels * dynamic_scale
        return torch.addcmul(static_part(static_weight, mask, lambda_s), kernels, dynamic_scale)

    @staticmethod
    def backward(ctx, grad):
        kernels, mask, static_weight, *learned = ctx.saved_tensors
        lambda_d = learned.pop(0) if ctx.fixed[0] is None else ctx.fixed[0]
        lambda_s = learned.pop(0) if ctx.fixed[1] is None else ctx.fixed[1]
        need_kernels, _, need_lambda_d, need_static, need_lambda_s = ctx.needs_input_grad
        grad_kernels = grad_lambda_d = grad_static = grad_lambda_s = None
        if need_lambda_d:
            masked_grad = grad * mask                                        # M G, (K, *S)
            grad_lambda_d = _dot(masked_grad, kernels)                       # <M G, W>
            if need_kernels:  # in place unless a double backward records this one (create_graph)
                grad_kernels = (masked_grad.mul_(lambda_d) if isinstance(lambda_d, torch.Tensor)
                                and not torch.is_grad_enabled() else _scaled(masked_grad, lambda_d))
        elif need_kernels:
            grad_kernels = grad * _scaled(mask, lambda_d)
        if static_weight is not None and (need_static or need_lambda_s):
            grad_sum = grad.sum(0)
            static_grad_sum = torch.addcmul(grad_sum, grad_sum, mask, value=-1)  # (1 - M) sum_k G_k
            if need_static:
                grad_static = _scaled(static_grad_sum, lambda_s)
            if need_lambda_s:
                grad_lambda_s = _dot(static_grad_sum, static_weight)
        return grad_kernels, None, grad_lambda_d, grad_static, grad_lambda_s


def static_part(static_weight: torch.Tensor, mask: torch.Tensor, lambda_s: torch.Tensor | float) -> torch.Tensor:
    """``lambda_s (1 - M) W_s`` ``(*S)`` in two ``|W|`` ops (one without ``lambda_s``): ``x - x M``, ``x = lambda_s W_s``."""
    scaled = _scaled(static_weight, lambda_s)
    return torch.addcmul(scaled, scaled, mask, value=-1)


def _scaled(tensor: torch.Tensor, factor: torch.Tensor | float) -> torch.Tensor:
    """``factor * tensor``, without an op for the fixed factor 1."""
    return tensor if not isinstance(factor, torch.Tensor) and factor == 1.0 else factor * tensor


def _dot(tensor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``sum(tensor * other)`` (``other`` broadcast to ``tensor``), one pass without a temporary when the shapes match."""
    if tensor.shape == other.shape:
        return torch.dot(tensor.flatten(), other.flatten())
    return (tensor * other).sum()


def pad_kernels(kernels: torch.Tensor, mask: torch.Tensor, lambda_d: torch.Tensor | float,
                static_weight: torch.Tensor | None = None, lambda_s: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``lambda_d M W_k + lambda_s (1 - M) W_s`` for every kernel, ``(K, *S)``: the folded kernels
    ``W'_k``; with ``static_weight=None`` the masked kernels ``lambda_d M W_k`` alone.

    Args:
        kernels: ``W_k``, ``(K, *S)``.
        mask: ``M``, 0/1, of shape ``S`` or broadcastable to it.
        lambda_d, lambda_s: 0-d tensors or floats (a fixed factor, e.g. 1.0).
        static_weight: ``W_s``, ``(*S)``, or ``None``.

    Where the mask requires a gradient (IMP scores ``dL/dM``, GraSP differentiates that
    again) this is the same formula in library ops; otherwise one custom autograd Function
    (see :class:`_PadKernels`): one ``K |W|`` pass forward, only its inputs saved.
    """
    if mask.requires_grad:
        out = (lambda_d * mask) * kernels
        return out if static_weight is None else out + static_part(static_weight, mask, lambda_s)
    return _PadKernels.apply(kernels, mask, lambda_d, static_weight, lambda_s)


class ScaleFactors(nn.Module):
    """The two scale factors of one PAD layer.

    ``variant``:
      * ``both``: one learnable scalar ``phi`` (init 0); ``lambda_d = 2 sigmoid(phi)``,
        ``lambda_s = 2 - lambda_d`` (both start at 1),
      * ``s``: only ``lambda_s = 2 sigmoid(phi)`` is learned, ``lambda_d = 1``,
      * ``d``: only ``lambda_d = 2 sigmoid(phi)`` is learned, ``lambda_s = 1``,
      * ``none``: both fixed at 1, no parameter.
    """

    def __init__(self, variant: str = "both"):
        super().__init__()
        if variant not in SCALE_FACTOR_VARIANTS:
            raise ValueError(f"unknown scale-factor variant {variant!r}; expected one of {SCALE_FACTOR_VARIANTS}")
        self.variant = variant
        if variant != "none":
            self.phi = nn.Parameter(torch.zeros(()))

    def forward(self) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Returns ``(lambda_d, lambda_s)``, each a 0-d tensor or the float 1.0."""
        if self.variant == "none":
            return 1.0, 1.0
        learned = 2.0 * torch.sigmoid(self.phi)
        if self.variant == "both":
            return learned, 2.0 - learned
        if self.variant == "s":
            return 1.0, learned
        return learned, 1.0

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"


@torch.no_grad()
def init_like_conv(weight: torch.Tensor) -> None:
    """Initialises one weight of static shape ``S = (out, in, ...)`` in place as torchvision's ResNets and
    MobileNetV2 initialise their convs (Kaiming normal, fan out): ``normal(0, sqrt(2 / (S[0] prod(S[2:]))))``."""
    nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")


class DynamicWeights(nn.Module):
    """``K`` kernels of static shape ``S``, all positions dynamic.

    Args:
        num_kernels: ``K`` (kernels, or experts).
        shape: the static shape ``S``, ``(out, in, ...)``: at least two dimensions.
    Attributes:
        kernels: parameter ``(K, *S)``, each kernel initialised by :func:`init_like_conv`.
    """

    def __init__(self, num_kernels: int, shape: tuple[int, ...], dtype: torch.dtype | None = None):
        super().__init__()
        if num_kernels < 1:
            raise ValueError(f"number of kernels must be >= 1, got {num_kernels}")
        if len(shape) < 2:
            raise ValueError(f"a bank's static shape has at least two dimensions (out, in, ...), got {tuple(shape)}")
        self.kernels = nn.Parameter(torch.empty(num_kernels, *shape, dtype=dtype))
        self._init_kernels()

    def _init_kernels(self) -> None:
        for kernel in self.kernels:
            init_like_conv(kernel)

    def reset_parameters(self) -> None:
        """Initialises every weight of the bank again (:func:`init_like_conv`, kernel by kernel)."""
        self._init_kernels()

    @property
    def num_kernels(self) -> int:
        return self.kernels.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.kernels.shape[1:]

    def forward(self, fold: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(dynamic (K, *S), None)`` (``fold`` changes nothing: there is no static part)."""
        return self.kernels, None


class PartiallyDynamicWeights(DynamicWeights):
    """``K`` kernels plus one static weight, mixed by a binary mask and two scale factors.

    Attributes:
        kernels: parameter ``(K, *S)``, the dynamic kernels ``W_k``.
        static_weight: parameter ``(*S)``, ``W_s``; like every kernel, initialised by :func:`init_like_conv`.
        mask: float buffer ``(*S)`` of 0/1, 1 = dynamic position (starts all ones).
        scale: :class:`ScaleFactors`.
        granularity: which blocks of the mask move together (``element``, ``kernel``,
            ``unit``; see the module docstring); IMP sets it.
        granularity_code: int64 buffer ``()``, the index of ``granularity`` in :data:`GRANULARITIES`: the
            granularity as the state dict (and so every checkpoint) holds it, so ``load_state_dict`` restores
            it.  A state with a mask but without it is refused (:class:`UnrecordedGranularity`).
            ``granularity`` mirrors it as a string, so that a forward pass reads no device tensor.

    Like ``torch.nn.utils.prune``, the mask is a buffer beside the weights;
    :func:`pad.compact.export_compact` makes it permanent by storing only the
    positions each part uses.
    """

    def __init__(self, num_kernels: int, shape: tuple[int, ...], scale_factors: str = "both",
                 dtype: torch.dtype | None = None, granularity: str = "element"):
        super().__init__(num_kernels, shape, dtype=dtype)
        unit_grid(shape, granularity)  # validates
        self.static_weight = nn.Parameter(torch.empty(*shape, dtype=dtype))
        init_like_conv(self.static_weight)
        self.register_buffer("mask", torch.ones(*shape, dtype=dtype if dtype is not None else torch.get_default_dtype()))
        self.register_buffer("granularity_code", torch.tensor(GRANULARITIES.index(granularity)))
        self._granularity = granularity
        self.scale = ScaleFactors(scale_factors)

    @property
    def granularity(self) -> str:
        """Which blocks of the mask move together: ``GRANULARITIES[granularity_code]``."""
        return self._granularity

    @granularity.setter
    def granularity(self, granularity: str) -> None:
        unit_grid(self.mask.shape, granularity)  # validates
        with torch.no_grad():
            self.granularity_code.fill_(GRANULARITIES.index(granularity))
        self._granularity = granularity

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``nn.Module``'s, after checking the state's ``granularity_code``; then mirrors it in :attr:`granularity`.
        :class:`UnrecordedGranularity` where the state holds the bank's mask but no code, ``ValueError`` for a
        code out of range or a mask (the state's, else the bank's) not structured at that granularity."""
        bank = f"PAD bank {prefix[:-1]!r}" if prefix else "the PAD bank"
        code = state_dict.get(prefix + "granularity_code")
        if code is None and prefix + "mask" in state_dict:
            raise UnrecordedGranularity(f"the state of {bank} holds no granularity_code")
        if code is None:  # no PAD bank's state here: nn.Module's reports what is missing
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            return
        if code.dim() != 0 or code.is_floating_point() or not 0 <= int(code) < len(GRANULARITIES):
            raise ValueError(f"the state of {bank} holds granularity_code {code.tolist()!r}; expected an integer "
                             f"index into {GRANULARITIES}")
        granularity = GRANULARITIES[int(code)]
        mask = state_dict.get(prefix + "mask", self.mask)
        if mask.shape == self.mask.shape:  # (another shape: nn.Module's size-mismatch error)
            try:
                unit_mask(mask, granularity)
            except ValueError as err:
                raise ValueError(f"the state of {bank}: {err}") from None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._granularity = granularity

    def reset_parameters(self) -> None:
        """Initialises the kernels, then ``W_s``, again (:func:`init_like_conv`); the mask and the scale
        factors stay as they are."""
        super().reset_parameters()
        init_like_conv(self.static_weight)

    def forward(self, fold: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(lambda_d * M * W_k  (K, *S),  lambda_s * (1 - M) * W_s  (*S))``; with ``fold``
        (for routings that sum to 1) ``(W'_k = lambda_d M W_k + lambda_s (1 - M) W_s  (K, *S), None)``.
        By :func:`pad_kernels` and :func:`static_part`."""
        lambda_d, lambda_s = self.scale()
        mask = self.mask
        if fold:
            return pad_kernels(self.kernels, mask, lambda_d, self.static_weight, lambda_s), None
        return pad_kernels(self.kernels, mask, lambda_d), static_part(self.static_weight, mask, lambda_s)

    def dynamic_ratio(self) -> float:
        return float(self.mask.sum() / self.mask.numel())

    def unit_mask(self, granularity: str | None = None) -> torch.Tensor:
        """Boolean ``unit_grid(S, granularity)``: True where the unit is dynamic (``granularity``
        defaults to the bank's).  Raises ``ValueError`` if some unit is only partly dynamic."""
        return unit_mask(self.mask, self.granularity if granularity is None else granularity)

    def unit_indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:func:`unit_order` of the output units of a ``unit``-structured mask, recomputed only when the
        mask changes (its version or storage).  Raises ``ValueError`` if the mask is not so structured."""
        mask = self.mask
        key = (mask._version, mask.data_ptr(), mask.device)
        cached = self.__dict__.get("_unit_index_cache")
        if cached is not None and cached[0] == key and not torch.compiler.is_compiling():
            return cached[1]
        indices = unit_order(self.unit_mask("unit"))
        if not torch.compiler.is_compiling():
            self.__dict__["_unit_index_cache"] = (key, indices)
        return indices

    def unit_split(self, scaled: bool = True) -> UnitSplit:
        """The bank cut by output units (:class:`UnitSplit`); exact for any mask structured by output
        units, whatever :attr:`granularity` says.  ``scaled=False``: ``W_k[dynamic]`` and
        ``W_s[static]`` without the scale factors, for a layer that scales its (smaller) outputs
        by ``lambda_d`` and ``lambda_s`` instead."""
        dynamic, static, order = self.unit_indices()
        kernels, weight = self.kernels.index_select(1, dynamic), self.static_weight.index_select(0, static)
        if scaled:
            lambda_d, lambda_s = self.scale()
            kernels, weight = lambda_d * kernels, lambda_s * weight
        return UnitSplit(dynamic, static, order, kernels, weight)

    def dynamic_units(self, granularity: str | None = None) -> torch.Tensor:
        """Indices ``(n_dynamic_units,)`` (int64, on the mask's device) of the dynamic units in the
        flattened unit grid: for ``unit`` the dynamic output units, for ``kernel`` ``o * I + i``."""
        return self.unit_mask(granularity).flatten().nonzero().squeeze(1)


def unit_split_applies(bank: nn.Module) -> bool:
    """Whether a layer over ``bank`` computes by its unit split (:meth:`PartiallyDynamicWeights.unit_split`): a
    PAD bank of ``unit`` granularity with some static unit, whose mask is not being scored.

    A mask that requires grad is being scored (IMP's ``dL/dM``), which the split, not multiplying by the mask,
    would not give; a bank whose every unit is dynamic costs the same whole.  Either way the layer computes
    over the whole bank (the same output).  A layer may add conditions of its own (a conv's groups).
    """
    return (isinstance(bank, PartiallyDynamicWeights) and bank.granularity == "unit" and not bank.mask.requires_grad
            and bank.unit_indices()[1].numel() > 0)


def zero_tie(*tensors: torch.Tensor | None) -> torch.Tensor | float:
    """``0`` that depends on every given tensor (``None`` skipped), for a layer that leaves them unused (no
    dynamic unit): added to its output, it gives the parameters they come from zero gradients, not none,
    which DDP refuses.  The float ``0.0`` where autograd is off."""
    if not torch.is_grad_enabled():
        return 0.0
    total = None
    for tensor in tensors:
        if tensor is not None:
            total = tensor.sum() if total is None else total + tensor.sum()
    return 0.0 * total


def weight_banks(model: nn.Module):
    """Yields ``(name, bank)`` for every :class:`PartiallyDynamicWeights` inside ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, PartiallyDynamicWeights):
            yield name, module


def set_granularity(model: nn.Module, granularity: str) -> None:
    """Declares the granularity of every PAD layer's mask (e.g. on the ranks that took the masks of an IMP run
    elsewhere); raises ``ValueError`` if a mask is not structured so.  Loading needs none: a bank's state holds
    its granularity (``granularity_code``)."""
    banks = list(weight_banks(model))
    for name, bank in banks:
        try:
            bank.unit_mask(granularity)
        except ValueError as err:
            raise ValueError(f"PAD layer {name!r}: {err}") from None
    for _, bank in banks:
        bank.granularity = granularity
