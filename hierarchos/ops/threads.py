"""Torch's intra-op thread count for one region of code.

A quantized model's one-token step runs its matmuls on the C++ kernel's own thread pool and leaves
torch only small element-wise ops (the memory read, the HRM's mixing, norms), too small to split.
With torch at its default of one thread per core, its OpenMP workers spin after every op on the
cores the kernel's pool wants next; the two pools take turns and each stalls the other, worst on a
busy machine (BENCHMARKS.md, "Two thread pools on two cores": a 125m Q4_0 step 2-4x slower at two
torch threads than at one). `HierarchosLM.step_threads` asks for this region around a step.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def intra_op_threads(threads: int | None):
    """Run the body with torch.set_num_threads(threads), restoring the previous count after (also on
    an exception); None or the current count changes nothing. Costs well under a microsecond."""
    previous = torch.get_num_threads()
    if threads is None or threads == previous:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
