"""An independent Q2_K quantizer, written from the format's definition (ggml's
`quantize_row_q2_K_ref` and its `make_qkx2_quants` search) one element at a time in plain
Python, so that tests can check our numpy quantizer and the C++ kernel against it.

It shares no code with `hierarchos/quant/formats.py` or `kernels/`: floats are Python floats
rounded to float32 after every operation (`_f32`), ties-to-even rounding is Python's `round`,
and half precision is `struct`'s "e" format. Slow (about 0.1 s per 256-value block): tests
feed it a few blocks.

Why the result is bit-exact and not "close": C evaluates `a op b` on two floats as the float32
rounding of the exact result. Computing in float64 and rounding once to float32 gives that same
value for + - * / (float64 has more than 2 x 24 + 2 bits, so double rounding cannot occur).
We follow C's evaluation order of every expression and sum, and do not contract a*b+c into a
fused multiply-add (ggml's reference compiled without FMA contraction; an FMA build may choose
different codes on rare near-ties, and then bytes could differ).

The Q2_K block (84 bytes, 256 values):
    scales[16]  one byte per group of 16 values: low nibble = scale code, high nibble = min code
    qs[64]      2-bit codes; byte l of each 32-byte half holds values l, l+32, l+64, l+96 of its 128
    d, dmin     fp16 super-block multipliers
A value dequantizes to  d * (scales[g] & 15) * code  -  dmin * (scales[g] >> 4).
"""

from __future__ import annotations

import math
import struct

QK_K = 256
GROUP = 16
NMAX = 3                      # 2-bit codes 0..3
RMIN, RDELTA, NSTEP = -0.5, 0.1, 15  # the search's trial inverse scales: (NMAX + RMIN + RDELTA*is) / range
Q4SCALE = 15.0                # 4-bit scale and min codes 0..15


