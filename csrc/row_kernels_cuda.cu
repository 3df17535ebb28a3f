// CUDA half of the linear cross-entropy: row kernels over a [rows, V_local] logits chunk, the float32-accumulating
// weight-gradient GEMM, and the in-place float32 -> bf16 narrowing of the weight-gradient accumulator.
//
// Row kernels: one 512-thread block per row (grid-stride over rows), 16-byte loads and stores, statistics in
// float32. They are memory-bound. The fused single-shard kernel reads each row once: where it fits in shared memory
// three times per SM (bf16 up to V ~ 38000) one block parks it; where a slice of it does (up to 8 slices, sm_90) a
// thread block cluster parks it slice by slice. Only longer rows are re-read (from L2 where the grid's rows in
// flight fit half of it) before being written once. H100 profile (docs/cross_entropy.md): 0.38 ms per
// 8192 x 32768 bf16 chunk (~2.8 TB/s counting one read and one write; 0.47 ms re-reading); 1.77 ms per
// 8192 x 131072 (~2.4 TB/s, 4-block clusters; 2.18 ms re-reading, whose re-read misses L2: see fused_grid).
#include "linear_cross_entropy.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace mtp {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

// Running (max, sum of exp(x - max)) pair; merging rescales the smaller side once.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};  // both empty: avoid exp(-inf - -inf) = NaN
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_reduce(MaxSum v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = merge(v, {__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)});
  }
  return v;
}

// Block-wide merge; every thread gets the result. `shared` holds kWarps + 1 slots and is free on return.
__device__ __forceinline__ MaxSum block_reduce(MaxSum v, MaxSum* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_reduce(lane < kWarps ? shared[lane] : MaxSum{-INFINITY, 0.f});
    if (lane == 0) shared[kWarps] = v;
  }
  __syncthreads();
  v = shared[kWarps];
  __syncthreads();  // the slots are reused for the next row
  return v;
}

// Loads in flight per thread: at one block per SM or fewer (long rows, see fused_grid) a single
// outstanding 16-byte load per thread cannot cover the memory latency, so each thread issues kUnroll first.
constexpr int kUnroll = 4;

// Rows whose bytes fit in one SM's shared memory this many times (at least) take the shared-memory kernel, so that
// while one block reduces, others load.
constexpr int kMinSmemRowsPerSm = 3;

// One thread's share of a row: online max / sum-exp, rescaling the running sum once per 16-byte pack.
template <typename scalar_t>
__device__ __forceinline__ void accumulate_pack(MaxSum& acc, const Pack<scalar_t>& p) {
  constexpr int kN = Pack<scalar_t>::kSize;
  float x[kN];
  float pack_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    x[j] = static_cast<float>(p.v[j]);
    pack_max = fmaxf(pack_max, x[j]);
  }
  if (pack_max > acc.m) {
    acc.s *= __expf(acc.m - pack_max);  // exp(-inf) = 0 while the sum is still empty
    acc.m = pack_max;
  }
#pragma unroll
  for (int j = 0; j < kN; ++j) acc.s += __expf(x[j] - acc.m);
}

template <typename scalar_t, bool kVectorized>
__device__ __forceinline__ MaxSum thread_row_stats(const scalar_t* __restrict__ row, int64_t vocab) {
  MaxSum acc{-INFINITY, 0.f};
  if constexpr (kVectorized) {
    const auto* packs = reinterpret_cast<const Pack<scalar_t>*>(row);
    const int64_t n_packs = vocab / Pack<scalar_t>::kSize;
    for (int64_t base = threadIdx.x; base < n_packs; base += int64_t(kThreads) * kUnroll) {
      Pack<scalar_t> p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + int64_t(u) * kThreads;
        if (i < n_packs) p[u] = packs[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (base + int64_t(u) * kThreads < n_packs) accumulate_pack(acc, p[u]);
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const float x = static_cast<float>(row[i]);
      if (x > acc.m) {
        acc.s = acc.s * __expf(acc.m - x) + 1.f;
        acc.m = x;
      } else {
        acc.s += __expf(x - acc.m);
      }
    }
  }
  return acc;
}

// Pack number `i` of a row becomes its share of the gradient: g = (exp(x - lse) - [column == target]) * scale.
template <typename scalar_t>
__device__ __forceinline__ void grad_pack(Pack<scalar_t>& p, int64_t i, float lse, float scale, int64_t target_col) {
  constexpr int kN = Pack<scalar_t>::kSize;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    float prob = __expf(static_cast<float>(p.v[j]) - lse);
    if (i * kN + j == target_col) prob -= 1.f;
    p.v[j] = static_cast<scalar_t>(prob * scale);
  }
}

