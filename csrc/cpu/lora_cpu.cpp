// lora_delta and add_lora_ on CPU.
//
// Rows are grouped by slot through the plan, so each adapter's A and B are streamed once per
// block of rows that share it. A work item is (slot, block of up to kRowBlock rows); items run
// in parallel on the intra-op thread pool. Per item: convert the rows of x to float32, shrink
// u = scale * A[:rank] x (float32), then expand out += B[:, :rank] u in column blocks.
// Rows and columns beyond a slot's rank are never read.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "lora_args.h"
#include "plan.h"

namespace lora_ext {

at::Tensor build_plan_cpu(const at::Tensor& slot_ids, int64_t num_slots);

namespace {

constexpr int64_t kRowBlock = 16;
constexpr int64_t kColBlock = 256;

// A 2-D strided view of a tensor's data.
template <typename T>
struct Strided2d {
  T* data;
  int64_t row_stride;
  int64_t col_stride;
  T* at(int64_t i, int64_t j) const { return data + i * row_stride + j * col_stride; }
};

template <typename scalar_t>
void load_floats(const scalar_t* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * stride]);
  }
}

// A dot product with independent partial sums, so the compiler can keep several FMAs in flight.
inline float dot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  float partial[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) partial[j] += a[i + j] * b[i + j];
  }
  float sum = 0.f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int j = 0; j < kLanes; ++j) sum += partial[j];
  return sum;
}

struct WorkItem {
  int64_t bin;
  int64_t first;  // index into the plan's order
  int64_t count;
};

template <typename scalar_t>
struct CpuLoraKernel {
  Strided2d<const scalar_t> x;
  const scalar_t* a;  // (S, R, d_in)
  int64_t a_s0, a_s1, a_s2;
  const scalar_t* b;  // (S, d_out, R)
  int64_t b_s0, b_s1, b_s2;
  Strided2d<scalar_t> out;
  const at::Tensor* scales;
  const at::Tensor* ranks;
  const int32_t* order;
  LoraSizes sizes;
  bool accumulate;

  float scale_of(int64_t slot) const {
    return scales ? scales->data_ptr<float>()[slot * scales->stride(0)] : 1.0f;
  }
  int64_t rank_of(int64_t slot) const { return ranks ? index_at(*ranks, slot) : sizes.max_rank; }

  void zero_rows(const WorkItem& item) const {
    for (int64_t i = 0; i < item.count; ++i) {
      const int64_t row = order[item.first + i];
      for (int64_t n = 0; n < sizes.d_out; ++n) *out.at(row, n) = scalar_t(0);
    }
  }

  void run(const WorkItem& item) const {
    const int64_t slot = item.bin;
    const int64_t rank = rank_of(slot);
    if (rank == 0) {
      if (!accumulate) zero_rows(item);
      return;
    }
    const int64_t rows = item.count;
    const int64_t d_in = sizes.d_in;
    std::vector<float> xs(rows * d_in), a_row(d_in), u(rows * rank);
    for (int64_t i = 0; i < rows; ++i) {
      load_floats(x.at(order[item.first + i], 0), x.col_stride, d_in, &xs[i * d_in]);
    }
    // Shrink: u[i, r] = scale * <A[slot, r, :], x[row_i, :]>, reading each row of A once.
    const float scale = scale_of(slot);
    for (int64_t r = 0; r < rank; ++r) {
      load_floats(a + slot * a_s0 + r * a_s1, a_s2, d_in, a_row.data());
      for (int64_t i = 0; i < rows; ++i) u[i * rank + r] = scale * dot(a_row.data(), &xs[i * d_in], d_in);
    }
    expand(slot, rank, item, u);
  }

