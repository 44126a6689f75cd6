"""Statistics of partially dynamic models: dynamic ratio and stored parameters.

Both count mask positions, whatever the partition granularity (a ``unit`` or ``kernel``
mask is a full-shape mask whose units are all 0 or all 1).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .mixing import PartiallyDynamicWeights, unit_grid, weight_banks


def dynamic_ratio(model: nn.Module) -> float | None:
    """``kappa``: mask entries equal to 1 over all mask entries, over every PAD layer.

    ``None`` when the model has no PAD layer.
    """
    banks = [b for _, b in weight_banks(model)]
    if not banks:
        return None
    return float(sum(b.mask.sum().item() for b in banks) / sum(b.mask.numel() for b in banks))


def unused_parameters(bank: PartiallyDynamicWeights) -> int:
    """Entries a dense bank stores but never uses: ``M`` of ``W_s`` and ``1 - M`` of every kernel."""
    dynamic = int(bank.mask.sum().item())
    static = bank.mask.numel() - dynamic
    return dynamic + static * bank.num_kernels


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Stored parameters of ``model`` (or of any submodule, e.g. the FFN layers).

    ``dense``: every parameter as trained.  ``compact``: what
    :func:`pad.compact.export_compact` stores, i.e. ``dense`` minus the unused
    entries of every PAD layer; per layer ``(1 - kappa)|W| + kappa K |W|`` kernel
    weights instead of ``(K + 1)|W|``.  Masks are counted apart, in ``mask_entries``
    (they are stored as bits, one per unit of the layer's granularity: a ``unit`` mask of a
    conv stores one bit per output filter).
    """
    dense = sum(p.numel() for p in model.parameters())
    banks = [b for _, b in weight_banks(model)]
    return {
        "dense": dense,
        "compact": dense - sum(unused_parameters(b) for b in banks),
        "mask_entries": sum(math.prod(unit_grid(b.mask.shape, b.granularity)) for b in banks),
    }


def scale_factors(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{layer name: (lambda_d, lambda_s)}`` for every PAD layer."""
    out = {}
    for name, bank in weight_banks(model):
        with torch.no_grad():
            lambda_d, lambda_s = bank.scale()
        out[name] = (float(lambda_d), float(lambda_s))
    return out
