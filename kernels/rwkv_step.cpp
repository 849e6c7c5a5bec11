// One token through a whole RWKV-7 stack (hierarchos/model/rwkv.py: RWKVStack.forward at T = 1,
// every block a TimeMix + ChannelMix whose eight projections are quantized), in one call.
//
// The Python step runs a few dozen small torch ops per block (layer norms, token shift, the
// low-rank mixes, decay and in-context rate, the WKV-7 update, head norm, gates, SwiGLU) plus a
// kernel call per projection group: at batch 1 that overhead, not the weights, set the speed of
// the quantized 125m model (BENCHMARKS.md, issue 17). Here the same function runs in C++ on
// the kernel's thread pool: the projections through hk::matmul / matmul_many (the very
// integer kernels the Python path calls, on the same 8-bit activations), the float low-rank
// products split by output columns, the WKV-7 update split by (row, head). A round (`round`) runs its
// two stacks side by side instead, one thread each, since the worker never reads what the manager makes
// in the same token (SerialRegion, runtime.h). The Python step stays
// the reference (hierarchos/quant/fused_step.py decides when this path applies;
// tests/test_quant_fused_step.py holds the two equal).
//
// Per block and row, with x the block input (C), frozen f (the frozen-token rule: the token
// writes nothing into the state and the token shift skips it):
//   xa = LN_time(x); prev = tm_shift; tm_shift' = f ? prev : xa; delta = prev - xa
//   x_i = xa + delta * (mix_i + lora_i)   (ddlerp: lora = tanh((xa + delta mix_base) D) U_i; static: 0)
//   r, k, v, g = W_r x_0, W_k x_2, W_v x_3, sigmoid(W_g x_5) (or x070's sigmoid(x_5 G1) G2)
//   v += (v_first - v) sigmoid(vr_base + x_3 V1 V2)       (value residual, blocks after the first)
//   log_w = -exp(-softplus(-(decay_base + tanh(x_1 D1) D2)) - 0.5); iclr = sigmoid(iclr_base + x_4 A1 A2)
//   (the exponentials by exp_fast, relative error < 2e-7; the decay as -exp(-0.5) sigmoid(.), the same value)
//   kappa = normalize_head(k removal_scale); k' = k (1 + (iclr - 1) key_iclr_mix); b = kappa iclr
//   f: log_w = k' = b = 0;  per head: u = S (-kappa); S' = S exp(log_w) + u b^T + v k'^T; o = S' r
//   x += W_o ((head_norm(o) + (r k' bonus)_head v) g)
//   xc = LN_channel(x); cm_shift' = f ? prev_c : xc; xk = xc + (prev_c - xc) cm_mix
//   x += W_down (silu(W_gate xk) W_up xk deep_gate)
#include "rwkv_step.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "formats.h"
#include "runtime.h"
#include "wkv.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

namespace py = pybind11;

namespace hk {

namespace {

// The float loops below are plain C++; these clones give them the wide vector units where the
// compiler supports function multiversioning (the quantized kernels have their own ISA units).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HK_CLONES
#endif

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;

struct QMat {
    QType t = QType::Q4_0;
    const uint8_t *data = nullptr;
    int64_t rows = 0, cols = 0;
};

// A low-rank path's matrix (in, out): float32 row-major (the parameter's own storage), or fp16 in
// column blocks (half the bytes streamed per pass; a copy): element (i, j) at
// ((j / 16) * in + i) * 16 + j % 16, so that a task over a range of 16-column blocks reads each
// block as one contiguous run instead of 32 bytes per row at the row stride. The products run in
// float32 on the converted values, in the same order, so an fp16 matrix gives bit for bit what a
// float32 one holding the same fp16-rounded values gives.
constexpr int64_t kHalfBlock = 16;
struct LowRank {
    const float *f = nullptr;
    const uint16_t *h = nullptr;
    int64_t in = 0;  // rows of one matrix (the block stride); a LowRank may hold several, one after another
    LowRank at(int64_t offset) const { return {f ? f + offset : nullptr, h ? h + offset : nullptr, in}; }
};

struct Layer {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    float ln1_eps, ln2_eps, norm_eps;
    bool ddlerp;
    const float *mix, *mix_base = nullptr;
    LowRank mix_down, mix_up;
    int64_t mix_rank = 0;
    const float *decay_base;
    LowRank decay_down, decay_up;
    int64_t decay_rank;
    const float *iclr_base;
    LowRank iclr_down, iclr_up;
    int64_t iclr_rank;
    const float *removal_scale, *key_iclr_mix, *bonus, *norm_w, *norm_b;
    bool gate_full;
    LowRank gate_down, gate_up;
    int64_t gate_rank = 0;
    bool value_first = false, value_residual = false;
    const float *vr_base = nullptr;
    LowRank vr_down, vr_up;
    int64_t vr_rank = 0;
    QMat r, k, v, g, o;
    const float *cm_mix;
    QMat cm_gate, cm_up, cm_down;
};

// y[b, :] = x[b, :] @ W for W (in, out) row-major, columns [j0, j1) of it, in the order torch's
// x @ W sums (i ascending per column; the columns are independent, so they vectorise as they are).
constexpr int64_t kCols = 64;

// One row's columns [j0, j0 + W): a compile-time width keeps the accumulators in registers.
template <int64_t W>
inline void vecmat_row(const float *xb, const float *w, int64_t in, int64_t out, float *yb) {
    float acc[W];
    for (int64_t j = 0; j < W; ++j) acc[j] = 0.0f;
    for (int64_t i = 0; i < in; ++i) {
        const float xi = xb[i];
        const float *wi = w + i * out;
        for (int64_t j = 0; j < W; ++j) acc[j] += xi * wi[j];
    }
    for (int64_t j = 0; j < W; ++j) yb[j] = acc[j];
}

HK_CLONES void vecmat_cols(const float *x, int64_t x_stride, const float *w, int64_t in, int64_t out,
                           float *y, int64_t y_stride, int64_t rows, int64_t j0, int64_t j1) {
    for (int64_t b = 0; b < rows; ++b) {
        const float *xb = x + b * x_stride;
        float *yb = y + b * y_stride;
        int64_t j = j0;
        for (; j + kCols <= j1; j += kCols) vecmat_row<kCols>(xb, w + j, in, out, yb + j);
        for (; j + 16 <= j1; j += 16) vecmat_row<16>(xb, w + j, in, out, yb + j);
        for (; j < j1; ++j) vecmat_row<1>(xb, w + j, in, out, yb + j);
    }
}

// The fp16 twin of vecmat_cols on column blocks (LowRank): every product and sum as there
// (x_i * w_ij, then + in i order, no fused multiply-add) on the weights converted to float32
// (exact). AVX-512 or F16C when the CPU has them, else a portable loop.
inline float half_at(const uint16_t *w, int64_t in, int64_t i, int64_t j) {
    return half_to_float(w[((j / kHalfBlock) * in + i) * kHalfBlock + j % kHalfBlock]);
}

void vecmat_col_half_portable(const float *xb, const uint16_t *w, int64_t in, int64_t j, float *yb) {
    float acc = 0.0f;
    for (int64_t i = 0; i < in; ++i) acc += xb[i] * half_at(w, in, i, j);
    yb[j] = acc;
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HK_HALF_X86 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_cvtph_ps's _mm512_undefined_ps
// Q consecutive 16-column blocks starting at block `first` (columns 16 first .. 16 (first + Q)).
template <int Q>
__attribute__((target("avx512f,f16c"))) inline void blocks_h512(const float *xb, const uint16_t *w, int64_t in,
                                                                int64_t first, float *yb) {
    __m512 acc[Q];
    const uint16_t *base[Q];
    for (int q = 0; q < Q; ++q) {
        acc[q] = _mm512_setzero_ps();
        base[q] = w + (first + q) * in * kHalfBlock;
    }
    for (int64_t i = 0; i < in; ++i) {
        const __m512 xi = _mm512_set1_ps(xb[i]);
        for (int q = 0; q < Q; ++q) {
            const __m512 wf = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(base[q] + i * kHalfBlock)));
            acc[q] = _mm512_add_ps(acc[q], _mm512_mul_ps(xi, wf));
        }
    }
    for (int q = 0; q < Q; ++q) _mm512_storeu_ps(yb + (first + q) * kHalfBlock, acc[q]);
}

__attribute__((target("avx512f,f16c"))) void vecmat_cols_h512(const float *x, int64_t x_stride, const uint16_t *w,
                                                              int64_t in, float *y, int64_t y_stride, int64_t rows,
                                                              int64_t j0, int64_t j1) {
    for (int64_t b = 0; b < rows; ++b) {
        const float *xb = x + b * x_stride;
        float *yb = y + b * y_stride;
        int64_t j = j0;
        for (; j < j1 && j % kHalfBlock; ++j) vecmat_col_half_portable(xb, w, in, j, yb);
        for (; j + 4 * kHalfBlock <= j1; j += 4 * kHalfBlock) blocks_h512<4>(xb, w, in, j / kHalfBlock, yb);
        for (; j + kHalfBlock <= j1; j += kHalfBlock) blocks_h512<1>(xb, w, in, j / kHalfBlock, yb);
        for (; j < j1; ++j) vecmat_col_half_portable(xb, w, in, j, yb);
    }
}

__attribute__((target("avx2,f16c"))) void vecmat_cols_h256(const float *x, int64_t x_stride, const uint16_t *w,
                                                           int64_t in, float *y, int64_t y_stride, int64_t rows,
                                                           int64_t j0, int64_t j1) {
    for (int64_t b = 0; b < rows; ++b) {
        const float *xb = x + b * x_stride;
        float *yb = y + b * y_stride;
        int64_t j = j0;
        for (; j < j1 && j % kHalfBlock; ++j) vecmat_col_half_portable(xb, w, in, j, yb);
        for (; j + kHalfBlock <= j1; j += kHalfBlock) {
            const uint16_t *base = w + (j / kHalfBlock) * in * kHalfBlock;
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t i = 0; i < in; ++i) {
                const __m256 xi = _mm256_set1_ps(xb[i]);
                for (int q = 0; q < 2; ++q) {
                    const __m256 wf = _mm256_cvtph_ps(
                        _mm_loadu_si128(reinterpret_cast<const __m128i *>(base + i * kHalfBlock + 8 * q)));
                    acc[q] = _mm256_add_ps(acc[q], _mm256_mul_ps(xi, wf));
                }
            }
            for (int q = 0; q < 2; ++q) _mm256_storeu_ps(yb + j + 8 * q, acc[q]);
        }
        for (; j < j1; ++j) vecmat_col_half_portable(xb, w, in, j, yb);
    }
}
#pragma GCC diagnostic pop
#endif

