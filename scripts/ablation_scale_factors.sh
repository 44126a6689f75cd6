#!/usr/bin/env bash
# Ablation: which scale factors are learned (both | s | d | none), PAD-DY-Conv ResNet-50 at ratio 0.3
# and PAD-MoE on RTE at ratio 0.5. CPU: --mini (ResNet-10 on Fashion-MNIST; MiniLM on the RTE-style task;
# 3 seeds). --seeds N; --smoke: every full row for one step (IMAGENET=tiny GLUE_DIR=tiny).
# Comparisons: every variant vs the default (both), per pipeline.
source "$(dirname "$0")/lib.sh" "$@"
arch=$([ "$MINI" = 1 ] && echo resnet10 || echo resnet50)
for variant in both s d none; do
  dyconv_run "$arch-pad0.3-scale-$variant" resnet50_dyconv_pad --arch $arch --conv dyconv --pad --scale-factors $variant
  glue_run "rte-pad-scale-$variant" rte pad --scale_factors $variant
done
for variant in s d none; do
  compare "$arch-pad0.3-scale-$variant" "$arch-pad0.3-scale-both"
  compare "rte-pad-scale-$variant" rte-pad-scale-both
done
summarize "Scale factors: both / only lambda_s / only lambda_d / none ($SCALE)"
