// Run time: which ISA the CPU supports (cpuid / hwcaps), a small persistent thread pool,
// and the drivers that quantize activations once and split the matmul over output rows.
#include "runtime.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <string>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__) || defined(_M_IX86)
#define HK_X86 1
#if defined(_MSC_VER)
#include <intrin.h>
#else
#include <cpuid.h>
#endif
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#if defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace hk {

// ---- CPU features --------------------------------------------------------------------

namespace {

struct Features {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512vnni = false;
    bool neon = false, dotprod = false;
};

#if defined(HK_X86)
void cpuid(int leaf, int sub, unsigned regs[4]) {
#if defined(_MSC_VER)
    int r[4];
    __cpuidex(r, leaf, sub);
    for (int i = 0; i < 4; ++i) regs[i] = static_cast<unsigned>(r[i]);
#else
    __cpuid_count(leaf, sub, regs[0], regs[1], regs[2], regs[3]);
#endif
}

uint64_t xgetbv0() {
#if defined(_MSC_VER)
    return _xgetbv(0);
#else
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (static_cast<uint64_t>(hi) << 32) | lo;
#endif
}
#endif

Features detect() {
    Features f;
#if defined(HK_X86)
    unsigned r[4];
    cpuid(0, 0, r);
    const unsigned max_leaf = r[0];
    cpuid(1, 0, r);
    const bool osxsave = (r[2] >> 27) & 1;
    f.fma = (r[2] >> 12) & 1;
    f.f16c = (r[2] >> 29) & 1;
    const bool avx = (r[2] >> 28) & 1;
    // The OS must save the wide registers (XCR0) or the instructions fault.
    const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    const bool ymm_state = (xcr0 & 0x6) == 0x6;
    const bool zmm_state = (xcr0 & 0xE6) == 0xE6;
    if (max_leaf >= 7) {
        cpuid(7, 0, r);
        f.avx2 = avx && ymm_state && ((r[1] >> 5) & 1);
        f.avx512f = zmm_state && ((r[1] >> 16) & 1);
        f.avx512dq = zmm_state && ((r[1] >> 17) & 1);
        f.avx512bw = zmm_state && ((r[1] >> 30) & 1);
        f.avx512vl = zmm_state && ((r[1] >> 31) & 1);
        f.avx512vnni = zmm_state && ((r[2] >> 11) & 1);
    }
    f.fma = f.fma && ymm_state;
    f.f16c = f.f16c && ymm_state;
#elif defined(__aarch64__)
    f.neon = true;
#if defined(__linux__)
    f.dotprod = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
    int value = 0;
    size_t size = sizeof(value);
    f.dotprod = sysctlbyname("hw.optional.arm.FEAT_DotProd", &value, &size, nullptr, 0) == 0 && value;
#endif
#endif
    return f;
}

const Features &features() {
    static const Features f = detect();
    return f;
}

// name -> kernels, best first; only ISAs compiled in and supported by this CPU.
std::vector<const IsaKernels *> usable_isas() {
    const Features &f = features();
    std::vector<const IsaKernels *> out;
    const bool avx2_ok = f.avx2 && f.fma && f.f16c;
    const bool avx512_ok = avx2_ok && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
    if (avx512_ok && f.avx512vnni && avx512_vnni_kernels()) out.push_back(avx512_vnni_kernels());
    if (avx512_ok && avx512_kernels()) out.push_back(avx512_kernels());
    if (avx2_ok && avx2_kernels()) out.push_back(avx2_kernels());
    if (f.neon && f.dotprod && neon_kernels()) out.push_back(neon_kernels());
    out.push_back(scalar_kernels());
    return out;
}

std::atomic<const IsaKernels *> g_isa{nullptr};

const IsaKernels *current_isa() {
    const IsaKernels *isa = g_isa.load(std::memory_order_acquire);
    if (!isa) {
        isa = usable_isas().front();
        g_isa.store(isa, std::memory_order_release);
    }
    return isa;
}

}  // namespace

