// Software prefetch of weight rows into L2, shared by the x86 kernels. Included inside each
// unit's anonymous namespace (after <immintrin.h>), like x86_q4_pairs.h: every copy has
// internal linkage, so units built with different target flags never share inline code.
//
// A matvec reads every weight byte once, from DRAM once a model outgrows the L3. A core's own
// hardware prefetchers left most of the bandwidth unused (they restart at each 4 KB page), and
// prefetching into L1 (T0) did little more: its few miss buffers fill, and the loads still
// wait. Asking L2 (T1) for the bytes ~8 KB ahead keeps many more lines in flight. Zen 4, 2
// cores, Q4_0, every matrix cold: 768 x 3072 on one core 9-10 -> 20-23 GB/s, 4096 x 14336 on two
// 27 -> 35 GB/s (BENCHMARKS.md, issue 17). Prefetches never fault, so running past the last row
// is harmless.
constexpr int64_t kPrefetchBytes = 8192;

inline void prefetch_l2(const uint8_t *p, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64)
        _mm_prefetch(reinterpret_cast<const char *>(p + offset), _MM_HINT_T1);
}

// Row-at-a-time kernels: before row r, ask for row r + rows_ahead(row_bytes) (whole rows,
// at least kPrefetchBytes on); a call's first rows are asked for as it starts.
inline int64_t prefetch_rows_ahead(int64_t row_bytes) { return (kPrefetchBytes + row_bytes - 1) / row_bytes; }

inline void prefetch_first_rows(const DotArgs &args) {
    const int64_t ahead = prefetch_rows_ahead(args.row_bytes);
    const int64_t rows = args.r1 - args.r0 < ahead ? args.r1 - args.r0 : ahead;
    prefetch_l2(args.w + args.r0 * args.row_bytes, rows * args.row_bytes);
}
