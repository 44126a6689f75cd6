"""Compact export: store only the positions each part of a PAD layer uses.

For every :class:`~pad.PartiallyDynamicWeights` at ``name`` the compact state holds

* ``name.kernels``: ``(K, n_dynamic)``, the kernels at the dynamic positions,
* ``name.static_weight``: ``(n_static,)``, ``W_s`` at the static positions,
* ``name.mask``: the mask as packed bits (``uint8``, row-major, as ``numpy.packbits``), one
  bit per unit of the model's partition granularity (:func:`model_granularity`): per position
  for ``element``, per ``kh x kw`` slice for ``kernel``, per output unit for ``unit``,

and every other entry of the state dict unchanged but each bank's ``granularity_code``: the
granularity is stored once, in the safetensors metadata (``pad_granularity``) that :func:`save_compact`
writes.  :func:`load_compact_file` gives every bank that granularity back through its state, so a
reloaded model computes with the same structure.  It also records a SHA-256 of the tensors (:func:`state_digest`, metadata key
``pad_sha256``) that :func:`load_compact_file` verifies (:func:`pad.runtime.verify`), so bytes
overwritten inside the file (same size, still a valid safetensors file) are reported instead of
evaluated; a file without either key is refused.  Loading scatters the values back into a dense
model of the same architecture,
with zeros at unused positions, which the mask multiplies away: the loaded model computes
what the exported did.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .mixing import GRANULARITIES, check_granularity, unit_grid, unit_view, weight_banks
from .runtime import atomic_write, predates, sha256_fields, verify

GRANULARITY_KEY = "pad_granularity"
CHECKSUM_KEY = "pad_sha256"


def model_granularity(model: nn.Module) -> str:
    """The partition granularity shared by every PAD layer of ``model`` (``element`` if they differ or there
    is none)."""
    granularities = {bank.granularity for _, bank in weight_banks(model)}
    return granularities.pop() if len(granularities) == 1 else "element"


def _pack(mask: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(mask.detach().cpu().flatten().numpy() > 0))


def _unpack(bits: torch.Tensor, shape: tuple[int, ...], name: str, granularity: str) -> torch.Tensor:
    """The ``shape`` boolean units from packed ``bits``; ``ValueError`` when the byte count is not that of
    ``shape``'s units (a mask packed at another granularity than ``granularity``)."""
    count = int(np.prod(shape))
    if bits.numel() != -(-count // 8):
        raise ValueError(f"compact mask of {name!r} holds {bits.numel()} bytes, {granularity} granularity needs "
                         f"{-(-count // 8)} ({count} units): was it exported at another granularity?")
    return torch.from_numpy(np.unpackbits(bits.cpu().numpy(), count=count).astype(bool)).view(shape)


def export_compact(model: nn.Module) -> dict[str, torch.Tensor]:
    """The compact state of ``model`` (see module docstring); contiguous CPU tensors."""
    granularity = model_granularity(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, bank in weight_banks(model):
        prefix = f"{name}." if name else ""
        del state[prefix + "granularity_code"]
        dynamic = bank.mask.detach().cpu() > 0
        state[prefix + "kernels"] = state[prefix + "kernels"][:, dynamic].contiguous()
        state[prefix + "static_weight"] = state[prefix + "static_weight"][~dynamic].contiguous()
        state[prefix + "mask"] = _pack(bank.unit_mask(granularity).cpu() if granularity != "element" else dynamic)
    return state


@torch.no_grad()
def load_compact(model: nn.Module, state: dict[str, torch.Tensor], granularity: str = "element") -> None:
    """Loads a state made by :func:`export_compact` of a model at ``granularity`` into ``model`` (same
    architecture), that granularity included (each bank's ``granularity_code``)."""
    check_granularity(granularity)
    state = dict(state)
    for name, bank in weight_banks(model):
        prefix = f"{name}." if name else ""
        try:
            bits, kernels, static = (state.pop(prefix + k) for k in ("mask", "kernels", "static_weight"))
        except KeyError as err:
            raise ValueError(f"compact state lacks {err.args[0]!r}: not a compact export of this architecture") from None
        units = _unpack(bits, unit_grid(bank.mask.shape, granularity), name, granularity)
        dynamic = unit_view(torch.zeros(bank.mask.shape, dtype=torch.bool), granularity)
        dynamic[units.flatten()] = True
        dynamic = dynamic.view(bank.mask.shape).to(bank.mask.device)
        n_dynamic = int(dynamic.sum())
        if kernels.shape != (bank.num_kernels, n_dynamic) or static.numel() != dynamic.numel() - n_dynamic:
            raise ValueError(f"compact state of {name!r} does not match its mask and the model's shape")
        bank.mask.copy_(dynamic.to(bank.mask.dtype))
        bank.kernels.zero_()
        bank.kernels[:, dynamic] = kernels.to(bank.kernels)
        bank.static_weight.zero_()
        bank.static_weight[~dynamic] = static.to(bank.static_weight)
        state[prefix + "granularity_code"] = torch.tensor(GRANULARITIES.index(granularity))
    missing, unexpected = model.load_state_dict(state, strict=False)
    bank_keys = {f"{n}.{k}" if n else k for n, _ in weight_banks(model) for k in ("kernels", "static_weight", "mask")}
    missing = [k for k in missing if k not in bank_keys]
    if missing or unexpected:
        raise ValueError(f"compact state does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Hex SHA-256 of a state dict's contents (:func:`pad.runtime.sha256_fields`): for each entry in sorted
    name order, its name, dtype, shape and raw bytes (native order, C-contiguous)."""
    def fields():
        for name in sorted(state):
            tensor = state[name].detach().cpu().contiguous()
            yield name.encode("utf-8")
            yield str(tensor.dtype).encode()
            yield repr(tuple(tensor.shape)).encode()
            yield tensor.reshape(-1).view(torch.uint8).numpy().tobytes()

    return sha256_fields(fields())


def save_compact(model: nn.Module, path: str | os.PathLike) -> None:
    """Writes :func:`export_compact` to a safetensors file (atomically), the granularity and the
    :func:`state_digest` of the tensors in its metadata."""
    from safetensors.torch import save
    state = export_compact(model)
    atomic_write(path, save(state, metadata={GRANULARITY_KEY: model_granularity(model),
                                             CHECKSUM_KEY: state_digest(state)}))


def load_compact_file(model: nn.Module, path: str | os.PathLike) -> str:
    """Loads a :func:`save_compact` file into ``model``; returns the granularity it recorded.

    :class:`pad.runtime.IntegrityError` naming the file when the tensors do not hash to the recorded
    ``pad_sha256``, or when the file records no checksum or no granularity (it predates them: nothing tells
    a damaged one from an intact one, nor its mask's structure)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    missing = [key for key in (CHECKSUM_KEY, GRANULARITY_KEY) if key not in metadata]
    if missing:
        raise predates(f"compact file {path}", f"checksummed compact files (its metadata has no {' or '.join(missing)})",
                       "export it again from its checkpoint with pad.save_compact")
    state = load_file(str(path))
    verify(path, metadata[CHECKSUM_KEY], state_digest(state))
    load_compact(model, state, metadata[GRANULARITY_KEY])
    return metadata[GRANULARITY_KEY]
