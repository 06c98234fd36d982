// CUDA kernels of the fused AdamW + EMA update and of the gradient-norm pass.
//
// Multi-tensor launches: the host packs the tensors' pointers and sizes into a table that
// travels in the kernel arguments (up to 32 KiB of parameters on sm_70+ with CUDA >= 12.1),
// and every block finds its tensor and chunk from the block index. Aligned chunks move
// 4 elements per load (16 bytes of fp32 state); misaligned tensors and the last
// numel % 4 elements take a scalar path. Only CUDA headers are needed here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "adam_ema_cuda_launch.h"
#include "adam_ema_math.h"

namespace fastdiff {
namespace {

constexpr int kThreads = 256;
// Elements per block: 16 float4 iterations per thread amortise the table lookup and the
// per-block coefficient computation.
constexpr int64_t kChunk = 16384;
// Kernel-argument budget (CUDA allows 32764 bytes on sm_70+ since 12.1).
constexpr size_t kArgBudget = 32000;

// ---- element types ---------------------------------------------------------------------
struct Float32 {
  using Storage = float;
  __device__ static float to_float(float x) { return x; }
};
struct BFloat16 {
  using Storage = __nv_bfloat16;
  __device__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
struct Float16 {
  using Storage = __half;
  __device__ static float to_float(__half x) { return __half2float(x); }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
};
struct NoModelCopy {
  using Storage = float;  // never dereferenced
};

// Four elements moved by one vector instruction (16 bytes of fp32, 8 of bf16/fp16).
template <typename S>
struct alignas(4 * sizeof(S)) Pack4 {
  S v[4];
};

template <typename S>
__device__ inline bool aligned_for_pack4(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % (4 * sizeof(S)) == 0;
}

// ---- pointer tables --------------------------------------------------------------------
// Pointer slots of one tensor in AdamTable::ptr; the EMAs follow kSlotEma0.
enum Slot { kSlotParam, kSlotGrad, kSlotExpAvg, kSlotExpAvgSq, kSlotStep, kSlotModel, kSlotEma0 };

constexpr int kAdamTableTensors = 400;
struct AdamTableHeader {
  int32_t num_tensors;
  int32_t stride;  // pointers per tensor: kSlotEma0 + number of EMAs
  int32_t chunk_begin[kAdamTableTensors + 1];
  int64_t numel[kAdamTableTensors];
};
constexpr int kAdamTablePointers = static_cast<int>(
    (kArgBudget - sizeof(AdamTableHeader) - sizeof(AdamEmaOptions)) / sizeof(void*));
struct AdamTable : AdamTableHeader {
  void* ptr[kAdamTablePointers];
};
static_assert(sizeof(AdamTable) + sizeof(AdamEmaOptions) <= kArgBudget, "kernel arguments");

constexpr int kNormTableTensors = 1500;
struct NormTable {
  int32_t num_tensors;
  int32_t chunk_begin[kNormTableTensors + 1];
  int64_t numel[kNormTableTensors];
  const void* grad[kNormTableTensors];
};
static_assert(sizeof(NormTable) + 64 <= kArgBudget, "kernel arguments");

constexpr int kStepTableSize = 3900;
struct StepTable {
  int32_t count;
  float* step[kStepTableSize];
};
static_assert(sizeof(StepTable) + 16 <= kArgBudget, "kernel arguments");

// Index of the tensor that owns `chunk`: the last t with chunk_begin[t] <= chunk. The
// host leaves empty tensors out, so every tensor owns at least one chunk.
__device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ inline int find_tensor(const int32_t* chunk_begin, int num_tensors, int chunk) {
  int lo = 0;
  int hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (chunk_begin[mid] <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ---- fused update ----------------------------------------------------------------------
template <typename Grad, typename Model>
__device__ inline void update_element(float* p, const typename Grad::Storage* g, float* m,
                                      float* v, float* const* ema, int num_emas,
                                      const float* rate, const float* one_minus_rate,
                                      typename Model::Storage* model, int64_t i,
                                      const AdamCoefficients& c, float inv_scale,
                                      float clip_factor) {
  const float grad = Grad::to_float(g[i]) * inv_scale * clip_factor;
  float exp_avg = m[i];
  float exp_avg_sq = v[i];
  const float new_p = adamw_element(p[i], grad, exp_avg, exp_avg_sq, c);
  p[i] = new_p;
  m[i] = exp_avg;
  v[i] = exp_avg_sq;
#pragma unroll
  for (int k = 0; k < kMaxEmaRates; ++k) {
    if (k < num_emas) ema[k][i] = ema_element(ema[k][i], new_p, rate[k], one_minus_rate[k]);
  }
  if constexpr (!std::is_same<Model, NoModelCopy>::value) model[i] = Model::from_float(new_p);
}

template <typename Grad, typename Model>
__device__ inline void update_pack4(float* p, const typename Grad::Storage* g, float* m,
                                    float* v, float* const* ema, int num_emas,
                                    const float* rate, const float* one_minus_rate,
                                    typename Model::Storage* model, int64_t i,
                                    const AdamCoefficients& c, float inv_scale,
                                    float clip_factor) {
  using GradPack = Pack4<typename Grad::Storage>;
  Pack4<float> pv = reinterpret_cast<const Pack4<float>*>(p)[i];
  Pack4<float> mv = reinterpret_cast<const Pack4<float>*>(m)[i];
  Pack4<float> vv = reinterpret_cast<const Pack4<float>*>(v)[i];
  const GradPack gv = reinterpret_cast<const GradPack*>(g)[i];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float grad = Grad::to_float(gv.v[j]) * inv_scale * clip_factor;
    pv.v[j] = adamw_element(pv.v[j], grad, mv.v[j], vv.v[j], c);
  }
  reinterpret_cast<Pack4<float>*>(p)[i] = pv;
  reinterpret_cast<Pack4<float>*>(m)[i] = mv;
  reinterpret_cast<Pack4<float>*>(v)[i] = vv;
#pragma unroll
  for (int k = 0; k < kMaxEmaRates; ++k) {
    if (k >= num_emas) break;
    Pack4<float> ev = reinterpret_cast<const Pack4<float>*>(ema[k])[i];
#pragma unroll
    for (int j = 0; j < 4; ++j) ev.v[j] = ema_element(ev.v[j], pv.v[j], rate[k], one_minus_rate[k]);
    reinterpret_cast<Pack4<float>*>(ema[k])[i] = ev;
  }
  if constexpr (!std::is_same<Model, NoModelCopy>::value) {
    Pack4<typename Model::Storage> out;
#pragma unroll
    for (int j = 0; j < 4; ++j) out.v[j] = Model::from_float(pv.v[j]);
    reinterpret_cast<Pack4<typename Model::Storage>*>(model)[i] = out;
  }
}

template <typename Grad, typename Model>
__global__ void __launch_bounds__(kThreads)
    adam_ema_kernel(const __grid_constant__ AdamTable table,
                    const __grid_constant__ AdamEmaOptions options) {
  if (options.found_inf != nullptr && *options.found_inf != 0.0f) return;
  const int t = find_tensor(table.chunk_begin, table.num_tensors, blockIdx.x);
  void* const* slots = table.ptr + static_cast<int64_t>(t) * table.stride;
  const int64_t begin = static_cast<int64_t>(blockIdx.x - table.chunk_begin[t]) * kChunk;
  const int64_t n = min64(kChunk, table.numel[t] - begin);

  // pow() in double once per block, shared by its threads.
  __shared__ AdamCoefficients shared_coefficients;
  if (threadIdx.x == 0) {
    const double step = static_cast<double>(*static_cast<const float*>(slots[kSlotStep])) + 1.0;
    shared_coefficients = adam_coefficients(*options.lr, step, options);
  }
  __syncthreads();
  const AdamCoefficients c = shared_coefficients;
  const float inv_scale = options.inv_scale != nullptr ? *options.inv_scale : 1.0f;
  const float clip_factor = options.clip_factor != nullptr ? *options.clip_factor : 1.0f;

  float rate[kMaxEmaRates];
  float one_minus_rate[kMaxEmaRates];
  float* ema[kMaxEmaRates];
  bool aligned = true;
  // Loops over kMaxEmaRates with a guard unroll fully, keeping these arrays in registers.
#pragma unroll
  for (int k = 0; k < kMaxEmaRates; ++k) {
    if (k >= options.num_emas) break;
    rate[k] = static_cast<float>(options.ema_rates[k]);
    one_minus_rate[k] = static_cast<float>(1.0 - options.ema_rates[k]);
    ema[k] = static_cast<float*>(slots[kSlotEma0 + k]) + begin;
    aligned = aligned && aligned_for_pack4<float>(ema[k]);
  }
  float* p = static_cast<float*>(slots[kSlotParam]) + begin;
  const auto* g = static_cast<const typename Grad::Storage*>(slots[kSlotGrad]) + begin;
  float* m = static_cast<float*>(slots[kSlotExpAvg]) + begin;
  float* v = static_cast<float*>(slots[kSlotExpAvgSq]) + begin;
  auto* model = static_cast<typename Model::Storage*>(slots[kSlotModel]);
  if (model != nullptr) model += begin;
  aligned = aligned && aligned_for_pack4<float>(p) && aligned_for_pack4<float>(m) &&
            aligned_for_pack4<float>(v) && aligned_for_pack4<typename Grad::Storage>(g) &&
            (model == nullptr || aligned_for_pack4<typename Model::Storage>(model));

  // kChunk is a multiple of 4, so a chunk's offset keeps the tensor's alignment.
  const int64_t num_packs = aligned ? n / 4 : 0;
  for (int64_t i = threadIdx.x; i < num_packs; i += kThreads) {
    update_pack4<Grad, Model>(p, g, m, v, ema, options.num_emas, rate, one_minus_rate, model,
                              i, c, inv_scale, clip_factor);
  }
  for (int64_t i = num_packs * 4 + threadIdx.x; i < n; i += kThreads) {
    update_element<Grad, Model>(p, g, m, v, ema, options.num_emas, rate, one_minus_rate,
                                model, i, c, inv_scale, clip_factor);
  }
}

__global__ void increment_steps_kernel(const __grid_constant__ StepTable table,
                                       const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < table.count) *table.step[i] += 1.0f;
}

// ---- gradient norm ---------------------------------------------------------------------
__device__ inline double block_sum(double x) {
  __shared__ double warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return total;  // valid in thread 0 only
}

// Writes this chunk's sum of squares to partial[block] and a NaN probe (x * 0 is NaN
// exactly for non-finite x) to partial[num_partials + block].
template <typename Grad>
__global__ void __launch_bounds__(kThreads)
    grad_sum_sq_kernel(const __grid_constant__ NormTable table, const float* inv_scale_ptr,
                       double* partial, int64_t num_partials) {
  const int t = find_tensor(table.chunk_begin, table.num_tensors, blockIdx.x);
  const int64_t begin = static_cast<int64_t>(blockIdx.x - table.chunk_begin[t]) * kChunk;
  const int64_t n = min64(kChunk, table.numel[t] - begin);
  const auto* g = static_cast<const typename Grad::Storage*>(table.grad[t]) + begin;
  const float inv_scale = inv_scale_ptr != nullptr ? *inv_scale_ptr : 1.0f;

  double acc = 0.0;
  float probe = 0.0f;
  const int64_t num_packs = aligned_for_pack4<typename Grad::Storage>(g) ? n / 4 : 0;
  for (int64_t i = threadIdx.x; i < num_packs; i += kThreads) {
    const Pack4<typename Grad::Storage> gv =
        reinterpret_cast<const Pack4<typename Grad::Storage>*>(g)[i];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float x = Grad::to_float(gv.v[j]) * inv_scale;
      acc += static_cast<double>(x) * static_cast<double>(x);
      probe += x * 0.0f;
    }
  }
  for (int64_t i = num_packs * 4 + threadIdx.x; i < n; i += kThreads) {
    const float x = Grad::to_float(g[i]) * inv_scale;
    acc += static_cast<double>(x) * static_cast<double>(x);
    probe += x * 0.0f;
  }
  const double chunk_sum = block_sum(acc);
  const double chunk_probe = block_sum(static_cast<double>(probe));
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = chunk_sum;
    partial[num_partials + blockIdx.x] = chunk_probe;
  }
}

// One block sums the partials in a fixed order: the result is deterministic.
__global__ void __launch_bounds__(kThreads)
    grad_sum_sq_finish_kernel(const double* partial, int64_t num_partials, float* sum_sq,
                              float* found_inf) {
  double acc = 0.0;
  double probe = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += kThreads) {
    acc += partial[i];
    probe += partial[num_partials + i];
  }
  const double total = block_sum(acc);
  const double total_probe = block_sum(probe);
  if (threadIdx.x == 0) {
    *sum_sq = static_cast<float>(total);
    *found_inf = total_probe != total_probe ? 1.0f : 0.0f;
  }
}

