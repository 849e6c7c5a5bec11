// AVX-512 (F/BW/VL) dot-product kernels, two 32-element blocks per 512-bit register.
// Built twice: as itself (no VNNI: maddubs + madd) and through x86_avx512_vnni.cpp with
// HK_VNNI=1 (vpdpbusd / vpdpwssd), each with its own target flags; cpuid picks one.
// Weights enter the u8 x s8 dot as unsigned codes: Q4 nibbles, four blocks per 512-bit step
// (the -8 * activation sum comes from ActQ8_0View::corr and seeds the accumulator; the
// activations are interleaved in groups of four blocks), Q8_0 as |w| with w's sign moved onto
// the activation, so every 4-element integer lane is exact. 512-bit steps for the 4-bit
// weights: the 256-bit pair kernel (x86_q4_pairs.h, still AVX2's) was bound by loads and
// scale shuffles per 64 elements; here one word permute gathers four blocks' codes and one
// their scales, and a matvec unpacks four weight rows against one activation load (2.1-2.4x
// faster on 768-wide matrices that sit in L2, Zen 5).
// Internal linkage throughout (see x86_avx2.cpp for why).
#include "formats.h"

#ifndef HK_VNNI
#define HK_VNNI 0
#endif

#if defined(HK_BUILD_AVX512)
#include <immintrin.h>

#include <cstring>

namespace hk {
namespace {

#include "x86_prefetch.h"
#include "x86_quantize_act.h"

inline __m512i dot_u8s8(__m512i acc, __m512i u, __m512i s) {
#if HK_VNNI
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if HK_VNNI
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline __m512i dot_s16(__m512i acc, __m512i a, __m512i b) {
#if HK_VNNI
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float load_scale(const uint8_t *p, bool float_scale) {
    if (float_scale) {
        float f;
        std::memcpy(&f, p, 4);
        return f;
    }
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

inline __m512i q4_dot(__m512i acc, __m512i lo, __m512i a_lo, __m512i hi, __m512i a_hi) {
#if HK_VNNI
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, lo, a_lo), hi, a_hi);
#else
    // int16 pair sums of the two halves stay below 2 * 2 * 15 * 127: no saturation
    const __m512i pairs = _mm512_add_epi16(_mm512_maddubs_epi16(lo, a_lo), _mm512_maddubs_epi16(hi, a_hi));
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
#endif
}

// ---- 4-bit weights (INT4, Q4_0): four blocks per 512-bit step --------------------------
// The activations of a group of four blocks arrive interleaved (ActQ8_0View, q4_group 4):
// [a0[0:16], a1[0:16], a2[0:16], a3[0:16], a0[16:32], ..., a3[16:32]], so the packed nibbles
// of the four blocks, side by side in one register, unpack with one AND (low nibbles:
// elements 0..15, against the first 64 activation bytes) and one shift (high nibbles). The
// four blocks' codes and scales are gathered from the 72 (Q4_0) or 80 (INT4) bytes of the
// group by two loads inside the group and a word permute (vpermt2w), so a row is read once
// and never past its end. int32 lane l covers block l / 4; its -8 * activation-sum offset comes
// precomputed (ActQ8_0View::corr) and seeds the dot. Several weight rows per step share the
// activation loads (a matvec is otherwise load- and permute-bound on one row).
template <bool FLOAT_SCALE>
struct Q4Quad {
    static constexpr int bb = FLOAT_SCALE ? 20 : 18;   // block bytes
    static constexpr int sb = FLOAT_SCALE ? 4 : 2;     // scale bytes at the start of a block
    static constexpr int second = 4 * bb - 64;         // offset of the second load: ends at the group's end
    __m512i code_index, scale_index;
    Q4Quad() {
        alignas(64) int16_t idx[32];
        // word w of the packed codes: block w / 8, bytes 2 * (w % 8) .. + 1 of its 16 code bytes
        for (int w = 0; w < 32; ++w) {
            const int byte = (w / 8) * bb + sb + 2 * (w % 8);
            idx[w] = static_cast<int16_t>(byte < 64 ? byte / 2 : 32 + (byte - second) / 2);
        }
        code_index = _mm512_load_si512(idx);
        alignas(64) int32_t sidx[16];
        for (int l = 0; l < 16; ++l) sidx[l] = 0;
        if (FLOAT_SCALE) {
            for (int j = 0; j < 4; ++j) sidx[j] = j * bb / 4;  // dword of block j's float scale
        } else {
            alignas(64) int16_t hidx[32] = {};
            for (int j = 0; j < 4; ++j) hidx[j] = static_cast<int16_t>(j * bb / 2);  // word of block j's fp16 scale
            std::memcpy(sidx, hidx, sizeof(hidx));
        }
        scale_index = _mm512_load_si512(sidx);
    }
    // The group's 64 code bytes in block order, and its four scales as floats.
    inline void load(const uint8_t *group, __m512i &codes, __m128 &scales) const {
        const __m512i first = _mm512_loadu_si512(group);
        const __m512i last = _mm512_loadu_si512(group + second);
        codes = _mm512_permutex2var_epi16(first, code_index, last);
        if (FLOAT_SCALE) scales = _mm512_castps512_ps128(_mm512_permutexvar_ps(scale_index, _mm512_castsi512_ps(first)));
        else scales = _mm_cvtph_ps(_mm512_castsi512_si128(_mm512_permutexvar_epi16(scale_index, first)));
    }
};

// One 32-element block in natural order (the last n_blocks % 4 blocks): w - 8 by the sign trick.
template <bool FLOAT_SCALE>
inline float q4_natural_block(const uint8_t *block, const int8_t *q8) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i *>(block + (FLOAT_SCALE ? 4 : 2)));
    const __m256i w = _mm256_sub_epi8(
        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F)), _mm256_set1_epi8(8));
    const __m256i prod = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w),
                                              _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(q8)), w));
    const __m256i dot = _mm256_madd_epi16(prod, _mm256_set1_epi16(1));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(dot), _mm256_extracti128_si256(dot, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return static_cast<float>(_mm_cvtsi128_si32(s)) * load_scale(block, FLOAT_SCALE);
}

