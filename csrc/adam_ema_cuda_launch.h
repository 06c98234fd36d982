// Host entry points of the CUDA kernels (adam_ema_cuda.cu). Needs only the CUDA runtime
// headers, so the kernels compile with plain `nvcc -c` where no CUDA build of torch exists;
// binding_cuda.cpp, built only against a CUDA torch, calls these with tensor data pointers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "adam_ema.h"

namespace fastdiff {

// Fused AdamW + EMA update of all tensors, enqueued on `stream`: one launch per up to
// ~400 tensors (the pointer tables travel in the kernel arguments), then one launch that
// advances the step counters unless *options.found_inf is nonzero. Every pointer in
// `tensors` and in `options` is device memory; `tensors` itself is a host array.
cudaError_t adam_ema_cuda(const AdamEmaTensor* tensors, int64_t num_tensors,
                          ElemType grad_type, ElemType model_type,
                          const AdamEmaOptions& options, cudaStream_t stream);

// Number of doubles of device workspace grad_norm_sq_cuda needs for these tensor sizes.
int64_t grad_norm_sq_cuda_workspace(const int64_t* numels, int64_t num_tensors);

// Sum of squares of grad * inv_scale over all tensors (double accumulation, fixed order:
// deterministic) into *sum_sq, and 1.0f into *found_inf if any value is non-finite, else
// 0.0f. `grads` is a host array of device pointers; inv_scale may be null.
cudaError_t grad_norm_sq_cuda(const void* const* grads, const int64_t* numels,
                              int64_t num_tensors, ElemType grad_type,
                              const float* inv_scale, float* sum_sq, float* found_inf,
                              double* workspace, cudaStream_t stream);

}  // namespace fastdiff
