#!/usr/bin/env bash
# `make results-c100lt`: CIFAR-100-LT on the published expert logits, clean protocol, 5 gate seeds.
set -euo pipefail
ARGSE=${ARGSE:-.venv/bin/argse}
PY=${PY:-.venv/bin/python}
C100=${C100:-build/c100lt}
SEEDS=${SEEDS:-"42 43 44 45 46"}
C=(--config "$C100/pipeline.yaml")
$ARGSE import-logits "${C[@]}" -q
$ARGSE calibrate "${C[@]}" -q
evals=()
for s in $SEEDS; do
  for b in "--beta balanced" "--beta worst --xi 1.0"; do
    # shellcheck disable=SC2086
    $ARGSE train-gate "${C[@]}" $b --seed "$s" -q
    # shellcheck disable=SC2086
    g=$($ARGSE train-gate "${C[@]}" $b --seed "$s" --print-key)
    $ARGSE eval "${C[@]}" --gate "$g" -q
    evals+=(--eval "$($ARGSE eval "${C[@]}" --gate "$g" --print-key)")
  done
done
g42=$($ARGSE train-gate "${C[@]}" --beta balanced --seed 42 --print-key)
$ARGSE baselines "${C[@]}" --gate "$g42" -q
base=(--baselines "$($ARGSE baselines "${C[@]}" --gate "$g42" --print-key)")
$ARGSE report "${C[@]}" "${evals[@]}" "${base[@]}" --out reports/c100lt -q
rk=$($ARGSE report "${C[@]}" "${evals[@]}" "${base[@]}" --print-key)
mkdir -p docs
$PY -m argse_cli.report.markdown "$rk" --protocol "$C100/protocol.json" --command "make results-c100lt" > docs/RESULTS.md
echo "wrote docs/RESULTS.md (report $rk)"