// The gradient of an ignored row (scale 0), written without reading the logits.
template <typename scalar_t>
__device__ __forceinline__ Pack<scalar_t> zero_pack() {
  Pack<scalar_t> zero;
#pragma unroll
  for (int j = 0; j < Pack<scalar_t>::kSize; ++j) zero.v[j] = static_cast<scalar_t>(0.f);
  return zero;
}

// One thread's share of the in-place gradient: g = (exp(x - lse) - [v == target]) * scale.
template <typename scalar_t, bool kVectorized>
__device__ __forceinline__ void thread_write_grad(scalar_t* __restrict__ row, int64_t vocab, float lse, float scale,
                                                  int64_t target_col) {
  if constexpr (kVectorized) {
    constexpr int kN = Pack<scalar_t>::kSize;
    auto* packs = reinterpret_cast<Pack<scalar_t>*>(row);
    const int64_t n_packs = vocab / kN;
    if (scale == 0.f) {  // ignored row (uniform across the block)
      const Pack<scalar_t> zero = zero_pack<scalar_t>();
      for (int64_t i = threadIdx.x; i < n_packs; i += kThreads) packs[i] = zero;
      return;
    }
    for (int64_t base = threadIdx.x; base < n_packs; base += int64_t(kThreads) * kUnroll) {
      Pack<scalar_t> p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + int64_t(u) * kThreads;
        if (i < n_packs) p[u] = packs[i];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = base + int64_t(u) * kThreads;
        if (i >= n_packs) continue;
        grad_pack(p[u], i, lse, scale, target_col);
        packs[i] = p[u];
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      float prob = scale == 0.f ? 0.f : __expf(static_cast<float>(row[i]) - lse);
      if (i == target_col) prob -= 1.f;
      row[i] = static_cast<scalar_t>(prob * scale);
    }
  }
}

template <typename scalar_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    row_stats_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t rows,
                     int64_t vocab, int64_t vocab_start, float* __restrict__ row_max, float* __restrict__ row_sum,
                     float* __restrict__ target_logit) {
  __shared__ MaxSum shared[kWarps + 1];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* row = logits + r * vocab;
    const MaxSum ms = block_reduce(thread_row_stats<scalar_t, kVectorized>(row, vocab), shared);
    if (threadIdx.x == 0) {
      const int64_t col = target[r] - vocab_start;
      row_max[r] = ms.m;
      row_sum[r] = ms.s;
      target_logit[r] = (col >= 0 && col < vocab) ? static_cast<float>(row[col]) : 0.f;
    }
  }
}

template <typename scalar_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    softmax_grad_kernel(scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t rows,
                        int64_t vocab, int64_t vocab_start, const float* __restrict__ lse,
                        const float* __restrict__ row_scale) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    thread_write_grad<scalar_t, kVectorized>(logits + r * vocab, vocab, lse[r], row_scale[r], target[r] - vocab_start);
  }
}

template <typename scalar_t, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    stats_and_grad_kernel(scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t rows,
                          int64_t vocab, int64_t vocab_start, const float* __restrict__ row_scale,
                          float* __restrict__ lse_out, float* __restrict__ target_logit_out, bool write_grad) {
  __shared__ MaxSum shared[kWarps + 1];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    scalar_t* row = logits + r * vocab;
    const int64_t col = target[r] - vocab_start;
    // Read the target logit before the block's barrier: after it, other threads start overwriting the row.
    const float t = (threadIdx.x == 0 && col >= 0 && col < vocab) ? static_cast<float>(row[col]) : 0.f;
    const MaxSum ms = block_reduce(thread_row_stats<scalar_t, kVectorized>(row, vocab), shared);
    const float lse = ms.m + __logf(ms.s);  // s >= 1: the max itself contributes exp(0)
    if (threadIdx.x == 0) {
      lse_out[r] = lse;
      target_logit_out[r] = t;
    }
    if (write_grad) thread_write_grad<scalar_t, kVectorized>(row, vocab, lse, row_scale[r], col);
  }
}

