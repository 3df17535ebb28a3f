// Autotuned cuBLASLt GEMMs for the linear cross-entropy's three products (logits, d(hidden), d(weight)).
//
// Why: for these shapes cuBLAS's default heuristic is not the fastest kernel it has. On an H100 (2026-11-25,
// d = 4096, T = 8192, V in {32768, 131072}, bf16, interleaved medians) other cuBLASLt heuristic candidates ran the
// logits GEMM 5-7 % faster and the d(weight) GEMM 4-5 % faster than torch.mm; the d(hidden) GEMM's default was
// already within 2 %. So on the first call of each problem (shape, layout, dtypes, pointer alignment) the
// candidates cuBLASLt proposes and ATen's own GEMM are timed on the real operands, like cudnn.benchmark, and the
// fastest is cached for the process; MTP_GEMM_AUTOTUNE=0 keeps ATen's GEMM (no timing: the kernel choice of an
// untuned build). Products that overwrite their output (beta = 0) are timed on the real output, which is harmless.
// Accumulating products (beta = 1: the bf16 d(weight) update of every chunk after the first) cannot be timed on an
// output that holds a sum, so they are tuned once, on the first chunk, while its d(weight) buffer holds nothing
// yet (tune_accumulate; the caller then overwrites it), and later chunks only look the choice up. The
// float32-accumulating d(weight) products stay with cublasGemmEx. The workspace is torch's own persistent
// cuBLASLt workspace, so the op holds no extra memory.
#include "linear_cross_entropy.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace mtp {
namespace cuda {
namespace {

constexpr int kCandidates = 16;
constexpr int kTuningRounds = 4;
constexpr int kCallsPerTiming = 2;

bool autotune_enabled() {
  const char* value = std::getenv("MTP_GEMM_AUTOTUNE");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

// Largest power of two (<= 256) dividing the address: cuBLASLt kernels may require aligned operands, and its
// heuristic assumes 256-byte alignment unless told otherwise.
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

#define MTP_LT_CHECK(expr)                                   \
  do {                                                       \
    const cublasStatus_t status_ = (expr);                   \
    if (status_ != CUBLAS_STATUS_SUCCESS) return false;      \
  } while (0)

// One row-major problem C[m, n] = A[m, k] @ B[k, n], stated for cuBLASLt's column-major convention as
// C^T[n, m] = B^T[n, k] @ A^T[k, m]: a row-major matrix is its transpose in column-major.
struct Problem {
  int64_t m, n, k;
  const void* a;
  int64_t lda;
  bool a_t;  // A is stored transposed: row-major [k, m] with leading dimension lda
  const void* b;
  int64_t ldb;
  bool b_t;  // B is stored transposed: row-major [n, k]
  cudaDataType_t ab_type;
  void* c;
  int64_t ldc;
  cudaDataType_t c_type;
  int device;
  float beta = 0.f;  // 0: out = a @ b; 1: out += a @ b

  std::string key() const {
    return std::to_string(m) + "," + std::to_string(n) + "," + std::to_string(k) + "," + std::to_string(lda) +
           "," + std::to_string(ldb) + "," + std::to_string(ldc) + "," + std::to_string(a_t) +
           std::to_string(b_t) + "," + std::to_string(ab_type) + "," + std::to_string(c_type) + "," +
           std::to_string(alignment_of(a)) + "," + std::to_string(alignment_of(b)) + "," +
           std::to_string(alignment_of(c)) + "," + std::to_string(device) + "," + std::to_string(beta) +
           "," + std::to_string(autotune_enabled());  // so that setting MTP_GEMM_AUTOTUNE later takes effect
  }
};

// The descriptors of one problem (RAII).
class Descriptors {
 public:
  bool create(const Problem& p, size_t workspace_bytes) {
    workspace_bytes_ = workspace_bytes;
    MTP_LT_CHECK(cublasLtMatmulDescCreate(&op_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t first = p.b_t ? CUBLAS_OP_T : CUBLAS_OP_N;  // cuBLAS's A is our B
    const cublasOperation_t second = p.a_t ? CUBLAS_OP_T : CUBLAS_OP_N;
    MTP_LT_CHECK(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSA, &first, sizeof(first)));
    MTP_LT_CHECK(cublasLtMatmulDescSetAttribute(op_, CUBLASLT_MATMUL_DESC_TRANSB, &second, sizeof(second)));
    MTP_LT_CHECK(p.b_t ? cublasLtMatrixLayoutCreate(&first_, p.ab_type, p.k, p.n, p.ldb)
                       : cublasLtMatrixLayoutCreate(&first_, p.ab_type, p.n, p.k, p.ldb));
    MTP_LT_CHECK(p.a_t ? cublasLtMatrixLayoutCreate(&second_, p.ab_type, p.m, p.k, p.lda)
                       : cublasLtMatrixLayoutCreate(&second_, p.ab_type, p.k, p.m, p.lda));
    MTP_LT_CHECK(cublasLtMatrixLayoutCreate(&out_, p.c_type, p.n, p.m, p.ldc));
    MTP_LT_CHECK(cublasLtMatmulPreferenceCreate(&preference_));
    const uint64_t workspace = workspace_bytes;
    MTP_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference_, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                      &workspace, sizeof(workspace)));
    const uint32_t align_first = alignment_of(p.b), align_second = alignment_of(p.a), align_out = alignment_of(p.c);
    MTP_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference_, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                      &align_first, sizeof(align_first)));
    MTP_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference_, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                      &align_second, sizeof(align_second)));
    MTP_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference_, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                      &align_out, sizeof(align_out)));
    MTP_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(preference_, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                      &align_out, sizeof(align_out)));
    return true;
  }

  ~Descriptors() {
    if (preference_) cublasLtMatmulPreferenceDestroy(preference_);
    if (out_) cublasLtMatrixLayoutDestroy(out_);
    if (second_) cublasLtMatrixLayoutDestroy(second_);
    if (first_) cublasLtMatrixLayoutDestroy(first_);
    if (op_) cublasLtMatmulDescDestroy(op_);
  }

  std::vector<cublasLtMatmulAlgo_t> candidates(cublasLtHandle_t handle) const {
    cublasLtMatmulHeuristicResult_t results[kCandidates];
    int count = 0;
    std::vector<cublasLtMatmulAlgo_t> algos;
    if (cublasLtMatmulAlgoGetHeuristic(handle, op_, first_, second_, out_, out_, preference_, kCandidates, results,
                                       &count) != CUBLAS_STATUS_SUCCESS) {
      return algos;
    }
    for (int i = 0; i < count; ++i) {
      if (results[i].state == CUBLAS_STATUS_SUCCESS && results[i].workspaceSize <= workspace_bytes_) {
        algos.push_back(results[i].algo);
      }
    }
    return algos;
  }

  bool run(cublasLtHandle_t handle, const Problem& p, const cublasLtMatmulAlgo_t& algo, void* workspace,
           cudaStream_t stream) const {
    const float alpha = 1.f;
    MTP_LT_CHECK(cublasLtMatmul(handle, op_, &alpha, p.b, first_, p.a, second_, &p.beta, p.c, out_, p.c, out_,
                                &algo, workspace, workspace_bytes_, stream));
    return true;
  }

 private:
  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t first_ = nullptr, second_ = nullptr, out_ = nullptr;
  cublasLtMatmulPreference_t preference_ = nullptr;
  size_t workspace_bytes_ = 0;
};

