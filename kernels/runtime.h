// The kernel's entry points as the bindings see them: ISA choice, threads, and the
// whole-matrix operations (quantize, dequantize, matmul) split over the thread pool.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "formats.h"

namespace hk {

std::vector<std::string> available_isas();    // scalar first, best last
std::string default_isa();
void set_isa(const std::string &name);        // throws std::invalid_argument when unavailable
// One row's Q8_0 activation blocks by the current ISA's quantizer (what its matmuls use; bit for
// bit quantize_act_row_q8_0).
void quantize_act_q8_0_current(const float *x, int8_t *qs, float *d, int32_t *sums, int64_t n);
std::string get_isa();
std::vector<std::pair<std::string, bool>> cpu_features();

void set_threads(int n);  // n <= 0: hardware concurrency
int get_threads();

void quantize(QType t, const float *w, int64_t rows, int64_t cols, uint8_t *out);
void dequantize(QType t, const uint8_t *data, int64_t rows, int64_t cols, float *out);
void dequantize_rows(QType t, const uint8_t *data, int64_t cols, const int64_t *ids, int64_t n, float *out);
// out (n, rows) = x (n, cols) @ W.T
void matmul(QType t, const uint8_t *data, int64_t rows, int64_t cols, const float *x, int64_t n, float *out);

// Several independent matmuls (each its own weight, format and activations) in one pass over
// the thread pool: the same results as one matmul call each, bit for bit.
struct MatmulJob {
    QType t;
    const uint8_t *data;
    int64_t rows, cols;
    const float *x;
    int64_t n;
    float *out;
};
void matmul_many(const std::vector<MatmulJob> &jobs);

// matmul_many split in two, for a caller that runs the matmuls' tasks inside its own parallel job
// next to other work (the fused stack step): prepare() quantizes every job's activations (on the
// calling thread), then run_task(t) for t in [0, n_tasks()) computes the outputs, from any thread,
// each task once; the same results as matmul_many, bit for bit. The object owns the quantized
// activations and is reused across calls (no allocation once warm).
class MatmulBatch {
public:
    MatmulBatch();
    ~MatmulBatch();
    MatmulBatch(const MatmulBatch &) = delete;
    MatmulBatch &operator=(const MatmulBatch &) = delete;
    void prepare(const std::vector<MatmulJob> &jobs);
    int64_t n_tasks() const { return first_task_.back(); }
    void run_task(int64_t task) const;

private:
    struct Scratch;
    std::vector<MatmulJob> jobs_;
    std::vector<Scratch *> scratch_;       // one per job slot, kept across calls
    std::vector<int64_t> first_task_{0};   // job j owns tasks [first_task_[j], first_task_[j + 1])
    const void *isa_ = nullptr;
};

// fn(task) for task in [0, n_tasks) on the kernel's thread pool (caller included), at most `width`
// threads (<= 0: all); one job at a time, so fn must not call back into the pool (matmul & co.).
void parallel_tasks(int64_t n_tasks, const std::function<void(int64_t)> &fn, int width = 0);

// While one lives, the pool's idle workers poll for the next job (yielding their core now and
// then) instead of going to sleep: for a caller that issues many small jobs back to back without
// returning to Python (the fused stack step: ~28 jobs per pass, most of them 10-40 us, where a
// helper that sleeps wakes too late to take a task). When the helpers of a hold missed more than
// one job in eight (a loaded machine: no core of their own), the next kHoldBackoff holds let them
// sleep. HIERARCHOS_KERNEL_HOLD=0 turns holding off.
constexpr int kHoldBackoff = 64;
class PoolHold {
public:
    PoolHold();
    ~PoolHold();
    PoolHold(const PoolHold &) = delete;
    PoolHold &operator=(const PoolHold &) = delete;

private:
    bool active_ = false;
    int64_t jobs0_ = 0, missed0_ = 0;
};

// While one lives on a thread, the pool's entry points called from that thread (parallel_tasks,
// matmul, matmul_many, quantize, ...) run all their tasks on it, in task order, without the pool: for
// a caller that splits its own work into independent lanes, one pool task each (the round's manager
// and worker stacks, rwkv_step.cpp). Every task computes what it computes on the pool, so the
// results are the same bits. Nests.
class SerialRegion {
public:
    SerialRegion();
    ~SerialRegion();
    SerialRegion(const SerialRegion &) = delete;
    SerialRegion &operator=(const SerialRegion &) = delete;

private:
    int previous_;
};

// Read `bytes` from p with `threads` threads (<= 0: current setting); returns a checksum.
uint64_t stream_read_parallel(const uint8_t *p, size_t bytes, int threads);

}  // namespace hk
