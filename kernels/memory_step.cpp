// One token's read of the Titans-style long-term memory (hierarchos/model/memory.py: LongTermMemory
// .forward at T = 1 on a token that closes no chunk, so no write) in one call: at batch 1 the
// Python read is ~25 small torch ops (query, scores over every slot, top-k, softmax, two gathers,
// the surprise's scatter into a copy of its table) around two tiny matvecs, ~0.4 ms of a 125m
// Q4_0 token's ~4.5 (BENCHMARKS.md, issue 17). The Python read stays the reference
// (hierarchos/quant/fused_step.py decides when this applies; tests/test_quant_fused_step.py holds
// the two equal). Per row b, with e the memory input (D):
//   q = W_q e, scores_s = q . keys_s (-inf for a dormant slot), the k best (descending)
//   attn = softmax(their scores); read = sum_j attn_j (values_{i_j} + delta_{b, i_j})
//   err = 2 (read - W_t e); surprise' = surprise + scatter of attn_j err onto slot i_j; input_sum' = input_sum + e
// the projections on the same integer matvecs as QuantLinear (their 8-bit activations). Given the
// model's encoder, the call goes on to its input: u = gelu(W_enc [e, read, persistent] + b).
#include "memory_step.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "runtime.h"

namespace py = pybind11;

namespace hk {

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;
using SourceArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// slot_source of a slot not allocated yet (hierarchos/model/memory.py: DORMANT_SOURCE): never read
constexpr int64_t kDormantSource = -2;

struct Projection {
    QType t;
    ByteArray data;
    int64_t rows, cols;
    FloatArray bias;
    bool has_bias = false;
};

Projection projection(const py::tuple &spec, int64_t rows, int64_t cols, const char *name) {
    const std::string where = std::string("memory_read: ") + name;
    if (spec.size() != 3 && spec.size() != 4) throw py::value_error(where + " must be (data, qtype, cols[, bias])");
    const std::string qtype = spec[1].cast<std::string>();
    QType t;
    if (!qtype_from_name(qtype.c_str(), &t)) throw py::value_error(where + ": unknown qtype '" + qtype + "'");
    Projection p{t, ByteArray::ensure(spec[0]), rows, cols};
    if (!p.data || p.data.ndim() != 2 || p.data.shape(0) != rows || spec[2].cast<int64_t>() != cols ||
        cols % block_size(p.t) || p.data.shape(1) != cols / block_size(p.t) * block_bytes(p.t))
        throw py::value_error(where + " is not a (" + std::to_string(rows) + ", " + std::to_string(cols) +
                              ") quantized matrix");
    if (spec.size() == 4 && !spec[3].is_none()) {
        p.bias = FloatArray::ensure(spec[3]);
        if (!p.bias || p.bias.size() != rows) throw py::value_error(where + ": bias has the wrong size");
        p.has_bias = true;
    }
    return p;
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HK_MEMORY_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HK_MEMORY_CLONES
#endif

// a . b in 16 interleaved partial sums (i mod 16; a vector's lanes), then those in order: a slot's
// score is a 128-long dot product, and one running sum made each a chain of dependent additions
// (the read 0.28 -> 0.25 ms a token). torch's product sums in another order anyway (the tests allow for it).
HK_MEMORY_CLONES float dot(const float *a, const float *b, int64_t n) {
    float acc[16] = {0.0f};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; ++j) s += acc[j];
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// memory_read's pool tasks: the surprise table's copy in pieces of 64 KB, the slots' scores in runs of 128
constexpr int64_t kCopyFloats = 16384, kScoreSlots = 128;

// The k best of scores (descending; among equal scores the lower index first), as torch.topk picks them.
void top_k(const float *scores, int64_t n, int64_t k, std::vector<int64_t> &idx) {
    idx.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) idx[i] = i;
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) {
        return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    });
    idx.resize(static_cast<size_t>(k));
}

