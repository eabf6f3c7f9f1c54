// linear_lora's Autograd kernel, in C++.
//
// The op is the serving hot path: every patched nn.Linear of every decode step calls it. Compiled
// graphs (torch.compile) call it through torch.ops, which enters the Autograd key first; a Python
// autograd kernel there (torch.library.register_autograd) cost 9.9 us a call against 5.3 us for the
// eager direct call (benchmarks/NOTES.md), paid 28 times a step by the bench's model. In C++, a
// call that needs no gradient goes straight below Autograd; one that does records a node whose
// backward is the Python one's (lora_ext/op_autograd.py states the formulas):
//   dx = lora_backward's dx + dy W,   dW = dy^T x,   dbias = sum of dy over rows,
//   dA, dB from lora_backward; slot_ids, scales, ranks and plan get no gradient.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "op_signatures.h"

namespace lora_ext {
namespace {

using namespace op_signatures;

at::Tensor linear_lora_below_autograd(T x, T weight, O bias, T lora_a, T lora_b, T slot_ids, O scales, O ranks,
                                      O plan) {
  static const auto op = find_op<LinearLoraFn>("lora_ext::linear_lora");
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, weight, bias, lora_a, lora_b, slot_ids, scales, ranks, plan);
}

OptTensor maybe(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

class LinearLora : public torch::autograd::Function<LinearLora> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, T x, T weight, O bias, T lora_a, T lora_b,
                            T slot_ids, O scales, O ranks, O plan) {
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->save_for_backward({x, weight, lora_a, lora_b, slot_ids, scales.value_or(at::Tensor()),
                            ranks.value_or(at::Tensor()), plan.value_or(at::Tensor())});
    return linear_lora_below_autograd(x, weight, bias, lora_a, lora_b, slot_ids, scales, ranks, plan);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto lora_backward = find_op<LoraBackwardFn>("lora_ext::lora_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3], &slot_ids = saved[4];
    const at::Tensor& grad = grads[0];
    // needs_input_grad counts the tensor inputs that were given: bias only when it was not None.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t a_edge = has_bias ? 3 : 2;
    const bool need_x = ctx->needs_input_grad(0), need_weight = ctx->needs_input_grad(1),
               need_bias = has_bias && ctx->needs_input_grad(2), need_a = ctx->needs_input_grad(a_edge),
               need_b = ctx->needs_input_grad(a_edge + 1);
    at::Tensor dx, da, db, dweight, dbias;
    if (need_x || need_a || need_b) {
      std::tie(dx, da, db) = lora_backward.call(grad, x, lora_a, lora_b, slot_ids, maybe(saved[5]), maybe(saved[6]),
                                                maybe(saved[7]), {need_x, need_a, need_b});
    }
    if (need_x) dx = dx.addmm_(grad, weight);  // the base layer's dy W added to the LoRA part (dx is fresh)
    if (need_weight) dweight = grad.t().mm(x);
    if (need_bias) dbias = grad.sum(0);
    return {dx, dweight, dbias, da, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

bool any_requires_grad(T x, T weight, O bias, T lora_a, T lora_b) {
  return x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()) ||
         lora_a.requires_grad() || lora_b.requires_grad();
}

at::Tensor linear_lora_autograd(T x, T weight, O bias, T lora_a, T lora_b, T slot_ids, O scales, O ranks, O plan) {
  if (!at::GradMode::is_enabled() || !any_requires_grad(x, weight, bias, lora_a, lora_b)) {
    return linear_lora_below_autograd(x, weight, bias, lora_a, lora_b, slot_ids, scales, ranks, plan);
  }
  return LinearLora::apply(x, weight, bias, lora_a, lora_b, slot_ids, scales, ranks, plan);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, Autograd, m) { m.impl("linear_lora", &linear_lora_autograd); }

}  // namespace lora_ext