void quantize_act_q8_0_current(const float *x, int8_t *qs, float *d, int32_t *sums, int64_t n) {
    current_isa()->quantize_q8_0(x, qs, d, sums, n);
}

std::vector<std::string> available_isas() {
    std::vector<std::string> names;
    for (const IsaKernels *isa : usable_isas()) names.emplace_back(isa->name);
    std::reverse(names.begin(), names.end());  // scalar first, best last
    return names;
}

std::string default_isa() { return usable_isas().front()->name; }

void set_isa(const std::string &name) {
    std::string known;
    for (const IsaKernels *isa : usable_isas()) {
        if (name == isa->name) {
            g_isa.store(isa, std::memory_order_release);
            return;
        }
        known += (known.empty() ? "" : ", ") + std::string(isa->name);
    }
    throw std::invalid_argument("ISA '" + name + "' is not available on this CPU/build (available: " + known + ")");
}

std::string get_isa() { return current_isa()->name; }

std::vector<std::pair<std::string, bool>> cpu_features() {
    const Features &f = features();
    return {{"avx2", f.avx2},         {"fma", f.fma},           {"f16c", f.f16c},
            {"avx512f", f.avx512f},   {"avx512bw", f.avx512bw}, {"avx512vl", f.avx512vl},
            {"avx512dq", f.avx512dq}, {"avx512_vnni", f.avx512vnni},
            {"neon", f.neon},         {"dotprod", f.dotprod}};
}

// ---- thread pool ---------------------------------------------------------------------

namespace {

inline void cpu_relax() {
#if defined(HK_X86)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

// PoolHold: while holds_ > 0 idle workers poll instead of sleeping (see runtime.h).
std::atomic<int> g_holds{0};

// Persistent workers plus the calling thread share one job's tasks through an atomic
// counter. Idle workers poll for a few hundred pauses (~10 us), then sleep on a condition
// variable. Polling longer (HIERARCHOS_KERNEL_SPIN_US) helps back-to-back matvecs in a
// microbenchmark but, in real generation, steals the core that torch's ops between the
// matvecs need: the 125m model generated 20-25% faster with no extra polling
// (bench/bench_generate.py, BENCHMARKS.md).
class ThreadPool {
public:
    explicit ThreadPool(int n_threads) {
        // HIERARCHOS_KERNEL_SPIN_US: how long an idle worker polls for the next job before sleeping
        if (const char *env = std::getenv("HIERARCHOS_KERNEL_SPIN_US")) spin_us_ = std::max(0, std::atoi(env));
        for (int i = 1; i < n_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
    }
    ~ThreadPool() {
        {
            std::lock_guard<std::mutex> lock(mutex_);
            stopping_ = true;
            generation_.fetch_add(1);
        }
        wake_.notify_all();
        for (std::thread &t : workers_) t.join();
    }
    int size() const { return static_cast<int>(workers_.size()) + 1; }

    // Runs fn(task) for task in [0, n_tasks), using at most `width` threads (caller included).
    // Callers serialise (g_run_mutex): one job at a time.
    void run(int64_t n_tasks, int width, const std::function<void(int64_t)> &fn) {
        const int helpers = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(workers_.size()),
                                                                static_cast<int64_t>(width) - 1, n_tasks - 1}));
        if (helpers <= 0) {
            for (int64_t i = 0; i < n_tasks; ++i) fn(i);
            return;
        }
        {
            std::lock_guard<std::mutex> lock(mutex_);
            job_ = &fn;
            n_tasks_ = n_tasks;
            next_.store(0);
            helpers_wanted_ = helpers;
            helpers_joined_ = 0;
            pending_.store(helpers);
            generation_.fetch_add(1, std::memory_order_release);
        }
        wake_.notify_all();
        drain(fn);
        {
            // Helpers that have not woken yet are not waited for: the tasks are done.
            std::lock_guard<std::mutex> lock(mutex_);
            ++jobs_;
            if (helpers_joined_ == 0) ++missed_;
            pending_.fetch_sub(helpers_wanted_ - helpers_joined_);
            helpers_wanted_ = helpers_joined_;
            job_ = nullptr;
        }
        // a joined helper may share this core (a loaded machine): yield it now and then
        for (int polls = 1; pending_.load(std::memory_order_acquire) != 0; ++polls) {
            cpu_relax();
            if (polls % 64 == 0) std::this_thread::yield();
        }
    }

