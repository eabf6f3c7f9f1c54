// The C++ signatures of the ops as registered (csrc/lora_ops.cpp), for code that calls them
// through the dispatcher (direct_calls.cpp, linear_lora_autograd.cpp), and the typed handle of one.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <tuple>

namespace lora_ext {
namespace op_signatures {

using OptTensor = c10::optional<at::Tensor>;
using T = const at::Tensor&;
using O = const OptTensor&;

using LinearLoraFn = at::Tensor(T x, T weight, O bias, T lora_a, T lora_b, T slot_ids, O scales, O ranks, O plan);
using AddLoraFn = void(at::Tensor& out, T x, T lora_a, T lora_b, T slot_ids, O scales, O ranks, O plan);
using LoraDeltaFn = at::Tensor(T x, T lora_a, T lora_b, T slot_ids, O scales, O ranks, O plan);
using LoraBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(T grad_out, T x, T lora_a, T lora_b, T slot_ids,
                                                                      O scales, O ranks, O plan,
                                                                      std::array<bool, 3> output_mask);

// The handle of op `name` ("lora_ext::linear_lora"); look it up once (a function-local static).
template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace op_signatures
}  // namespace lora_ext
