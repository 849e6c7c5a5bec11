"""What every CUDA-graph capture here needs from Python: no cyclic garbage collection inside it, and
a one-line reason when a capture fails (the caller then runs eagerly).

A capture in CUDA's global mode fails when another graph is destroyed during it ("operation not
permitted when stream is capturing", from the old graph's reset). Graphs are freed when their owner is:
a generation stepper, say, that sits in a reference cycle (a bound method kept on itself) and is freed
by Python's cyclic collector whenever an allocation crosses its threshold, which can be in the middle
of the next capture. torch.cuda.graph collected garbage before each capture in older releases and does
not now (unless torch.compiler.config.force_cudagraph_gc). `no_collection_during_capture` collects
first, then keeps the collector off until the capture ends; garbage made meanwhile waits for the next
collection. On the GPU machine this is what turned suite-order-dependent capture failures (the same
tests passing alone) into passes.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def no_collection_during_capture():
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def why_capture_failed(exc: BaseException) -> str:
    """'ErrorType: first line of its message' (at most 160 characters), for a one-line log entry."""
    reason = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"{type(exc).__name__}: {reason}"
