// CPU kernels of the fused AdamW + EMA update and of the gradient-norm pass.
//
// Work is split into fixed chunks of one tensor each, scheduled over OpenMP threads. Inside
// a chunk the update runs block by block: one vectorisable loop does AdamW for the block,
// then one loop per EMA rate re-reads the new parameters from L1 instead of from memory.
// Build with -O3 -fopenmp -fno-math-errno: without the last flag GCC keeps sqrtf scalar
// (it must be able to set errno) and the update loop runs about 3x slower.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "adam_ema.h"
#include "adam_ema_math.h"

namespace fastdiff {
namespace {

// Elements per OpenMP work item: large enough to amortise scheduling, small enough that
// 200 tensors of ~100k elements still balance over many threads.
constexpr int64_t kChunk = int64_t{1} << 16;
// Elements per inner block: 4 KiB of new parameters stay in L1 while the EMA loops run.
constexpr int64_t kBlock = 1024;

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// Element types as load/store policies. Conversions round to nearest even, bit-exactly as
// torch's .to(dtype), and are written branch-free (selects) so that loops vectorise.
struct Float32 {
  using Storage = float;
  static float load(float x) { return x; }
};

struct BFloat16 {
  using Storage = uint16_t;
  static float load(uint16_t h) { return bits_to_float(uint32_t{h} << 16); }
  static uint16_t store(float f) {
    const uint32_t u = float_to_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    // torch turns every NaN into the canonical 0x7fc0 (rounding could carry it to inf).
    return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
  }
};

struct Float16 {
  using Storage = uint16_t;
  static float load(uint16_t h) {
    const uint32_t sign = uint32_t{h & 0x8000u} << 16;
    const uint32_t magnitude = h & 0x7fffu;
    // Placing exponent and mantissa at their float positions and scaling by 2^112
    // rebiases the exponent (15 -> 127); the product also normalises subnormals exactly.
    const uint32_t finite = float_to_bits(bits_to_float(magnitude << 13) * 0x1p112f);
    const uint32_t special = (magnitude << 13) | 0x7f800000u;  // inf, NaN with payload
    return bits_to_float((magnitude >= 0x7c00u ? special : finite) | sign);
  }
  static uint16_t store(float f) {
    const uint32_t u = float_to_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    // Normal halves: rebias the exponent (127 -> 15), round the 13 dropped bits to even;
    // a carry out of the mantissa correctly bumps the exponent.
    const uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
    // Below 2^-14 the half is subnormal with spacing 2^-24, which is the float spacing in
    // [0.5, 1): adding 0.5 lets the FPU round, and the low bits are the half mantissa.
    const uint32_t subnormal = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
    uint32_t h = a < 0x38800000u ? subnormal : normal;
    h = a >= 0x477ff000u ? 0x7c00u : h;  // 65520 and above round to infinity
    h = a > 0x7f800000u ? 0x7e00u : h;   // NaN
    return static_cast<uint16_t>(h | sign);
  }
};

struct NoModelCopy {
  using Storage = void;
};

struct EmaCoefficients {
  int count;
  float rate[kMaxEmaRates];
  float one_minus_rate[kMaxEmaRates];
};

template <typename Grad>
void adamw_block(float* __restrict p, const typename Grad::Storage* __restrict g,
                 float* __restrict m, float* __restrict v, int64_t n,
                 const AdamCoefficients& coefficients, float inv_scale, float clip_factor) {
  // A local copy: through the reference GCC cannot prove the coefficients loop-invariant
  // and leaves the loop scalar.
  const AdamCoefficients c = coefficients;
  for (int64_t i = 0; i < n; ++i) {
    // Unscale, then clip: the same two roundings as GradScaler.unscale_ + clip_grad_norm_.
    const float grad = Grad::load(g[i]) * inv_scale * clip_factor;
    float exp_avg = m[i];
    float exp_avg_sq = v[i];
    p[i] = adamw_element(p[i], grad, exp_avg, exp_avg_sq, c);
    m[i] = exp_avg;
    v[i] = exp_avg_sq;
  }
}

void ema_block(float* __restrict ema, const float* __restrict p, int64_t n, float rate,
               float one_minus_rate) {
  for (int64_t i = 0; i < n; ++i) ema[i] = ema_element(ema[i], p[i], rate, one_minus_rate);
}

template <typename Model>
void copy_block(typename Model::Storage* __restrict out, const float* __restrict p,
                int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = Model::store(p[i]);
}

template <typename Grad, typename Model>
void update_range(const AdamEmaTensor& t, int64_t begin, int64_t end,
                  const AdamCoefficients& c, const EmaCoefficients& e, float inv_scale,
                  float clip_factor) {
  const auto* grad = static_cast<const typename Grad::Storage*>(t.grad);
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    adamw_block<Grad>(t.param + b, grad + b, t.exp_avg + b, t.exp_avg_sq + b, n, c,
                      inv_scale, clip_factor);
    for (int k = 0; k < e.count; ++k) {
      ema_block(t.ema[k] + b, t.param + b, n, e.rate[k], e.one_minus_rate[k]);
    }
    if constexpr (!std::is_same_v<Model, NoModelCopy>) {
      copy_block<Model>(static_cast<typename Model::Storage*>(t.model_param) + b,
                        t.param + b, n);
    }
  }
}

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

std::vector<Chunk> make_chunks(const int64_t* numels, int64_t num_tensors) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < num_tensors; ++t) {
    for (int64_t b = 0; b < numels[t]; b += kChunk) {
      chunks.push_back({t, b, std::min(numels[t], b + kChunk)});
    }
  }
  return chunks;
}

