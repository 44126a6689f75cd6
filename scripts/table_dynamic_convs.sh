#!/usr/bin/env bash
# Paper: PAD on other dynamic convolutions, CondConv and ODConv, fully dynamic vs PAD (ratio 0.3), ResNet-50.
# Full: IMAGENET=/data/imagenet bash scripts/table_dynamic_convs.sh [--seeds N]; CPU: --mini (Fashion-MNIST,
# ResNet-10, 3 seeds); --smoke: every full row for one step (IMAGENET=tiny GLUE_DIR=tiny).
# Comparisons: PAD vs fully dynamic, per convolution. PAD-ODConv's rows name which of ODConv's attentions also
# scale its static part (--odconv-static-attention): channel-filter, the authors' release and the default, is the
# paper's row; none (the static part of DESIGN's Omega) and all (ODConv over the folded kernels) are ablation rows,
# each compared with ODConv and with the default.
source "$(dirname "$0")/lib.sh" "$@"
arch=$([ "$MINI" = 1 ] && echo resnet10 || echo resnet50)
for conv in condconv dyconv odconv; do
  reduction=$([ $conv = odconv ] && echo 16 || echo 4)
  dyconv_run "$arch-$conv" "resnet50_$conv" --arch $arch --conv $conv --reduction $reduction
  pad_row=$arch-$conv-pad0.3 attention=()
  [ $conv = odconv ] && pad_row=$pad_row-channel-filter attention=(--odconv-static-attention channel-filter)
  dyconv_run "$pad_row" "resnet50_${conv}_pad" --arch $arch --conv $conv --reduction $reduction \
    --pad --dynamic-ratio 0.3 "${attention[@]}"
  compare "$pad_row" "$arch-$conv"
done
for attention in none all; do
  dyconv_run "$arch-odconv-pad0.3-$attention" resnet50_odconv_pad --arch $arch --conv odconv --reduction 16 \
    --pad --dynamic-ratio 0.3 --odconv-static-attention $attention
  compare "$arch-odconv-pad0.3-$attention" "$arch-odconv"
  compare "$arch-odconv-pad0.3-$attention" "$arch-odconv-pad0.3-channel-filter"
done
summarize "CondConv / DY-Conv / ODConv, fully dynamic vs PAD ($SCALE)"
