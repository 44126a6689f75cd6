#!/usr/bin/env bash
# The CPU-scale evidence: every table and ablation script with --mini and several seeds, then the
# figures. Resumable: rerun it after an interruption and finished runs are skipped (an unfinished
# dyconv run resumes from its last epoch's checkpoint, a GLUE run restarts).
#   bash scripts/mini_suite.sh [--seeds N] [--jobs N] [--pipeline dyconv|glue|all]   (or SEEDS=N, default 3;
#   JOBS=N runs at once, default 1, each run's output then in <row>/seed<k>.log; e.g. JOBS=2 OMP_NUM_THREADS=1
#   on 2 cores; PIPELINE=P runs only the image or only the text rows, default all)
#   bash scripts/mini_suite.sh --protocol [--jobs N] [--pipeline P]: the claims at the protocol
#   results/regime_selection.md chose, as that note fixed them: table1, table_dynamic_convs and table2_glue_moe
#   with 5 seeds, the scale-factor, partition and dynamic-ratio ablations with 3; runs, tables, figures and cost
#   named -protocol.
# Runs go to results/runs/<script>-mini/<row>/seed<k> (RUNS_ROOT replaces results/runs/), tables to
# results/measured/ (RESULTS), figures to results/figures/ (FIGURES), and what the suite cost, from the runs'
# records, to results/measured/suite_cost-mini.md (scripts/suite_cost.py). results/README.md says what the numbers
# show. results/runs/.gitignore keeps each run's records (summary.json / all_results.json, partition.json,
# TensorBoard events, logs) and drops its checkpoints and weights: committed, the records are what the tables
# and figures are computed from, and what a later checkout continues from (finished runs are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/flags.sh
parse_flags "--protocol, --seeds N, --jobs N, --pipeline P" "$@"
if [ "$PROTOCOL" = 1 ] && [ -n "$SEEDS_FLAG${SEEDS:-}" ]; then
  echo "error: --protocol runs the seeds results/regime_selection.md fixed (5 per claim, 3 per ablation): drop --seeds" >&2
  exit 2
fi
settle_flags 3
export JOBS PIPELINE
export RUNS_ROOT=${RUNS_ROOT:-results/runs}
unset RUNS  # each script keeps its own folder under RUNS_ROOT
if [ "$PROTOCOL" = 1 ]; then
  SCALE=protocol FIGURE_SEEDS=3 FIGURES_MADE="ratio"
  SCRIPTS="table1_imagenet_dyconv table_dynamic_convs table2_glue_moe ablation_scale_factors ablation_partition
           ablation_dynamic_ratio"
  seeds_of() { case $1 in table*) echo 5 ;; *) echo 3 ;; esac; }
else
  SCALE=mini FIGURE_SEEDS=$SEEDS FIGURES_MADE="ratio lambdas per_layer comparisons"
  SCRIPTS="table1_imagenet_dyconv table_dynamic_convs table2_glue_moe ablation_scale_factors ablation_partition
           ablation_dynamic_ratio ablation_moe_layers ablation_granularity"
  seeds_of() { echo "$SEEDS"; }
fi
for script in $SCRIPTS; do
  echo "=== $script --$SCALE --seeds $(seeds_of "$script") --jobs $JOBS --pipeline $PIPELINE"
  bash "scripts/$script.sh" "--$SCALE" --seeds "$(seeds_of "$script")" --jobs "$JOBS" --pipeline "$PIPELINE"
done
# the figures and the cost: at --mini of both pipelines' runs (with --pipeline all only), at --protocol of the
# pipelines that ran (its figure: the accuracy against the dynamic ratio)
[ "$PIPELINE" = all ] || [ "$PROTOCOL" = 1 ] || exit 0
# shellcheck disable=SC2086  # the figure names are words
.venv/bin/python scripts/figures.py --runs "$RUNS_ROOT" --scale "$SCALE" --seeds "$FIGURE_SEEDS" \
  --figures $FIGURES_MADE --output "${FIGURES:-results/figures}"
# what the whole suite cost, from the runs' records (each run once, shared rows not twice)
# shellcheck disable=SC2086  # the script names are words
.venv/bin/python scripts/suite_cost.py --runs "$RUNS_ROOT" --scale "$SCALE" --jobs "$JOBS" --scripts $SCRIPTS \
  --output "${RESULTS:-results/measured}/suite_cost-$SCALE.md"
