// linear_lora_group on every backend without its own kernel (CUDA, for now): one linear_lora
// per member, through the dispatcher. The CPU kernel (csrc/cpu/linear_lora_cpu.cpp) runs the
// members' deltas in one parallel region instead.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "lora_args.h"

namespace lora_ext {
namespace {

using LinearLoraFn = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                                const c10::optional<at::Tensor>&);

std::vector<at::Tensor> linear_lora_group_per_member(const at::Tensor& x, at::TensorList weights,
                                                     const c10::List<c10::optional<at::Tensor>>& biases,
                                                     at::TensorList lora_a, at::TensorList lora_b,
                                                     const at::Tensor& slot_ids, at::TensorList scales,
                                                     at::TensorList ranks, const c10::optional<at::Tensor>& plan) {
  const size_t n = weights.size();
  check_group_lists(n, biases.size(), lora_a.size(), lora_b.size(), scales.size(), ranks.size());
  static const auto linear_lora =
      c10::Dispatcher::singleton().findSchemaOrThrow("lora_ext::linear_lora", "").typed<LinearLoraFn>();
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < n; ++i) {
    outs.push_back(linear_lora.call(x, weights[i], biases.get(i), lora_a[i], lora_b[i], slot_ids, scales[i],
                                    ranks[i], plan));
  }
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CompositeExplicitAutograd, m) {
  m.impl("linear_lora_group", &linear_lora_group_per_member);
}

}  // namespace lora_ext
