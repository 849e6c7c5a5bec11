// 4-bit weights (INT4, Q4_0) x Q8_0 activations, two blocks per 256-bit step, included
// by x86_avx2.cpp inside its anonymous namespace (built with its own flags; the AVX-512
// units have their own four-block kernel). The activations of a block pair arrive
// interleaved as [a0[0:16], a1[0:16], a0[16:32], a1[16:32]] (ActQ8_0View, pair layout),
// so the packed nibbles of both blocks unpack with one AND and one shift, no shuffles:
// low nibbles (elements 0..15 of each block) meet the first 32 bytes, high nibbles the
// second. Lane l of the int32 result holds elements 4l..4l+3 and 16+4l..16+4l+3 of
// block l/4; the -8 * sum correction per lane comes precomputed (ActQ8_0View::corr).
// The including unit defines q4_dot(acc, lo, a_lo, hi, a_hi) -> acc + lane sums.

// A block pair's codes (low and high nibbles, each block's 16 bytes in one 128-bit lane) and its
// two scales as [d0, d1, 0, 0].
template <bool FLOAT_SCALE>
inline void q4_pair(const uint8_t *block0, __m256i &lo, __m256i &hi, __m128 &dw) {
    const int bb = FLOAT_SCALE ? 20 : 18;
    const int scale_bytes = FLOAT_SCALE ? 4 : 2;
    const uint8_t *block1 = block0 + bb;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i packed = _mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(block0 + scale_bytes))),
        _mm_loadu_si128(reinterpret_cast<const __m128i *>(block1 + scale_bytes)), 1);
    lo = _mm256_and_si256(packed, low4);
    hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low4);
    if (FLOAT_SCALE) {
        float d0, d1;
        std::memcpy(&d0, block0, 4);
        std::memcpy(&d1, block1, 4);
        dw = _mm_setr_ps(d0, d1, 0.0f, 0.0f);
    } else {
        uint16_t h0, h1;
        std::memcpy(&h0, block0, 2);
        std::memcpy(&h1, block1, 2);
        dw = _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(h0 | static_cast<uint32_t>(h1) << 16)));
    }
}

template <int NA, bool FLOAT_SCALE>
void row_q4_pairs(const uint8_t *row, int64_t n_blocks, const ActQ8_0View &act, int64_t a, float *out,
                  int64_t out_stride) {
    const int bb = FLOAT_SCALE ? 20 : 18;
    const int scale_bytes = FLOAT_SCALE ? 4 : 2;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256 acc0[NA], acc1[NA];
    for (int k = 0; k < NA; ++k) acc0[k] = acc1[k] = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= n_blocks; b += 2) {
        __m256i lo, hi;
        __m128 dw;
        q4_pair<FLOAT_SCALE>(row + b * bb, lo, hi, dw);
        for (int k = 0; k < NA; ++k) {
            const int64_t ab = (a + k) * act.n_blocks + b;
            const int8_t *q8 = act.qs + ab * QK;
            const __m256i dot = q4_dot(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(act.corr + ab * 4)), lo,
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q8)), hi,
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q8 + 32)));
            const __m128 da = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double *>(act.d + ab)));
            const __m256 scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_mul_ps(dw, da)), spread);
            // alternate accumulators by pair: two FMA chains instead of one
            __m256 &acc = (b & 2) ? acc1[k] : acc0[k];
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc);
        }
    }
    if (b < n_blocks) {  // odd block count: the last block is in natural order; w - 8 with the sign trick
        const uint8_t *block = row + b * bb;
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i *>(block + scale_bytes));
        const __m256i w = _mm256_sub_epi8(_mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low4),
                                          _mm256_set1_epi8(8));
        const __m256i w_abs = _mm256_sign_epi8(w, w);
        float dw;
        if (FLOAT_SCALE) {
            std::memcpy(&dw, block, 4);
        } else {
            uint16_t h;
            std::memcpy(&h, block, 2);
            dw = _cvtsh_ss(h);
        }
        for (int k = 0; k < NA; ++k) {
            const int64_t ab = (a + k) * act.n_blocks + b;
            const __m256i q8 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(act.qs + ab * QK));
            const __m256i prod = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(q8, w));
            const __m256i dot = _mm256_madd_epi16(prod, _mm256_set1_epi16(1));
            acc0[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * act.d[ab]), acc0[k]);
        }
    }
    for (int k = 0; k < NA; ++k) {
        const __m256 sum = _mm256_add_ps(acc0[k], acc1[k]);
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        out[k * out_stride] = _mm_cvtss_f32(s);
    }
}