template <typename Grad, typename Model>
void adam_ema_typed(const AdamEmaTensor* tensors, int64_t num_tensors,
                    const AdamEmaOptions& options, int num_threads) {
  const double lr = *options.lr;
  const float inv_scale = options.inv_scale ? *options.inv_scale : 1.0f;
  const float clip_factor = options.clip_factor ? *options.clip_factor : 1.0f;

  std::vector<AdamCoefficients> coefficients(num_tensors);
  std::vector<int64_t> numels(num_tensors);
  for (int64_t t = 0; t < num_tensors; ++t) {
    coefficients[t] = adam_coefficients(lr, static_cast<double>(*tensors[t].step) + 1.0,
                                        options);
    numels[t] = tensors[t].numel;
  }
  EmaCoefficients ema;
  ema.count = options.num_emas;
  for (int k = 0; k < options.num_emas; ++k) {
    ema.rate[k] = static_cast<float>(options.ema_rates[k]);
    ema.one_minus_rate[k] = static_cast<float>(1.0 - options.ema_rates[k]);
  }

  const std::vector<Chunk> chunks = make_chunks(numels.data(), num_tensors);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_chunks > 1)
  for (int64_t i = 0; i < num_chunks; ++i) {
    const Chunk& chunk = chunks[i];
    update_range<Grad, Model>(tensors[chunk.tensor], chunk.begin, chunk.end,
                              coefficients[chunk.tensor], ema, inv_scale, clip_factor);
  }
}

template <typename Grad>
void adam_ema_model_dispatch(const AdamEmaTensor* tensors, int64_t num_tensors,
                             ElemType model_type, const AdamEmaOptions& options,
                             int num_threads) {
  switch (model_type) {
    case ElemType::kBFloat16:
      return adam_ema_typed<Grad, BFloat16>(tensors, num_tensors, options, num_threads);
    case ElemType::kFloat16:
      return adam_ema_typed<Grad, Float16>(tensors, num_tensors, options, num_threads);
    default:
      return adam_ema_typed<Grad, NoModelCopy>(tensors, num_tensors, options, num_threads);
  }
}

template <typename Grad>
void sum_sq_chunk(const typename Grad::Storage* __restrict g, int64_t n, float inv_scale,
                  double* sum_sq, bool* non_finite) {
  double acc = 0.0;
  // x * 0 is 0 for finite x and NaN for inf/NaN: a vectorisable non-finite test.
  float nan_probe = 0.0f;
#pragma omp simd reduction(+ : acc, nan_probe)
  for (int64_t i = 0; i < n; ++i) {
    const float x = Grad::load(g[i]) * inv_scale;
    acc += static_cast<double>(x) * static_cast<double>(x);
    nan_probe += x * 0.0f;
  }
  *sum_sq = acc;
  *non_finite = nan_probe != nan_probe;
}

template <typename Grad>
void grad_norm_sq_typed(const void* const* grads, const int64_t* numels, int64_t num_tensors,
                        float inv_scale, float* sum_sq, float* found_inf, int num_threads) {
  const std::vector<Chunk> chunks = make_chunks(numels, num_tensors);
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(num_chunks);
  // bool vectors are bit-packed: not safe to write from several threads.
  std::vector<unsigned char> bad(num_chunks);
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_chunks > 1)
  for (int64_t i = 0; i < num_chunks; ++i) {
    const Chunk& c = chunks[i];
    const auto* g = static_cast<const typename Grad::Storage*>(grads[c.tensor]) + c.begin;
    bool chunk_bad = false;
    sum_sq_chunk<Grad>(g, c.end - c.begin, inv_scale, &partial[i], &chunk_bad);
    bad[i] = chunk_bad;
  }
  // Summed in chunk order, so the result is independent of the thread count.
  double total = 0.0;
  bool any_bad = false;
  for (int64_t i = 0; i < num_chunks; ++i) {
    total += partial[i];
    any_bad = any_bad || bad[i];
  }
  *sum_sq = static_cast<float>(total);
  *found_inf = any_bad ? 1.0f : 0.0f;
}

}  // namespace

void adam_ema_cpu(const AdamEmaTensor* tensors, int64_t num_tensors, ElemType grad_type,
                  ElemType model_type, const AdamEmaOptions& options, int num_threads) {
  if (options.found_inf != nullptr && *options.found_inf != 0.0f) return;
  switch (grad_type) {
    case ElemType::kBFloat16:
      adam_ema_model_dispatch<BFloat16>(tensors, num_tensors, model_type, options,
                                        num_threads);
      break;
    case ElemType::kFloat16:
      adam_ema_model_dispatch<Float16>(tensors, num_tensors, model_type, options,
                                       num_threads);
      break;
    default:
      adam_ema_model_dispatch<Float32>(tensors, num_tensors, model_type, options,
                                       num_threads);
  }
  for (int64_t t = 0; t < num_tensors; ++t) *tensors[t].step += 1.0f;
}

void grad_norm_sq_cpu(const void* const* grads, const int64_t* numels, int64_t num_tensors,
                      ElemType grad_type, const float* inv_scale, float* sum_sq,
                      float* found_inf, int num_threads) {
  const float scale = inv_scale ? *inv_scale : 1.0f;
  switch (grad_type) {
    case ElemType::kBFloat16:
      return grad_norm_sq_typed<BFloat16>(grads, numels, num_tensors, scale, sum_sq,
                                          found_inf, num_threads);
    case ElemType::kFloat16:
      return grad_norm_sq_typed<Float16>(grads, numels, num_tensors, scale, sum_sq,
                                         found_inf, num_threads);
    default:
      return grad_norm_sq_typed<Float32>(grads, numels, num_tensors, scale, sum_sq,
                                         found_inf, num_threads);
  }
}

}  // namespace fastdiff
