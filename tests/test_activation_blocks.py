"""The dense prefill path's activations: the C++ kernel's `activations_as_used` (its own Q8_0 / Q8_K
activation quantizer, as floats) gives the very bits of the numpy reference written from the formats."""

from __future__ import annotations

import numpy as np
import pytest

from hierarchos.quant import kernel
from hierarchos.quant import model as qmodel

needs_kernel = pytest.mark.skipif(kernel.activations_as_used is None, reason="C++ kernel not built (bash setup.sh)")


def _draws(cols: int, rng: np.random.Generator) -> list[np.ndarray]:
    x = rng.standard_normal((5, cols)).astype(np.float32) * rng.uniform(0.01, 30, (5, 1)).astype(np.float32)
    x[1, :32] = 0.0                        # an all-zero block (scale 0)
    x[2, 5] = 1e4                          # one extreme dominates its block
    x[3, ::7] = -x[3, ::7]                 # a sign pattern
    x[4, 3], x[4, 130] = -40.0, 40.0       # largest magnitudes tied, apart in a 256-block (found by a
    x[4, 300], x[4, 258] = -40.0, 40.0     # search after the maximum), either sign first
    x[0, 64:96] = 127.0 * np.arange(32, dtype=np.float32) / 31 - 63.5  # codes at every +-0.5 tie
    halves = np.round(x * 2) / 2           # values at rounding ties of small codes
    return [x, halves.astype(np.float32), np.zeros((1, cols), np.float32)]


def _isas() -> list[str]:
    try:
        from hierarchos import hierarchos_kernels
    except ImportError:
        return ["default"]
    return hierarchos_kernels.available_isas()


@needs_kernel
@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("qtype", ["INT4", "Q4_0", "Q8_0", "Q2_K"])
def test_kernel_blocks_equal_the_reference_bit_for_bit(qtype, isa):
    # each ISA's own quantizer (the one its matmuls use): AVX2 and AVX-512 have a vector one
    from hierarchos import hierarchos_kernels
    before = hierarchos_kernels.get_isa()
    hierarchos_kernels.set_isa(isa)
    try:
        _check_blocks(qtype)
    finally:
        hierarchos_kernels.set_isa(before)


def _check_blocks(qtype):
    rng = np.random.default_rng(7)
    for x in _draws(512, rng):
        got = kernel.activations_as_used(x, qtype)
        want = qmodel.activations_as_used_reference(x, qtype)
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    block = 256 if qtype == "Q2_K" else 32
    x = _draws(512, rng)[0]
    codes = qmodel.activations_as_used(x, qtype)
    # at most 255 distinct levels per block, all multiples of the block's scale: it is quantized
    per_block = codes.reshape(-1, block)
    assert all(len(np.unique(b)) <= 255 for b in per_block)
    assert not np.array_equal(codes, x)


@needs_kernel
def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="multiple of 32"):
        kernel.activations_as_used(np.zeros((2, 40), np.float32), "Q4_0")
    with pytest.raises(ValueError, match="multiple of 256"):
        kernel.activations_as_used(np.zeros((2, 288), np.float32), "Q2_K")
    with pytest.raises(ValueError, match="N, cols"):
        kernel.activations_as_used(np.zeros(64, np.float32), "Q8_0")
    with pytest.raises(ValueError, match="unknown qtype"):
        kernel.activations_as_used(np.zeros((1, 64), np.float32), "Q5_1")


def test_without_the_kernel_the_reference_runs(monkeypatch):
    monkeypatch.setattr(kernel, "activations_as_used", None)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_array_equal(qmodel.activations_as_used(x, "Q8_0"), qmodel.activations_as_used_reference(x, "Q8_0"))
