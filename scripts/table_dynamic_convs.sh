#!/usr/bin/env bash
# Paper: PAD on other dynamic convolutions, CondConv and ODConv, fully dynamic vs PAD (ratio 0.3), ResNet-50.
# Full: IMAGENET=/data/imagenet bash scripts/table_dynamic_convs.sh [--seeds N]; CPU: --mini (Fashion-MNIST,
# ResNet-10, 3 seeds); --smoke: every full row for one step (IMAGENET=tiny GLUE_DIR=tiny).
# Comparisons: PAD vs fully dynamic, per convolution. Two rows beyond the paper, PAD-ODConv with its static part
# scaled by ODConv's attentions too (--odconv-static-attention): by the channel and filter ones (channel-filter, as
# the authors' release computes it) and by all of them (all, ODConv over the folded kernels), each against ODConv
# and against our default PAD-ODConv (whose static part no attention scales).
source "$(dirname "$0")/lib.sh" "$@"
arch=$([ "$MINI" = 1 ] && echo resnet10 || echo resnet50)
for conv in condconv dyconv odconv; do
  reduction=$([ $conv = odconv ] && echo 16 || echo 4)
  dyconv_run "$arch-$conv" "resnet50_$conv" --arch $arch --conv $conv --reduction $reduction
  dyconv_run "$arch-$conv-pad0.3" "resnet50_${conv}_pad" --arch $arch --conv $conv --reduction $reduction \
    --pad --dynamic-ratio 0.3
  compare "$arch-$conv-pad0.3" "$arch-$conv"
done
for attention in channel-filter all; do
  dyconv_run "$arch-odconv-pad0.3-$attention" resnet50_odconv_pad --arch $arch --conv odconv --reduction 16 \
    --pad --dynamic-ratio 0.3 --odconv-static-attention $attention
  compare "$arch-odconv-pad0.3-$attention" "$arch-odconv"
  compare "$arch-odconv-pad0.3-$attention" "$arch-odconv-pad0.3"
done
summarize "CondConv / DY-Conv / ODConv, fully dynamic vs PAD ($SCALE)"
