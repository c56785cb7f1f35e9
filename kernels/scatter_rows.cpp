// attnprof's CPU scatter of gene sums (see scatter_rows_add in attnprof/kernels/fused_rows.py).
//
// t[rows[p], m, slots[j]] += value[p, m, j] for float64 t [R, M, V] and value [P, M, J], any strides.
// Each (p, m) is one task's: its J entries are added one by one in the order of j, so the sums are those
// of one addition per entry (as index_put_ with accumulate makes them, bit for bit) whatever the thread
// count. index_put_ with accumulate runs on one thread on the CPU, and so do the page faults of a fresh
// store's first touch, most of its time; here both spread over at::parallel_for's threads.
// rows must be distinct (two tasks would otherwise write one row); slots may repeat (one task adds them).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>

void scatter_rows_add(at::Tensor t, const at::Tensor& rows, const at::Tensor& slots, const at::Tensor& value) {
  TORCH_CHECK(t.dim() == 3 && value.dim() == 3 && t.scalar_type() == at::kDouble &&
              value.scalar_type() == at::kDouble && t.device().is_cpu() && value.device().is_cpu(),
              "scatter_rows_add: float64 CPU t [R, M, V] and value [P, M, J]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && rows.dim() == 1 &&
              slots.dim() == 1 && rows.is_contiguous() && slots.is_contiguous(),
              "scatter_rows_add: contiguous int64 rows [P] and slots [J]");
  const int64_t P = value.size(0), M = value.size(1), J = value.size(2);
  TORCH_CHECK(rows.numel() == P && slots.numel() == J && t.size(1) == M,
              "scatter_rows_add: value [P, M, J] must match rows [P], t's M and slots [J]");
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) TORCH_CHECK(r[p] >= 0 && r[p] < t.size(0), "scatter_rows_add: row out of range");
  for (int64_t j = 0; j < J; ++j) TORCH_CHECK(s[j] >= 0 && s[j] < t.size(2), "scatter_rows_add: slot out of range");
  double* T = t.data_ptr<double>();
  const double* X = value.data_ptr<double>();
  const int64_t t0 = t.stride(0), t1 = t.stride(1), t2 = t.stride(2);
  const int64_t x0 = value.stride(0), x1 = value.stride(1), x2 = value.stride(2);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(J, 1));  // tasks of >= 32k entries
  at::parallel_for(0, P * M, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t p = i / M, m = i % M;
      double* dst = T + r[p] * t0 + m * t1;
      const double* src = X + p * x0 + m * x1;
      for (int64_t j = 0; j < J; ++j) dst[s[j] * t2] += src[j * x2];
    }
  });
}