struct Choice {
  bool usable = false;  // false: ATen's GEMM (cuBLAS's default) serves this problem
  cublasLtMatmulAlgo_t algo;
};

std::mutex cache_mutex;
std::unordered_map<std::string, Choice> cache;

// Median time (ms) of `calls` back-to-back calls of each candidate -- the cuBLASLt algorithms, then ATen's own
// GEMM as the last one -- interleaved in a rotating order over `rounds` rounds; a candidate that fails to run gets
// +inf.
std::vector<float> time_candidates(cublasLtHandle_t handle, const Descriptors& desc, const Problem& p,
                                   const std::vector<cublasLtMatmulAlgo_t>& algos, void* workspace,
                                   cudaStream_t stream, const std::function<void()>& aten_gemm,
                                   int calls = kCallsPerTiming, int rounds = kTuningRounds) {
  const size_t n = algos.size() + 1;
  auto call = [&](size_t i) {
    if (i == algos.size()) {
      aten_gemm();
      return true;
    }
    return desc.run(handle, p, algos[i], workspace, stream);
  };
  std::vector<std::vector<float>> samples(n);
  std::vector<bool> failed(n, false);
  for (size_t i = 0; i < n; ++i) failed[i] = !call(i);  // warm-up
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  for (int round = 0; round < rounds; ++round) {
    for (size_t j = 0; j < n; ++j) {
      const size_t i = (j + round) % n;
      if (failed[i]) continue;
      cudaEventRecord(start, stream);
      for (int rep = 0; rep < calls && !failed[i]; ++rep) {
        failed[i] = !call(i);
      }
      cudaEventRecord(stop, stream);
      cudaEventSynchronize(stop);
      float ms = 0.f;
      cudaEventElapsedTime(&ms, start, stop);
      samples[i].push_back(ms);
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  std::vector<float> medians(n, INFINITY);
  for (size_t i = 0; i < n; ++i) {
    if (failed[i] || samples[i].empty()) continue;
    std::sort(samples[i].begin(), samples[i].end());
    medians[i] = samples[i][samples[i].size() / 2];
  }
  return medians;
}

// Untuned (MTP_GEMM_AUTOTUNE=0): ATen's GEMM, exactly as without this file. Tuned: the fastest of cuBLASLt's
// candidates and ATen's GEMM, which stays unless a candidate is at least 1 % faster (timing noise) -- so tuning
// never picks a kernel slower than the default it replaces, e.g. where split-K candidates need more workspace
// than torch's cuBLASLt workspace offers.
Choice choose(cublasLtHandle_t handle, const Descriptors& desc, const Problem& p, void* workspace,
              cudaStream_t stream, const std::function<void()>& aten_gemm) {
  Choice choice;
  if (!autotune_enabled()) return choice;
  const std::vector<cublasLtMatmulAlgo_t> algos = desc.candidates(handle);
  if (algos.empty()) return choice;
  const std::vector<float> medians = time_candidates(handle, desc, p, algos, workspace, stream, aten_gemm);
  size_t best = algos.size();  // ATen
  for (size_t i = 0; i < algos.size(); ++i) {
    if (medians[i] < 0.99f * medians[best] && (best == algos.size() || medians[i] < medians[best])) best = i;
  }
  if (best < algos.size()) {
    choice.usable = true;
    choice.algo = algos[best];
  }
  return choice;
}

enum class Mode {
  kTuneAndRun,  // beta = 0: tune on first sight (the output is overwritten anyway), then run
  kTuneOnly,    // beta = 1 on a scratch output: tune on first sight, run nothing
  kLookUp,      // beta = 1 on a real sum: run the cached choice if there is one, never tune
};

// Returns whether the problem was served by a tuned cuBLASLt kernel (kTuneOnly: whether one is now cached);
// false leaves the output untouched for the caller's ATen fallback.
bool run_problem(const Problem& p, Mode mode, const std::function<void()>& aten_gemm) {
  const std::string key = p.key();
  Choice choice;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) {
      choice = it->second;
      cached = true;
    }
  }
  // Settled problems that ATen serves, and accumulating ones never tuned, need no descriptors at all.
  if (cached && !choice.usable) return false;
  if (!cached && mode == Mode::kLookUp) return false;
  if (cached && mode == Mode::kTuneOnly) return true;

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // torch's own cuBLASLt workspace for this handle and stream: persistent, so the op holds no extra memory.
  void* workspace = at::cuda::getCUDABlasLtWorkspace();
  Descriptors desc;
  if (!desc.create(p, at::cuda::getCUDABlasLtWorkspaceSize())) return false;
  if (!cached) {
    choice = choose(handle, desc, p, workspace, stream, aten_gemm);
    std::lock_guard<std::mutex> lock(cache_mutex);
    cache[key] = choice;
  }
  if (mode == Mode::kTuneOnly) return choice.usable;
  return choice.usable && desc.run(handle, p, choice.algo, workspace, stream);
}

