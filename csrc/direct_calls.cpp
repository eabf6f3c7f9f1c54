// Direct entry points for the serving calls: lora_ext._C.linear_lora / add_lora_ / lora_delta.
//
// A call from Python that wants no gradient still pays for the way into the op: torch.ops parses
// the arguments against the schema and boxes them (or, through OpOverload.redispatch, runs a
// Python function and then boxes them). These functions take the same positional arguments,
// unpack the tensors directly and call the op's device kernel through the dispatcher, unboxed,
// with the backend key of x's device: the same kernel and the same checks as torch.ops, with
// none of the boxing. lora_ext/ops.py takes them only where no gradient is wanted, for plain
// tensors, outside dispatch modes and torch.compile (ops._below_autograd).
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

#include "direct_calls.h"

namespace lora_ext {
namespace {

using OptTensor = c10::optional<at::Tensor>;

// Argument i as a tensor; None (allowed only where `optional`) gives an empty optional.
OptTensor tensor_arg(const char* op, PyObject* const* args, int i, bool optional) {
  PyObject* obj = args[i];
  if (optional && obj == Py_None) return c10::nullopt;
  if (!THPVariable_Check(obj)) {
    throw torch::TypeError(std::string("lora_ext._C.") + op + ": argument " + std::to_string(i) +
                           " must be a tensor" + (optional ? " or None" : "") + ", not " + Py_TYPE(obj)->tp_name);
  }
  return THPVariable_Unpack(obj);
}

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

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                          const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const OptTensor&, const OptTensor&, const OptTensor&)>&
linear_lora_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::linear_lora", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const OptTensor&, const OptTensor&, const OptTensor&)>();
  return op;
}

const c10::TypedOperatorHandle<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&)>&
add_lora_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::add_lora_", "")
                             .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&, const OptTensor&)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const at::Tensor&, const OptTensor&, const OptTensor&,
                                          const OptTensor&)>&
lora_delta_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lora_ext::lora_delta", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const OptTensor&, const OptTensor&,
                                               const OptTensor&)>();
  return op;
}

// linear_lora(x, weight, bias, lora_a, lora_b, slot_ids, scales, ranks, plan) -> Tensor
PyObject* linear_lora_direct(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* name = "linear_lora";
  check_count(name, nargs, 9);
  const at::Tensor x = *tensor_arg(name, args, 0, false);
  const at::Tensor weight = *tensor_arg(name, args, 1, false);
  const OptTensor bias = tensor_arg(name, args, 2, true);
  const at::Tensor lora_a = *tensor_arg(name, args, 3, false), lora_b = *tensor_arg(name, args, 4, false);
  const at::Tensor slot_ids = *tensor_arg(name, args, 5, false);
  const OptTensor scales = tensor_arg(name, args, 6, true), ranks = tensor_arg(name, args, 7, true);
  const OptTensor plan = tensor_arg(name, args, 8, true);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = linear_lora_op().redispatch(backend_keys(x), x, weight, bias, lora_a, lora_b, slot_ids, scales, ranks,
                                      plan);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// add_lora_(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan) -> None; out's version is
// bumped, as the Autograd kernel of an in-place op does.
PyObject* add_lora_direct(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* name = "add_lora_";
  check_count(name, nargs, 8);
  at::Tensor out = *tensor_arg(name, args, 0, false);
  const at::Tensor x = *tensor_arg(name, args, 1, false);
  const at::Tensor lora_a = *tensor_arg(name, args, 2, false), lora_b = *tensor_arg(name, args, 3, false);
  const at::Tensor slot_ids = *tensor_arg(name, args, 4, false);
  const OptTensor scales = tensor_arg(name, args, 5, true), ranks = tensor_arg(name, args, 6, true);
  const OptTensor plan = tensor_arg(name, args, 7, true);
  {
    pybind11::gil_scoped_release no_gil;
    add_lora_op().redispatch(backend_keys(out), out, x, lora_a, lora_b, slot_ids, scales, ranks, plan);
  }
  out.unsafeGetTensorImpl()->bump_version();
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

// lora_delta(x, lora_a, lora_b, slot_ids, scales, ranks, plan) -> Tensor
PyObject* lora_delta_direct(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const char* name = "lora_delta";
  check_count(name, nargs, 7);
  const at::Tensor x = *tensor_arg(name, args, 0, false);
  const at::Tensor lora_a = *tensor_arg(name, args, 1, false), lora_b = *tensor_arg(name, args, 2, false);
  const at::Tensor slot_ids = *tensor_arg(name, args, 3, false);
  const OptTensor scales = tensor_arg(name, args, 4, true), ranks = tensor_arg(name, args, 5, true);
  const OptTensor plan = tensor_arg(name, args, 6, true);
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = lora_delta_op().redispatch(backend_keys(x), x, lora_a, lora_b, slot_ids, scales, ranks, plan);
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
