#!/usr/bin/env bash
# Ablation: how the mode partition is found: criterion (taylor = IMP, random, magnitude, grasp, synflow),
# then scope (global/local) and schedule (exponential/linear) for taylor. PAD-DY-Conv ResNet-50 at ratio 0.3.
# CPU: --mini (ResNet-10 on Fashion-MNIST).
source "$(dirname "$0")/lib.sh" "$@"
arch=$([ "$MINI" = 1 ] && echo resnet10 || echo resnet50)
for criterion in taylor random magnitude grasp synflow; do
  dyconv_run "$arch-pad0.3-$criterion" resnet50_dyconv_pad --arch $arch --conv dyconv --pad --partition-criterion $criterion
done
dyconv_run "$arch-pad0.3-taylor-local" resnet50_dyconv_pad --arch $arch --conv dyconv --pad --partition-scope local
dyconv_run "$arch-pad0.3-taylor-linear" resnet50_dyconv_pad --arch $arch --conv dyconv --pad --partition-schedule linear
dyconv_run "$arch-pad0.3-taylor-oneshot" resnet50_dyconv_pad --arch $arch --conv dyconv --pad --partition-iterations 1
summarize "Mode partition: criterion, scope, schedule, iterations ($SCALE)"
