"""Numpy reference for the quantized block formats and the quantized matmul: slow, exact, readable.

Q4_0, Q8_0 and Q2_K blocks are byte-identical to ggml's reference quantizers (Q2_K: its
iterative min/scale search, evaluated in strict float32 without FMA contraction); INT4 is
ours (symmetric 4-bit per 32, fp32 scale). `matmul` does what the C++ kernel does:
activations quantized to Q8_0 (Q8_K for Q2_K), integer block dot products, float scales.
The C++ extension must agree with this module: bytes exactly, matmul to rounding.
"""

from __future__ import annotations

import numpy as np

QTYPES = ("INT4", "Q4_0", "Q8_0", "Q2_K")

# qtype -> (elements per block, bytes per block)
_LAYOUT = {"INT4": (32, 20), "Q4_0": (32, 18), "Q8_0": (32, 34), "Q2_K": (256, 84)}
QK_K = 256  # super-block of the K formats


def _check_qtype(qtype: str) -> None:
    if qtype not in _LAYOUT:
        raise ValueError(f"unknown qtype {qtype!r}; known: {', '.join(QTYPES)}")


def block_size(qtype: str) -> int:
    _check_qtype(qtype)
    return _LAYOUT[qtype][0]


def block_bytes(qtype: str) -> int:
    _check_qtype(qtype)
    return _LAYOUT[qtype][1]


def row_bytes(qtype: str, cols: int) -> int:
    return cols // block_size(qtype) * block_bytes(qtype)


def check_cols(qtype: str, rows: int, cols: int) -> None:
    """Raise the ValueError every entry point gives for a row length that is not whole blocks."""
    need = block_size(qtype)
    if cols <= 0 or cols % need:
        raise ValueError(f"{qtype} needs the number of columns to be a positive multiple of {need}; "
                         f"got a ({rows}, {cols}) matrix")


# ---- scalar helpers that mirror C semantics exactly ----------------------------------

def round_half_away(values: np.ndarray) -> np.ndarray:
    """C's roundf (ties away from zero), exact in float32: floor(|v|) + (fraction >= 0.5)."""
    magnitude = np.abs(values)
    whole = np.floor(magnitude)
    rounded = whole + (magnitude - whole >= np.float32(0.5))  # the subtraction is exact
    return np.copysign(rounded, values).astype(np.float32)


