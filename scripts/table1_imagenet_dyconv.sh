#!/usr/bin/env bash
# Paper, ImageNet table: static vs fully dynamic DY-Conv vs PAD-DY-Conv (dynamic ratio 0.3)
# on ResNet-10/18/50 and MobileNetV2 x0.5/0.75/1.0 (one config per row in configs/dyconv/).
# Full:  IMAGENET=/data/imagenet bash scripts/table1_imagenet_dyconv.sh [--seeds N]  (single process; for
#        8 GPUs run the rows with torchrun as docs/reproducing.md shows)
# CPU:   bash scripts/table1_imagenet_dyconv.sh --mini  (Fashion-MNIST, ResNet-10 and MobileNetV2 x0.5, 3 seeds)
# GPU:   bash scripts/table1_imagenet_dyconv.sh --gpu   (Fashion-MNIST, ResNet-10 at width 64 for 6 epochs, AMP, 3 seeds)
# Smoke: IMAGENET=tiny GLUE_DIR=tiny bash scripts/table1_imagenet_dyconv.sh --smoke  (every full row, one step)
# Comparisons: PAD vs fully dynamic, fully dynamic vs static, PAD vs static, per architecture.
source "$(dirname "$0")/lib.sh" "$@"
# --gpu and --protocol: the ResNet-10 rows only (the protocol search chose among ResNet-10 settings);
# --gpu: (what one lent GPU session's 15 minutes of device time hold, 3 seeds)
if [ "$GPU" = 1 ] || [ "$PROTOCOL" = 1 ]; then ARCHS="resnet10"; elif [ "$MINI" = 1 ]; then ARCHS="resnet10 mobilenetv2_050"; else ARCHS="resnet10 resnet18 resnet50 mobilenetv2_050 mobilenetv2_075 mobilenetv2_100"; fi
for arch in $ARCHS; do
  # --mini: MobileNetV2 x0.5 keeps 28 px feature maps longer and costs ~5x ResNet-10 at width 16 per image on
  # CPU, so it trains on 20000 of the 60000 images; the mini config's ResNet width does not apply to it.
  extra=()
  [ "$MINI" = 1 ] && [[ $arch == mobilenetv2* ]] && extra=(--train-subset 20000 --resnet-width 64)
  dyconv_run "$arch-static" "${arch}_static" --arch "$arch" --conv static "${extra[@]}"
  dyconv_run "$arch-dyconv" "${arch}_dyconv" --arch "$arch" --conv dyconv "${extra[@]}"
  dyconv_run "$arch-dyconv-pad0.3" "${arch}_dyconv_pad" --arch "$arch" --conv dyconv --pad --dynamic-ratio 0.3 "${extra[@]}"
  compare "$arch-dyconv-pad0.3" "$arch-dyconv"
  compare "$arch-dyconv" "$arch-static"
  compare "$arch-dyconv-pad0.3" "$arch-static"
done
summarize "Static vs DY-Conv vs PAD-DY-Conv ($SCALE)"