// NR weight rows x NA activation rows.
template <int NR, int NA, bool FLOAT_SCALE>
void rows_q4_quads(const Q4Quad<FLOAT_SCALE> &quad, const uint8_t *w, int64_t row_bytes, int64_t n_blocks,
                   const ActQ8_0View &act, int64_t a, float *out, int64_t out_stride) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[NR][NA];
    for (int r = 0; r < NR; ++r)
        for (int k = 0; k < NA; ++k) acc[r][k] = _mm512_setzero_ps();
    const int64_t full = n_blocks & ~int64_t{3};
    const int64_t pf = prefetch_offset(NR * row_bytes);
    for (int64_t b = 0; b < full; b += 4) {
        __m512i lo[NR], hi[NR];
        __m128 dw[NR];
        for (int r = 0; r < NR; ++r)  // the same columns of the rows `pf` bytes on (x86_prefetch.h)
            prefetch_l2(w + r * row_bytes + b * quad.bb + pf, 128);
        for (int r = 0; r < NR; ++r) {
            __m512i codes;
            quad.load(w + r * row_bytes + b * quad.bb, codes, dw[r]);
            lo[r] = _mm512_and_si512(codes, low4);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(codes, 4), low4);
        }
        for (int k = 0; k < NA; ++k) {
            const int64_t ab = (a + k) * act.n_blocks + b;
            const __m512i a_lo = _mm512_loadu_si512(act.qs + ab * QK);
            const __m512i a_hi = _mm512_loadu_si512(act.qs + ab * QK + 64);
            const __m512i corr = _mm512_loadu_si512(act.corr + ab * 4);
            const __m128 da = _mm_loadu_ps(act.d + ab);
            for (int r = 0; r < NR; ++r) {
                const __m512i dot = q4_dot(corr, lo[r], a_lo, hi[r], a_hi);
                const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_mul_ps(dw[r], da)));
                acc[r][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][k]);
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int k = 0; k < NA; ++k) {
            float sum = _mm512_reduce_add_ps(acc[r][k]);
            for (int64_t b = full; b < n_blocks; ++b) {
                const int64_t ab = (a + k) * act.n_blocks + b;
                sum += q4_natural_block<FLOAT_SCALE>(w + r * row_bytes + b * quad.bb, act.qs + ab * QK) * act.d[ab];
            }
            out[r + k * out_stride] = sum;
        }
}

