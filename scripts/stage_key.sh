# Sourced by the recipe scripts (demo.sh, results_c100lt.sh, results_c10lt.sh).
# stage_key ARGS...: run `$ARGSE ARGS...` (its command line and its output go to stderr) and echo the
# key of the artifact it wrote or found: every stage prints "wrote KEY" / "cached KEY" last (also
# with -q), so no second `--print-key` process is needed. Fails when the stage fails or names no key.
stage_key() {
  local out
  echo "$ARGSE $*" >&2
  out=$("$ARGSE" "$@") || return
  printf '%s\n' "$out" >&2
  printf '%s\n' "$out" | grep -E '^(wrote|cached) [0-9a-f]{32}$' | tail -n 1 | cut -d' ' -f2
}