void vecmat_cols_half(const float *x, int64_t x_stride, const uint16_t *w, int64_t in, float *y, int64_t y_stride,
                      int64_t rows, int64_t j0, int64_t j1) {
#if defined(HK_HALF_X86)
    static const int level = __builtin_cpu_supports("avx512f") ? 2 : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) ? 1 : 0;
    if (level == 2) return vecmat_cols_h512(x, x_stride, w, in, y, y_stride, rows, j0, j1);
    if (level == 1) return vecmat_cols_h256(x, x_stride, w, in, y, y_stride, rows, j0, j1);
#endif
    for (int64_t b = 0; b < rows; ++b)
        for (int64_t j = j0; j < j1; ++j) vecmat_col_half_portable(x + b * x_stride, w, in, j, y + b * y_stride);
}

void vecmat_cols(const float *x, int64_t x_stride, const LowRank &w, int64_t in, int64_t out, float *y,
                 int64_t y_stride, int64_t rows, int64_t j0, int64_t j1) {
    if (w.h) vecmat_cols_half(x, x_stride, w.h, w.in, y, y_stride, rows, j0, j1);
    else vecmat_cols(x, x_stride, w.f, in, out, y, y_stride, rows, j0, j1);
}

struct VecMat {
    const float *x;
    int64_t x_stride;
    LowRank w;
    int64_t in, out;
    float *y;
    int64_t y_stride;
};

// Several small float products as one list of tasks, each (product, column chunk of `cols`):
// run(task) computes one chunk for every row. The chunking does not change a result (every
// column is its own sum, i ascending), so a caller picks it for balance.
class VecMatTasks {
public:
    VecMatTasks(const std::vector<VecMat> &jobs, int64_t cols) : jobs_(jobs), cols_(cols) {
        for (const VecMat &j : jobs_) first_.push_back(first_.back() + (j.out + cols - 1) / cols);
    }
    int64_t size() const { return first_.back(); }
    void run(int64_t task, int64_t rows) const {
        size_t j = 0;
        while (task >= first_[j + 1]) ++j;
        const VecMat &m = jobs_[j];
        const int64_t j0 = (task - first_[j]) * cols_;
        vecmat_cols(m.x, m.x_stride, m.w, m.in, m.out, m.y, m.y_stride, rows, j0, std::min(m.out, j0 + cols_));
    }

private:
    std::vector<VecMat> jobs_;
    int64_t cols_;
    std::vector<int64_t> first_{0};
};

// Products with few output columns (the low-rank paths' down sides) split finer, so that both
// threads get a share.
constexpr int64_t kSmallCols = 16;

// Several small float products in one pass over the pool.
void run_vecmats(const std::vector<VecMat> &jobs, int64_t rows, int64_t cols = kCols) {
    const VecMatTasks tasks(jobs, cols);
    parallel_tasks(tasks.size(), [&](int64_t task) { tasks.run(task, rows); });
}

// exp(x) without a library call, so that loops over it vectorise (the step's ~12k exponentials a
// pass through libm's scalar expf were ~7% of its time, mostly one serial SwiGLU loop): 2^n e^r with
// n = round(x / ln 2), r = x - n ln 2 in two parts (Cody-Waite), e^r by its degree-7 Taylor-like
// minimax polynomial on [-ln2/2, ln2/2] (Cephes' expf coefficients), 2^n through the exponent bits.
// Relative error < 2e-7 against the exact value for x in [-87, 88]; x is clamped there (below, the
// result is ~1e-38 instead of smaller: every use adds it to 1 or multiplies a decay in (0, 1]).
inline float exp_fast(float x) {
    x = std::min(std::max(x, -87.0f), 88.0f);
    // round to nearest by the 1.5 * 2^23 trick: std::floor would not vectorise (GCC inlines it only
    // without -ftrapping-math)
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_fast(-x)); }

// The decay's log: -exp(-softplus(-z) - 0.5) = -exp(-0.5) sigmoid(z), since exp(-softplus(-z)) =
// 1 / (1 + e^-z); one exponential instead of exp, log1p and exp (the Python step keeps the first form).
constexpr float kExpMinusHalf = 0.60653065971263342f;
inline float decay_log(float z) { return -kExpMinusHalf * sigmoid(z); }

// out[i] = silu(g[i]) * u[i] (* gate[i]): the SwiGLU hidden units, vectorised.
HK_CLONES void swiglu(const float *g, const float *u, const float *gate, int64_t n, float *out) {
    if (gate) {
        for (int64_t i = 0; i < n; ++i) out[i] = ((g[i] * sigmoid(g[i])) * u[i]) * gate[i];
    } else {
        for (int64_t i = 0; i < n; ++i) out[i] = (g[i] * sigmoid(g[i])) * u[i];
    }
}

