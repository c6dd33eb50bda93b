#!/usr/bin/env bash
# Fetch, on a machine with package-registry access, the pure-Python wheels that the GPU
# image lacks, into .whl/ (git-ignored), for benchmarks/gpu_check.sh to install offline.
# Pinned: an unpinned range could leave two versions in .whl/ and stop the offline install.
set -euo pipefail
cd "$(dirname "$0")/.."
PIN="array-api-compat==1.16.0"
rm -f .whl/array_api_compat-*.whl
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "$PIN"
ls -la .whl