template <bool FLOAT_SCALE>
void dot_q4_quads_typed(const DotArgs &args, const ActQ8_0View &act) {
    static const Q4Quad<FLOAT_SCALE> quad;
    const int64_t rb = args.row_bytes;
    int64_t a = args.a0;
    // batch 1 (generation): four weight rows per step share one activation load
    if (args.a1 - a == 1) {
        prefetch_first_rows(args);
        int64_t r = args.r0;
        for (; r + 4 <= args.r1; r += 4)
            rows_q4_quads<4, 1>(quad, args.w + r * rb, rb, args.n_blocks, act, a, args.out + a * args.out_stride + r, args.out_stride);
        for (; r < args.r1; ++r)
            rows_q4_quads<1, 1>(quad, args.w + r * rb, rb, args.n_blocks, act, a, args.out + a * args.out_stride + r, args.out_stride);
        return;
    }
    for (int64_t r = args.r0; r < args.r1; ++r) {
        const uint8_t *row = args.w + r * rb;
        float *out = args.out + r;
        for (a = args.a0; a + 4 <= args.a1; a += 4)
            rows_q4_quads<1, 4>(quad, row, rb, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride);
        switch (args.a1 - a) {
            case 3: rows_q4_quads<1, 3>(quad, row, rb, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            case 2: rows_q4_quads<1, 2>(quad, row, rb, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            case 1: rows_q4_quads<1, 1>(quad, row, rb, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            default: break;
        }
    }
}

void dot_q4_quads(QType t, const DotArgs &args, const ActQ8_0View &act) {
    if (t == QType::INT4) dot_q4_quads_typed<true>(args, act);
    else dot_q4_quads_typed<false>(args, act);
}

inline __m512 pair_scale(float d0, float d1) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(d0))),
                                               _mm256_castps_pd(_mm256_set1_ps(d1)), 1));
}

// Scale lanes [s0 x 8, s1 x 8] from two floats in the low half of an xmm register.
inline __m512 spread_pair(__m128 pair) {
    return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(pair));
}

// The scales of two weight blocks as [d0, d1, 0, 0].
inline __m128 weight_scale_pair(const uint8_t *block0, const uint8_t *block1, bool float_scale) {
    if (float_scale) {
        float d0, d1;
        std::memcpy(&d0, block0, 4);
        std::memcpy(&d1, block1, 4);
        return _mm_setr_ps(d0, d1, 0.0f, 0.0f);
    }
    uint16_t h0, h1;
    std::memcpy(&h0, block0, 2);
    std::memcpy(&h1, block1, 2);
    return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(h0 | static_cast<uint32_t>(h1) << 16)));
}

// One pair of blocks (b, b+1) of one weight row against NA activation rows, into acc.
// 4-bit weights enter as unsigned nibbles with the -8 * sum correction seeding the dot;
// Q8_0 weights as |w| with w's sign moved onto the activation.
template <int NA>
inline void pair_q8_0_family(QType t, const uint8_t *row, int64_t b, const ActQ8_0View &act, int64_t a, __m512 *acc) {
    const bool float_scale = t == QType::INT4;
    const int bb = t == QType::INT4 ? 20 : (t == QType::Q4_0 ? 18 : 34);
    const uint8_t *block0 = row + b * bb;
    const uint8_t *block1 = block0 + bb;
    __m512i codes;
    __mmask64 negative = 0;
    if (t == QType::Q8_0) {
        const __m512i w = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(block0 + 2))),
            _mm256_loadu_si256(reinterpret_cast<const __m256i *>(block1 + 2)), 1);
        codes = _mm512_abs_epi8(w);
        negative = _mm512_movepi8_mask(w);
    } else {
        const int scale_bytes = float_scale ? 4 : 2;
        const __m512i pair_lanes = _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0);    // [q0, q0, q1, q1]
        const __m512i nibble_shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);  // -> [lo0, hi0, lo1, hi1]
        const __m256i both = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(block0 + scale_bytes))),
            _mm_loadu_si128(reinterpret_cast<const __m128i *>(block1 + scale_bytes)), 1);
        codes = _mm512_and_si512(
            _mm512_srlv_epi64(_mm512_permutexvar_epi64(pair_lanes, _mm512_castsi256_si512(both)), nibble_shift),
            _mm512_set1_epi8(0x0F));
    }
    const __m128 dw = weight_scale_pair(block0, block1, float_scale);
    for (int k = 0; k < NA; ++k) {
        const int64_t ab = (a + k) * act.n_blocks + b;
        const __m512i q8 = _mm512_loadu_si512(act.qs + ab * QK);
        __m512i dot;
        if (t == QType::Q8_0) {
            dot = dot_u8s8(_mm512_setzero_si512(), codes, _mm512_mask_sub_epi8(q8, negative, _mm512_setzero_si512(), q8));
        } else {
            const __m512i corr = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(act.corr + ab * 8)));
            dot = dot_u8s8(corr, codes, q8);
        }
        const __m128 da = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double *>(act.d + ab)));
        acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), spread_pair(_mm_mul_ps(dw, da)), acc[k]);
    }
}