// Loads packs [begin, end) of a row, parks them in `slots` (slot i - begin) and returns this thread's statistics of
// them. Each thread only ever reads back the slots it wrote (write_parked_grad uses the same mapping), so the slots
// need no barrier of their own. Same thread-to-column mapping and merge order as thread_row_stats over [0, end).
template <typename scalar_t>
__device__ __forceinline__ MaxSum park_and_accumulate(const Pack<scalar_t>* __restrict__ packs,
                                                      Pack<scalar_t>* __restrict__ slots, int begin, int end) {
  constexpr int kSmemUnroll = 2;  // 3 blocks x 512 threads x 2 loads of 16 B in flight per SM: enough, and no spills
  MaxSum acc{-INFINITY, 0.f};
  for (int base = begin + threadIdx.x; base < end; base += kThreads * kSmemUnroll) {
    Pack<scalar_t> p[kSmemUnroll];
#pragma unroll
    for (int u = 0; u < kSmemUnroll; ++u) {
      const int i = base + u * kThreads;
      if (i < end) p[u] = packs[i];
    }
#pragma unroll
    for (int u = 0; u < kSmemUnroll; ++u) {
      const int i = base + u * kThreads;
      if (i < end) {
        slots[i - begin] = p[u];
        accumulate_pack(acc, p[u]);
      }
    }
  }
  return acc;
}

// Writes the gradient of packs [begin, end) from their parked copies (zeros for an ignored row, scale 0).
template <typename scalar_t>
__device__ __forceinline__ void write_parked_grad(Pack<scalar_t>* __restrict__ packs,
                                                  const Pack<scalar_t>* __restrict__ slots, int begin, int end,
                                                  float lse, float scale, int64_t target_col) {
  if (scale == 0.f) {  // uniform across the block
    const Pack<scalar_t> zero = zero_pack<scalar_t>();
    for (int i = begin + threadIdx.x; i < end; i += kThreads) packs[i] = zero;
    return;
  }
  for (int i = begin + threadIdx.x; i < end; i += kThreads) {
    Pack<scalar_t> p = slots[i - begin];
    grad_pack(p, i, lse, scale, target_col);
    packs[i] = p;
  }
}

// The fused kernel for rows that fit in shared memory a few times per SM (up to ~75 KiB: bf16 V <= 38400 on an
// H100): each thread parks the packs it loads in shared memory and later turns the same packs into the gradient,
// so the row is read from HBM once instead of twice. Same thread-to-column mapping and merge order as
// thread_row_stats, hence bit-identical results to the kernel above. (Keeping the packs in registers instead was
// measured slower: at 95 registers only one block fits per SM, which then alternates between loading and reducing.)
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinSmemRowsPerSm)  // registers must not limit it below that either
    stats_and_grad_smem_kernel(scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t rows,
                               int64_t vocab, int64_t vocab_start, const float* __restrict__ row_scale,
                               float* __restrict__ lse_out, float* __restrict__ target_logit_out, bool write_grad) {
  constexpr int kN = Pack<scalar_t>::kSize;
  extern __shared__ __align__(16) unsigned char row_bytes[];
  auto* slots = reinterpret_cast<Pack<scalar_t>*>(row_bytes);
  __shared__ MaxSum shared[kWarps + 1];
  const int n_packs = static_cast<int>(vocab / kN);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    scalar_t* row = logits + r * vocab;
    auto* packs = reinterpret_cast<Pack<scalar_t>*>(row);
    const int64_t col = target[r] - vocab_start;
    const float t = (threadIdx.x == 0 && col >= 0 && col < vocab) ? static_cast<float>(row[col]) : 0.f;
    // block_reduce's barrier also orders thread 0's read of row[col] before any gradient is written
    const MaxSum ms = block_reduce(park_and_accumulate(packs, slots, 0, n_packs), shared);
    const float lse = ms.m + __logf(ms.s);
    if (threadIdx.x == 0) {
      lse_out[r] = lse;
      target_logit_out[r] = t;
    }
    if (write_grad) write_parked_grad(packs, slots, 0, n_packs, lse, row_scale[r], col);
  }
}

