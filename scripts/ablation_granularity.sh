#!/usr/bin/env bash
# Ablation: partition granularity (element = the paper's single positions, kernel = k x k slices,
# unit = whole output filters / expert output rows, whose static part runs as one dense op) at the
# paper's ratios: PAD-DY-Conv ResNet-50 at 0.3 and PAD-MoE on RTE at 0.5 (element and unit: a linear
# layer has no kernel slices). CPU: --mini (ResNet-10 on Fashion-MNIST; MiniLM on the RTE-style task;
# 3 seeds). --seeds N; --smoke: every full row for one step (IMAGENET=tiny GLUE_DIR=tiny).
# Comparisons: kernel and unit vs element (accuracy, paired by seed); then stored parameters and
# seconds per training step of every row (scripts/cost_table.py, appended to the table).
source "$(dirname "$0")/lib.sh" "$@"
arch=$([ "$MINI" = 1 ] && echo resnet10 || echo resnet50)
for granularity in element kernel unit; do
  dyconv_run "$arch-pad0.3-$granularity" resnet50_dyconv_pad --arch $arch --conv dyconv --pad \
    --partition-granularity $granularity
done
for granularity in element unit; do
  glue_run "rte-pad-$granularity" rte pad --partition_granularity $granularity
done
compare "$arch-pad0.3-kernel" "$arch-pad0.3-element"
compare "$arch-pad0.3-unit" "$arch-pad0.3-element"
compare rte-pad-unit rte-pad-element
summarize "Partition granularity: element / kernel / unit ($SCALE)"
[ -z "$TABLE" ] || "$PY" scripts/cost_table.py "${ROWS[@]}" --seeds "$SEEDS" \
  --title "Stored parameters and time per training step" --output "$TABLE"
