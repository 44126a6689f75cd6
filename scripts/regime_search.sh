#!/usr/bin/env bash
# Protocol search (CPU scale only): where does the fully dynamic model beat the static / dense one? Static vs
# DY-Conv ResNet-10 on all of Fashion-MNIST at widths 4, 8, 16 and 2 or 8 epochs; dense vs MoE MiniLM on the
# embedded SST-2- and RTE-style tasks at 4096 or 8000 training examples. The candidates, seeds and the rule that
# picks the claims' protocol are fixed in results/regime_selection.md; no PAD row runs here.
# Screen: JOBS=2 OMP_NUM_THREADS=1 bash scripts/regime_search.sh --mini            (3 seeds, every candidate)
# Confirm: CONFIRM=w8-e2 bash scripts/regime_search.sh --mini --seeds 5             (one candidate, seeds 3-4 added)
# Tables: results/measured/regime_search-mini[-dyconv|-glue].md (every candidate; --pipeline names the file),
# regime_search-confirm-<setting>-mini.md; the figure results/figures/protocol_search.png and the cost
# results/measured/suite_cost-regime_search-mini.md.
source "$(dirname "$0")/lib.sh" "$@"
[ "$MINI" = 1 ] && [ "$GPU" = 0 ] || { echo "error: regime_search.sh runs at CPU scale only: pass --mini" >&2; exit 2; }
# setting -> flags, in the cost order of results/regime_selection.md (temperature over the first 10% of training)
declare -A IMAGE=([w4-e2]="--resnet-width 4 --epochs 2 --temp-epochs 0.2"
                  [w8-e2]="--resnet-width 8 --epochs 2 --temp-epochs 0.2"
                  [w16-e2]="--resnet-width 16 --epochs 2 --temp-epochs 0.2"
                  [w4-e8]="--resnet-width 4 --epochs 8 --temp-epochs 0.8"
                  [w8-e8]="--resnet-width 8 --epochs 8 --temp-epochs 0.8"
                  [w16-e8]="--resnet-width 16 --epochs 8 --temp-epochs 0.8")
IMAGE_ORDER="w4-e2 w8-e2 w16-e2 w4-e8 w8-e8 w16-e8"
declare -A TEXT=([n4096-e1]="--max_train_samples 4096 --num_train_epochs 1"
                 [n8000-e1]="--max_train_samples 8000 --num_train_epochs 1")
TEXT_ORDER="n4096-e1 n8000-e1"
if [ -n "${CONFIRM:-}" ]; then
  if [ -n "${IMAGE[$CONFIRM]:-}" ]; then IMAGE_ORDER=$CONFIRM TEXT_ORDER=
  elif [ -n "${TEXT[$CONFIRM]:-}" ]; then IMAGE_ORDER= TEXT_ORDER=$CONFIRM
  else echo "error: CONFIRM=$CONFIRM is not a candidate (expected one of: ${!IMAGE[*]} ${!TEXT[*]})" >&2; exit 2; fi
  SCRIPT=regime_search-confirm-$CONFIRM
  COMMAND="CONFIRM=$CONFIRM $COMMAND"
fi
for setting in $IMAGE_ORDER; do
  # shellcheck disable=SC2086  # the flags are words
  dyconv_run "resnet10-$setting-static" resnet10_static --arch resnet10 --conv static ${IMAGE[$setting]}
  dyconv_run "resnet10-$setting-dyconv" resnet10_dyconv --arch resnet10 --conv dyconv ${IMAGE[$setting]}
  compare "resnet10-$setting-dyconv" "resnet10-$setting-static"
done
for setting in $TEXT_ORDER; do
  for task in sst2 rte; do
    for moe in none moe; do
      # shellcheck disable=SC2086
      glue_run "$task-$setting-$moe" "$task" "$moe" ${TEXT[$setting]}
    done
    compare "$task-$setting-moe" "$task-$setting-none"
  done
  for moe in none moe; do glue_average "average-$setting-$moe" "sst2-$setting-$moe" "rte-$setting-$moe"; done
  compare "average-$setting-moe" "average-$setting-none"
done
summarize "Protocol search: fully dynamic vs static / dense ($SCALE)"
# the screening's figure (gain against width and training length, beside the published gains) and its cost, where
# the runs sit in the standard layout (RUNS_ROOT/regime_search-mini)
if [ -z "${CONFIRM:-}" ] && [ "$(basename "$RUNS")" = "$SCRIPT-$SCALE" ]; then
  "$PY" scripts/figures.py --runs "$(dirname "$RUNS")" --scale mini --seeds 3 --figures search \
    --output "${FIGURES:-results/figures}"
  "$PY" scripts/suite_cost.py --runs "$(dirname "$RUNS")" --scale mini --jobs "$JOBS" --scripts "$SCRIPT" \
    --output "$RESULTS/suite_cost-$SCRIPT-mini.md"
fi
