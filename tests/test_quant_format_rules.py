"""The rules of hierarchos/quant/formats.py that the byte-compatibility tests do not reach (found by
mutation testing, TESTING.md): the all-zero / flat / zero-min Q2_K cases against the independent
reference, inputs that are not float32, the dtypes the public functions promise, the one-line
errors, and the float32 arithmetic of the reference matmul checked against a scalar oracle that
rounds every operation to float32 as the docstring says (struct, not numpy)."""

import random
import struct
import warnings

import numpy as np
import pytest

from hierarchos.quant import formats as F

import q2k_reference  # tests/q2k_reference.py: an independent Q2_K quantizer


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**32)


def reference_q2_k(w: np.ndarray) -> np.ndarray:
    return np.frombuffer(b"".join(q2k_reference.quantize(w.tolist())), np.uint8).reshape(w.shape[0], -1)


def f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


# ---- Q2_K blocks whose scales or mins are all zero, and search decisions that hang on float32 ------


def _zero_scale_and_zero_min_blocks() -> np.ndarray:
    pattern = np.tile(np.array([0, 1, 2, 3], np.float32), 64) * np.float32(0.5)
    flat_negative = np.repeat(-np.arange(16, dtype=np.float32) * np.float32(0.25), 16)
    return np.stack([
        np.zeros(256, np.float32),   # every group flat at 0: d = dmin = 0, all codes 0
        -np.zeros(256, np.float32),  # the same in -0.0
        flat_negative,               # groups flat at 0, -0.25, ..., -3.75: all scales 0 (d = 0), mins only
        pattern,                     # every group on the grid 0.5 * code: all mins 0 (dmin = 0)
    ])


def test_q2_k_blocks_with_all_scales_or_all_mins_zero_match_the_reference():
    w = _zero_scale_and_zero_min_blocks()
    ours = F.quantize(w, "Q2_K")
    assert np.array_equal(ours, reference_q2_k(w))
    assert ours[0].tolist() == [0] * 84 and ours[1].tolist() == [0] * 84
    assert ours[2, 80:82].tolist() == [0, 0] and (ours[2, :16] & 0xF == 0).all()  # d = +0.0, scale codes 0
    assert ours[3, 82:84].tolist() == [0, 0] and (ours[3, :16] >> 4 == 0).all()  # dmin = +0.0, min codes 0
    # and they read back: the flat groups exactly (dmin = 0.25, min codes 0..15), the grid within
    # the fp16 rounding of d = 0.5 / 15 (relative 2^-11, times 15 * 3)
    back = F.dequantize(ours, "Q2_K", 256)
    assert np.array_equal(back[:3], w[:3])
    assert np.allclose(back[3], w[3], rtol=0, atol=1.5 * 2.0**-10)


