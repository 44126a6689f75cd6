#!/usr/bin/env bash
# Cost of DY-Conv / PAD-DY-Conv ResNet-18 relative to static, and stored parameters (see dyconv/bench.py).
# Usage: bash scripts/bench_dyconv.sh [--mini] [--sizes 112 224] [--batch-size 32] [--device cpu|cuda] ...
# The table is printed and, when the run succeeds, kept in results/measured/bench_dyconv-<mini|full>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
SCALE=full
for arg in "$@"; do [ "$arg" = --mini ] && SCALE=mini; done
tmp=$(mktemp)
if .venv/bin/python -m dyconv.bench "$@" | tee "$tmp"; then
  mkdir -p results/measured
  { echo "# bash scripts/bench_dyconv.sh $*"; cat "$tmp"; } > "results/measured/bench_dyconv-$SCALE.txt"
  rm -f "$tmp"
else
  status=$?
  rm -f "$tmp"
  exit "$status"
fi