// Row-major storage of a 2-D operand: (leading dimension, stored transposed), or false if neither dimension is
// contiguous.
bool storage_of(const at::Tensor& t, int64_t& ld, bool& transposed) {
  if (t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1))) {
    ld = t.stride(0);
    transposed = false;
    return true;
  }
  if (t.stride(0) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(0))) {
    ld = t.stride(1);
    transposed = true;
    return true;
  }
  return false;
}

// The problem for out (+)= a @ b, or false where this file cannot serve the arguments.
bool describe(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float beta, Problem& p) {
  const auto dtype = a.scalar_type();
  if (!out.is_cuda() || a.dim() != 2 || b.dim() != 2 || out.dim() != 2) return false;
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  if (b.scalar_type() != dtype || (out.scalar_type() != dtype && out.scalar_type() != at::kFloat)) return false;
  if (a.size(1) != b.size(0) || out.size(0) != a.size(0) || out.size(1) != b.size(1)) return false;
  if (a.numel() == 0 || b.numel() == 0 || out.stride(1) != 1 || out.stride(0) < out.size(1)) return false;
  p.m = a.size(0);
  p.n = b.size(1);
  p.k = a.size(1);
  if (!storage_of(a, p.lda, p.a_t) || !storage_of(b, p.ldb, p.b_t)) return false;
  p.a = a.data_ptr();
  p.b = b.data_ptr();
  p.ab_type = dtype == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  p.c = out.data_ptr();
  p.ldc = out.stride(0);
  p.c_type = out.scalar_type() == at::kFloat ? CUDA_R_32F : p.ab_type;
  p.device = out.get_device();
  p.beta = beta;
  return true;
}

}  // namespace

