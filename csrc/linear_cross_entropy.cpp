// The chunk loop of the fused linear cross-entropy, shared by the CPU and the CUDA builds.
//
// Per chunk of `chunk_size` tokens (rows of hidden):
//   logits = h_chunk @ W_local^T                    one GEMM into a reused [chunk, V_local] buffer
//   row statistics (max, sum-exp, target logit)     one fused pass over the buffer
//   [tensor parallel: the caller's reducer makes the statistics global]
//   grad_logits = (softmax - onehot) * row_scale    written in place over the logits
//   grad_hidden[chunk] = grad_logits @ W_local      complete for the chunk (sums over the local vocabulary)
//   grad_weight += grad_logits^T @ h_chunk          accumulated across chunks in float32
// so the [tokens, vocab] logits never exist, and in the fused forward each logit is computed exactly once
// (6*T*d*V FLOPs for loss and both gradients). The backward-by-recomputation entry point repeats the logits
// GEMM from the saved lse (8*T*d*V in all); the Python side uses it only where the gradient cannot be formed
// in the forward (reduction="none", whose per-token weights arrive with grad_output).
#include "linear_cross_entropy.h"

#include <algorithm>
#include <optional>

namespace mtp {

// ---- device dispatch of the row kernels ---------------------------------------------------------------------

#ifdef MTP_WITH_CUDA
#define MTP_DISPATCH_DEVICE(tensor, fn, ...) \
  do {                                       \
    if ((tensor).is_cuda()) {                \
      cuda::fn(__VA_ARGS__);                 \
    } else {                                 \
      cpu::fn(__VA_ARGS__);                  \
    }                                        \
  } while (0)
#else
#define MTP_DISPATCH_DEVICE(tensor, fn, ...)                                                                 \
  do {                                                                                                       \
    TORCH_CHECK(!(tensor).is_cuda(), "megatron_mtp._C was built without CUDA (no nvcc at build time)"); \
    cpu::fn(__VA_ARGS__);                                                                                    \
  } while (0)
#endif

void row_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, at::Tensor& row_max,
               at::Tensor& row_sumexp, at::Tensor& target_logit) {
  MTP_DISPATCH_DEVICE(logits, row_stats, logits, target, vocab_start, row_max, row_sumexp, target_logit);
}

void softmax_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, const at::Tensor& lse,
                   const at::Tensor& row_scale) {
  MTP_DISPATCH_DEVICE(logits, softmax_grad_, logits, target, vocab_start, lse, row_scale);
}

void stats_and_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                     const at::Tensor& row_scale, at::Tensor& lse, at::Tensor& target_logit, bool write_grad) {
  MTP_DISPATCH_DEVICE(logits, stats_and_grad_, logits, target, vocab_start, row_scale, lse, target_logit,
                      write_grad);
}

void scale_unless_one_(at::Tensor& t, const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat && scale.device() == t.device(),
              "scale_unless_one_: scale must be a one-element float32 tensor on the tensor's device");
#ifdef MTP_WITH_CUDA
  if (t.is_cuda()) {
    cuda::scale_unless_one_(t, scale);
    return;
  }
#endif
  TORCH_CHECK(!t.is_cuda(), "megatron_mtp._C was built without CUDA (no nvcc at build time)");
  const float s = scale.item<float>();  // a CPU scalar: reading it costs no device sync
  if (s != 1.f) t.mul_(s);
}

namespace {

// out = a @ b: on the GPU through the autotuned cuBLASLt GEMM where it applies, else ATen (cuBLAS / CPU BLAS).
void gemm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
#ifdef MTP_WITH_CUDA
  if (out.is_cuda() && cuda::tuned_matmul(out, a, b)) return;
#endif
  at::mm_out(out, a, b);
}

// ---- inputs ---------------------------------------------------------------------------------------------------

struct Operands {
  at::Tensor hidden;  // [T, d] contiguous, compute dtype
  at::Tensor weight;  // [V_used, d] contiguous, compute dtype: the shard's rows below the real vocabulary size
  int64_t weight_rows;  // V_local, padding rows included (the d(weight) result has all of them)
  at::Tensor target;  // [T] int64 contiguous
  at::ScalarType out_dtype;    // dtype the gradients are returned in (the caller's)
  at::ScalarType stats_dtype;  // float32, or float64 for float64 inputs
  int64_t chunk;               // tokens per chunk, >= 1
};

