#!/usr/bin/env bash
# The CPU-scale evidence: every table and ablation script with --mini and several seeds, then the
# figures. Resumable: rerun it after an interruption and finished runs are skipped (an unfinished
# dyconv run resumes from its last epoch's checkpoint, a GLUE run restarts).
#   bash scripts/mini_suite.sh [--seeds N] [--jobs N] [--pipeline dyconv|glue|all]   (or SEEDS=N, default 3;
#   JOBS=N runs at once, default 1, each run's output then in <row>/seed<k>.log; e.g. JOBS=2 OMP_NUM_THREADS=1
#   on 2 cores; PIPELINE=P runs only the image or only the text rows, default all)
# Runs go to results/runs/<script>-mini/<row>/seed<k> (RUNS_ROOT replaces results/runs/), tables to
# results/measured/ (RESULTS), figures to results/figures/ (FIGURES), and what the suite cost, from the runs'
# records, to results/measured/suite_cost-mini.md (scripts/suite_cost.py). results/README.md says what the numbers
# show. results/runs/.gitignore keeps each run's records (summary.json / all_results.json, partition.json,
# TensorBoard events, logs) and drops its checkpoints and weights: committed, the records are what the tables
# and figures are computed from, and what a later checkout continues from (finished runs are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/flags.sh
parse_flags "--seeds N, --jobs N, --pipeline P" "$@"
settle_flags 3
export SEEDS JOBS PIPELINE
export RUNS_ROOT=${RUNS_ROOT:-results/runs}
unset RUNS  # each script keeps its own folder under RUNS_ROOT
SCRIPTS="table1_imagenet_dyconv table_dynamic_convs table2_glue_moe ablation_scale_factors ablation_partition
         ablation_dynamic_ratio ablation_moe_layers ablation_granularity"
for script in $SCRIPTS; do
  echo "=== $script --mini --seeds $SEEDS --jobs $JOBS --pipeline $PIPELINE"
  bash "scripts/$script.sh" --mini --seeds "$SEEDS" --jobs "$JOBS" --pipeline "$PIPELINE"
done
[ "$PIPELINE" = all ] || exit 0  # the figures need both pipelines' runs
.venv/bin/python scripts/figures.py --runs "$RUNS_ROOT" --scale mini --seeds "$SEEDS" \
  --output "${FIGURES:-results/figures}"
# what the whole suite cost, from the runs' records (each run once, shared rows not twice)
# shellcheck disable=SC2086  # the script names are words
.venv/bin/python scripts/suite_cost.py --runs "$RUNS_ROOT" --scale mini --jobs "$JOBS" --scripts $SCRIPTS \
  --output "${RESULTS:-results/measured}/suite_cost-mini.md"