// Rows too long for one block's shared memory (bf16 V > ~38000, e.g. 256 KiB at V = 131072) are split over a thread
// block cluster (sm_90): each of its `cluster size` blocks parks one slice of the row in its shared memory, reduces
// the slice's (max, sum-exp), and reads its peers' partial statistics through distributed shared memory; all blocks
// merge the partials in rank order, so they agree on the log-sum-exp bit for bit. The row is read from HBM once,
// as in the kernel above, instead of twice (the re-reading kernel runs at ~1.9 TB/s on such rows, L2 cannot hold
// the re-read). Merge order differs from the single-block kernels: results agree with them to rounding, not bits.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinSmemRowsPerSm)
    stats_and_grad_cluster_kernel(scalar_t* __restrict__ logits, const int64_t* __restrict__ target, int64_t rows,
                                  int64_t vocab, int64_t vocab_start, const float* __restrict__ row_scale,
                                  float* __restrict__ lse_out, float* __restrict__ target_logit_out, bool write_grad,
                                  int slice_packs) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int kN = Pack<scalar_t>::kSize;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int cluster_size = static_cast<int>(cluster.num_blocks());
  extern __shared__ __align__(16) unsigned char row_bytes[];
  auto* slots = reinterpret_cast<Pack<scalar_t>*>(row_bytes);
  __shared__ MaxSum shared[kWarps + 1];
  // This block's slice statistics, double-buffered by row parity: a peer may still be reading row r's partial
  // when this block writes row r + 1's, but every peer has read it before passing row r + 1's cluster barrier.
  __shared__ MaxSum partial[2];
  const int n_packs = static_cast<int>(vocab / kN);
  const int begin = rank * slice_packs;
  const int end = min(n_packs, begin + slice_packs);
  const int64_t n_clusters = gridDim.x / cluster_size;
  int parity = 0;
  for (int64_t r = blockIdx.x / cluster_size; r < rows; r += n_clusters, parity ^= 1) {
    scalar_t* row = logits + r * vocab;
    auto* packs = reinterpret_cast<Pack<scalar_t>*>(row);
    const int64_t col = target[r] - vocab_start;
    // block_reduce's barriers also make every slot visible to thread 0
    const MaxSum mine = block_reduce(park_and_accumulate(packs, slots, begin, end), shared);
    const bool in_shard = col >= 0 && col < vocab;
    const int owner = in_shard ? static_cast<int>(col / kN) / slice_packs : 0;
    if (threadIdx.x == 0) {
      partial[parity] = mine;
      if (rank == owner) {
        target_logit_out[r] = in_shard ? static_cast<float>(slots[col / kN - begin].v[col % kN]) : 0.f;
      }
    }
    cluster.sync();  // every block's partial is written (release / acquire across the cluster)
    MaxSum ms{-INFINITY, 0.f};
    for (int j = 0; j < cluster_size; ++j) ms = merge(ms, *cluster.map_shared_rank(&partial[parity], j));
    const float lse = ms.m + __logf(ms.s);
    if (rank == 0 && threadIdx.x == 0) lse_out[r] = lse;
    if (write_grad) write_parked_grad(packs, slots, begin, end, lse, row_scale[r], col);
  }
  cluster.sync();  // no block may exit while a peer can still read its shared memory
#else
  __trap();  // launched only where cluster_size_for() found sm_90 code for this kernel
#endif
}

// ---- launch helpers -------------------------------------------------------------------------------------------

void check_chunk(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(),
              "logits chunk must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(target.is_cuda() && target.scalar_type() == at::kLong && target.is_contiguous() &&
                  target.numel() == logits.size(0),
              "target must be a contiguous int64 CUDA tensor with one id per logits row");
}

void check_stat(const at::Tensor& t, int64_t rows, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == rows, name,
              " must be a contiguous float32 CUDA tensor with one value per row");
}

template <typename scalar_t>
bool vectorizable(const at::Tensor& logits) {
  return logits.size(1) % Pack<scalar_t>::kSize == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
}

int64_t grid_for(int64_t rows, int64_t blocks_per_sm) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min(rows, sms * blocks_per_sm));
}

