#!/usr/bin/env bash
# Forward and forward+backward time, forward FLOPs and stored FFN parameters of the
# MoE and PAD-MoE all-MiniLM-L6-v2 (E=8, top-2, PAD ratio 0.5) relative to the dense
# model, measured in one run: batch 32, sequence 128 (--mini: batch 8, sequence 64).
# Other flags go to moe/bench.py (e.g. --device cuda). The JSON lands in results/measured/
# (bench_moe-<full|mini>[-cuda].json, see output_suffix in scripts/flags.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/flags.sh
use_venv
export HF_HUB_OFFLINE=1
SCALE=full
for arg in "$@"; do [ "$arg" = --mini ] && SCALE=mini; done
"$PY" -m moe.bench --output "results/measured/bench_moe-$SCALE$(output_suffix "$PY" "$@").json" "$@"
