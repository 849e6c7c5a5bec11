// Reference (scalar, portable) code: fp16 conversion, the weight quantizers and
// dequantizers, activation quantization, and the scalar dot-product kernels that every
// ISA path is tested against. Compiled with -ffp-contract=off so each float operation
// rounds on its own, as in the numpy reference (hierarchos/quant/formats.py). (The Q8_K
// activations' extreme is searched with SSE2 where x86 has it, the scalar loop's result: Q8_K
// has no per-ISA quantizer.)
#include <cmath>
#include <cstring>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "formats.h"

namespace hk {

int block_size(QType t) { return t == QType::Q2_K ? QK_K : QK; }

int block_bytes(QType t) {
    switch (t) {
        case QType::INT4: return sizeof(BlockInt4);
        case QType::Q4_0: return sizeof(BlockQ4_0);
        case QType::Q8_0: return sizeof(BlockQ8_0);
        case QType::Q2_K: return sizeof(BlockQ2_K);
    }
    return 0;
}

const char *qtype_name(QType t) {
    static const char *names[] = {"INT4", "Q4_0", "Q8_0", "Q2_K"};
    return names[static_cast<int>(t)];
}

bool qtype_from_name(const char *name, QType *t) {
    for (int i = 0; i < kNumQTypes; ++i)
        if (std::strcmp(name, qtype_name(static_cast<QType>(i))) == 0) {
            *t = static_cast<QType>(i);
            return true;
        }
    return false;
}

static uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

static float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

float half_to_float(half h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1F;
    const uint32_t mantissa = h & 0x3FF;
    if (exponent == 0x1F) return bits_float(sign | 0x7F800000 | (mantissa << 13));  // inf / nan
    if (exponent == 0) {
        // zero or subnormal: mantissa * 2^-24 is exact in float
        const float magnitude = static_cast<float>(mantissa) * (1.0f / 16777216.0f);
        return sign ? -magnitude : magnitude;
    }
    return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

half float_to_half(float f) {
    const uint32_t bits = float_bits(f);
    const uint32_t sign = (bits >> 16) & 0x8000;
    const uint32_t magnitude = bits & 0x7FFFFFFF;
    if (magnitude > 0x7F800000) return static_cast<half>(sign | 0x7E00 | ((magnitude >> 13) & 0x3FF));  // nan
    if (magnitude >= 0x477FF000) return static_cast<half>(sign | 0x7C00);  // rounds past 65504: inf
    if (magnitude < 0x38800000) {
        // Below the smallest normal half: the result is round(|f| * 2^24) units of 2^-24;
        // scaling by a power of two is exact and rintf rounds ties to even.
        const float units = bits_float(magnitude) * 16777216.0f;
        return static_cast<half>(sign | static_cast<uint32_t>(std::rint(units)));
    }
    uint32_t result = ((magnitude >> 23) - 112) << 10 | ((magnitude >> 13) & 0x3FF);
    const uint32_t rest = magnitude & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (result & 1))) ++result;  // a carry may bump the exponent: still right
    return static_cast<half>(sign | result);
}

// ggml's nearest_int: ties to even through the float adder, by adding 1.5 * 2^23.
static inline int nearest_int(float value) {
    const float shifted = value + 12582912.0f;
    int32_t bits;
    std::memcpy(&bits, &shifted, 4);
    return (bits & 0x007FFFFF) - 0x00400000;
}

// C's roundf (ties away from zero) without a libm call, so loops over it vectorise:
// the fraction v - trunc(v) is exact in float. Valid for |v| < 2^31 (codes are tiny).
static inline int round_away(float v) {
    const int whole = static_cast<int>(v);
    const float frac = v - static_cast<float>(whole);
    return whole + (frac >= 0.5f) - (frac <= -0.5f);
}

// ---- weight quantizers ------------------------------------------------------------