// Grid of the fused kernel, which re-reads its row: one row per block in flight, as many blocks as keep the rows in
// flight within half the L2 (so that the re-read can hit the cache), at least half the SMs and at most 4 blocks
// per SM. For 256 KiB rows (V = 131072 bf16) that is 100 blocks on an H100. Measured there (2026-11-25) against
// grids of 66 to 528 blocks: 100 and more all ran at 1.8-1.95 TB/s (66: 1.37 TB/s), so the re-read misses L2
// whatever the grid; keeping the row on chip, not the grid size, is the lever left.
int64_t fused_grid(int64_t rows, int64_t row_bytes) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t sms = prop->multiProcessorCount;
  const int64_t budget = static_cast<int64_t>(prop->l2CacheSize) / 2;
  const int64_t in_flight = budget / std::max<int64_t>(1, row_bytes);
  const int64_t blocks = std::clamp<int64_t>(in_flight, std::max<int64_t>(1, sms / 2), sms * (2048 / kThreads));
  return std::max<int64_t>(1, std::min(rows, blocks));
}

// How many rows of `row_bytes` fit in one SM's shared memory (0: not even one per block). MTP_CE_ROW_KERNEL=reread
// answers 0, forcing the re-reading kernel (an A/B switch).
int64_t smem_rows_per_sm(int64_t row_bytes) {
  const char* choice = std::getenv("MTP_CE_ROW_KERNEL");
  if (choice != nullptr && std::strcmp(choice, "reread") == 0) return 0;
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  if (row_bytes > static_cast<int64_t>(prop->sharedMemPerBlockOptin)) return 0;
  // Per block: the row plus the reduction slots and the runtime's reserve (1 KiB per block on sm_90).
  const int64_t per_block = row_bytes + static_cast<int64_t>(sizeof(MaxSum)) * (kWarps + 1) + 1024;
  return static_cast<int64_t>(prop->sharedMemPerMultiprocessor) / per_block;
}

// Blocks a row is split over by the cluster kernel (2, 4 or 8) so that each slice fits in shared memory
// kMinSmemRowsPerSm times per SM; 0 where no such split exists (fp32 rows over ~150000 values, bf16 over ~300000),
// the device has no clusters (before sm_90) or the kernel was not compiled for sm_90 (another MTP_CUDA_ARCH).
template <typename scalar_t>
int cluster_size_for(int64_t vocab, int& slice_packs) {
  static const bool usable = [] {
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    cudaFuncAttributes attr{};
    if (prop->major < 9 || cudaFuncGetAttributes(&attr, stats_and_grad_cluster_kernel<scalar_t>) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return attr.ptxVersion >= 90 && attr.binaryVersion >= 90;
  }();
  if (!usable) return 0;
  const int64_t n_packs = vocab / Pack<scalar_t>::kSize;
  // The fewest blocks that fit three per SM are the fastest: on an H100 (2026-11-25, fwd+bwd of the op with d = 64,
  // where the row pass dominates) 8192 x 131072 bf16 took 4.23 ms with 4-block clusters, 4.52 with 2 (128 KiB
  // slices, one block per SM), 4.52 with 8 (32 KiB slices) and 4.80 re-reading.
  for (int size = 2; size <= 8; size *= 2) {
    const int64_t slice = (n_packs + size - 1) / size;
    if (smem_rows_per_sm(slice * 16) >= kMinSmemRowsPerSm) {
      slice_packs = static_cast<int>(slice);
      return size;
    }
  }
  return 0;
}

// Launches the cluster kernel; false (nothing launched) if not one cluster of this shape can be resident.
template <typename scalar_t>
bool launch_cluster_kernel(int cluster_size, int slice_packs, scalar_t* logits, const int64_t* target, int64_t rows,
                           int64_t vocab, int64_t vocab_start, const float* row_scale, float* lse,
                           float* target_logit, bool write_grad, cudaStream_t stream) {
  auto kernel = stats_and_grad_cluster_kernel<scalar_t>;
  const size_t smem = static_cast<size_t>(slice_packs) * 16;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  cudaLaunchAttribute cluster_dim{};
  cluster_dim.id = cudaLaunchAttributeClusterDimension;
  cluster_dim.val.clusterDim.x = cluster_size;
  cluster_dim.val.clusterDim.y = 1;
  cluster_dim.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &cluster_dim;
  config.numAttrs = 1;
  // As many clusters as can be resident at once (each then strides over rows), at most one per row.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  config.gridDim = dim3(static_cast<unsigned>(sms / cluster_size * cluster_size));
  int resident = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&resident, kernel, &config));
  if (resident <= 0) return false;
  const int64_t clusters = std::max<int64_t>(1, std::min<int64_t>(rows, resident));
  config.gridDim = dim3(static_cast<unsigned>(clusters * cluster_size));
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, logits, target, rows, vocab, vocab_start, row_scale, lse,
                                    target_logit, write_grad, slice_packs));
  return true;
}

