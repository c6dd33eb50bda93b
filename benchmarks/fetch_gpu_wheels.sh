#!/usr/bin/env bash
# Fetch, on a machine with package-registry access, the pure-Python wheels that the GPU
# image lacks, into .whl/ (git-ignored) for benchmarks/gpu_check.sh to install offline.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: -d .whl "array-api-compat>=1.11"
ls -la .whl