    // Jobs with helpers wanted so far, and those no helper joined in time (it slept, or had no core).
    std::pair<int64_t, int64_t> counts() {
        std::lock_guard<std::mutex> lock(mutex_);
        return {jobs_, missed_};
    }

private:
    void drain(const std::function<void(int64_t)> &fn) {
        for (int64_t i = next_.fetch_add(1); i < n_tasks_; i = next_.fetch_add(1)) fn(i);
    }

    void worker_loop() {
        uint64_t seen = 0;
        for (;;) {
            // spin up to ~200 us for the next job, then sleep
            const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
            int polls = 0;
            while (generation_.load(std::memory_order_acquire) == seen) {
                cpu_relax();
                ++polls;
                if (g_holds.load(std::memory_order_relaxed) > 0) {  // held: poll on, yielding now and then
                    if (polls % 64 == 0) std::this_thread::yield();
                    continue;
                }
                if (polls % 256 == 0 && std::chrono::steady_clock::now() > spin_until) {
                    std::unique_lock<std::mutex> lock(mutex_);
                    wake_.wait(lock, [&] { return generation_.load() != seen; });
                    break;
                }
            }
            const std::function<void(int64_t)> *job;
            {
                std::lock_guard<std::mutex> lock(mutex_);
                seen = generation_.load();
                if (stopping_) return;
                if (!job_ || helpers_joined_ >= helpers_wanted_) continue;  // not needed for this job
                ++helpers_joined_;
                job = job_;
            }
            drain(*job);
            pending_.fetch_sub(1, std::memory_order_acq_rel);
        }
    }

    std::vector<std::thread> workers_;
    std::mutex mutex_;
    std::condition_variable wake_;
    std::atomic<uint64_t> generation_{0};
    std::atomic<int64_t> next_{0};
    std::atomic<int> pending_{0};
    const std::function<void(int64_t)> *job_ = nullptr;
    int64_t n_tasks_ = 0;
    int helpers_wanted_ = 0, helpers_joined_ = 0;
    int64_t jobs_ = 0, missed_ = 0;
    bool stopping_ = false;
    int spin_us_ = 0;  // measured: polling longer steals the core torch needs between matvecs in generation
};

std::mutex g_run_mutex;   // held for a whole parallel_for, and by set_threads
std::mutex g_pool_mutex;
ThreadPool *g_pool = nullptr;  // leaked at exit on purpose: joining threads during interpreter teardown can hang
int g_threads = 0;

int hardware_threads() {
    const unsigned n = std::thread::hardware_concurrency();
    return n ? static_cast<int>(n) : 1;
}

ThreadPool &pool() {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (!g_pool) {
        if (g_threads <= 0) g_threads = hardware_threads();
        g_pool = new ThreadPool(g_threads);
    }
    return *g_pool;
}

thread_local int t_serial = 0;  // SerialRegions alive on this thread

void parallel_for(int64_t n_tasks, const std::function<void(int64_t)> &fn, int width = 0) {
    if (n_tasks <= 0) return;
    if (t_serial > 0) {  // inside a lane of an outer job (SerialRegion): this thread alone, no pool
        for (int64_t i = 0; i < n_tasks; ++i) fn(i);
        return;
    }
    std::lock_guard<std::mutex> serial(g_run_mutex);
    ThreadPool &p = pool();
    p.run(n_tasks, width > 0 ? width : p.size(), fn);
}

}  // namespace

namespace {
int g_hold_backoff = 0;  // holds left to skip after one whose helpers missed their jobs
std::mutex g_hold_mutex;
const bool g_hold_enabled = [] {
    const char *env = std::getenv("HIERARCHOS_KERNEL_HOLD");
    return !(env && std::string(env) == "0");
}();
}  // namespace

