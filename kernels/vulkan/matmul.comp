// Dequantize-matmul for one quantized weight matrix: y[n][r] = sum_c W[r][c] * x[n][c].
// Compiled once per format by glslc with -DQTYPE_INT4 / _Q4_0 / _Q8_0 / _Q2_K (kernels/vulkan/CMakeLists.txt).
//
// W is the ggml block bytes exactly as the CPU kernel holds them (kernels/formats.h), read as
// 32-bit words: Vulkan 1.0 guarantees no 8- or 16-bit storage access, and Q4_0 (18 B) and
// Q8_0 (34 B) blocks start at 2-byte offsets, so those loads splice two words. x and y are
// float32: activations are NOT quantized here (the CPU kernel rounds them to Q8_0 / Q8_K), so
// the result is W's dequantized floats times x, summed in float32.
//
// Work split, chosen per device by specialization constants (vk_backend.cpp):
// - GPUs (ROW_PER_WORKGROUP): one workgroup of WG threads per output row, its threads striding
//   over the row's 32-element units (neighbours read neighbouring blocks: coalesced), partial
//   sums meeting in shared memory (no subgroup operations: they are optional in Vulkan 1.2);
// - CPU drivers such as lavapipe: one invocation per row and no barrier, since lavapipe runs a
//   workgroup's barriers as context switches (4-11x slower measured here).
// Rows are grid-strided past the 65535-workgroup dispatch limit. Each workgroup serves up to NB
// activation rows at once, so a batch reads each weight block once per NB rows.
#version 450
#extension GL_EXT_control_flow_attributes : require

#define NB 8u

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 32u;  // threads per workgroup (a power of two)
layout(constant_id = 1) const bool ROW_PER_WORKGROUP = true;

layout(std430, set = 0, binding = 0) readonly buffer Weights { uint wq[]; };
layout(std430, set = 0, binding = 1) readonly buffer Acts { vec4 x[]; };
layout(std430, set = 0, binding = 2) writeonly buffer Outs { float y[]; };

layout(push_constant) uniform Params {
    uint rows;   // output features
    uint units;  // cols / 32
    uint batch;  // activation rows in x
} p;

shared float partial[NB][WG];

// IEEE half -> float, exact for subnormals too (unpackHalf2x16 may flush them to zero).
float half_to_float(uint h) {
    uint sign = (h & 0x8000u) << 16;
    uint expo = (h >> 10) & 0x1Fu;
    uint mant = h & 0x3FFu;
    if (expo == 0u) {
        float v = float(mant) * 5.9604644775390625e-8;  // mant * 2^-24
        return (sign != 0u) ? -v : v;
    }
    if (expo == 31u) return uintBitsToFloat(sign | 0x7F800000u | (mant << 13));
    return uintBitsToFloat(sign | ((expo + 112u) << 23) | (mant << 13));
}

// Little-endian 32 bits at any byte offset (the buffer carries one word of padding at the end).
uint load_u32(uint offset) {
    uint word = offset >> 2, shift = (offset & 3u) * 8u;
    if (shift == 0u) return wq[word];
    return (wq[word] >> shift) | (wq[word + 1u] << (32u - shift));
}

// 16 bits at an even byte offset.
uint load_u16(uint offset) {
    return (wq[offset >> 2] >> ((offset & 2u) * 8u)) & 0xFFFFu;
}

