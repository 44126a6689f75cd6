#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite on CPU. Extra arguments go to pytest, e.g.
# `bash scripts/test.sh tests/test_pad_partition.py -k taylor` for one file (pyproject's testpaths is the whole suite).
# The tests run in one pytest-xdist worker per core, each torch process on one thread (OMP_NUM_THREADS, unless
# set): most tests are short and latency-bound, so two one-thread workers finish sooner than one two-thread
# process. worksteal hands the long smoke-run tests to whichever worker is free.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m pytest -q -n auto --dist worksteal "$@"
