"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks"), token level.

For tokens ``x`` of shape ``(T, d)`` and ``E`` experts::

    H(x)  = x W_g + N(0, 1) * softplus(x W_noise)      (noise in training only)
    G(x)  = softmax(top_k(H(x)))                        (zero outside the top k)
    aux   = coef * (cv^2(importance) + cv^2(load))
    importance_e = sum over tokens of G(x)_e
    load_e       = training: sum over tokens of P(expert e is in the top k under fresh noise)
                   (the paper's smooth, differentiable estimate, through the normal CDF);
                   eval (and when k = E, where every expert gets every token): the
                   number of tokens routed to e

Only real tokens enter the statistics: with a token mask (1 = real token, 0 =
padding), ``importance``, ``load`` and the logged ``expert_counts`` sum over the
real tokens alone (as Hugging Face's MoE load-balancing losses use the attention
mask); padding tokens are still routed, and their outputs are computed and unused.

``W_g`` and ``W_noise`` start at zero.  An untrained gate then has every logit
equal to 0: ``topk`` breaks the tie by index, so in eval every token goes to the
same ``k`` experts with gate ``1/k`` each, and in training the noise (standard
deviation ``softplus(0) = log 2``) routes tokens at random.  Either way the gates
of a token sum to 1, so when all experts are copies of one dense layer (upcycling)
the mixture computes exactly that dense layer, whatever the routing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Keeps cv^2 finite when every expert's value is 0 and the normal CDF finite when
# softplus underflows to 0.
EPS = 1e-10


def cv_squared(values: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Squared coefficient of variation ``var / (mean^2 + eps)`` of a 1-d tensor (unbiased
    variance, as in the paper's code); 0 for a single value."""
    if values.numel() < 2:
        return values.new_zeros(())
    values = values.to(torch.promote_types(values.dtype, torch.float32))
    return values.var() / (values.mean() ** 2 + eps)


@dataclass
class Routing:
    """What the gate decided for ``T`` tokens.

    Attributes:
        gates: ``(T, E)``, exactly ``k`` nonzeros per row (up to underflow), rows sum to 1.
        top_indices: ``(T, k)``, the chosen experts per token.
        top_gates: ``(T, k)``, their gates.
        aux_loss: 0-d, ``coef * (cv^2(importance) + cv^2(load))`` over the real tokens.
        expert_counts: ``(E,)``, real tokens routed to each expert (float, no gradient).
    """
    gates: torch.Tensor
    top_indices: torch.Tensor
    top_gates: torch.Tensor
    aux_loss: torch.Tensor
    expert_counts: torch.Tensor


class NoisyTopKGate(nn.Module):
    """Token-level noisy top-k gate.

    Args:
        in_features: ``d``, the token size.
        num_experts: ``E`` >= 1.
        top_k: ``k`` in ``[1, E]``.
        aux_loss_coef: ``coef`` of the load-balancing loss.
    Attributes:
        w_gate, w_noise: parameters ``(d, E)``, initialised to zero.
    """

    def __init__(self, in_features: int, num_experts: int, top_k: int = 2, aux_loss_coef: float = 0.01,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"number of experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and the number of experts ({num_experts}), got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coef = aux_loss_coef
        self.w_gate = nn.Parameter(torch.zeros(in_features, num_experts, dtype=dtype))
        self.w_noise = nn.Parameter(torch.zeros(in_features, num_experts, dtype=dtype))

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> Routing:
        """Routes ``x`` of shape ``(T, d)``; computes in at least float32, outside autocast.

        ``token_mask``: ``(T,)``, nonzero for the real tokens that the statistics count
        (``None``: every token is real).
        """
        if token_mask is not None and token_mask.shape != x.shape[:1]:
            raise ValueError(f"token mask of shape {tuple(token_mask.shape)} does not match {x.shape[0]} tokens")
        real = None if token_mask is None else token_mask.to(device=x.device) != 0
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._route(x.to(torch.promote_types(x.dtype, torch.float32)), real)

    def _route(self, x: torch.Tensor, real: torch.Tensor | None) -> Routing:
        clean = x @ self.w_gate.to(x.dtype)                            # (T, E)
        if self.training:
            noise_std = F.softplus(x @ self.w_noise.to(x.dtype))
            logits = clean + torch.randn_like(clean) * noise_std
        else:
            logits = clean
        # k + 1 largest: the (k+1)-th is the threshold of the smooth load estimate.
        top_logits, top_indices = logits.topk(min(self.top_k + 1, self.num_experts), dim=-1)
        top_indices = top_indices[:, :self.top_k]
        top_gates = torch.softmax(top_logits[:, :self.top_k], dim=-1)
        gates = torch.zeros_like(logits).scatter(1, top_indices, top_gates)

        # Statistics over the real tokens only: padding must not balance the experts.
        keep = (lambda t: t) if real is None else (lambda t: t[real])
        chosen = keep(top_indices).reshape(-1)
        counts = torch.zeros(self.num_experts, dtype=gates.dtype, device=gates.device)
        counts.index_add_(0, chosen, torch.ones_like(chosen, dtype=gates.dtype))
        counts = counts.detach()
        if self.training and self.top_k < self.num_experts:
            load = self._smooth_load(keep(clean), keep(logits), keep(noise_std), keep(top_logits))
        else:
            load = counts
        aux = self.aux_loss_coef * (cv_squared(keep(gates).sum(0)) + cv_squared(load))
        return Routing(gates, top_indices, top_gates, aux, counts)

    def _smooth_load(self, clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor,
                     top_logits: torch.Tensor) -> torch.Tensor:
        """``(E,)``: sum over tokens of ``P(expert e in the top k)`` when only e's noise is redrawn.

        If e is in the top k now, it stays there iff its noisy logit beats the (k+1)-th
        largest; otherwise it must beat the k-th largest.
        """
        threshold_if_in = top_logits[:, self.top_k:self.top_k + 1]     # (T, 1)
        threshold_if_out = top_logits[:, self.top_k - 1:self.top_k]    # (T, 1)
        is_in = noisy > threshold_if_in
        std = noise_std.clamp_min(EPS)
        prob_if_in = torch.special.ndtr((clean - threshold_if_in) / std)
        prob_if_out = torch.special.ndtr((clean - threshold_if_out) / std)
        return torch.where(is_in, prob_if_in, prob_if_out).sum(0)

    def extra_repr(self) -> str:
        return (f"in_features={self.w_gate.shape[0]}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"aux_loss_coef={self.aux_loss_coef}")
