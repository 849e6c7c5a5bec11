// One generated token's read of the long-term memory in one call (see memory_step.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace hk {

// Adds `memory_read` to the module.
void register_memory_step(pybind11::module_ &m);

}  // namespace hk