def nearest_int(values: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: add 1.5 * 2^23 in float32 and read the low mantissa bits.

    Ties go to even, and out-of-range inputs wrap exactly as the C trick does (we
    emulate the trick rather than calling rint so that both agree everywhere).
    """
    shifted = (values.astype(np.float32) + np.float32(12582912.0)).view(np.int32)
    return (shifted & 0x007FFFFF) - 0x00400000


def _fp16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 (n,) -> (n, 2) uint8, IEEE half rounded to nearest even (as ggml's conversion)."""
    return values.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _fp16_value(two_bytes: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(two_bytes).view(np.float16).astype(np.float32).reshape(-1)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(n, 32) codes in 0..15 -> (n, 16): element j in the low nibble, element j+16 in the high."""
    codes = codes.astype(np.uint8)
    return codes[:, :16] | (codes[:, 16:] << np.uint8(4))


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    return np.concatenate([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=1)


# ---- per-format block quantizers: (n, block) float32 -> (n, block_bytes) uint8 --------

def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """The element of largest magnitude (first one on ties), +0.0 for an all-zero block.

    ggml scans with a strict `<` starting from max = +0.0, so a block of zeros (of any
    sign) gives +0.0; argmax would pick the block's first element, possibly -0.0.
    """
    picked = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1)[:, None], axis=1)[:, 0]
    return np.where(np.abs(picked) == 0, np.float32(0.0), picked).astype(np.float32)


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0.0), np.float32(1.0) / d).astype(np.float32)


def _quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    d = _signed_absmax(blocks) / np.float32(-8.0)  # the extreme element maps to code 0 (-8)
    scaled = blocks * _safe_inverse(d)[:, None]
    codes = np.minimum(np.trunc(scaled + np.float32(8.5)), 15).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _pack_nibbles(codes)], axis=1)


def _quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    d = np.abs(blocks).max(axis=1) / np.float32(127.0)
    quants = round_half_away(blocks * _safe_inverse(d)[:, None]).astype(np.int8)
    return np.concatenate([_fp16_bytes(d), quants.view(np.uint8)], axis=1)


def _quantize_int4(blocks: np.ndarray) -> np.ndarray:
    d = (np.abs(blocks).max(axis=1) / np.float32(7.0)).astype(np.float32)
    quants = np.clip(round_half_away(blocks * _safe_inverse(d)[:, None]), -7, 7).astype(np.int16)
    codes = (quants + 8).astype(np.uint8)
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), _pack_nibbles(codes)], axis=1)


def _min_scale_search(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                      nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's asymmetric (scale, min) search for groups x (m, n): codes L in 0..nmax with
    x ~ scale * L - min, minimising the weighted absolute error over a sweep of trial
    inverse scales. Every float operation and summation order follows the C code so the
    chosen codes are identical; vectorised over the m groups, sequential over n.
    Returns (scale (m,), min (m,) >= 0, codes (m, n) uint8)."""
    f32 = np.float32
    n = x.shape[1]
    hi = x.max(axis=1)
    sum_w = weights[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        sum_w = sum_w + weights[:, i]
        sum_x = sum_x + weights[:, i] * x[:, i]
    lo = np.minimum(x.min(axis=1), f32(0.0)).astype(f32)
    flat = hi == lo  # all equal and <= 0: answered at the end (the math below divides by zero there)
    flat_min = -lo

    with np.errstate(all="ignore"):
        iscale = f32(nmax) / (hi - lo)
        scale = f32(1.0) / iscale
        codes = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        best_error = np.zeros_like(sum_w)
        for i in range(n):
            diff = scale * codes[:, i].astype(f32) + lo - x[:, i]
            best_error = best_error + weights[:, i] * np.abs(diff)

        for step in range(nstep + 1):
            # `lo` moves whenever a trial wins, and later trials measure from the new one.
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (hi - lo)
            trial = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
            trial_f = trial.astype(f32)
            sum_l = np.zeros_like(sum_w)
            sum_l2 = np.zeros_like(sum_w)
            sum_xl = np.zeros_like(sum_w)
            for i in range(n):
                wl = weights[:, i] * trial_f[:, i]
                sum_l = sum_l + wl
                sum_l2 = sum_l2 + wl * trial_f[:, i]
                sum_xl = sum_xl + wl * x[:, i]
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive_min = this_min > 0  # a positive offset is not allowed: refit the scale alone
            this_min = np.where(positive_min, f32(0.0), this_min).astype(f32)
            this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale).astype(f32)
            error = np.zeros_like(sum_w)
            for i in range(n):
                diff = this_scale * trial_f[:, i] + this_min - x[:, i]
                error = error + weights[:, i] * np.abs(diff)
            better = (det > 0) & (error < best_error)
            codes = np.where(better[:, None], trial, codes)
            best_error = np.where(better, error, best_error)
            scale = np.where(better, this_scale, scale).astype(f32)
            lo = np.where(better, this_min, lo).astype(f32)

    codes = np.where(flat[:, None], 0, codes)
    scale = np.where(flat, f32(0.0), scale).astype(f32)
    the_min = np.where(flat, flat_min, -lo).astype(f32)
    return scale, the_min, codes.astype(np.uint8)


def _quantize_q2_k(blocks: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """ggml's quantize_row_q2_K_ref: 16 groups of 16, each a 2-bit asymmetric code with a
    4-bit scale and 4-bit min relative to the super-block's fp16 d and dmin. `weights` (same
    shape as blocks) replace ggml's |x| as the search's element weights (calibration.py)."""
    f32 = np.float32
    nb = blocks.shape[0]
    groups = blocks.reshape(nb * 16, 16)
    group_weights = np.abs(groups) if weights is None else np.asarray(weights, f32).reshape(nb * 16, 16)
    scales, mins, search_codes = _min_scale_search(groups, group_weights, nmax=3, rmin=-0.5, rdelta=0.1, nstep=15)
    scales = scales.reshape(nb, 16)
    mins = mins.reshape(nb, 16)
    max_scale = np.maximum(scales.max(axis=1), f32(0.0))
    max_min = np.maximum(mins.max(axis=1), f32(0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        scale_codes = np.where(max_scale[:, None] > 0,
                               nearest_int((f32(15.0) / max_scale)[:, None] * scales), 0)
        min_codes = np.where(max_min[:, None] > 0,
                             nearest_int((f32(15.0) / max_min)[:, None] * mins), 0)
    d = np.where(max_scale > 0, max_scale / f32(15.0), f32(0.0)).astype(f32)
    dmin = np.where(max_min > 0, max_min / f32(15.0), f32(0.0)).astype(f32)
    packed_scales = (scale_codes.astype(np.uint8) | (min_codes.astype(np.int64) << 4).astype(np.uint8))

    # Requantize every element against the fp16-rounded group scale and min, as ggml does.
    d_half = d.astype(np.float16).astype(f32)
    dmin_half = dmin.astype(np.float16).astype(f32)
    group_d = d_half[:, None] * (packed_scales & 0xF).astype(f32)  # (nb, 16)
    group_m = dmin_half[:, None] * (packed_scales >> 4).astype(f32)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = nearest_int((blocks.reshape(nb, 16, 16) + group_m[:, :, None]) / group_d[:, :, None])
    codes = np.clip(codes, 0, 3).astype(np.uint8)
    # ggml skips groups whose requantization scale is zero and keeps the search's codes there.
    codes = np.where((group_d == 0)[:, :, None], search_codes.reshape(nb, 16, 16), codes).reshape(nb, 256)

    # 2-bit packing: byte l of each 32-byte half holds elements l, l+32, l+64, l+96 of its 128.
    halves = codes.reshape(nb, 2, 4, 32).astype(np.uint8)
    qs = (halves[:, :, 0] | (halves[:, :, 1] << 2) | (halves[:, :, 2] << 4) | (halves[:, :, 3] << 6))
    return np.concatenate([packed_scales, qs.reshape(nb, 64), _fp16_bytes(d), _fp16_bytes(dmin)], axis=1)


_QUANTIZERS = {"INT4": _quantize_int4, "Q4_0": _quantize_q4_0, "Q8_0": _quantize_q8_0, "Q2_K": _quantize_q2_k}


# ---- per-format block dequantizers: (n, block_bytes) uint8 -> (n, block) float32 ------

def _dequantize_q4_0(raw: np.ndarray) -> np.ndarray:
    d = _fp16_value(raw[:, :2])
    return (_unpack_nibbles(raw[:, 2:]).astype(np.float32) - 8) * d[:, None]


def _dequantize_int4(raw: np.ndarray) -> np.ndarray:
    d = np.ascontiguousarray(raw[:, :4]).view(np.float32).reshape(-1)
    return (_unpack_nibbles(raw[:, 4:]).astype(np.float32) - 8) * d[:, None]


def _dequantize_q8_0(raw: np.ndarray) -> np.ndarray:
    d = _fp16_value(raw[:, :2])
    return np.ascontiguousarray(raw[:, 2:]).view(np.int8).astype(np.float32) * d[:, None]


def _q2_k_codes(raw: np.ndarray) -> np.ndarray:
    """(nb, 84) -> (nb, 256) codes 0..3 in element order."""
    qs = raw[:, 16:80].reshape(-1, 2, 1, 32)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs >> shifts) & np.uint8(3)).reshape(-1, 256)


def _dequantize_q2_k(raw: np.ndarray) -> np.ndarray:
    nb = raw.shape[0]
    d = _fp16_value(raw[:, 80:82])
    dmin = _fp16_value(raw[:, 82:84])
    scales = raw[:, :16]
    group_d = d[:, None] * (scales & 0xF).astype(np.float32)
    group_m = dmin[:, None] * (scales >> 4).astype(np.float32)
    codes = _q2_k_codes(raw).reshape(nb, 16, 16).astype(np.float32)
    return (group_d[:, :, None] * codes - group_m[:, :, None]).reshape(nb, 256)


_DEQUANTIZERS = {"INT4": _dequantize_int4, "Q4_0": _dequantize_q4_0, "Q8_0": _dequantize_q8_0,
                 "Q2_K": _dequantize_q2_k}


# ---- public API ---------------------------------------------------------------------

def quantize_blocks(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """float32 (n, block) -> uint8 (n, block_bytes): one block per row, the plain rule."""
    _check_qtype(qtype)
    return _QUANTIZERS[qtype](np.ascontiguousarray(blocks, dtype=np.float32))


def dequantize_blocks(raw: np.ndarray, qtype: str) -> np.ndarray:
    """uint8 (n, block_bytes) -> float32 (n, block)."""
    _check_qtype(qtype)
    return _DEQUANTIZERS[qtype](np.ascontiguousarray(raw, dtype=np.uint8))


def signed_absmax(blocks: np.ndarray) -> np.ndarray:
    """Per block the element of largest magnitude (+0.0 for a zero block), as ggml's Q4_0 picks it."""
    return _signed_absmax(np.asarray(blocks, dtype=np.float32))


def encode_symmetric(d: np.ndarray, codes: np.ndarray, qtype: str) -> np.ndarray:
    """Q4_0 / INT4 blocks from a scale per block (n,) and signed codes (n, 32) (-8..7 / -7..7)."""
    if qtype == "Q4_0":
        scale_bytes = _fp16_bytes(np.asarray(d, np.float32))
    elif qtype == "INT4":
        scale_bytes = np.asarray(d, np.float32).reshape(-1, 1).view(np.uint8)
    else:
        raise ValueError(f"encode_symmetric: {qtype!r} is not a symmetric 4-bit format")
    return np.concatenate([scale_bytes, _pack_nibbles((np.asarray(codes) + 8).astype(np.uint8))], axis=1)


def quantize_q2_k_weighted(blocks: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Q2_K blocks (n, 256) with the group search weighted by `weights` (n, 256) instead of |x|."""
    return _quantize_q2_k(np.ascontiguousarray(blocks, dtype=np.float32), weights)


def quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """float32 (rows, cols) -> uint8 (rows, row_bytes)."""
    _check_qtype(qtype)
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D matrix, got shape {w.shape}")
    rows, cols = w.shape
    check_cols(qtype, rows, cols)
    blocks = w.reshape(-1, block_size(qtype))
    return _QUANTIZERS[qtype](blocks).reshape(rows, row_bytes(qtype, cols))


def _check_data(data: np.ndarray, qtype: str, cols: int) -> np.ndarray:
    _check_qtype(qtype)
    if data.ndim != 2 or data.dtype != np.uint8:
        raise ValueError(f"quantized data must be a 2-D uint8 array, got {data.dtype} {data.shape}")
    check_cols(qtype, data.shape[0], cols)
    if data.shape[1] != row_bytes(qtype, cols):
        raise ValueError(f"{qtype} rows of {cols} columns take {row_bytes(qtype, cols)} bytes, "
                         f"got {data.shape[1]}")
    return np.ascontiguousarray(data)


def dequantize(data: np.ndarray, qtype: str, cols: int) -> np.ndarray:
    """uint8 (rows, row_bytes) -> float32 (rows, cols)."""
    data = _check_data(data, qtype, cols)
    rows = data.shape[0]
    raw = data.reshape(-1, block_bytes(qtype))
    return _DEQUANTIZERS[qtype](raw).astype(np.float32).reshape(rows, cols)


def dequantize_rows(data: np.ndarray, qtype: str, cols: int, row_ids: np.ndarray) -> np.ndarray:
    """Dequantize only the rows `row_ids` (embedding lookups): float32 (len(row_ids), cols)."""
    data = _check_data(data, qtype, cols)
    row_ids = np.asarray(row_ids, dtype=np.int64).reshape(-1)
    if row_ids.size and (row_ids.min() < 0 or row_ids.max() >= data.shape[0]):
        raise IndexError(f"row id out of range for a table of {data.shape[0]} rows")
    return dequantize(data[row_ids], qtype, cols)


def int4_split(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """INT4 data (rows, cols/32*20) -> (nibbles uint8 (rows, cols/2), scales float32 (rows, cols/32))."""
    rows = data.shape[0]
    raw = np.ascontiguousarray(data).reshape(rows, -1, 20)
    scales = np.ascontiguousarray(raw[:, :, :4]).view(np.float32).reshape(rows, -1)
    nibbles = raw[:, :, 4:].reshape(rows, -1)
    return np.ascontiguousarray(nibbles), scales.copy()


def int4_join(nibbles: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of int4_split."""
    rows, groups = scales.shape
    if nibbles.shape != (rows, groups * 16):
        raise ValueError(f"INT4 nibbles {nibbles.shape} do not match scales {scales.shape} "
                         f"(expected ({rows}, {groups * 16}))")
    scale_bytes = np.ascontiguousarray(scales, dtype=np.float32).reshape(rows, groups, 1).view(np.uint8)
    raw = np.concatenate([scale_bytes, np.asarray(nibbles, np.uint8).reshape(rows, groups, 16)], axis=2)
    return raw.reshape(rows, groups * 20)


# ---- activation quantization (what the matmul feeds the integer dot products) ---------

def quantize_q8_0_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, cols) -> (int8 codes (N, cols), float32 scales (N, cols/32)): ggml's Q8_0 blocks,
    the scale read back from its fp16 storage as the dot product uses it."""
    packed = _quantize_q8_0(np.ascontiguousarray(x, np.float32).reshape(-1, 32))
    codes = packed[:, 2:].view(np.int8).reshape(x.shape)
    scales = _fp16_value(packed[:, :2]).reshape(x.shape[0], -1)
    return codes, scales


def quantize_q8_k_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, cols) -> (int8 codes (N, cols), float32 d (N, cols/256), int16 bsums (N, cols/16)):
    ggml's quantize_row_q8_K_ref (scale -127/max of the signed extreme, ties to even)."""
    n_rows = x.shape[0]
    blocks = np.ascontiguousarray(x, np.float32).reshape(-1, QK_K)
    extreme = _signed_absmax(blocks)
    with np.errstate(divide="ignore"):
        iscale = np.where(extreme == 0, np.float32(0.0), np.float32(-127.0) / extreme).astype(np.float32)
    codes = np.minimum(nearest_int(iscale[:, None] * blocks), 127).astype(np.int8)
    with np.errstate(divide="ignore"):
        d = np.where(extreme == 0, np.float32(0.0), np.float32(1.0) / iscale).astype(np.float32)
    bsums = codes.reshape(-1, 16, 16).astype(np.int32).sum(axis=2).astype(np.int16)
    return codes.reshape(x.shape), d.reshape(n_rows, -1), bsums.reshape(n_rows, -1)


# ---- the quantized matmul -----------------------------------------------------------

def matmul(data: np.ndarray, qtype: str, cols: int, x: np.ndarray) -> np.ndarray:
    """y = x @ W.T for a quantized W (rows, cols) and float32 x (N, cols) -> float32 (N, rows).

    Per block: an exact integer dot product of weight codes and activation codes, times
    the weight and activation scales in float32; blocks summed in float64 here (the C++
    kernel sums in float32 in its own order, hence the ~1e-5 agreement)."""
    data = _check_data(data, qtype, cols)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != cols:
        raise ValueError(f"x must be (N, {cols}), got {x.shape}")
    rows = data.shape[0]
    raw = data.reshape(rows, -1, block_bytes(qtype))  # (rows, blocks, bytes)
    nblocks = raw.shape[1]

    if qtype == "Q2_K":
        a_codes, a_d, a_bsums = quantize_q8_k_activations(x)
        w_codes = _q2_k_codes(raw.reshape(-1, 84)).reshape(rows, nblocks, 16, 16).astype(np.int64)
        scales = raw[:, :, :16]
        w_scale = (scales & 0xF).astype(np.int64)  # (rows, blocks, 16)
        w_min = (scales >> 4).astype(np.int64)
        a = a_codes.reshape(-1, nblocks, 16, 16).astype(np.int64)
        # group dots (N, rows, blocks, 16) -> weighted by the 4-bit scale
        group_dots = np.einsum("rbgk,nbgk->nrbg", w_codes, a)
        scaled_dot = (group_dots * w_scale[None]).sum(axis=3)  # (N, rows, blocks)
        min_dot = np.einsum("rbg,nbg->nrb", w_min, a_bsums.reshape(-1, nblocks, 16).astype(np.int64))
        d = _fp16_value(raw[:, :, 80:82].reshape(-1, 2)).reshape(rows, nblocks)
        dmin = _fp16_value(raw[:, :, 82:84].reshape(-1, 2)).reshape(rows, nblocks)
        dall = (a_d[:, None, :] * d[None]).astype(np.float32)
        dmins = (a_d[:, None, :] * dmin[None]).astype(np.float32)
        per_block = dall * scaled_dot.astype(np.float32) - dmins * min_dot.astype(np.float32)
        return per_block.astype(np.float64).sum(axis=2).astype(np.float32)

    a_codes, a_scale = quantize_q8_0_activations(x)
    if qtype == "Q8_0":
        w_codes = np.ascontiguousarray(raw[:, :, 2:]).view(np.int8).astype(np.int64)
        w_scale = _fp16_value(raw[:, :, :2].reshape(-1, 2)).reshape(rows, nblocks)
    else:
        offset = 4 if qtype == "INT4" else 2
        w_codes = _unpack_nibbles(raw[:, :, offset:].reshape(-1, 16)).astype(np.int64).reshape(rows, nblocks, 32) - 8
        if qtype == "INT4":
            w_scale = np.ascontiguousarray(raw[:, :, :4]).view(np.float32).reshape(rows, nblocks)
        else:
            w_scale = _fp16_value(raw[:, :, :2].reshape(-1, 2)).reshape(rows, nblocks)
    a = a_codes.reshape(-1, nblocks, 32).astype(np.int64)
    block_dots = np.einsum("rbk,nbk->nrb", w_codes, a)  # exact integers
    per_block = (w_scale[None] * a_scale[:, None, :]).astype(np.float32) * block_dots.astype(np.float32)
    return per_block.astype(np.float64).sum(axis=2).astype(np.float32)