def _search_block(kind: int, seed: int, row: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == 2:
        rows = rng.integers(-3, 4, (8, 256)).astype(np.float32) * np.float32(0.7)
    else:
        rows = (rng.standard_normal((8, 256)) * 4).round().astype(np.float32) / np.float32(7)
    return rows[row]


# Fixed draws (values on small grids: many near-ties in ggml's search) on which a search carried out
# in float64 anywhere -- the first error sum, a refitted min or scale, the moved offset, the final
# scales or mins -- picks different bytes (each found by trying the mutant, TESTING.md).
SEARCH_TIE_BLOCKS = [(2, 21, 1), (3, 24, 6), (3, 23, 7), (2, 209, 4), (3, 4, 5)]


def test_q2_k_search_in_strict_float32_on_near_ties():
    w = np.stack([_search_block(*spec) for spec in SEARCH_TIE_BLOCKS])
    ours, expected = F.quantize(w, "Q2_K"), reference_q2_k(w)
    bad = np.argwhere(ours != expected)
    assert not bad.size, f"first differing byte (block, byte) {bad[0]}"


def test_quantizing_zero_and_flat_blocks_warns_nothing():
    """ggml divides by zero in these cases and keeps going; so do we, silently: no RuntimeWarning."""
    q2 = _zero_scale_and_zero_min_blocks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for qtype in F.QTYPES:
            F.quantize(np.zeros((2, 256), np.float32), qtype)
        F.quantize(q2, "Q2_K")
        # flat groups whose mins are off the 4-bit grid: requantizing divides a nonzero x + m by d = 0
        F.quantize(np.repeat(-np.arange(1, 17, dtype=np.float32) / np.float32(3), 16)[None], "Q2_K")
        F.quantize_q2_k_weighted(q2, np.ones_like(q2))
        F.quantize_q8_k_activations(np.zeros((1, 256), np.float32))
        F.quantize_q8_k_activations(q2)


# ---- inputs that are not float32 are rounded to float32 first ---------------------------------


def test_float64_inputs_quantize_as_their_float32_rounding():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w64 = rng.standard_normal((4, 256)) * np.exp(rng.uniform(-3, 3, (4, 1)))
    # and rows where computing in float64 would change the result: 62.5 - 1e-9 next to 127 (Q8_0 code
    # 63, not 62), 3.5 / 127 - 1e-9 next to 1 (Q8_K code -4: -127 * x rounds to -3.5 in float32)
    exact = np.zeros((2, 256))
    exact[0, 32:34] = [127.0, 62.5 - 1e-9]
    exact[1, 0:2] = [1.0, 3.5 / 127 - 1e-9]
    w64 = np.concatenate([w64, exact])
    w32 = w64.astype(np.float32)
    for qtype in F.QTYPES:
        assert np.array_equal(F.quantize(w64, qtype), F.quantize(w32, qtype)), f"seed={seed} {qtype}"
    for got, want in zip(F.quantize_q8_0_activations(w64), F.quantize_q8_0_activations(w32)):
        assert got.dtype == want.dtype and np.array_equal(got, want), f"seed={seed}"
    for got, want in zip(F.quantize_q8_k_activations(w64), F.quantize_q8_k_activations(w32)):
        assert got.dtype == want.dtype and np.array_equal(got, want), f"seed={seed}"


# ---- dtypes and shapes the public functions promise --------------------------------------------


def test_public_outputs_have_the_documented_dtypes_and_shapes():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((3, 512)).astype(np.float32)
    for qtype in F.QTYPES:
        data = F.quantize(w, qtype)
        assert data.dtype == np.uint8 and data.shape == (3, F.row_bytes(qtype, 512))
        assert F.dequantize(data, qtype, 512).dtype == np.float32
        assert F.dequantize_rows(data, qtype, 512, [2]).dtype == np.float32
        raw = F.quantize_blocks(w.reshape(-1, F.block_size(qtype)), qtype)
        assert F.dequantize_blocks(raw, qtype).dtype == np.float32
        assert F.matmul(data, qtype, 512, w[:2]).dtype == np.float32
    assert F.round_half_away(np.array([0.5, -2.5], np.float64)).dtype == np.float32
    assert F.signed_absmax(w.reshape(-1, 32)).dtype == np.float32
    codes, scales = F.quantize_q8_0_activations(w)
    assert (codes.dtype, codes.shape, scales.dtype, scales.shape) == (np.int8, (3, 512), np.float32, (3, 16))
    codes, d, bsums = F.quantize_q8_k_activations(w)
    assert (codes.dtype, codes.shape) == (np.int8, (3, 512))
    assert (d.dtype, d.shape, bsums.dtype, bsums.shape) == (np.float32, (3, 2), np.int16, (3, 32))


def test_dequantize_rows_takes_any_shape_of_ids_and_names_the_table_size():
    rng = np.random.default_rng(fresh_seed())
    data = F.quantize(rng.standard_normal((9, 64)).astype(np.float32), "Q8_0")
    full = F.dequantize(data, "Q8_0", 64)
    assert np.array_equal(F.dequantize_rows(data, "Q8_0", 64, np.array([[1, 8], [0, 1]])), full[[1, 8, 0, 1]])
    assert np.array_equal(F.dequantize_rows(data, "Q8_0", 64, np.int64(4)), full[[4]])
    for bad in ([9], [-1], [0, -3], [2, 9]):
        with pytest.raises(IndexError, match=r"^row id out of range for a table of 9 rows$"):
            F.dequantize_rows(data, "Q8_0", 64, np.array(bad))


def test_int4_join_casts_its_inputs_and_checks_their_shapes():
    rng = np.random.default_rng(fresh_seed())
    data = F.quantize(rng.standard_normal((2, 64)).astype(np.float32), "INT4")
    nibbles, scales = F.int4_split(data)
    joined = F.int4_join(nibbles.astype(np.int64), scales.astype(np.float64))
    assert joined.dtype == np.uint8 and np.array_equal(joined, data)
    with pytest.raises(ValueError, match=r"^INT4 nibbles \(2, 30\) do not match scales \(2, 2\) \(expected \(2, 32\)\)$"):
        F.int4_join(nibbles[:, :30], scales)


# ---- the one-line errors -----------------------------------------------------------------------


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match=r"^unknown qtype 'Q3_X'; known: INT4, Q4_0, Q8_0, Q2_K$"):
        F.block_size("Q3_X")
    with pytest.raises(ValueError, match=r"multiple of 32; got a \(2, 0\) matrix"):
        F.check_cols("Q8_0", 2, 0)
    with pytest.raises(ValueError, match=r"^quantize expects a 2-D matrix, got shape \(64,\)$"):
        F.quantize(np.zeros(64, np.float32), "Q8_0")
    good = F.quantize(np.ones((3, 64), np.float32), "Q8_0")
    with pytest.raises(ValueError, match=r"^quantized data must be a 2-D uint8 array, got float32 \(3, 68\)$"):
        F.dequantize(good.astype(np.float32), "Q8_0", 64)
    with pytest.raises(ValueError, match=r"^quantized data must be a 2-D uint8 array, got uint8 \(204,\)$"):
        F.dequantize(good.reshape(-1), "Q8_0", 64)
    with pytest.raises(ValueError, match=r"got a \(3, 40\) matrix"):
        F.dequantize(good, "Q8_0", 40)
    with pytest.raises(ValueError, match=r"^Q8_0 rows of 64 columns take 68 bytes, got 67$"):
        F.dequantize(good[:, :67], "Q8_0", 64)
    for x in (np.ones((1, 96), np.float32), np.ones((1, 32), np.float32), np.ones(64, np.float32)):
        with pytest.raises(ValueError, match=r"^x must be \(N, 64\), got "):
            F.matmul(good, "Q8_0", 64, x)


