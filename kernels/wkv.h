// RWKV-7 recurrence over a few tokens on the CPU (see wkv.cpp).
#pragma once

#include <cstdint>

namespace hk {

// Inputs (B, T, H, N) float32 C-contiguous, state_in (B, H, N, N). Writes out (B, T, H, N) and
// state_out (B, H, N, N); state_in is left unchanged (states are values, not buffers).
void wkv7_steps(const float *state_in, const float *r, const float *log_w, const float *k, const float *v,
                const float *a, const float *b, int64_t batch, int64_t tokens, int64_t heads, int64_t n,
                float *out, float *state_out);

}  // namespace hk
