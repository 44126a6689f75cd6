#!/usr/bin/env bash
# The measurements of results/moe_diagnosis.md: why fully dynamic MoE trails the dense model at CPU scale.
# Runs the quickstart's SST-2-style rows (configs/glue/minilm_quick.json: all-MiniLM-L6-v2, 768 examples,
# 1 epoch = 24 steps, lr 2e-4) for dense and MoE with seeds 42 (with dev evaluations every 6 steps for
# learning curves), 1 and 2, the dense model at half the learning rate, then scripts/moe_diagnosis.py on the
# seed-42 runs. Finished rows are skipped. About 1.5 hours on 2 busy CPU cores.
#   bash scripts/moe_diagnosis.sh [RUNS_DIR]      (default runs/moe_diagnosis)
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
RUNS=${1:-runs/moe_diagnosis}
PY=.venv/bin/python

row() {  # NAME [flags]
  local name=$1; shift
  [ -f "$RUNS/$name/eval_results.json" ] && return 0
  "$PY" moe/run_glue.py configs/glue/minilm_quick.json --glue_dir data/glue --task_name sst2 --report_to none \
    --output_dir "$RUNS/$name" --overwrite_output_dir "$@"
}

for moe in none moe; do
  row "$moe" --moe "$moe" --eval_strategy steps --eval_steps 6
  for seed in 1 2; do
    row "$moe-s$seed" --moe "$moe" --seed "$seed"
  done
done
row none-lr1e-4 --moe none --learning_rate 1e-4
"$PY" scripts/moe_diagnosis.py "$RUNS"/{none,moe,moe-s1,moe-s2} --glue_dir data/glue --task_name sst2
for name in none moe none-s1 moe-s1 none-s2 moe-s2 none-lr1e-4; do
  printf '%s\t' "$name"
  "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['eval_accuracy'])" "$RUNS/$name/eval_results.json"
done