PoolHold::PoolHold() {
    std::lock_guard<std::mutex> lock(g_hold_mutex);
    if (!g_hold_enabled || get_threads() < 2) return;
    if (g_hold_backoff > 0) {
        --g_hold_backoff;
        return;
    }
    active_ = true;
    const auto c = pool().counts();
    jobs0_ = c.first, missed0_ = c.second;
    g_holds.fetch_add(1);
}

PoolHold::~PoolHold() {
    if (!active_) return;
    std::lock_guard<std::mutex> lock(g_hold_mutex);
    g_holds.fetch_sub(1);
    const auto c = pool().counts();
    const int64_t jobs = c.first - jobs0_, missed = c.second - missed0_;
    // helpers that miss more than one job in eight have no core of their own now: polling only
    // takes time from the caller (or another process), so let them sleep for the next holds
    if (jobs >= 8 && missed * 8 > jobs) g_hold_backoff = kHoldBackoff;
}

SerialRegion::SerialRegion() : previous_(t_serial) { ++t_serial; }
SerialRegion::~SerialRegion() { t_serial = previous_; }

void parallel_tasks(int64_t n_tasks, const std::function<void(int64_t)> &fn, int width) {
    parallel_for(n_tasks, fn, width);
}

void set_threads(int n) {
    std::lock_guard<std::mutex> serial(g_run_mutex);
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    const int wanted = n > 0 ? n : hardware_threads();
    if (g_pool && g_pool->size() == wanted) return;
    delete g_pool;  // joins its workers; no job runs (we hold g_run_mutex)
    g_pool = nullptr;
    g_threads = wanted;
}

int get_threads() {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    return g_threads > 0 ? g_threads : hardware_threads();
}

// ---- whole-matrix operations ---------------------------------------------------------

namespace {

// Enough independent rows per task to amortise the task fetch, few enough tasks per
// thread to balance: about 8 tasks per thread.
int64_t rows_per_task(int64_t rows, int64_t work_per_row) {
    const int64_t threads = get_threads();
    int64_t chunk = (rows + threads * 8 - 1) / (threads * 8);
    const int64_t min_rows = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, work_per_row));
    chunk = std::max(chunk, min_rows);
    return std::max<int64_t>(1, std::min(chunk, rows));
}

// The interleaved layout of ActQ8_0View (formats.h) for groups of `group` (2 or 4) blocks of
// one activation row, in place, with the per-lane offset corrections.
void interleave_act_groups(int8_t *qs, int32_t *corr, int64_t n_blocks, int group) {
    const int half = 16 * group;
    int8_t natural[4 * QK];
    for (int64_t b = 0; b + group <= n_blocks; b += group) {
        int8_t *g = qs + b * QK;
        std::memcpy(natural, g, static_cast<size_t>(group * QK));
        for (int j = 0; j < group; ++j) {
            std::memcpy(g + 16 * j, natural + QK * j, 16);
            std::memcpy(g + half + 16 * j, natural + QK * j + 16, 16);
        }
        for (int l = 0; l < 4 * group; ++l) {
            int32_t sum = 0;
            for (int i = 0; i < 4; ++i) sum += g[4 * l + i] + g[half + 4 * l + i];
            corr[b * 4 + l] = -8 * sum;
        }
    }
}

}  // namespace

void quantize(QType t, const float *w, int64_t rows, int64_t cols, uint8_t *out) {
    const int64_t rb = cols / block_size(t) * block_bytes(t);
    const int64_t chunk = rows_per_task(rows, cols * (t == QType::Q2_K ? 64 : 1));
    parallel_for((rows + chunk - 1) / chunk, [&](int64_t task) {
        for (int64_t r = task * chunk; r < std::min(rows, (task + 1) * chunk); ++r)
            quantize_row(t, w + r * cols, out + r * rb, cols);
    });
}

