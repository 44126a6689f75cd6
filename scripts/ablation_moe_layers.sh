#!/usr/bin/env bash
# Ablation: which BERT feed-forward layers become MoE (intermediate | output | both), MoE vs PAD-MoE on RTE.
# CPU: --mini (MiniLM on the RTE-style task).
source "$(dirname "$0")/lib.sh" "$@"
for layers in intermediate output both; do
  glue_run "rte-moe-$layers" rte --moe moe --moe_layers $layers
  glue_run "rte-pad-$layers" rte --moe pad --moe_layers $layers
done
summarize "MoE layers: intermediate / output / both ($SCALE)"
