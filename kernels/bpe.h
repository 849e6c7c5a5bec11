// Native byte-level BPE encoder: GPT-2's pre-tokenization regex, written out by hand, and the
// BPE merge loop of Hugging Face `tokenizers` (models/bpe/word.rs), so that the ids equal the
// library's for ByteLevel + BPE tokenizers. The reference is the library itself:
// hierarchos/data/fast_bpe.py checks the two agree on every corpus before trusting this one.
#pragma once

#include <pybind11/pybind11.h>

namespace hk {

// Adds the class `BpeEncoder` to the module.
void register_bpe(pybind11::module_ &m);

}  // namespace hk
