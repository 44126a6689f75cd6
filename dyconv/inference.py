"""The inference form of a PAD model: folded kernels, no mask, no static bank, eval only.

:func:`to_inference` replaces the bank of every PAD conv by an :class:`InferenceWeights`
holding, as buffers, exactly what the forward pass convolves:

* DY-Conv (routing sums to 1): the folded kernels ``W'_k = lambda_d M W_k + lambda_s (1 - M) W_s``,
  ``(K, *S)``, and nothing else; the layer then runs as a plain K-kernel dynamic conv.
* CondConv and ODConv: ``lambda_d M W_k`` ``(K, *S)`` and the static part
  ``lambda_s (1 - M) W_s`` ``(*S)`` (their routing does not sum to 1, or their attentions do
  not scale the static part, so it stays a separate term); ODConv with the ``channel-filter``
  static attention: folded like DY-Conv in its 1x1 convs (no spatial attention), apart in the others;
  with ``all``: folded everywhere.

* a layer whose mask is unit-structured (``unit`` granularity, see
  :meth:`dyconv.layers.RoutedConv2d.unit_split`): an :class:`InferenceUnitWeights` holding
  ``lambda_d W_k[dynamic units]`` ``(K, O_d, ...)`` and the static units as one static weight
  ``lambda_s W_s[static units]`` ``(O_s, ...)``, ``K O_d + O_s`` filters, fewer than the compact
  export stores; where the layer takes the unit path it convolves the static units with it in one
  ordinary conv.  The path is the trained layer's choice (``chooser.paths``, copied with the model;
  :func:`dyconv.schemes.prefers_unit_path` for inputs it has not seen); on the element path the
  bank rebuilds the element form (``forward``), once while the model is evaluated without autograd.

Nothing is recomputed per forward pass beyond what a fully dynamic layer computes: no
mask multiply, no scale factors, no fold.  It stores ``K |W|`` weights per DY-Conv layer
(``(K + 1) |W|`` for CondConv/ODConv), more than the compact export's
``(1 - kappa) |W| + kappa K |W|``: the compact file is the storage form,
this the compute form.  Fully dynamic layers and everything else are kept as they are.
The attention modules, BatchNorms and execution schemes are those of the trained model.
"""
from __future__ import annotations

import copy
import os

import torch
from torch import nn

import pad
from pad.runtime import IntegrityError, error_line
from .layers import UnitSplit, dynamic_convs
from .models import build_model


class InferenceWeights(nn.Module):
    """Fixed kernels of one dynamic conv, ``forward() -> (kernels (K, *S), static (*S) or None)``.

    Buffers, not parameters: nothing here trains, and calling it in training mode raises.
    """

    def __init__(self, kernels: torch.Tensor, static: torch.Tensor | None):
        super().__init__()
        self.register_buffer("kernels", kernels.detach().clone())
        self.register_buffer("static", None if static is None else static.detach().clone())
        self.num_kernels, self.shape = kernels.shape[0], kernels.shape[1:]  # (a buffer keeps its shape)

    def forward(self, fold: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(kernels, static)``; ``fold``: ``(kernels + static, None)`` (the layer folds only where its
        routing sums to 1, and :func:`to_inference` stores DY-Conv's kernels folded already)."""
        if self.training:
            raise RuntimeError("an inference-form model is eval only; train the PAD model it was made from")
        return _terms(self.kernels, self.static, fold)


class InferenceUnitWeights(nn.Module):
    """Fixed split of one unit-structured PAD conv (buffers of a :class:`dyconv.layers.UnitSplit`):
    ``unit_split()`` returns it (the unit path); ``forward()`` the element form, ``(lambda_d M W_k
    (K, *S), lambda_s (1 - M) W_s (*S))`` with zeros where the other part's units are (the element
    path; the layer folds them for DY-Conv as it folds a PAD bank's)."""

    def __init__(self, split: UnitSplit, shape: torch.Size):
        super().__init__()
        for field, tensor in split._asdict().items():
            self.register_buffer(field, tensor.detach().clone())
        self.num_kernels, self.shape = split.kernels.shape[0], torch.Size(shape)

    def unit_split(self) -> UnitSplit:
        if self.training:
            raise RuntimeError("an inference-form model is eval only; train the PAD model it was made from")
        return UnitSplit(*(getattr(self, field) for field in UnitSplit._fields))

    def forward(self, fold: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(kernels (K, *S), static (*S))``; ``fold``: ``(kernels + static, None)``."""
        split = self.unit_split()
        kernels = split.kernels.new_zeros(self.num_kernels, *self.shape).index_copy_(1, split.dynamic, split.kernels)
        static = split.weight.new_zeros(self.shape).index_copy_(0, split.static, split.weight)
        return _terms(kernels, static, fold)


def _terms(kernels: torch.Tensor, static: torch.Tensor | None, fold: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(kernels, static)``, or with ``fold`` ``(kernels + static, None)`` (``static`` broadcast over the ``K`` kernels)."""
    if fold and static is not None:
        return kernels + static, None
    return kernels, static


@torch.no_grad()
def to_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in inference form (see module docstring), in eval mode, without gradients."""
    model = copy.deepcopy(model)
    for _, layer in dynamic_convs(model):
        if isinstance(layer.bank, pad.PartiallyDynamicWeights):
            split = layer.unit_split()
            layer.bank = (InferenceWeights(*layer.kernel_terms()) if split is None
                          else InferenceUnitWeights(split, layer.bank.shape))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def load_compact_model(model: nn.Module, path: str | os.PathLike, arch: str, conv: str) -> nn.Module:
    """``model`` (a PAD model of ``arch``/``conv``) with the compact file at ``path`` loaded into it
    (:func:`pad.load_compact_file`): the one loader of compact files.

    Raises ``ValueError`` naming the reason when the file does not exist, cannot be read or holds another
    architecture, and :class:`pad.runtime.IntegrityError` (a ``ValueError``) when its checksum does not
    match or it records none.
    """
    from safetensors import SafetensorError
    try:
        pad.load_compact_file(model, path)
    except FileNotFoundError:
        raise ValueError(f"compact file {path} does not exist") from None
    except IntegrityError:
        raise
    except (SafetensorError, OSError) as err:
        raise ValueError(f"compact file {path} is not a safetensors file: {error_line(err)}") from None
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"compact file {path} does not fit {arch}/{conv}: {error_line(err)}") from None
    return model


def load_inference(path: str | os.PathLike, arch: str, conv: str = "dyconv", temperature: float = 1.0,
                   **build_kwargs) -> nn.Module:
    """The inference form of ``model_compact.safetensors`` at ``path``, for a PAD model built by
    ``build_model(arch, conv, pad=True, temperature=temperature, **build_kwargs)``
    (:func:`load_compact_model`, then :func:`to_inference`).

    The compact file holds tensors only, not the attention temperature: ``temperature``
    defaults to 1, where the schedule ends (pass the checkpoint's for a run stopped earlier).
    """
    model = build_model(arch, conv, pad=True, temperature=temperature, **build_kwargs)
    return to_inference(load_compact_model(model, path, arch, conv))
