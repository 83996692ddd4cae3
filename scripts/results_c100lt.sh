#!/usr/bin/env bash
# `make results-c100lt`: CIFAR-100-LT on the published expert logits, cross-fitting (PROTOCOL=crossfit,
# 5 folds) or the holdout split (PROTOCOL=holdout); 5 gate seeds x 2 gates per fold; one report over
# all folds (out-of-fold rows pooled), rendered as docs/RESULTS.md's first section.
# The folds are independent: JOBS of them (default: the number of cores) run at the same time, each
# a sequence of stage commands (every stage result is the same as in a sequential run: same keys,
# same thread counts; OMP_WAIT_POLICY=PASSIVE keeps the waiting threads off the cores).
set -euo pipefail
ARGSE=${ARGSE:-.venv/bin/argse}
PY=${PY:-.venv/bin/python}
C100=${C100:-build/c100lt}
SEEDS=${SEEDS:-"42 43 44 45 46"}
OUT=${OUT:-docs/RESULTS.md}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 1)}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
t0=$(date +%s)
# shellcheck source=scripts/stage_key.sh
source "$(dirname "$0")/stage_key.sh"
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" >&2; }
keys=$(mktemp -d)
trap 'rm -rf "$keys"' EXIT

fold_run() {  # one fold: import, calibrate, the gates and their evals, the baselines; keys into $keys/<fold>.*
  local pipe=$1 fold s b g e g42 bk
  local C=(--config "$pipe")
  fold=$(basename "$(dirname "$pipe")")
  stamp "$fold: import-logits, calibrate"
  $ARGSE import-logits "${C[@]}" -q
  $ARGSE calibrate "${C[@]}" -q
  for s in $SEEDS; do
    for b in "--beta balanced" "--beta worst --xi 1.0"; do
      stamp "$fold: train-gate $b --seed $s, eval"
      # shellcheck disable=SC2086
      g=$(stage_key train-gate "${C[@]}" $b --seed "$s" -q)
      e=$(stage_key eval "${C[@]}" --gate "$g" -q)
      echo "--eval $e" >> "$keys/$fold.evals"
    done
  done
  g42=$($ARGSE train-gate "${C[@]}" --beta balanced --seed 42 --print-key)
  stamp "$fold: baselines"
  bk=$(stage_key baselines "${C[@]}" --gate "$g42" -q)
  echo "--baselines $bk" > "$keys/$fold.baselines"
  stamp "$fold: done"
}

pipes=("$C100"/*/pipeline.yaml)
stamp "${#pipes[@]} fold(s), $JOBS at a time"
pids=()
for pipe in "${pipes[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  fold_run "$pipe" &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { echo "a fold failed (its log is above)" >&2; exit 1; }; done
evals=() bases=()
for pipe in "${pipes[@]}"; do  # fold order, as a sequential run lists them
  fold=$(basename "$(dirname "$pipe")")
  # shellcheck disable=SC2207
  evals+=($(cat "$keys/$fold.evals")) && bases+=($(cat "$keys/$fold.baselines"))
done
first=${pipes[0]}
stamp "report over ${#pipes[@]} fold(s)"
rk=$(stage_key report --config "$first" "${evals[@]}" "${bases[@]}" --out reports/c100lt -q)
stamp "markdown"
mkdir -p "$(dirname "$OUT")"
$PY -m argse_cli.report.markdown "$rk" --protocol "$C100/protocol.json" --command "make results-c100lt" \
  --section c100lt --into "$OUT"
stamp "wrote $OUT (report $rk)"
