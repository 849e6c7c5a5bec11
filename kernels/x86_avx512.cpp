// AVX-512 (F/BW/VL) dot-product kernels, two 32-element blocks per 512-bit register.
// Built twice: as itself (no VNNI: maddubs + madd) and through x86_avx512_vnni.cpp with
// HK_VNNI=1 (vpdpbusd / vpdpwssd), each with its own target flags; cpuid picks one.
// Weights enter the u8 x s8 dot as unsigned codes (Q4 nibbles, Q8_0 code + 128 with VNNI);
// the offset times the activation sum is pre-subtracted via ActQ8_0View::corr, which
// seeds the accumulator, so every per-block integer sum is exact.
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

inline __m512 pair_scale(float d0, float d1) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(d0))),
                                               _mm256_castps_pd(_mm256_set1_ps(d1)), 1));
}

// Weight codes of one block as 32 unsigned bytes (elements 0..31), for the odd tail block.
inline __m256i codes_256(QType t, const uint8_t *block) {
    if (t == QType::Q8_0) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(block + 2));
#if HK_VNNI
        return _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
#else
        return w;  // signed; the caller uses the sign trick
#endif
    }
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i *>(block + (t == QType::INT4 ? 4 : 2)));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
}

template <int NA>
void row_q8_0_family(QType t, const uint8_t *row, int64_t n_blocks, const ActQ8_0View &act, int64_t a, float *out,
                     int64_t out_stride) {
    const bool float_scale = t == QType::INT4;
    const int bb = block_bytes(t);
    const int scale_bytes = float_scale ? 4 : 2;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i pair_lanes = _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0);  // [q0, q0, q1, q1]
    const __m512i nibble_shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);  // -> [lo0, hi0, lo1, hi1]
    __m512 acc[NA];
    __m256 tail[NA];
    for (int k = 0; k < NA; ++k) {
        acc[k] = _mm512_setzero_ps();
        tail[k] = _mm256_setzero_ps();
    }
    const int64_t stride = act.n_blocks;
    int64_t b = 0;
    for (; b + 2 <= n_blocks; b += 2) {
        const uint8_t *block0 = row + b * bb;
        const uint8_t *block1 = block0 + bb;
        __m512i codes;
        if (t == QType::Q8_0) {
            codes = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(block0 + 2))),
                _mm256_loadu_si256(reinterpret_cast<const __m256i *>(block1 + 2)), 1);
#if HK_VNNI
            codes = _mm512_xor_si512(codes, _mm512_set1_epi8(static_cast<char>(0x80)));
#endif
        } else {
            const __m256i both = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(block0 + scale_bytes))),
                _mm_loadu_si128(reinterpret_cast<const __m128i *>(block1 + scale_bytes)), 1);
            codes = _mm512_and_si512(
                _mm512_srlv_epi64(_mm512_permutexvar_epi64(pair_lanes, _mm512_castsi256_si512(both)), nibble_shift), low4);
        }
        const __m512 dw = pair_scale(load_scale(block0, float_scale), load_scale(block1, float_scale));
#if !HK_VNNI
        __m512i codes_abs = codes;
        __mmask64 negative = 0;
        if (t == QType::Q8_0) {
            codes_abs = _mm512_abs_epi8(codes);
            negative = _mm512_movepi8_mask(codes);
        }
#endif
        for (int k = 0; k < NA; ++k) {
            const int64_t ab = (a + k) * stride + b;
            const __m512i q8 = _mm512_loadu_si512(act.qs + ab * QK);
            __m512i dot;
#if HK_VNNI
            dot = dot_u8s8(_mm512_loadu_si512(act.corr + ab * 8), codes, q8);
#else
            if (t == QType::Q8_0) {
                const __m512i signed_q8 = _mm512_mask_sub_epi8(q8, negative, _mm512_setzero_si512(), q8);
                dot = dot_u8s8(_mm512_setzero_si512(), codes_abs, signed_q8);
            } else {
                dot = dot_u8s8(_mm512_loadu_si512(act.corr + ab * 8), codes, q8);
            }
#endif
            const __m512 scale = _mm512_mul_ps(dw, _mm512_loadu_ps(act.d_lanes + ab * 8));
            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[k]);
        }
    }
    if (b < n_blocks) {  // odd block count: one 256-bit block
        const uint8_t *block = row + b * bb;
        const __m256i codes = codes_256(t, block);
        const __m256 dw = _mm256_set1_ps(load_scale(block, float_scale));
        for (int k = 0; k < NA; ++k) {
            const int64_t ab = (a + k) * stride + b;
            const __m256i q8 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(act.qs + ab * QK));
            const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(act.corr + ab * 8));
            __m256i dot;
