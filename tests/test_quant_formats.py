"""Numpy reference of the quantized formats: byte compatibility with the `gguf` package,
hand-checked blocks, error bounds, and the reference matmul against float math.
Needs no C++ extension."""

import random

import numpy as np
import pytest

from hierarchos.quant import formats as F

import q2k_reference  # tests/q2k_reference.py: an independent Q2_K quantizer

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType  # noqa: E402

GGML = {"Q4_0": GGMLQuantizationType.Q4_0, "Q8_0": GGMLQuantizationType.Q8_0, "Q2_K": GGMLQuantizationType.Q2_K}


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**32)


def random_matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Gaussian rows at mixed magnitudes, with a few special blocks (zeros, constants, one outlier)."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w *= np.exp(rng.uniform(-6, 3, size=(rows, 1))).astype(np.float32)
    if rows >= 4 and cols >= 64:
        w[0, :32] = 0.0
        w[1, :32] = -0.75
        w[2, 5] = 1000.0
        w[3, :] = np.abs(w[3])
    return w


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_quantize_bytes_equal_gguf(qtype):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = random_matrix(rng, 24, 32 * int(rng.integers(2, 20)))
    ours = F.quantize(w, qtype)
    theirs = gguf_quants.quantize(w, GGML[qtype])
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs), f"seed={seed}: first differing byte at {np.argwhere(ours != theirs)[:1]}"


def _q2_k_reference_bytes(w: np.ndarray) -> np.ndarray:
    return np.frombuffer(b"".join(q2k_reference.quantize(w.tolist())), np.uint8).reshape(w.shape[0], -1)


def test_q2_k_bytes_equal_independent_reference():
    """The `gguf` package cannot quantize Q2_K (only dequantize), so the oracle is tests/q2k_reference.py:
    ggml's quantize_row_q2_K_ref written out element by element from the format's definition. It
    reproduced ggml's own C function (compiled without FMA contraction) on 2,400 random blocks, byte for
    byte; so must our vectorised numpy quantizer (the C++ kernel: tests/test_kernel.py)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = random_matrix(rng, 10, 512)
    w[4] = -np.abs(w[4])  # every group negative: the offset carries all, codes from the low end
    w[5, :16] = 3.0  # a flat positive group: its min clamps to 0
    w[6, :256] = np.round(w[6, :256] * 4) / 4  # a coarse grid: many exact ties in the search
    w[7, 256:] = rng.integers(-2, 2, 256) * 0.5  # values already on a 2-bit grid
    # Values on a 2-bit grid (0.5 * code - min) and small integers: groups where a later trial's error
    # EQUALS the best so far, so ggml's strict `<` decides which fit is kept. A fixed draw in which
    # that choice changes the bytes (`<=` would: checked when this test was written).
    ties = np.random.default_rng(8)
    grid = ties.integers(0, 4, (2, 512)) * np.float32(0.5) - np.float32(0.25) * ties.integers(0, 3, (2, 1))
    w = np.concatenate([w, grid, ties.integers(-3, 4, (2, 512))]).astype(np.float32)
    ours, expected = F.quantize(w, "Q2_K"), _q2_k_reference_bytes(w)
    bad = np.argwhere(ours != expected)
    assert not bad.size, f"seed={seed}: first differing byte (row, col) {bad[0]} (col % 84 = {bad[0][1] % 84})"


def test_q2_k_hand_checked_block():
    """Groups that are exactly scale * code - min: the first guess of the search has zero error, no
    trial beats it, so the codes are the pattern, the 4-bit scale codes 15 (the largest scale) and
    0 or 15 for the mins, d = 0.5 / 15 and dmin = 1 / 15 in fp16."""
    pattern = np.tile(np.array([0, 1, 2, 3], np.float32), 64)  # codes 0..3 repeating
    x = pattern * np.float32(0.5)  # groups 0..7: scale 0.5, min 0
    x[128:] = pattern[128:] * np.float32(0.5) - np.float32(1.0)  # groups 8..15: scale 0.5, min 1
    block = F.quantize(x.reshape(1, 256), "Q2_K")[0]
    assert block[:16].tolist() == [0x0F] * 8 + [0xFF] * 8
    codes = [(block[16 + 32 * (i // 128) + i % 32] >> (2 * ((i % 128) // 32))) & 3 for i in range(256)]
    assert codes == pattern.astype(int).tolist()
    assert block[80:82].view(np.float16)[0] == np.float16(0.5 / 15)
    assert block[82:84].view(np.float16)[0] == np.float16(1.0 / 15)
    assert bytes(block) == _q2_k_reference_bytes(x.reshape(1, 256))[0].tobytes()
    # read back: within the fp16 rounding of d and dmin (relative 2^-11 each, times 15 * 3 and 15)
    assert np.allclose(F.dequantize(block.reshape(1, 84), "Q2_K", 256)[0], x, atol=(0.5 * 3 + 1) * 2.0**-10)


def test_q2_k_reference_layout_agrees_with_gguf_dequantizer():
    """The reference's reading of the block layout is gguf's: its dequantizer on the reference's own
    bytes gives the reference's floats (so the oracle above is not wrong about the format)."""
    seed = fresh_seed()
    w = random_matrix(np.random.default_rng(seed), 4, 256)
    raw = _q2_k_reference_bytes(w)
    theirs = gguf_quants.dequantize(raw, GGML["Q2_K"]).reshape(4, 256)
    mine = np.array([q2k_reference.dequantize_block(row.tobytes()) for row in raw], np.float32)
    assert np.array_equal(theirs, mine), f"seed={seed}"


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q2_K"])
def test_gguf_dequantizes_our_blocks_to_our_floats(qtype):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    cols = F.block_size(qtype) * int(rng.integers(1, 6))
    w = random_matrix(rng, 16, cols)
    data = F.quantize(w, qtype)
    theirs = gguf_quants.dequantize(data, GGML[qtype]).reshape(16, cols)
    ours = F.dequantize(data, qtype, cols)
    assert np.array_equal(ours, theirs), f"seed={seed}"


