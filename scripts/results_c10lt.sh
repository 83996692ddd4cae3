#!/usr/bin/env bash
# `make results-c10lt`: CIFAR-10-LT from experts trained here on the CPU (configs/cifar10lt-cpu.yaml):
# split -> train-expert -> export-logits -> calibrate -> 5 gate seeds x 2 gates (+ eval) -> baselines
# (with the ablations) -> report, rendered as docs/RESULTS.md's CIFAR-10-LT section. A rerun is all
# cache hits; an interrupted train-expert resumes from its last checkpoint.
set -euo pipefail
ARGSE=${ARGSE:-.venv/bin/argse}
PY=${PY:-.venv/bin/python}
CFG=${CFG:-configs/cifar10lt-cpu.yaml}
SEEDS=${SEEDS:-"42 43 44 45 46"}
OUT=${OUT:-docs/RESULTS.md}
C=(--config "$CFG")
t0=$(date +%s)
# shellcheck source=scripts/stage_key.sh
source "$(dirname "$0")/stage_key.sh"
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" >&2; }
stamp "split"
$ARGSE split "${C[@]}" -q
stamp "train-expert (the long part: see the recipe's comments)"
$ARGSE train-expert "${C[@]}"
stamp "export-logits, calibrate"
$ARGSE export-logits "${C[@]}" -q
$ARGSE calibrate "${C[@]}" -q
evals=()
for s in $SEEDS; do
  for b in "--beta balanced" "--beta worst --xi 1.0"; do
    stamp "train-gate $b --seed $s, eval"
    # shellcheck disable=SC2086
    g=$(stage_key train-gate "${C[@]}" $b --seed "$s" -q)
    e=$(stage_key eval "${C[@]}" --gate "$g" -q)
    evals+=(--eval "$e")
  done
done
g42=$($ARGSE train-gate "${C[@]}" --beta balanced --seed 42 --print-key)
stamp "baselines (and the ablation gates)"
bk=$(stage_key baselines "${C[@]}" --gate "$g42" -q)
base=(--baselines "$bk")
stamp "report"
rk=$(stage_key report "${C[@]}" "${evals[@]}" "${base[@]}" --out reports/c10lt -q)
mkdir -p build "$(dirname "$OUT")"
$PY -m argse_cli.report.notes --config "$CFG" > build/c10lt_notes.json
$PY -m argse_cli.report.markdown "$rk" --protocol build/c10lt_notes.json --command "make results-c10lt" \
  --title "CIFAR-10-LT (experts trained here on the CPU)" --section c10lt --into "$OUT"
stamp "wrote $OUT (report $rk)"
