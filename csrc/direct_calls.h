// The lora_ext._C module's functions: direct entry points for serving calls (direct_calls.cpp).
#pragma once

#include <Python.h>

namespace lora_ext {

// linear_lora, add_lora_ and lora_delta, each calling the op's device kernel unboxed.
PyMethodDef* direct_call_methods();

}  // namespace lora_ext
