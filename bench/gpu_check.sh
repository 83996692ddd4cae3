#!/usr/bin/env bash
# bench/gpu_check.sh -- the GPU check of issue 20 (item 4): on a lent CUDA machine, in <= 8 min,
# the trainer-vs-reference ratio, one 200-epoch ResNet-32 expert (wall time, class-balanced
# accuracy), the fused and the shared-backbone speedups; JSON lines for docs/BENCHMARKS.md.
#
# 1. Here (2 min; needs the package mirror and ../shared): fill the git-ignored .carry/ with the
#    wheels the machine lacks (zarr, numcodecs, pydantic, ...) and the offline CIFAR-10 builder:
#        make gpu-carry
#    It checks that the repository plus .carry stays under the device tool's 64 MiB.
# 2. The device tool's call, exactly (one call; the machine starts in a minute or two, the check
#    ends by its own 450 s deadline, so 540 s leaves margin inside the 15 min of device time):
#        run(command="bash bench/gpu_check.sh", carry=[".carry"], timeout_s=540)
#    then give_back unless you rerun at once. What comes back: gpu_check.jsonl, gpu_check.log.
# 3. Here: python bench/run_all.py --merge-gpu <files_at>/gpu_check.jsonl   (the GPU section of
#    docs/BENCHMARKS.md; commit it).
#
# CPU dry run (every part in tiny sizes on the CPU, the wheel plan checked, nothing installed;
# tests/test_gpu_check.py runs it in CI):
#     bash bench/gpu_check.sh --dry-run        (or GPU_CHECK_DRY_RUN=1)
# Options pass through to bench/gpu_check.py (--out DIR, --deadline S, --parts ID ...).
# The interpreter: $PY, else the machine's /opt/torch/.venv/bin/python3, else ./.venv/bin/python,
# else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  for c in /opt/torch/.venv/bin/python3 ./.venv/bin/python python3; do
    if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
export PYTHONUNBUFFERED=1
if [ -z "${ARGSE_SHARED:-}" ] && [ -f .carry/shared/data/cifar10/build_cifar10.py ]; then
  export ARGSE_SHARED="$PWD/.carry/shared"
fi
exec "$PY" bench/gpu_check.py "$@"
