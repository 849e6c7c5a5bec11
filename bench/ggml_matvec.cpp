// A stand-alone timing of ggml's CPU MUL_MAT (y = W x, W quantized, x f32) at a chosen thread
// count, written against ggml's public API only (ggml.h, ggml-cpu.h, ggml-backend.h, ggml-alloc.h)
// and built against a ggml checkout outside this repository. test-backend-ops always uses every
// core; on a shared 2-core machine its 2-thread barriers measure the other jobs as much as the
// kernel, so bench/bench_kernels.py can also time ggml through this at 1 thread.
//
// It answers test-backend-ops' command line as bench_kernels.py calls it
//   ggml_matvec perf -o MUL_MAT -b CPU -p 'type_a=q4_0,type_b=f32,m=4096,n=1,k=14336,'
// and prints a line in its format ("MUL_MAT(type_a=...,m=..,n=..,k=..): R runs - T us/run");
// T is the best single run of R (HK_GGML_THREADS threads, default 1).
//
//   g++ -O2 -std=c++17 bench/ggml_matvec.cpp -I$GGML/include -L$GGML/build/src \
//       -lggml -lggml-base -lggml-cpu -Wl,-rpath,$GGML/build/src -o /tmp/ggml_matvec
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

static long field(const std::string &spec, const char *name) {
    const size_t at = spec.find(name);
    return at == std::string::npos ? -1 : std::atol(spec.c_str() + at + std::strlen(name));
}

int main(int argc, char **argv) {
    std::string spec;
    for (int i = 1; i + 1 < argc; ++i)
        if (std::strcmp(argv[i], "-p") == 0) spec = argv[i + 1];
    std::string type_name = spec.substr(spec.find("type_a=") == std::string::npos ? 0 : spec.find("type_a=") + 7);
    type_name = type_name.substr(0, type_name.find_first_of(",\\"));
    const long m = field(spec, "m="), n = field(spec, "n="), k = field(spec, "k=");
    ggml_type type = GGML_TYPE_COUNT;
    for (int t = 0; t < GGML_TYPE_COUNT; ++t)
        if (ggml_get_type_traits((ggml_type)t)->type_name && type_name == ggml_get_type_traits((ggml_type)t)->type_name)
            type = (ggml_type)t;
    if (type == GGML_TYPE_COUNT || m <= 0 || n <= 0 || k <= 0) {
        std::fprintf(stderr, "usage: %s perf -p 'type_a=q4_0,type_b=f32,m=4096,n=1,k=14336,'\n", argv[0]);
        return 2;
    }
    const int threads = std::getenv("HK_GGML_THREADS") ? std::atoi(std::getenv("HK_GGML_THREADS")) : 1;

    ggml_init_params params = {ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true};
    ggml_context *ctx = ggml_init(params);
    ggml_tensor *w = ggml_new_tensor_2d(ctx, type, k, m);
    ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, n);
    ggml_tensor *y = ggml_mul_mat(ctx, w, x);
    ggml_cgraph *graph = ggml_new_graph(ctx);
    ggml_build_forward_expand(graph, y);
    ggml_backend_t backend = ggml_backend_cpu_init();
    ggml_backend_cpu_set_n_threads(backend, threads);
    ggml_backend_buffer_t buffer = ggml_backend_alloc_ctx_tensors(ctx, backend);

    std::mt19937 rng(0);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> wf(static_cast<size_t>(m) * k), xf(static_cast<size_t>(n) * k);
    for (float &v : wf) v = normal(rng);
    for (float &v : xf) v = normal(rng);
    std::vector<uint8_t> wq(ggml_nbytes(w));
    ggml_quantize_chunk(type, wf.data(), wq.data(), 0, m, k, nullptr);
    ggml_backend_tensor_set(w, wq.data(), 0, wq.size());
    ggml_backend_tensor_set(x, xf.data(), 0, xf.size() * sizeof(float));

    ggml_backend_graph_compute(backend, graph);  // warm-up
    double best = 1e30, total = 0;
    int runs = 0;
    while (total < 1.0 || runs < 20) {
        const auto start = std::chrono::steady_clock::now();
        ggml_backend_graph_compute(backend, graph);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        best = s < best ? s : best;
        total += s;
        ++runs;
    }
    std::printf("  MUL_MAT(type_a=%s,type_b=f32,m=%ld,n=%ld,k=%ld,threads=%d): %d runs - %.2f us/run (best; mean %.2f)\n",
                type_name.c_str(), m, n, k, threads, runs, best * 1e6, total / runs * 1e6);
    ggml_backend_buffer_free(buffer);
    ggml_backend_free(backend);
    ggml_free(ctx);
    return 0;
}
