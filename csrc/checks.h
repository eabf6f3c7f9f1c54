// Argument checks whose messages are sentences naming the argument and the values.
#pragma once

#include <c10/util/Exception.h>

// LORA_CHECK(cond, "message parts", ...): raises ValueError in Python (c10::ValueError).
#define LORA_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "lora_ext: ", __VA_ARGS__)
