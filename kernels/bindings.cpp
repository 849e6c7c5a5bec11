// pybind11 module `hierarchos_kernels`: numpy in, numpy out, argument checks with the
// same messages as the numpy reference (hierarchos/quant/formats.py), GIL released
// around the heavy loops.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "bpe.h"
#include "memory_step.h"
#include "rosa.h"
#include "rwkv_step.h"
#include "sampling.h"
#include "wkv.h"
#include "runtime.h"

namespace py = pybind11;
using hk::QType;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;
using IdArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

QType parse_qtype(const std::string &name) {
    QType t;
    if (hk::qtype_from_name(name.c_str(), &t)) return t;
    throw py::value_error("unknown qtype '" + name + "'; known: INT4, Q4_0, Q8_0, Q2_K");
}

int64_t row_bytes(QType t, int64_t cols) { return cols / hk::block_size(t) * hk::block_bytes(t); }

void check_cols(QType t, int64_t rows, int64_t cols) {
    const int need = hk::block_size(t);
    if (cols <= 0 || cols % need)
        throw py::value_error(std::string(hk::qtype_name(t)) + " needs the number of columns to be a positive multiple of " +
                              std::to_string(need) + "; got a (" + std::to_string(rows) + ", " + std::to_string(cols) +
                              ") matrix");
}

void check_data(const ByteArray &data, QType t, int64_t cols) {
    if (data.ndim() != 2) throw py::value_error("quantized data must be a 2-D uint8 array");
    check_cols(t, data.shape(0), cols);
    if (data.shape(1) != row_bytes(t, cols))
        throw py::value_error(std::string(hk::qtype_name(t)) + " rows of " + std::to_string(cols) + " columns take " +
                              std::to_string(row_bytes(t, cols)) + " bytes, got " + std::to_string(data.shape(1)));
}

py::array_t<uint8_t> quantize(const FloatArray &w, const std::string &qtype) {
    const QType t = parse_qtype(qtype);
    if (w.ndim() != 2) throw py::value_error("quantize expects a 2-D matrix");
    const int64_t rows = w.shape(0), cols = w.shape(1);
    check_cols(t, rows, cols);
    py::array_t<uint8_t> out({rows, row_bytes(t, cols)});
    const float *src = w.data();
    uint8_t *dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        hk::quantize(t, src, rows, cols, dst);
    }
    return out;
}

py::array_t<float> dequantize(const ByteArray &data, const std::string &qtype, int64_t cols) {
    const QType t = parse_qtype(qtype);
    check_data(data, t, cols);
    const int64_t rows = data.shape(0);
    py::array_t<float> out({rows, cols});
    const uint8_t *src = data.data();
    float *dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        hk::dequantize(t, src, rows, cols, dst);
    }
    return out;
}

// The float values of the 8-bit activation blocks the integer dot products use for x (N, cols) against
// weights of `qtype`: Q8_0 blocks for INT4 / Q4_0 / Q8_0, Q8_K for Q2_K (the dense prefill path multiplies
// these by the dequantized weights; hierarchos/quant/model.py has the numpy reference).
py::array_t<float> activations_as_used(const FloatArray &x, const std::string &qtype) {
    const QType t = parse_qtype(qtype);
    if (x.ndim() != 2) throw py::value_error("activations_as_used expects (N, cols) float32 activations");
    const int64_t n = x.shape(0), cols = x.shape(1);
    check_cols(t, n, cols);
    py::array_t<float> out({n, cols});
    const float *src = x.data();
    float *dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        if (t == QType::Q2_K) {
            std::vector<hk::BlockQ8_K> blocks(cols / hk::QK_K);
            for (int64_t r = 0; r < n; ++r) {
                hk::quantize_act_row_q8_k(src + r * cols, blocks.data(), cols);
                float *row = dst + r * cols;
                for (int64_t b = 0; b < cols / hk::QK_K; ++b)
                    for (int j = 0; j < hk::QK_K; ++j) row[b * hk::QK_K + j] = static_cast<float>(blocks[b].qs[j]) * blocks[b].d;
            }
        } else {
            std::vector<int8_t> qs(cols);
            std::vector<float> d(cols / hk::QK);
            std::vector<int32_t> sums(cols / hk::QK);
            for (int64_t r = 0; r < n; ++r) {
                hk::quantize_act_q8_0_current(src + r * cols, qs.data(), d.data(), sums.data(), cols);  // matmul's
                float *row = dst + r * cols;
                for (int64_t j = 0; j < cols; ++j) row[j] = static_cast<float>(qs[j]) * d[j / hk::QK];
            }
        }
    }
    return out;
}

py::array_t<float> dequantize_rows(const ByteArray &data, const std::string &qtype, int64_t cols, const IdArray &row_ids) {
    const QType t = parse_qtype(qtype);
    check_data(data, t, cols);
    const int64_t n = row_ids.size(), table_rows = data.shape(0);
    const int64_t *ids = row_ids.data();
    for (int64_t i = 0; i < n; ++i)
        if (ids[i] < 0 || ids[i] >= table_rows)
            throw py::index_error("row id out of range for a table of " + std::to_string(table_rows) + " rows");
    py::array_t<float> out({n, cols});
    hk::dequantize_rows(t, data.data(), cols, ids, n, out.mutable_data());
    return out;
}

