#!/usr/bin/env bash
# Paper: PAD on other dynamic convolutions, CondConv and ODConv, fully dynamic vs PAD (ratio 0.3), ResNet-50.
# Full: IMAGENET=/data/imagenet bash scripts/table_dynamic_convs.sh ; CPU: --mini (Fashion-MNIST, ResNet-10)
source "$(dirname "$0")/lib.sh" "$@"
if [ "$MINI" = 1 ]; then arch=resnet10; recipe=(); else arch=resnet50; recipe=(--config configs/dyconv/imagenet_resnet.yaml); fi
for conv in condconv dyconv odconv; do
  dyconv_run "$arch-$conv" "${recipe[@]}" --arch $arch --conv $conv
  dyconv_run "$arch-$conv-pad0.3" "${recipe[@]}" --arch $arch --conv $conv --pad --dynamic-ratio 0.3
done
summarize "CondConv / DY-Conv / ODConv, fully dynamic vs PAD ($SCALE)"