// The 32 weights of unit k of row `row`, in element order.
void unit_weights(uint row, uint k, out float w[32]) {
    uint block = row * p.units + k;  // rows are contiguous: blocks run on across them
#if defined(QTYPE_INT4)
    // 20 B: float d, 16 B of nibbles (byte j: element j low, element j + 16 high); word-aligned.
    uint base = block * 5u;
    float d = uintBitsToFloat(wq[base]);
    [[unroll]] for (uint i = 0u; i < 4u; ++i) {
        uint q = wq[base + 1u + i];
        [[unroll]] for (uint b = 0u; b < 4u; ++b) {
            uint byte = (q >> (8u * b)) & 0xFFu;
            w[4u * i + b] = (float(byte & 15u) - 8.0) * d;
            w[4u * i + b + 16u] = (float(byte >> 4) - 8.0) * d;
        }
    }
#elif defined(QTYPE_Q4_0)
    // 18 B: half d, 16 B of nibbles laid out as INT4's.
    uint offset = block * 18u;
    float d = half_to_float(load_u16(offset));
    [[unroll]] for (uint i = 0u; i < 4u; ++i) {
        uint q = load_u32(offset + 2u + 4u * i);
        [[unroll]] for (uint b = 0u; b < 4u; ++b) {
            uint byte = (q >> (8u * b)) & 0xFFu;
            w[4u * i + b] = (float(byte & 15u) - 8.0) * d;
            w[4u * i + b + 16u] = (float(byte >> 4) - 8.0) * d;
        }
    }
#elif defined(QTYPE_Q8_0)
    // 34 B: half d, 32 signed bytes.
    uint offset = block * 34u;
    float d = half_to_float(load_u16(offset));
    [[unroll]] for (uint i = 0u; i < 8u; ++i) {
        int q = int(load_u32(offset + 2u + 4u * i));
        [[unroll]] for (uint b = 0u; b < 4u; ++b)
            w[4u * i + b] = float(bitfieldExtract(q, int(8u * b), 8)) * d;  // sign-extending
    }
#elif defined(QTYPE_Q2_K)
    // 84 B super-block of 256 (word-aligned): scales[16] (low nibble scale, high nibble min, one
    // per 16 elements), qs[64], half d, half dmin. Unit u (of 8) is elements 32u..32u+31: the 32
    // bytes qs[32 * (u / 4) ..] shifted by 2 * (u % 4), with the scale bytes 2u and 2u + 1.
    uint base = (block >> 3) * 21u, u = block & 7u;
    uint scale_pair = (wq[base + (u >> 1)] >> ((u & 1u) * 16u)) & 0xFFFFu;
    uint dd = wq[base + 20u];
    float d = half_to_float(dd & 0xFFFFu), dmin = half_to_float(dd >> 16);
    uint shift = 2u * (u & 3u);
    [[unroll]] for (uint g = 0u; g < 2u; ++g) {
        uint sc = (scale_pair >> (8u * g)) & 0xFFu;
        float scale = d * float(sc & 15u), least = dmin * float(sc >> 4);
        [[unroll]] for (uint i = 0u; i < 4u; ++i) {
            uint q = wq[base + 4u + 8u * (u >> 2) + 4u * g + i];
            [[unroll]] for (uint b = 0u; b < 4u; ++b)
                w[16u * g + 4u * i + b] = scale * float((q >> (8u * b + shift)) & 3u) - least;
        }
    }
#else
#error "compile with -DQTYPE_INT4, -DQTYPE_Q4_0, -DQTYPE_Q8_0 or -DQTYPE_Q2_K"
#endif
}

// acc[n] = the sum over units first, first + stride, ... of row `row` against activation row n0 + n.
void row_partial(uint row, uint first, uint stride, uint n0, uint nb, out float acc[NB]) {
    uint row_vec4s = p.units * 8u;  // an activation row, in vec4s
    [[unroll]] for (uint n = 0u; n < NB; ++n) acc[n] = 0.0;
    for (uint k = first; k < p.units; k += stride) {
        float w[32];
        unit_weights(row, k, w);
        [[unroll]] for (uint n = 0u; n < NB; ++n) {
            if (n < nb) {
                uint at = (n0 + n) * row_vec4s + k * 8u;
                float s = 0.0;
                [[unroll]] for (uint i = 0u; i < 8u; ++i)
                    s += dot(vec4(w[4u * i], w[4u * i + 1u], w[4u * i + 2u], w[4u * i + 3u]), x[at + i]);
                acc[n] += s;
            }
        }
    }
}

void main() {
    uint tid = gl_LocalInvocationID.x;
    uint n0 = gl_WorkGroupID.y * NB;
    uint nb = min(NB, p.batch - n0);
    float acc[NB];
    if (!ROW_PER_WORKGROUP) {
        for (uint row = gl_GlobalInvocationID.x; row < p.rows; row += gl_NumWorkGroups.x * WG) {
            row_partial(row, 0u, 1u, n0, nb, acc);
            [[unroll]] for (uint n = 0u; n < NB; ++n)
                if (n < nb) y[(n0 + n) * p.rows + row] = acc[n];
        }
        return;
    }
    for (uint row = gl_WorkGroupID.x; row < p.rows; row += gl_NumWorkGroups.x) {
        row_partial(row, tid, WG, n0, nb, acc);
        [[unroll]] for (uint n = 0u; n < NB; ++n) partial[n][tid] = acc[n];
        barrier();
        for (uint half_width = WG / 2u; half_width > 0u; half_width >>= 1) {
            if (tid < half_width) {
                [[unroll]] for (uint n = 0u; n < NB; ++n) partial[n][tid] += partial[n][tid + half_width];
            }
            barrier();
        }
        if (tid < nb) y[(n0 + tid) * p.rows + row] = partial[tid][0];
        barrier();  // partial[] is reused by the next row
    }
}
