"""Timing with warm-up, calibrated blocks and device synchronisation.

``measure`` first calls the runner ``warmup`` times (JAX compiles here), waits for the
device, and keeps calling it for ``warmup_s`` more. It then times ``blocks`` blocks of ``n`` calls each, ``n`` calibrated so a block
lasts about ``block_s``; the device is synchronised at the end of each block, before the
clock stops, so asynchronous backends are charged for all their queued work. The figure
used for ratios is the fastest block's mean time per call (the least disturbed by other
load on a shared machine); the median block and the spread, (slowest - fastest) / fastest
block, are recorded too: a large spread means the machine was busy.
"""

from __future__ import annotations

import collections
import math
import statistics
import time

from .impls import Runner


def measure(r: Runner, *, warmup: int = 2, blocks: int = 3, block_s: float = 0.1,
            max_calls: int = 100_000, warmup_s: float = 0.02) -> dict:
    outs = [r.run(i) for i in range(warmup)]
    r.sync(outs)
    t_end = time.perf_counter() + warmup_s  # then keep calling a moment: clocks and BLAS
    while time.perf_counter() < t_end:      # threads settle into their steady state
        r.sync([r.run(0)])
    t0 = time.perf_counter()
    r.sync([r.run(warmup)])
    single = max(time.perf_counter() - t0, 1e-7)
    n = max(1, min(max_calls, math.ceil(block_s / single)))
    per_call = []
    i = 0
    for _ in range(blocks):
        # An asynchronous runner's outputs are kept until the block's sync (a JAX computation
        # may finish out of order); a synchronous one's are dropped at once, as a training
        # loop drops them (keeping thousands alive would time the allocator instead).
        outs = [] if r.asynchronous else collections.deque(maxlen=1)
        t0 = time.perf_counter()
        for _ in range(n):
            outs.append(r.run(i))
            i += 1
        r.sync(list(outs)[-1:] if len(outs) > 64 else list(outs))
        per_call.append((time.perf_counter() - t0) / n)
        del outs
    per_call = [t / r.per_call for t in per_call]
    return {"time_s": min(per_call), "median_s": statistics.median(per_call),
            "spread": (max(per_call) - min(per_call)) / min(per_call),
            "calls_per_block": n, "blocks": blocks}
