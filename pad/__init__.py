"""PAD: partially dynamic weights, Iterative Mode Partition, statistics, compact export.

Masks are per position (``element``, the paper's) or structured by whole units (``kernel``,
``unit``); either way a mask is a full float buffer of the static shape, so statistics and
compact export count positions whatever the granularity.

Knows nothing of convolutions, BERT, datasets or command lines.
"""
from .compact import export_compact, load_compact, load_compact_file, save_compact
from .mixing import (GRANULARITIES, SCALE_FACTOR_VARIANTS, DynamicWeights, PartiallyDynamicWeights, ScaleFactors,
                     UnitSplit, pad_kernels, set_granularity, unit_grid, unit_view, weight_banks)
from .partition import (BATCHNORM_MODES, CANNOT_RANK_SHARE, CRITERIA, SCHEDULES, SCOPES, PartitionReport, Selection,
                        check_dynamic_ratio, iterative_mode_partition, ratio_schedule, score_positions,
                        scoring_state, select_dynamic, smallest_dynamic_ratio)
from .runtime import code_version, keep_freed_memory, machine_description
from .stats import dynamic_ratio, parameter_counts, scale_factors, unused_parameters

__all__ = [
    "DynamicWeights", "PartiallyDynamicWeights", "ScaleFactors", "SCALE_FACTOR_VARIANTS", "weight_banks",
    "pad_kernels", "GRANULARITIES", "unit_grid", "unit_view", "set_granularity", "UnitSplit",
    "iterative_mode_partition", "score_positions", "select_dynamic", "ratio_schedule", "check_dynamic_ratio",
    "smallest_dynamic_ratio",
    "scoring_state", "PartitionReport", "Selection", "CRITERIA", "SCHEDULES", "SCOPES", "BATCHNORM_MODES",
    "CANNOT_RANK_SHARE",
    "dynamic_ratio", "parameter_counts", "scale_factors", "unused_parameters",
    "code_version",
    "keep_freed_memory",
    "machine_description",
    "export_compact", "load_compact", "save_compact", "load_compact_file",
]
