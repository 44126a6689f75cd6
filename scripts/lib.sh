# Shared by the table scripts: `source scripts/lib.sh "$@"`.
#   --mini       CPU scale: Fashion-MNIST (dyconv) and the embedded GLUE-style tasks (moe).
#   full scale:  IMAGENET=/path/with/train+val (dyconv); GLUE from the hub, or GLUE_DIR=/path/to/glue_data (moe).
# Runs land in runs/<script>/<row> (RUNS overrides); a row whose results exist is not run again,
# so an interrupted table script continues where it stopped. Tables go to results/measured/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MINI=0
for arg in "$@"; do
  case "$arg" in
    --mini) MINI=1 ;;
    *) echo "error: unknown argument $arg (only --mini)" >&2; exit 2 ;;
  esac
done
SCRIPT=$(basename "$0" .sh)
SCALE=$([ "$MINI" = 1 ] && echo mini || echo full)
RUNS=${RUNS:-runs/$SCRIPT-$SCALE}
PY=.venv/bin/python
[ -x "$PY" ] || bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-$([ "$MINI" = 1 ] && echo 1 || echo 0)}
COMMAND="bash scripts/$SCRIPT.sh$([ "$MINI" = 1 ] && echo ' --mini')"
ROWS=()

# dyconv_run ROW CONFIG [main.py flags...]: full scale trains configs/dyconv/CONFIG.yaml (a paper row) on
# ImageNet; --mini trains the same arch/conv/pad flags on Fashion-MNIST (configs/dyconv/fashion_mnist_quick.yaml).
dyconv_run() {
  local row=$1 config=$2; shift 2
  ROWS+=("$RUNS/$row")
  [ -f "$RUNS/$row/summary.json" ] && return 0
  if [ "$MINI" = 1 ]; then
    "$PY" dyconv/main.py --config configs/dyconv/fashion_mnist_quick.yaml "$@" --output "$RUNS/$row"
  else
    : "${IMAGENET:?set IMAGENET to an ImageNet folder with train/ and val/ (or pass --mini)}"
    "$PY" dyconv/main.py --config "configs/dyconv/$config.yaml" --data "$IMAGENET" "$@" --output "$RUNS/$row"
  fi
}

# glue_run ROW TASK [run_glue.py flags...]
glue_run() {
  local row=$1 task=$2; shift 2
  ROWS+=("$RUNS/$row")
  [ -f "$RUNS/$row/all_results.json" ] && return 0
  if [ "$MINI" = 1 ]; then
    "$PY" moe/run_glue.py configs/glue/minilm_quick.json --glue_dir data/glue --task_name "$task" "$@" --output_dir "$RUNS/$row" --overwrite_output_dir
  elif [ -n "${GLUE_DIR:-}" ]; then
    "$PY" moe/run_glue.py configs/glue/bert_base_pad.json --glue_dir "$GLUE_DIR" --task_name "$task" "$@" --output_dir "$RUNS/$row"
  else
    "$PY" moe/run_glue.py configs/glue/bert_base_pad.json --task_name "$task" "$@" --output_dir "$RUNS/$row"
  fi
}

# summarize TITLE: prints the table of every row run so far and writes results/measured/<script>-<scale>.md
summarize() {
  "$PY" scripts/summarize.py "${ROWS[@]}" --title "$1" --command "$COMMAND" \
    --output "results/measured/$SCRIPT-$SCALE.md"
}
