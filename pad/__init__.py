"""PAD: partially dynamic weights, Iterative Mode Partition, statistics, compact export.

Masks are per position (``element``, the paper's) or structured by whole units (``kernel``,
``unit``); either way a mask is a full float buffer of the static shape, so statistics and
compact export count positions whatever the granularity.

The layer API (the names below) knows nothing of convolutions, BERT, datasets or command lines;
:mod:`pad.runtime` and :mod:`pad.records` are the two pipelines' shared run infrastructure (error lines,
atomic writes, integrity checks, run records), kept beside it because both pipelines and the scripts use it.

Public names:

* :class:`DynamicWeights`: a bank of ``K`` kernels of one static shape, all positions dynamic.
* :class:`PartiallyDynamicWeights`: ``K`` kernels plus a static weight, mixed by a 0/1 mask and two scale factors.
* :func:`pad_kernels`: the PAD mix ``lambda_d M W_k (+ lambda_s (1 - M) W_s)``, i.e. the folded kernels.
* :func:`iterative_mode_partition`: IMP, sets every PAD layer's mask to a target dynamic ratio.
* :class:`PartitionReport`: what one IMP run did: target and achieved ratios, per layer and per iteration.
* :func:`dynamic_ratio`: the share of dynamic positions over a model's PAD layers.
* :func:`parameter_counts`: a model's stored parameters, dense and compact, and its mask entries.
* :func:`scale_factors`: ``(lambda_d, lambda_s)`` of every PAD layer.
* :func:`export_compact`: the compact state dict (only the positions each part uses, packed masks).
* :func:`load_compact`: loads a compact state dict into a model of the same architecture.
* :func:`save_compact`: writes the compact state to a safetensors file with its granularity and checksum.
* :func:`load_compact_file`: loads and verifies a :func:`save_compact` file.
* :func:`model_granularity`: the partition granularity shared by a model's PAD layers.

Everything else is imported from its submodule: :mod:`pad.mixing` (granularities, scale factors,
``weight_banks``, ``set_granularity``, ``unit_split_applies``, ``zero_tie``), :mod:`pad.partition` (criteria,
schedules, scoring and selection), :mod:`pad.stats`, :mod:`pad.compact`, :mod:`pad.runtime` (process utilities:
``code_version``, ``keep_freed_memory``, ``machine_description``) and :mod:`pad.records` (the finished
runs' records, read and compared over seeds for the tables and figures).
"""
import importlib

# name -> submodule. The submodules import torch; they load on first use of a name, so that the torch-free parts
# (pad.runtime, pad.records) serve the table and figure scripts without torch's import time.
_EXPORTS = {
    "DynamicWeights": "mixing", "PartiallyDynamicWeights": "mixing", "pad_kernels": "mixing",
    "iterative_mode_partition": "partition", "PartitionReport": "partition",
    "dynamic_ratio": "stats", "parameter_counts": "stats", "scale_factors": "stats",
    "export_compact": "compact", "load_compact": "compact", "save_compact": "compact",
    "load_compact_file": "compact", "model_granularity": "compact",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pad' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