#define MTP_DISPATCH_LOGITS(TYPE, NAME, ...)                          \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)        \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)         \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

void row_stats(const at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, at::Tensor& row_max,
               at::Tensor& row_sumexp, at::Tensor& target_logit) {
  check_chunk(logits, target);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_stat(row_max, rows, "row_max");
  check_stat(row_sumexp, rows, "row_sumexp");
  check_stat(target_logit, rows, "target_logit");
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  MTP_DISPATCH_LOGITS(logits.scalar_type(), "mtp_row_stats_cuda", [&] {
    const int64_t grid = grid_for(rows, 2048 / kThreads);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), rows, vocab,
                                            vocab_start, row_max.data_ptr<float>(), row_sumexp.data_ptr<float>(),
                                            target_logit.data_ptr<float>());
    };
    if (vectorizable<scalar_t>(logits)) {
      launch(row_stats_kernel<scalar_t, true>);
    } else {
      launch(row_stats_kernel<scalar_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void softmax_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start, const at::Tensor& lse,
                   const at::Tensor& row_scale) {
  check_chunk(logits, target);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_stat(lse, rows, "lse");
  check_stat(row_scale, rows, "row_scale");
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  MTP_DISPATCH_LOGITS(logits.scalar_type(), "mtp_softmax_grad_cuda", [&] {
    const int64_t grid = grid_for(rows, 2048 / kThreads);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), rows, vocab,
                                            vocab_start, lse.data_ptr<float>(), row_scale.data_ptr<float>());
    };
    if (vectorizable<scalar_t>(logits)) {
      launch(softmax_grad_kernel<scalar_t, true>);
    } else {
      launch(softmax_grad_kernel<scalar_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void stats_and_grad_(at::Tensor& logits, const at::Tensor& target, int64_t vocab_start,
                     const at::Tensor& row_scale, at::Tensor& lse, at::Tensor& target_logit, bool write_grad) {
  check_chunk(logits, target);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (write_grad) check_stat(row_scale, rows, "row_scale");
  check_stat(lse, rows, "lse");
  check_stat(target_logit, rows, "target_logit");
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  MTP_DISPATCH_LOGITS(logits.scalar_type(), "mtp_stats_and_grad_cuda", [&] {
    const int64_t row_bytes = vocab * static_cast<int64_t>(sizeof(scalar_t));
    const int64_t rows_per_sm = smem_rows_per_sm(row_bytes);
    if (vectorizable<scalar_t>(logits) && rows_per_sm >= kMinSmemRowsPerSm) {
      auto kernel = stats_and_grad_smem_kernel<scalar_t>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(row_bytes)));
      kernel<<<grid_for(rows, std::min<int64_t>(rows_per_sm, 2048 / kThreads)), kThreads, row_bytes, stream>>>(
          logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), rows, vocab, vocab_start,
          write_grad ? row_scale.data_ptr<float>() : nullptr, lse.data_ptr<float>(), target_logit.data_ptr<float>(),
          write_grad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    int slice_packs = 0;
    const int cluster_size = vectorizable<scalar_t>(logits) ? cluster_size_for<scalar_t>(vocab, slice_packs) : 0;
    if (cluster_size > 0 &&
        launch_cluster_kernel<scalar_t>(cluster_size, slice_packs, logits.data_ptr<scalar_t>(),
                                        target.data_ptr<int64_t>(), rows, vocab, vocab_start,
                                        write_grad ? row_scale.data_ptr<float>() : nullptr, lse.data_ptr<float>(),
                                        target_logit.data_ptr<float>(), write_grad, stream)) {
      return;
    }
    const int64_t grid = fused_grid(rows, row_bytes);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(logits.data_ptr<scalar_t>(), target.data_ptr<int64_t>(), rows, vocab,
                                            vocab_start, write_grad ? row_scale.data_ptr<float>() : nullptr,
                                            lse.data_ptr<float>(), target_logit.data_ptr<float>(), write_grad);
    };
    if (vectorizable<scalar_t>(logits)) {
      launch(stats_and_grad_kernel<scalar_t, true>);
    } else {
      launch(stats_and_grad_kernel<scalar_t, false>);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- weight gradient: bf16/fp16 operands, float32 accumulator ---------------------------------------------------

void gemm_accumulate_fp32(const at::Tensor& grad_logits, int64_t col_begin, int64_t col_end,
                          const at::Tensor& hidden_chunk, float* c, float beta) {
  TORCH_CHECK(grad_logits.is_contiguous() && hidden_chunk.is_contiguous() &&
                  grad_logits.scalar_type() == hidden_chunk.scalar_type() &&
                  (grad_logits.scalar_type() == at::kBFloat16 || grad_logits.scalar_type() == at::kHalf),
              "gemm_accumulate_fp32 takes contiguous bf16/fp16 operands of one dtype");
  const int64_t rows = grad_logits.size(0), vocab = grad_logits.size(1), dim = hidden_chunk.size(1);
  const int64_t n = col_end - col_begin;
  TORCH_CHECK(hidden_chunk.size(0) == rows && col_begin >= 0 && col_end <= vocab, "gemm_accumulate_fp32: bad shapes");
  TORCH_CHECK(rows < INT32_MAX && vocab < INT32_MAX && dim < INT32_MAX, "gemm_accumulate_fp32: dimension too large");
  if (n <= 0 || dim == 0 || rows == 0) return;  // callers never pass an empty chunk with beta = 0
  const cudaDataType_t ab = grad_logits.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const float alpha = 1.f;
  const char* b = static_cast<const char*>(grad_logits.data_ptr()) + col_begin * grad_logits.element_size();
  // Column-major view: C^T[d, n] = H^T[d, rows] @ G[rows, col_begin:col_end], i.e. row-major
  // dW[col_begin:col_end, d] = G[:, cols]^T @ H, with C's leading dimension d (dW rows are contiguous).
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(dim), static_cast<int>(n),
                                    static_cast<int>(rows), &alpha, hidden_chunk.data_ptr(), ab,
                                    static_cast<int>(dim), b, ab, static_cast<int>(vocab), &beta, c, CUDA_R_32F,
                                    static_cast<int>(dim), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ---- gradient scaling without a host sync --------------------------------------------------------------------

namespace {

template <typename scalar_t>
__global__ void scale_unless_one_kernel(scalar_t* __restrict__ data, int64_t n, const float* __restrict__ scale) {
  const float s = *scale;
  if (s == 1.f) return;  // uniform across the grid: nothing is read or written
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  constexpr int kN = Pack<scalar_t>::kSize;
  const bool vec = reinterpret_cast<uintptr_t>(data) % 16 == 0;
  int64_t done = 0;
  if (vec) {
    auto* packs = reinterpret_cast<Pack<scalar_t>*>(data);
    const int64_t n_packs = n / kN;
    for (int64_t i = first; i < n_packs; i += stride) {
      Pack<scalar_t> p = packs[i];
#pragma unroll
      for (int j = 0; j < kN; ++j) p.v[j] = static_cast<scalar_t>(static_cast<float>(p.v[j]) * s);
      packs[i] = p;
    }
    done = n_packs * kN;
  }
  for (int64_t i = done + first; i < n; i += stride) data[i] = static_cast<scalar_t>(static_cast<float>(data[i]) * s);
}

}  // namespace

void scale_unless_one_(at::Tensor& t, const at::Tensor& scale) {
  TORCH_CHECK(t.is_contiguous() && scale.is_cuda() && scale.scalar_type() == at::kFloat,
              "scale_unless_one_: a contiguous CUDA tensor and a float32 CUDA scalar expected");
  const int64_t n = t.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  constexpr int kBlock = 256;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>((n / 8 + kBlock - 1) / kBlock, sms * 8));
  MTP_DISPATCH_LOGITS(t.scalar_type(), "mtp_scale_unless_one_cuda", [&] {
    scale_unless_one_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(t.data_ptr<scalar_t>(), n,
                                                                  scale.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- float32 -> bf16/fp16 conversion, also in place -----------------------------------------------------------

namespace {

template <typename out_t>
struct alignas(4 * sizeof(out_t)) Quad {
  out_t v[4];
};

template <typename out_t, bool kVectorized>
__global__ void convert_kernel(const float* __restrict__ in, out_t* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if constexpr (kVectorized) {
    const int64_t quads = n / 4;
    for (int64_t i = first; i < quads; i += stride) {
      const float4 x = reinterpret_cast<const float4*>(in)[i];
      Quad<out_t> q;
      q.v[0] = static_cast<out_t>(x.x);
      q.v[1] = static_cast<out_t>(x.y);
      q.v[2] = static_cast<out_t>(x.z);
      q.v[3] = static_cast<out_t>(x.w);
      reinterpret_cast<Quad<out_t>*>(out)[i] = q;
    }
    done = quads * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) out[i] = static_cast<out_t>(in[i]);
}

template <typename out_t>
void launch_convert(const float* in, out_t* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  constexpr int kBlock = 256;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>((n / 4 + kBlock - 1) / kBlock, sms * 8));
  const bool vec = reinterpret_cast<uintptr_t>(in) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(out) % (4 * sizeof(out_t)) == 0;
  if (vec) {
    convert_kernel<out_t, true><<<grid, kBlock, 0, stream>>>(in, out, n);
  } else {
    convert_kernel<out_t, false><<<grid, kBlock, 0, stream>>>(in, out, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename out_t>
void narrow_in_place(void* buffer, int64_t n, const at::TensorOptions& options, cudaStream_t stream) {
  // Element i (float32, bytes [4i, 4i+4)) becomes element i of the narrow type at bytes [2i, 2i+2). Launch k
  // converts [s, min(2s, n)): its writes land in bytes [2s, 4s), i.e. on float32 elements below s that earlier
  // launches (same stream, so already finished reading) consumed, and never on its own inputs. The first
  // block, whose writes would overlap its own inputs, goes through a small temporary.
  const float* in = static_cast<const float*>(buffer);
  out_t* out = static_cast<out_t*>(buffer);
  const int64_t first = std::min<int64_t>(n, int64_t(1) << 20);
  if (first > 0) {
    at::Tensor tmp = at::empty({first}, options);
    launch_convert<out_t>(in, static_cast<out_t*>(tmp.data_ptr()), first, stream);
    C10_CUDA_CHECK(cudaMemcpyAsync(out, tmp.data_ptr(), first * sizeof(out_t), cudaMemcpyDeviceToDevice, stream));
  }
  for (int64_t s = first; s < n;) {
    const int64_t e = std::min(2 * s, n);
    launch_convert<out_t>(in + s, out + s, e - s, stream);
    s = e;
  }
}

}  // namespace

void narrow_fp32_in_place(void* buffer, int64_t n, at::ScalarType out_dtype) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto options = at::TensorOptions().device(at::kCUDA, c10::cuda::current_device()).dtype(out_dtype);
  if (out_dtype == at::kBFloat16) {
    narrow_in_place<at::BFloat16>(buffer, n, options, stream);
  } else {
    TORCH_CHECK(out_dtype == at::kHalf, "narrow_fp32_in_place: bf16 or fp16 output expected");
    narrow_in_place<at::Half>(buffer, n, options, stream);
  }
}

void convert_fp32(const float* src, void* dst, int64_t n, at::ScalarType out_dtype) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (out_dtype == at::kBFloat16) {
    launch_convert<at::BFloat16>(src, static_cast<at::BFloat16*>(dst), n, stream);
  } else {
    TORCH_CHECK(out_dtype == at::kHalf, "convert_fp32: bf16 or fp16 output expected");
    launch_convert<at::Half>(src, static_cast<at::Half*>(dst), n, stream);
  }
}

}  // namespace cuda
}  // namespace mtp
