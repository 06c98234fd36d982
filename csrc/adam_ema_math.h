// Per-element AdamW and EMA arithmetic shared by the CPU and CUDA kernels, so both follow
// one definition of the math. Operation order mirrors torch.optim.AdamW (single-tensor
// path) and guided-diffusion's EMA update, so results agree up to FMA contraction.
#pragma once

#include <cmath>

#include "adam_ema.h"

#if defined(__CUDACC__)
#define FASTDIFF_HOST_DEVICE __host__ __device__
#else
#define FASTDIFF_HOST_DEVICE
#endif

namespace fastdiff {

// Coefficients of one tensor's update, rounded to float once per tensor (or per CUDA
// block) from double, as torch rounds its Python-float scalars.
struct AdamCoefficients {
  float decay;                  // 1 - lr * weight_decay
  float lerp_weight;            // 1 - beta1: torch moves exp_avg with lerp_
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  float eps;
  float neg_step_size;          // -lr / (1 - beta1^t)
};

// `step` is the number of this update (1 for the first).
FASTDIFF_HOST_DEVICE inline AdamCoefficients adam_coefficients(double lr, double step,
                                                               const AdamEmaOptions& o) {
  AdamCoefficients c;
  c.decay = static_cast<float>(1.0 - lr * o.weight_decay);
  c.lerp_weight = static_cast<float>(1.0 - o.beta1);
  c.beta2 = static_cast<float>(o.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - o.beta2);
  c.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(o.beta2, step)));
  c.eps = static_cast<float>(o.eps);
  c.neg_step_size = static_cast<float>(-lr / (1.0 - pow(o.beta1, step)));
  return c;
}

// torch's lerp: the formula switches at weight 0.5 to stay exact at both ends.
FASTDIFF_HOST_DEVICE inline float torch_lerp(float start, float end, float weight) {
  const float diff = end - start;
  return weight < 0.5f ? start + weight * diff : end - diff * (1.0f - weight);
}

// One AdamW step of one element; returns the new parameter and updates the moments.
FASTDIFF_HOST_DEVICE inline float adamw_element(float p, float g, float& m, float& v,
                                                const AdamCoefficients& c) {
  p = p * c.decay;
  m = torch_lerp(m, g, c.lerp_weight);
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / c.bias_correction2_sqrt + c.eps;
  return p + c.neg_step_size * m / denom;
}

// guided-diffusion's EMA: ema.mul_(rate).add_(p, alpha=1 - rate).
FASTDIFF_HOST_DEVICE inline float ema_element(float ema, float p, float rate,
                                              float one_minus_rate) {
  return ema * rate + one_minus_rate * p;
}

}  // namespace fastdiff
