"""bpcore's benchmark suite: the backends against each other, the peers and the GEMM floor.

Run ``bpcore bench`` (or ``python -m benchmarks`` from a checkout) for the report, or
``python -m pytest benchmarks --benchmark-enable`` for pytest-benchmark's own tables.
"""
