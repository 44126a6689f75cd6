"""Compact export: store only the positions each part of a PAD layer uses.

For every :class:`~pad.PartiallyDynamicWeights` at ``name`` the compact state holds

* ``name.kernels``: ``(K, n_dynamic)``, the kernels at the dynamic positions,
* ``name.static_weight``: ``(n_static,)``, ``W_s`` at the static positions,
* ``name.mask``: the mask as packed bits (``uint8``, row-major, as ``numpy.packbits``),

and every other entry of the state dict unchanged.  Loading scatters the values
back into a dense model of the same architecture, with zeros at unused positions,
which the mask multiplies away: the loaded model computes what the exported did.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .mixing import weight_banks


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().cpu().flatten().numpy() > 0))


def _unpack(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    flat = np.unpackbits(bits.cpu().numpy(), count=like.numel()).astype(bool)
    return torch.from_numpy(flat).view(like.shape).to(like.device)


def export_compact(model: nn.Module) -> dict[str, torch.Tensor]:
    """The compact state of ``model`` (see module docstring); contiguous CPU tensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, bank in weight_banks(model):
        prefix = f"{name}." if name else ""
        dynamic = bank.mask.detach().cpu() > 0
        state[prefix + "kernels"] = state[prefix + "kernels"][:, dynamic].contiguous()
        state[prefix + "static_weight"] = state[prefix + "static_weight"][~dynamic].contiguous()
        state[prefix + "mask"] = _pack(dynamic)
    return state


@torch.no_grad()
def load_compact(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads a state made by :func:`export_compact` into ``model`` (same architecture)."""
    state = dict(state)
    for name, bank in weight_banks(model):
        prefix = f"{name}." if name else ""
        try:
            dynamic = _unpack(state.pop(prefix + "mask"), bank.mask)
            kernels, static = state.pop(prefix + "kernels"), state.pop(prefix + "static_weight")
        except KeyError as err:
            raise ValueError(f"compact state lacks {err.args[0]!r}: not a compact export of this architecture") from None
        n_dynamic = int(dynamic.sum())
        if kernels.shape != (bank.num_kernels, n_dynamic) or static.numel() != dynamic.numel() - n_dynamic:
            raise ValueError(f"compact state of {name!r} does not match its mask and the model's shape")
        bank.mask.copy_(dynamic.to(bank.mask.dtype))
        bank.kernels.zero_()
        bank.kernels[:, dynamic] = kernels.to(bank.kernels)
        bank.static_weight.zero_()
        bank.static_weight[~dynamic] = static.to(bank.static_weight)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bank_keys = {f"{n}.{k}" if n else k for n, _ in weight_banks(model) for k in ("kernels", "static_weight", "mask")}
    missing = [k for k in missing if k not in bank_keys]
    if missing or unexpected:
        raise ValueError(f"compact state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def save_compact(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes :func:`export_compact` to a safetensors file (atomically)."""
    from safetensors.torch import save_file
    tmp = f"{path}.tmp"
    save_file(export_compact(model), tmp)
    os.replace(tmp, path)


def load_compact_file(model: nn.Module, path: str | os.PathLike) -> None:
    from safetensors.torch import load_file
    load_compact(model, load_file(str(path)))
