#!/usr/bin/env bash
# Ablation: how the mode partition is found: criterion (taylor = IMP, random, magnitude, grasp, synflow),
# then scope (global/local) and schedule (exponential/linear) for taylor. PAD-DY-Conv ResNet-50 at ratio 0.3.
# CPU: --mini (ResNet-10 on Fashion-MNIST, 3 seeds); --protocol adds PAD-MoE on RTE with taylor vs random vs one-shot,
# the text rows results/regime_selection.md fixed. --seeds N; --smoke: every full row for one step
# (IMAGENET=tiny GLUE_DIR=tiny; one IMP iteration, so the one-shot and schedule rows only check that they run).
# Comparisons: every variant vs the default (taylor, global, exponential, 10 iterations).
source "$(dirname "$0")/lib.sh" "$@"
arch=$([ "$MINI" = 1 ] && echo resnet10 || echo resnet50)
default="$arch-pad0.3-taylor"
for criterion in taylor random magnitude grasp synflow; do
  dyconv_run "$arch-pad0.3-$criterion" resnet50_dyconv_pad --arch $arch --conv dyconv --pad --partition-criterion $criterion
  [ $criterion = taylor ] || compare "$arch-pad0.3-$criterion" "$default"
done
dyconv_run "$arch-pad0.3-taylor-local" resnet50_dyconv_pad --arch $arch --conv dyconv --pad --partition-scope local
dyconv_run "$arch-pad0.3-taylor-linear" resnet50_dyconv_pad --arch $arch --conv dyconv --pad --partition-schedule linear
dyconv_run "$arch-pad0.3-taylor-oneshot" resnet50_dyconv_pad --arch $arch --conv dyconv --pad --partition-iterations 1
for variant in local linear oneshot; do
  compare "$arch-pad0.3-taylor-$variant" "$default"
done
if [ "$SCALE" = protocol ]; then
  glue_run rte-pad-taylor rte pad
  glue_run rte-pad-random rte pad --partition_criterion random
  glue_run rte-pad-oneshot rte pad --partition_iterations 1
  compare rte-pad-random rte-pad-taylor
  compare rte-pad-oneshot rte-pad-taylor
fi
summarize "Mode partition: criterion, scope, schedule, iterations ($SCALE)"
