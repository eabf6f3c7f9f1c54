// Argument checks whose messages are sentences naming the argument and the values.
#pragma once

#include <torch/library.h>
#include <ATen/core/Tensor.h>

#include <sstream>
#include <string>
#include <vector>

namespace lora_ext {

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes();
  return os.str();
}

}  // namespace lora_ext

// LORA_CHECK(cond, "message parts", ...): raises ValueError in Python (c10::ValueError).
#define LORA_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "lora_ext: ", __VA_ARGS__)

#define LORA_CHECK_DIM(t, n)                                                                    \
  LORA_CHECK((t).dim() == (n), #t " must have " #n " dimensions, but has shape ",              \
             ::lora_ext::shape_str(t))

#define LORA_CHECK_SIZE(t, d, expected, what)                                                   \
  LORA_CHECK((t).size(d) == (expected), #t ".size(" #d ") must equal " what " (", (expected),   \
             "), but " #t " has shape ", ::lora_ext::shape_str(t))
