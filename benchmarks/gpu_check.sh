#!/usr/bin/env bash
# The GPU check: bpcore's tests on its GPU backends, then the GPU benchmark profile, on an
# NVIDIA machine (made for the H100/H200 machines this project borrows: no network, with
# cupy-cuda13x, JAX with CUDA, PyTorch and setuptools, but no array-api-compat).
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine; results in $OUT
#   bash benchmarks/gpu_check.sh --dry-run   # on any machine: CPU devices stand in for the
#                                            # GPU, to test this script's own logic
#
# Before going to the GPU machine, on a machine with package access:
#   bash benchmarks/fetch_gpu_wheels.sh      # -> .whl/ (git-ignored): carry it along
#
# Phases, each under its own time limit; a limit or a Ctrl-C / SIGINT / SIGTERM stops the
# phase with SIGINT, and the phase still writes its summary and reports:
#   1. preflight (~20 s): refuses at once, exit 4, unless there is a GPU that JAX, PyTorch and
#      CuPy all use (`python -m benchmarks.preflight`); installs bpcore (no dependencies).
#   2. tests (GPU_CHECK_TEST_LIMIT, default 230 s; GPU_CHECK_PER_TEST, default 60 s each;
#      they took 164 s on an H100, 120 s of it JAX's eager dispatch and compiles):
#      every test that exercises cupy, jax or torch (BPCORE_TESTS=gpu), the cross-backend
#      ones first; bpcore.sklearn's last, and scikit-learn's estimator checks (hundreds of
#      small fits) after them, CuPy's first, so a limit that cuts them short costs no other
#      test; no -x; a GPU test that would skip fails instead (BPCORE_REQUIRE_GPU=1).
#      Narrowed by GPU_CHECK_TEST_K (a -k expression) and GPU_CHECK_TEST_PATHS (default tests).
#   3. benchmark (GPU_CHECK_BENCH_LIMIT, default 150 s): `python -m benchmarks --gpu`, which
#      takes no new measurement after GPU_CHECK_BENCH_BUDGET seconds (default: the limit
#      less 25 s) and writes a partial report if stopped.
# At most 20 + 230 + 150 s = 6.7 min: one 10-minute call, and a second try still fits in 15
# minutes of device time with the machine's start (~35 s).
# float32 matrix products run at full FP32 in every library (JAX's GPU default is TF32);
# GPU_CHECK_PRECISION=tf32 measures TF32 instead, labelled as such in the report.
#
# Output, at most 7 files: $OUT/gpu_check.log (everything printed), $OUT/gpu_tests.xml,
# $OUT/bench/{results.json,results.md,time_per_step.png,ratio_to_floor.png,batch_sweep.png}.
# Exit status: 0 tests passed and benchmark complete; +1 tests failed or did not finish;
# +2 benchmark incomplete or a measurement failed (so 3 = both); 4 refused by the preflight
# or the install failed (nothing ran).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 64 ;;
esac
OUT="${OUT:-gpu-results}"
PY="${PYTHON:-python3}"
TEST_LIMIT="${GPU_CHECK_TEST_LIMIT:-230}"
PER_TEST="${GPU_CHECK_PER_TEST:-60}"
BENCH_LIMIT="${GPU_CHECK_BENCH_LIMIT:-150}"
BENCH_BUDGET="${GPU_CHECK_BENCH_BUDGET:-$(( BENCH_LIMIT > 35 ? BENCH_LIMIT - 25 : 10 ))}"
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:---gpu}"
PRECISION="${GPU_CHECK_PRECISION:-highest}"
TEST_K="${GPU_CHECK_TEST_K:-}"      # optional pytest -k expression (narrows the selection)
TEST_PATHS="${GPU_CHECK_TEST_PATHS:-tests}"  # test files or folders, space-separated

mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
# Equal arithmetic for the tests too: float32 tolerances assume FP32 products.
export JAX_DEFAULT_MATMUL_PRECISION=$([ "$PRECISION" = tf32 ] && echo tensorfloat32 || echo highest)
export CUPY_TF32=$([ "$PRECISION" = tf32 ] && echo 1 || echo 0)
t0=$(date +%s)
TIMED_OUT=$(mktemp)  # a phase's watchdog writes here when it fires
elapsed() { echo $(( $(date +%s) - t0 )); }

finish() {  # finish EXIT_CODE: print the summary, flush the log, exit
  echo "== done in $(elapsed)s; exit status $1; files in $OUT:"
  find "$OUT" -type f -printf '  %P (%s bytes)\n' | sort
  rm -f "$TIMED_OUT"
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null
  exit "$1"
}

# A signal stops the running phase (its report is still written) and every later phase.
# Each phase runs as its own process group; "stop" means SIGINT to that group, repeated every
# 5 s (a test may swallow one KeyboardInterrupt: the CLI turns it into exit status 130), and
# SIGKILL if it is still there 30 s later.
CHILD=""
STOPPED=""
stop_group() {  # stop_group PGID
  local i
  for i in 1 2 3 4 5 6; do
    kill -INT -- "-$1" 2>/dev/null || return 0
    sleep 5
  done
  kill -KILL -- "-$1" 2>/dev/null
}
on_signal() {
  STOPPED=$1
  echo "== $1 received after $(elapsed)s: stopping the current phase; reports are still written"
  [ -n "$CHILD" ] && { stop_group "$CHILD" & }
}
trap 'on_signal SIGINT' INT
trap 'on_signal SIGTERM' TERM

run_phase() {  # run_phase LIMIT_S CMD...: stopped (as above) once LIMIT_S seconds have passed
  local limit=$1 rc watchdog
  shift
  : >"$TIMED_OUT"
  set -m  # job control: the phase gets its own process group, with SIGINT not ignored
  "$@" &
  CHILD=$!
  (trap - INT TERM; sleep "$limit"; echo 1 >"$TIMED_OUT"; stop_group "$CHILD") >/dev/null 2>&1 &
  watchdog=$!
  set +m
  while :; do
    wait "$CHILD"
    rc=$?
    kill -0 "$CHILD" 2>/dev/null || break  # still running: a trapped signal woke us
  done
  kill -- "-$watchdog" 2>/dev/null
  CHILD=""
  [ -s "$TIMED_OUT" ] && return 124
  return "$rc"
}

echo "== bpcore GPU check$([ $DRY = 1 ] && echo ' (DRY RUN: CPU stand-in)') at $(date -u +%FT%TZ)"
echo "== limits: tests ${TEST_LIMIT}s (${PER_TEST}s each), benchmark ${BENCH_LIMIT}s (budget ${BENCH_BUDGET}s); float32 products: $PRECISION"

# ---- 1. preflight ------------------------------------------------------------------------
echo "== nvidia-smi"
if command -v nvidia-smi >/dev/null && nvidia-smi; then
  :
elif [ $DRY = 1 ]; then
  echo "(no working nvidia-smi: fine for a dry run)"
else
  echo "PREFLIGHT REFUSED: no NVIDIA GPU here (nvidia-smi is missing or failed)."
  echo "Run this on a GPU machine, or use --dry-run to test the script on the CPU."
  finish 4
fi
if [ $DRY = 0 ] && [ "${GPU_CHECK_SKIP_INSTALL:-0}" != 1 ]; then
  if ! $PY -c "import array_api_compat" 2>/dev/null; then
    wheels=(.whl/array_api_compat-*.whl)
    if [ ! -e "${wheels[0]}" ] || [ "${#wheels[@]}" -ne 1 ]; then
      echo "PREFLIGHT REFUSED: array-api-compat is not installed and .whl/ holds ${#wheels[@]} matching wheels, not 1."
      echo "Run benchmarks/fetch_gpu_wheels.sh where pip works, and carry .whl along."
      finish 4
    fi
    echo "== installing ${wheels[0]}"
    $PY -m pip install -q --no-index --no-deps "${wheels[0]}" || finish 4
  fi
  if ! $PY -c "import mpi4py" 2>/dev/null && ls .whl/mpi4py-*.whl .whl/mpich-*.whl >/dev/null 2>&1; then
    echo "== installing MPI (mpich, mpi4py) from .whl/ for the data-parallel GPU tests"
    $PY -m pip install -q --no-index --no-deps .whl/mpich-*.whl .whl/mpi4py-*.whl \
      || echo "(MPI not installed: the data-parallel MPI tests will skip)"
  fi
  echo "== installing bpcore (no dependencies)"
  $PY -m pip install -q --no-deps --no-build-isolation -e . || finish 4
