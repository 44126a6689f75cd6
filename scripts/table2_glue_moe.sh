#!/usr/bin/env bash
# Paper, GLUE table: BERT vs MoE-BERT (8 experts, top-2, both FFN layers) vs PAD-MoE (dynamic ratio 0.5)
# on the nine GLUE tasks, bert-base-uncased, 3 epochs, lr 2e-5, batch 32 (configs/glue/bert_base_*.json).
# Full:  bash scripts/table2_glue_moe.sh [--seeds N] (GLUE and BERT from the hub; or GLUE_DIR=/path/to/glue_data)
# CPU:   bash scripts/table2_glue_moe.sh --mini (all-MiniLM-L6-v2, the embedded SST-2/RTE-style tasks, 3 seeds)
# Smoke: IMAGENET=tiny GLUE_DIR=tiny bash scripts/table2_glue_moe.sh --smoke  (every full row, one step)
# Every task's metrics (MNLI matched and mismatched), the task score and the GLUE average (results/details.md
# states the convention); comparisons: PAD-MoE vs MoE and MoE vs dense, per task and on the average.
source "$(dirname "$0")/lib.sh" "$@"
if [ "$MINI" = 1 ]; then TASKS="sst2 rte"; else TASKS="cola sst2 mrpc stsb qqp mnli qnli rte wnli"; fi
for task in $TASKS; do
  for moe in none moe pad; do
    glue_run "$task-$moe" "$task" "$moe"
  done
  compare "$task-pad" "$task-moe"
  compare "$task-moe" "$task-none"
done
for moe in none moe pad; do
  glue_average "average-$moe" $(for task in $TASKS; do echo "$task-$moe"; done)
done
compare average-pad average-moe
compare average-moe average-none
compare average-pad average-none
summarize "Dense vs MoE vs PAD-MoE on GLUE ($SCALE)"