static void quantize_q4_0(const float *x, BlockQ4_0 *out, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float amax = 0.0f, extreme = 0.0f;  // keep the signed element of largest magnitude
        for (int j = 0; j < QK; ++j) {
            if (amax < std::fabs(x[j])) {
                amax = std::fabs(x[j]);
                extreme = x[j];
            }
        }
        const float d = extreme / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[i].d = float_to_half(d);
        for (int j = 0; j < QK / 2; ++j) {
            // truncation toward zero after +8.5 is ggml's rounding for this format
            const int lo = static_cast<int8_t>(x[j] * id + 8.5f);
            const int hi = static_cast<int8_t>(x[j + QK / 2] * id + 8.5f);
            out[i].qs[j] = static_cast<uint8_t>((lo < 15 ? lo : 15) | (hi < 15 ? hi : 15) << 4);
        }
    }
}

static void quantize_q8_0(const float *x, BlockQ8_0 *out, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; ++j) amax = amax > std::fabs(x[j]) ? amax : std::fabs(x[j]);
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[i].d = float_to_half(d);
        for (int j = 0; j < QK; ++j) out[i].qs[j] = static_cast<int8_t>(round_away(x[j] * id));
    }
}

static void quantize_int4(const float *x, BlockInt4 *out, int64_t nb) {
    for (int64_t i = 0; i < nb; ++i, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; ++j) amax = amax > std::fabs(x[j]) ? amax : std::fabs(x[j]);
        const float d = amax / 7.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[i].d = d;
        int codes[QK];
        for (int j = 0; j < QK; ++j) {
            const int q = round_away(x[j] * id);
            codes[j] = (q < -7 ? -7 : (q > 7 ? 7 : q)) + 8;
        }
        for (int j = 0; j < QK / 2; ++j) out[i].qs[j] = static_cast<uint8_t>(codes[j] | codes[j + QK / 2] << 4);
    }
}