int64_t num_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

template <typename Grad, typename Model>
cudaError_t launch_adam_tables(const AdamEmaTensor* tensors, int64_t num_tensors,
                               const AdamEmaOptions& options, cudaStream_t stream) {
  AdamTable table{};  // zero-filled: starts empty
  table.stride = kSlotEma0 + options.num_emas;
  const int capacity = std::min(kAdamTableTensors, kAdamTablePointers / table.stride);
  auto launch = [&]() -> cudaError_t {
    const int blocks = table.chunk_begin[table.num_tensors];
    if (blocks > 0) {
      adam_ema_kernel<Grad, Model><<<blocks, kThreads, 0, stream>>>(table, options);
    }
    table.num_tensors = 0;
    table.chunk_begin[0] = 0;
    return cudaGetLastError();
  };
  for (int64_t i = 0; i < num_tensors; ++i) {
    const AdamEmaTensor& t = tensors[i];
    if (t.numel == 0) continue;
    if (table.num_tensors == capacity) {
      const cudaError_t err = launch();
      if (err != cudaSuccess) return err;
    }
    const int slot = table.num_tensors;
    void** ptr = table.ptr + slot * table.stride;
    ptr[kSlotParam] = t.param;
    ptr[kSlotGrad] = const_cast<void*>(t.grad);
    ptr[kSlotExpAvg] = t.exp_avg;
    ptr[kSlotExpAvgSq] = t.exp_avg_sq;
    ptr[kSlotStep] = t.step;
    ptr[kSlotModel] = t.model_param;
    for (int k = 0; k < options.num_emas; ++k) ptr[kSlotEma0 + k] = t.ema[k];
    table.numel[slot] = t.numel;
    table.chunk_begin[slot + 1] =
        table.chunk_begin[slot] + static_cast<int32_t>(num_chunks(t.numel));
    table.num_tensors = slot + 1;
  }
  return launch();
}

