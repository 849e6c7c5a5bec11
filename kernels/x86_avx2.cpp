// AVX2 dot-product kernels (compiled with -mavx2 -mfma -mf16c; only called when cpuid says
// so). One weight row at a time against up to four activation rows, so each weight block
// is unpacked once per four activations (4-bit weights at batch 1: four rows against one);
// 4-bit weights in x86_q4_pairs.h, prefetching in x86_prefetch.h. Everything here has internal
// linkage: this unit must not emit inline code that another unit, built for plain x86-64, could
// link to.
#include "formats.h"

#if defined(HK_BUILD_AVX2)
#include <immintrin.h>

#include <cstring>

namespace hk {
namespace {

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline float load_half(const uint8_t *p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

inline __m256i q4_dot(__m256i acc, __m256i lo, __m256i a_lo, __m256i hi, __m256i a_hi) {
    // int16 pair sums of the two halves stay below 2 * 2 * 15 * 127: no saturation
    const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a_lo), _mm256_maddubs_epi16(hi, a_hi));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

#include "x86_prefetch.h"
#include "x86_quantize_act.h"
#include "x86_q4_pairs.h"

// Q8_0: signed x signed through maddubs, by moving the weight's sign onto the activation.
template <int NA>
void row_q8(const uint8_t *row, int64_t n_blocks, const ActQ8_0View &act, int64_t a, float *out, int64_t out_stride) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[NA];
    for (int k = 0; k < NA; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t *block = row + b * sizeof(BlockQ8_0);
        prefetch_l2(block + kPrefetchBytes, 1);  // the stream 8 KB on (x86_prefetch.h)
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(block + 2));
        const __m256i w_abs = _mm256_sign_epi8(w, w);
        const __m256 dw_vec = _mm256_set1_ps(load_half(block));
        for (int k = 0; k < NA; ++k) {
            const int64_t ab = (a + k) * act.n_blocks + b;
            const __m256i q8 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(act.qs + ab * QK));
            const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(q8, w)), ones);
            const __m256 scale = _mm256_mul_ps(dw_vec, _mm256_broadcast_ss(act.d + ab));
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[k]);
        }
    }
    for (int k = 0; k < NA; ++k) out[k * out_stride] = hsum(acc[k]);
}

void dot_q8_0(QType t, const DotArgs &args, const ActQ8_0View &act) {
    if (t != QType::Q8_0) {
        dot_q4_pairs(t, args, act);
        return;
    }
    prefetch_first_rows(args);
    for (int64_t r = args.r0; r < args.r1; ++r) {
        const uint8_t *row = args.w + r * args.row_bytes;
        float *out = args.out + r;
        int64_t a = args.a0;
        for (; a + 4 <= args.a1; a += 4) row_q8<4>(row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride);
        switch (args.a1 - a) {
            case 3: row_q8<3>(row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            case 2: row_q8<2>(row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            case 1: row_q8<1>(row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            default: break;
        }
    }
}

// Q2_K x Q8_K. A 256-element super-block is 8 chunks of 32 elements; chunk j reads
// bytes 32*(j/4).. of qs shifted by 2*(j%4), and spans groups 2j (first 16) and 2j+1.
// maddubs gives 16 int16 pair sums per chunk, madd with the group scales gives int32.
alignas(32) const uint8_t kScaleShuffle[8][32] = {
#define HK_PAIR(g) g, 0x80, g, 0x80, g, 0x80, g, 0x80, g, 0x80, g, 0x80, g, 0x80, g, 0x80
    {HK_PAIR(0), HK_PAIR(1)},   {HK_PAIR(2), HK_PAIR(3)},   {HK_PAIR(4), HK_PAIR(5)},   {HK_PAIR(6), HK_PAIR(7)},
    {HK_PAIR(8), HK_PAIR(9)},   {HK_PAIR(10), HK_PAIR(11)}, {HK_PAIR(12), HK_PAIR(13)}, {HK_PAIR(14), HK_PAIR(15)},
#undef HK_PAIR
};

template <int NA>
void row_q2_k(const BlockQ2_K *row, int64_t n_blocks, const ActQ8_KView &act, int64_t a, float *out, int64_t out_stride) {
    const __m256i two_bits = _mm256_set1_epi8(3);
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m256 acc[NA];
    for (int k = 0; k < NA; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t b = 0; b < n_blocks; ++b) {
        const BlockQ2_K &w = row[b];
        prefetch_l2(reinterpret_cast<const uint8_t *>(&w) + kPrefetchBytes, sizeof(BlockQ2_K));  // (x86_prefetch.h)
        const __m128i packed_scales = _mm_loadu_si128(reinterpret_cast<const __m128i *>(w.scales));
        const __m256i scales = _mm256_broadcastsi128_si256(_mm_and_si128(packed_scales, low4));
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed_scales, 4), low4));
        const __m256i q2[2] = {_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w.qs)),
                               _mm256_loadu_si256(reinterpret_cast<const __m256i *>(w.qs + 32))};
        __m256i isum[NA];
        for (int k = 0; k < NA; ++k) isum[k] = _mm256_setzero_si256();
        for (int j = 0; j < 8; ++j) {
            const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(q2[j / 4], 2 * (j % 4)), two_bits);
            const __m256i group_scale =
                _mm256_shuffle_epi8(scales, _mm256_load_si256(reinterpret_cast<const __m256i *>(kScaleShuffle[j])));
            for (int k = 0; k < NA; ++k) {
                const BlockQ8_K &q8 = act.blocks[(a + k) * act.n_blocks + b];
                const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q8.qs + 32 * j));
                isum[k] = _mm256_add_epi32(isum[k], _mm256_madd_epi16(_mm256_maddubs_epi16(codes, av), group_scale));
            }
        }
        const float d = _cvtsh_ss(w.d), dmin = _cvtsh_ss(w.dmin);
        for (int k = 0; k < NA; ++k) {
            const BlockQ8_K &q8 = act.blocks[(a + k) * act.n_blocks + b];
            const __m256i bsums = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q8.bsums));
            const __m256i min_dot = _mm256_madd_epi16(mins, bsums);
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[k]), _mm256_set1_ps(q8.d * d), acc[k]);
            acc[k] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(min_dot), _mm256_set1_ps(q8.d * dmin), acc[k]);
        }
    }
    for (int k = 0; k < NA; ++k) out[k * out_stride] = hsum(acc[k]);
}

void dot_q2_k(const DotArgs &args, const ActQ8_KView &act) {
    for (int64_t r = args.r0; r < args.r1; ++r) {
        const BlockQ2_K *row = reinterpret_cast<const BlockQ2_K *>(args.w + r * args.row_bytes);
        int64_t a = args.a0;
        float *out = args.out + r;
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

const IsaKernels *avx2_kernels() {
    static const IsaKernels table = {"avx2", dot_q8_0, dot_q2_k, 2, quantize_act_q8_0_avx2};
    return &table;
}

}  // namespace hk

#else
namespace hk {
const IsaKernels *avx2_kernels() { return nullptr; }
}  // namespace hk
#endif