py::array_t<float> matmul(const ByteArray &data, const std::string &qtype, int64_t cols, const FloatArray &x) {
    const QType t = parse_qtype(qtype);
    check_data(data, t, cols);
    if (x.ndim() != 2 || x.shape(1) != cols)
        throw py::value_error("x must be (N, " + std::to_string(cols) + "), got a " + std::to_string(x.ndim()) +
                              "-D array" + (x.ndim() == 2 ? " of " + std::to_string(x.shape(1)) + " columns" : ""));
    const int64_t rows = data.shape(0), n = x.shape(0);
    py::array_t<float> out({n, rows});
    const uint8_t *w = data.data();
    const float *src = x.data();
    float *dst = out.mutable_data();
    if (n > 0) {
        py::gil_scoped_release release;
        hk::matmul(t, w, rows, cols, src, n, dst);
    }
    return out;
}

// matmul for several (weight, activations) pairs in one call: one GIL release, one pool hand-off.
py::list matmul_many(const py::list &weights, const py::list &xs) {
    if (weights.size() != xs.size())
        throw py::value_error("matmul_many: " + std::to_string(weights.size()) + " weights but " +
                              std::to_string(xs.size()) + " activations");
    std::vector<ByteArray> data;
    std::vector<FloatArray> inputs;
    std::vector<py::array_t<float>> outs;
    std::vector<hk::MatmulJob> jobs;
    for (size_t i = 0; i < weights.size(); ++i) {
        const py::tuple w = weights[i].cast<py::tuple>();
        if (w.size() != 3) throw py::value_error("matmul_many: each weight is (data, qtype, cols)");
        data.push_back(w[0].cast<ByteArray>());
        const QType t = parse_qtype(w[1].cast<std::string>());
        const int64_t cols = w[2].cast<int64_t>();
        check_data(data.back(), t, cols);
        inputs.push_back(FloatArray::ensure(xs[i]));
        const FloatArray &x = inputs.back();
        if (!x || x.ndim() != 2 || x.shape(1) != cols)
            throw py::value_error("matmul_many: activations " + std::to_string(i) + " must be (N, " + std::to_string(cols) + ")");
        const int64_t rows = data.back().shape(0), n = x.shape(0);
        outs.emplace_back(std::vector<py::ssize_t>{n, rows});
        jobs.push_back({t, data.back().data(), rows, cols, x.data(), n, outs.back().mutable_data()});
    }
    {
        py::gil_scoped_release release;
        hk::matmul_many(jobs);
    }
    py::list result;
    for (auto &o : outs) result.append(o);
    return result;
}

uint64_t stream_read(const ByteArray &buffer, int threads) {
    const uint8_t *p = buffer.data();
    const size_t bytes = static_cast<size_t>(buffer.size());
    py::gil_scoped_release release;
    return hk::stream_read_parallel(p, bytes, threads);
}

py::array_t<int64_t> rosa_extend(hk::RosaAutomaton &self, const IdArray &tokens) {
    const int64_t n = tokens.size();
    py::array_t<int64_t> hints(n);
    const int64_t *src = tokens.data();
    int64_t *dst = hints.mutable_data();
    {
        py::gil_scoped_release release;
        self.extend(src, n, dst);
    }
    return hints;
}

py::tuple wkv7_steps(const FloatArray &state, const FloatArray &r, const FloatArray &log_w, const FloatArray &k,
                     const FloatArray &v, const FloatArray &a, const FloatArray &b) {
    if (r.ndim() != 4) throw py::value_error("wkv7_steps: r must be (B, T, H, N)");
    const int64_t B = r.shape(0), T = r.shape(1), H = r.shape(2), N = r.shape(3);
    for (const FloatArray *x : {&log_w, &k, &v, &a, &b})
        if (x->ndim() != 4 || x->shape(0) != B || x->shape(1) != T || x->shape(2) != H || x->shape(3) != N)
            throw py::value_error("wkv7_steps: r, log_w, k, v, a, b must share one (B, T, H, N) shape");
    if (state.ndim() != 4 || state.shape(0) != B || state.shape(1) != H || state.shape(2) != N || state.shape(3) != N)
        throw py::value_error("wkv7_steps: state must be (B, H, N, N)");
    if (N > 256) throw py::value_error("wkv7_steps: head size at most 256");
    py::array_t<float> out({B, T, H, N});
    py::array_t<float> new_state({B, H, N, N});
    const float *s0 = state.data(), *pr = r.data(), *pw = log_w.data(), *pk = k.data(), *pv = v.data();
    const float *pa = a.data(), *pb = b.data();
    float *po = out.mutable_data(), *ps = new_state.mutable_data();
    {
        py::gil_scoped_release release;
        hk::wkv7_steps(s0, pr, pw, pk, pv, pa, pb, B, T, H, N, po, ps);
    }
    return py::make_tuple(out, new_state);
}

}  // namespace

