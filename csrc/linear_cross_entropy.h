// Fused, chunked, vocab-parallel linear cross-entropy: shared declarations.
//
// The chunk loop (linear_cross_entropy.cpp) is device-agnostic: the GEMMs go through ATen (cuBLAS on the GPU,
// the CPU BLAS otherwise) and the row kernels below dispatch to an OpenMP implementation
// (row_kernels_cpu.cpp) or a CUDA one (row_kernels_cuda.cu, only when built with MTP_WITH_CUDA).
//
// Notation: a logits chunk is [rows, V] where V is the LOCAL vocabulary shard; `target` holds GLOBAL ids and
// `vocab_start` is the first global id of this shard, so the local target column is target - vocab_start
// (outside [0, V) means another rank owns it, or the row is ignored).
#pragma once

#include <functional>
#include <vector>

#include <ATen/ATen.h>

namespace mtp {

// Tensor parallelism hook: called once per chunk (or once per call for a statistics-only pass) with the LOCAL
// row_max, row_sumexp and target_logit of that chunk's rows; must overwrite them in place with the values of
// the whole vocabulary (global max, sum-exp relative to it, and the target logit that only its owner had).
// Empty when the vocabulary is not sharded.
using StatsReducer = std::function<void(at::Tensor& row_max, at::Tensor& row_sumexp, at::Tensor& target_logit)>;

// Forward over token chunks. row_scale[t] is the gradient weight of row t (0 for ignored rows), used only when
// a gradient is requested; then the gradients are formed in this same pass (logits are computed once).
// vocab_limit: how many leading rows of `weight` are real vocabulary (the rest is padding, excluded from the
// softmax, zero d(weight)); -1 for all.
// Returns {lse, target_logit, grad_hidden, grad_weight}; the gradients are undefined tensors unless requested.
// Statistics are float32 (float64 for float64 inputs); gradients have the input dtype.
std::vector<at::Tensor> linear_cross_entropy_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                                     const at::Tensor& target, const at::Tensor& row_scale,
                                                     int64_t vocab_start, int64_t vocab_limit, int64_t chunk_size,
                                                     bool need_grad_hidden, bool need_grad_weight,
                                                     bool fp32_weight_grad, const StatsReducer& reduce_stats);

// Backward by recomputation: logits are recomputed per chunk from the saved (global) lse.
// Returns {grad_hidden, grad_weight} (undefined unless requested).
std::vector<at::Tensor> linear_cross_entropy_backward(const at::Tensor& hidden, const at::Tensor& weight,
                                                      const at::Tensor& target, const at::Tensor& lse,
                                                      const at::Tensor& row_scale, int64_t vocab_start,
                                                      int64_t vocab_limit, int64_t chunk_size,
                                                      bool need_grad_hidden, bool need_grad_weight,
                                                      bool fp32_weight_grad);

// Per row of `logits`: row_max = max_v x, row_sumexp = sum_v exp(x - row_max), target_logit = x[target] if the
// target column is local, else 0. One pass over the row (online max / sum-exp). Outputs are [rows]
// in the statistics dtype (float32; float64 for float64 logits on the CPU).
void row_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, at::Tensor& row_max,
               at::Tensor& row_sumexp, at::Tensor& target_logit);

// In place: logits <- (exp(logits - lse) - onehot(target)) * row_scale. Rows whose scale is 0 become 0.
void softmax_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, const at::Tensor& lse,
                   const at::Tensor& row_scale);

// Single-shard (no tensor parallelism) fusion of the two above: computes lse and target_logit per row and,
// if write_grad, overwrites the row with its scaled softmax gradient in the same kernel.
void stats_and_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                     const at::Tensor& row_scale, at::Tensor& lse, at::Tensor& target_logit, bool write_grad);

// In place, t *= scale, where `scale` is a one-element float32 tensor on t's device -- unless it holds exactly 1,
// in which case t is not touched. On the GPU the test happens inside the kernel (no host sync): every thread
// reads the scalar first and returns at once if it is 1, so the common "loss.backward()" costs one empty launch
// instead of a read and a write of d(weight). The fused linear cross-entropy's backward scales its precomputed
// gradients with it.
void scale_unless_one_(at::Tensor& t, const at::Tensor& scale);

namespace cpu {
void row_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, at::Tensor& row_max,
               at::Tensor& row_sumexp, at::Tensor& target_logit);
void softmax_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, const at::Tensor& lse,
                   const at::Tensor& row_scale);
void stats_and_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                     const at::Tensor& row_scale, at::Tensor& lse, at::Tensor& target_logit, bool write_grad);
}  // namespace cpu

#ifdef MTP_WITH_CUDA
namespace cuda {
void row_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, at::Tensor& row_max,
               at::Tensor& row_sumexp, at::Tensor& target_logit);
void softmax_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, const at::Tensor& lse,
                   const at::Tensor& row_scale);
void stats_and_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                     const at::Tensor& row_scale, at::Tensor& lse, at::Tensor& target_logit, bool write_grad);

// C[rows_of_dW in [col_begin, col_end), d] (float32, row-major, leading dimension d) =
//     beta * C + grad_logits[:, col_begin:col_end]^T @ hidden_chunk
// with bf16/fp16 operands and fp32 accumulation and output (cublasGemmEx, CUBLAS_COMPUTE_32F).
void gemm_accumulate_fp32(const at::Tensor& grad_logits, int64_t col_begin, int64_t col_end,
                          const at::Tensor& hidden_chunk, float* c, float beta);

// Converts n float32 values to `out_dtype` (bf16/fp16) where the output ALIASES the start of the input
// buffer (same bytes, half the width). Ordered so that no value is overwritten before it is read.
void narrow_fp32_in_place(void* buffer, int64_t n, at::ScalarType out_dtype);

void scale_unless_one_(at::Tensor& t, const at::Tensor& scale);

// out = a @ b for 2-D bf16/fp16 operands (either may be a transposed view) into a row-major `out` of the operand
// dtype or float32, through cuBLASLt with float32 accumulation and the fastest of its candidate kernels, timed on
// the first call of each problem (gemm_cuda.cu). Returns false, having done nothing, where it cannot serve the
// arguments; the caller then falls back to ATen.
bool tuned_matmul(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// out += a @ b through the cuBLASLt kernel tune_accumulate chose for this problem; false, having done nothing,
// where none was chosen (never tuned, or ATen's addmm was the fastest): the caller then uses ATen.
bool tuned_matmul_accumulate(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

// Chooses the kernel for out += a @ b, timing the candidates accumulating into `scratch_out` -- an output whose
// contents do not matter yet (the caller overwrites it next) -- once per problem; a no-op where already chosen.
void tune_accumulate(at::Tensor& scratch_out, const at::Tensor& a, const at::Tensor& b);

// Diagnostics (tools/probe_gemm_tuning.py): ms per call of every cuBLASLt candidate for out = a @ b, then ATen's
// GEMM last, each timed over `calls` back-to-back calls, median of `rounds` interleaved rounds. Caches nothing.
std::vector<double> time_gemm_candidates(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t calls,
                                         int64_t rounds);

// Converts n float32 values at `src` to `out_dtype` at `dst` (non-overlapping).
void convert_fp32(const float* src, void* dst, int64_t n, at::ScalarType out_dtype);
}  // namespace cuda
#endif

}  // namespace mtp
