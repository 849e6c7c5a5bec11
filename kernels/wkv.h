// RWKV-7 recurrence on the CPU without autograd (see wkv.cpp).
#pragma once

#include <cstdint>

namespace hk {

// A dot product in eight independent partial sums: the compiler vectorises them without
// reassociating a single chain (which -ffp-contract=off / strict IEEE order would keep scalar).
// Shared by the WKV-7 steps here and the fused stack step (rwkv_step.cpp), so both round alike.
inline float dot8(const float *x, const float *y, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; ++l) acc[l] += x[j + l] * y[j + l];
    float total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; j < n; ++j) total += x[j] * y[j];
    return total;
}

// Calls of at least this many tokens run their (batch, head) pairs on the kernel's thread pool.
constexpr int64_t kWkvParallelTokens = 16;

// Inputs (B, T, H, N) float32 C-contiguous, state_in (B, H, N, N), N <= 256. Writes out (B, T, H, N) and
// state_out (B, H, N, N); state_in is left unchanged (states are values, not buffers).
void wkv7_steps(const float *state_in, const float *r, const float *log_w, const float *k, const float *v,
                const float *a, const float *b, int64_t batch, int64_t tokens, int64_t heads, int64_t n,
                float *out, float *state_out);

}  // namespace hk