# ---- block rules by hand -----------------------------------------------------------------------


def test_q8_k_block_whose_extreme_is_one():
    """iscale = -127 / extreme for any nonzero extreme, 1.0 included: codes -127 * x, d = -1/127."""
    x = np.zeros((1, 256), np.float32)
    x[0, :4] = [1.0, -0.5, 0.25, 1.0]
    codes, d, bsums = F.quantize_q8_k_activations(x)
    assert codes[0, :5].tolist() == [-127, 64, -32, -127, 0]  # -63.5 and 31.75 round to even / nearest
    assert d[0, 0] == np.float32(1.0) / np.float32(-127.0)
    assert bsums[0, 0] == -127 + 64 - 32 - 127 and (bsums[0, 1:] == 0).all()


# ---- the matmul's float32 arithmetic, one operation at a time ---------------------------------


def _fp16(two_bytes) -> float:
    return struct.unpack("<e", bytes(two_bytes))[0]


def _matmul_oracle(data: np.ndarray, qtype: str, cols: int, x: np.ndarray) -> np.ndarray:
    """y[n, r] = sum over blocks (in float64) of f32(f32(weight scale * activation scale) * f32(dot))
    (Q2_K: f32(f32(a_d * d) * f32(sum_g scale_g dot_g) - f32(a_d * dmin) * f32(sum_g min_g bsum_g))),
    with the activation codes and scales from the module's own (separately tested) quantizers."""
    rows, nbytes = data.shape
    bb, bs = F.block_bytes(qtype), F.block_size(qtype)
    y = np.zeros((x.shape[0], rows), np.float32)
    if qtype == "Q2_K":
        a_codes, a_d, a_bsums = F.quantize_q8_k_activations(x)
    else:
        a_codes, a_scale = F.quantize_q8_0_activations(x)
    for n in range(x.shape[0]):
        for r in range(rows):
            total = 0.0
            for blk in range(nbytes // bb):
                raw = data[r, blk * bb:(blk + 1) * bb].tolist()
                act = a_codes[n, blk * bs:(blk + 1) * bs].astype(int).tolist()
                if qtype == "Q2_K":
                    codes = [(raw[16 + 32 * (i // 128) + i % 32] >> (2 * ((i % 128) // 32))) & 3 for i in range(256)]
                    scaled = sum((raw[g] & 15) * sum(codes[16 * g + j] * act[16 * g + j] for j in range(16))
                                 for g in range(16))
                    mins = sum((raw[g] >> 4) * int(a_bsums[n, 16 * blk + g]) for g in range(16))
                    ad = float(a_d[n, blk])
                    dall, dmins = f32(ad * _fp16(raw[80:82])), f32(ad * _fp16(raw[82:84]))
                    total += f32(f32(dall * f32(scaled)) - f32(dmins * f32(mins)))
                    continue
                if qtype == "Q8_0":
                    w_scale, codes = _fp16(raw[:2]), [c - 256 if c > 127 else c for c in raw[2:]]
                else:
                    off = 4 if qtype == "INT4" else 2
                    w_scale = struct.unpack("<f", bytes(raw[:4]))[0] if qtype == "INT4" else _fp16(raw[:2])
                    codes = [(b & 15) - 8 for b in raw[off:]] + [(b >> 4) - 8 for b in raw[off:]]
                dot = sum(c * a for c, a in zip(codes, act))
                total += f32(f32(w_scale * float(a_scale[n, blk])) * f32(dot))
            y[n, r] = total
    return y


@pytest.mark.parametrize("qtype", F.QTYPES)
def test_matmul_equals_a_scalar_float32_oracle(qtype):
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    cols = 512 if qtype == "Q2_K" else 96
    w = (rng.standard_normal((4, cols)) * np.exp(rng.uniform(-2, 2, (4, 1)))).astype(np.float32)
    x = (rng.standard_normal((3, cols)) * np.exp(rng.uniform(-2, 2, (3, 1)))).astype(np.float32)
    data = F.quantize(w, qtype)
    got, want = F.matmul(data, qtype, cols, x), _matmul_oracle(data, qtype, cols, x)
    assert np.array_equal(got, want), f"seed={seed}: {got} != {want}"


# ---- the helpers calibration.py builds on --------------------------------------------------------


def test_weighted_q2_k_equals_the_reference_search_with_those_weights(monkeypatch):
    """quantize_q2_k_weighted: ggml's search with the given element weights in place of |x| (the
    reference's fit_group handed the same weights, as float32)."""
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((2, 256)) * 4).round().astype(np.float32) / np.float32(7)
    weights = rng.uniform(0, 2, (2, 256)).astype(np.float32)
    weights[:, ::5] = 0  # some elements do not count at all
    fit_group = q2k_reference.fit_group
    for row in range(2):
        groups = iter(weights[row].reshape(16, 16).tolist())
        monkeypatch.setattr(q2k_reference, "fit_group", lambda xs, _abs: fit_group(xs, next(groups)))
        expected = q2k_reference.quantize_block(x[row].tolist())
        got = F.quantize_q2_k_weighted(x[row:row + 1], weights[row:row + 1].astype(np.float64))[0]
        assert got.tobytes() == expected, f"seed={seed} row={row}"
    monkeypatch.setattr(q2k_reference, "fit_group", fit_group)
    assert np.array_equal(F.quantize_q2_k_weighted(x, np.abs(x)), F.quantize(x, "Q2_K"))  # the default weights


def test_encode_symmetric_by_hand():
    codes = np.tile(np.arange(-8, 8), 2).reshape(1, 32)                   # -8..7, -8..7
    q4 = F.encode_symmetric(np.array([2.0]), codes, "Q4_0")
    assert q4.dtype == np.uint8 and q4.shape == (1, 18)
    assert q4[0, :2].view(np.float16)[0] == 2.0
    assert q4[0, 2:].tolist() == [(c + 8) | ((c + 8) << 4) for c in range(-8, 8)]  # j and j + 16 share a byte
    assert np.array_equal(F.dequantize_blocks(q4, "Q4_0"), codes * np.float32(2.0))
    i4 = F.encode_symmetric(np.array([0.1]), np.clip(codes, -7, 7), "INT4")
    assert i4.shape == (1, 20) and i4[0, :4].view(np.float32)[0] == np.float32(0.1)
    assert np.array_equal(F.dequantize_blocks(i4, "INT4"), np.clip(codes, -7, 7).astype(np.float32) * np.float32(0.1))
    with pytest.raises(ValueError, match=r"^encode_symmetric: 'Q8_0' is not a symmetric 4-bit format$"):
        F.encode_symmetric(np.array([1.0]), codes, "Q8_0")


def test_signed_absmax_by_hand():
    blocks = np.array([[1.0, -3.0, 3.0, 2.0], [0.5, -0.25, 0.0, 0.5], [-0.0, 0.0, -0.0, 0.0]], np.float32)
    got = F.signed_absmax(blocks.astype(np.float64))
    assert got.dtype == np.float32 and got.tolist() == [-3.0, 0.5, 0.0]   # the first of equal magnitudes
    assert not np.signbit(got[2])                                          # +0.0 for a zero block
    with pytest.raises(ValueError, match=r"^unknown qtype 'Q5_K'"):
        F.quantize_blocks(blocks, "Q5_K")
    with pytest.raises(ValueError, match=r"^unknown qtype 'Q5_K'"):
        F.dequantize_blocks(np.zeros((1, 84), np.uint8), "Q5_K")


def test_block_helpers_round_their_inputs_to_the_format_dtypes():
    seed = fresh_seed()
    rng = np.random.default_rng(seed)
    x64 = np.concatenate([rng.standard_normal((2, 256)), np.zeros((1, 256))])
    x64[2, 32:34] = [127.0, 62.5 - 1e-9]                     # Q8_0 code 63 in float32, 62 in float64
    x32 = x64.astype(np.float32)
    for qtype in F.QTYPES:
        blocks64, blocks32 = x64.reshape(-1, F.block_size(qtype)), x32.reshape(-1, F.block_size(qtype))
        raw = F.quantize_blocks(blocks64, qtype)
        assert np.array_equal(raw, F.quantize_blocks(blocks32, qtype)), f"seed={seed} {qtype}"
        back = F.dequantize_blocks(raw.astype(np.int64), qtype)
        assert back.dtype == np.float32 and np.array_equal(back, F.dequantize_blocks(raw, qtype)), qtype
    near = np.array([[1.0, -(1.0 + 2.0**-30)]])                # equal magnitudes in float32: the first wins
    assert F.signed_absmax(near).tolist() == [1.0]
    weights = np.abs(x32[:1])
    assert np.array_equal(F.quantize_q2_k_weighted(x64[:1], weights), F.quantize_q2_k_weighted(x32[:1], weights))
    d = np.array([1.0 + 2.0**-11 + 2.0**-30, 0.5])             # as float32: an fp16 tie, rounded to even (1.0)
    q4 = F.encode_symmetric(d, np.zeros((2, 32), np.int64), "Q4_0")
    assert q4[:, :2].copy().view(np.float16)[:, 0].tolist() == [1.0, 0.5]
    i4 = F.encode_symmetric(d, np.zeros((2, 32), np.int64), "INT4")
    assert i4.shape == (2, 20) and i4[:, :4].copy().view(np.float32)[:, 0].tolist() == [np.float32(d[0]), 0.5]
