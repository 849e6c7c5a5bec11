// Q8_0 activation blocks with AVX2 + F16C, shared by the x86 units. Included inside each unit's
// anonymous namespace (after <immintrin.h>), like x86_prefetch.h: every copy has internal
// linkage. Bit for bit quantize_act_row_q8_0 (ref.cpp): the same maximum (maxps keeps the
// running lane unless it is smaller, the scalar rule), the same scale and inverse, the same
// ties-away rounding (trunc, then the exact fraction against +-0.5), and the scale's fp16 round
// trip by F16C, which rounds to nearest even as float_to_half does. GCC 12 left the reference's
// maximum scalar, and a matvec's activations are quantized on the calling thread while the other
// threads wait: a 16 x 14,336 Q4_0 call took 23.4 us with the reference, 15.2 with this (Zen 4).
inline void quantize_act_q8_0_avx2(const float *x, int8_t *qs, float *d, int32_t *sums, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f), minus_half = _mm256_set1_ps(-0.5f);
    const __m256 one = _mm256_set1_ps(1.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
    for (int64_t b = 0; b < n / QK; ++b, x += QK, qs += QK) {
        __m256 v[4];
        __m256 lanes = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(x + 8 * i);
            lanes = _mm256_max_ps(lanes, _mm256_andnot_ps(sign, v[i]));
        }
        alignas(32) float lane_max[8];
        _mm256_store_ps(lane_max, lanes);
        float amax = 0.0f;
        for (int l = 0; l < 8; ++l) amax = amax > lane_max[l] ? amax : lane_max[l];
        const float scale = amax / 127.0f;
        const float id = scale != 0.0f ? 1.0f / scale : 0.0f;
        const __m256 inv = _mm256_set1_ps(id);
        __m256i codes[4];
        __m256i total = _mm256_setzero_si256();
        for (int i = 0; i < 4; ++i) {
            const __m256 y = _mm256_mul_ps(v[i], inv);
            const __m256 whole = _mm256_round_ps(y, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __m256 frac = _mm256_sub_ps(y, whole);
            const __m256 up = _mm256_and_ps(_mm256_cmp_ps(frac, half, _CMP_GE_OQ), one);
            const __m256 down = _mm256_and_ps(_mm256_cmp_ps(frac, minus_half, _CMP_LE_OQ), one);
            codes[i] = _mm256_cvttps_epi32(_mm256_sub_ps(_mm256_add_ps(whole, up), down));
            total = _mm256_add_epi32(total, codes[i]);
        }
        const __m256i words = _mm256_packs_epi32(codes[0], codes[1]), words_hi = _mm256_packs_epi32(codes[2], codes[3]);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(words, words_hi), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i *>(qs), bytes);
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
        sums[b] = _mm_cvtsi128_si32(s);
        d[b] = _cvtsh_ss(_cvtss_sh(scale, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}