// Batch 1 (generation): NR weight rows against the one activation row, sharing its loads (the
// activations, their corrections and scales) across the rows; one accumulator a row, NR chains.
template <int NR, bool FLOAT_SCALE>
void rows_q4_pairs_one(const uint8_t *w, int64_t row_bytes, int64_t n_blocks, const ActQ8_0View &act, int64_t a,
                       float *out) {
    const int bb = FLOAT_SCALE ? 20 : 18;
    const __m256i spread = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256 acc[NR];
    for (int r = 0; r < NR; ++r) acc[r] = _mm256_setzero_ps();
    const int64_t full = n_blocks & ~int64_t{1};
    // the same columns of the rows whole row groups on, as the AVX-512 quads do (x86_prefetch.h)
    const int64_t pf = prefetch_offset(NR * row_bytes);
    for (int64_t b = 0; b < full; b += 2) {
        for (int r = 0; r < NR; ++r) prefetch_l2(w + r * row_bytes + b * bb + pf, 1);
        const int64_t ab = a * act.n_blocks + b;
        const int8_t *q8 = act.qs + ab * QK;
        const __m256i a_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q8));
        const __m256i a_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q8 + 32));
        const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(act.corr + ab * 4));
        const __m128 da = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double *>(act.d + ab)));
        for (int r = 0; r < NR; ++r) {
            __m256i lo, hi;
            __m128 dw;
            q4_pair<FLOAT_SCALE>(w + r * row_bytes + b * bb, lo, hi, dw);
            const __m256i dot = q4_dot(corr, lo, a_lo, hi, a_hi);
            const __m256 scale = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_mul_ps(dw, da)), spread);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
        }
    }
    for (int r = 0; r < NR; ++r) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        float sum = _mm_cvtss_f32(s);
        if (full < n_blocks) {  // odd block count: the last block (natural order) through the one-row kernel's tail
            float tail;
            row_q4_pairs<1, FLOAT_SCALE>(w + r * row_bytes + full * bb, 1, ActQ8_0View{act.qs + (a * act.n_blocks + full) * QK,
                                         act.d + a * act.n_blocks + full, act.corr, 1}, 0, &tail, 1);
            sum += tail;
        }
        out[r] = sum;
    }
}

template <int NA>
void row_q4_pairs_dispatch(QType t, const uint8_t *row, int64_t n_blocks, const ActQ8_0View &act, int64_t a,
                           float *out, int64_t out_stride) {
    if (t == QType::INT4) row_q4_pairs<NA, true>(row, n_blocks, act, a, out, out_stride);
    else row_q4_pairs<NA, false>(row, n_blocks, act, a, out, out_stride);
}

void dot_q4_pairs(QType t, const DotArgs &args, const ActQ8_0View &act) {
    prefetch_first_rows(args);  // x86_prefetch.h, included before this
    if (args.a1 - args.a0 == 1) {  // batch 1: four weight rows a step share the activation loads
        const int64_t rb = args.row_bytes, a = args.a0;
        float *out = args.out + a * args.out_stride;
        int64_t r = args.r0;
        for (; r + 4 <= args.r1; r += 4) {
            if (t == QType::INT4) rows_q4_pairs_one<4, true>(args.w + r * rb, rb, args.n_blocks, act, a, out + r);
            else rows_q4_pairs_one<4, false>(args.w + r * rb, rb, args.n_blocks, act, a, out + r);
        }
        for (; r < args.r1; ++r) {
            if (t == QType::INT4) rows_q4_pairs_one<1, true>(args.w + r * rb, rb, args.n_blocks, act, a, out + r);
            else rows_q4_pairs_one<1, false>(args.w + r * rb, rb, args.n_blocks, act, a, out + r);
        }
        return;
    }
    for (int64_t r = args.r0; r < args.r1; ++r) {
        const uint8_t *row = args.w + r * args.row_bytes;
        float *out = args.out + r;
        int64_t a = args.a0;
        for (; a + 4 <= args.a1; a += 4) row_q4_pairs_dispatch<4>(t, row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride);
        switch (args.a1 - a) {
            case 3: row_q4_pairs_dispatch<3>(t, row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            case 2: row_q4_pairs_dispatch<2>(t, row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            case 1: row_q4_pairs_dispatch<1>(t, row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride); break;
            default: break;
        }
    }
}
