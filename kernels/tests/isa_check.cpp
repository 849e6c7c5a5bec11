// Stand-alone check of one ISA's dot kernels against the scalar ones, without Python:
// used to run the NEON path under qemu-user on an x86 machine (tests/test_kernel.py
// cross-compiles this with ref.cpp and arm_neon.cpp). Prints "N passed, M failed".
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "../formats.h"

using namespace hk;

namespace {

bool check(const IsaKernels *isa, QType t, int64_t rows, int64_t cols, int64_t n, std::mt19937 &rng) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    const int64_t nb = cols / block_size(t), rb = nb * block_bytes(t);
    std::vector<float> w(rows * cols), x(n * cols);
    for (float &v : w) v = normal(rng);
    for (float &v : x) v = normal(rng);
    std::vector<uint8_t> data(rows * rb);
    for (int64_t r = 0; r < rows; ++r) quantize_row(t, w.data() + r * cols, data.data() + r * rb, cols);

    std::vector<float> ref(n * rows), got(n * rows);
    DotArgs args{data.data(), rb, nb, 0, rows, 0, n, nullptr, rows};
    if (t == QType::Q2_K) {
        std::vector<BlockQ8_K> act(n * nb);
        for (int64_t a = 0; a < n; ++a) quantize_act_row_q8_k(x.data() + a * cols, act.data() + a * nb, cols);
        const ActQ8_KView view{act.data(), nb};
        args.out = ref.data();
        scalar_kernels()->dot_q2_k(args, view);
        args.out = got.data();
        isa->dot_q2_k(args, view);
    } else {
        std::vector<int8_t> qs(n * cols);
        std::vector<float> d(n * nb);
        std::vector<int32_t> sums(n * nb);
        std::vector<int32_t> corr(n * nb * 4);
        for (int64_t a = 0; a < n; ++a)
            quantize_act_row_q8_0(x.data() + a * cols, qs.data() + a * cols, d.data() + a * nb, sums.data() + a * nb, cols);
        if (isa->q4_group > 1) {
            std::printf("pair layout not driven here\n");
            return false;
        }
        const ActQ8_0View view{qs.data(), d.data(), corr.data(), nb};
        args.out = ref.data();
        scalar_kernels()->dot_q8_0(t, args, view);
        args.out = got.data();
        isa->dot_q8_0(t, args, view);
    }
    // Only the float summation order differs: compare against the sum of magnitudes.
    double worst = 0;
    for (int64_t i = 0; i < n * rows; ++i) {
        const double scale = 1e-3 + std::fabs(ref[i]) + std::sqrt(static_cast<double>(cols));
        worst = std::fmax(worst, std::fabs(ref[i] - got[i]) / scale);
    }
    if (worst > 1e-5) std::printf("FAIL %s %s rows=%lld cols=%lld n=%lld worst=%g\n", isa->name, qtype_name(t),
                                  (long long)rows, (long long)cols, (long long)n, worst);
    return worst <= 1e-5;
}

}  // namespace

int main(int argc, char **argv) {
    const IsaKernels *isa = neon_kernels();
    if (argc > 1 && std::strcmp(argv[1], "scalar") == 0) isa = scalar_kernels();
    if (!isa) {
        std::printf("ISA not compiled in\n");
        return 2;
    }
    std::mt19937 rng(argc > 2 ? static_cast<unsigned>(std::atoi(argv[2])) : 1234u);
    int passed = 0, failed = 0;
    const QType types[] = {QType::INT4, QType::Q4_0, QType::Q8_0, QType::Q2_K};
    for (QType t : types)
        for (int64_t n : {1, 2, 3, 4, 5, 9})
            for (int64_t blocks : {1, 3, 8}) {
                const int64_t cols = blocks * block_size(t);
                (check(isa, t, 7, cols, n, rng) ? passed : failed)++;
            }
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
