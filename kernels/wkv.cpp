// RWKV-7 time-mix recurrence on the CPU without autograd (generation's step and a prompt's
// prefill): the same function as hierarchos/ops/wkv.py's wkv7_recurrent_step (its reference), one
// fused loop per (batch, head) instead of a dozen tiny torch ops a token. For each pair and token t:
//     u    = S a_t                                  (S before the decay)
//     S'   = S * exp(log_w_t)[None, :] + u b_t^T + v_t k_t^T
//     o_t  = S' r_t
// S is (N, N) with rows = value channels, columns = key channels.
#include "wkv.h"

#include <cmath>

#include "runtime.h"

// the wide vector units where the compiler supports function multiversioning (as rwkv_step.cpp)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HK_WKV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HK_WKV_CLONES
#endif

namespace hk {
namespace {

// One (batch, head) pair's whole sequence. Row i's removal term u_i = S_i . a reads only row i of
// the state before the update, so each row is read once and updated at once (the same operations in
// the same order as a pass for all u first: the same bits).
HK_WKV_CLONES void wkv7_pair(const float *S0, float *S, const float *r, const float *log_w, const float *k,
                             const float *v, const float *a, const float *b, int64_t tokens, int64_t heads,
                             int64_t n, int64_t first, float *out) {
    float decay[256];
    for (int64_t i = 0; i < n * n; ++i) S[i] = S0[i];
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t off = first + t * heads * n;  // (B, T, H, N) layout
        const float *rt = r + off, *wt = log_w + off, *kt = k + off, *vt = v + off;
        const float *at = a + off, *bt = b + off;
        float *ot = out + off;
        for (int64_t j = 0; j < n; ++j) decay[j] = std::exp(wt[j]);
        for (int64_t i = 0; i < n; ++i) {
            float *row = S + i * n;
            const float ui = dot8(row, at, n), vi = vt[i];
            for (int64_t j = 0; j < n; ++j) row[j] = row[j] * decay[j] + ui * bt[j] + vi * kt[j];
            ot[i] = dot8(row, rt, n);
        }
    }
}

}  // namespace

void wkv7_steps(const float *state_in, const float *r, const float *log_w, const float *k, const float *v,
                const float *a, const float *b, int64_t batch, int64_t tokens, int64_t heads, int64_t n,
                float *out, float *state_out) {
    const int64_t head_stride = n * n;
    auto pair = [&](int64_t p) {  // p = bi * heads + h
        const int64_t bi = p / heads, h = p % heads;
        wkv7_pair(state_in + p * head_stride, state_out + p * head_stride, r, log_w, k, v, a, b, tokens, heads, n,
                  (bi * tokens * heads + h) * n, out);
    };
    // a prompt's pairs on the kernel's pool; a token or two (the float model's generation step) is
    // a few microseconds a pair, less than a pool job costs
    if (tokens >= kWkvParallelTokens && batch * heads > 1) {
        parallel_tasks(batch * heads, pair);
    } else {
        for (int64_t p = 0; p < batch * heads; ++p) pair(p);
    }
}

}  // namespace hk