template <typename Grad>
cudaError_t launch_adam_model_dispatch(const AdamEmaTensor* tensors, int64_t num_tensors,
                                       ElemType model_type, const AdamEmaOptions& options,
                                       cudaStream_t stream) {
  switch (model_type) {
    case ElemType::kBFloat16:
      return launch_adam_tables<Grad, BFloat16>(tensors, num_tensors, options, stream);
    case ElemType::kFloat16:
      return launch_adam_tables<Grad, Float16>(tensors, num_tensors, options, stream);
    default:
      return launch_adam_tables<Grad, NoModelCopy>(tensors, num_tensors, options, stream);
  }
}

cudaError_t launch_increment_steps(const AdamEmaTensor* tensors, int64_t num_tensors,
                                   const float* found_inf, cudaStream_t stream) {
  StepTable table;
  for (int64_t begin = 0; begin < num_tensors; begin += kStepTableSize) {
    table.count = static_cast<int32_t>(std::min<int64_t>(kStepTableSize, num_tensors - begin));
    for (int i = 0; i < table.count; ++i) table.step[i] = tensors[begin + i].step;
    increment_steps_kernel<<<(table.count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        table, found_inf);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename Grad>
cudaError_t launch_grad_norm(const void* const* grads, const int64_t* numels,
                             int64_t num_tensors, const float* inv_scale, float* sum_sq,
                             float* found_inf, double* workspace, cudaStream_t stream) {
  const int64_t num_partials = grad_norm_sq_cuda_workspace(numels, num_tensors) / 2;
  NormTable table{};  // zero-filled: starts empty
  int64_t written = 0;  // partials produced by earlier launches
  auto launch = [&]() -> cudaError_t {
    const int blocks = table.chunk_begin[table.num_tensors];
    if (blocks > 0) {
      // Each launch writes its partials at an offset; the probes live num_partials later.
      grad_sum_sq_kernel<Grad><<<blocks, kThreads, 0, stream>>>(table, inv_scale,
                                                                workspace + written,
                                                                num_partials);
    }
    written += blocks;
    table.num_tensors = 0;
    table.chunk_begin[0] = 0;
    return cudaGetLastError();
  };
  for (int64_t i = 0; i < num_tensors; ++i) {
    if (numels[i] == 0) continue;
    if (table.num_tensors == kNormTableTensors) {
      const cudaError_t err = launch();
      if (err != cudaSuccess) return err;
    }
    const int slot = table.num_tensors;
    table.grad[slot] = grads[i];
    table.numel[slot] = numels[i];
    table.chunk_begin[slot + 1] =
        table.chunk_begin[slot] + static_cast<int32_t>(num_chunks(numels[i]));
    table.num_tensors = slot + 1;
  }
  cudaError_t err = launch();
  if (err != cudaSuccess) return err;
  grad_sum_sq_finish_kernel<<<1, kThreads, 0, stream>>>(workspace, num_partials, sum_sq,
                                                        found_inf);
  return cudaGetLastError();
}

}  // namespace

cudaError_t adam_ema_cuda(const AdamEmaTensor* tensors, int64_t num_tensors,
                          ElemType grad_type, ElemType model_type,
                          const AdamEmaOptions& options, cudaStream_t stream) {
  cudaError_t err;
  switch (grad_type) {
    case ElemType::kBFloat16:
      err = launch_adam_model_dispatch<BFloat16>(tensors, num_tensors, model_type, options,
                                                 stream);
      break;
    case ElemType::kFloat16:
      err = launch_adam_model_dispatch<Float16>(tensors, num_tensors, model_type, options,
                                                stream);
      break;
    default:
      err = launch_adam_model_dispatch<Float32>(tensors, num_tensors, model_type, options,
                                                stream);
  }
  if (err != cudaSuccess) return err;
  // Separate launch: every block of the update reads its tensor's step first.
  return launch_increment_steps(tensors, num_tensors, options.found_inf, stream);
}

int64_t grad_norm_sq_cuda_workspace(const int64_t* numels, int64_t num_tensors) {
  int64_t chunks = 0;
  for (int64_t i = 0; i < num_tensors; ++i) chunks += num_chunks(numels[i]);
  return 2 * chunks;
}

cudaError_t grad_norm_sq_cuda(const void* const* grads, const int64_t* numels,
                              int64_t num_tensors, ElemType grad_type,
                              const float* inv_scale, float* sum_sq, float* found_inf,
                              double* workspace, cudaStream_t stream) {
  switch (grad_type) {
    case ElemType::kBFloat16:
      return launch_grad_norm<BFloat16>(grads, numels, num_tensors, inv_scale, sum_sq,
                                        found_inf, workspace, stream);
    case ElemType::kFloat16:
      return launch_grad_norm<Float16>(grads, numels, num_tensors, inv_scale, sum_sq,
                                       found_inf, workspace, stream);
    default:
      return launch_grad_norm<Float32>(grads, numels, num_tensors, inv_scale, sum_sq,
                                       found_inf, workspace, stream);
  }
}

}  // namespace fastdiff
