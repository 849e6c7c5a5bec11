// The vocabulary-wide part of sampling one token, in one call (see sampling.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace hk {

// Adds `sample_token` to the module.
void register_sampling(pybind11::module_ &m);

}  // namespace hk
