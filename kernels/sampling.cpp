// Sampling one token (hierarchos/generate.py: sample_next with the counter-based noise chat uses) in
// one call: the repetition penalty on the ids seen so far, the temperature, the top-k candidates, top-p
// over them, the noise and the pick. In torch that is ~35 ops (~10 over the whole vocabulary), ~1.2 ms
// of a CPU chat token at a 50k vocabulary, where the caches hold the model's weights, not torch's code
// (BENCHMARKS.md, issue 17). sample_next stays the reference and the fallback
// (hierarchos/ops/sampling_kernel.py; tests/test_sync_free_step.py holds the two equal).
#include "sampling.h"

#include <pybind11/numpy.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace py = pybind11;

namespace hk {

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using FlagArray = py::array_t<bool, py::array::c_style | py::array::forcecast>;

// hierarchos/generate.py: _mix32 and row_noise_at, for one row (seed, counter) and one token id
constexpr uint64_t kM32 = 0xFFFFFFFFull, kHashMul = 0x45D9F3Bull;

uint64_t mix32(uint64_t x) {
    x = (((x >> 16) ^ x) * kHashMul) & kM32;
    x = (((x >> 16) ^ x) * kHashMul) & kM32;
    return (x >> 16) ^ x;
}

float row_noise_at(uint64_t row, int64_t id) {
    const uint64_t bits = mix32(mix32(row ^ ((static_cast<uint64_t>(id) * 0x27D4EB2Full + 0x165667B1ull) & kM32)) ^ row);
    return (static_cast<float>(bits >> 9) + 0.5f) / static_cast<float>(1 << 23);
}

// The whole of sample_next for counter-based noise (temperature > 0): penalty, temperature, top-k (0:
// every id), top-p over the candidates (stable descending order, one running sum), then the first id of
// the largest weight / -log(u) in id order. The vocabulary-wide part as torch computes it, bit for bit;
// the candidates' exp and log by the C library (torch's vectorised ones may differ in the last bit: a
// pick can differ only between two candidates within that rounding). -1 when a logit is NaN.
int64_t sample_token(const FloatArray &logits, const py::object &seen, float penalty, float temperature, int64_t k,
                     double top_p, int64_t seed, int64_t counter) {
    if (logits.ndim() != 1) throw py::value_error("sample_token: logits must be a (vocab,) array");
    const int64_t V = logits.shape(0);
    if (V <= 0 || k < 0) throw py::value_error("sample_token: need a vocabulary and k >= 0");
    if (!(temperature > 0.0f)) throw py::value_error("sample_token: temperature must be positive");
    FlagArray mask;
    if (!seen.is_none()) {
        mask = FlagArray::ensure(seen);
        if (!mask || mask.ndim() != 1 || mask.shape(0) != V)
            throw py::value_error("sample_token: seen must be a (vocab,) bool array");
    }
    const float *src = logits.data();
    const bool *s = seen.is_none() ? nullptr : mask.data();
    py::gil_scoped_release release;
    std::vector<float> l(static_cast<size_t>(V));
    for (int64_t i = 0; i < V; ++i) {
        float x = src[i];
        if (s && s[i] && penalty != 1.0f) x = x > 0.0f ? x / penalty : x * penalty;
        l[i] = x / temperature;
        if (std::isnan(l[i])) return -1;
    }
    std::vector<int64_t> ids;
    if (k > 0 && k < V) {  // the k-th largest by a size-k min-heap (one pass, most values rejected at once)
        std::vector<float> heap(l.begin(), l.begin() + k);
        std::make_heap(heap.begin(), heap.end(), std::greater<float>());
        for (int64_t i = k; i < V; ++i)
            if (l[i] > heap.front()) {
                std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
                heap.back() = l[i];
                std::push_heap(heap.begin(), heap.end(), std::greater<float>());
            }
        const float kth = heap.front();
        for (int64_t i = 0; i < V; ++i)
            if (l[i] >= kth) ids.push_back(i);
    } else {
        ids.resize(static_cast<size_t>(V));
        for (int64_t i = 0; i < V; ++i) ids[i] = i;
    }
    const size_t n = ids.size();
    float top = -std::numeric_limits<float>::infinity();
    for (const int64_t i : ids) top = std::max(top, l[i]);
    std::vector<float> w(n);
    for (size_t j = 0; j < n; ++j) w[j] = std::exp(l[ids[j]] - top);
    if (top_p > 0.0 && top_p < 1.0) {
        std::vector<size_t> order(n);
        for (size_t j = 0; j < n; ++j) order[j] = j;
        std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return l[ids[a]] > l[ids[b]]; });
        std::vector<float> cumulative(n);
        float run = 0.0f;
        for (size_t j = 0; j < n; ++j) cumulative[j] = run = run + w[order[j]];
        const float limit = static_cast<float>(top_p) * cumulative[n - 1];
        std::vector<uint8_t> drop(n, 0);
        for (size_t j = 0; j < n; ++j) drop[order[j]] = cumulative[j] - w[order[j]] >= limit;
        for (size_t j = 0; j < n; ++j)
            if (drop[j]) w[j] = 0.0f;
    }
    const uint64_t s64 = static_cast<uint64_t>(seed);
    uint64_t row = mix32((s64 & kM32) ^ mix32(((static_cast<uint64_t>(seed >> 32)) + 0x9E3779B9ull) & kM32));
    row = mix32(row ^ ((static_cast<uint64_t>(counter) + 0x632BE5ABull) & kM32));
    int64_t best = -1;
    float best_score = 0.0f;
    for (size_t j = 0; j < n; ++j) {
        const float score = w[j] / -std::log(row_noise_at(row, ids[j]));
        if (best < 0 || score > best_score) best = ids[j], best_score = score;
    }
    return best;
}

}  // namespace

void register_sampling(py::module_ &m) {
    m.def("sample_token", &sample_token, py::arg("logits"), py::arg("seen"), py::arg("penalty"), py::arg("temperature"),
          py::arg("k"), py::arg("top_p"), py::arg("seed"), py::arg("counter"),
          "sample_next with counter-based noise, whole (penalty, temperature, top-k, top-p, the pick) -> token id, "
          "or -1 when a logit is NaN; see sampling.cpp");
}

}  // namespace hk
