#!/usr/bin/env bash
# `make demo`: every stage on the demo recipe, import-logits on the demo's own experts written out as
# plain .npy files (the path for logits from elsewhere), and `apply` of the stored balanced gate.
# Each stage prints its key last ("wrote KEY" / "cached KEY"); the keys are taken from there
# (stage_key.sh), so a rerun is one cache hit per stage and nothing else (apply is skipped when its output is for this gate).
set -euo pipefail
ARGSE=${ARGSE:-.venv/bin/argse}
PY=${PY:-.venv/bin/python}
CFG=${CFG:-configs/demo.yaml}
OUT=${OUT:-reports/demo}
IMPORT=${IMPORT:-build/demo_import}
C=(--config "$CFG")

# shellcheck source=scripts/stage_key.sh
source "$(dirname "$0")/stage_key.sh"

stage_key split "${C[@]}" >/dev/null
stage_key train-expert "${C[@]}" >/dev/null
ek=$(stage_key export-logits "${C[@]}")
stage_key calibrate "${C[@]}" >/dev/null
"$PY" scripts/export_to_files.py "$ek" "$IMPORT" >/dev/null
stage_key import-logits --config "$IMPORT/pipeline.yaml" >/dev/null
stage_key calibrate --config "$IMPORT/pipeline.yaml" >/dev/null
gb=$(stage_key train-gate "${C[@]}" --beta balanced)
gw=$(stage_key train-gate "${C[@]}" --beta worst --xi 1.0)
stage_key eval "${C[@]}" --gate "$gb" >/dev/null
stage_key eval "${C[@]}" --gate "$gw" >/dev/null
stage_key baselines "${C[@]}" >/dev/null
stage_key report "${C[@]}" --latest --out "$OUT" >/dev/null
# apply: the stored balanced gate + rejector on the test logits files, one per expert in gate order
if [ -f "$OUT/apply_test.npz" ] && [ "$(cat "$OUT/apply_test.gate" 2>/dev/null)" = "$gb" ]; then
  echo "apply: $OUT/apply_test.npz is already gate $gb's (skipped)" >&2
else
  logits=()
  for f in "$IMPORT"/logits/e*_test.npy; do logits+=(--logits "$f"); done
  "$ARGSE" apply "$gb" "${logits[@]}" --out "$OUT/apply_test.npz"
  echo "$gb" > "$OUT/apply_test.gate"
fi
