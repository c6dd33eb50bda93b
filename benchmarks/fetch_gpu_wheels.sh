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
# MPI for the data-parallel tests on CuPy and CUDA PyTorch (the image has neither): wheels
# for the image's Python 3.12 on x86-64 Linux, about 15 MB; optional (gpu_check.sh goes on
# without them, and those tests skip).
MPI_PINS=("mpi4py==4.1.2" "mpich==5.0.2")
rm -f .whl/mpi4py-*.whl .whl/mpich-*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_5_x86_64 -d .whl "${MPI_PINS[@]}" || echo "(MPI wheels not fetched)"
ls -la .whl
