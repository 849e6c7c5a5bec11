// ROSA suffix automaton in C++. States are parallel arrays; transitions live in one edge
// array (a per-state linked list, for copying a state's edges when it is split) indexed
// by an open-addressing hash on (state, token). The rebuild schedule and tie rules are
// exactly those of the Python reference in hierarchos/model/rosa.py.
#include "rosa.h"

#include <stdexcept>
#include <string>

namespace hk {

namespace {

inline uint64_t mix(int32_t state, int64_t token) {
    uint64_t h = static_cast<uint64_t>(token) * 0x9E3779B97F4A7C15ULL ^ (static_cast<uint64_t>(state) + 0x632BE59BD9B4E019ULL);
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 32);
}

}  // namespace

RosaAutomaton::RosaAutomaton(int64_t window, int64_t none_id) : window_(window), none_id_(none_id) {
    if (window < 1) throw std::invalid_argument("window must be >= 1, got " + std::to_string(window));
    reset();
}

void RosaAutomaton::reset() {
    history_.clear();
    link_.assign(1, -1);
    len_.assign(1, 0);
    head_.assign(1, -1);
    end_.assign(1, -1);
    edges_.clear();
    table_.assign(64, -1);
    last_ = 0;
}

int32_t RosaAutomaton::new_state(int32_t length, int64_t end, int32_t link) {
    link_.push_back(link);
    len_.push_back(length);
    head_.push_back(-1);
    end_.push_back(end);
    return static_cast<int32_t>(len_.size() - 1);
}

int32_t RosaAutomaton::find_edge(int32_t state, int64_t token) const {
    const size_t mask = table_.size() - 1;
    for (size_t slot = mix(state, token) & mask;; slot = (slot + 1) & mask) {
        const int32_t e = table_[slot];
        if (e < 0) return -1;
        if (edges_[e].token == token && edges_[e].state == state) return e;
    }
}

void RosaAutomaton::grow_table() {
    table_.assign(table_.size() * 2, -1);
    const size_t mask = table_.size() - 1;
    for (size_t e = 0; e < edges_.size(); ++e) {
        size_t slot = mix(edges_[e].state, edges_[e].token) & mask;
        while (table_[slot] >= 0) slot = (slot + 1) & mask;
        table_[slot] = static_cast<int32_t>(e);
    }
}

void RosaAutomaton::add_edge(int32_t state, int64_t token, int32_t target) {
    if ((edges_.size() + 1) * 2 > table_.size()) grow_table();  // load factor <= 1/2
    const int32_t e = static_cast<int32_t>(edges_.size());
    edges_.push_back({token, state, target, head_[state]});
    head_[state] = e;
    const size_t mask = table_.size() - 1;
    size_t slot = mix(state, token) & mask;
    while (table_[slot] >= 0) slot = (slot + 1) & mask;
    table_[slot] = e;
}

void RosaAutomaton::feed(const int64_t *tokens, int64_t n, int64_t *hints) {
    for (int64_t i = 0; i < n; ++i) {
        const int64_t token = tokens[i];
        const int64_t pos = static_cast<int64_t>(history_.size());
        history_.push_back(token);
        const int32_t cur = new_state(len_[last_] + 1, pos, 0);
        int32_t p = last_;
        while (p != -1 && find_edge(p, token) < 0) {
            add_edge(p, token, cur);
            p = link_[p];
        }
        if (p != -1) {
            const int32_t q = edges_[find_edge(p, token)].target;
            if (len_[p] + 1 == len_[q]) {
                link_[cur] = q;
            } else {
                // Split q: the clone's end positions before this token equal q's.
                const int32_t clone = new_state(len_[p] + 1, end_[q], link_[q]);
                for (int32_t e = head_[q]; e >= 0; e = edges_[e].next) add_edge(clone, edges_[e].token, edges_[e].target);
                for (int32_t e; p != -1 && (e = find_edge(p, token)) >= 0 && edges_[e].target == q; p = link_[p])
                    edges_[e].target = clone;
                link_[q] = clone;
                link_[cur] = clone;
            }
        }
        last_ = cur;
        // The suffix-link parent is the longest suffix seen before: read its last end
        // position, then record `pos` as the newest end of every suffix state.
        int32_t state = link_[cur];
        if (hints) hints[i] = state > 0 ? history_[end_[state] + 1] : none_id_;
        for (; state > 0; state = link_[state]) end_[state] = pos;
    }
}

void RosaAutomaton::rebuild() {
    const std::vector<int64_t> kept(history_.begin() + window_, history_.end());
    reset();
    feed(kept.data(), static_cast<int64_t>(kept.size()), nullptr);
}

void RosaAutomaton::extend(const int64_t *tokens, int64_t n, int64_t *hints) {
    const int64_t limit = 2 * window_;
    int64_t start = 0;
    while (start < n) {
        const int64_t room = limit - static_cast<int64_t>(history_.size());
        const int64_t take = n - start < room ? n - start : room;
        feed(tokens + start, take, hints ? hints + start : nullptr);
        start += take;
        num_tokens += take;
        if (static_cast<int64_t>(history_.size()) == limit) rebuild();
    }
}

void RosaAutomaton::restore(const std::vector<int64_t> &history, int64_t consumed) {
    if (static_cast<int64_t>(history.size()) >= 2 * window_)
        throw std::invalid_argument("a ROSA history holds fewer than 2 * window tokens");
    reset();
    feed(history.data(), static_cast<int64_t>(history.size()), nullptr);
    num_tokens = consumed;
}

}  // namespace hk
