"""PAD: partially dynamic weights, Iterative Mode Partition, statistics, compact export.

Masks are per position (``element``, the paper's) or structured by whole units (``kernel``,
``unit``); either way a mask is a full float buffer of the static shape, so statistics and
compact export count positions whatever the granularity.

Knows nothing of convolutions, BERT, datasets or command lines.

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
from .compact import export_compact, load_compact, load_compact_file, model_granularity, save_compact
from .mixing import DynamicWeights, PartiallyDynamicWeights, pad_kernels
from .partition import PartitionReport, iterative_mode_partition
from .stats import dynamic_ratio, parameter_counts, scale_factors

__all__ = [
    "DynamicWeights", "PartiallyDynamicWeights", "pad_kernels",
    "iterative_mode_partition", "PartitionReport",
    "dynamic_ratio", "parameter_counts", "scale_factors",
    "export_compact", "load_compact", "save_compact", "load_compact_file", "model_granularity",
]