void dequantize(QType t, const uint8_t *data, int64_t rows, int64_t cols, float *out) {
    const int64_t rb = cols / block_size(t) * block_bytes(t);
    const int64_t chunk = rows_per_task(rows, cols);
    parallel_for((rows + chunk - 1) / chunk, [&](int64_t task) {
        for (int64_t r = task * chunk; r < std::min(rows, (task + 1) * chunk); ++r)
            dequantize_row(t, data + r * rb, out + r * cols, cols);
    });
}

void dequantize_rows(QType t, const uint8_t *data, int64_t cols, const int64_t *ids, int64_t n, float *out) {
    const int64_t rb = cols / block_size(t) * block_bytes(t);
    for (int64_t i = 0; i < n; ++i) dequantize_row(t, data + ids[i] * rb, out + i * cols, cols);
}

namespace {

// One matmul's activations, quantized once (Q8_0, or Q8_K for Q2_K) into storage reused across
// calls of the same thread: no allocation per matvec.
struct ActScratch {
    std::vector<int8_t> qs;
    std::vector<float> d;
    std::vector<int32_t> sums, corr;
    std::vector<BlockQ8_K> q8k;
    ActQ8_0View view0{};
    ActQ8_KView viewk{};
};

void prepare_activations(const IsaKernels *isa, const MatmulJob &job, ActScratch &s) {
    const QType t = job.t;
    const int64_t n = job.n, cols = job.cols;
    const float *x = job.x;
    const int64_t n_blocks = cols / block_size(t);
    const int64_t act_rows_per_task = std::max<int64_t>(1, std::min<int64_t>(n, 16));
    const int64_t act_tasks = (n + act_rows_per_task - 1) / act_rows_per_task;
    const int act_width = n * cols >= (1 << 16) ? 0 : 1;  // small activations: no thread hand-off
    // The worker lambdas get plain pointers: naming a thread_local inside them would refer to
    // the worker's own (empty) instance.
    if (t == QType::Q2_K) {
        s.q8k.resize(static_cast<size_t>(n * n_blocks));
        BlockQ8_K *q8k = s.q8k.data();
        parallel_for(act_tasks, [=](int64_t task) {
            for (int64_t a = task * act_rows_per_task; a < std::min(n, (task + 1) * act_rows_per_task); ++a)
                quantize_act_row_q8_k(x + a * cols, q8k + a * n_blocks, cols);
        }, act_width);
        s.viewk = {q8k, n_blocks};
        return;
    }
    s.qs.resize(static_cast<size_t>(n * cols));
    s.d.resize(static_cast<size_t>(n * n_blocks));
    s.sums.resize(static_cast<size_t>(n * n_blocks));
    const int group = (t == QType::INT4 || t == QType::Q4_0) ? isa->q4_group : 0;
    if (group > 1) s.corr.resize(static_cast<size_t>(n * n_blocks * 4));
    int8_t *qs = s.qs.data();
    float *d = s.d.data();
    int32_t *sums = s.sums.data();
    int32_t *corr = group > 1 ? s.corr.data() : nullptr;
    const QuantizeQ8_0Fn quantize = isa->quantize_q8_0;
    parallel_for(act_tasks, [=](int64_t task) {
        for (int64_t a = task * act_rows_per_task; a < std::min(n, (task + 1) * act_rows_per_task); ++a) {
            const int64_t first = a * n_blocks;
            quantize(x + a * cols, qs + a * cols, d + first, sums + first, cols);
            if (group > 1) interleave_act_groups(qs + a * cols, corr + first * 4, n_blocks, group);
        }
    }, act_width);
    s.view0 = {qs, d, corr, n_blocks};
}

// Tasks of one matmul: (activation chunk, row chunk). Activation chunks of 64 rows keep the
// quantized activations of one chunk in L2 while a task streams its weight rows.
struct TaskGrid {
    int64_t act_chunk = 64, n_act_chunks = 0, row_chunk = 1, n_row_chunks = 0;
    TaskGrid() = default;
    explicit TaskGrid(const MatmulJob &job) {
        n_act_chunks = (job.n + act_chunk - 1) / act_chunk;
        row_chunk = rows_per_task(job.rows, job.cols * std::min<int64_t>(job.n, act_chunk) / 8);
        n_row_chunks = (job.rows + row_chunk - 1) / row_chunk;
    }
    int64_t size() const { return n_act_chunks * n_row_chunks; }
};

void run_task_of(const IsaKernels *isa, const MatmulJob &job, const ActScratch &s, const TaskGrid &g, int64_t task) {
    const int64_t ac = task / g.n_row_chunks, rc = task % g.n_row_chunks;
    const int64_t rb = job.cols / block_size(job.t) * block_bytes(job.t);
    DotArgs args{job.data, rb, job.cols / block_size(job.t),
                 rc * g.row_chunk, std::min(job.rows, (rc + 1) * g.row_chunk),
                 ac * g.act_chunk, std::min(job.n, (ac + 1) * g.act_chunk),
                 job.out, job.rows};
    if (job.t == QType::Q2_K) isa->dot_q2_k(args, s.viewk);
    else isa->dot_q8_0(job.t, args, s.view0);
}

}  // namespace