  // out[row_i, n] (+)= sum_r B[slot, n, r] u[i, r], one block of columns at a time.
  void expand(int64_t slot, int64_t rank, const WorkItem& item, const std::vector<float>& u) const {
    std::vector<float> bt(rank * kColBlock), acc(kColBlock);
    for (int64_t n0 = 0; n0 < sizes.d_out; n0 += kColBlock) {
      const int64_t cols = std::min(kColBlock, sizes.d_out - n0);
      for (int64_t r = 0; r < rank; ++r) {  // bt[r, j] = B[slot, n0 + j, r]
        load_floats(b + slot * b_s0 + n0 * b_s1 + r * b_s2, b_s1, cols, &bt[r * kColBlock]);
      }
      for (int64_t i = 0; i < item.count; ++i) {
        std::fill(acc.begin(), acc.begin() + cols, 0.f);
        for (int64_t r = 0; r < rank; ++r) {
          const float ur = u[i * rank + r];
          const float* bt_r = &bt[r * kColBlock];
          for (int64_t j = 0; j < cols; ++j) acc[j] += ur * bt_r[j];
        }
        scalar_t* dst = out.at(order[item.first + i], n0);
        for (int64_t j = 0; j < cols; ++j) {
          scalar_t* o = dst + j * out.col_stride;
          *o = accumulate ? scalar_t(static_cast<float>(*o) + acc[j]) : scalar_t(acc[j]);
        }
      }
    }
  }
};

std::vector<WorkItem> work_items(const int32_t* offsets, const PlanLayout& layout, bool accumulate) {
  std::vector<WorkItem> items;
  const int64_t last_bin = accumulate ? layout.num_slots : layout.num_slots + 1;  // +1: zero -1 rows
  for (int64_t bin = 0; bin < last_bin; ++bin) {
    for (int64_t first = offsets[bin]; first < offsets[bin + 1]; first += kRowBlock) {
      items.push_back({bin, first, std::min<int64_t>(kRowBlock, offsets[bin + 1] - first)});
    }
  }
  return items;
}

void run_lora_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                  const at::Tensor& lora_b, const at::Tensor& slot_ids,
                  const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                  const c10::optional<at::Tensor>& plan_arg, const LoraSizes& sizes,
                  bool accumulate) {
  check_slot_and_rank_values(slot_ids, ranks, sizes);
  if (sizes.rows == 0) return;
  const at::Tensor plan = plan_arg.has_value() ? *plan_arg : build_plan_cpu(slot_ids, sizes.slots);
  PlanLayout layout{sizes.rows, sizes.slots};
  const int32_t* p = plan.data_ptr<int32_t>();
  const std::vector<WorkItem> items = work_items(p + layout.offsets(), layout, accumulate);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_cpu", [&] {
    CpuLoraKernel<scalar_t> kernel{
        {x.data_ptr<scalar_t>(), x.stride(0), x.stride(1)},
        lora_a.data_ptr<scalar_t>(), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        lora_b.data_ptr<scalar_t>(), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        {out.data_ptr<scalar_t>(), out.stride(0), out.stride(1)},
        scales.has_value() ? &*scales : nullptr,
        ranks.has_value() ? &*ranks : nullptr,
        p + layout.order(), sizes, accumulate};
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        if (items[i].bin == layout.no_adapter_bin()) {
          kernel.zero_rows(items[i]);
        } else {
          kernel.run(items[i]);
        }
      }
    });
  });
}

at::Tensor lora_delta_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                          const at::Tensor& slot_ids, const c10::optional<at::Tensor>& scales,
                          const c10::optional<at::Tensor>& ranks,
                          const c10::optional<at::Tensor>& plan) {
  LoraSizes sizes = check_lora_args("lora_delta", x, lora_a, lora_b, slot_ids, scales, ranks, plan);
  at::Tensor out = at::empty({sizes.rows, sizes.d_out}, x.options());
  run_lora_cpu(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, sizes, /*accumulate=*/false);
  return out;
}

void add_lora_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& lora_a,
                  const at::Tensor& lora_b, const at::Tensor& slot_ids,
                  const c10::optional<at::Tensor>& scales, const c10::optional<at::Tensor>& ranks,
                  const c10::optional<at::Tensor>& plan) {
  LoraSizes sizes = check_lora_args("add_lora_", x, lora_a, lora_b, slot_ids, scales, ranks, plan);
  check_out(out, x, sizes);
  run_lora_cpu(out, x, lora_a, lora_b, slot_ids, scales, ranks, plan, sizes, /*accumulate=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(lora_ext, CPU, m) {
  m.impl("lora_delta", &lora_delta_cpu);
  m.impl("add_lora_", &add_lora_cpu);
}

}  // namespace lora_ext