fi
echo "== preflight"
$PY -m benchmarks.preflight $([ $DRY = 1 ] && echo "--standin cpu") || finish 4
[ -n "$STOPPED" ] && finish 4

# ---- 2. tests ----------------------------------------------------------------------------
TESTS_OK=0
echo "== tests on the GPU backends (limit ${TEST_LIMIT}s), after $(elapsed)s"
per_test=()
if $PY -c "import pytest_timeout" 2>/dev/null; then
  per_test=(--timeout "$PER_TEST")
else
  echo "(pytest-timeout is not installed: no per-test limit)"
fi
kexpr=()
[ -n "$TEST_K" ] && kexpr=(-k "$TEST_K")
BPCORE_TESTS=gpu BPCORE_REQUIRE_GPU=$([ $DRY = 1 ] && echo 0 || echo 1) \
  # shellcheck disable=SC2086  # TEST_PATHS is a list of paths
  run_phase "$TEST_LIMIT" $PY -m pytest $TEST_PATHS -p no:cacheprovider -ra --benchmark-disable \
  "${per_test[@]}" "${kexpr[@]}" --junitxml="$OUT/gpu_tests.xml"
rc=$?
counts=$($PY - "$OUT/gpu_tests.xml" <<'PY' 2>/dev/null
import sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot().find("testsuite").attrib
n, f, e, k = (int(s[a]) for a in ("tests", "failures", "errors", "skipped"))
print(f"{n - f - e - k} passed, {f} failed, {e} errors, {k} skipped")
PY
)
selected=$(grep -o '[0-9]* selected' "$OUT/gpu_check.log" | tail -1)
echo "== tests ran: ${counts:-no XML written}${selected:+ (of $selected)}"
case $rc in
  0) echo "== tests: PASSED"; TESTS_OK=1 ;;
  124) echo "== tests: STOPPED at the ${TEST_LIMIT}s limit; the summary above covers the tests that ran" ;;
  2|130) echo "== tests: INTERRUPTED; the summary above covers the tests that ran" ;;
  5) echo "== tests: NONE selected (pytest exit 5)" ;;
  *) echo "== tests: FAILED (pytest exit $rc)" ;;
esac

# ---- 3. benchmark ------------------------------------------------------------------------
BENCH_OK=0
if [ -n "$STOPPED" ]; then
  echo "== benchmark: NOT RUN ($STOPPED)"
else
  echo "== benchmark: python -m benchmarks $BENCH_ARGS (limit ${BENCH_LIMIT}s), after $(elapsed)s"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of plain options
  run_phase "$BENCH_LIMIT" $PY -m benchmarks $BENCH_ARGS --matmul-precision "$PRECISION" \
    --max-seconds "$BENCH_BUDGET" --out "$OUT/bench"
  rc=$?
  case $rc in
    0) echo "== benchmark: COMPLETE"; BENCH_OK=1 ;;
    1) echo "== benchmark: complete, but some measurements FAILED (see the report)" ;;
    2) echo "== benchmark: PARTIAL, the ${BENCH_BUDGET}s budget ran out (the report lists what is missing)" ;;
    124|130) echo "== benchmark: PARTIAL, stopped by a signal or the ${BENCH_LIMIT}s limit (the report lists what is missing)" ;;
    *) echo "== benchmark: FAILED (exit $rc)" ;;
  esac
fi

status=$(( (TESTS_OK ? 0 : 1) + (BENCH_OK ? 0 : 2) ))
finish "$status"