def test_zero_block_scale_sign_follows_ggml():
    # ggml starts its signed-max scan at +0.0, so an all-zero block (even of -0.0) stores
    # d = +0.0 / -8 = -0.0 (0x8000) for Q4_0; gguf-py picks the block's first element
    # instead and stores +0.0 for a block of -0.0. We follow ggml's C reference.
    for zero in (0.0, -0.0):
        data = F.quantize(np.full((1, 32), zero, np.float32), "Q4_0")
        assert data[0, :2].tolist() == [0x00, 0x80]
        assert (data[0, 2:] == 0x88).all()  # code 8 = value 0


def test_hand_checked_blocks():
    x = np.arange(32, dtype=np.float32).reshape(1, 32) - 16  # -16 .. 15
    q8 = F.quantize(x, "Q8_0")
    d = np.float32(16) / np.float32(127)
    assert q8[0, :2].view(np.float16)[0] == np.float16(d)
    assert q8[0, 2:].view(np.int8)[0] == -127 and q8[0, 2:].view(np.int8)[16] == 0
    # Q4_0: extreme -16 -> d = 2, codes = trunc(x / 2 + 8.5) capped at 15
    q4 = F.quantize(x, "Q4_0")
    assert q4[0, :2].view(np.float16)[0] == np.float16(2.0)
    codes = np.concatenate([q4[0, 2:] & 0xF, q4[0, 2:] >> 4])
    expected = np.minimum(np.trunc(x[0] / 2 + 8.5), 15)
    assert np.array_equal(codes, expected)
    # INT4: d = 16 / 7 in float32, codes q + 8 with q = round(x / d) in [-7, 7]
    i4 = F.quantize(x, "INT4")
    assert i4[0, :4].view(np.float32)[0] == np.float32(16) / np.float32(7)
    codes = np.concatenate([i4[0, 4:] & 0xF, i4[0, 4:] >> 4]).astype(int) - 8
    assert codes[0] == -7 and codes[16] == 0 and codes.max() <= 7


def test_rounding_helpers_match_c():
    values = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 3.4999998], np.float32)
    assert F.round_half_away(values).tolist() == [1, 2, 3, -1, -3, 0, -0, 3]
    assert F.nearest_int(values).tolist() == [0, 2, 2, 0, -2, 0, 0, 3]  # ties to even


