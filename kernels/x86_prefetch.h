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

// How far ahead of the rows being read to ask for weights: whole groups of `group_bytes` (a group
// of rows read side by side), at least kPrefetchBytes on, so that a prefetch lands on the same
// columns of the rows that group will read.
inline int64_t prefetch_offset(int64_t group_bytes) {
    return (kPrefetchBytes + group_bytes - 1) / group_bytes * group_bytes;
}

// A call's first rows (those the in-loop prefetches of its own rows never cover), asked for as it starts.
inline void prefetch_first_rows(const DotArgs &args) {
    const int64_t bytes = prefetch_offset(args.row_bytes), rows = (args.r1 - args.r0) * args.row_bytes;
    prefetch_l2(args.w + args.r0 * args.row_bytes, rows < bytes ? rows : bytes);
}
