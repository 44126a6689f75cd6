#!/usr/bin/env bash
# Ablation: the dynamic ratio kappa, PAD-DY-Conv ResNet-50 (0.1 .. 1.0; 1.0 = fully dynamic with scale factors)
# and PAD-MoE on RTE (0.3 .. 0.9; at --protocol 0.1 .. 1.0, the sweep results/regime_selection.md fixed).
# CPU: --mini (ResNet-10 on Fashion-MNIST; MiniLM on the RTE-style task; 3 seeds). --seeds N;
# --smoke: every full row for one step (IMAGENET=tiny GLUE_DIR=tiny).
# Comparisons: every ratio vs the paper's default (0.3 for DY-Conv, 0.5 for MoE).
source "$(dirname "$0")/lib.sh" "$@"
arch=$([ "$MINI" = 1 ] && echo resnet10 || echo resnet50)
for ratio in 0.1 0.3 0.5 0.7 1.0; do
  dyconv_run "$arch-pad$ratio" resnet50_dyconv_pad --arch $arch --conv dyconv --pad --dynamic-ratio $ratio
  [ $ratio = 0.3 ] || compare "$arch-pad$ratio" "$arch-pad0.3"
done
for ratio in $([ "$SCALE" = protocol ] && echo 0.1 0.3 0.5 0.7 1.0 || echo 0.3 0.5 0.7 0.9); do
  glue_run "rte-pad$ratio" rte pad --dynamic_ratio $ratio
  [ $ratio = 0.5 ] || compare "rte-pad$ratio" rte-pad0.5
done
summarize "Dynamic ratio sweep ($SCALE)"
