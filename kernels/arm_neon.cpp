// AArch64 NEON dot-product kernels using the signed int8 dot instruction (sdot, Armv8.2
// dotprod), so weight codes are recentred to signed in-register and no correction lanes
// are needed. Built only on AArch64 (with +dotprod); picked at run time when the CPU
// reports the dotprod feature, otherwise the scalar path runs.
#include "formats.h"

#if defined(HK_BUILD_NEON)
#include <arm_neon.h>

#include <cstring>

namespace hk {
namespace {

inline float load_scale(const uint8_t *p, bool float_scale) {
    if (float_scale) {
        float f;
        std::memcpy(&f, p, 4);
        return f;
    }
    uint16_t h;
    std::memcpy(&h, p, 2);
    return half_to_float(h);  // not inline: defined in ref.cpp
}

template <int NA>
void row_q8_0_family(QType t, const uint8_t *row, int64_t n_blocks, const ActQ8_0View &act, int64_t a, float *out,
                     int64_t out_stride) {
    const bool float_scale = t == QType::INT4;
    const int bb = block_bytes(t);
    const int scale_bytes = float_scale ? 4 : 2;
    float32x4_t acc[NA];
    for (int k = 0; k < NA; ++k) acc[k] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < n_blocks; ++b) {
        const uint8_t *block = row + b * bb;
        int8x16_t w_lo, w_hi;  // elements 0..15 and 16..31
        float dw;
        if (t == QType::Q8_0) {
            dw = load_scale(block, false);
            w_lo = vld1q_s8(reinterpret_cast<const int8_t *>(block + 2));
            w_hi = vld1q_s8(reinterpret_cast<const int8_t *>(block + 18));
        } else {
            dw = load_scale(block, float_scale);
            const uint8x16_t packed = vld1q_u8(block + scale_bytes);
            const int8x16_t eight = vdupq_n_s8(8);
            w_lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(packed, vdupq_n_u8(0x0F))), eight);
            w_hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(packed, 4)), eight);
        }
        for (int k = 0; k < NA; ++k) {
            const int64_t ab = (a + k) * act.n_blocks + b;
            const int8_t *q8 = act.qs + ab * QK;
            int32x4_t dot = vdotq_s32(vdupq_n_s32(0), w_lo, vld1q_s8(q8));
            dot = vdotq_s32(dot, w_hi, vld1q_s8(q8 + 16));
            acc[k] = vfmaq_n_f32(acc[k], vcvtq_f32_s32(dot), dw * act.d[ab]);
        }
    }
    for (int k = 0; k < NA; ++k) out[k * out_stride] = vaddvq_f32(acc[k]);
}

void dot_q8_0(QType t, const DotArgs &args, const ActQ8_0View &act) {
    for (int64_t r = args.r0; r < args.r1; ++r) {
        const uint8_t *row = args.w + r * args.row_bytes;
        float *out = args.out + r;
        int64_t a = args.a0;
        for (; a + 4 <= args.a1; a += 4) row_q8_0_family<4>(t, row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride);
        for (; a < args.a1; ++a) row_q8_0_family<1>(t, row, args.n_blocks, act, a, out + a * args.out_stride, args.out_stride);
    }
}

void dot_q2_k(const DotArgs &args, const ActQ8_KView &act) {
    const uint8x16_t two_bits = vdupq_n_u8(3);
    for (int64_t r = args.r0; r < args.r1; ++r) {
        const BlockQ2_K *row = reinterpret_cast<const BlockQ2_K *>(args.w + r * args.row_bytes);
        for (int64_t a = args.a0; a < args.a1; ++a) {
            float32x4_t acc = vdupq_n_f32(0.0f);
            float acc_min = 0.0f;
            for (int64_t b = 0; b < args.n_blocks; ++b) {
                const BlockQ2_K &w = row[b];
                const BlockQ8_K &q8 = act.blocks[a * act.n_blocks + b];
                int32x4_t isum = vdupq_n_s32(0);
                for (int j = 0; j < 8; ++j) {  // 32-element chunk j = groups 2j, 2j+1
                    const uint8_t *qs = w.qs + 32 * (j / 4);
                    const int shift = 2 * (j % 4);
                    const uint8x16_t raw_lo = vld1q_u8(qs), raw_hi = vld1q_u8(qs + 16);
                    const int8x16_t c_lo = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(raw_lo, vdupq_n_s8(-shift)), two_bits));
                    const int8x16_t c_hi = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(raw_hi, vdupq_n_s8(-shift)), two_bits));
                    const int32x4_t d_lo = vdotq_s32(vdupq_n_s32(0), c_lo, vld1q_s8(q8.qs + 32 * j));
                    const int32x4_t d_hi = vdotq_s32(vdupq_n_s32(0), c_hi, vld1q_s8(q8.qs + 32 * j + 16));
                    isum = vmlaq_n_s32(isum, d_lo, w.scales[2 * j] & 0xF);
                    isum = vmlaq_n_s32(isum, d_hi, w.scales[2 * j + 1] & 0xF);
                }
                int32_t mins = 0;
                for (int g = 0; g < 16; ++g) mins += (w.scales[g] >> 4) * q8.bsums[g];
                acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), q8.d * half_to_float(w.d));
                acc_min += q8.d * half_to_float(w.dmin) * static_cast<float>(mins);
            }
            args.out[a * args.out_stride + r] = vaddvq_f32(acc) - acc_min;
        }
    }
}

}  // namespace

const IsaKernels *neon_kernels() {
    static const IsaKernels table = {"neon", dot_q8_0, dot_q2_k, 0, quantize_act_row_q8_0};
    return &table;
}

}  // namespace hk

#else
namespace hk {
const IsaKernels *neon_kernels() { return nullptr; }
}  // namespace hk
#endif