@pytest.mark.parametrize("qtype", F.QTYPES)
def test_round_trip_error_bounds(qtype):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    bs = F.block_size(qtype)
    w = rng.standard_normal((8, bs * 4)).astype(np.float32)
    err = np.abs(F.dequantize(F.quantize(w, qtype), qtype, w.shape[1]) - w).reshape(-1, bs)
    amax = np.abs(w).reshape(-1, bs).max(axis=1, keepdims=True)
    if qtype == "INT4":
        bound = amax / 7 / 2 * 1.001  # half a step of d = amax / 7
    elif qtype == "Q8_0":
        bound = amax / 127 / 2 * 1.01 + amax * 2.0**-11  # half a step, plus the fp16 scale
    elif qtype == "Q4_0":
        bound = amax / 8 * 1.01 + amax * 2.0**-11  # one step: the positive side is capped at code 15
    else:
        bound = np.ptp(w.reshape(-1, bs), axis=1, keepdims=True) / 3 * 1.1  # 2-bit codes over the range
    assert (err <= bound).all(), f"seed={seed} worst excess {(err - bound).max()}"


def test_int4_split_join_round_trip():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((5, 96)).astype(np.float32)
    data = F.quantize(w, "INT4")
    nibbles, scales = F.int4_split(data)
    assert nibbles.shape == (5, 48) and nibbles.dtype == np.uint8
    assert scales.shape == (5, 3) and scales.dtype == np.float32
    assert np.array_equal(F.int4_join(nibbles, scales), data)
    # the scales are the blocks' amax / 7
    assert np.array_equal(scales, np.abs(w).reshape(5, 3, 32).max(axis=2) / np.float32(7))


@pytest.mark.parametrize("qtype", F.QTYPES)
def test_bad_columns_name_qtype_shape_and_multiple(qtype):
    bs = F.block_size(qtype)
    with pytest.raises(ValueError, match=rf"{qtype}.*multiple of {bs}.*\(3, {bs + 8}\)"):
        F.quantize(np.zeros((3, bs + 8), np.float32), qtype)
    with pytest.raises(ValueError, match=qtype):
        F.matmul(np.zeros((3, 10), np.uint8), qtype, bs + 8, np.zeros((1, bs + 8), np.float32))


def test_dequantize_rows_is_a_row_gather():
    rng = np.random.default_rng(fresh_seed())
    for qtype in F.QTYPES:
        data = F.quantize(rng.standard_normal((9, 256)).astype(np.float32), qtype)
        ids = np.array([8, 0, 3, 3])
        assert np.array_equal(F.dequantize_rows(data, qtype, 256, ids), F.dequantize(data, qtype, 256)[ids])
        with pytest.raises(IndexError):
            F.dequantize_rows(data, qtype, 256, np.array([9]))


def test_q8_k_activation_blocks():
    rng = np.random.default_rng(fresh_seed())
    x = rng.standard_normal((3, 512)).astype(np.float32)
    x[2, :256] = 0
    codes, d, bsums = F.quantize_q8_k_activations(x)
    assert np.abs(codes.astype(int)).max() <= 127
    assert np.array_equal(bsums, codes.reshape(3, 32, 16).astype(np.int32).sum(axis=2))
    assert d[2, 0] == 0 and (codes[2, :256] == 0).all()
    # the extreme element maps to -127 exactly (ggml scales by -127 / signed max)
    blocks = x.reshape(-1, 256)[:2]
    extreme = blocks[np.arange(2), np.abs(blocks).argmax(axis=1)]
    assert np.allclose(d.reshape(-1)[:2], -extreme / 127, rtol=1e-6)


@pytest.mark.parametrize("qtype", F.QTYPES)
@pytest.mark.parametrize("n", [1, 3])
def test_reference_matmul_within_activation_rounding_of_float(qtype, n):
    """|y - x @ deq(W).T| is bounded by what quantizing x costs: half a code step per
    element (d_a / 2, d_a = block amax / 127) plus the fp16 rounding of Q8_0's scale."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    cols = F.block_size(qtype) * 2
    w = rng.standard_normal((12, cols)).astype(np.float32)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    data = F.quantize(w, qtype)
    w_deq = F.dequantize(data, qtype, cols).astype(np.float64)
    y = F.matmul(data, qtype, cols, x)
    exact = x.astype(np.float64) @ w_deq.T
    act_block = 256 if qtype == "Q2_K" else 32
    amax = np.repeat(np.abs(x).reshape(n, -1, act_block).max(axis=2), act_block, axis=1)
    per_element = amax / 127 / 2 + (0 if qtype == "Q2_K" else np.abs(x) * 2.0**-11)
    bound = per_element @ np.abs(w_deq).T * 1.01 + 1e-5
    assert (np.abs(y - exact) <= bound).all(), f"seed={seed}"
    # and the bound is not vacuous: it is a small fraction of the output scale
    assert bound.max() < 0.05 * (np.abs(x) @ np.abs(w_deq).T).max()
