#!/usr/bin/env bash
# Cost of DY-Conv / PAD-DY-Conv (ResNet-18, MobileNetV2 x1.0) relative to static, per-layer schemes and
# stored parameters (see dyconv/bench.py).
# Usage: bash scripts/bench_dyconv.sh [--mini] [--sizes 112 224] [--batch-size 32] [--scheme auto|grouped|stacked|bmm]
#                                     [--device cpu|cuda] [--amp] [--keep-freed-memory] [--variants dyconv ...]
#                                     [--passes train infer infer1] [--compile [inductor|aot_eager|eager]] [--layers] ...
# Runs twice, with the default allocator (what a user's own script gets) and after pad.runtime.keep_freed_memory()
# (what the CLIs use), unless --keep-freed-memory is given (then only that).  The tables are printed and, when
# the runs succeed, kept in results/measured/bench_dyconv-<mini|full>.txt (-<mini|full>-compile.txt with --compile,
# -<mini|full>-layers.txt with --layers: each dynamic conv timed alone under every scheme; -cuda and -amp are
# added to the name on CUDA and with --amp, see output_suffix in scripts/flags.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/flags.sh
use_venv
export HF_HUB_OFFLINE=1
SCALE=full
ALLOCATORS=("" "--keep-freed-memory")
for arg in "$@"; do
  [ "$arg" = --mini ] && SCALE=mini
  [ "$arg" = --keep-freed-memory ] && ALLOCATORS=("")
done
NAME=bench_dyconv-$SCALE$(output_suffix "$PY" "$@")
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for allocator in "${ALLOCATORS[@]}"; do
  # shellcheck disable=SC2086  # $allocator is empty or one flag
  "$PY" -m dyconv.bench "$@" $allocator | tee -a "$tmp"
  echo | tee -a "$tmp"
done
mkdir -p results/measured
{ echo "# bash scripts/bench_dyconv.sh $*"; cat "$tmp"; } > "results/measured/$NAME.txt"