template <int NA>
void row_q8_0_family(QType t, const uint8_t *row, int64_t n_blocks, const ActQ8_0View &act, int64_t a, float *out,
                     int64_t out_stride) {
    // Two accumulator sets, alternating by pair: the FMA latency chain is halved.
    __m512 acc0[NA], acc1[NA];
    __m256 tail[NA];
    for (int k = 0; k < NA; ++k) {
        acc0[k] = _mm512_setzero_ps();
        acc1[k] = _mm512_setzero_ps();
        tail[k] = _mm256_setzero_ps();
    }
    const int bb = t == QType::INT4 ? 20 : (t == QType::Q4_0 ? 18 : 34);
    int64_t b = 0;
    for (; b + 4 <= n_blocks; b += 4) {
        prefetch_l2(row + b * bb + kPrefetchBytes, 4 * bb);  // the stream 8 KB on (x86_prefetch.h)
        pair_q8_0_family<NA>(t, row, b, act, a, acc0);
        pair_q8_0_family<NA>(t, row, b + 2, act, a, acc1);
    }
    if (b + 2 <= n_blocks) {
        pair_q8_0_family<NA>(t, row, b, act, a, acc0);
        b += 2;
    }
    if (b < n_blocks) {  // odd block count: one 256-bit block
        const uint8_t *block = row + b * block_bytes(t);
        __m256i codes, sign_source = _mm256_setzero_si256();
        if (t == QType::Q8_0) {
            sign_source = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(block + 2));
            codes = _mm256_sign_epi8(sign_source, sign_source);
        } else {
            const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i *>(block + (t == QType::INT4 ? 4 : 2)));
            codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
        }
        const float dw = load_scale(block, t == QType::INT4);
        for (int k = 0; k < NA; ++k) {
            const int64_t ab = (a + k) * act.n_blocks + b;
            const __m256i q8 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(act.qs + ab * QK));
            __m256i dot;
            if (t == QType::Q8_0) {
                dot = dot_u8s8(_mm256_setzero_si256(), codes, _mm256_sign_epi8(q8, sign_source));
            } else {
                const __m256i corr = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(act.corr + ab * 8)));
                dot = dot_u8s8(corr, codes, q8);
            }
            tail[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * act.d[ab]), tail[k]);
        }
    }
    for (int k = 0; k < NA; ++k) out[k * out_stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[k], acc1[k])) + hsum(tail[k]);
}

