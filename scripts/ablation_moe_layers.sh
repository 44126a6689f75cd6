#!/usr/bin/env bash
# Ablation: which BERT feed-forward layers become MoE (intermediate | output | both), MoE vs PAD-MoE on RTE.
# CPU: --mini (MiniLM on the RTE-style task, 3 seeds). --seeds N; --smoke: every full row for one step
# (IMAGENET=tiny GLUE_DIR=tiny). Comparisons: PAD vs MoE per choice; each choice vs the default (both).
source "$(dirname "$0")/lib.sh" "$@"
for layers in intermediate output both; do
  glue_run "rte-moe-$layers" rte moe --moe_layers $layers
  glue_run "rte-pad-$layers" rte pad --moe_layers $layers
  compare "rte-pad-$layers" "rte-moe-$layers"
done
for moe in moe pad; do
  for layers in intermediate output; do
    compare "rte-$moe-$layers" "rte-$moe-both"
  done
done
summarize "MoE layers: intermediate / output / both ($SCALE)"