Operands prepare(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                 int64_t chunk_size, int64_t vocab_limit) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "linear_cross_entropy: hidden must be [T, d] and weight [V_local, d] with the same d, got ",
              hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "linear_cross_entropy: hidden (",
              hidden.scalar_type(), ") and weight (", weight.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), "linear_cross_entropy: floating-point inputs expected");
  TORCH_CHECK(hidden.device() == weight.device() && hidden.device() == target.device(),
              "linear_cross_entropy: hidden, weight and target must be on the same device");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0) && target.scalar_type() == at::kLong,
              "linear_cross_entropy: target must be int64 [T] matching hidden's T");
  TORCH_CHECK(chunk_size >= 1, "linear_cross_entropy: chunk_size must be >= 1");
  TORCH_CHECK(vocab_limit <= weight.size(0), "linear_cross_entropy: vocab_limit exceeds the shard's rows");
  TORCH_CHECK(!hidden.is_cuda() || hidden.scalar_type() != at::kDouble,
              "linear_cross_entropy: the CUDA kernels take bf16/fp16/fp32 (float64 runs on the PyTorch path)");

  Operands ops;
  ops.out_dtype = hidden.scalar_type();
  // The CPU path computes reduced-precision inputs in float32: it is the reference-grade path for CI, and
  // CPU BLAS has no fast bf16 GEMM with float32 accumulation to imitate the GPU with.
  const bool upcast = !hidden.is_cuda() && (ops.out_dtype == at::kBFloat16 || ops.out_dtype == at::kHalf);
  const at::ScalarType compute = upcast ? at::kFloat : ops.out_dtype;
  ops.hidden = hidden.to(compute).contiguous();
  // Padding rows (global ids >= the real vocabulary) take no part: dropping them from the GEMMs is the same as
  // giving them logits of -inf, and their d(weight) rows are zero.
  ops.weight_rows = weight.size(0);
  const int64_t used = vocab_limit < 0 ? weight.size(0) : vocab_limit;
  ops.weight = weight.narrow(0, 0, used).to(compute).contiguous();
  ops.target = target.contiguous();
  ops.stats_dtype = compute == at::kDouble ? at::kDouble : at::kFloat;
  ops.chunk = std::max<int64_t>(1, std::min<int64_t>(chunk_size, hidden.size(0)));
  return ops;
}

// ---- weight-gradient accumulation ---------------------------------------------------------------------------

// dW = sum over chunks of grad_logits_c^T @ h_c, accumulated in float32.
//
// For bf16/fp16 weights on the GPU the float32 accumulator is split in two so that it costs one dW-sized
// buffer beyond the result instead of two: rows [0, V/2) accumulate in the bytes of the (bf16) result tensor
// itself, read as float32, and rows [V/2, V) in a separate float32 buffer. At the end the first half is
// narrowed to bf16 in place and the second half converted into the freed upper bytes of the result.
// Other dtypes accumulate directly in the result (float32/float64), or in bf16 when fp32 accumulation is off.
// A single chunk needs no accumulator at all (fp32_accumulation is then ignored): the one GEMM accumulates in
// float32 internally and rounds once, exactly like the float32 path followed by the cast.
class WeightGradAccumulator {
 public:
  // `weight` holds the rows that take part; the result has `total_rows` (>= those), the rest zero.
  WeightGradAccumulator(const at::Tensor& weight, int64_t total_rows, bool multi_chunk, bool fp32_accumulation)
      : vocab_(weight.size(0)), dim_(weight.size(1)), multi_chunk_(multi_chunk) {
    const auto dtype = weight.scalar_type();
#ifdef MTP_WITH_CUDA
    split_ = weight.is_cuda() && multi_chunk && fp32_accumulation && (dtype == at::kBFloat16 || dtype == at::kHalf);
#else
    (void)fp32_accumulation;
    (void)dtype;
#endif
    full_ = at::empty({total_rows, dim_}, weight.options());
    if (total_rows > vocab_) full_.narrow(0, vocab_, total_rows - vocab_).zero_();
    result_ = full_.narrow(0, 0, vocab_);  // contiguous: whole rows
    if (split_) {
      top_rows_ = vocab_ / 2;  // 4 * top_rows_ * d bytes fit in the 2 * V * d bytes of the result
      bottom_ = at::empty({vocab_ - top_rows_, dim_}, weight.options().dtype(at::kFloat));
    }
  }

  void add(const at::Tensor& grad_logits, const at::Tensor& hidden_chunk) {
#ifdef MTP_WITH_CUDA
    if (split_) {
      const float beta = started_ ? 1.f : 0.f;  // the first chunk overwrites: no zero-fill pass
      cuda::gemm_accumulate_fp32(grad_logits, 0, top_rows_, hidden_chunk, static_cast<float*>(result_.data_ptr()),
                                 beta);
      cuda::gemm_accumulate_fp32(grad_logits, top_rows_, vocab_, hidden_chunk, bottom_.data_ptr<float>(), beta);
      started_ = true;
      return;
    }
#endif
    const at::Tensor grad_logits_t = grad_logits.t();
    if (started_) {
#ifdef MTP_WITH_CUDA
      if (result_.is_cuda() && cuda::tuned_matmul_accumulate(result_, grad_logits_t, hidden_chunk)) return;
#endif
      result_.addmm_(grad_logits_t, hidden_chunk);
      return;
    }
#ifdef MTP_WITH_CUDA
    // The first chunk overwrites the result, so before that it is free scratch to tune the later chunks'
    // accumulating GEMM on (their output then holds a sum no candidate may disturb).
    if (result_.is_cuda() && multi_chunk_) cuda::tune_accumulate(result_, grad_logits_t, hidden_chunk);
#endif
    gemm_out(result_, grad_logits_t, hidden_chunk);
    started_ = true;
  }