void dot_q8_0(QType t, const DotArgs &args, const ActQ8_0View &act) {
    if (t != QType::Q8_0) {
        dot_q4_quads(t, args, act);
        return;
    }
    prefetch_first_rows(args);
    for (int64_t r = args.r0; r < args.r1; ++r) {
        const uint8_t *row = args.w + r * args.row_bytes;
        float *out = args.out + r;
        int64_t a = args.a0;
        for (; a + 4 <= args.a1; a += 4) row_q8_0_family<4>(t, row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride);
        switch (args.a1 - a) {
            case 3: row_q8_0_family<3>(t, row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            case 2: row_q8_0_family<2>(t, row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            case 1: row_q8_0_family<1>(t, row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            default: break;
        }
    }
}

// Q2_K x Q8_K, 64 elements (two 32-element chunks sharing qs bytes, shifts s and s+2) per
// step. Each 128-bit lane of a step holds one group of 16 codes, so the group's scale enters as
// a byte lookup (vpshufb, AVX-512 BW) of code -> code * scale from a per-lane table: lane g of
// the block's table holds [0, s, 2s, 3s] of the groups g, 4 + g, 8 + g and 12 + g in its four
// dwords, and step p looks up dword p by indexing with code | 4p. code * scale <= 45, so the
// scaled codes stay unsigned bytes and one u8 x s8 dot (vpdpbusd) takes the place of maddubs,
// a word permute of the scales and a word dot per step.
template <int NA>
void row_q2_k(const BlockQ2_K *row, int64_t n_blocks, const ActQ8_KView &act, int64_t a, float *out, int64_t out_stride) {
    const __m512i two_bits = _mm512_set1_epi8(3);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m512i multiples = _mm512_set1_epi32(0x03020100);  // bytes [0, 1, 2, 3] * s, s <= 15
    alignas(64) int16_t shift_lanes[2][32];
    for (int l = 0; l < 32; ++l) {
        shift_lanes[0][l] = static_cast<int16_t>(l < 16 ? 0 : 2);
        shift_lanes[1][l] = static_cast<int16_t>(l < 16 ? 4 : 6);
    }
    const __m512i shifts[2] = {_mm512_load_si512(shift_lanes[0]), _mm512_load_si512(shift_lanes[1])};
    // table dword 4g + p <- group 4p + g: a 4 x 4 transpose of the 16 scale bytes
    const __m128i transpose = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m512 acc[NA];
    __m256 acc_min[NA];
    for (int k = 0; k < NA; ++k) {
        acc[k] = _mm512_setzero_ps();
        acc_min[k] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < n_blocks; ++b) {
        const BlockQ2_K &w = row[b];
        prefetch_l2(reinterpret_cast<const uint8_t *>(&w) + kPrefetchBytes, sizeof(BlockQ2_K));  // (x86_prefetch.h)
        const __m128i packed_scales = _mm_loadu_si128(reinterpret_cast<const __m128i *>(w.scales));
        const __m128i scales = _mm_shuffle_epi8(_mm_and_si128(packed_scales, low4), transpose);
        const __m512i table = _mm512_mullo_epi32(_mm512_cvtepu8_epi32(scales), multiples);
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed_scales, 4), low4));
        __m512i isum[NA];
        for (int k = 0; k < NA; ++k) isum[k] = _mm512_setzero_si512();
        for (int half = 0; half < 2; ++half) {
            const __m512i q2 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w.qs + 32 * half)));
            for (int s = 0; s < 2; ++s) {
                const int p = 2 * half + s;
                // (q2 >> shift) & 3 | 4p in one ternary-logic op: A & B | C = 0xEA
                const __m512i index = _mm512_ternarylogic_epi32(_mm512_srlv_epi16(q2, shifts[s]), two_bits,
                                                                _mm512_set1_epi8(static_cast<char>(4 * p)), 0xEA);
                const __m512i scaled = _mm512_shuffle_epi8(table, index);
                for (int k = 0; k < NA; ++k) {
                    const BlockQ8_K &q8 = act.blocks[(a + k) * act.n_blocks + b];
                    isum[k] = dot_u8s8(isum[k], scaled, _mm512_loadu_si512(q8.qs + 64 * p));
                }
            }
        }
        // d and dmin side by side (the block's last four bytes) into floats at once
        int32_t d_pair;
        std::memcpy(&d_pair, &w.d, 4);
        const __m128 d_both = _mm_cvtph_ps(_mm_cvtsi32_si128(d_pair));
        for (int k = 0; k < NA; ++k) {
            const BlockQ8_K &q8 = act.blocks[(a + k) * act.n_blocks + b];
            const __m128 scale = _mm_mul_ps(d_both, _mm_set1_ps(q8.d));  // [q8.d * d, q8.d * dmin, ...]
            const __m256i min_dot = _mm256_madd_epi16(mins, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q8.bsums)));
            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[k]), _mm512_broadcastss_ps(scale), acc[k]);
            acc_min[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min_dot), _mm256_broadcastss_ps(_mm_movehdup_ps(scale)), acc_min[k]);
        }
    }
    for (int k = 0; k < NA; ++k) out[k * out_stride] = _mm512_reduce_add_ps(acc[k]) - hsum(acc_min[k]);
}

void dot_q2_k(const DotArgs &args, const ActQ8_KView &act) {
    for (int64_t r = args.r0; r < args.r1; ++r) {
        const BlockQ2_K *row = reinterpret_cast<const BlockQ2_K *>(args.w + r * args.row_bytes);
        float *out = args.out + r;
        int64_t a = args.a0;
        for (; a + 4 <= args.a1; a += 4) row_q2_k<4>(row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride);
        switch (args.a1 - a) {
            case 3: row_q2_k<3>(row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            case 2: row_q2_k<2>(row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            case 1: row_q2_k<1>(row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            default: break;
        }
    }
}

}  // namespace

#if HK_VNNI
const IsaKernels *avx512_vnni_kernels() {
    static const IsaKernels table = {"avx512", dot_q8_0, dot_q2_k, 4, quantize_act_q8_0_avx2};
    return &table;
}
#else
const IsaKernels *avx512_kernels() {
    static const IsaKernels table = {"avx512_novnni", dot_q8_0, dot_q2_k, 4, quantize_act_q8_0_avx2};
    return &table;
}
#endif

}  // namespace hk

#else
namespace hk {
#if HK_VNNI
const IsaKernels *avx512_vnni_kernels() { return nullptr; }
#else
const IsaKernels *avx512_kernels() { return nullptr; }
#endif
}  // namespace hk
#endif
