"""PAD: partially dynamic weights, Iterative Mode Partition, statistics, compact export.

Knows nothing of convolutions, BERT, datasets or command lines.
"""
from .compact import export_compact, load_compact, load_compact_file, save_compact
from .mixing import SCALE_FACTOR_VARIANTS, DynamicWeights, PartiallyDynamicWeights, ScaleFactors, weight_banks
from .partition import (CRITERIA, SCHEDULES, SCOPES, PartitionReport, check_dynamic_ratio,
                        iterative_mode_partition, ratio_schedule, score_positions, select_dynamic)
from .runtime import keep_freed_memory
from .stats import dynamic_ratio, parameter_counts, scale_factors, unused_parameters

__all__ = [
    "DynamicWeights", "PartiallyDynamicWeights", "ScaleFactors", "SCALE_FACTOR_VARIANTS", "weight_banks",
    "iterative_mode_partition", "score_positions", "select_dynamic", "ratio_schedule", "check_dynamic_ratio",
    "PartitionReport", "CRITERIA", "SCHEDULES", "SCOPES",
    "dynamic_ratio", "parameter_counts", "scale_factors", "unused_parameters",
    "keep_freed_memory",
    "export_compact", "load_compact", "save_compact", "load_compact_file",
]