  at::Tensor finish() {
    if (!started_) {  // no tokens at all
      result_.zero_();
      return full_;
    }
#ifdef MTP_WITH_CUDA
    if (split_) {
      const auto dtype = result_.scalar_type();
      cuda::narrow_fp32_in_place(result_.data_ptr(), top_rows_ * dim_, dtype);
      char* upper = static_cast<char*>(result_.data_ptr()) + top_rows_ * dim_ * result_.element_size();
      cuda::convert_fp32(bottom_.data_ptr<float>(), upper, (vocab_ - top_rows_) * dim_, dtype);
      bottom_ = at::Tensor();  // released to the caching allocator, stream-ordered
    }
#endif
    return full_;
  }

 private:
  int64_t vocab_, dim_;
  bool multi_chunk_;
  bool split_ = false;
  bool started_ = false;
  int64_t top_rows_ = 0;
  at::Tensor full_, result_, bottom_;
};

at::Tensor cast_back(const at::Tensor& t, at::ScalarType dtype) {
  return t.defined() && t.scalar_type() != dtype ? t.to(dtype) : t;
}

// The two gradients both chunk loops (fused forward, backward by recomputation) build from each chunk's
// grad_logits: d(hidden) rows of the chunk, and the chunk's share of d(weight). Either may be unrequested.
class ChunkGradients {
 public:
  ChunkGradients(const Operands& ops, bool need_hidden, bool need_weight, bool fp32_weight_grad)
      : out_dtype_(ops.out_dtype) {
    if (need_hidden) hidden_ = at::empty_like(ops.hidden);
    if (need_weight) {
      weight_.emplace(ops.weight, ops.weight_rows, ops.hidden.size(0) > ops.chunk, fp32_weight_grad);
    }
  }

  bool wanted() const { return hidden_.defined() || weight_.has_value(); }

  void add(const at::Tensor& grad_logits, const at::Tensor& hidden_chunk, const at::Tensor& weight, int64_t start) {
    if (hidden_.defined()) {
      at::Tensor out = hidden_.narrow(0, start, grad_logits.size(0));
      gemm_out(out, grad_logits, weight);
    }
    if (weight_) weight_->add(grad_logits, hidden_chunk);
  }

  // {d(hidden), d(weight)} in the caller's dtype; undefined tensors for what was not requested.
  std::vector<at::Tensor> finish() {
    at::Tensor dw = weight_ ? weight_->finish() : at::Tensor();
    return {cast_back(hidden_, out_dtype_), cast_back(dw, out_dtype_)};
  }

 private:
  at::ScalarType out_dtype_;
  at::Tensor hidden_;
  std::optional<WeightGradAccumulator> weight_;
};

}  // namespace

// ---- forward --------------------------------------------------------------------------------------------------

