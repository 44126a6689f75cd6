#!/usr/bin/env bash
# Cost of DY-Conv / PAD-DY-Conv ResNet-18 relative to static, and stored parameters (see dyconv/bench.py).
# Usage: bash scripts/bench_dyconv.sh [--mini] [--sizes 112 224] [--batch-size 32] [--device cpu|cuda] ...
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m dyconv.bench "$@"
