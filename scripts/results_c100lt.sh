#!/usr/bin/env bash
# `make results-c100lt`: CIFAR-100-LT on the published expert logits, cross-fitting (PROTOCOL=crossfit,
# 5 folds) or the holdout split (PROTOCOL=holdout); 5 gate seeds x 2 gates per fold; one report over
# all folds (out-of-fold rows pooled), rendered as docs/RESULTS.md's first section.
set -euo pipefail
ARGSE=${ARGSE:-.venv/bin/argse}
PY=${PY:-.venv/bin/python}
C100=${C100:-build/c100lt}
SEEDS=${SEEDS:-"42 43 44 45 46"}
OUT=${OUT:-docs/RESULTS.md}
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" >&2; }
evals=()
bases=()
for pipe in "$C100"/*/pipeline.yaml; do
  C=(--config "$pipe")
  fold=$(basename "$(dirname "$pipe")")
  stamp "$fold: import-logits, calibrate"
  $ARGSE import-logits "${C[@]}" -q
  $ARGSE calibrate "${C[@]}" -q
  for s in $SEEDS; do
    for b in "--beta balanced" "--beta worst --xi 1.0"; do
      stamp "$fold: train-gate $b --seed $s, eval"
      # shellcheck disable=SC2086
      $ARGSE train-gate "${C[@]}" $b --seed "$s" -q
      # shellcheck disable=SC2086
      g=$($ARGSE train-gate "${C[@]}" $b --seed "$s" --print-key)
      $ARGSE eval "${C[@]}" --gate "$g" -q
      evals+=(--eval "$($ARGSE eval "${C[@]}" --gate "$g" --print-key)")
    done
  done
  g42=$($ARGSE train-gate "${C[@]}" --beta balanced --seed 42 --print-key)
  stamp "$fold: baselines"
  $ARGSE baselines "${C[@]}" --gate "$g42" -q
  bases+=(--baselines "$($ARGSE baselines "${C[@]}" --gate "$g42" --print-key)")
done
first=$(ls "$C100"/*/pipeline.yaml | head -n 1)
stamp "report over $(ls "$C100"/*/pipeline.yaml | wc -l) fold(s)"
$ARGSE report --config "$first" "${evals[@]}" "${bases[@]}" --out reports/c100lt -q
rk=$($ARGSE report --config "$first" "${evals[@]}" "${bases[@]}" --print-key)
stamp "markdown"
mkdir -p "$(dirname "$OUT")"
$PY -m argse_cli.report.markdown "$rk" --protocol "$C100/protocol.json" --command "make results-c100lt" \
  --section c100lt --into "$OUT"
stamp "wrote $OUT (report $rk)"
