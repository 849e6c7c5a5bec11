// Native byte-level BPE encoder (see bpe.h). Three parts, each mirroring the library:
//   1. pre-tokenization: GPT-2's regex
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      as a hand-written leftmost-first scanner over UTF-8; the character classes (letter,
//      number, whitespace, other) come from a table handed in by Python; every non-ASCII code point
//      a text uses is recorded, and Python asks the library's own pre-tokenizer about the new ones
//      (set_classes corrects the table, and the batch is encoded again), so the library's Unicode
//      version is the one that counts;
//   2. BPE on each pre-token's bytes: the heap-ordered merge loop of tokenizers' word.rs (lowest
//      rank first, then leftmost; an entry is stale when its pair no longer maps to its new id);
//   3. a per-thread cache from pre-token bytes to ids (most pre-tokens of a corpus repeat).
// encode_batch releases the GIL and spreads blocks of texts over std::threads.
#include "bpe.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace hk {
namespace {

enum CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };
constexpr uint32_t kCodePoints = 0x110000;

inline uint64_t mix64(uint64_t x) {  // murmur3's finalizer: every input bit reaches every output bit
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

inline uint64_t hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = mix64(0x9E3779B97F4A7C15ULL ^ n);
    while (n >= 8) {
        uint64_t v;
        std::memcpy(&v, p, 8);
        h = mix64(h ^ v);
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t v = 0;
        std::memcpy(&v, p, n);
        h = mix64(h ^ v ^ 0x5555555555555555ULL);
    }
    return h;
}

// (left id, right id) -> (rank, new id): open addressing, immutable after construction.
class MergeTable {
public:
    void build(const std::vector<std::array<uint32_t, 3>> &merges) {
        size_t cap = 16;
        while (cap < merges.size() * 2 + 16) cap <<= 1;
        keys_.assign(cap, kEmpty);
        values_.assign(cap, {0, 0});
        mask_ = cap - 1;
        for (size_t rank = 0; rank < merges.size(); ++rank) {
            // a repeated pair keeps its last rank, as the library's HashMap::collect does
            const uint64_t key = (uint64_t(merges[rank][0]) << 32) | merges[rank][1];
            size_t slot = mix64(key) & mask_;
            while (keys_[slot] != kEmpty && keys_[slot] != key) slot = (slot + 1) & mask_;
            keys_[slot] = key;
            values_[slot] = {static_cast<uint32_t>(rank), merges[rank][2]};
        }
    }

    // Returns false when the pair has no merge.
    inline bool find(uint32_t left, uint32_t right, uint32_t *rank, uint32_t *new_id) const {
        const uint64_t key = (uint64_t(left) << 32) | right;
        size_t slot = mix64(key) & mask_;
        while (true) {
            const uint64_t k = keys_[slot];
            if (k == key) {
                *rank = values_[slot].first;
                *new_id = values_[slot].second;
                return true;
            }
            if (k == kEmpty) return false;
            slot = (slot + 1) & mask_;
        }
    }

private:
    static constexpr uint64_t kEmpty = ~0ULL;  // ids are < 2^32 - 1, so no real pair is all ones
    std::vector<uint64_t> keys_;
    std::vector<std::pair<uint32_t, uint32_t>> values_;
    size_t mask_ = 0;
};

// Byte strings -> id lists (the per-thread word cache, and the whole-word vocabulary of
// ignore_merges tokenizers). Keys and values live in two arenas; the slot table holds indices.
class BytesMap {
public:
    BytesMap() { reset(1 << 12); }

    void reset(size_t slots) {
        slots_.assign(slots, 0);
        mask_ = slots - 1;
        entries_.clear();
        keys_.clear();
        ids_.clear();
    }

    const uint32_t *find(const uint8_t *p, size_t n, uint64_t h, uint32_t *count) const {
        size_t slot = h & mask_;
        while (uint32_t e = slots_[slot]) {
            const Entry &entry = entries_[e - 1];
            if (entry.hash == h && entry.key_len == n && std::memcmp(keys_.data() + entry.key_off, p, n) == 0) {
                *count = entry.n_ids;
                return ids_.data() + entry.ids_off;
            }
            slot = (slot + 1) & mask_;
        }
        return nullptr;
    }

    void insert(const uint8_t *p, size_t n, uint64_t h, const uint32_t *ids, size_t count) {
        if ((entries_.size() + 1) * 2 > slots_.size()) grow();
        Entry entry{h, keys_.size(), static_cast<uint32_t>(n), ids_.size(), static_cast<uint32_t>(count)};
        keys_.insert(keys_.end(), p, p + n);
        ids_.insert(ids_.end(), ids, ids + count);
        entries_.push_back(entry);
        place(static_cast<uint32_t>(entries_.size()));
    }

    size_t bytes_used() const { return keys_.size() + ids_.size() * 4 + entries_.size() * sizeof(Entry); }

private:
    struct Entry {
        uint64_t hash;
        size_t key_off;
        uint32_t key_len;
        size_t ids_off;
        uint32_t n_ids;
    };

    void place(uint32_t e) {
        size_t slot = entries_[e - 1].hash & mask_;
        while (slots_[slot]) slot = (slot + 1) & mask_;
        slots_[slot] = e;
    }

    void grow() {
        slots_.assign(slots_.size() * 2, 0);
        mask_ = slots_.size() - 1;
        for (uint32_t e = 1; e <= entries_.size(); ++e) place(e);
    }

    std::vector<uint32_t> slots_;  // 0: empty, else entry index + 1
    size_t mask_ = 0;
    std::vector<Entry> entries_;
    std::vector<uint8_t> keys_;
    std::vector<uint32_t> ids_;
};

constexpr size_t kCacheWordBytes = 256;      // longer pre-tokens are merged every time (as the library)
constexpr size_t kCacheLimit = 64u << 20;    // a thread's cache is emptied when it holds this much

struct Symbol {
    uint32_t id;
    int32_t prev, next;
    uint32_t len;  // bytes; 0 once merged into its left neighbour
};

struct MergeEntry {
    uint32_t rank, pos, new_id;
};

// The heap's order: lowest rank first, then lowest position (word.rs's Ord for Merge).
inline bool after(const MergeEntry &a, const MergeEntry &b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
}

constexpr size_t kSeenWords = kCodePoints / 64;

struct Scratch {  // one per thread: reused buffers
    std::vector<Symbol> symbols;
    std::vector<MergeEntry> heap;
    uint64_t *seen;  // bitmap of the non-ASCII code points this thread met
};

class BpeEncoder {
public:
    BpeEncoder(const std::vector<uint32_t> &byte_ids, const std::vector<std::array<uint32_t, 3>> &merges,
               const py::bytes &classes, const std::vector<std::pair<py::bytes, uint32_t>> &whole_words,
               bool ignore_merges)
        : ignore_merges_(ignore_merges) {
        if (byte_ids.size() != 256) throw py::value_error("byte_ids must hold the id of each of the 256 bytes");
        std::copy(byte_ids.begin(), byte_ids.end(), byte_ids_);
        const std::string table = classes;
        if (table.size() != kCodePoints) throw py::value_error("classes must hold one byte per code point (0x110000)");
        classes_.assign(table.begin(), table.end());
        for (uint8_t c : classes_)
            if (c > kSpace) throw py::value_error("classes: each byte must be 0 (other), 1 (letter), 2 (number) or 3 (space)");
        max_id_ = *std::max_element(byte_ids.begin(), byte_ids.end());
        for (const auto &m : merges) max_id_ = std::max({max_id_, m[0], m[1], m[2]});
        merges_.build(merges);
        if (ignore_merges_) {
            size_t slots = 16;
            while (slots < whole_words.size() * 2 + 16) slots <<= 1;
            vocab_.reset(slots);
            for (const auto &entry : whole_words) {
                const std::string word = entry.first;
                const auto *p = reinterpret_cast<const uint8_t *>(word.data());
                vocab_.insert(p, word.size(), hash_bytes(p, word.size()), &entry.second, 1);
                max_id_ = std::max(max_id_, entry.second);
            }
        }
    }

    uint32_t max_id() const { return max_id_; }

    // Encodes texts[i] (pointer, byte length) into one flat id array with per-text counts.
    // Blocks of consecutive texts go to the threads; their outputs are joined in order.
    void encode_many(const std::vector<std::pair<const uint8_t *, size_t>> &texts, int threads,
                     std::vector<std::vector<uint32_t>> &block_ids, std::vector<size_t> &block_starts,
                     int64_t *counts) {
        std::lock_guard<std::mutex> lock(mutex_);  // the caches are per thread slot, not per call
        size_t total = 0;
        for (const auto &t : texts) total += t.second;
        const size_t n_texts = texts.size();
        const size_t want = std::max<size_t>(1, total / (64u << 10));  // blocks of ~64 KiB
        block_starts.clear();
        size_t acc = 0, goal = (total + want - 1) / want;
        block_starts.push_back(0);
        for (size_t i = 0; i < n_texts; ++i) {
            acc += texts[i].second;
            if (acc >= goal && i + 1 < n_texts) {
                block_starts.push_back(i + 1);
                acc = 0;
            }
        }
        block_starts.push_back(n_texts);
        const size_t n_blocks = block_starts.size() - 1;
        block_ids.assign(n_blocks, {});
        if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
        threads = static_cast<int>(std::min<size_t>(threads, n_blocks));
        while (caches_.size() < static_cast<size_t>(threads)) caches_.emplace_back(new BytesMap());
        while (seen_.size() < static_cast<size_t>(threads)) seen_.emplace_back(kSeenWords, 0);
        std::atomic<size_t> next{0};
        auto work = [&](int t) {
            Scratch scratch;
            scratch.seen = seen_[t].data();
            BytesMap &cache = *caches_[t];
            for (size_t b; (b = next.fetch_add(1)) < n_blocks;) {
                std::vector<uint32_t> &out = block_ids[b];
                for (size_t i = block_starts[b]; i < block_starts[b + 1]; ++i) {
                    const size_t before = out.size();
                    encode_text(texts[i].first, texts[i].second, out, cache, scratch);
                    counts[i] = static_cast<int64_t>(out.size() - before);
                }
                if (cache.bytes_used() > kCacheLimit) cache.reset(1 << 12);
            }
        };
        if (threads <= 1) {
            work(0);
        } else {
            std::vector<std::thread> pool;
            for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
            work(0);
            for (auto &th : pool) th.join();
        }
        for (int t = 0; t < threads; ++t) {  // fold the threads' bitmaps into the code points seen so far
            uint64_t *bits = seen_[t].data();
            for (size_t w = 0; w < kSeenWords; ++w) {
                if (!bits[w]) continue;
                uint64_t fresh = bits[w] & ~seen_all_[w];
                seen_all_[w] |= bits[w];
                bits[w] = 0;
                for (uint32_t bit = 0; bit < 64; ++bit)
                    if (fresh >> bit & 1) new_points_.push_back(static_cast<uint32_t>(w * 64 + bit));
            }
        }
    }

    // Non-ASCII code points met for the first time since the last call.
    std::vector<uint32_t> take_new_code_points() {
        std::lock_guard<std::mutex> lock(mutex_);
        std::vector<uint32_t> out;
        out.swap(new_points_);
        std::sort(out.begin(), out.end());
        return out;
    }

    void set_classes(const std::vector<uint32_t> &points, const std::vector<uint8_t> &classes) {
        if (points.size() != classes.size()) throw py::value_error("set_classes: one class per code point");
        std::lock_guard<std::mutex> lock(mutex_);
        for (size_t i = 0; i < points.size(); ++i) {
            if (points[i] >= kCodePoints || classes[i] > kSpace) throw py::value_error("set_classes: bad code point or class");
            classes_[points[i]] = classes[i];
        }
    }

private:
    // Class and byte length of the UTF-8 character at s[i] (the text is valid UTF-8: Python made it).
    inline uint8_t class_at(const uint8_t *s, size_t i, size_t *len, uint64_t *seen) const {
        const uint8_t c = s[i];
        uint32_t cp;
        if (c < 0x80) {
            *len = 1;
            return classes_[c];
        } else if (c < 0xE0) {
            *len = 2;
            cp = (uint32_t(c & 0x1F) << 6) | (s[i + 1] & 0x3F);
        } else if (c < 0xF0) {
            *len = 3;
            cp = (uint32_t(c & 0x0F) << 12) | (uint32_t(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
        } else {
            *len = 4;
            cp = (uint32_t(c & 0x07) << 18) | (uint32_t(s[i + 1] & 0x3F) << 12) | (uint32_t(s[i + 2] & 0x3F) << 6) |
                 (s[i + 3] & 0x3F);
        }
        if (cp >= kCodePoints) return kOther;
        seen[cp >> 6] |= uint64_t(1) << (cp & 63);
        return classes_[cp];
    }

    // End of the run of characters of class `cls` that starts at s[j].
    inline size_t run_end(const uint8_t *s, size_t n, size_t j, uint8_t cls, uint64_t *seen) const {
        size_t len;
        while (j < n && class_at(s, j, &len, seen) == cls) j += len;
        return j;
    }

    // End of the pre-token that starts at s[i]: the regex's alternatives, tried in order.
    size_t next_token(const uint8_t *s, size_t n, size_t i, uint64_t *seen) const {
        const uint8_t c = s[i];
        if (c == '\'' && i + 1 < n) {  // 's 't 'm 'd, then 're 've 'll
            const uint8_t a = s[i + 1];
            if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
            if (i + 2 < n) {
                const uint8_t b = s[i + 2];
                if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
            }
        }
        size_t len;
        const uint8_t cls = class_at(s, i, &len, seen);
        if (c == ' ' && i + 1 < n) {  // " ?X+": one space joins a following letter, number or other run
            size_t len2;
            const uint8_t next_cls = class_at(s, i + 1, &len2, seen);
            if (next_cls != kSpace) return run_end(s, n, i + 1 + len2, next_cls, seen);
        }
        if (cls != kSpace) return run_end(s, n, i + len, cls, seen);
        // whitespace: \s+(?!\S) takes the run but its last character when a non-space follows
        // (that character then starts the next pre-token), the whole run at the end of the text;
        // a single whitespace character before a non-space is \s+ on its own.
        size_t j = i + len, last = i;
        while (j < n) {
            size_t l;
            if (class_at(s, j, &l, seen) != kSpace) break;
            last = j;
            j += l;
        }
        if (j == n) return n;
        return last > i ? last : j;
    }

    void merge_word(const uint8_t *p, size_t n, std::vector<uint32_t> &out, Scratch &scratch) const {
        std::vector<Symbol> &sym = scratch.symbols;
        std::vector<MergeEntry> &heap = scratch.heap;
        sym.resize(n);
        heap.clear();
        for (size_t i = 0; i < n; ++i)
            sym[i] = {byte_ids_[p[i]], static_cast<int32_t>(i) - 1, i + 1 < n ? static_cast<int32_t>(i + 1) : -1, 1};
        uint32_t rank, new_id;
        for (size_t i = 0; i + 1 < n; ++i)
            if (merges_.find(sym[i].id, sym[i + 1].id, &rank, &new_id))
                heap.push_back({rank, static_cast<uint32_t>(i), new_id});
        std::make_heap(heap.begin(), heap.end(), after);
        while (!heap.empty()) {
            std::pop_heap(heap.begin(), heap.end(), after);
            const MergeEntry top = heap.back();
            heap.pop_back();
            Symbol &left = sym[top.pos];
            if (left.len == 0 || left.next == -1) continue;
            const int32_t right_pos = left.next;
            const Symbol right = sym[right_pos];
            if (!merges_.find(left.id, right.id, &rank, &new_id) || new_id != top.new_id) continue;  // stale
            left.id = top.new_id;
            left.len += right.len;
            left.next = right.next;
            sym[right_pos].len = 0;
            if (right.next >= 0) sym[right.next].prev = static_cast<int32_t>(top.pos);
            if (left.prev >= 0 && merges_.find(sym[left.prev].id, left.id, &rank, &new_id)) {
                heap.push_back({rank, static_cast<uint32_t>(left.prev), new_id});
                std::push_heap(heap.begin(), heap.end(), after);
            }
            if (left.next >= 0 && merges_.find(left.id, sym[left.next].id, &rank, &new_id)) {
                heap.push_back({rank, top.pos, new_id});
                std::push_heap(heap.begin(), heap.end(), after);
            }
        }
        for (size_t i = 0; i < n; ++i)
            if (sym[i].len) out.push_back(sym[i].id);
    }

    inline void encode_word(const uint8_t *p, size_t n, std::vector<uint32_t> &out, BytesMap &cache,
                            Scratch &scratch) const {
        if (n == 1) {
            out.push_back(byte_ids_[p[0]]);
            return;
        }
        const uint64_t h = (n <= kCacheWordBytes || ignore_merges_) ? hash_bytes(p, n) : 0;
        uint32_t count;
        if (ignore_merges_) {  // a pre-token that is itself in the vocabulary is one token
            if (const uint32_t *ids = vocab_.find(p, n, h, &count)) {
                out.push_back(ids[0]);
                return;
            }
        }
        if (n > kCacheWordBytes) {
            merge_word(p, n, out, scratch);
            return;
        }
        if (const uint32_t *ids = cache.find(p, n, h, &count)) {
            out.insert(out.end(), ids, ids + count);
            return;
        }
        const size_t before = out.size();
        merge_word(p, n, out, scratch);
        cache.insert(p, n, h, out.data() + before, out.size() - before);
    }

    void encode_text(const uint8_t *s, size_t n, std::vector<uint32_t> &out, BytesMap &cache,
                     Scratch &scratch) const {
        for (size_t i = 0; i < n;) {
            const size_t j = next_token(s, n, i, scratch.seen);
            encode_word(s + i, j - i, out, cache, scratch);
            i = j;
        }
    }

    uint32_t byte_ids_[256];
    std::vector<uint8_t> classes_;
    MergeTable merges_;
    BytesMap vocab_;
    bool ignore_merges_;
    uint32_t max_id_ = 0;
    std::mutex mutex_;
    std::vector<std::unique_ptr<BytesMap>> caches_;
    std::vector<std::vector<uint64_t>> seen_;            // per thread slot
    std::vector<uint64_t> seen_all_ = std::vector<uint64_t>(kSeenWords, 0);
    std::vector<uint32_t> new_points_;
};

// UTF-8 views of a list of str (or bytes) objects; taken with the GIL held, valid while the list lives.
std::vector<std::pair<const uint8_t *, size_t>> utf8_views(const py::list &texts) {
    std::vector<std::pair<const uint8_t *, size_t>> views;
    views.reserve(texts.size());
    for (const py::handle item : texts) {
        const char *data;
        Py_ssize_t size;
        if (PyUnicode_Check(item.ptr())) {
            data = PyUnicode_AsUTF8AndSize(item.ptr(), &size);  // ASCII strings: no copy
            if (data == nullptr) throw py::error_already_set();  // e.g. a lone surrogate
        } else if (PyBytes_Check(item.ptr())) {
            char *buffer;
            if (PyBytes_AsStringAndSize(item.ptr(), &buffer, &size) != 0) throw py::error_already_set();
            data = buffer;
        } else {
            throw py::type_error("encode_batch takes a list of str (or UTF-8 bytes)");
        }
        views.emplace_back(reinterpret_cast<const uint8_t *>(data), static_cast<size_t>(size));
    }
    return views;
}

template <typename T>
py::array_t<T> join_blocks(const std::vector<std::vector<uint32_t>> &blocks) {
    size_t total = 0;
    for (const auto &b : blocks) total += b.size();
    py::array_t<T> ids(static_cast<py::ssize_t>(total));
    T *dst = ids.mutable_data();
    {
        py::gil_scoped_release release;
        for (const auto &b : blocks) {
            if (sizeof(T) == sizeof(uint32_t)) {
                if (!b.empty()) std::memcpy(dst, b.data(), b.size() * sizeof(uint32_t));
            } else {
                for (size_t i = 0; i < b.size(); ++i) dst[i] = static_cast<T>(b[i]);
            }
            dst += b.size();
        }
    }
    return ids;
}

py::tuple encode_batch(BpeEncoder &self, const py::list &texts, int threads, const std::string &dtype) {
    if (dtype != "uint16" && dtype != "uint32") throw py::value_error("dtype must be 'uint16' or 'uint32'");
    if (dtype == "uint16" && self.max_id() > 0xFFFF)
        throw py::value_error("ids up to " + std::to_string(self.max_id()) + " do not fit uint16: use dtype='uint32'");
    const auto views = utf8_views(texts);
    py::array_t<int64_t> counts(static_cast<py::ssize_t>(views.size()));
    int64_t *counts_ptr = counts.mutable_data();
    std::vector<std::vector<uint32_t>> blocks;
    std::vector<size_t> starts;
    if (!views.empty()) {
        py::gil_scoped_release release;
        self.encode_many(views, threads, blocks, starts, counts_ptr);
    }
    if (dtype == "uint16") return py::make_tuple(join_blocks<uint16_t>(blocks), counts);
    return py::make_tuple(join_blocks<uint32_t>(blocks), counts);
}

}  // namespace

void register_bpe(py::module_ &m) {
    py::class_<BpeEncoder>(m, "BpeEncoder",
                           "byte-level BPE with GPT-2's pre-tokenization; ids equal to Hugging Face tokenizers' "
                           "(hierarchos/data/fast_bpe.py builds it from a tokenizer.json and checks that)")
        .def(py::init<const std::vector<uint32_t> &, const std::vector<std::array<uint32_t, 3>> &, const py::bytes &,
                      const std::vector<std::pair<py::bytes, uint32_t>> &, bool>(),
             py::arg("byte_ids"), py::arg("merges"), py::arg("classes"), py::arg("whole_words"),
             py::arg("ignore_merges") = false,
             "byte_ids: the id of each byte's token; merges: (left, right, new) ids in rank order; classes: "
             "0x110000 bytes, per code point 0 other, 1 letter, 2 number, 3 whitespace; whole_words: (token bytes, "
             "id) of the vocabulary, used only with ignore_merges")
        .def("encode_batch", &encode_batch, py::arg("texts"), py::arg("threads") = 0, py::arg("dtype") = "uint32",
             "list of str -> (ids: all texts' ids end to end, counts: int64 ids per text); threads <= 0: one per core")
        .def("take_new_code_points", &BpeEncoder::take_new_code_points,
             "the non-ASCII code points the texts used for the first time since the last call (sorted)")
        .def("set_classes", &BpeEncoder::set_classes, py::arg("code_points"), py::arg("classes"),
             "correct the class of some code points (0 other, 1 letter, 2 number, 3 whitespace)")
        .def_property_readonly("max_id", &BpeEncoder::max_id);
}

}  // namespace hk
