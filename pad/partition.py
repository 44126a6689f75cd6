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
  outputs for an all-ones input); data-free apart from the input's shape.

The model runs in eval mode while it is scored (as in the authors' release) and
gets its mode back afterwards; the parameters' ``.grad`` are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .mixing import PartiallyDynamicWeights, weight_banks
from .stats import dynamic_ratio as overall_dynamic_ratio

CRITERIA = ("taylor", "random", "magnitude", "grasp", "synflow")
SCHEDULES = ("exponential", "linear")
SCOPES = ("global", "local")

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class PartitionReport:
    """What IMP did: target and achieved ratios, per layer and per iteration."""
    target: float
    achieved: float
    criterion: str
    schedule: str
    scope: str
    iterations: int
    per_layer: dict[str, float] = field(default_factory=dict)
    ratio_per_iteration: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def format(self) -> str:
        lines = [f"IMP {self.criterion}/{self.schedule}/{self.scope}, T={self.iterations}: "
                 f"dynamic ratio {self.achieved:.4f} (target {self.target:.4f})"]
        lines += [f"  {name or '<root>'}: {ratio:.4f}" for name, ratio in self.per_layer.items()]
        return "\n".join(lines)


def ratio_schedule(dynamic_ratio: float, iterations: int, schedule: str = "exponential") -> list[float]:
    """The ratio kept after each of the ``iterations`` rounds; the last one is ``dynamic_ratio``."""
    check_dynamic_ratio(dynamic_ratio)
    if schedule == "exponential":
        return [dynamic_ratio ** (t / iterations) for t in range(1, iterations + 1)]
    if schedule == "linear":
        return [1.0 - (1.0 - dynamic_ratio) * t / iterations for t in range(1, iterations + 1)]
    raise ValueError(f"unknown partition schedule {schedule!r}; expected one of {SCHEDULES}")


def check_dynamic_ratio(dynamic_ratio: float) -> None:
    if not (0.0 < dynamic_ratio <= 1.0):
        raise ValueError(f"dynamic ratio must be in (0, 1], got {dynamic_ratio}")


# ---------------------------------------------------------------- criteria
# Each returns one score tensor per bank, of the bank's static shape.

def _mask_gradients(model: nn.Module, masks: list[torch.Tensor], batches: Iterable, loss_fn: LossFn,
                    create_graph: bool = False, weights: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
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
    return [torch.rand(b.mask.shape, generator=generator).to(b.mask) for b in banks]


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
    masks = [b.mask for b in banks]
    mask_ids = {id(m) for m in masks}
    # every floating tensor of the state once (tied weights appear under several names)
    tensors = list({id(t): t for t in model.state_dict(keep_vars=True).values()
                    if t.is_floating_point() and id(t) not in mask_ids}.values())
    with torch.no_grad():
        signs = [t.sign() for t in tensors]
        for t in tensors:
            t.abs_()
    try:
        first = next(iter(batches))
        grads = torch.autograd.grad(synflow_fn(model, first), masks, allow_unused=True)
    finally:
        with torch.no_grad():
            for t, sign in zip(tensors, signs):
                t.mul_(sign)
    return [torch.zeros_like(m) if g is None else (m.detach() * g).abs() for g, m in zip(grads, masks)]


_CRITERIA = {"taylor": _taylor, "random": _random, "magnitude": _magnitude, "grasp": _grasp, "synflow": _synflow}


def score_positions(model: nn.Module, batches: Sequence, loss_fn: LossFn | None, criterion: str = "taylor",
                    synflow_fn: LossFn | None = None, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Scores every position of every PAD layer of ``model`` (no selection).

    Returns ``{bank name: scores of the bank's static shape}``.
    """
    if criterion not in _CRITERIA:
        raise ValueError(f"unknown partition criterion {criterion!r}; expected one of {CRITERIA}")
    named = list(weight_banks(model))
    if not named:
        raise ValueError("the model has no partially dynamic layers to partition")
    banks = [b for _, b in named]
    was_training = model.training
    model.eval()
    for b in banks:
        b.mask.requires_grad_(True)
    try:
        scores = _CRITERIA[criterion](model, banks, batches, loss_fn, synflow_fn, generator)
    finally:
        for b in banks:
            b.mask.requires_grad_(False)
        model.train(was_training)
    return {name: s.detach() for (name, _), s in zip(named, scores)}


# ---------------------------------------------------------------- selection

def _keep_top(scores: torch.Tensor, mask: torch.Tensor, keep: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """A new 0/1 mask keeping the ``keep`` best-scored positions among those where ``mask`` is 1.

    Ties are broken at random (seeded by ``generator``), not by position: when a criterion
    cannot tell positions apart (e.g. taylor on upcycled experts that all equal ``W_s``),
    the partition is then a uniform random one instead of "the first layers stay dynamic".
    """
    flat = torch.where(mask.flatten() > 0, scores.flatten().to(torch.float64),
                       torch.tensor(float("-inf"), dtype=torch.float64))
    keep = min(keep, int(mask.sum().item()))
    new = torch.zeros_like(flat, dtype=mask.dtype)
    if keep > 0:
        shuffle = torch.randperm(flat.numel(), generator=generator)
        ranked = torch.sort(flat[shuffle], descending=True, stable=True).indices[:keep]
        new[shuffle[ranked]] = 1
    return new.view_as(mask)


def select_dynamic(banks: dict[str, PartiallyDynamicWeights], scores: dict[str, torch.Tensor],
                   ratio: float, scope: str = "global", generator: torch.Generator | None = None) -> None:
    """Sets every bank's mask to keep ``ratio`` of all positions dynamic, best scores first,
    choosing only among the positions still dynamic."""
    if scope == "global":
        masks = [b.mask for b in banks.values()]
        total = sum(m.numel() for m in masks)
        joint = _keep_top(torch.cat([scores[n].flatten() for n in banks]),
                          torch.cat([m.flatten() for m in masks]), round(ratio * total), generator)
        offset = 0
        for m in masks:
            m.copy_(joint[offset:offset + m.numel()].view_as(m))
            offset += m.numel()
    elif scope == "local":
        for name, bank in banks.items():
            bank.mask.copy_(_keep_top(scores[name], bank.mask, round(ratio * bank.mask.numel()), generator))
    else:
        raise ValueError(f"unknown partition scope {scope!r}; expected one of {SCOPES}")


@torch.no_grad()
def _reset_masks(banks) -> None:
    for b in banks:
        b.mask.fill_(1)


def iterative_mode_partition(model: nn.Module, batches: Sequence, loss_fn: LossFn | None, dynamic_ratio: float,
                             iterations: int = 10, criterion: str = "taylor", schedule: str = "exponential",
                             scope: str = "global", synflow_fn: LossFn | None = None,
                             generator: torch.Generator | None = None) -> PartitionReport:
    """Runs IMP on every :class:`~pad.PartiallyDynamicWeights` in ``model``, in place.

    Args:
        batches: the partition batches, reused in every iteration (a list, not a one-shot iterator).
        loss_fn: ``loss_fn(model, batch) -> scalar`` (``taylor``, ``grasp``).
        dynamic_ratio: target ``kappa`` in (0, 1].
        iterations: ``T`` >= 1.
        synflow_fn: ``synflow_fn(model, batch) -> scalar`` (``synflow`` only).
    Returns:
        a :class:`PartitionReport`; achieved ratio equals the target to within one
        position per layer.
    """
    check_dynamic_ratio(dynamic_ratio)
    if iterations < 1:
        raise ValueError(f"partition iterations must be >= 1, got {iterations}")
    if scope not in SCOPES:
        raise ValueError(f"unknown partition scope {scope!r}; expected one of {SCOPES}")
    if criterion in ("taylor", "grasp") and loss_fn is None:
        raise ValueError(f"the {criterion} criterion needs loss_fn(model, batch) -> scalar")
    ratios = ratio_schedule(dynamic_ratio, iterations, schedule)
    banks = dict(weight_banks(model))
    if not banks:
        raise ValueError("the model has no partially dynamic layers to partition")
    batches = list(batches)
    _reset_masks(banks.values())
    achieved = []
    for ratio in ratios:
        scores = score_positions(model, batches, loss_fn, criterion, synflow_fn, generator)
        with torch.no_grad():
            select_dynamic(banks, scores, ratio, scope, generator)
        achieved.append(overall_dynamic_ratio(model))
    return PartitionReport(target=dynamic_ratio, achieved=achieved[-1], criterion=criterion, schedule=schedule,
                           scope=scope, iterations=iterations,
                           per_layer={n: b.dynamic_ratio() for n, b in banks.items()},
                           ratio_per_iteration=achieved)