PYBIND11_MODULE(hierarchos_kernels, m) {
    m.doc() = "hierarchos C++ kernel: quantized block formats, integer matmuls with run-time ISA dispatch, ROSA automaton";

    m.attr("QTYPES") = py::make_tuple("INT4", "Q4_0", "Q8_0", "Q2_K");
    m.def("block_size", [](const std::string &q) { return hk::block_size(parse_qtype(q)); }, py::arg("qtype"));
    m.def("block_bytes", [](const std::string &q) { return hk::block_bytes(parse_qtype(q)); }, py::arg("qtype"));
    m.def("quantize", &quantize, py::arg("w"), py::arg("qtype"),
          "float32 (rows, cols) -> uint8 (rows, row_bytes), ggml-identical blocks (INT4: ours)");
    m.def("dequantize", &dequantize, py::arg("data"), py::arg("qtype"), py::arg("cols"));
    m.def("activations_as_used", &activations_as_used, py::arg("x"), py::arg("qtype"));
    m.def("dequantize_rows", &dequantize_rows, py::arg("data"), py::arg("qtype"), py::arg("cols"), py::arg("row_ids"));
    m.def("matmul", &matmul, py::arg("data"), py::arg("qtype"), py::arg("cols"), py::arg("x"),
          "y = x @ W.T: x (N, cols) float32 -> (N, rows); activations quantized to Q8_0 (Q8_K for Q2_K)");

    m.def("matmul_many", &matmul_many, py::arg("weights"), py::arg("xs"),
          "[y_i = x_i @ W_i.T] for weights [(data, qtype, cols)] and activations [x_i (N_i, cols_i)], one call");
    m.def("set_threads", &hk::set_threads, py::arg("n"), "n <= 0: one per hardware thread");
    m.def("get_threads", &hk::get_threads);
    m.def("set_isa", [](const std::string &name) {
        try {
            hk::set_isa(name);
        } catch (const std::invalid_argument &e) {
            throw py::value_error(e.what());
        }
    }, py::arg("name"));
    m.def("get_isa", &hk::get_isa);
    m.def("default_isa", &hk::default_isa);
    m.def("available_isas", &hk::available_isas, "ISAs usable here, scalar first, best last");
    m.def("cpu_features", [] {
        py::dict out;
        for (const auto &kv : hk::cpu_features()) out[py::str(kv.first)] = kv.second;
        return out;
    });
    m.def("backend_name", [] { return std::string("cpp"); });
    m.def("stream_read", &stream_read, py::arg("buffer"), py::arg("threads") = 0,
          "read every byte of a uint8 array with `threads` threads (memory bandwidth probe); returns a checksum");

    m.def("wkv7_steps", &wkv7_steps, py::arg("state"), py::arg("r"), py::arg("log_w"), py::arg("k"), py::arg("v"),
          py::arg("a"), py::arg("b"),
          "RWKV-7 recurrence over a few tokens: (o (B,T,H,N), new state (B,H,N,N)); float32, no autograd");

    hk::register_bpe(m);  // BpeEncoder (bpe.cpp)
    hk::register_rwkv_step(m);  // RwkvStackStep (rwkv_step.cpp)
    hk::register_memory_step(m);  // memory_read (memory_step.cpp)
    hk::register_sampling(m);  // sample_token (sampling.cpp)

    py::class_<hk::RosaAutomaton>(m, "RosaAutomaton")
        .def(py::init([](int64_t window, int64_t none_id) {
                 try {
                     return hk::RosaAutomaton(window, none_id);
                 } catch (const std::invalid_argument &e) {
                     throw py::value_error(e.what());
                 }
             }),
             py::arg("window"), py::arg("none_id"))
        .def("extend", &rosa_extend, py::arg("tokens"), "append int64 tokens, return their hints (int64 array)")
        .def("push", [](hk::RosaAutomaton &self, int64_t token) {
            int64_t hint;
            self.extend(&token, 1, &hint);
            return hint;
        }, py::arg("token"))
        .def("copy", [](const hk::RosaAutomaton &self) { return hk::RosaAutomaton(self); })
        .def_readwrite("num_tokens", &hk::RosaAutomaton::num_tokens)
        .def_property_readonly("window", &hk::RosaAutomaton::window)
        .def_property_readonly("none_id", &hk::RosaAutomaton::none_id)
        .def_property_readonly("history_len", &hk::RosaAutomaton::history_len)
        .def_property_readonly("num_states", &hk::RosaAutomaton::num_states)
        .def(py::pickle(
            [](const hk::RosaAutomaton &self) {
                return py::make_tuple(self.window(), self.none_id(), self.num_tokens, self.history());
            },
            [](const py::tuple &state) {
                if (state.size() != 4) throw py::value_error("bad RosaAutomaton state");
                hk::RosaAutomaton automaton(state[0].cast<int64_t>(), state[1].cast<int64_t>());
                automaton.restore(state[3].cast<std::vector<int64_t>>(), state[2].cast<int64_t>());
                return automaton;
            }));
}