std::vector<at::Tensor> linear_cross_entropy_forward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                     const at::Tensor& target_in, const at::Tensor& row_scale_in,
                                                     int64_t vocab_start, int64_t vocab_limit, int64_t chunk_size,
                                                     bool need_grad_hidden, bool need_grad_weight,
                                                     bool fp32_weight_grad, const StatsReducer& reduce_stats) {
  const Operands ops = prepare(hidden_in, weight_in, target_in, chunk_size, vocab_limit);
  const at::Tensor& hidden = ops.hidden;
  const at::Tensor& weight = ops.weight;
  const int64_t tokens = hidden.size(0);
  const bool want_grad = need_grad_hidden || need_grad_weight;
  const bool sharded = static_cast<bool>(reduce_stats);

  const auto stats_opts = hidden.options().dtype(ops.stats_dtype);
  at::Tensor lse = at::empty({tokens}, stats_opts);
  at::Tensor target_logit = at::empty({tokens}, stats_opts);
  // (max, sum-exp) are needed as separate numbers only where they must be reduced across ranks, or where no
  // gradient pass follows (then the fused kernel's grad-writing half is skipped anyway).
  at::Tensor row_max, row_sum;
  if (sharded || !want_grad) {
    row_max = at::empty({tokens}, stats_opts);
    row_sum = at::empty({tokens}, stats_opts);
  }
  at::Tensor row_scale;
  if (want_grad) {
    TORCH_CHECK(row_scale_in.defined() && row_scale_in.numel() == tokens,
                "linear_cross_entropy: row_scale must hold one weight per token when a gradient is requested");
    row_scale = row_scale_in.to(hidden.device(), ops.stats_dtype).contiguous();
  }

  ChunkGradients grads(ops, need_grad_hidden, need_grad_weight, fp32_weight_grad);

  at::Tensor logits_buffer = at::empty({ops.chunk, weight.size(0)}, hidden.options());
  const at::Tensor weight_t = weight.t();

  for (int64_t start = 0; start < tokens; start += ops.chunk) {
    const int64_t rows = std::min(ops.chunk, tokens - start);
    at::Tensor logits = logits_buffer.narrow(0, 0, rows);
    const at::Tensor h = hidden.narrow(0, start, rows);
    const at::Tensor t = ops.target.narrow(0, start, rows);
    gemm_out(logits, h, weight_t);

    at::Tensor lse_c = lse.narrow(0, start, rows);
    at::Tensor tl_c = target_logit.narrow(0, start, rows);
    if (!want_grad) {
      at::Tensor max_c = row_max.narrow(0, start, rows), sum_c = row_sum.narrow(0, start, rows);
      row_stats(logits, t, vocab_start, max_c, sum_c, tl_c);
      continue;  // reduced once for all rows after the loop
    }
    const at::Tensor scale_c = row_scale.narrow(0, start, rows);
    if (!sharded) {
      stats_and_grad_(logits, t, vocab_start, scale_c, lse_c, tl_c, /*write_grad=*/true);
    } else {
      // The gradient needs the global softmax, so the statistics are reduced before this chunk's gradient is
      // formed: a collective of 3 * rows numbers per chunk, against the chunk's GEMMs.
      at::Tensor max_c = row_max.narrow(0, start, rows), sum_c = row_sum.narrow(0, start, rows);
      row_stats(logits, t, vocab_start, max_c, sum_c, tl_c);
      reduce_stats(max_c, sum_c, tl_c);
      at::add_out(lse_c, max_c, at::log(sum_c));
      softmax_grad_(logits, t, vocab_start, lse_c, scale_c);
    }
    grads.add(logits, h, weight, start);
  }

  if (!want_grad && tokens > 0) {
    if (sharded) reduce_stats(row_max, row_sum, target_logit);
    at::add_out(lse, row_max, at::log(row_sum));
  }
  logits_buffer = at::Tensor();  // free the chunk before the accumulator's final conversion

  const std::vector<at::Tensor> dh_dw = grads.finish();
  return {lse, target_logit, dh_dw[0], dh_dw[1]};
}

// ---- backward by recomputation ---------------------------------------------------------------------------------

std::vector<at::Tensor> linear_cross_entropy_backward(const at::Tensor& hidden_in, const at::Tensor& weight_in,
                                                      const at::Tensor& target_in, const at::Tensor& lse_in,
                                                      const at::Tensor& row_scale_in, int64_t vocab_start,
                                                      int64_t vocab_limit, int64_t chunk_size,
                                                      bool need_grad_hidden, bool need_grad_weight,
                                                      bool fp32_weight_grad) {
  const Operands ops = prepare(hidden_in, weight_in, target_in, chunk_size, vocab_limit);
  const at::Tensor& hidden = ops.hidden;
  const at::Tensor& weight = ops.weight;
  const int64_t tokens = hidden.size(0);
  TORCH_CHECK(lse_in.numel() == tokens && row_scale_in.numel() == tokens,
              "linear_cross_entropy backward: lse and row_scale must hold one value per token");
  const at::Tensor lse = lse_in.to(hidden.device(), ops.stats_dtype).contiguous();
  const at::Tensor row_scale = row_scale_in.to(hidden.device(), ops.stats_dtype).contiguous();

  ChunkGradients grads(ops, need_grad_hidden, need_grad_weight, fp32_weight_grad);
  if (grads.wanted()) {
    at::Tensor logits_buffer = at::empty({ops.chunk, weight.size(0)}, hidden.options());
    const at::Tensor weight_t = weight.t();
    for (int64_t start = 0; start < tokens; start += ops.chunk) {
      const int64_t rows = std::min(ops.chunk, tokens - start);
      at::Tensor logits = logits_buffer.narrow(0, 0, rows);
      const at::Tensor h = hidden.narrow(0, start, rows);
      gemm_out(logits, h, weight_t);
      softmax_grad_(logits, ops.target.narrow(0, start, rows), vocab_start, lse.narrow(0, start, rows),
                    row_scale.narrow(0, start, rows));
      grads.add(logits, h, weight, start);
    }
  }
  return grads.finish();
}

}  // namespace mtp
