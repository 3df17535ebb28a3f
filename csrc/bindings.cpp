// Python bindings of megatron_mtp._C. The chunk loop runs without the GIL (CPU GEMMs can take seconds and
// other Python threads, e.g. data loaders, should keep running); the tensor-parallel statistics reducer is a
// Python callable (torch.distributed lives in Python) and re-takes the GIL for each call.
#include <torch/extension.h>

#include "linear_cross_entropy.h"

namespace {

mtp::StatsReducer wrap_reducer(const py::object& reducer) {
  if (reducer.is_none()) return {};
  return [reducer](at::Tensor& row_max, at::Tensor& row_sumexp, at::Tensor& target_logit) {
    py::gil_scoped_acquire gil;
    reducer(row_max, row_sumexp, target_logit);
  };
}

std::vector<at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                                const c10::optional<at::Tensor>& row_scale, int64_t vocab_start, int64_t vocab_limit,
                                int64_t chunk_size,
                                bool need_grad_hidden, bool need_grad_weight, bool fp32_weight_grad,
                                const py::object& reduce_stats) {
  // Built before the GIL is released and destroyed after it is re-taken (reverse declaration order), since
  // copying or dropping the captured Python object needs the GIL.
  const mtp::StatsReducer reducer = wrap_reducer(reduce_stats);
  py::gil_scoped_release no_gil;
  return mtp::linear_cross_entropy_forward(hidden, weight, target, row_scale.value_or(at::Tensor()), vocab_start,
                                           vocab_limit, chunk_size, need_grad_hidden, need_grad_weight,
                                           fp32_weight_grad, reducer);
}

std::vector<at::Tensor> backward(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                                 const at::Tensor& lse, const at::Tensor& row_scale, int64_t vocab_start,
                                 int64_t vocab_limit, int64_t chunk_size, bool need_grad_hidden, bool need_grad_weight,
                                 bool fp32_weight_grad) {
  py::gil_scoped_release no_gil;
  return mtp::linear_cross_entropy_backward(hidden, weight, target, lse, row_scale, vocab_start, vocab_limit,
                                            chunk_size,
                                            need_grad_hidden, need_grad_weight, fp32_weight_grad);
}

std::vector<at::Tensor> row_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start) {
  const auto opts = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor row_max = at::empty({logits.size(0)}, opts);
  at::Tensor row_sum = at::empty({logits.size(0)}, opts);
  at::Tensor target_logit = at::empty({logits.size(0)}, opts);
  mtp::row_stats(logits, target, vocab_start, row_max, row_sum, target_logit);
  return {row_max, row_sum, target_logit};
}

void scale_unless_one(at::Tensor t, const at::Tensor& scale) { mtp::scale_unless_one_(t, scale); }

bool built_with_cuda() {
#ifdef MTP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::vector<double> time_gemm_candidates(at::Tensor out, const at::Tensor& a, const at::Tensor& b, int64_t calls,
                                         int64_t rounds) {
#ifdef MTP_WITH_CUDA
  return mtp::cuda::time_gemm_candidates(out, a, b, calls, rounds);
#else
  TORCH_CHECK(false, "megatron_mtp._C was built without CUDA (no nvcc at build time)");
  return {};
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_mtp native ops: fused, chunked, vocab-parallel linear cross-entropy";
  m.def("linear_ce_forward", &forward, py::arg("hidden"), py::arg("weight"), py::arg("target"),
        py::arg("row_scale"), py::arg("vocab_start"), py::arg("vocab_limit"), py::arg("chunk_size"),
        py::arg("need_grad_hidden"), py::arg("need_grad_weight"), py::arg("fp32_weight_grad"),
        py::arg("reduce_stats"),
        "Chunked forward; forms the gradients in the same pass when asked. -> [lse, target_logit, dh, dW]");
  m.def("linear_ce_backward", &backward, py::arg("hidden"), py::arg("weight"), py::arg("target"), py::arg("lse"),
        py::arg("row_scale"), py::arg("vocab_start"), py::arg("vocab_limit"), py::arg("chunk_size"),
        py::arg("need_grad_hidden"), py::arg("need_grad_weight"), py::arg("fp32_weight_grad"),
        "Chunked backward by recomputing the logits from the saved lse. -> [dh, dW]");
  m.def("row_stats", &row_stats, py::arg("logits"), py::arg("target"), py::arg("vocab_start"),
        "Per-row (max, sum-exp, target logit) of a [rows, V_local] logits tensor (for tests).");
  m.def("scale_unless_one_", &scale_unless_one, py::arg("tensor"), py::arg("scale"),
        "In place tensor *= scale (one-element float32 tensor on its device), skipped on the device if it is 1.");
  m.def("time_gemm_candidates", &time_gemm_candidates, py::arg("out"), py::arg("a"), py::arg("b"), py::arg("calls"),
        py::arg("rounds"),
        "ms per call of every cuBLASLt candidate for out = a @ b, ATen's GEMM last (tools/probe_gemm_tuning.py).");
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in.");
}
