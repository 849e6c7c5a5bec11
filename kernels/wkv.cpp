// RWKV-7 time-mix recurrence for a few tokens (generation): the same function as
// hierarchos/ops/wkv.py's wkv7_recurrent_step (its reference), one fused loop per head
// instead of a dozen tiny torch ops. For each (batch, head) and token t:
//     u    = S a_t                                  (S before the decay)
//     S'   = S * exp(log_w_t)[None, :] + u b_t^T + v_t k_t^T
//     o_t  = S' r_t
// S is (N, N) with rows = value channels, columns = key channels.
#include "wkv.h"

#include <cmath>
#include <vector>

namespace hk {

void wkv7_steps(const float *state_in, const float *r, const float *log_w, const float *k, const float *v,
                const float *a, const float *b, int64_t batch, int64_t tokens, int64_t heads, int64_t n,
                float *out, float *state_out) {
    std::vector<float> decay(n), u(n);
    const int64_t head_stride = n * n;
    for (int64_t bi = 0; bi < batch; ++bi) {
        for (int64_t h = 0; h < heads; ++h) {
            float *S = state_out + (bi * heads + h) * head_stride;
            const float *S0 = state_in + (bi * heads + h) * head_stride;
            for (int64_t i = 0; i < head_stride; ++i) S[i] = S0[i];
            for (int64_t t = 0; t < tokens; ++t) {
                const int64_t off = ((bi * tokens + t) * heads + h) * n;  // (B, T, H, N) layout
                const float *rt = r + off, *wt = log_w + off, *kt = k + off, *vt = v + off;
                const float *at = a + off, *bt = b + off;
                float *ot = out + off;
                for (int64_t j = 0; j < n; ++j) decay[j] = std::exp(wt[j]);
                for (int64_t i = 0; i < n; ++i) u[i] = dot8(S + i * n, at, n);
                for (int64_t i = 0; i < n; ++i) {
                    float *row = S + i * n;
                    const float ui = u[i], vi = vt[i];
                    for (int64_t j = 0; j < n; ++j) row[j] = row[j] * decay[j] + ui * bt[j] + vi * kt[j];
                    ot[i] = dot8(row, rt, n);
                }
            }
        }
    }
}

}  // namespace hk
