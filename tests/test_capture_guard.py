"""hierarchos.ops.capture: garbage is collected before a capture and the collector stays off during it."""

from __future__ import annotations

import gc
import weakref

from hierarchos.ops.capture import no_collection_during_capture, why_capture_failed


class _Cycle:
    def __init__(self):
        self.me = self  # only the cyclic collector frees it


def test_collects_before_and_not_during_then_restores_the_collector():
    assert gc.isenabled()
    before = _Cycle()
    gone_before = weakref.ref(before)
    del before
    with no_collection_during_capture():
        assert gone_before() is None  # collected on entry
        assert not gc.isenabled()
        during = _Cycle()
        kept = weakref.ref(during)
        del during
        for _ in range(5 * gc.get_threshold()[0]):  # allocations that would trigger a collection
            _ = [object()]
        assert kept() is not None
    assert gc.isenabled()
    gc.collect()
    assert kept() is None


def test_leaves_a_disabled_collector_disabled_even_on_error():
    gc.disable()
    try:
        try:
            with no_collection_during_capture():
                raise RuntimeError("capture failed")
        except RuntimeError:
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    try:
        with no_collection_during_capture():
            raise ValueError
    except ValueError:
        pass
    assert gc.isenabled()


def test_why_a_capture_failed_is_one_short_line():
    exc = RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors might ...")
    assert why_capture_failed(exc) == "RuntimeError: CUDA error: operation not permitted when stream is capturing"
    long = why_capture_failed(ValueError("x" * 500))
    assert long == "ValueError: " + "x" * 160
    assert why_capture_failed(KeyError()) == "KeyError: "
