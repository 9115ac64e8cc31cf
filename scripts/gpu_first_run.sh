#!/usr/bin/env bash
# The first run on a lent GPU machine, in one command that ends within 9 minutes (BUDGET_S):
#   1. install the carried wheels (ray, pydantic, nvtx, ...) that the GPU image lacks;
#   2. print nvidia-smi, nvcc and g++ (AOTInductor compiles with them);
#   3. run the GPU tests (pytest -m gpu), bounded;
#   4. run scripts/gpu_check.py with the time left (--time-left-s), which plans to end 60 s early.
# Logs and the sweep's reports go to $OUT (the device tool brings that folder back).
#
# Before the run, on a machine that reaches the package registry, fetch the wheels into a folder of
# the checkout that git ignores, and carry it:
#   ../shared/tools/gpu-wheels.sh .whl         # then run with carry [".whl"]
#   bash scripts/gpu_first_run.sh
# Rehearsal without a GPU (no install, the CPU flow of every step, this Python's packages):
#   PYTHON=.venv/bin/python bash scripts/gpu_first_run.sh --cpu
set -uo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0
start=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
TESTS_S=${TESTS_S:-150}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/aitune-site}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-first-run-out}
mkdir -p "$OUT"
cpu=0
[ "${1:-}" = "--cpu" ] && cpu=1
say() { echo "== $(( $(date +%s) - start )) s: $*"; }
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }

say "install"
if [ "$cpu" = 1 ]; then
  echo "rehearsal: no install, $PYTHON's own packages"
else
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    if [ -x ../shared/tools/gpu-wheels.sh ]; then
      ../shared/tools/gpu-wheels.sh "$WHEELS" || { echo "gpu_first_run: fetching the wheels failed (offline?)" >&2; exit 2; }
    else
      echo "gpu_first_run: no wheels in $WHEELS: fetch them first with ../shared/tools/gpu-wheels.sh $WHEELS and carry that folder" >&2
      exit 2
    fi
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl || exit 2
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # absolute: Ray workers start in other directories

say "the machine"
{
  nvidia-smi || echo "nvidia-smi: not found"
  nvcc --version || echo "nvcc: not found (AOTInductor needs a CUDA compiler for GPU packages)"
  g++ --version || echo "g++: not found (Inductor needs a C++ compiler)"
  "$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

say "pytest -m gpu (at most $TESTS_S s)"
timeout --signal=INT --kill-after=10 "$TESTS_S" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider -ra tests 2>&1 \
  | tee "$OUT/pytest_gpu.txt" | tail -40
tests_rc=${PIPESTATUS[0]}
say "pytest -m gpu: exit $tests_rc"

t=$(left)
say "gpu_check.py --time-left-s $t"
check_args=(--time-left-s "$t" --store /tmp/aitune-gpu-check --force)
[ "$cpu" = 1 ] && check_args+=(--cpu)
"$PYTHON" scripts/gpu_check.py "${check_args[@]}" 2>&1 | tee "$OUT/gpu_check.txt"
check_rc=${PIPESTATUS[0]}
# the sweep's reports, flattened (the store itself is too deep to come back)
for f in /tmp/aitune-gpu-check/run-*/reports/*/report.{json,md}; do
  [ -f "$f" ] && cp "$f" "$OUT/gpu_check_$(basename "$f")"
done
say "gpu_check.py: exit $check_rc; done, $(left) s of the $BUDGET_S s left"
[ "$tests_rc" = 0 ] && [ "$check_rc" = 0 ]
