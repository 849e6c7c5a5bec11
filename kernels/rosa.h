// ROSA's suffix automaton over a bounded token history: the C++ port of
// hierarchos/model/rosa.py (same hints, same rebuild schedule; see that module's doc).
#pragma once

#include <cstdint>
#include <vector>

namespace hk {

class RosaAutomaton {
public:
    RosaAutomaton(int64_t window, int64_t none_id);

    // Appends tokens in order and writes one hint per token (hints may be null).
    void extend(const int64_t *tokens, int64_t n, int64_t *hints);

    int64_t window() const { return window_; }
    int64_t none_id() const { return none_id_; }
    int64_t num_tokens = 0;
    int64_t history_len() const { return static_cast<int64_t>(history_.size()); }
    int64_t num_states() const { return static_cast<int64_t>(len_.size()); }
    const std::vector<int64_t> &history() const { return history_; }

    // Restores the automaton from its held history (the automaton is a function of it).
    void restore(const std::vector<int64_t> &history, int64_t num_tokens);

private:
    struct Edge {
        int64_t token;
        int32_t state;   // owner
        int32_t target;
        int32_t next;    // next edge of the same state, -1 at the end
    };

    void reset();
    void feed(const int64_t *tokens, int64_t n, int64_t *hints);
    void rebuild();
    int32_t new_state(int32_t length, int64_t end, int32_t link);
    int32_t find_edge(int32_t state, int64_t token) const;  // edge index or -1
    void add_edge(int32_t state, int64_t token, int32_t target);
    void grow_table();

    int64_t window_, none_id_;
    std::vector<int64_t> history_;
    std::vector<int32_t> link_, len_, head_;  // per state; head_ = first edge
    std::vector<int64_t> end_;                // most recent end position per state
    std::vector<Edge> edges_;
    std::vector<int32_t> table_;              // open addressing: (state, token) -> edge index
    int32_t last_ = 0;
};

}  // namespace hk
