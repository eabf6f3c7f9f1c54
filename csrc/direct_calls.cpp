// Direct entry points for the serving calls: lora_ext._C.linear_lora / add_lora_ / lora_delta.
//
// A call from Python that wants no gradient still pays for the way into the op: torch.ops parses
// the arguments against the schema and boxes them (or, through OpOverload.redispatch, runs a
// Python function and then boxes them). These functions take the same positional arguments,
// unpack the tensors directly and call the op's device kernel through the dispatcher, unboxed,
// with the backend key of x's device: the same kernel and the same checks as torch.ops, with
// none of the boxing. lora_ext/ops.py takes them only where no gradient is wanted, for plain
// tensors, outside dispatch modes and torch.compile (ops._takes_direct_call).
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

#include "direct_calls.h"
#include "op_signatures.h"

namespace lora_ext {
namespace {

using namespace op_signatures;

// Argument i as a tensor, or (`optional`) None as an empty optional.
OptTensor tensor_or_none(const char* op, PyObject* const* args, int i, bool optional) {
  PyObject* obj = args[i];
  if (optional && obj == Py_None) return c10::nullopt;
  if (!THPVariable_Check(obj)) {
    throw torch::TypeError(std::string("lora_ext._C.") + op + ": argument " + std::to_string(i) +
                           " must be a tensor" + (optional ? " or None" : "") + ", not " + Py_TYPE(obj)->tp_name);
  }
  return THPVariable_Unpack(obj);
}

at::Tensor tensor(const char* op, PyObject* const* args, int i) { return *tensor_or_none(op, args, i, false); }
OptTensor optional_tensor(const char* op, PyObject* const* args, int i) { return tensor_or_none(op, args, i, true); }

void check_count(const char* op, Py_ssize_t given, Py_ssize_t wanted) {
  if (given != wanted) {
    throw torch::TypeError(std::string("lora_ext._C.") + op + " takes " + std::to_string(wanted) +
                           " positional arguments (" + std::to_string(given) + " given)");
  }
}

// The dispatch keys of x's device backend: its kernel runs, below Autograd.
c10::DispatchKeySet backend_keys(const at::Tensor& x) {
  return c10::DispatchKeySet(x.is_cuda() ? c10::DispatchKey::CUDA : c10::DispatchKey::CPU);
}

// The arguments every op ends with: lora_a, lora_b, slot_ids, scales, ranks, plan, from `first` on.
struct AdapterArgs {
  at::Tensor lora_a, lora_b, slot_ids;
  OptTensor scales, ranks, plan;
};

AdapterArgs adapter_args(const char* op, PyObject* const* args, int first) {
  return AdapterArgs{tensor(op, args, first), tensor(op, args, first + 1), tensor(op, args, first + 2),
                     optional_tensor(op, args, first + 3), optional_tensor(op, args, first + 4),
                     optional_tensor(op, args, first + 5)};
}

// linear_lora(x, weight, bias, lora_a, lora_b, slot_ids, scales, ranks, plan) -> Tensor
PyObject* linear_lora_direct(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static const auto op = find_op<LinearLoraFn>("lora_ext::linear_lora");
  const char* name = "linear_lora";
  check_count(name, nargs, 9);
  const at::Tensor x = tensor(name, args, 0), weight = tensor(name, args, 1);
  const OptTensor bias = optional_tensor(name, args, 2);
  const AdapterArgs a = adapter_args(name, args, 3);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.redispatch(backend_keys(x), x, weight, bias, a.lora_a, a.lora_b, a.slot_ids, a.scales, a.ranks, a.plan);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// add_lora_(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan) -> None; out's version is
// bumped, as the Autograd kernel of an in-place op does.
PyObject* add_lora_direct(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static const auto op = find_op<AddLoraFn>("lora_ext::add_lora_");
  const char* name = "add_lora_";
  check_count(name, nargs, 8);
  at::Tensor out = tensor(name, args, 0);
  const at::Tensor x = tensor(name, args, 1);
  const AdapterArgs a = adapter_args(name, args, 2);
  {
    pybind11::gil_scoped_release no_gil;
    op.redispatch(backend_keys(out), out, x, a.lora_a, a.lora_b, a.slot_ids, a.scales, a.ranks, a.plan);
  }
  out.unsafeGetTensorImpl()->bump_version();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// lora_delta(x, lora_a, lora_b, slot_ids, scales, ranks, plan) -> Tensor
PyObject* lora_delta_direct(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  static const auto op = find_op<LoraDeltaFn>("lora_ext::lora_delta");
  const char* name = "lora_delta";
  check_count(name, nargs, 7);
  const at::Tensor x = tensor(name, args, 0);
  const AdapterArgs a = adapter_args(name, args, 1);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = op.redispatch(backend_keys(x), x, a.lora_a, a.lora_b, a.slot_ids, a.scales, a.ranks, a.plan);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"linear_lora", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&linear_lora_direct)), METH_FASTCALL,
     "linear_lora's device kernel, called directly (no gradient; see csrc/direct_calls.cpp)"},
    {"add_lora_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&add_lora_direct)), METH_FASTCALL,
     "add_lora_'s device kernel, called directly (no gradient; see csrc/direct_calls.cpp)"},
    {"lora_delta", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&lora_delta_direct)), METH_FASTCALL,
     "lora_delta's device kernel, called directly (no gradient; see csrc/direct_calls.cpp)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* direct_call_methods() { return kMethods; }

}  // namespace lora_ext
