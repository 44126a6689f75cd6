#!/usr/bin/env bash
# The CPU-scale evidence: every table and ablation script with --mini and several seeds, then the
# figures. Resumable: rerun it after an interruption and finished runs are skipped (an unfinished
# dyconv run resumes from its last epoch's checkpoint, a GLUE run restarts).
#   bash scripts/mini_suite.sh [--seeds N]      (or SEEDS=N; default 3)
# Runs go to runs/<script>-mini/<row>/seed<k> (RUNS_ROOT replaces runs/), tables to results/measured/
# (RESULTS), figures to results/figures/ (FIGURES). results/README.md says what the numbers show.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-3}
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds)
      [ $# -ge 2 ] || { echo "error: --seeds needs a number" >&2; exit 2; }
      SEEDS=$2; shift ;;
    *) echo "error: unknown argument $1 (expected --seeds N)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$SEEDS" =~ ^[1-9][0-9]*$ ]]; then echo "error: the number of seeds must be a positive integer, got '$SEEDS'" >&2; exit 2; fi
export SEEDS
unset RUNS  # each script keeps its own folder under RUNS_ROOT
for script in table1_imagenet_dyconv table_dynamic_convs table2_glue_moe ablation_scale_factors \
              ablation_partition ablation_dynamic_ratio ablation_moe_layers; do
  echo "=== $script --mini --seeds $SEEDS"
  bash "scripts/$script.sh" --mini --seeds "$SEEDS"
done
.venv/bin/python scripts/figures.py --runs "${RUNS_ROOT:-runs}" --scale mini --seeds "$SEEDS" \
  --output "${FIGURES:-results/figures}"
