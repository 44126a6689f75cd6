"""Iterative Mode Partition (IMP): decide which positions of every PAD layer stay dynamic.

Starting from an all-dynamic mask, ``T`` rounds each score the still-dynamic
positions and keep the best ``kappa_t * N`` of them dynamic, with
``kappa_t = kappa ** (t / T)`` (``exponential``) or ``1 - (1 - kappa) t / T``
(``linear``).  Positions made static never come back.  ``global`` scope ranks all
PAD layers together, ``local`` ranks each layer on its own.

Criteria (higher score = more worth keeping dynamic):

* ``taylor`` (default): ``|sum over batches of dL/dM|``, the first-order change of
  the loss when a position turns static.  Since ``Omega = lambda_d M W~ +
  lambda_s (1 - M) W_s``, ``dL/dM = sum_samples g * (lambda_d W~ - lambda_s W_s)``
  with ``g = dL/dOmega``.
* ``random``: uniform random scores.
* ``magnitude``: ``mean_k |W_k|``, the mean absolute value of the dynamic kernels
  at the position (magnitude pruning applied to the dynamic part; data-free).
* ``grasp``: the GraSP criterion (Wang et al. 2020) on the mask, ``M * (H g)`` with
  ``g = dL/dM`` and ``H`` the Hessian of the loss w.r.t. ``M``; positions whose
  removal would most reduce gradient flow stay dynamic.
* ``synflow``: the SynFlow criterion (Tanaka et al. 2020) on the mask: with every
  parameter replaced by its absolute value and the model in eval mode,
  ``|M * dR/dM|`` where ``R = synflow_fn(model, batch)`` (typically the sum of the
  outputs for an all-ones input); data-free apart from the input's shape.  It is
  computed in float64 (parameters, buffers and floating inputs), since its
  products of absolute weights overflow float32 on deep networks; the model's own
  tensors are put back untouched afterwards.

Model state while scoring.  Every module is in eval mode (no dropout, no gate
noise) except, with ``batchnorm="batch"`` (the default), BatchNorm layers
(``torch.nn.modules.batchnorm._BatchNorm``): they normalise with the statistics
of the partition batch, because a model trained from scratch still has its
initial running statistics, under which whole channels are dead and their
positions score exactly 0.  Their running statistics and ``num_batches_tracked``
are restored byte for byte afterwards.  ``batchnorm="running"`` scores in plain
eval mode (the authors' release).  SynFlow always uses running statistics (its
input is one constant sample).  Every module gets its own mode back afterwards;
the parameters' ``.grad`` are never touched.  (A ``SyncBatchNorm`` in train mode
synchronises across processes: score such a model on every rank, or with
``batchnorm="running"``.)

Granularity (``element``, ``kernel``, ``unit``; see :mod:`pad.mixing`).  A unit's
score is the sum of its positions' scores.  Units of one layer have one size and
are ranked by that sum; the global scope ranks units of different layers by
score per position (sum / size), the greedy order of the knapsack "keep the most
score within a budget of positions", which is the element ranking when units are
single positions.  The kept set is the prefix of that ranking whose size in
positions is closest to the target, so the ratio is met to within one unit per
layer (half the size of the boundary unit).

Ties and what decided.  Ties are broken at random (seeded by ``generator``,
drawn on the generator's device so a seed gives the same order on every device),
never by position.  Each round records the share of the positions it made static
that were chosen at random among exactly tied scores at the selection boundary;
a round where that share exceeds one half (:data:`CANNOT_RANK_SHARE`: the
criterion decided less than half of what the round did) is logged as a round
the criterion could not rank, and :attr:`PartitionReport.decided_by` names the
share of all positions made static that random tie-breaking chose.  Non-finite
scores at still-dynamic positions are a ``ValueError``.

Devices.  Every tensor IMP creates lives on the device of the masks it selects
(random draws are made on the generator's device and moved there explicitly);
nothing relies on the default device.

Upcycled models.  A model whose dynamic kernels all start as copies of a pretrained weight,
the static part included (``moe.modeling.convert_to_moe``, ``dyconv.convert.convert_to_dynamic``),
has ``lambda_d W~ = lambda_s W_s`` before training, so its taylor and grasp scores are zero up
to float rounding (not exactly: ``sum_k g_k W_k - W_s sum_k g_k`` rounds), and the tie
bookkeeping above does not see it.  IMP therefore records the layers of ``K > 1`` bitwise
identical kernels (:attr:`PartitionReport.identical_kernels`) and, for those criteria, logs a
warning: partition such a model after a few training steps.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .mixing import PartiallyDynamicWeights, check_granularity, unit_grid, unit_view, weight_banks
from .stats import dynamic_ratio as overall_dynamic_ratio

CRITERIA = ("taylor", "random", "magnitude", "grasp", "synflow")
SCHEDULES = ("exponential", "linear")
SCOPES = ("global", "local")
BATCHNORM_MODES = ("batch", "running")
DATA_CRITERIA = ("taylor", "grasp")
CANNOT_RANK_SHARE = 0.5
IDENTICAL_KERNELS_NOTE = ("data-driven scores there are zero up to rounding and rank at random; "
                          "train a few steps before partitioning")

LossFn = Callable[[nn.Module, Any], torch.Tensor]
logger = logging.getLogger(__name__)


@dataclass
class PartitionReport:
    """What IMP did: target and achieved ratios, per layer and per iteration.

    ``criterion`` is the criterion asked for; ``decided_by`` says what really decided:
    the criterion, or the criterion plus the share of the positions made static that
    random tie-breaking chose.  ``tie_broken_per_iteration``: that share per round.
    ``batchnorm``: the BatchNorm statistics the model was scored with (``None`` for
    criteria that do not run the model).  ``identical_kernels``: the layers (of ``K > 1``
    kernels) whose kernels were all equal when IMP ran, as upcycling leaves them before
    training (see the module docstring).
    """
    target: float
    achieved: float
    criterion: str
    schedule: str
    scope: str
    iterations: int
    granularity: str = "element"
    batchnorm: str | None = "batch"
    decided_by: str = ""
    per_layer: dict[str, float] = field(default_factory=dict)
    ratio_per_iteration: list[float] = field(default_factory=list)
    tie_broken_per_iteration: list[float] = field(default_factory=list)
    identical_kernels: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def format(self) -> str:
        batchnorm = f", BatchNorm {self.batchnorm} statistics" if self.batchnorm else ""
        lines = [f"IMP {self.criterion}/{self.schedule}/{self.scope}/{self.granularity}, T={self.iterations}"
                 f"{batchnorm}: dynamic ratio {self.achieved:.4f} (target {self.target:.4f}), "
                 f"decided by {self.decided_by}"]
        lines += [f"  round {t}: {100 * share:.3g}% of the positions made static were tie-broken at random"
                  for t, share in enumerate(self.tie_broken_per_iteration, 1) if share > 0]
        if self.identical_kernels:
            lines.append(f"  {len(self.identical_kernels)} of {len(self.per_layer)} layers had identical kernels "
                         f"(upcycled, untrained?): {IDENTICAL_KERNELS_NOTE}")
        lines += [f"  {name or '<root>'}: {ratio:.4f}" for name, ratio in self.per_layer.items()]
        return "\n".join(lines)


@dataclass
class Selection:
    """What one selection did, in positions: how many it made static, and how many of those
    were chosen at random among exactly tied scores at the selection boundary."""
    made_static: int = 0
    tie_broken: int = 0

    def __add__(self, other: "Selection") -> "Selection":
        return Selection(self.made_static + other.made_static, self.tie_broken + other.tie_broken)

    @property
    def tie_share(self) -> float:
        return self.tie_broken / self.made_static if self.made_static else 0.0


def decided_by(criterion: str, selection: Selection) -> str:
    """``criterion``, or ``criterion (x% tie-broken at random)`` when ties decided some of ``selection``."""
    if selection.tie_broken == 0:
        return criterion
    return f"{criterion} ({100 * selection.tie_share:.3g}% tie-broken at random)"


def ratio_schedule(dynamic_ratio: float, iterations: int, schedule: str = "exponential") -> list[float]:
    """The ratio kept after each of the ``iterations`` rounds; the last one is ``dynamic_ratio``."""
    check_dynamic_ratio(dynamic_ratio)
    if schedule == "exponential":
        return [dynamic_ratio ** (t / iterations) for t in range(1, iterations + 1)]
    if schedule == "linear":
        return [1.0 - (1.0 - dynamic_ratio) * t / iterations for t in range(1, iterations + 1)]
    raise ValueError(f"unknown partition schedule {schedule!r}; expected one of {SCHEDULES}")


def _ceil_significant(value: float, digits: int = 3) -> float:
    """``value`` rounded up to ``digits`` significant digits (a printed bound that still passes)."""
    if value <= 0:
        return value
    scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
    candidate = float(f"{math.ceil(value / scale) * scale:.{digits}g}")
    while candidate < value:
        candidate = float(f"{candidate + scale:.{digits}g}")
    return candidate


def smallest_dynamic_ratio(model: nn.Module, scope: str = "global", granularity: str = "element") -> float:
    """The smallest dynamic ratio for which IMP surely keeps a dynamic unit: one unit of the largest
    size among all PAD layers (``global``: all layers are ranked together, so one dynamic unit in the
    whole model), or one unit in every layer (``local``: each layer keeps its own share).

    IMP keeps the prefix of ranked units closest to ``ratio * positions``; asking for at least one
    whole unit makes that prefix non-empty whatever the scores.  ``ValueError`` for a model without
    PAD layers, an unknown scope, or a granularity a layer's shape lacks."""
    if scope not in SCOPES:
        raise ValueError(f"unknown partition scope {scope!r}; expected one of {SCOPES}")
    banks = dict(weight_banks(model))
    if not banks:
        raise ValueError("the model has no partially dynamic layers to partition")
    _check_granularity_fits(banks, granularity)
    layers = []  # (positions, positions per unit) of every layer
    for bank in banks.values():
        positions = math.prod(bank.shape)
        layers.append((positions, positions // math.prod(unit_grid(bank.shape, granularity))))
    if scope == "global":
        return max(size for _, size in layers) / sum(positions for positions, _ in layers)
    return max(size / positions for positions, size in layers)


def check_dynamic_ratio(dynamic_ratio: float, model: nn.Module | None = None, scope: str = "global",
                        granularity: str = "element", name: str = "dynamic ratio") -> None:
    """``ValueError`` unless ``dynamic_ratio`` is in (0, 1] and, given the ``model`` it will partition,
    keeps at least one dynamic unit (:func:`smallest_dynamic_ratio`): a smaller ratio would leave every
    PAD layer (``global``) or some PAD layer (``local``) fully static, a static model labelled PAD.
    ``name`` names the ratio in the message (e.g. the command-line flag)."""
    if not (0.0 < dynamic_ratio <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {dynamic_ratio}")
    if model is None:
        return
    smallest = smallest_dynamic_ratio(model, scope, granularity)
    if dynamic_ratio < smallest:
        where = "the model" if scope == "global" else "some layer"
        positions = sum(math.prod(b.shape) for _, b in weight_banks(model))
        raise ValueError(f"{name} {dynamic_ratio:g} would leave no dynamic position in {where} ({positions} PAD "
                         f"positions, {granularity} granularity, {scope} scope): a static model is not PAD; the "
                         f"smallest ratio that keeps one dynamic {granularity} per "
                         f"{'model' if scope == 'global' else 'layer'} is {_ceil_significant(smallest)}")


def _check_batchnorm(batchnorm: str) -> None:
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"unknown batchnorm mode {batchnorm!r}; expected one of {BATCHNORM_MODES}")


def _permutation(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A random permutation of ``range(n)`` on ``device``, drawn on the generator's device."""
    draw_device = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=draw_device).to(device)


# ---------------------------------------------------------------- model state while scoring

@contextlib.contextmanager
def scoring_state(model: nn.Module, batchnorm: str = "batch"):
    """Every module in eval mode, except BatchNorm layers in train mode with ``batchnorm="batch"``;
    afterwards every module's mode and every BatchNorm buffer (running statistics,
    ``num_batches_tracked``) are back exactly as they were."""
    _check_batchnorm(batchnorm)
    modes = [(m, m.training) for m in model.modules()]
    saved = []
    model.eval()
    if batchnorm == "batch":
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                saved.append((module, {k: b.detach().clone() for k, b in module._buffers.items() if b is not None}))
                module.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in saved:
                for key, value in buffers.items():
                    module._buffers[key].copy_(value)
        for module, mode in modes:
            module.training = mode


def _to_float64(value):
    return value.to(torch.float64) if torch.is_tensor(value) and value.is_floating_point() else value


@contextlib.contextmanager
def _absolute_float64(model: nn.Module, masks: list[torch.Tensor]):
    """SynFlow's model: every floating parameter and buffer replaced by a float64 copy of its absolute
    value (masks by a float64 copy that requires grad), floating inputs of ``model`` cast to float64.
    Yields the float64 masks; afterwards the original tensors are back in place, untouched."""
    mask_ids = {id(m) for m in masks}
    replacements: dict[int, torch.Tensor] = {}

    def replacement(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in replacements:
            copy = t.detach().to(torch.float64, copy=True)
            replacements[id(t)] = copy.requires_grad_(True) if id(t) in mask_ids else copy.abs_()
        return replacements[id(t)]

    params = [p for p in {id(p): p for p in model.parameters()}.values() if p.is_floating_point()]
    param_data = [(p, p.data) for p in params]
    buffers = [(module, key, b) for module in model.modules() for key, b in module._buffers.items()
               if b is not None and b.is_floating_point()]
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: (tuple(_to_float64(a) for a in args), {k: _to_float64(v) for k, v in kwargs.items()}),
        with_kwargs=True)
    try:
        for p, data in param_data:
            p.data = replacement(data)
        for module, key, b in buffers:
            module._buffers[key] = replacement(b)
        yield [replacement(m) for m in masks]
    finally:
        hook.remove()
        for p, data in param_data:
            p.data = data
        for module, key, b in buffers:
            module._buffers[key] = b


# ---------------------------------------------------------------- criteria
# Each returns one score tensor per bank, of the bank's static shape, on the bank's device.

def _mask_gradients(model: nn.Module, masks: list[torch.Tensor], batches: Iterable, loss_fn: LossFn,
                    weights: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """``sum over batches of dL/dM`` for every mask; with ``weights``, the gradient of
    ``sum_b <dL_b/dM, weights>`` instead (a Hessian-vector product)."""
    total = [torch.zeros_like(m) for m in masks]
    for batch in batches:
        loss = loss_fn(model, batch)
        grads = torch.autograd.grad(loss, masks, create_graph=weights is not None, allow_unused=True)
        grads = [torch.zeros_like(m) if g is None else g for g, m in zip(grads, masks)]
        if weights is not None:
            inner = sum((g * w).sum() for g, w in zip(grads, weights))
            grads = torch.autograd.grad(inner, masks, allow_unused=True)
            grads = [torch.zeros_like(m) if g is None else g for g, m in zip(grads, masks)]
        for acc, g in zip(total, grads):
            acc.add_(g.detach())
    return total


def _taylor(model, banks, batches, loss_fn, synflow_fn, generator):
    masks = [b.mask for b in banks]
    return [g.abs() for g in _mask_gradients(model, masks, batches, loss_fn)]


def _random(model, banks, batches, loss_fn, synflow_fn, generator):
    draw_device = (lambda b: generator.device) if generator is not None else (lambda b: b.mask.device)
    return [torch.rand(b.mask.shape, generator=generator, dtype=b.mask.dtype, device=draw_device(b)).to(b.mask.device)
            for b in banks]


def _magnitude(model, banks, batches, loss_fn, synflow_fn, generator):
    return [b.kernels.detach().abs().mean(0) for b in banks]


def _grasp(model, banks, batches, loss_fn, synflow_fn, generator):
    masks = [b.mask for b in banks]
    batches = list(batches)
    gradient = _mask_gradients(model, masks, batches, loss_fn)
    hessian_gradient = _mask_gradients(model, masks, batches, loss_fn, weights=gradient)
    return [m.detach() * hg for m, hg in zip(masks, hessian_gradient)]


def _synflow(model, banks, batches, loss_fn, synflow_fn, generator):
    if synflow_fn is None:
        raise ValueError("the synflow criterion needs synflow_fn(model, batch) -> scalar")
    first = next(iter(batches))
    device_type = banks[0].mask.device.type
    with _absolute_float64(model, [b.mask for b in banks]) as masks, torch.autocast(device_type, enabled=False):
        grads = torch.autograd.grad(synflow_fn(model, first), masks, allow_unused=True)
        return [torch.zeros_like(m) if g is None else (m.detach() * g).abs() for g, m in zip(grads, masks)]


_CRITERIA = {"taylor": _taylor, "random": _random, "magnitude": _magnitude, "grasp": _grasp, "synflow": _synflow}


def score_positions(model: nn.Module, batches: Sequence, loss_fn: LossFn | None, criterion: str = "taylor",
                    synflow_fn: LossFn | None = None, generator: torch.Generator | None = None,
                    batchnorm: str = "batch") -> dict[str, torch.Tensor]:
    """Scores every position of every PAD layer of ``model`` (no selection).

    ``batchnorm``: ``batch`` (BatchNorm normalises with the batch's statistics) or
    ``running`` (plain eval mode); see the module docstring.  Returns ``{bank name:
    scores of the bank's static shape, on the bank's device}`` (float64 for synflow).
    """
    if criterion not in _CRITERIA:
        raise ValueError(f"unknown partition criterion {criterion!r}; expected one of {CRITERIA}")
    _check_batchnorm(batchnorm)
    named = list(weight_banks(model))
    if not named:
        raise ValueError("the model has no partially dynamic layers to partition")
    banks = [b for _, b in named]
    for b in banks:
        b.mask.requires_grad_(True)
    mode = batchnorm if criterion in DATA_CRITERIA else "running"
    try:
        with scoring_state(model, mode):
            scores = _CRITERIA[criterion](model, banks, batches, loss_fn, synflow_fn, generator)
    except ValueError as err:
        if mode == "batch" and "more than 1 value per channel" in str(err):
            raise ValueError(f"scoring with BatchNorm batch statistics needs more than one value per channel "
                             f"({err}); use larger partition batches or batchnorm='running'") from None
        raise
    finally:
        for b in banks:
            b.mask.requires_grad_(False)
    return {name: s.detach() for (name, _), s in zip(named, scores)}


# ---------------------------------------------------------------- selection

def _check_finite(banks: dict[str, PartiallyDynamicWeights], scores: dict[str, torch.Tensor], what: str) -> None:
    """Raises ``ValueError`` if a score at a still-dynamic position is NaN or infinite."""
    bad, first = 0, None
    for name, bank in banks.items():
        score = scores[name]
        count = int((~torch.isfinite(score) & (bank.mask.to(score.device) > 0)).sum())
        if count and first is None:
            first = name
        bad += count
    if bad:
        candidates = sum(int(b.mask.sum()) for b in banks.values())
        raise ValueError(f"{what} are not finite at {bad} of {candidates} still-dynamic positions "
                         f"(first in {first!r}); the partition would be arbitrary")


def _prefix_count(kept_positions: torch.Tensor, keep: float) -> int:
    """Index of the entry of ``kept_positions`` (ascending int64) closest to ``keep``, the first on a tie."""
    return int((kept_positions.to(torch.float64) - keep).abs().argmin())  # float64: exact to 2**53 positions


def _select_units(density: torch.Tensor, sizes: torch.Tensor, candidate: torch.Tensor, keep: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, Selection]:
    """Keeps the best candidate units, ``keep`` positions in all, to within half the boundary unit.

    Args:
        density: ``(U,)`` float64 score per position of each unit.
        sizes: ``(U,)`` int64 positions per unit.
        candidate: ``(U,)`` bool, the still-dynamic units.
        keep: positions to keep (not rounded: the prefix closest to it is kept, the shorter on a tie).
    Returns:
        ``(kept (U,) bool, Selection)``; every tensor on ``density``'s device.
    """
    n_candidates = int(candidate.sum())
    candidate_sizes = sizes[candidate]
    if n_candidates == 0:
        return torch.zeros_like(candidate), Selection()
    if bool((candidate_sizes == candidate_sizes[0]).all()):
        return _select_equal_units(density, int(candidate_sizes[0]), candidate, n_candidates, keep, generator)
    return _select_ranked_units(density, sizes, candidate, n_candidates, keep, generator)


def _select_equal_units(density: torch.Tensor, size: int, candidate: torch.Tensor, n_candidates: int,
                        keep: float, generator: torch.Generator | None) -> tuple[torch.Tensor, Selection]:
    """:func:`_select_units` when every candidate unit has ``size`` positions, in O(U) without a sort.

    The kept count follows from ``keep`` alone; the ``count``-th best score is the boundary value:
    units above it are kept, and the rest of the count is drawn at random among the units
    exactly equal to it (the only place where the order of tied units matters).
    """
    device = density.device
    closest = round(keep / size)
    counts = torch.tensor([min(max(c, 0), n_candidates) for c in range(closest - 2, closest + 3)],
                          dtype=torch.int64, device=device)
    count = int(counts[_prefix_count(counts * size, keep)])
    kept = torch.zeros(density.numel(), dtype=torch.bool, device=device)
    if count == 0:
        return kept, Selection(made_static=n_candidates * size)
    scores = density[candidate]
    boundary = scores.kthvalue(n_candidates - count + 1).values  # the count-th largest score
    kept = candidate & (density > boundary)
    tied = (candidate & (density == boundary)).nonzero().flatten()
    missing = count - int(kept.sum())
    tied_and_dropped = tied.numel() - missing
    if tied_and_dropped:  # the boundary tie is split: the kept ones are drawn at random among the tied
        tied = tied[_permutation(tied.numel(), generator, device)[:missing]]
    kept[tied] = True
    return kept, Selection(made_static=(n_candidates - count) * size, tie_broken=tied_and_dropped * size)


def _select_ranked_units(density: torch.Tensor, sizes: torch.Tensor, candidate: torch.Tensor, n_candidates: int,
                         keep: float, generator: torch.Generator | None) -> tuple[torch.Tensor, Selection]:
    """:func:`_select_units` for units of several sizes: a full ranking, ties in random order."""
    device = density.device
    shuffle = _permutation(density.numel(), generator, device)
    order = torch.sort(torch.where(candidate, density, float("-inf"))[shuffle], descending=True, stable=True)
    ranked = shuffle[order.indices]
    kept_positions = torch.cat([sizes.new_zeros(1), sizes[ranked[:n_candidates]].cumsum(0)])
    count = _prefix_count(kept_positions, keep)
    kept = torch.zeros(density.numel(), dtype=torch.bool, device=device)
    kept[ranked[:count]] = True
    selection = Selection(made_static=int(kept_positions[-1] - kept_positions[count]))
    if 0 < count < n_candidates and order.values[count - 1] == order.values[count]:
        tied_and_dropped = candidate & ~kept & (density == order.values[count - 1])
        selection.tie_broken = int(sizes[tied_and_dropped].sum())
    return kept, selection


def _units(bank: PartiallyDynamicWeights, score: torch.Tensor, granularity: str, device: torch.device):
    """``(density (U,) float64, sizes (U,) int64, candidate (U,) bool)`` of one bank, on ``device``."""
    candidate = bank.unit_mask(granularity).flatten().to(device)
    sums = unit_view(score.to(device=device, dtype=torch.float64), granularity).sum(1)
    size = bank.mask.numel() // candidate.numel()
    return sums / size, torch.full_like(candidate, size, dtype=torch.int64), candidate


def _set_mask(bank: PartiallyDynamicWeights, kept_units: torch.Tensor, granularity: str) -> None:
    units = unit_view(bank.mask, granularity)
    bank.mask.copy_(kept_units.to(bank.mask.device)[:, None].expand_as(units).reshape(bank.mask.shape))
    bank.granularity = granularity


def select_dynamic(banks: dict[str, PartiallyDynamicWeights], scores: dict[str, torch.Tensor],
                   ratio: float, scope: str = "global", generator: torch.Generator | None = None,
                   granularity: str = "element") -> Selection:
    """Sets every bank's mask to keep ``ratio`` of all positions dynamic, best units first,
    choosing only among the units still dynamic (see the module docstring for units and ties).

    ``scores``: ``{bank name: scores of the bank's static shape}``.  Returns what the selection
    did (:class:`Selection`).  Raises ``ValueError`` on non-finite scores at still-dynamic
    positions, on a granularity the banks' shapes do not have, and on masks that are not
    structured at ``granularity``.
    """
    check_granularity(granularity)
    _check_finite(banks, scores, "partition scores")
    if scope == "global":
        device = next(iter(banks.values())).mask.device
        parts = [_units(b, scores[n], granularity, device) for n, b in banks.items()]
        density, sizes, candidate = (torch.cat(p) for p in zip(*parts))
        total = sum(b.mask.numel() for b in banks.values())
        kept, selection = _select_units(density, sizes, candidate, ratio * total, generator)
        offset = 0
        for bank, (_, _, c) in zip(banks.values(), parts):
            _set_mask(bank, kept[offset:offset + c.numel()], granularity)
            offset += c.numel()
        return selection
    if scope == "local":
        selection = Selection()
        for name, bank in banks.items():
            units = _units(bank, scores[name], granularity, bank.mask.device)
            kept, one = _select_units(*units, ratio * bank.mask.numel(), generator)
            _set_mask(bank, kept, granularity)
            selection = selection + one
        return selection
    raise ValueError(f"unknown partition scope {scope!r}; expected one of {SCOPES}")


@torch.no_grad()
def _reset_masks(banks, granularity: str) -> None:
    for b in banks:
        b.mask.fill_(1)
        b.granularity = granularity


def _check_granularity_fits(banks: dict[str, PartiallyDynamicWeights], granularity: str) -> None:
    check_granularity(granularity)
    for name, bank in banks.items():
        try:
            unit_grid(bank.shape, granularity)
        except ValueError as err:
            raise ValueError(f"PAD layer {name!r}: {err}") from None


def iterative_mode_partition(model: nn.Module, batches: Sequence, loss_fn: LossFn | None, dynamic_ratio: float,
                             iterations: int = 10, criterion: str = "taylor", schedule: str = "exponential",
                             scope: str = "global", synflow_fn: LossFn | None = None,
                             generator: torch.Generator | None = None, granularity: str = "element",
                             batchnorm: str = "batch") -> PartitionReport:
    """Runs IMP on every :class:`~pad.PartiallyDynamicWeights` in ``model``, in place.

    Args:
        model: any module holding PAD banks (their masks are reset to all dynamic first).
        batches: the partition batches, reused in every iteration (a list, not a one-shot iterator); a batch is
            whatever ``loss_fn`` takes, e.g. ``(inputs, labels)`` or a dict of model inputs.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (``taylor``, ``grasp``; ``None`` for the data-free ones).
        dynamic_ratio: target ``kappa`` in (0, 1], counted in positions.
        iterations: ``T`` >= 1.
        criterion: what ranks positions, one of :data:`CRITERIA` (defined in the module docstring): ``taylor``
            (the paper's), ``random``, ``magnitude``, ``grasp``, ``synflow``.
        schedule: how the ratio falls from 1 to ``kappa`` over the iterations, one of :data:`SCHEDULES`
            (``exponential``, the paper's, or ``linear``).
        scope: one of :data:`SCOPES`: ``global`` ranks positions over all layers at once (the paper's),
            ``local`` gives every layer the target ratio.
        synflow_fn: ``synflow_fn(model, batch) -> scalar`` (``synflow`` only).
        generator: the random source of ``random`` scores and of tie-breaking (default: torch's global one).
        granularity: ``element`` (default, the paper's), ``kernel`` or ``unit``; set on every bank.
        batchnorm: ``batch`` (default) or ``running``: the BatchNorm statistics taylor and grasp score with.
    Returns:
        a :class:`PartitionReport`; the achieved ratio equals the target to within one unit
        (one position for ``element``) per layer.
    Raises:
        ValueError: bad arguments, a granularity the layers' shapes lack, non-finite scores.
    """
    check_dynamic_ratio(dynamic_ratio)
    if iterations < 1:
        raise ValueError(f"partition iterations must be >= 1, got {iterations}")
    if scope not in SCOPES:
        raise ValueError(f"unknown partition scope {scope!r}; expected one of {SCOPES}")
    if criterion not in _CRITERIA:
        raise ValueError(f"unknown partition criterion {criterion!r}; expected one of {CRITERIA}")
    if criterion in DATA_CRITERIA and loss_fn is None:
        raise ValueError(f"the {criterion} criterion needs loss_fn(model, batch) -> scalar")
    _check_batchnorm(batchnorm)
    ratios = ratio_schedule(dynamic_ratio, iterations, schedule)
    banks = dict(weight_banks(model))
    if not banks:
        raise ValueError("the model has no partially dynamic layers to partition")
    _check_granularity_fits(banks, granularity)
    check_dynamic_ratio(dynamic_ratio, model, scope, granularity)  # before anything is scored
    batches = list(batches)
    identical = [name for name, bank in banks.items()
                 if bank.num_kernels > 1 and bool((bank.kernels == bank.kernels[:1]).all())]
    if identical and criterion in DATA_CRITERIA:
        logger.warning("IMP: %d of %d PAD layers have identical kernels (an upcycled model before training?): the "
                       "%s %s", len(identical), len(banks), criterion, IDENTICAL_KERNELS_NOTE)
    _reset_masks(banks.values(), granularity)
    achieved, rounds = [], []
    for t, ratio in enumerate(ratios, 1):
        scores = score_positions(model, batches, loss_fn, criterion, synflow_fn, generator, batchnorm)
        _check_finite(banks, scores, f"IMP round {t}: the {criterion} scores")
        with torch.no_grad():
            rounds.append(select_dynamic(banks, scores, ratio, scope, generator, granularity))
        achieved.append(overall_dynamic_ratio(model))
        if rounds[-1].tie_share > CANNOT_RANK_SHARE:
            logger.warning("IMP round %d/%d: the %s scores cannot rank the positions: %.1f%% of the positions "
                           "made static were chosen at random among exactly tied scores",
                           t, iterations, criterion, 100 * rounds[-1].tie_share)
    total = sum(rounds, Selection())
    return PartitionReport(
        target=dynamic_ratio, achieved=achieved[-1], criterion=criterion, schedule=schedule, scope=scope,
        iterations=iterations, granularity=granularity,
        batchnorm=batchnorm if criterion in DATA_CRITERIA else ("running" if criterion == "synflow" else None),
        decided_by=decided_by(criterion, total),
        per_layer={n: b.dynamic_ratio() for n, b in banks.items()}, ratio_per_iteration=achieved,
        tie_broken_per_iteration=[r.tie_share for r in rounds], identical_kernels=identical)
