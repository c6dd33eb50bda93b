#!/usr/bin/env bash
# GPU check for an NVIDIA H100/H200 machine without network access that already has
# cupy-cuda13x, jax with CUDA, torch and setuptools (the device tool's image).
#
#   bash benchmarks/gpu_check.sh            # results under $OUT (default ./gpu-results)
#
# It installs bpcore (no dependencies fetched), prints nvidia-smi and versions, runs the
# test suite on the cupy, jax (GPU) and torch (GPU) backends, then the GPU benchmark
# profile. At most 8 files land in $OUT; the whole script stays under 5 minutes.
#
# array-api-compat is not in that image: fetch its wheel here first and carry it along,
#   bash benchmarks/fetch_gpu_wheels.sh     # -> .whl/ (git-ignored)
# and name `.whl` in the device tool's carry list.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY="${PYTHON:-python3}"
t0=$(date +%s)

echo "== nvidia-smi"; nvidia-smi || echo "nvidia-smi failed"
if ! $PY -c "import array_api_compat" 2>/dev/null; then
  echo "== installing carried wheels from .whl/"
  $PY -m pip install -q --no-index --no-deps .whl/*.whl || { echo "array-api-compat missing and no wheel in .whl/ (run benchmarks/fetch_gpu_wheels.sh here)"; exit 2; }
fi
echo "== installing bpcore"
$PY -m pip install -q --no-deps --no-build-isolation -e . || exit 2
echo "== versions"
$PY - <<'PY'
import importlib
for m in ("numpy", "cupy", "jax", "jaxlib", "torch", "array_api_compat", "pytest", "pytest_benchmark", "optax", "sklearn"):
    try:
        print(f"{m:18} {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"{m:18} missing ({type(e).__name__})")
import bpcore, jax, torch
print("bpcore backends:", bpcore.backends.available())
print("unavailable:", bpcore.backends.reasons())
print("jax devices:", jax.devices(), "| torch cuda:", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

echo "== tests on cupy, jax and torch (GPU)"
timeout 170 $PY -m pytest tests -q -p no:cacheprovider -x --benchmark-disable \
  -k "cupy or jax or torch" --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -40
echo "tests exit code: ${PIPESTATUS[0]}"

echo "== GPU benchmark profile"
timeout 110 $PY -m benchmarks --gpu --out "$OUT" 2>&1 | tail -60
echo "bench exit code: ${PIPESTATUS[0]}"
echo "== done in $(( $(date +%s) - t0 ))s; files in $OUT:"; ls -la "$OUT"
