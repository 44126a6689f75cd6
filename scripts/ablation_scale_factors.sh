#!/usr/bin/env bash
# Ablation: which scale factors are learned (both | s | d | none), PAD-DY-Conv ResNet-50 at ratio 0.3
# and PAD-MoE on RTE at ratio 0.5. CPU: --mini (ResNet-10 on Fashion-MNIST; MiniLM on the RTE-style task).
source "$(dirname "$0")/lib.sh" "$@"
if [ "$MINI" = 1 ]; then arch=resnet10; recipe=(); else arch=resnet50; recipe=(--config configs/dyconv/imagenet_resnet.yaml); fi
for variant in both s d none; do
  dyconv_run "$arch-pad0.3-scale-$variant" "${recipe[@]}" --arch $arch --conv dyconv --pad --scale-factors $variant
  glue_run "rte-pad-scale-$variant" rte --moe pad --scale_factors $variant
done
summarize "Scale factors: both / only lambda_s / only lambda_d / none ($SCALE)"