py::tuple memory_read(const FloatArray &e, const py::tuple &query, const py::tuple &target, const FloatArray &keys,
                      const SourceArray &slot_source, int64_t k, const FloatArray &values, const FloatArray &delta,
                      const FloatArray &surprise, const FloatArray &input_sum, const py::object &encoder,
                      const py::object &persistent) {
    if (e.ndim() != 2) throw py::value_error("memory_read: e must be a (B, dim) array");
    const int64_t B = e.shape(0), D = e.shape(1);
    if (keys.ndim() != 2 || values.ndim() != 2 || values.shape(0) != keys.shape(0))
        throw py::value_error("memory_read: keys (slots, key_dim) and values (slots, val_dim) must have one row per slot");
    const int64_t S = keys.shape(0), Dk = keys.shape(1), Dv = values.shape(1);
    if (k <= 0 || k > S) throw py::value_error("memory_read: k must be in 1..slots");
    if (slot_source.ndim() != 1 || slot_source.shape(0) != S)
        throw py::value_error("memory_read: slot_source must hold one id per slot");
    for (const FloatArray *a : {&delta, &surprise})
        if (a->ndim() != 3 || a->shape(0) != B || a->shape(1) != S || a->shape(2) != Dv)
            throw py::value_error("memory_read: delta and surprise must be (B, slots, val_dim) arrays");
    if (input_sum.ndim() != 2 || input_sum.shape(0) != B || input_sum.shape(1) != D)
        throw py::value_error("memory_read: input_sum must be a (B, dim) array like e");
    const Projection wq = projection(query, Dk, D, "query"), wt = projection(target, Dv, D, "target");
    // the encoder after the read: u = gelu(W_enc [e, read, persistent] + b) (hierarchos/model/lm.py)
    FloatArray pers;
    Projection we{};
    int64_t E = 0;
    if (!encoder.is_none()) {
        pers = FloatArray::ensure(persistent);
        if (!pers || pers.ndim() != 1) throw py::value_error("memory_read: persistent must be a 1-d array");
        const py::tuple spec = encoder.cast<py::tuple>();
        if (spec.size() < 3 || py::array::ensure(spec[0]).ndim() != 2)
            throw py::value_error("memory_read: encoder must be (data, qtype, cols[, bias])");
        E = py::array::ensure(spec[0]).shape(0);
        we = projection(spec, E, D + Dv + pers.shape(0), "encoder");
    }
    py::array_t<float> read_out({B, Dv}), surprise_out({B, S, Dv}), sum_out({B, D}), u_out({B, E});
    {
        py::gil_scoped_release release;
        const float *pe = e.data(), *pk = keys.data(), *pv = values.data(), *pd = delta.data();
        const int64_t *source = slot_source.data();
        std::vector<float> q(static_cast<size_t>(B * Dk)), t(static_cast<size_t>(B * Dv)),
            all_scores(static_cast<size_t>(B * S));
        float *read = read_out.mutable_data(), *sur = surprise_out.mutable_data(), *sum = sum_out.mutable_data();
        // Two pool jobs, each memory-bound work over both cores: the query and target projections beside
        // the surprise table's copy (B x slots x val_dim floats, 0.5 MB at 125m), then every slot's score
        // (the keys, another 0.5 MB). One thread each, they were most of this call (BENCHMARKS.md, issue 17).
        MatmulBatch projections;
        projections.prepare(
            {{wq.t, wq.data.data(), Dk, D, pe, B, q.data()}, {wt.t, wt.data.data(), Dv, D, pe, B, t.data()}});
        const int64_t n_mm = projections.n_tasks(), copy_len = B * S * Dv;
        const int64_t n_copy = (copy_len + kCopyFloats - 1) / kCopyFloats;
        const float *sur_in = surprise.data();
        parallel_tasks(n_mm + n_copy, [&](int64_t task) {
            if (task < n_mm) return projections.run_task(task);
            const int64_t i0 = (task - n_mm) * kCopyFloats, i1 = std::min(copy_len, i0 + kCopyFloats);
            std::copy(sur_in + i0, sur_in + i1, sur + i0);
        });
        const int64_t n_chunks = (S + kScoreSlots - 1) / kScoreSlots;
        parallel_tasks(B * n_chunks, [&](int64_t task) {
            const int64_t b = task / n_chunks, s0 = (task % n_chunks) * kScoreSlots, s1 = std::min(S, s0 + kScoreSlots);
            const float *qb = q.data() + b * Dk;
            float *scores = all_scores.data() + b * S;
            for (int64_t s = s0; s < s1; ++s)
                scores[s] = source[s] != kDormantSource ? dot(qb, pk + s * Dk, Dk) : -std::numeric_limits<float>::infinity();
        });
        std::vector<int64_t> idx;
        std::vector<float> attn(static_cast<size_t>(k));
        for (int64_t b = 0; b < B; ++b) {
            const float *scores = all_scores.data() + b * S;
            top_k(scores, S, k, idx);
            const float top = scores[idx[0]];
            float total = 0.0f;
            for (int64_t j = 0; j < k; ++j) total += attn[j] = std::exp(scores[idx[j]] - top);
            for (int64_t j = 0; j < k; ++j) attn[j] /= total;
            float *rb = read + b * Dv;
            std::fill(rb, rb + Dv, 0.0f);
            for (int64_t j = 0; j < k; ++j) {
                const float *v = pv + idx[j] * Dv, *d = pd + (b * S + idx[j]) * Dv;
                for (int64_t c = 0; c < Dv; ++c) rb[c] += attn[j] * (v[c] + d[c]);
            }
            const float *tb = t.data() + b * Dv;
            for (int64_t j = 0; j < k; ++j) {
                float *sj = sur + (b * S + idx[j]) * Dv;
                for (int64_t c = 0; c < Dv; ++c) sj[c] += attn[j] * (2.0f * (rb[c] - tb[c]));
            }
            for (int64_t i = 0; i < D; ++i) sum[b * D + i] = input_sum.data()[b * D + i] + pe[b * D + i];
        }
        if (E) {
            const int64_t P = pers.shape(0), W = D + Dv + P;
            std::vector<float> x(static_cast<size_t>(B * W));
            for (int64_t b = 0; b < B; ++b) {
                float *xb = x.data() + b * W;
                std::copy(pe + b * D, pe + (b + 1) * D, xb);
                std::copy(read + b * Dv, read + (b + 1) * Dv, xb + D);
                std::copy(pers.data(), pers.data() + P, xb + D + Dv);
            }
            float *u = u_out.mutable_data();
            matmul(we.t, we.data.data(), E, W, x.data(), B, u);
            const float *bias = we.has_bias ? we.bias.data() : nullptr;
            for (int64_t b = 0; b < B; ++b)
                for (int64_t i = 0; i < E; ++i) {
                    const float y = bias ? u[b * E + i] + bias[i] : u[b * E + i];
                    u[b * E + i] = 0.5f * y * (1.0f + std::erf(y * 0.70710678118654752f));  // F.gelu (erf)
                }
        }
    }
    if (!E) return py::make_tuple(read_out, surprise_out, sum_out, py::none());
    return py::make_tuple(read_out, surprise_out, sum_out, u_out);
}

}  // namespace

void register_memory_step(py::module_ &m) {
    m.def("memory_read", &memory_read, py::arg("e"), py::arg("query"), py::arg("target"), py::arg("keys"),
          py::arg("slot_source"), py::arg("k"), py::arg("values"), py::arg("delta"), py::arg("surprise"),
          py::arg("input_sum"), py::arg("encoder") = py::none(), py::arg("persistent") = py::none(),
          "one token's read of the long-term memory, no write -> (read (B, val_dim), surprise, input_sum, u); u: "
          "with encoder (data, qtype, cols, bias) and persistent, gelu(encoder([e, read, persistent])), else None; "
          "see memory_step.cpp");
}

}  // namespace hk
