#include "kernel_config.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <sstream>

#include "checks.h"

namespace lora_ext {
namespace {

// One row per Setting, in its order. choices: the words an enumerated setting takes (its value is
// the word's index); empty for an integer setting, which must be at least `min_value`.
struct SettingSpec {
  const char* name;
  std::vector<std::string> choices;
  int64_t default_value;
  int64_t min_value;
};

const std::vector<SettingSpec>& specs() {
  static const std::vector<SettingSpec> table{
      {"cpu_isa", {"auto", "portable"}, kCpuIsaAuto, 0},
      {"cpu_gemm_min_rows", {}, 64, 1},
      {"cpu_backward_gemm_min_rows", {}, 256, 1},
      {"cpu_fused_linear", {"off", "on"}, 1, 0},
      {"cpu_avx512_bf16", {"off", "on"}, 1, 0},
      {"cpu_fused_linear_16bit", {"auto", "on", "off"}, kFused16BitAuto, 0},
      {"cpu_fused_linear_max_rows", {}, 0, 0},
      {"cpu_amx", {"off", "on"}, 1, 0},
      {"cpu_packed_gemm_min_rows", {}, 48, 1},
      {"cuda_kernel", {"auto", "simt", "mma"}, kCudaAuto, 0},
  };
  return table;
}

constexpr const char* kPathNames[] = {
    "cpu_items_avx512", "cpu_items_avx512_bf16", "cpu_items_portable", "cpu_items_quad",
    "cpu_items_split",  "cpu_gemm_segments",     "cpu_gemm_batched",   "cpu_gemm_amx",
    "cpu_linear_fused",
    "cpu_linear_unfused", "cpu_linear_amx",  "cpu_linear_packed",
    "cuda_simt",        "cuda_mma",
};
static_assert(sizeof(kPathNames) / sizeof(kPathNames[0]) == static_cast<size_t>(KernelPath::kCount),
              "one name per kernel path");

std::string env_name(const SettingSpec& spec) {
  std::string name = "LORA_EXT_";
  for (const char* c = spec.name; *c; ++c) name += static_cast<char>(std::toupper(*c));
  return name;
}

std::string describe_choices(const SettingSpec& spec) {
  if (spec.choices.empty()) return "an integer >= " + std::to_string(spec.min_value);
  std::string words;
  for (const std::string& c : spec.choices) words += (words.empty() ? "'" : ", '") + c + "'";
  return "one of " + words;
}

// The value `text` stands for, or throws ValueError naming `source`.
int64_t parse_value(const SettingSpec& spec, const std::string& text, const std::string& source) {
  if (!spec.choices.empty()) {
    for (size_t i = 0; i < spec.choices.size(); ++i) {
      if (spec.choices[i] == text) return static_cast<int64_t>(i);
    }
  } else {
    std::istringstream in(text);
    int64_t value = 0;
    if (in >> value && in.eof() && value >= spec.min_value) return value;
  }
  LORA_CHECK(false, source, " is '", text, "' but must be ", describe_choices(spec));
  return 0;
}

std::string format_value(const SettingSpec& spec, int64_t value) {
  return spec.choices.empty() ? std::to_string(value) : spec.choices[static_cast<size_t>(value)];
}

struct State {
  std::atomic<int64_t> values[static_cast<int>(Setting::kCount)];
  std::atomic<int64_t> path_counts[static_cast<int>(KernelPath::kCount)];

  // The defaults, overridden by LORA_EXT_<NAME> environment variables (read here, once).
  State() {
    for (int i = 0; i < static_cast<int>(Setting::kCount); ++i) {
      const SettingSpec& spec = specs()[i];
      const std::string var = env_name(spec);
      const char* text = std::getenv(var.c_str());
      values[i] = text != nullptr ? parse_value(spec, text, "environment variable " + var) : spec.default_value;
    }
    for (auto& count : path_counts) count = 0;
  }
};

State& state() {
  static State instance;  // a bad environment value throws here, on first use, and again next time
  return instance;
}

int index_of(const std::string& name) {
  for (size_t i = 0; i < specs().size(); ++i) {
    if (name == specs()[i].name) return static_cast<int>(i);
  }
  std::string names;
  for (const SettingSpec& spec : specs()) names += (names.empty() ? "" : ", ") + std::string(spec.name);
  LORA_CHECK(false, "unknown kernel setting '", name, "'; the settings are ", names);
  return -1;
}

}  // namespace

int64_t setting(Setting s) { return state().values[static_cast<int>(s)].load(std::memory_order_relaxed); }

void count_path(KernelPath p) {
  state().path_counts[static_cast<int>(p)].fetch_add(1, std::memory_order_relaxed);
}

std::tuple<std::vector<std::string>, std::vector<std::string>> get_kernel_config() {
  std::vector<std::string> names, values;
  for (size_t i = 0; i < specs().size(); ++i) {
    names.push_back(specs()[i].name);
    values.push_back(format_value(specs()[i], state().values[i].load()));
  }
  return {names, values};
}

void set_kernel_config(const std::string& name, const std::string& value) {
  const int i = index_of(name);
  state().values[i] = parse_value(specs()[i], value, "kernel setting '" + name + "'");
}

std::tuple<std::vector<std::string>, std::vector<int64_t>> kernel_path_counts() {
  std::vector<std::string> names;
  std::vector<int64_t> counts;
  for (int i = 0; i < static_cast<int>(KernelPath::kCount); ++i) {
    names.push_back(kPathNames[i]);
    counts.push_back(state().path_counts[i].load());
  }
  return {names, counts};
}

void reset_kernel_path_counts() {
  for (auto& count : state().path_counts) count = 0;
}

}  // namespace lora_ext