def _f32(value: float) -> float:
    """Round a Python float to the nearest float32 (ties to even), as C stores a float."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _div(a: float, b: float) -> float:
    """IEEE float division (C gives inf/nan on a zero divisor; Python would raise)."""
    if b == 0.0:
        return math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)
    return _f32(a / b)


def _nearest_int(value: float) -> int:
    """ggml's nearest_int: round to nearest, ties to even. ggml asserts |value| <= 4194303 (its
    bit trick is only valid there), and so do we: a value outside would be a bug in the caller."""
    assert abs(value) <= 4194303.0, value
    return round(value)  # Python rounds ties to even


def _half(value: float) -> float:
    """The float32 value of an fp16 stored from `value` (round to nearest even)."""
    return struct.unpack("<e", struct.pack("<e", value))[0]


def _half_bytes(value: float) -> bytes:
    return struct.pack("<e", value)


def _clamp(code: int, low: int, high: int) -> int:
    return max(low, min(high, code))


def fit_group(x: list[float], weights: list[float]) -> tuple[float, float, list[int]]:
    """make_qkx2_quants(n=16, nmax=3, rmin=-0.5, rdelta=0.1, nstep=15, use_mad=true).

    Find codes L in 0..3 and (scale, min) with x ~ scale * L + min (min <= 0), minimising the
    weighted absolute error sum w_i |scale * L_i + min - x_i| (w_i = |x_i| for Q2_K).
    Returns (scale, -min, codes): the stored min is the positive offset that is subtracted.
    """
    n = len(x)
    # 1. range, and the weighted sums of w and w*x (in element order, float32 accumulators)
    lo, hi = x[0], x[0]
    sum_w = weights[0]
    sum_x = _f32(sum_w * x[0])
    for i in range(1, n):
        if x[i] < lo:
            lo = x[i]
        if x[i] > hi:
            hi = x[i]
        sum_w = _f32(sum_w + weights[i])
        sum_x = _f32(sum_x + _f32(weights[i] * x[i]))
    # 2. the offset never goes above zero (codes are >= 0, so min <= smallest value); a flat group
    #    (all values equal and <= 0) is all offset: codes 0, scale 0
    if lo > 0:
        lo = 0.0
    if hi == lo:
        return 0.0, -lo, [0] * n
    # 3. first guess: spread [lo, hi] evenly over the codes 0..nmax; its error is the one to beat
    iscale = _div(float(NMAX), _f32(hi - lo))
    scale = _div(1.0, iscale)
    codes = [_clamp(_nearest_int(_f32(iscale * _f32(x[i] - lo))), 0, NMAX) for i in range(n)]
    best_error = 0.0
    for i in range(n):
        diff = _f32(_f32(_f32(scale * codes[i]) + lo) - x[i])
        best_error = _f32(best_error + _f32(weights[i] * abs(diff)))
    # 4. sweep 16 trial inverse scales; for each trial's codes solve the weighted least-squares
    #    (scale, min), refit the scale alone if the min came out positive, and keep the trial if its
    #    weighted absolute error is strictly lower. Note the range uses the CURRENT best min: once a
    #    trial wins, later trials measure x from the new offset (this is ggml's rule, kept as is).
    for step in range(NSTEP + 1):
        iscale = _div(_f32(_f32(RMIN + _f32(_f32(RDELTA) * step)) + NMAX), _f32(hi - lo))
        trial = []
        sum_l = sum_l2 = sum_xl = 0.0
        for i in range(n):
            code = _clamp(_nearest_int(_f32(iscale * _f32(x[i] - lo))), 0, NMAX)
            trial.append(code)
            w_l = _f32(weights[i] * code)
            sum_l = _f32(sum_l + w_l)
            sum_l2 = _f32(sum_l2 + _f32(w_l * code))
            sum_xl = _f32(sum_xl + _f32(w_l * x[i]))
        det = _f32(_f32(sum_w * sum_l2) - _f32(sum_l * sum_l))
        if not det > 0:
            continue
        this_scale = _div(_f32(_f32(sum_w * sum_xl) - _f32(sum_x * sum_l)), det)
        this_min = _div(_f32(_f32(sum_l2 * sum_x) - _f32(sum_l * sum_xl)), det)
        if this_min > 0:
            this_min = 0.0
            this_scale = _div(sum_xl, sum_l2)
        error = 0.0
        for i in range(n):
            diff = _f32(_f32(_f32(this_scale * trial[i]) + this_min) - x[i])
            error = _f32(error + _f32(weights[i] * abs(diff)))
        if error < best_error:
            codes, best_error, scale, lo = trial, error, this_scale, this_min
    return scale, -lo, codes


def quantize_block(values: list[float]) -> bytes:
    """quantize_row_q2_K_ref for one super-block of 256 float32 values -> its 84 bytes."""
    assert len(values) == QK_K
    x = [_f32(float(v)) for v in values]
    # 1. fit each group of 16 on its own, weighting each value by its magnitude
    scales, mins, codes = [], [], []
    for g in range(QK_K // GROUP):
        group = x[GROUP * g:GROUP * (g + 1)]
        scale, the_min, group_codes = fit_group(group, [abs(v) for v in group])
        scales.append(scale)
        mins.append(the_min)
        codes.extend(group_codes)
    # 2. the largest scale and the largest min set the super-block's d and dmin (= largest / 15);
    #    each group's scale and min become 4-bit codes of those (nearest, ties to even). A C uint8
    #    keeps the low 8 bits of the int it is given (& 0xFF)
    max_scale = max([0.0] + [s for s in scales if s > 0.0])
    max_min = max([0.0] + [m for m in mins if m > 0.0])
    packed = [0] * (QK_K // GROUP)
    d = dmin = 0.0
    if max_scale > 0:
        inverse = _div(Q4SCALE, max_scale)
        packed = [_nearest_int(_f32(inverse * s)) & 0xFF for s in scales]
        d = _div(max_scale, Q4SCALE)
    if max_min > 0:
        inverse = _div(Q4SCALE, max_min)
        packed = [(p | (_nearest_int(_f32(inverse * m)) << 4)) & 0xFF for p, m in zip(packed, mins)]
        dmin = _div(max_min, Q4SCALE)
    # 3. requantize every value against the scale and min as they will be read back (fp16 d and dmin
    #    times the 4-bit codes): code = nearest((x + min) / scale) in 0..3. A group whose scale reads
    #    back as zero keeps the codes of its search (they dequantize to -min whatever they are)
    d_read, dmin_read = _half(d), _half(dmin)
    for g in range(QK_K // GROUP):
        group_scale = _f32(d_read * (packed[g] & 0xF))
        if group_scale == 0.0:
            continue
        group_min = _f32(dmin_read * (packed[g] >> 4))
        for i in range(GROUP * g, GROUP * (g + 1)):
            codes[i] = _clamp(_nearest_int(_div(_f32(x[i] + group_min), group_scale)), 0, NMAX)
    # 4. pack four 2-bit codes per byte: in each half of 128 values, byte l holds l, l+32, l+64, l+96
    qs = []
    for half in (0, 128):
        for l in range(32):
            c = codes[half + l:half + l + 128:32]
            qs.append(c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6)
    return bytes(packed) + bytes(qs) + _half_bytes(d) + _half_bytes(dmin)


def quantize(rows: list[list[float]]) -> list[bytes]:
    """Each row (a multiple of 256 values) -> its Q2_K bytes, block after block."""
    out = []
    for row in rows:
        assert len(row) % QK_K == 0
        out.append(b"".join(quantize_block(row[b:b + QK_K]) for b in range(0, len(row), QK_K)))
    return out


def dequantize_block(raw: bytes) -> list[float]:
    """84 bytes -> 256 float32 values, from the layout above (ggml's dequantize_row_q2_K)."""
    assert len(raw) == 84
    d, dmin = _half(struct.unpack("<e", raw[80:82])[0]), _half(struct.unpack("<e", raw[82:84])[0])
    out = [0.0] * QK_K
    for i in range(QK_K):
        half, within = divmod(i, 128)
        shift, l = divmod(within, 32)
        code = (raw[16 + 32 * (half) + l] >> (2 * shift)) & 3
        s = raw[i // GROUP]
        out[i] = _f32(_f32(_f32(d * (s & 0xF)) * code) - _f32(dmin * (s >> 4)))
    return out