#if HK_VNNI
            dot = dot_u8s8(corr, codes, q8);
#else
            if (t == QType::Q8_0) dot = dot_u8s8(_mm256_setzero_si256(), _mm256_sign_epi8(codes, codes), _mm256_sign_epi8(q8, codes));
            else dot = dot_u8s8(corr, codes, q8);
#endif
            tail[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw, _mm256_broadcast_ss(act.d + ab)), tail[k]);
        }
    }
    for (int k = 0; k < NA; ++k) out[k * out_stride] = _mm512_reduce_add_ps(acc[k]) + hsum(tail[k]);
}

void dot_q8_0(QType t, const DotArgs &args, const ActQ8_0View &act) {
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

// Q2_K x Q8_K, 64 elements (two 32-element chunks sharing qs bytes, shifts s and s+2)
// per step; maddubs gives int16 pair sums, then a dot with the int16 group scales.
template <int NA>
void row_q2_k(const BlockQ2_K *row, int64_t n_blocks, const ActQ8_KView &act, int64_t a, float *out, int64_t out_stride) {
    const __m512i two_bits = _mm512_set1_epi8(3);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    // step p covers chunks 2p, 2p+1 = groups 4p..4p+3, 8 int16 lanes each
    __m512i group_index[4];
    for (int p = 0; p < 4; ++p) {
        alignas(64) int16_t idx[32];
        for (int l = 0; l < 32; ++l) idx[l] = static_cast<int16_t>(4 * p + l / 8);
        group_index[p] = _mm512_load_si512(idx);
    }
    alignas(64) int16_t shift_lanes[2][32];
    for (int l = 0; l < 32; ++l) {
        shift_lanes[0][l] = static_cast<int16_t>(l < 16 ? 0 : 2);
        shift_lanes[1][l] = static_cast<int16_t>(l < 16 ? 4 : 6);
    }
    const __m512i shifts[2] = {_mm512_load_si512(shift_lanes[0]), _mm512_load_si512(shift_lanes[1])};
    __m512 acc[NA];
    __m256 acc_min[NA];
    for (int k = 0; k < NA; ++k) {
        acc[k] = _mm512_setzero_ps();
        acc_min[k] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < n_blocks; ++b) {
        const BlockQ2_K &w = row[b];
        const __m128i packed_scales = _mm_loadu_si128(reinterpret_cast<const __m128i *>(w.scales));
        const __m512i scales = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_and_si128(packed_scales, low4)));
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed_scales, 4), low4));
        __m512i isum[NA];
        for (int k = 0; k < NA; ++k) isum[k] = _mm512_setzero_si512();
        for (int p = 0; p < 4; ++p) {
            const __m512i q2 = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w.qs + 32 * (p / 2))));
            const __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(q2, shifts[p % 2]), two_bits);
            const __m512i group_scale = _mm512_permutexvar_epi16(group_index[p], scales);
            for (int k = 0; k < NA; ++k) {
                const BlockQ8_K &q8 = act.blocks[(a + k) * act.n_blocks + b];
                const __m512i av = _mm512_loadu_si512(q8.qs + 64 * p);
                isum[k] = dot_s16(isum[k], _mm512_maddubs_epi16(codes, av), group_scale);
            }
        }
        const float d = _cvtsh_ss(w.d), dmin = _cvtsh_ss(w.dmin);
        for (int k = 0; k < NA; ++k) {
            const BlockQ8_K &q8 = act.blocks[(a + k) * act.n_blocks + b];
            const __m256i min_dot = _mm256_madd_epi16(mins, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q8.bsums)));
            acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[k]), _mm512_set1_ps(q8.d * d), acc[k]);
            acc_min[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(min_dot), _mm256_set1_ps(q8.d * dmin), acc_min[k]);
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
    static const IsaKernels table = {"avx512", dot_q8_0, dot_q2_k, {8, 8, 128, 0}};
    return &table;
}
#else
const IsaKernels *avx512_kernels() {
    static const IsaKernels table = {"avx512_novnni", dot_q8_0, dot_q2_k, {8, 8, 0, 0}};
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
