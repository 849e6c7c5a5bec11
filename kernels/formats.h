// Block layouts of the quantized formats, byte-identical to ggml's (INT4 is ours), and the
// shared declarations of the kernel: reference quantizers, activation blocks, and the
// per-ISA dot-product tables chosen at run time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace hk {

constexpr int QK = 32;     // elements per block of INT4 / Q4_0 / Q8_0
constexpr int QK_K = 256;  // elements per super-block of Q2_K / Q8_K

using half = uint16_t;  // IEEE binary16 bits

#pragma pack(push, 1)
struct BlockInt4 {        // ours: symmetric 4-bit, code = q + 8 with q in [-7, 7]
    float d;              // amax / 7
    uint8_t qs[QK / 2];   // element j in the low nibble, j + 16 in the high nibble
};
struct BlockQ4_0 {        // ggml block_q4_0: code = round(x / d) + 8, d = -max / 8
    half d;
    uint8_t qs[QK / 2];
};
struct BlockQ8_0 {        // ggml block_q8_0
    half d;
    int8_t qs[QK];
};
struct BlockQ2_K {        // ggml block_q2_K: x = d * scale_j * code - dmin * min_j
    uint8_t scales[QK_K / 16];  // per group of 16: low nibble scale, high nibble min
    uint8_t qs[QK_K / 4];       // byte l of each 32-byte half: elements l, l+32, l+64, l+96
    half d;
    half dmin;
};
struct BlockQ8_K {        // ggml block_q8_K (activations only)
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
};
#pragma pack(pop)

static_assert(sizeof(BlockInt4) == 20, "INT4 block is 20 bytes");
static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block is 18 bytes");
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block is 34 bytes");
static_assert(sizeof(BlockQ2_K) == 84, "Q2_K block is 84 bytes");
static_assert(sizeof(BlockQ8_K) == 292, "Q8_K block is 292 bytes");

enum class QType : int { INT4 = 0, Q4_0 = 1, Q8_0 = 2, Q2_K = 3 };
constexpr int kNumQTypes = 4;

int block_size(QType t);
int block_bytes(QType t);
const char *qtype_name(QType t);
// The format named `name` (as qtype_name spells it) into *t; false for no such name.
bool qtype_from_name(const char *name, QType *t);

float half_to_float(half h);
half float_to_half(float f);  // round to nearest even, as numpy and F16C do

// Reference quantizers (ref.cpp), one row of `n` elements (a multiple of the block size).
void quantize_row(QType t, const float *x, void *out, int64_t n);
void dequantize_row(QType t, const void *in, float *y, int64_t n);

// Activations for the integer dot products, quantized once per matmul call (matmul.cpp
// owns the storage; the ISA translation units only see these plain views, so that no
// inline or template code is shared between units compiled with different target flags).
// Q8_0, per activation row a and block b:
//   qs[(a * n_blocks + b) * 32 + i]  codes
//   d[a * n_blocks + b]              scale read back from its fp16 storage
// With IsaKernels::q4_group G > 1 and 4-bit weights (INT4, Q4_0), each full group of G
// blocks (b a multiple of G, G blocks left) is stored interleaved: the first halves of the
// G blocks, then their second halves ([a_b[0:16], ..., a_b+G-1[0:16], a_b[16:32], ...,
// a_b+G-1[16:32]]); the last n_blocks % G blocks stay in natural order. Per group,
//   corr[(a * n_blocks + b) * 4 + l], l < 4G: int32, -8 * the sum of interleaved bytes
//                                    4l..4l+3 and 16G+4l..16G+4l+3: the offset of feeding
//                                    weights as unsigned nibbles (q + 8), per int32 lane so
//                                    each lane is exact before it turns float (a correction
//                                    per block would cancel in float).
struct ActQ8_0View {
    const int8_t *qs;
    const float *d;
    const int32_t *corr;
    int64_t n_blocks;
};
struct ActQ8_KView {
    const BlockQ8_K *blocks;  // (n_rows, n_blocks)
    int64_t n_blocks;
};

// Activation quantizers (ref.cpp), one row of `n` elements: exactly ggml's
// quantize_row_q8_0_ref / quantize_row_q8_K_ref.
void quantize_act_row_q8_0(const float *x, int8_t *qs, float *d, int32_t *sums, int64_t n);
void quantize_act_row_q8_k(const float *x, BlockQ8_K *out, int64_t n);

// One ISA's kernels: out[a * out_stride + r] = dot(weight row r, activation row a) for
// rows [r0, r1) and activation rows [a0, a1). Weight rows are `row_bytes` apart.
struct DotArgs {
    const uint8_t *w;
    int64_t row_bytes, n_blocks;
    int64_t r0, r1, a0, a1;
    float *out;
    int64_t out_stride;
};
using DotQ8_0Fn = void (*)(QType t, const DotArgs &args, const ActQ8_0View &act);
using QuantizeQ8_0Fn = void (*)(const float *x, int8_t *qs, float *d, int32_t *sums, int64_t n);
using DotQ8_KFn = void (*)(const DotArgs &args, const ActQ8_KView &act);

struct IsaKernels {
    const char *name;
    DotQ8_0Fn dot_q8_0;      // INT4, Q4_0, Q8_0 weights
    DotQ8_KFn dot_q2_k;      // Q2_K weights
    int q4_group;            // INT4 / Q4_0 activations interleaved in groups of this many blocks (0: natural)
    QuantizeQ8_0Fn quantize_q8_0;  // the Q8_0 activation blocks, bit for bit quantize_act_row_q8_0
};

// Defined per translation unit; null when that ISA was not compiled in.
const IsaKernels *scalar_kernels();
const IsaKernels *avx2_kernels();
const IsaKernels *avx512_kernels();       // AVX-512 F/BW/VL without VNNI
const IsaKernels *avx512_vnni_kernels();  // the same source built with VNNI (vpdpbusd)
const IsaKernels *neon_kernels();

// Streaming read of `bytes` (multithreaded by the caller): returns a checksum so the
// loads cannot be optimised away.
uint64_t stream_read(const uint8_t *p, size_t bytes);

}  // namespace hk