// Layer norm over n channels (biased variance, eps inside the root), as torch.layer_norm.
void layer_norm(const float *x, const float *w, const float *b, float eps, int64_t n, float *y) {
    double mean = 0.0, var = 0.0;
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= static_cast<double>(n);
    for (int64_t i = 0; i < n; ++i) {
        const double d = x[i] - mean;
        var += d * d;
    }
    var /= static_cast<double>(n);
    const float inv = static_cast<float>(1.0 / std::sqrt(var + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < n; ++i) {
        const float normed = (x[i] - m) * inv;
        y[i] = w ? normed * w[i] + b[i] : normed;
    }
}

// The WKV-7 update of one head of one row (its N x N state S0 -> S, read and written once) and
// the head's part of the output gate's input: (head_norm(o) + bonus v) * g.
HK_CLONES void wkv_head(const float *S0, float *S, int64_t N, const float *r, const float *k, const float *v, const float *g,
                        const float *log_w, const float *iclr, const Layer &L, int64_t c0, bool frozen,
                        float *out) {
    float kappa[256], kmod[256], bb[256], decay[256], o[256];
    float norm2 = 0.0f;
    for (int64_t j = 0; j < N; ++j) {
        kappa[j] = k[j] * L.removal_scale[c0 + j];
        norm2 += kappa[j] * kappa[j];
    }
    const float inv = 1.0f / std::max(std::sqrt(norm2), 1e-12f);  // F.normalize
    for (int64_t j = 0; j < N; ++j) {
        kappa[j] = kappa[j] * inv;
        const float ic = iclr[j];
        kmod[j] = frozen ? 0.0f : k[j] * (1.0f + (ic - 1.0f) * L.key_iclr_mix[c0 + j]);
        bb[j] = frozen ? 0.0f : kappa[j] * ic;
        decay[j] = frozen ? 1.0f : exp_fast(log_w[j]);
        kappa[j] = -kappa[j];  // the removal key enters as a = -kappa
    }
    // One pass over the state: row i's removal term u_i reads only row i of S0, so each row is
    // read once (it is still in L1 for the update) instead of once for all u and again for the
    // update; the same operations in the same order as two passes, so the same bits.
    for (int64_t i = 0; i < N; ++i) {
        const float *in = S0 + i * N;
        float *row = S + i * N;
        const float ui = dot8(in, kappa, N), vi = v[i];
        for (int64_t j = 0; j < N; ++j) row[j] = in[j] * decay[j] + ui * bb[j] + vi * kmod[j];
        o[i] = dot8(row, r, N);
    }
    layer_norm(o, nullptr, nullptr, L.norm_eps, N, o);
    float bonus = 0.0f;
    for (int64_t j = 0; j < N; ++j) bonus += r[j] * kmod[j] * L.bonus[c0 + j];
    for (int64_t i = 0; i < N; ++i)
        out[i] = ((o[i] * L.norm_w[c0 + i] + L.norm_b[c0 + i]) + bonus * v[i]) * g[i];
}

// One (row, head)'s channels [c0, c0 + n) after their up products: the decay's log, the in-context
// rate, the full gate's sigmoid, the value residual's lerp (and the first layer's value kept), in
// separate loops so that each vectorises.
HK_CLONES void head_gates(const Layer &L, int64_t c0, int64_t n, float *log_w, float *iclr, float *g, float *v,
                          float *vfirst, const float *vr) {
    const float *decay_base = L.decay_base + c0, *iclr_base = L.iclr_base + c0;
    for (int64_t j = 0; j < n; ++j) log_w[j] = decay_log(decay_base[j] + log_w[j]);
    for (int64_t j = 0; j < n; ++j) iclr[j] = sigmoid(iclr_base[j] + iclr[j]);
    if (L.gate_full)
        for (int64_t j = 0; j < n; ++j) g[j] = sigmoid(g[j]);
    if (L.value_residual) {
        const float *vr_base = L.vr_base + c0;
        for (int64_t j = 0; j < n; ++j) v[j] = v[j] + (vfirst[j] - v[j]) * sigmoid(vr_base[j] + vr[j]);
    }
    if (L.value_first) std::copy(v, v + n, vfirst);
}

bool lanes_by_default() {
    static const bool on = [] {
        const char *env = std::getenv("HIERARCHOS_KERNEL_LANES");
        return !(env && std::string(env) == "0");
    }();
    return on;
}

MatmulJob job(const QMat &m, const float *x, int64_t n, float *out) { return {m.t, m.data, m.rows, m.cols, x, n, out}; }

QType parse_qtype(const std::string &name) {
    QType t;
    if (qtype_from_name(name.c_str(), &t)) return t;
    throw py::value_error("RwkvStackStep: unknown qtype '" + name + "'");
}

class RwkvStackStep {
public:
    RwkvStackStep(int64_t dim, int64_t head_size, int64_t ffn_dim, const py::list &layers)
        : C_(dim), N_(head_size), H_(dim / head_size), F_(ffn_dim) {
        if (dim <= 0 || head_size <= 0 || head_size > 256 || dim % head_size || ffn_dim <= 0)
            throw py::value_error("RwkvStackStep: need dim a multiple of head_size (<= 256) and ffn_dim > 0");
        if (layers.size() == 0) throw py::value_error("RwkvStackStep: no layers");
        for (const py::handle item : layers) layers_.push_back(parse_layer(item.cast<py::dict>()));
    }

    int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

    // Whether `round` runs the manager's and the worker's stacks side by side, one thread each (see
    // there): on by default (HIERARCHOS_KERNEL_LANES=0 turns it off for new objects); it takes two
    // stack objects (one object's scratch cannot serve two threads) and a pool of exactly two threads
    // (measured there; with more, a lane of one thread would leave the others idle where every product
    // now splits over all of them).
    bool lanes = lanes_by_default();
    bool two_lanes(const RwkvStackStep &manager) const { return lanes && &manager != this && get_threads() == 2; }

    py::tuple step(const FloatArray &x, const FloatArray &tm, const FloatArray &wkv, const FloatArray &cm,
                   const py::object &gates, const py::object &frozen) {
        const int64_t L = n_layers(), C = C_, H = H_, N = N_;
        if (x.ndim() != 2 || x.shape(1) != C) throw py::value_error("RwkvStackStep.step: x must be (B, dim)");
        const int64_t B = x.shape(0);
        auto check = [&](const FloatArray &a, std::vector<int64_t> shape, const char *name) {
            bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
            for (size_t i = 0; ok && i < shape.size(); ++i) ok = a.shape(i) == shape[i];
            if (!ok) throw py::value_error(std::string("RwkvStackStep.step: ") + name + " has the wrong shape");
        };
        check(tm, {L, B, C}, "tm_shift");
        check(cm, {L, B, C}, "cm_shift");
        check(wkv, {L, B, H, N, N}, "wkv");
        std::vector<FloatArray> gate_arrays = parse_gates(gates, B, "RwkvStackStep.step");
        std::vector<uint8_t> frozen_rows(static_cast<size_t>(B), 0);
        if (!frozen.is_none()) {
            auto f = py::array_t<bool, py::array::c_style | py::array::forcecast>::ensure(frozen);
            if (!f || f.size() != B) throw py::value_error("RwkvStackStep.step: frozen must hold one flag per row");
            for (int64_t b = 0; b < B; ++b) frozen_rows[b] = f.data()[b] ? 1 : 0;
        }
        py::array_t<float> x_out({B, C}), tm_out({L, B, C}), cm_out({L, B, C}), wkv_out({L, B, H, N, N});
        const std::vector<const float *> gate_ptrs = pointers(gate_arrays);
        const float *px = x.data(), *ptm = tm.data(), *pcm = cm.data(), *pwkv = wkv.data();
        float *ox = x_out.mutable_data(), *otm = tm_out.mutable_data(), *ocm = cm_out.mutable_data();
        float *owkv = wkv_out.mutable_data();
        {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);  // the scratch is the object's
            PoolHold hold;  // the pool's helpers stay awake between this step's jobs
            run(B, px, ptm, pwkv, pcm, gate_ptrs, frozen_rows.data(), ox, otm, owkv, ocm);
        }
        return py::make_tuple(x_out, tm_out, wkv_out, cm_out);
    }

    // The worker's shadow passes at T = 1 (hierarchos/model/hrm.py, HierarchicalReasoner._explore; this
    // stack is the worker): with drift = 0 and no row frozen, pass p (skipped once every row is frozen,
    // p > 0) runs x = lin_in([u, context + drift]) through the stack on shadow state p (frozen rows
    // write nothing), step = tanh(lin_drift(x')) on unfrozen rows, drift += step, and a row whose
    // max |step| < atol is frozen; after every pass, skipped or not, the commitment adds
    // sum over rows of relu(|drift|^2 - threshold). lin_in / lin_drift: (data, qtype, cols, bias or
    // None), quantized (lh x 2d) and (d x lh). states: one (tm_shift, wkv, cm_shift) per pass.
    // Returns (drift, new states (None for a skipped pass: its state stays), rows run summed over the passes,
    // the commitment summed over the passes), the projections on the same integer matvecs as the
    // Python path, the passes as `step`.
    py::tuple shadow(const FloatArray &u, const FloatArray &context, const py::list &states, const py::tuple &lin_in,
                     const py::tuple &lin_drift, float atol, float threshold, const py::object &gates) {
        const int64_t L = n_layers(), C = C_, H = H_, N = N_;
        if (u.ndim() != 2 || context.ndim() != 2 || context.shape(0) != u.shape(0) || context.shape(1) != u.shape(1))
            throw py::value_error("RwkvStackStep.shadow: u and context must be two (B, d) arrays");
        const int64_t B = u.shape(0), D = u.shape(1), P = static_cast<int64_t>(states.size());
        const Linear in = linear(lin_in, C, 2 * D, "lin_in"), drift_proj = linear(lin_drift, D, C, "lin_drift");
        std::vector<FloatArray> gate_arrays = parse_gates(gates, B, "RwkvStackStep.shadow");
        const std::vector<const float *> gate_ptrs = pointers(gate_arrays);
        std::vector<std::array<FloatArray, 3>> in_states;
        for (const py::handle item : states) {
            const py::tuple t = item.cast<py::tuple>();
            if (t.size() != 3) throw py::value_error("RwkvStackStep.shadow: a state is (tm_shift, wkv, cm_shift)");
            std::array<FloatArray, 3> a{FloatArray::ensure(t[0]), FloatArray::ensure(t[1]), FloatArray::ensure(t[2])};
            if (!a[0] || !a[1] || !a[2] || a[0].size() != L * B * C || a[2].size() != L * B * C ||
                a[1].size() != L * B * H * N * N)
                throw py::value_error("RwkvStackStep.shadow: a state does not fit this stack and batch");
            in_states.push_back(std::move(a));
        }
        std::vector<std::array<py::array_t<float>, 3>> out_states;
        for (int64_t p = 0; p < P; ++p)
            out_states.push_back({py::array_t<float>({L, B, C}), py::array_t<float>({L, B, H, N, N}),
                                  py::array_t<float>({L, B, C})});
        std::vector<std::array<const float *, 3>> in_ptrs;
        std::vector<std::array<float *, 3>> out_ptrs;
        for (int64_t p = 0; p < P; ++p) {
            in_ptrs.push_back({in_states[p][0].data(), in_states[p][1].data(), in_states[p][2].data()});
            out_ptrs.push_back({out_states[p][0].mutable_data(), out_states[p][1].mutable_data(),
                                out_states[p][2].mutable_data()});
        }
        py::array_t<float> drift_out({B, D});
        float *drift = drift_out.mutable_data();
        std::vector<uint8_t> ran(static_cast<size_t>(P), 0);
        int64_t rows_run = 0;
        double commitment = 0.0;
        {
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(mutex_);
            PoolHold hold;
            std::vector<float> x_in(static_cast<size_t>(B * 2 * D)), x(static_cast<size_t>(B * C)),
                z(static_cast<size_t>(B * C)), step(static_cast<size_t>(B * D));
            std::vector<uint8_t> frozen(static_cast<size_t>(B), 0), none(static_cast<size_t>(B), 0);
            std::fill(drift, drift + B * D, 0.0f);
            const float *pu = u.data(), *pc = context.data();
            for (int64_t p = 0; p < P; ++p) {
                const bool all_frozen = std::all_of(frozen.begin(), frozen.end(), [](uint8_t f) { return f != 0; });
                if (!(p > 0 && all_frozen)) {
                    ran[p] = 1;
                    for (int64_t b = 0; b < B; ++b) {
                        rows_run += frozen[b] ? 0 : 1;
                        std::copy(pu + b * D, pu + (b + 1) * D, x_in.data() + b * 2 * D);
                        for (int64_t i = 0; i < D; ++i) x_in[b * 2 * D + D + i] = pc[b * D + i] + drift[b * D + i];
                    }
                    apply(in, x_in.data(), B, x.data());
                    const std::array<const float *, 3> &s = in_ptrs[p];
                    const std::array<float *, 3> &o = out_ptrs[p];
                    run(B, x.data(), s[0], s[1], s[2], gate_ptrs, p > 0 ? frozen.data() : none.data(), z.data(), o[0], o[1],
                        o[2]);
                    apply(drift_proj, z.data(), B, step.data());
                    for (int64_t b = 0; b < B; ++b) {
                        float top = 0.0f;
                        for (int64_t i = 0; i < D; ++i) {
                            const float v = frozen[b] ? 0.0f : std::tanh(step[b * D + i]);
                            drift[b * D + i] += v;
                            top = std::max(top, std::fabs(v));
                        }
                        if (top < atol) frozen[b] = 1;
                    }
                }
                for (int64_t b = 0; b < B; ++b) {
                    double sq = 0.0;
                    for (int64_t i = 0; i < D; ++i) sq += static_cast<double>(drift[b * D + i]) * drift[b * D + i];
                    commitment += std::max(0.0, sq - threshold);
                }
            }
        }
        py::list new_states;
        for (int64_t p = 0; p < P; ++p) {
            if (ran[p]) new_states.append(py::make_tuple(out_states[p][0], out_states[p][1], out_states[p][2]));
            else new_states.append(py::none());
        }
        return py::make_tuple(drift_out, new_states, rows_run, commitment);
    }

    // One round of the reasoner for one token per row (hierarchos/model/hrm.py, HierarchicalReasoner._round
    // at T = 1 with ACT halting and no shadow pass of the worker; this stack is the worker, `manager`
    // the manager's), the projections on the same integer matvecs as QuantLinear:
    //   h = h_input_proj(u) (+ l_feedback_proj(feedback)); watch = manager(h) on the watch state
    //   context = plan_prev + alpha (plan_last - plan_prev)
    //   at a plan point: ACT over the pondering passes p < P (pass p: z = manager(watch + refinement) on
    //     pondering state p, halted rows frozen from p = 1, refinement = z - pass input; halt_prob =
    //     sigmoid(h_halt z + b); a pass once every row halted is skipped); plan = h_to_context(mix);
    //     plan_prev' = plan_last, plan_last' = plan
    //   y = u + l_to_out(worker(l_input_proj([u, context])) on the commit state)
    // states: (tm_shift, wkv, cm_shift) tuples; ponder: one per pass (used at a plan point only).
    // Returns (y, watch', commit', ponder' (None for a pass not run), plan_prev', plan_last', sum of the
    // expected steps, sum of the halting steps, logits); at no plan point the plans come back as given.
    // Given the model's head (out_norm and lm_head), the call goes on to the logits of y, else None.
    py::tuple round(RwkvStackStep &manager, const FloatArray &u, const py::object &feedback, const py::tuple &watch,
                    const py::tuple &commit, const py::list &ponder, const FloatArray &plan_prev,
                    const FloatArray &plan_last, float alpha, bool is_plan, double thresh, const py::tuple &lin_h_in,
                    const py::object &lin_feedback, const FloatArray &halt_w, float halt_b, const py::tuple &lin_h_ctx,
                    const py::tuple &lin_l_in, const py::tuple &lin_l_out, const py::object &manager_gates,
                    const py::object &worker_gates, const py::object &head) {
        const char *where = "RwkvStackStep.round";
        if (u.ndim() != 2) throw py::value_error(std::string(where) + ": u must be a (B, d) array");
        const int64_t B = u.shape(0), D = u.shape(1), HH = manager.C_, LH = C_;
        for (const FloatArray *a : {&plan_prev, &plan_last})
            if (a->ndim() != 2 || a->shape(0) != B || a->shape(1) != D)
                throw py::value_error(std::string(where) + ": the plans must be (B, d) arrays like u");
        if (halt_w.size() != HH) throw py::value_error(std::string(where) + ": h_halt weight must hold h_hidden values");
        const Linear h_in = linear(lin_h_in, HH, D, "h_input_proj", where), h_ctx = linear(lin_h_ctx, D, HH, "h_to_context", where),
                     l_in = linear(lin_l_in, LH, 2 * D, "l_input_proj", where), l_out = linear(lin_l_out, D, LH, "l_to_out", where);
        FloatArray fb_array;
        Linear fb;
        if (!feedback.is_none()) {
            fb_array = FloatArray::ensure(feedback);
            if (!fb_array || fb_array.ndim() != 2 || fb_array.shape(0) != B || fb_array.shape(1) != D)
                throw py::value_error(std::string(where) + ": feedback must be a (B, d) array like u");
            fb = linear(lin_feedback.cast<py::tuple>(), HH, D, "l_feedback_proj", where);
        }
        // the model's head after the round: logits = W_head layer_norm(y) (+ b) (hierarchos/model/lm.py)
        FloatArray norm_w, norm_b;
        float norm_eps = 0.0f;
        Linear head_lin;
        int64_t V = 0;
        if (!head.is_none()) {
            const py::tuple h = head.cast<py::tuple>();
            if (h.size() != 4) throw py::value_error(std::string(where) + ": head must be (norm weight, norm bias, eps, linear)");
            norm_w = FloatArray::ensure(h[0]), norm_b = FloatArray::ensure(h[1]);
            if (!norm_w || !norm_b || norm_w.size() != D || norm_b.size() != D)
                throw py::value_error(std::string(where) + ": the head's norm must hold d weights and biases");
            norm_eps = h[2].cast<float>();
            const py::tuple spec = h[3].cast<py::tuple>();
            if (spec.size() != 4 || py::array::ensure(spec[0]).ndim() != 2)
                throw py::value_error(std::string(where) + ": the head's linear must be (data, qtype, cols, bias)");
            V = py::array::ensure(spec[0]).shape(0);
            head_lin = linear(spec, V, D, "head", where);
        }
        const StackState w_in = manager.stack_state(watch, B, where), c_in = stack_state(commit, B, where);
        std::vector<StackState> p_in;
        if (is_plan) {
            for (const py::handle item : ponder) p_in.push_back(manager.stack_state(item.cast<py::tuple>(), B, where));
            if (p_in.empty()) throw py::value_error(std::string(where) + ": a plan point needs at least one pondering state");
        }
        const std::vector<FloatArray> m_gate_arrays = manager.parse_gates(manager_gates, B, where),
                                      w_gate_arrays = parse_gates(worker_gates, B, where);
        const std::vector<const float *> m_gates = pointers(m_gate_arrays), w_gates = pointers(w_gate_arrays);
        const StackState w_out = manager.new_state(B), c_out = new_state(B);
        std::vector<StackState> p_out;
        for (size_t p = 0; p < p_in.size(); ++p) p_out.push_back(manager.new_state(B));
        py::array_t<float> y_out({B, D}), prev_out({B, D}), last_out({B, D}), logits_out({B, V});
        std::vector<uint8_t> ran(p_in.size(), 0);
        double expected_sum = 0.0, halting_sum = 0.0;
        {
            py::gil_scoped_release release;
            std::unique_lock<std::mutex> lock_m(manager.mutex_, std::defer_lock), lock_w(mutex_, std::defer_lock);
            if (&manager == this) lock_w.lock();
            else std::lock(lock_m, lock_w);
            PoolHold hold;
            const float *pu = u.data();
            const std::vector<uint8_t> none(static_cast<size_t>(B), 0);
            float *new_prev = prev_out.mutable_data(), *new_last = last_out.mutable_data(), *y = y_out.mutable_data();
            // The manager's lane: its input, the watch pass, at a plan point the pondering passes and the plan.
            auto manager_lane = [&] {
                std::vector<float> h(static_cast<size_t>(B * HH)), watch_x(static_cast<size_t>(B * HH));
                apply(h_in, pu, B, h.data());
                if (fb.m.data) {
                    std::vector<float> f(static_cast<size_t>(B * HH));
                    apply(fb, fb_array.data(), B, f.data());
                    for (int64_t i = 0; i < B * HH; ++i) h[i] += f[i];
                }
                manager.run(B, h.data(), w_in.tm, w_in.wkv, w_in.cm, m_gates, none.data(), watch_x.data(), w_out.tm_out,
                            w_out.wkv_out, w_out.cm_out);
                const float *pp = plan_prev.data(), *pl = plan_last.data();
                if (is_plan) {
                    ponder_act(manager, B, watch_x.data(), p_in, p_out, m_gates, halt_w.data(), halt_b, thresh, h_ctx,
                               new_last, ran, expected_sum, halting_sum);
                    std::copy(pl, pl + B * D, new_prev);
                } else {
                    std::copy(pp, pp + B * D, new_prev);
                    std::copy(pl, pl + B * D, new_last);
                }
            };
            // The worker's lane: it reads the plans as they were before this token (the context), never the
            // manager's outputs, so the two lanes are independent.
            auto worker_lane = [&] {
                std::vector<float> context(static_cast<size_t>(B * D)), x_in(static_cast<size_t>(B * 2 * D)),
                    x(static_cast<size_t>(B * LH)), z(static_cast<size_t>(B * LH));
                const float *pp = plan_prev.data(), *pl = plan_last.data();
                for (int64_t i = 0; i < B * D; ++i) context[i] = pp[i] + alpha * (pl[i] - pp[i]);
                for (int64_t b = 0; b < B; ++b) {
                    std::copy(pu + b * D, pu + (b + 1) * D, x_in.data() + b * 2 * D);
                    std::copy(context.data() + b * D, context.data() + (b + 1) * D, x_in.data() + b * 2 * D + D);
                }
                apply(l_in, x_in.data(), B, x.data());
                run(B, x.data(), c_in.tm, c_in.wkv, c_in.cm, w_gates, none.data(), z.data(), c_out.tm_out, c_out.wkv_out,
                    c_out.cm_out);
                apply(l_out, z.data(), B, y);
                for (int64_t i = 0; i < B * D; ++i) y[i] = pu[i] + y[i];
            };
            auto head_of_y = [&] {
                std::vector<float> normed(static_cast<size_t>(B * D));
                for (int64_t b = 0; b < B; ++b)
                    layer_norm(y + b * D, norm_w.data(), norm_b.data(), norm_eps, D, normed.data() + b * D);
                apply(head_lin, normed.data(), B, logits_out.mutable_data());
            };
            if (two_lanes(manager)) {
                // Each stack on its own thread, every product inside a lane on that thread alone: no pool
                // hand-off, and one lane's serial work (norms, activation quantization, the heads' state)
                // overlaps the other's weight stream. At a plan point the manager's lane streams twice
                // the worker's weights, so the worker's lane takes the head too; elsewhere the head,
                // once both lanes are done, on the whole pool. The same products in the same order as
                // the serial path: the same bits.
                const bool head_in_lane = V && is_plan;
                parallel_tasks(2, [&](int64_t lane) {
                    SerialRegion serial;
                    if (lane == 0) {
                        manager_lane();
                    } else {
                        worker_lane();
                        if (head_in_lane) head_of_y();
                    }
                }, 2);
                if (V && !head_in_lane) head_of_y();
            } else {
                manager_lane();
                worker_lane();
                if (V) head_of_y();
            }
        }
        py::list ponder_new;
        for (size_t p = 0; p < p_out.size(); ++p) ponder_new.append(ran[p] ? p_out[p].arrays() : py::object(py::none()));
        return py::make_tuple(y_out, w_out.arrays(), c_out.arrays(), ponder_new, prev_out, last_out, expected_sum,
                              halting_sum, V ? py::object(logits_out) : py::object(py::none()));
    }

private:
    struct Linear {
        QMat m;
        const float *bias = nullptr;
        ByteArray data;
        FloatArray bias_array;
    };

    // (data, qtype, cols, bias or None) of a quantized (rows x cols) projection, held for the call.
    Linear linear(const py::tuple &spec, int64_t rows, int64_t cols, const char *name,
                  const char *caller = "RwkvStackStep.shadow") {
        const std::string where = std::string(caller) + ": " + name;
        if (spec.size() != 4) throw py::value_error(where + " must be (data, qtype, cols, bias)");
        Linear l;
        l.m = qmat(spec, rows, cols, where, l.data);
        if (!spec[3].is_none()) {
            l.bias_array = FloatArray::ensure(spec[3]);
            if (!l.bias_array || l.bias_array.size() != rows) throw py::value_error(where + ": bias has the wrong size");
            l.bias = l.bias_array.data();
        }
        return l;
    }

    // A stack's state for one call: the inputs (tm_shift, wkv, cm_shift) held for the call, or new
    // output arrays (`arrays()` hands them to Python).
    struct StackState {
        FloatArray tm_a, wkv_a, cm_a;
        const float *tm = nullptr, *wkv = nullptr, *cm = nullptr;
        py::array_t<float> tm_o, wkv_o, cm_o;
        float *tm_out = nullptr, *wkv_out = nullptr, *cm_out = nullptr;
        py::tuple arrays() const { return py::make_tuple(tm_o, wkv_o, cm_o); }
    };

    StackState stack_state(const py::tuple &t, int64_t B, const char *where) const {
        const int64_t L = n_layers();
        if (t.size() != 3) throw py::value_error(std::string(where) + ": a state is (tm_shift, wkv, cm_shift)");
        StackState s;
        s.tm_a = FloatArray::ensure(t[0]), s.wkv_a = FloatArray::ensure(t[1]), s.cm_a = FloatArray::ensure(t[2]);
        if (!s.tm_a || !s.wkv_a || !s.cm_a || s.tm_a.size() != L * B * C_ || s.cm_a.size() != L * B * C_ ||
            s.wkv_a.size() != L * B * H_ * N_ * N_)
            throw py::value_error(std::string(where) + ": a state does not fit its stack and batch");
        s.tm = s.tm_a.data(), s.wkv = s.wkv_a.data(), s.cm = s.cm_a.data();
        return s;
    }

    StackState new_state(int64_t B) const {
        const int64_t L = n_layers();
        StackState s;
        s.tm_o = py::array_t<float>({L, B, C_}), s.wkv_o = py::array_t<float>({L, B, H_, N_, N_});
        s.cm_o = py::array_t<float>({L, B, C_});
        s.tm_out = s.tm_o.mutable_data(), s.wkv_out = s.wkv_o.mutable_data(), s.cm_out = s.cm_o.mutable_data();
        return s;
    }

    // `_ponder` of hrm.py for one plan point per row (ACT): the passes on this (the manager's) stack, the
    // plan h_to_context(mix) into `plan`; the GIL released, this object's scratch held by the caller.
    void ponder_act(RwkvStackStep &m, int64_t B, const float *watch, const std::vector<StackState> &in,
                    const std::vector<StackState> &out, const std::vector<const float *> &gates, const float *halt_w,
                    float halt_b, double thresh, const Linear &h_ctx, float *plan, std::vector<uint8_t> &ran,
                    double &expected_sum, double &halting_sum) {
        const int64_t HH = m.C_, P = static_cast<int64_t>(in.size());
        std::vector<float> pass_in(static_cast<size_t>(B * HH)), z(static_cast<size_t>(B * HH)),
            refinement(static_cast<size_t>(B * HH), 0.0f), mix(static_cast<size_t>(B * HH), 0.0f);
        std::vector<float> remainder(static_cast<size_t>(B), 1.0f), expected(static_cast<size_t>(B), 0.0f),
            halting_step(static_cast<size_t>(B), 0.0f);
        std::vector<uint8_t> halted(static_cast<size_t>(B), 0), none(static_cast<size_t>(B), 0);
        for (int64_t p = 0; p < P; ++p) {
            if (p > 0 && std::all_of(halted.begin(), halted.end(), [](uint8_t f) { return f != 0; })) break;
            ran[p] = 1;
            for (int64_t i = 0; i < B * HH; ++i) pass_in[i] = watch[i] + refinement[i];
            m.run(B, pass_in.data(), in[p].tm, in[p].wkv, in[p].cm, gates, p > 0 ? halted.data() : none.data(), z.data(),
                  out[p].tm_out, out[p].wkv_out, out[p].cm_out);
            for (int64_t i = 0; i < B * HH; ++i) refinement[i] = z[i] - pass_in[i];
            for (int64_t b = 0; b < B; ++b) {
                const float *zb = z.data() + b * HH;
                float dot = 0.0f;
                for (int64_t i = 0; i < HH; ++i) dot += zb[i] * halt_w[i];
                const float halt_prob = 1.0f / (1.0f + std::exp(-(dot + halt_b)));
                const bool active = !halted[b];
                const float accumulated = 1.0f - remainder[b] * (1.0f - halt_prob);
                const bool stop = active && ((thresh < 1.0 && p < P - 1) ? accumulated >= static_cast<float>(thresh) : p == P - 1);
                const float weight = active ? (stop ? remainder[b] : halt_prob * remainder[b]) : 0.0f;
                for (int64_t i = 0; i < HH; ++i) mix[b * HH + i] += weight * zb[i];
                expected[b] += static_cast<float>(p + 1) * weight;
                if (stop) halting_step[b] = static_cast<float>(p + 1);
                if (active && !stop) remainder[b] = remainder[b] * (1.0f - halt_prob);
                if (stop) halted[b] = 1;
            }
        }
        for (int64_t b = 0; b < B; ++b) expected_sum += expected[b], halting_sum += halting_step[b];
        apply(h_ctx, mix.data(), B, plan);
    }

    // y (B, rows) = x (B, cols) W^T (+ bias), as QuantLinear computes it
    static void apply(const Linear &l, const float *x, int64_t B, float *y) {
        matmul(l.m.t, l.m.data, l.m.rows, l.m.cols, x, B, y);
        if (l.bias)
            for (int64_t b = 0; b < B; ++b)
                for (int64_t i = 0; i < l.m.rows; ++i) y[b * l.m.rows + i] += l.bias[i];
    }

    std::vector<FloatArray> parse_gates(const py::object &gates, int64_t B, const char *where) const {
        std::vector<FloatArray> arrays;
        if (gates.is_none()) return arrays;
        for (const py::handle gate : gates.cast<py::list>()) {
            arrays.push_back(FloatArray::ensure(gate));
            if (!arrays.back() || arrays.back().ndim() != 2 || arrays.back().shape(0) != B || arrays.back().shape(1) != F_)
                throw py::value_error(std::string(where) + ": a DeepEmbed gate is not a (B, ffn_dim) float array");
        }
        if (static_cast<int64_t>(arrays.size()) != n_layers())
            throw py::value_error(std::string(where) + ": one DeepEmbed gate per layer");
        return arrays;
    }

    static std::vector<const float *> pointers(const std::vector<FloatArray> &arrays) {
        std::vector<const float *> out;
        for (const FloatArray &a : arrays) out.push_back(a.data());
        return out;
    }

    const float *vec(const py::dict &d, const char *name, int64_t size) {
        if (!d.contains(name)) throw py::value_error(std::string("RwkvStackStep: layer lacks '") + name + "'");
        FloatArray a = FloatArray::ensure(d[name]);
        if (!a || a.size() != size)
            throw py::value_error(std::string("RwkvStackStep: '") + name + "' must hold " + std::to_string(size) +
                                  " float32 values");
        keep_.push_back(a);  // the pointer stays valid while the step object lives
        return a.data();
    }

    // Low-rank matrices (count of them, each in x out, one after another): float32 (read in place),
    // or fp16 (a numpy float16 array), copied into column blocks (LowRank). fp16 with a width that
    // is not a whole number of blocks goes to a float32 copy (exact).
    LowRank low_rank(const py::dict &d, const char *name, int64_t count, int64_t in, int64_t out) {
        if (!d.contains(name)) throw py::value_error(std::string("RwkvStackStep: layer lacks '") + name + "'");
        const int64_t size = count * in * out;
        const py::array a = py::array::ensure(d[name]);
        if (!(a && a.dtype().kind() == 'f' && a.itemsize() == 2)) return {vec(d, name, size), nullptr, in};
        if (a.size() != size || !(a.flags() & py::array::c_style))
            throw py::value_error(std::string("RwkvStackStep: '") + name + "' must hold " + std::to_string(size) +
                                  " contiguous float16 values");
        const uint16_t *src = static_cast<const uint16_t *>(a.data());
        if (out % kHalfBlock || N_ % kHalfBlock) {
            owned_f_.emplace_back(static_cast<size_t>(size));
            for (int64_t e = 0; e < size; ++e) owned_f_.back()[e] = half_to_float(src[e]);
            return {owned_f_.back().data(), nullptr, in};
        }
        owned_h_.emplace_back(static_cast<size_t>(size));
        uint16_t *dst = owned_h_.back().data();
        for (int64_t m = 0; m < count; ++m)
            for (int64_t i = 0; i < in; ++i)
                for (int64_t j = 0; j < out; ++j)
                    dst[m * in * out + ((j / kHalfBlock) * in + i) * kHalfBlock + j % kHalfBlock] = src[m * in * out + i * out + j];
        return {nullptr, dst, in};
    }

    // (data, qtype, cols, ...) of a quantized (rows x cols) matrix; `data` holds its blocks.
    static QMat qmat(const py::tuple &spec, int64_t rows, int64_t cols, const std::string &what, ByteArray &data) {
        data = ByteArray::ensure(spec[0]);
        QMat m{parse_qtype(spec[1].cast<std::string>()), nullptr, rows, cols};
        if (!data || data.ndim() != 2 || data.shape(0) != rows || spec[2].cast<int64_t>() != cols ||
            cols % block_size(m.t) || data.shape(1) != cols / block_size(m.t) * block_bytes(m.t))
            throw py::value_error(what + " is not a (" + std::to_string(rows) + ", " + std::to_string(cols) +
                                  ") quantized matrix");
        m.data = data.data();
        return m;
    }

    QMat quant(const py::dict &d, const char *name, int64_t rows, int64_t cols) {
        if (!d.contains(name)) throw py::value_error(std::string("RwkvStackStep: layer lacks '") + name + "'");
        ByteArray data;
        const QMat m = qmat(d[name].cast<py::tuple>(), rows, cols, std::string("RwkvStackStep: '") + name + "'", data);
        keep_.push_back(data);
        return m;
    }

    Layer parse_layer(const py::dict &d) {
        const int64_t C = C_, F = F_;
        Layer L{};
        auto rank = [&](const char *name) { return d[name].cast<int64_t>(); };
        L.ln1_w = vec(d, "ln_time.weight", C), L.ln1_b = vec(d, "ln_time.bias", C);
        L.ln2_w = vec(d, "ln_channel.weight", C), L.ln2_b = vec(d, "ln_channel.bias", C);
        L.ln1_eps = d["ln_time.eps"].cast<float>(), L.ln2_eps = d["ln_channel.eps"].cast<float>();
        L.norm_eps = d["norm.eps"].cast<float>();
        L.ddlerp = d["ddlerp"].cast<bool>();
        L.mix = vec(d, "mix", 6 * C);
        if (L.ddlerp) {
            L.mix_rank = rank("mix_rank");
            if (L.mix_rank <= 0) throw py::value_error("RwkvStackStep: mix_rank must be positive");
            L.mix_base = vec(d, "mix_base", C);
            L.mix_down = low_rank(d, "mix_down", 1, C, 6 * L.mix_rank);
            L.mix_up = low_rank(d, "mix_up", 6, L.mix_rank, C);
        }
        L.decay_rank = rank("decay_rank"), L.iclr_rank = rank("iclr_rank");
        L.decay_base = vec(d, "decay_base", C), L.decay_down = low_rank(d, "decay_down", 1, C, L.decay_rank);
        L.decay_up = low_rank(d, "decay_up", 1, L.decay_rank, C);
        L.iclr_base = vec(d, "iclr_base", C), L.iclr_down = low_rank(d, "iclr_down", 1, C, L.iclr_rank);
        L.iclr_up = low_rank(d, "iclr_up", 1, L.iclr_rank, C);
        L.removal_scale = vec(d, "removal_scale", C), L.key_iclr_mix = vec(d, "key_iclr_mix", C);
        L.bonus = vec(d, "bonus", C), L.norm_w = vec(d, "norm.weight", C), L.norm_b = vec(d, "norm.bias", C);
        L.gate_full = d["gate_full"].cast<bool>();
        if (L.gate_full) {
            L.g = quant(d, "gate", C, C);
        } else {
            L.gate_rank = rank("gate_rank");
            L.gate_down = low_rank(d, "gate_down", 1, C, L.gate_rank);
            L.gate_up = low_rank(d, "gate_up", 1, L.gate_rank, C);
        }
        L.value_first = d["value_first"].cast<bool>();
        L.value_residual = d["value_residual"].cast<bool>();
        if (L.value_residual) {
            L.vr_rank = rank("vr_rank");
            L.vr_base = vec(d, "vr_base", C), L.vr_down = low_rank(d, "vr_down", 1, C, L.vr_rank);
            L.vr_up = low_rank(d, "vr_up", 1, L.vr_rank, C);
        }
        L.r = quant(d, "receptance", C, C), L.k = quant(d, "key", C, C), L.v = quant(d, "value", C, C);
        L.o = quant(d, "output", C, C);
        L.cm_mix = vec(d, "cm_mix", C);
        L.cm_gate = quant(d, "cm_gate", F, C), L.cm_up = quant(d, "cm_up", F, C), L.cm_down = quant(d, "cm_down", C, F);
        for (int64_t r : {L.mix_rank, L.decay_rank, L.iclr_rank, L.gate_rank, L.vr_rank})
            if (r < 0 || r > 4096) throw py::value_error("RwkvStackStep: a low-rank width is out of range");
        return L;
    }

    void ensure_scratch(int64_t B) {
        if (B == rows_) return;
        rows_ = B;
        int64_t max_rank = 1;
        for (const Layer &L : layers_)
            max_rank = std::max({max_rank, 6 * L.mix_rank, L.decay_rank, L.iclr_rank, L.gate_rank, L.vr_rank});
        const size_t BC = static_cast<size_t>(B * C_);
        for (auto *v : {&xa_, &delta_, &base_, &r_, &k_, &v_, &g_, &log_w_, &iclr_, &vfirst_, &att_in_, &att_out_,
                        &xc_, &xk_, &ffn_out_, &tmp_})
            v->assign(BC, 0.0f);
        xs_.assign(6 * BC, 0.0f);
        for (auto *v : {&low1_, &low2_, &low3_, &low4_}) v->assign(static_cast<size_t>(B * max_rank), 0.0f);
        hid_g_.assign(static_cast<size_t>(B * F_), 0.0f);
        hid_u_.assign(static_cast<size_t>(B * F_), 0.0f);
    }

    void time_mix(const Layer &L, int64_t B, const float *tm_in, const float *wkv_in, const uint8_t *frozen,
                  float *x, float *tm_out, float *wkv_out) {
        const int64_t C = C_, H = H_, N = N_, BC = B * C;
        float *xs = xs_.data();
        for (int64_t b = 0; b < B; ++b) {
            float *xa = xa_.data() + b * C, *delta = delta_.data() + b * C;
            const float *prev = tm_in + b * C;
            layer_norm(x + b * C, L.ln1_w, L.ln1_b, L.ln1_eps, C, xa);
            std::copy(frozen[b] ? prev : xa, (frozen[b] ? prev : xa) + C, tm_out + b * C);
            for (int64_t c = 0; c < C; ++c) delta[c] = prev[c] - xa[c];
            if (L.ddlerp)
                for (int64_t c = 0; c < C; ++c) base_[b * C + c] = xa[c] + delta[c] * L.mix_base[c];
        }
        const float *xa = xa_.data(), *delta = delta_.data();
        if (L.ddlerp) {  // tanh(base @ mix_down) (B, 6R), then each target's rank-R correction
            const int64_t R = L.mix_rank;
            run_vecmats({{base_.data(), C, L.mix_down, C, 6 * R, low1_.data(), 6 * R}}, B, kSmallCols);
            for (int64_t i = 0; i < B * 6 * R; ++i) low1_[i] = std::tanh(low1_[i]);
            // task (target t, column chunk): its up product, then its inputs x_t = xa + delta (mix_t + lora_t)
            const int64_t chunks = (C + kCols - 1) / kCols;
            parallel_tasks(6 * chunks, [&](int64_t task) {
                const int64_t t = task / chunks, j0 = (task % chunks) * kCols, j1 = std::min(C, j0 + kCols);
                float *xt = xs + t * BC;
                vecmat_cols(low1_.data() + t * R, 6 * R, L.mix_up.at(t * R * C), R, C, xt, C, B, j0, j1);
                for (int64_t b = 0; b < B; ++b)
                    for (int64_t c = j0; c < j1; ++c) {
                        const int64_t i = b * C + c;
                        xt[i] = xa[i] + delta[i] * (L.mix[t * C + c] + xt[i]);
                    }
            });
        } else {
            for (int64_t t = 0; t < 6; ++t)
                for (int64_t i = 0; i < BC; ++i) xs[t * BC + i] = xa[i] + delta[i] * L.mix[t * C + i % C];
        }
        // x_0..x_5: receptance, decay, key, value, iclr, gate inputs
        const float *xr = xs, *xw = xs + BC, *xk = xs + 2 * BC, *xv = xs + 3 * BC, *xi = xs + 4 * BC, *xg = xs + 5 * BC;
        // one pool job: the quantized projections and the low-rank paths' down products
        std::vector<MatmulJob> jobs{job(L.r, xr, B, r_.data()), job(L.k, xk, B, k_.data()), job(L.v, xv, B, v_.data())};
        if (L.gate_full) jobs.push_back(job(L.g, xg, B, g_.data()));
        batch_.prepare(jobs);
        std::vector<VecMat> downs{{xw, C, L.decay_down, C, L.decay_rank, low1_.data(), L.decay_rank},
                                  {xi, C, L.iclr_down, C, L.iclr_rank, low2_.data(), L.iclr_rank}};
        if (!L.gate_full) downs.push_back({xg, C, L.gate_down, C, L.gate_rank, low3_.data(), L.gate_rank});
        if (L.value_residual) downs.push_back({xv, C, L.vr_down, C, L.vr_rank, low4_.data(), L.vr_rank});
        const VecMatTasks down_tasks(downs, kSmallCols);
        const int64_t n_mm = batch_.n_tasks();
        parallel_tasks(n_mm + down_tasks.size(), [&](int64_t task) {
            if (task < n_mm) batch_.run_task(task);
            else down_tasks.run(task - n_mm, B);
        });
        for (int64_t i = 0; i < B * L.decay_rank; ++i) low1_[i] = std::tanh(low1_[i]);
        for (int64_t i = 0; i < B * L.gate_rank; ++i) low3_[i] = sigmoid(low3_[i]);
        // one pool job: per (row, head), the up products of its channels, decay, in-context rate,
        // gates and value residual, then the recurrence (each (row, head) owns its state block)
        const int64_t hs = N * N;
        parallel_tasks(B * H, [&](int64_t task) {
            const int64_t b = task / H, h = task % H, off = b * C + h * N, c0 = h * N, c1 = c0 + N;
            vecmat_cols(low1_.data() + b * L.decay_rank, L.decay_rank, L.decay_up, L.decay_rank, C, log_w_.data() + b * C, C, 1, c0, c1);
            vecmat_cols(low2_.data() + b * L.iclr_rank, L.iclr_rank, L.iclr_up, L.iclr_rank, C, iclr_.data() + b * C, C, 1, c0, c1);
            if (!L.gate_full)
                vecmat_cols(low3_.data() + b * L.gate_rank, L.gate_rank, L.gate_up, L.gate_rank, C, g_.data() + b * C, C, 1, c0, c1);
            if (L.value_residual)
                vecmat_cols(low4_.data() + b * L.vr_rank, L.vr_rank, L.vr_up, L.vr_rank, C, tmp_.data() + b * C, C, 1, c0, c1);
            head_gates(L, c0, N, log_w_.data() + off, iclr_.data() + off, g_.data() + off, v_.data() + off,
                       vfirst_.data() + off, tmp_.data() + off);
            wkv_head(wkv_in + task * hs, wkv_out + task * hs, N, r_.data() + off, k_.data() + off, v_.data() + off, g_.data() + off,
                     log_w_.data() + off, iclr_.data() + off, L, c0, frozen[b] != 0, att_in_.data() + off);
        });
        matmul(L.o.t, L.o.data, L.o.rows, L.o.cols, att_in_.data(), B, att_out_.data());
        for (int64_t i = 0; i < BC; ++i) x[i] += att_out_[i];
    }

    void channel_mix(const Layer &L, int64_t B, const float *cm_in, const float *gate, const uint8_t *frozen, float *x,
                     float *cm_out) {
        const int64_t C = C_, F = F_;
        for (int64_t b = 0; b < B; ++b) {
            float *xc = xc_.data() + b * C, *xk = xk_.data() + b * C;
            const float *prev = cm_in + b * C;
            layer_norm(x + b * C, L.ln2_w, L.ln2_b, L.ln2_eps, C, xc);
            std::copy(frozen[b] ? prev : xc, (frozen[b] ? prev : xc) + C, cm_out + b * C);
            for (int64_t c = 0; c < C; ++c) xk[c] = xc[c] + (prev[c] - xc[c]) * L.cm_mix[c];
        }
        matmul_many({job(L.cm_gate, xk_.data(), B, hid_g_.data()), job(L.cm_up, xk_.data(), B, hid_u_.data())});
        swiglu(hid_g_.data(), hid_u_.data(), gate, B * F, hid_g_.data());
        matmul(L.cm_down.t, L.cm_down.data, L.cm_down.rows, L.cm_down.cols, hid_g_.data(), B, ffn_out_.data());
        for (int64_t i = 0; i < B * C; ++i) x[i] += ffn_out_[i];
    }

    void run(int64_t B, const float *x_in, const float *tm, const float *wkv, const float *cm,
             const std::vector<const float *> &gates, const uint8_t *frozen, float *x, float *tm_out, float *wkv_out,
             float *cm_out) {
        ensure_scratch(B);
        const int64_t C = C_, state = B * H_ * N_ * N_;
        std::copy(x_in, x_in + B * C, x);
        for (int64_t l = 0; l < n_layers(); ++l) {
            const Layer &L = layers_[l];
            time_mix(L, B, tm + l * B * C, wkv + l * state, frozen, x, tm_out + l * B * C, wkv_out + l * state);
            channel_mix(L, B, cm + l * B * C, gates.empty() ? nullptr : gates[l], frozen, x, cm_out + l * B * C);
        }
    }

    int64_t C_, N_, H_, F_;
    std::vector<Layer> layers_;
    std::vector<py::object> keep_;
    std::deque<std::vector<uint16_t>> owned_h_;  // fp16 low-rank matrices in column blocks
    std::deque<std::vector<float>> owned_f_;     // fp16 ones of a width not in whole blocks, as float32
    std::mutex mutex_;
    int64_t rows_ = -1;
    MatmulBatch batch_;  // the projections of one time mix, run inside the step's own pool job
    std::vector<float> xa_, delta_, base_, xs_, r_, k_, v_, g_, log_w_, iclr_, vfirst_, att_in_, att_out_, xc_, xk_,
        ffn_out_, tmp_, low1_, low2_, low3_, low4_, hid_g_, hid_u_;
};

}  // namespace