// ggml's make_qkx2_quants: codes L in [0, nmax] with x ~ scale * L - min (min >= 0),
// chosen by sweeping trial inverse scales and keeping the lowest weighted absolute
// error. Every sum runs in element order so the codes are reproducible bit for bit.
static float min_scale_search(int n, int nmax, const float *x, const float *w, uint8_t *L, float *the_min,
                              float rmin, float rdelta, int nstep) {
    float lo = x[0], hi = x[0];
    float sum_w = w[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (lo > 0) lo = 0;
    if (hi == lo) {
        for (int i = 0; i < n; ++i) L[i] = 0;
        *the_min = -lo;
        return 0.0f;
    }
    float iscale = nmax / (hi - lo);
    float scale = 1 / iscale;
    float best_error = 0;
    for (int i = 0; i < n; ++i) {
        const int l = nearest_int(iscale * (x[i] - lo));
        L[i] = static_cast<uint8_t>(l < 0 ? 0 : (l > nmax ? nmax : l));
        const float diff = scale * L[i] + lo - x[i];
        best_error += w[i] * std::fabs(diff);
    }
    uint8_t trial[QK_K];
    for (int step = 0; step <= nstep; ++step) {
        iscale = (rmin + rdelta * step + nmax) / (hi - lo);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = nearest_int(iscale * (x[i] - lo));
            l = l < 0 ? 0 : (l > nmax ? nmax : l);
            trial[i] = static_cast<uint8_t>(l);
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        const float det = sum_w * sum_l2 - sum_l * sum_l;
        if (det > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if (this_min > 0) {  // a positive offset is not representable: refit the scale alone
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float error = 0;
            for (int i = 0; i < n; ++i) {
                const float diff = this_scale * trial[i] + this_min - x[i];
                error += w[i] * std::fabs(diff);
            }
            if (error < best_error) {
                for (int i = 0; i < n; ++i) L[i] = trial[i];
                best_error = error;
                scale = this_scale;
                lo = this_min;
            }
        }
    }
    *the_min = -lo;
    return scale;
}

static void quantize_q2_k(const float *x, BlockQ2_K *out, int64_t nb) {
    uint8_t L[QK_K];
    float weights[16], mins[QK_K / 16], scales[QK_K / 16];
    for (int64_t i = 0; i < nb; ++i, x += QK_K) {
        float max_scale = 0, max_min = 0;
        for (int g = 0; g < QK_K / 16; ++g) {
            for (int l = 0; l < 16; ++l) weights[l] = std::fabs(x[16 * g + l]);
            scales[g] = min_scale_search(16, 3, x + 16 * g, weights, L + 16 * g, &mins[g], -0.5f, 0.1f, 15);
            if (scales[g] > max_scale) max_scale = scales[g];
            if (mins[g] > max_min) max_min = mins[g];
        }
        BlockQ2_K &block = out[i];
        if (max_scale > 0) {
            const float iscale = 15.0f / max_scale;
            for (int g = 0; g < QK_K / 16; ++g) block.scales[g] = static_cast<uint8_t>(nearest_int(iscale * scales[g]));
            block.d = float_to_half(max_scale / 15.0f);
        } else {
            for (int g = 0; g < QK_K / 16; ++g) block.scales[g] = 0;
            block.d = float_to_half(0.0f);
        }
        if (max_min > 0) {
            const float iscale = 15.0f / max_min;
            for (int g = 0; g < QK_K / 16; ++g)
                block.scales[g] = static_cast<uint8_t>(block.scales[g] | (nearest_int(iscale * mins[g]) << 4));
            block.dmin = float_to_half(max_min / 15.0f);
        } else {
            block.dmin = float_to_half(0.0f);
        }
        // Requantize against the stored (fp16, 4-bit) group scale and min.
        for (int g = 0; g < QK_K / 16; ++g) {
            const float d = half_to_float(block.d) * (block.scales[g] & 0xF);
            if (d == 0.0f) continue;
            const float m = half_to_float(block.dmin) * (block.scales[g] >> 4);
            for (int l = 0; l < 16; ++l) {
                const int code = nearest_int((x[16 * g + l] + m) / d);
                L[16 * g + l] = static_cast<uint8_t>(code < 0 ? 0 : (code > 3 ? 3 : code));
            }
        }
        for (int half128 = 0; half128 < 2; ++half128)
            for (int l = 0; l < 32; ++l) {
                const uint8_t *codes = L + 128 * half128 + l;
                block.qs[32 * half128 + l] = static_cast<uint8_t>(codes[0] | codes[32] << 2 | codes[64] << 4 | codes[96] << 6);
            }
    }
}

void quantize_row(QType t, const float *x, void *out, int64_t n) {
    const int64_t nb = n / block_size(t);
    switch (t) {
        case QType::INT4: quantize_int4(x, static_cast<BlockInt4 *>(out), nb); break;
        case QType::Q4_0: quantize_q4_0(x, static_cast<BlockQ4_0 *>(out), nb); break;
        case QType::Q8_0: quantize_q8_0(x, static_cast<BlockQ8_0 *>(out), nb); break;
        case QType::Q2_K: quantize_q2_k(x, static_cast<BlockQ2_K *>(out), nb); break;
    }
}

// ---- dequantizers -----------------------------------------------------------------

void dequantize_row(QType t, const void *in, float *y, int64_t n) {
    const int64_t nb = n / block_size(t);
    if (t == QType::INT4 || t == QType::Q4_0) {
        for (int64_t i = 0; i < nb; ++i, y += QK) {
            float d;
            const uint8_t *qs;
            if (t == QType::INT4) {
                const BlockInt4 &b = static_cast<const BlockInt4 *>(in)[i];
                d = b.d;
                qs = b.qs;
            } else {
                const BlockQ4_0 &b = static_cast<const BlockQ4_0 *>(in)[i];
                d = half_to_float(b.d);
                qs = b.qs;
            }
            for (int j = 0; j < QK / 2; ++j) {
                y[j] = static_cast<float>((qs[j] & 0xF) - 8) * d;
                y[j + QK / 2] = static_cast<float>((qs[j] >> 4) - 8) * d;
            }
        }
    } else if (t == QType::Q8_0) {
        const BlockQ8_0 *blocks = static_cast<const BlockQ8_0 *>(in);
        for (int64_t i = 0; i < nb; ++i, y += QK) {
            const float d = half_to_float(blocks[i].d);
            for (int j = 0; j < QK; ++j) y[j] = static_cast<float>(blocks[i].qs[j]) * d;
        }
    } else {
        const BlockQ2_K *blocks = static_cast<const BlockQ2_K *>(in);
        for (int64_t i = 0; i < nb; ++i, y += QK_K) {
            const float d = half_to_float(blocks[i].d), dmin = half_to_float(blocks[i].dmin);
            for (int e = 0; e < QK_K; ++e) {
                const int g = e / 16;
                const int code = (blocks[i].qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
                const float group_d = d * (blocks[i].scales[g] & 0xF);
                const float group_m = dmin * (blocks[i].scales[g] >> 4);
                y[e] = group_d * code - group_m;
            }
        }
    }
}

// ---- activation quantization --------------------------------------------------------

void quantize_act_row_q8_0(const float *x, int8_t *qs, float *d, int32_t *sums, int64_t n) {
    for (int64_t b = 0; b < n / QK; ++b, x += QK, qs += QK) {
        // max is exact in any order: eight running maxima, as the x86 quantizer's vector lanes take them
        // (x86_quantize_act.h, the hot path there: GCC 12 leaves this loop scalar)
        float lane_max[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int j = 0; j < QK; j += 8)
            for (int l = 0; l < 8; ++l) lane_max[l] = lane_max[l] > std::fabs(x[j + l]) ? lane_max[l] : std::fabs(x[j + l]);
        float amax = 0.0f;
        for (int l = 0; l < 8; ++l) amax = amax > lane_max[l] ? amax : lane_max[l];
        const float scale = amax / 127.0f;
        const float id = scale != 0.0f ? 1.0f / scale : 0.0f;
        int32_t sum = 0;
        for (int j = 0; j < QK; ++j) {
            qs[j] = static_cast<int8_t>(round_away(x[j] * id));
            sum += qs[j];
        }
        d[b] = half_to_float(float_to_half(scale));  // the dot product sees the stored fp16 scale
        sums[b] = sum;
    }
}

void quantize_act_row_q8_k(const float *x, BlockQ8_K *out, int64_t n) {
    for (int64_t b = 0; b < n / QK_K; ++b, x += QK_K) {
        BlockQ8_K &block = out[b];
        // ggml keeps the first element of largest magnitude (its sign sets the scale's) and
        // passes over NaNs. Its one scalar pass was most of a 16 x 14,336 Q2_K call (21.4 us;
        // 13.8 with this, Zen 4); SSE2 finds the maximum, then the first element that reaches
        // it (maxps(v, m) keeps m when v is NaN, as ggml's compare does).
        int first = 0;
        float amax = 0.0f;
#if defined(__SSE2__)
        const __m128 sign = _mm_set1_ps(-0.0f);
        __m128 lanes = _mm_setzero_ps();
        for (int j = 0; j < QK_K; j += 4) lanes = _mm_max_ps(_mm_andnot_ps(sign, _mm_loadu_ps(x + j)), lanes);
        lanes = _mm_max_ps(lanes, _mm_shuffle_ps(lanes, lanes, _MM_SHUFFLE(1, 0, 3, 2)));
        lanes = _mm_max_ps(lanes, _mm_shuffle_ps(lanes, lanes, _MM_SHUFFLE(2, 3, 0, 1)));
        amax = _mm_cvtss_f32(lanes);
        if (amax > 0.0f) {
            for (int j = 0;; j += 4) {
                const int hit = _mm_movemask_ps(_mm_cmpeq_ps(_mm_andnot_ps(sign, _mm_loadu_ps(x + j)), lanes));
                if (hit) {
                    first = j + __builtin_ctz(static_cast<unsigned>(hit));
                    break;
                }
            }
        }
#else
        for (int j = 0; j < QK_K; ++j) {
            if (std::fabs(x[j]) > amax) {
                amax = std::fabs(x[j]);
                first = j;
            }
        }
#endif
        if (amax == 0.0f) {
            std::memset(&block, 0, sizeof(block));
            continue;
        }
        const float iscale = -127.0f / x[first];
        for (int j = 0; j < QK_K; ++j) {
            const int v = nearest_int(iscale * x[j]);
            block.qs[j] = static_cast<int8_t>(v < 127 ? v : 127);
        }
        for (int g = 0; g < QK_K / 16; ++g) {
            int sum = 0;
            for (int l = 0; l < 16; ++l) sum += block.qs[16 * g + l];
            block.bsums[g] = static_cast<int16_t>(sum);
        }
        block.d = 1 / iscale;
    }
}

// ---- scalar dot kernels -------------------------------------------------------------

static void scalar_dot_q8_0(QType t, const DotArgs &args, const ActQ8_0View &act) {
    const int bb = block_bytes(t);
    for (int64_t r = args.r0; r < args.r1; ++r) {
        const uint8_t *row = args.w + r * args.row_bytes;
        for (int64_t a = args.a0; a < args.a1; ++a) {
            const int8_t *aq = act.qs + a * act.n_blocks * QK;
            const float *ad = act.d + a * act.n_blocks;
            float acc = 0.0f;
            for (int64_t b = 0; b < args.n_blocks; ++b) {
                const uint8_t *block = row + b * bb;
                const int8_t *q8 = aq + b * QK;
                int32_t isum = 0;
                float dw;
                if (t == QType::Q8_0) {
                    const BlockQ8_0 *wb = reinterpret_cast<const BlockQ8_0 *>(block);
                    dw = half_to_float(wb->d);
                    for (int j = 0; j < QK; ++j) isum += wb->qs[j] * q8[j];
                } else {
                    const uint8_t *qs;
                    if (t == QType::INT4) {
                        std::memcpy(&dw, block, 4);
                        qs = block + 4;
                    } else {
                        half h;
                        std::memcpy(&h, block, 2);
                        dw = half_to_float(h);
                        qs = block + 2;
                    }
                    for (int j = 0; j < QK / 2; ++j)
                        isum += ((qs[j] & 0xF) - 8) * q8[j] + ((qs[j] >> 4) - 8) * q8[j + QK / 2];
                }
                acc += (dw * ad[b]) * static_cast<float>(isum);
            }
            args.out[a * args.out_stride + r] = acc;
        }
    }
}

static void scalar_dot_q2_k(const DotArgs &args, const ActQ8_KView &act) {
    for (int64_t r = args.r0; r < args.r1; ++r) {
        const BlockQ2_K *row = reinterpret_cast<const BlockQ2_K *>(args.w + r * args.row_bytes);
        for (int64_t a = args.a0; a < args.a1; ++a) {
            const BlockQ8_K *ab = act.blocks + a * act.n_blocks;
            float acc = 0.0f;
            for (int64_t b = 0; b < args.n_blocks; ++b) {
                const BlockQ2_K &w = row[b];
                const BlockQ8_K &q8 = ab[b];
                int32_t scaled = 0, mins = 0;
                for (int g = 0; g < 16; ++g) {
                    // group g covers elements 16g..16g+15: half g/8, shift by its 32-element chunk
                    const int first = 16 * g;
                    const int shift = 2 * ((first % 128) / 32);
                    const uint8_t *qs = w.qs + 32 * (first / 128) + first % 32;
                    int32_t dot = 0;
                    for (int l = 0; l < 16; ++l) dot += ((qs[l] >> shift) & 3) * q8.qs[first + l];
                    scaled += (w.scales[g] & 0xF) * dot;
                    mins += (w.scales[g] >> 4) * q8.bsums[g];
                }
                const float dall = q8.d * half_to_float(w.d);
                const float dmins = q8.d * half_to_float(w.dmin);
                acc += dall * static_cast<float>(scaled) - dmins * static_cast<float>(mins);
            }
            args.out[a * args.out_stride + r] = acc;
        }
    }
}

const IsaKernels *scalar_kernels() {
    static const IsaKernels table = {"scalar", scalar_dot_q8_0, scalar_dot_q2_k, 0, quantize_act_row_q8_0};
    return &table;
}

}  // namespace hk

namespace hk {

uint64_t stream_read(const uint8_t *p, size_t bytes) {
    // Four independent sums of 64-bit words keep enough loads in flight; the compiler
    // vectorises this loop, and the result depends on every byte read.
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t i = 0;
    for (; i + 32 <= bytes; i += 32) {
        uint64_t w[4];
        std::memcpy(w, p + i, 32);
        s0 += w[0];
        s1 += w[1];
        s2 += w[2];
        s3 += w[3];
    }
    for (; i < bytes; ++i) s0 += p[i];
    return s0 + s1 + s2 + s3;
}

}  // namespace hk
