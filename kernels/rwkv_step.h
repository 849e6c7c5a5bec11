// One token of a whole RWKV-7 stack in one call (see rwkv_step.cpp): the quantized model's
// generation step without a Python round trip per operation.
#pragma once

#include <pybind11/pybind11.h>

namespace hk {

// Adds the class `RwkvStackStep` to the module.
void register_rwkv_step(pybind11::module_ &m);

}  // namespace hk
