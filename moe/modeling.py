"""Mixture-of-Experts (MoE) and PAD-MoE feed-forward layers for BERT-family models.

:class:`MoELinear` replaces one ``nn.Linear(in, out)`` by ``E`` experts behind a
noisy top-k gate (:mod:`moe.gating`).  Its expert weights live in a ``pad`` bank:

* ``moe="moe"``: :class:`pad.DynamicWeights` ``(E, out, in)``, expert ``e`` uses ``W_e``;
* ``moe="pad"``: :class:`pad.PartiallyDynamicWeights`, expert ``e`` uses
  ``Omega_e = lambda_d * M * W_e + lambda_s * (1 - M) * W_s`` with ``W_s`` the
  pretrained dense weight shared by all experts and one mask ``M (out, in)`` per
  layer, shared by its experts.

Biases stay per expert (``(E, out)``).  ``Omega_e`` does not depend on the input,
so the bank is called once per forward pass and each token is multiplied only by
the ``k`` experts it is routed to.

:func:`convert_to_moe` upcycles the feed-forward layers of any ``transformers``
BERT-family model (every expert a copy of the dense layer, gates at zero), so the
converted, untrained model computes what the dense one does, and hooks the model so
that its ``attention_mask`` reaches every MoE layer (routing statistics count real
tokens only); :func:`load_model` rebuilds a saved MoE/PAD-MoE model from its
``config.moe`` (full ``model.safetensors`` or the compact ``model_compact.safetensors``
that :func:`save_compact_model` writes).
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import pad
from pad.mixing import (SCALE_FACTOR_VARIANTS, UnitSplit, UnrecordedGranularity, set_granularity, unit_split_applies,
                        weight_banks, zero_tie)
from pad.runtime import predates
from moe.gating import NoisyTopKGate

MOE_TYPES = ("none", "moe", "pad")
MOE_LAYERS = ("intermediate", "output", "both")
COMPACT_WEIGHTS = "model_compact.safetensors"


class MoELinear(nn.Module):
    """``E`` linear experts ``in -> out`` with token-level noisy top-k routing.

    Args:
        in_features, out_features: the replaced linear layer's sizes.
        num_experts: ``E``; top_k: ``k``; aux_loss_coef: the gate's load-balancing coefficient.
        moe: ``"moe"`` (fully dynamic experts) or ``"pad"`` (partially dynamic, shared ``W_s``).
        scale_factors: PAD scale-factor variant (``pad.mixing.SCALE_FACTOR_VARIANTS``); unused for ``"moe"``.
        bias: whether the experts have biases.
    Attributes:
        gate: :class:`~moe.gating.NoisyTopKGate`.
        experts: the weight bank, ``kernels (E, out, in)`` (+ ``static_weight``, ``mask (out, in)``, ``scale``).
        bias: parameter ``(E, out)`` or ``None``.
        last_aux_loss: 0-d tensor, the gate's aux loss of the last forward (``None`` before any).
        last_expert_counts: ``(E,)``, real tokens routed to each expert in the last forward.
        token_mask: ``x.shape[:-1]`` (nonzero = real token) or ``None`` (all real), set for the
            duration of a model's forward by the hook :func:`convert_to_moe` installs; only real
            tokens enter the aux loss and the expert counts.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 8, top_k: int = 2,
                 moe: str = "moe", aux_loss_coef: float = 0.01, scale_factors: str = "both", bias: bool = True,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if moe not in ("moe", "pad"):
            raise ValueError(f"unknown MoE layer type {moe!r}; expected 'moe' or 'pad'")
        self.in_features, self.out_features, self.moe = in_features, out_features, moe
        self.gate = NoisyTopKGate(in_features, num_experts, top_k, aux_loss_coef, dtype=dtype)
        shape = (out_features, in_features)
        self.experts = (pad.DynamicWeights(num_experts, shape, dtype=dtype) if moe == "moe"
                        else pad.PartiallyDynamicWeights(num_experts, shape, scale_factors, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features, dtype=dtype)) if bias else None
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_counts: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.gate.num_experts

    @property
    def top_k(self) -> int:
        return self.gate.top_k

    @classmethod
    @torch.no_grad()
    def from_dense(cls, linear: nn.Linear, **kwargs) -> "MoELinear":
        """Upcycles ``linear``: every expert (weight and bias) and ``W_s`` are copies of it;
        the gate starts at zero. ``kwargs`` as for the constructor.  Draws no random numbers: the
        bank's random initialisation, overwritten here, runs on a forked random state."""
        with torch.random.fork_rng(devices=[]):
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        dtype=linear.weight.dtype, **kwargs).to(linear.weight.device)
        layer.train(linear.training)
        layer.experts.kernels.copy_(linear.weight.expand_as(layer.experts.kernels))
        if isinstance(layer.experts, pad.PartiallyDynamicWeights):
            layer.experts.static_weight.copy_(linear.weight)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.expand_as(layer.bias))
        return layer

    def expert_weights(self) -> torch.Tensor:
        """``(E, out, in)``: every expert's effective weight (one call of the bank; PAD: the folded
        ``lambda_d M W_e + lambda_s (1 - M) W_s``, :func:`pad.pad_kernels`)."""
        return self.experts(fold=True)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., in) -> (..., out)``; sets ``last_aux_loss`` and ``last_expert_counts``
        (over the tokens that ``token_mask`` marks real)."""
        tokens = x.reshape(-1, self.in_features)                             # (T, in)
        mask = self.token_mask
        if mask is not None and mask.shape != x.shape[:-1]:
            raise ValueError(f"token mask of shape {tuple(mask.shape)} does not match the input's "
                             f"tokens {tuple(x.shape[:-1])}")
        routing = self.gate(tokens, None if mask is None else mask.reshape(-1))
        self.last_aux_loss, self.last_expert_counts = routing.aux_loss, routing.expert_counts
        split = self.unit_split()
        if split is None:
            result = self._mix_experts(tokens, routing, self.expert_weights(), self.bias)
        else:
            result = self._unit_forward(tokens, routing, split)
        return result.view(*x.shape[:-1], self.out_features)

    def _mix_experts(self, tokens: torch.Tensor, routing, weights: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        """``sum_j gate_j (tokens W_{e_j}^T + b_{e_j})`` over each token's top-k experts:
        ``(T, in), weights (E, out', in), bias (E, out') or None -> (T, out')``."""
        # Sort the T*k (token, expert) assignments by expert, run each expert on its
        # tokens only, weight by the gate and add back per token.
        assigned = routing.top_indices.reshape(-1)                            # (T*k,)
        order = assigned.argsort(stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(assigned, minlength=self.num_experts).tolist()
        inputs = tokens.index_select(0, token_of).split(counts)
        # unbind, not weights[e]: indexing would make backward build E full-size gradients
        biases = [None] * self.num_experts if bias is None else bias.unbind(0)
        outputs = torch.cat([F.linear(chunk, w, b) for chunk, w, b in zip(inputs, weights.unbind(0), biases)])
        #                                                                     (T*k, out')
        outputs = outputs * routing.top_gates.reshape(-1)[order].unsqueeze(1).to(outputs.dtype)
        return outputs.new_zeros(tokens.shape[0], weights.shape[1]).index_add_(0, token_of, outputs)

    def unit_split(self) -> UnitSplit | None:
        """The bank cut by output rows (:meth:`pad.PartiallyDynamicWeights.unit_split`, unscaled) where
        :func:`pad.mixing.unit_split_applies`; else ``None`` (the element path, same output)."""
        return self.experts.unit_split(scaled=False) if unit_split_applies(self.experts) else None

    def _unit_forward(self, tokens: torch.Tensor, routing, split: UnitSplit) -> torch.Tensor:
        """A ``unit``-structured PAD layer, exactly: every expert's static rows are
        ``lambda_s W_s[static]`` and the top-k gates sum to 1, so the static rows are one dense
        matmul per token; only the dynamic rows go through the experts.  The per-expert biases of
        all rows are ``gates (T, E) @ bias (E, out)``.  ``(T, in) -> (T, out)``.

        Each scale factor multiplies whichever holds fewer numbers, the weights (``(O_s, in)``,
        ``(E, O_d, in)``) or the outputs (``(T, O_s)``, ``(T, O_d)``), and both parts are added into
        the bias term (zeros without biases) in place by ``index_add_`` along the output axis: no
        concatenation, no permutation copy and no separate bias add (forward or backward).
        """
        lambda_d, lambda_s = self.experts.scale()
        count = tokens.shape[0]
        if self.in_features <= count:
            static_out = F.linear(tokens, split.weight * lambda_s)            # (T, O_s)
        else:
            static_out = F.linear(tokens, split.weight) * lambda_s
        if self.bias is not None:
            result = routing.gates.to(tokens.dtype) @ self.bias               # (T, O)
        else:
            result = tokens.new_zeros(count, self.out_features)
        if split.dynamic.numel():
            if self.num_experts * self.in_features <= count:
                dynamic_out = self._mix_experts(tokens, routing, split.kernels * lambda_d, None)  # (T, O_d)
            else:
                dynamic_out = self._mix_experts(tokens, routing, split.kernels, None) * lambda_d
            result = result.index_add_(1, split.dynamic, dynamic_out)
        else:  # kernels unused: tied in, so they get zero gradients, not none (DDP)
            result = result + zero_tie(split.kernels)
        return result.index_add_(1, split.static, static_out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, moe={self.moe!r}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, bias={self.bias is not None}")


# ---------------------------------------------------------------- model surgery

def _is_ffn_linear(module) -> bool:
    return isinstance(module, (nn.Linear, MoELinear))


def _feed_forward_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every BERT-style encoder layer: a module whose class name ends
    with ``Layer`` and whose ``intermediate`` and ``output`` each hold a linear ``dense``."""
    return [(name, module) for name, module in model.named_modules()
            if type(module).__name__.endswith("Layer")
            and _is_ffn_linear(getattr(getattr(module, "intermediate", None), "dense", None))
            and _is_ffn_linear(getattr(getattr(module, "output", None), "dense", None))]


def _parts(moe_layers: str) -> tuple[str, ...]:
    return ("intermediate", "output") if moe_layers == "both" else (moe_layers,)


MOE_GRANULARITIES = ("element", "unit")  # a linear layer has no kernel slices


def check_moe_settings(moe: str = "moe", num_experts: int = 8, top_k: int = 2, moe_layers: str = "both",
                       aux_loss_coef: float = 0.01, scale_factors: str = "both",
                       partition_granularity: str = "element") -> None:
    """Raises ``ValueError`` with a clear message for any invalid MoE setting."""
    if partition_granularity not in MOE_GRANULARITIES:
        raise ValueError(f"unknown partition granularity {partition_granularity!r} for MoE layers; expected one "
                         f"of {MOE_GRANULARITIES} (a linear layer has no kernel slices)")
    if moe not in MOE_TYPES:
        raise ValueError(f"unknown moe type {moe!r}; expected one of {MOE_TYPES}")
    if moe_layers not in MOE_LAYERS:
        raise ValueError(f"unknown moe_layers {moe_layers!r}; expected one of {MOE_LAYERS}")
    if scale_factors not in SCALE_FACTOR_VARIANTS:
        raise ValueError(f"unknown scale_factors {scale_factors!r}; expected one of {SCALE_FACTOR_VARIANTS}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an integer >= 1, got {num_experts}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")
    if not aux_loss_coef >= 0:
        raise ValueError(f"aux_loss_coef must be >= 0, got {aux_loss_coef}")


def convert_to_moe(model: nn.Module, moe: str = "moe", num_experts: int = 8, top_k: int = 2,
                   moe_layers: str = "both", aux_loss_coef: float = 0.01, scale_factors: str = "both",
                   partition_granularity: str = "element") -> nn.Module:
    """Replaces the feed-forward dense layers of a BERT-family model by upcycled MoE layers, in place.

    ``moe_layers`` picks ``intermediate.dense``, ``output.dense`` or both in every encoder
    layer; each replaced layer gets its own gate.  ``partition_granularity`` (``element`` or
    ``unit``) is declared on the PAD layers (their masks start all ones; IMP keeps it, a loaded
    mask must have it).  The settings are recorded in ``model.config.moe`` (so
    ``save_pretrained`` writes them to ``config.json``).  ``moe="none"`` returns the model unchanged.
    """
    settings = dict(moe=moe, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers,
                    aux_loss_coef=aux_loss_coef, scale_factors=scale_factors,
                    partition_granularity=partition_granularity)
    check_moe_settings(**settings)
    if moe == "none":
        return model
    if any(isinstance(m, MoELinear) for m in model.modules()):
        raise ValueError(f"{type(model).__name__} already has MoE layers; convert a dense model")
    blocks = _feed_forward_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no BERT-style feed-forward layers "
                         "(intermediate.dense/output.dense)")
    for _, block in blocks:
        for part in _parts(moe_layers):
            holder = getattr(block, part)
            holder.dense = MoELinear.from_dense(holder.dense, num_experts=num_experts, top_k=top_k, moe=moe,
                                                aux_loss_coef=aux_loss_coef, scale_factors=scale_factors)
    set_granularity(model, partition_granularity)
    model.register_forward_pre_hook(_record_token_mask, with_kwargs=True)
    model.register_forward_hook(_clear_token_mask, always_call=True)
    config = getattr(model, "config", None)
    if config is not None:
        config.moe = settings
    return model


def _attention_mask(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The ``attention_mask`` argument of a call of ``model`` (keyword or positional), or ``None``."""
    if "attention_mask" in kwargs or not args:
        return kwargs.get("attention_mask")
    try:
        return inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
    except TypeError:
        return None


def _record_token_mask(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: hands the call's 2-d ``attention_mask (B, L)`` (1 = real token) to every
    MoE layer of ``model``, so that padding stays out of the routing statistics.  Searched in
    ``model`` itself (not captured at conversion), so replicas of the model work too."""
    mask = _attention_mask(model, args, kwargs)
    mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
    for module in model.modules():
        if isinstance(module, MoELinear):
            module.token_mask = mask


def _clear_token_mask(model: nn.Module, args: tuple, output) -> None:
    """Forward hook: forgets the mask, so a later direct call of a layer counts all its tokens."""
    for module in model.modules():
        if isinstance(module, MoELinear):
            module.token_mask = None


def moe_layers(model: nn.Module) -> dict[str, MoELinear]:
    """``{module name: MoELinear}`` for every MoE layer of ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELinear)}


def aux_loss(model: nn.Module) -> torch.Tensor:
    """0-d: sum of the aux losses of all MoE layers in the last forward (zero if none)."""
    losses = [m.last_aux_loss for m in moe_layers(model).values() if m.last_aux_loss is not None]
    if not losses:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack([loss.float() for loss in losses]).sum()


def expert_load(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{MoE layer name: (E,)}``: share of the last forward's ``T*k`` token-to-expert
    assignments of real tokens that went to each expert (sums to 1; balanced = ``1/E`` each)."""
    return {name: m.last_expert_counts / m.last_expert_counts.sum().clamp_min(1)
            for name, m in moe_layers(model).items() if m.last_expert_counts is not None}


def ffn_parameter_counts(model: nn.Module) -> dict[str, int]:
    """:func:`pad.parameter_counts` over the feed-forward layers only (the MoE layers, and the
    dense ``intermediate.dense``/``output.dense`` still there): ``dense``, ``compact``, ``mask_entries``."""
    layers = [getattr(block, part).dense for _, block in _feed_forward_blocks(model)
              for part in ("intermediate", "output")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BERT-style feed-forward layers "
                         "(intermediate.dense/output.dense)")
    return pad.parameter_counts(nn.ModuleList(layers))


# ---------------------------------------------------------------- loading

def _saved_state(directory: Path) -> dict[str, torch.Tensor]:
    """The state dict a ``save_pretrained`` directory holds (single or sharded safetensors)."""
    from safetensors.torch import load_file
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
        return state
    raise ValueError(f"{directory} holds no model.safetensors: not a saved MoE model")


def save_compact_model(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Writes the compact form of a PAD-MoE model (:func:`pad.save_compact`: each part of every
    PAD layer only at the positions it uses, masks as bits) to ``directory/model_compact.safetensors``
    and returns the path.  With the directory's ``config.json`` it is a complete model:
    :func:`load_model` reads it when ``model.safetensors`` is absent."""
    if next(weight_banks(model), None) is None:
        raise ValueError(f"{type(model).__name__} has no PAD layers: nothing to export compactly")
    path = Path(directory) / COMPACT_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    pad.save_compact(model, path)
    return path


def _has_full_weights(directory: Path) -> bool:
    return (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()


def load_model(model_name_or_path: str | os.PathLike, config, **from_pretrained_kwargs):
    """A sequence-classification model for ``config``.

    With ``config.moe`` set (a saved MoE/PAD-MoE directory): builds the dense
    architecture from ``config``, converts it with ``config.moe`` and loads the saved
    weights strictly (masks, their granularity and scale factors included), from ``model.safetensors`` or,
    when a directory holds only the compact export, from ``model_compact.safetensors``; ``ValueError`` when
    the masks' granularity is not the one ``config.moe`` records, :class:`pad.runtime.IntegrityError` when
    the weights predate recorded granularities.  Otherwise
    ``AutoModelForSequenceClassification.from_pretrained(model_name_or_path, config=config,
    **from_pretrained_kwargs)``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForSequenceClassification
    settings = getattr(config, "moe", None)
    if not settings:
        return AutoModelForSequenceClassification.from_pretrained(model_name_or_path, config=config,
                                                                  **from_pretrained_kwargs)
    model = AutoModelForSequenceClassification.from_config(config)
    convert_to_moe(model, **settings)
    directory = Path(model_name_or_path)
    if not _has_full_weights(directory) and (directory / COMPACT_WEIGHTS).is_file():
        try:
            pad.load_compact_file(model, directory / COMPACT_WEIGHTS)
        except SafetensorError as err:
            raise ValueError(f"cannot read {directory / COMPACT_WEIGHTS}: {err}") from None
        _check_saved_granularity(model, settings, directory / COMPACT_WEIGHTS)
        return model
    state = _saved_state(directory)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except UnrecordedGranularity:
        raise predates(f"model folder {directory}", "PAD layers that record their partition granularity (its "
                       "weights hold no granularity_code)", "train it again with this version of moe/run_glue.py"
                       ) from None
    if missing or unexpected:
        raise ValueError(f"{model_name_or_path} does not match its MoE config {settings}: "
                         f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    _check_saved_granularity(model, settings, directory)
    return model


def _check_saved_granularity(model: nn.Module, settings: dict, source) -> None:
    """``ValueError`` naming ``source`` unless the loaded masks have ``config.moe``'s partition granularity
    (``element`` for configs saved before it was recorded)."""
    recorded = settings.get("partition_granularity", "element")
    loaded = sorted({bank.granularity for _, bank in weight_banks(model)} - {recorded})
    if loaded:
        raise ValueError(f"{source}: the saved masks do not match config.moe's partition granularity: they are "
                         f"{' and '.join(loaded)}, config.moe records {recorded}")