void matmul(QType t, const uint8_t *data, int64_t rows, int64_t cols, const float *x, int64_t n, float *out) {
    const IsaKernels *isa = current_isa();
    thread_local ActScratch scratch;
    const MatmulJob job{t, data, rows, cols, x, n, out};
    prepare_activations(isa, job, scratch);
    const TaskGrid grid(job);
    const ActScratch *s = &scratch;
    parallel_for(grid.size(), [&](int64_t task) { run_task_of(isa, job, *s, grid, task); });
}

struct MatmulBatch::Scratch {
    ActScratch act;
    TaskGrid grid;
};

MatmulBatch::MatmulBatch() = default;
MatmulBatch::~MatmulBatch() {
    for (Scratch *s : scratch_) delete s;
}

void MatmulBatch::prepare(const std::vector<MatmulJob> &jobs) {
    const IsaKernels *isa = current_isa();
    isa_ = isa;
    jobs_ = jobs;
    while (scratch_.size() < jobs.size()) scratch_.push_back(new Scratch());
    first_task_.assign(1, 0);
    for (size_t j = 0; j < jobs.size(); ++j) {
        if (jobs[j].n <= 0) {
            first_task_.push_back(first_task_.back());
            continue;
        }
        prepare_activations(isa, jobs[j], scratch_[j]->act);
        scratch_[j]->grid = TaskGrid(jobs[j]);
        first_task_.push_back(first_task_.back() + scratch_[j]->grid.size());
    }
}

void MatmulBatch::run_task(int64_t task) const {
    size_t j = 0;
    while (task >= first_task_[j + 1]) ++j;
    const Scratch &s = *scratch_[j];
    run_task_of(static_cast<const IsaKernels *>(isa_), jobs_[j], s.act, s.grid, task - first_task_[j]);
}

void matmul_many(const std::vector<MatmulJob> &jobs) {
    thread_local MatmulBatch batch;
    batch.prepare(jobs);
    const MatmulBatch *b = &batch;
    // One hand-off to the pool for every job: the matvecs of a layer share one wake-up.
    parallel_for(b->n_tasks(), [b](int64_t task) { b->run_task(task); });
}

uint64_t stream_read_parallel(const uint8_t *p, size_t bytes, int threads) {
    const int width = threads > 0 ? threads : get_threads();
    const size_t chunk = ((bytes / static_cast<size_t>(width)) + 4095) & ~static_cast<size_t>(4095);
    std::atomic<uint64_t> checksum{0};
    parallel_for(width, [&](int64_t task) {
        const size_t begin = std::min(bytes, static_cast<size_t>(task) * chunk);
        const size_t end = std::min(bytes, begin + chunk);
        checksum.fetch_add(stream_read(p + begin, end - begin));
    }, width);
    return checksum.load();
}

}  // namespace hk
