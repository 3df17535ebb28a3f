// CPU (OpenMP) row kernels of the linear cross-entropy: one pass of online max / sum-exp per row, and the
// in-place softmax gradient. The chunk loop upcasts reduced-precision inputs before it gets here, so these
// kernels see float or double logits only; statistics accumulate and are stored in the logits' own type
// (float for float, double for double), which keeps the float path within 1e-5 of a float64 reference.
#include <cmath>
#include <limits>

#include <ATen/Parallel.h>

#include "linear_cross_entropy.h"

namespace mtp {
namespace cpu {
namespace {

void check_row_args(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits chunk must be a contiguous 2-D tensor");
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "CPU row kernels take float32/float64 logits (the chunk loop upcasts bf16/fp16)");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == logits.size(0),
              "target must be a contiguous int64 tensor with one id per logits row");
}

// Online max / sum-exp over one row: when a new maximum arrives, the running sum is rescaled once.
template <typename acc_t>
inline void online_row_stats(const acc_t* row, int64_t vocab, acc_t& row_max, acc_t& row_sum) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t s = 0;
  for (int64_t v = 0; v < vocab; ++v) {
    const acc_t x = row[v];
    if (x > m) {
      s = s * std::exp(m - x) + acc_t(1);  // exp(-inf) = 0 on the first element
      m = x;
    } else {
      s += std::exp(x - m);
    }
  }
  row_max = m;
  row_sum = s;
}

template <typename acc_t>
inline void write_row_grad(acc_t* row, int64_t vocab, acc_t lse, acc_t scale, int64_t target_col) {
  if (scale == acc_t(0)) {  // ignored row: an exact zero, whatever the logits hold
    for (int64_t v = 0; v < vocab; ++v) row[v] = 0;
    return;
  }
  for (int64_t v = 0; v < vocab; ++v) row[v] = std::exp(row[v] - lse) * scale;
  if (target_col >= 0 && target_col < vocab) row[target_col] -= scale;
}

// Rows are independent: a static OpenMP split over rows, sized by ATen's thread count so that
// torch.set_num_threads (1 per rank in the gloo tests) is respected.
#define MTP_OMP_ROWS _Pragma("omp parallel for schedule(static) num_threads(at::get_num_threads())")

}  // namespace

void row_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, at::Tensor& row_max,
               at::Tensor& row_sumexp, at::Tensor& target_logit) {
  check_row_args(logits, target);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mtp_row_stats_cpu", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    scalar_t* out_max = row_max.data_ptr<scalar_t>();
    scalar_t* out_sum = row_sumexp.data_ptr<scalar_t>();
    scalar_t* out_t = target_logit.data_ptr<scalar_t>();
    MTP_OMP_ROWS
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* row = x + r * vocab;
      scalar_t m, s;
      online_row_stats<scalar_t>(row, vocab, m, s);
      const int64_t col = t[r] - vocab_start;
      out_max[r] = m;
      out_sum[r] = s;
      out_t[r] = (col >= 0 && col < vocab) ? row[col] : scalar_t(0);
    }
  });
}

void softmax_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, const at::Tensor& lse,
                   const at::Tensor& row_scale) {
  check_row_args(logits, target);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mtp_softmax_grad_cpu", [&] {
    scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    const scalar_t* l = lse.data_ptr<scalar_t>();
    const scalar_t* sc = row_scale.data_ptr<scalar_t>();
    MTP_OMP_ROWS
    for (int64_t r = 0; r < rows; ++r) {
      write_row_grad<scalar_t>(x + r * vocab, vocab, l[r], sc[r], t[r] - vocab_start);
    }
  });
}

void stats_and_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                     const at::Tensor& row_scale, at::Tensor& lse, at::Tensor& target_logit, bool write_grad) {
  check_row_args(logits, target);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "mtp_stats_and_grad_cpu", [&] {
    scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    const scalar_t* sc = write_grad ? row_scale.data_ptr<scalar_t>() : nullptr;
    scalar_t* out_lse = lse.data_ptr<scalar_t>();
    scalar_t* out_t = target_logit.data_ptr<scalar_t>();
    MTP_OMP_ROWS
    for (int64_t r = 0; r < rows; ++r) {
      scalar_t* row = x + r * vocab;
      scalar_t m, s;
      online_row_stats<scalar_t>(row, vocab, m, s);
      const scalar_t row_lse = m + std::log(s);
      const int64_t col = t[r] - vocab_start;
      out_lse[r] = row_lse;
      out_t[r] = (col >= 0 && col < vocab) ? row[col] : scalar_t(0);  // read before the row is overwritten
      if (write_grad) write_row_grad<scalar_t>(row, vocab, row_lse, sc[r], col);
    }
  });
}

}  // namespace cpu
}  // namespace mtp
