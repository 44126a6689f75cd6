# The flags that scripts/lib.sh (every table and ablation script) and scripts/mini_suite.sh share:
#   source scripts/flags.sh; parse_flags "USAGE" "$@"; settle_flags DEFAULT_SEEDS
# parse_flags reads --seeds N, --jobs N, --pipeline P, and --mini / --gpu / --smoke where USAGE (the list of
# flags the error line for an unknown argument names) names them (--gpu sets GPU=1 and MINI=1: the mini rows
# at GPU scale; --protocol sets PROTOCOL=1 and MINI=1: the mini rows at the protocol results/regime_selection.md
# chose); settle_flags sets SEEDS, JOBS and PIPELINE from
# the flags, else the environment (SEEDS=, JOBS=, PIPELINE=), else the defaults (DEFAULT_SEEDS, 1, all), and
# checks them. Bad input: one error line, exit status 2. Also here, for every script: use_venv, cuda_available PY and
# output_suffix PY ARGS... (the -cuda/-amp/... part of a benchmark's output name).
parse_flags() {
  local usage=$1; shift
  MINI=0 MINI_FLAG=0 GPU=0 SMOKE=0 PROTOCOL=0 SEEDS_FLAG= JOBS_FLAG= PIPELINE_FLAG=
  while [ $# -gt 0 ]; do
    case "$1" in
      --mini|--gpu|--smoke|--protocol)
        [[ "$usage" == *"$1"* ]] || { echo "error: unknown argument $1 (expected $usage)" >&2; exit 2; }
        case "$1" in --mini) MINI_FLAG=1 ;; --gpu) GPU=1 ;; --smoke) SMOKE=1 ;; --protocol) PROTOCOL=1 ;; esac ;;
      --seeds)
        [ $# -ge 2 ] || { echo "error: --seeds needs a number" >&2; exit 2; }
        SEEDS_FLAG=$2; shift ;;
      --jobs)
        [ $# -ge 2 ] || { echo "error: --jobs needs a number" >&2; exit 2; }
        JOBS_FLAG=$2; shift ;;
      --pipeline)
        [ $# -ge 2 ] || { echo "error: --pipeline needs dyconv, glue or all" >&2; exit 2; }
        PIPELINE_FLAG=$2; shift ;;
      *) echo "error: unknown argument $1 (expected $usage)" >&2; exit 2 ;;
    esac
    shift
  done
  if [ "$MINI_FLAG" = 1 ] && [ "$GPU" = 1 ]; then echo "error: --mini and --gpu exclude each other" >&2; exit 2; fi
  if [ "$MINI_FLAG" = 1 ] && [ "$SMOKE" = 1 ]; then echo "error: --mini and --smoke exclude each other" >&2; exit 2; fi
  if [ "$GPU" = 1 ] && [ "$SMOKE" = 1 ]; then echo "error: --gpu and --smoke exclude each other" >&2; exit 2; fi
  if [ "$PROTOCOL" = 1 ] && [ "$((MINI_FLAG + GPU + SMOKE))" -gt 0 ]; then
    echo "error: --protocol excludes --mini, --gpu and --smoke" >&2; exit 2
  fi
  if [ "$MINI_FLAG" = 1 ] || [ "$GPU" = 1 ] || [ "$PROTOCOL" = 1 ]; then MINI=1; fi
}

settle_flags() {
  SEEDS=${SEEDS_FLAG:-${SEEDS:-$1}}
  if ! [[ "$SEEDS" =~ ^[1-9][0-9]*$ ]]; then echo "error: the number of seeds must be a positive integer, got '$SEEDS'" >&2; exit 2; fi
  JOBS=${JOBS_FLAG:-${JOBS:-1}}
  if ! [[ "$JOBS" =~ ^[1-9][0-9]*$ ]]; then echo "error: the number of jobs must be a positive integer, got '$JOBS'" >&2; exit 2; fi
  PIPELINE=${PIPELINE_FLAG:-${PIPELINE:-all}}
  case "$PIPELINE" in
    dyconv|glue|all) ;;
    *) echo "error: the pipeline must be dyconv, glue or all, got '$PIPELINE'" >&2; exit 2 ;;
  esac
}

# use_venv: PY, the python of the project's virtual environment (scripts/setup.sh makes it where it is missing).
use_venv() {
  PY=.venv/bin/python
  [ -x "$PY" ] || bash scripts/setup.sh
}

# cuda_available PY: succeeds when PY's torch sees a CUDA device.
cuda_available() {
  "$1" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null
}

# output_suffix PY ARGS...: what a benchmark's flags add to its output file's name, so that a GPU, AMP, compiled
# or per-layer table never replaces the plain CPU one: -cuda when it runs on CUDA (--device cuda, or no --device
# where PY's torch sees a GPU: the benchmarks' default), then -amp, -compile and -layers for those flags.
output_suffix() {
  local py=$1 device= amp= compile= layers= prev= arg
  shift
  for arg in "$@"; do
    case "$prev $arg" in "--device cuda"|*" --device=cuda") device=-cuda ;; "--device "*|*" --device="*) device=cpu ;; esac
    case "$arg" in --amp) amp=-amp ;; --compile|--compile=*) compile=-compile ;; --layers) layers=-layers ;; esac
    prev=$arg
  done
  if [ -z "$device" ] && cuda_available "$py"; then device=-cuda; fi
  [ "$device" = cpu ] && device=
  echo "$device$amp$compile$layers"
}
