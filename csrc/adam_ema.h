// Fused AdamW + multi-rate EMA update: the torch-free interface shared by the CPU kernel,
// the CUDA launcher, the torch binding and the standalone C++ test.
//
// One call updates a list of parameters. Per element it applies AdamW with torch's
// semantics (decoupled weight decay, bias correction, eps added after the square root) and
// then moves each EMA towards the new parameter while it is still in registers:
//     ema_k = rate_k * ema_k + (1 - rate_k) * p_new
// Everything is raw pointers so that this header (and adam_ema_cpu.cpp) builds without torch.
#pragma once

#include <cstdint>

namespace fastdiff {

// Upper bound on the number of EMA rates one update carries (GD uses one to three).
constexpr int kMaxEmaRates = 8;

// Storage type of a gradient or of the low-precision model copy. Master parameters,
// moments and EMAs are always float32.
enum class ElemType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kNone = 3 };

// One parameter tensor and its optimizer state. All arrays hold `numel` contiguous
// elements and live on the same device.
struct AdamEmaTensor {
  float* param;              // fp32 (master) parameter, updated in place
  const void* grad;          // gradient, ElemType given per call
  float* exp_avg;            // first moment
  float* exp_avg_sq;         // second moment
  float* ema[kMaxEmaRates];  // one EMA per rate; only the first num_emas are used
  void* model_param;         // bf16/fp16 copy written from the new parameter; null if none
  float* step;               // steps taken so far; the update uses step + 1, then stores it
  int64_t numel;
};

// Scalars shared by all tensors of one update. The pointers address single float32
// values on the tensors' device, so the values can change between calls (and under CUDA
// graphs) without recompiling anything.
struct AdamEmaOptions {
  const float* lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  int32_t num_emas;
  double ema_rates[kMaxEmaRates];
  const float* inv_scale;    // optional: gradients are multiplied by it first (unscale)
  const float* clip_factor;  // optional: then by this (gradient clipping)
  const float* found_inf;    // optional: nonzero skips the whole update, steps included
};

// CPU update over `num_tensors` tensors: OpenMP over fixed-size chunks, vectorisable inner
// loops. Increments every step counter unless the update was skipped.
void adam_ema_cpu(const AdamEmaTensor* tensors, int64_t num_tensors, ElemType grad_type,
                  ElemType model_type, const AdamEmaOptions& options, int num_threads);

// Sum of squares of the unscaled gradients (grad * inv_scale; inv_scale may be null) over
// all tensors, accumulated in double, and whether any unscaled gradient is non-finite.
// Writes *sum_sq (float32) and *found_inf (1.0f or 0.0f). The chunking is fixed, so the
// result does not depend on the thread count.
void grad_norm_sq_cpu(const void* const* grads, const int64_t* numels, int64_t num_tensors,
                      ElemType grad_type, const float* inv_scale, float* sum_sq,
                      float* found_inf, int num_threads);

}  // namespace fastdiff