void register_rwkv_step(py::module_ &m) {
    py::class_<RwkvStackStep>(m, "RwkvStackStep",
                              "one token through a whole quantized RWKV-7 stack (hierarchos/quant/fused_step.py)")
        .def(py::init<int64_t, int64_t, int64_t, const py::list &>(), py::arg("dim"), py::arg("head_size"),
             py::arg("ffn_dim"), py::arg("layers"))
        .def_property_readonly("n_layers", &RwkvStackStep::n_layers)
        .def_readwrite("lanes", &RwkvStackStep::lanes,
                       "round: the manager's and the worker's stacks side by side, one thread each (same results)")
        .def("step", &RwkvStackStep::step, py::arg("x"), py::arg("tm_shift"), py::arg("wkv"), py::arg("cm_shift"),
             py::arg("gates") = py::none(), py::arg("frozen") = py::none(),
             "x (B, dim), states (L, B, ...) -> (x, tm_shift, wkv, cm_shift), new arrays; inputs unchanged")
        .def("shadow", &RwkvStackStep::shadow, py::arg("u"), py::arg("context"), py::arg("states"), py::arg("lin_in"),
             py::arg("lin_drift"), py::arg("atol"), py::arg("threshold"), py::arg("gates") = py::none(),
             "the worker's shadow passes at T = 1 -> (drift, states, rows run, commitment); see rwkv_step.cpp")
        .def("round", &RwkvStackStep::round, py::arg("manager"), py::arg("u"), py::arg("feedback"), py::arg("watch"),
             py::arg("commit"), py::arg("ponder"), py::arg("plan_prev"), py::arg("plan_last"), py::arg("alpha"),
             py::arg("is_plan"), py::arg("thresh"), py::arg("lin_h_in"), py::arg("lin_feedback"), py::arg("halt_weight"),
             py::arg("halt_bias"), py::arg("lin_h_ctx"), py::arg("lin_l_in"), py::arg("lin_l_out"),
             py::arg("manager_gates") = py::none(), py::arg("worker_gates") = py::none(), py::arg("head") = py::none(),
             "one reasoner round at T = 1 (this stack the worker) -> (y, watch, commit, ponder, plan_prev, plan_last, "
             "expected steps, halting steps, logits: with head (norm weight, norm bias, eps, linear), else None); "
             "see rwkv_step.cpp");
}

}  // namespace hk
