// The op schemas (one per op) and the module entry point. Backends register their kernels in
// csrc/cpu/ and csrc/cuda/ with TORCH_LIBRARY_IMPL; Python adds fake kernels in lora_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/linear_lora_cpu.h"
#include "direct_calls.h"
#include "generated_build_info.h"
#include "kernel_config.h"
#include "plan.h"

// Importing lora_ext._C runs the static registrations below; the module's own functions are the
// direct serving entry points (direct_calls.cpp).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                          lora_ext::direct_call_methods()};
  return PyModule_Create(&module_def);
}

namespace lora_ext {
namespace {
std::string build_info() { return LORA_EXT_BUILD_DESC; }

// Where each part of the plan starts for `num_slots` slots, and the tile sizes (see plan.h).
std::vector<int64_t> plan_layout(int64_t num_slots) {
  const PlanLayout layout{0, num_slots};
  return {layout.offsets(), layout.decode_tiles(), layout.prefill_tiles(), layout.order(),
          kDecodeTileRows, kPrefillTileRows};
}
}  // namespace

TORCH_LIBRARY(lora_ext, m) {
  m.def("build_plan(Tensor slot_ids, int num_slots) -> Tensor");
  m.def(
      "lora_delta(Tensor x, Tensor lora_a, Tensor lora_b, Tensor slot_ids, Tensor? scales=None, "
      "Tensor? ranks=None, Tensor? plan=None) -> Tensor");
  m.def(
      "add_lora_(Tensor(a!) out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor slot_ids, "
      "Tensor? scales=None, Tensor? ranks=None, Tensor? plan=None) -> ()");
  m.def(
      "linear_lora(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor slot_ids, "
      "Tensor? scales=None, Tensor? ranks=None, Tensor? plan=None) -> Tensor");
  // The gradients of lora_delta's output grad_out with respect to x, lora_a and lora_b (each only
  // where output_mask says; None otherwise).
  m.def(
      "lora_backward(Tensor grad_out, Tensor x, Tensor lora_a, Tensor lora_b, Tensor slot_ids, "
      "Tensor? scales, Tensor? ranks, Tensor? plan, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
  m.def("plan_layout(int num_slots) -> int[]", &plan_layout);
  m.def("linear_lora_fuses(int rows, int d_in, ScalarType dtype) -> bool", &cpu::linear_lora_fuses);
  m.def("get_kernel_config() -> (str[], str[])", &get_kernel_config);
  m.def("set_kernel_config(str name, str value) -> ()", &set_kernel_config);
  m.def("kernel_path_counts() -> (str[], int[])", &kernel_path_counts);
  m.def("reset_kernel_path_counts() -> ()", &reset_kernel_path_counts);
}

}  // namespace lora_ext