bool tuned_matmul(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  Problem p;
  if (!describe(out, a, b, 0.f, p)) return false;
  const c10::cuda::CUDAGuard guard(out.device());
  return run_problem(p, Mode::kTuneAndRun, [&] { at::mm_out(out, a, b); });
}

std::vector<double> time_gemm_candidates(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, int64_t calls,
                                         int64_t rounds) {
  Problem p;
  TORCH_CHECK(describe(out, a, b, 0.f, p),
              "time_gemm_candidates: bf16/fp16 CUDA matrices of matching shapes expected");
  TORCH_CHECK(calls > 0 && rounds > 0, "time_gemm_candidates: calls and rounds must be positive");
  const c10::cuda::CUDAGuard guard(out.device());
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  Descriptors desc;
  TORCH_CHECK(desc.create(p, at::cuda::getCUDABlasLtWorkspaceSize()),
              "time_gemm_candidates: cuBLASLt refused the problem");
  const std::vector<cublasLtMatmulAlgo_t> algos = desc.candidates(handle);
  const std::vector<float> ms =
      time_candidates(handle, desc, p, algos, at::cuda::getCUDABlasLtWorkspace(), at::cuda::getCurrentCUDAStream(),
                      [&] { at::mm_out(out, a, b); }, static_cast<int>(calls), static_cast<int>(rounds));
  std::vector<double> per_call(ms.size());
  for (size_t i = 0; i < ms.size(); ++i) per_call[i] = static_cast<double>(ms[i]) / static_cast<double>(calls);
  return per_call;
}

void tune_accumulate(at::Tensor& scratch_out, const at::Tensor& a, const at::Tensor& b) {
  Problem p;
  if (!describe(scratch_out, a, b, 1.f, p)) return;
  const c10::cuda::CUDAGuard guard(scratch_out.device());
  run_problem(p, Mode::kTuneOnly, [&] { scratch_out.addmm_(a, b); });
}

bool tuned_matmul_accumulate(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  Problem p;
  if (!describe(out, a, b, 1.f, p)) return false;
  const c10::cuda::CUDAGuard guard(out.device());
  return run_problem(p, Mode::kLookUp, [] {});
}

}  // namespace cuda
}  // namespace mtp
