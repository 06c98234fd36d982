// Standalone test of the CPU kernels (no torch): the fused update against a scalar
// reference loop, the bf16/fp16 conversions against independent references, the
// found-inf skip, and the gradient-norm pass. Run by ctest; exits non-zero on failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "adam_ema.h"
#include "adam_ema_math.h"

using fastdiff::AdamEmaOptions;
using fastdiff::AdamEmaTensor;
using fastdiff::ElemType;

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                      \
  do {                                                         \
    if (!(cond)) {                                             \
      ++failures;                                              \
      if (failures <= 20) {                                    \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);       \
        std::printf(__VA_ARGS__);                              \
        std::printf("\n");                                     \
      }                                                        \
    }                                                          \
  } while (0)

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ---- independent conversion references (exact arithmetic in double) -----------------
double half_value(uint16_t h) {
  const int exponent = (h >> 10) & 0x1f;
  const int mantissa = h & 0x3ff;
  const double sign = (h & 0x8000) ? -1.0 : 1.0;
  if (exponent == 0x1f) return mantissa ? NAN : sign * INFINITY;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  return sign * std::ldexp(1024 + mantissa, exponent - 25);
}

float bfloat16_value(uint16_t b) { return from_bits(uint32_t{b} << 16); }

// Nearest representable value, ties to the even bit pattern. `value_of` maps the
// non-negative finite patterns [0, max_bits] monotonically to values.
template <typename ValueOf>
uint16_t round_nearest_even(float f, uint16_t max_bits, double overflow_threshold,
                            uint16_t inf_bits, ValueOf value_of) {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const double a = std::fabs(static_cast<double>(f));
  if (a >= overflow_threshold) return sign | inf_bits;
  uint16_t lo = 0;
  uint16_t hi = max_bits;
  while (hi - lo > 1) {  // largest pattern with value <= a
    const uint16_t mid = static_cast<uint16_t>((lo + hi) / 2);
    if (value_of(mid) <= a) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  if (value_of(hi) <= a) lo = hi;
  if (lo == max_bits) return sign | lo;
  const double down = a - value_of(lo);
  const double up = value_of(static_cast<uint16_t>(lo + 1)) - a;
  const bool round_up = up < down || (up == down && (lo & 1));
  return sign | static_cast<uint16_t>(lo + (round_up ? 1 : 0));
}

uint16_t half_reference(float f) {
  if (std::isnan(f)) return 0x7e00;
  // 65520 = 65504 + half an ulp: it and everything above round to infinity.
  return round_nearest_even(f, 0x7bff, 65520.0, 0x7c00, half_value);
}

uint16_t bfloat16_reference(float f) {
  if (std::isnan(f)) return 0x7fc0;
  const double max_finite = bfloat16_value(0x7f7f);
  const double overflow = max_finite + std::ldexp(1.0, 127 - 8);  // half an ulp above
  return round_nearest_even(f, 0x7f7f, overflow, 0x7f80,
                            [](uint16_t b) { return static_cast<double>(bfloat16_value(b)); });
}

// ---- fixtures ------------------------------------------------------------------------
struct TensorData {
  std::vector<float> param, exp_avg, exp_avg_sq;
  std::vector<std::vector<float>> ema;
  std::vector<uint8_t> grad;   // raw storage of the gradient's element type
  std::vector<uint16_t> model;  // bf16/fp16 copy
  float step = 0.0f;
};

size_t elem_size(ElemType t) { return t == ElemType::kFloat32 ? 4 : 2; }

float decode(ElemType t, const uint8_t* raw, int64_t i) {
  if (t == ElemType::kFloat32) {
    float f;
    std::memcpy(&f, raw + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, raw + 2 * i, 2);
  return t == ElemType::kBFloat16 ? bfloat16_value(h) : static_cast<float>(half_value(h));
}

void encode(ElemType t, uint8_t* raw, int64_t i, float value) {
  if (t == ElemType::kFloat32) {
    std::memcpy(raw + 4 * i, &value, 4);
    return;
  }
  const uint16_t h = t == ElemType::kBFloat16 ? bfloat16_reference(value) : half_reference(value);
  std::memcpy(raw + 2 * i, &h, 2);
}

std::vector<TensorData> make_tensors(const std::vector<int64_t>& sizes, int num_emas,
                                     ElemType grad_type, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.3f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<TensorData> data(sizes.size());
  for (size_t t = 0; t < sizes.size(); ++t) {
    TensorData& d = data[t];
    const int64_t n = sizes[t];
    d.param.resize(n);
    d.exp_avg.resize(n);
    d.exp_avg_sq.resize(n);
    d.grad.resize(n * elem_size(grad_type));
    d.model.assign(n, 0);
    d.ema.assign(num_emas, std::vector<float>(n));
    for (int64_t i = 0; i < n; ++i) {
      d.param[i] = normal(rng);
      d.exp_avg[i] = 0.1f * normal(rng);
      d.exp_avg_sq[i] = 0.01f * uniform(rng);
      encode(grad_type, d.grad.data(), i, normal(rng));
      for (auto& e : d.ema) e[i] = normal(rng);
    }
    d.step = static_cast<float>(t % 5);  // tensors at different steps
  }
  return data;
}

std::vector<AdamEmaTensor> views(std::vector<TensorData>& data, bool model_copy) {
  std::vector<AdamEmaTensor> out(data.size());
  for (size_t t = 0; t < data.size(); ++t) {
    TensorData& d = data[t];
    AdamEmaTensor& v = out[t];
    v.param = d.param.data();
    v.grad = d.grad.data();
    v.exp_avg = d.exp_avg.data();
    v.exp_avg_sq = d.exp_avg_sq.data();
    for (int k = 0; k < fastdiff::kMaxEmaRates; ++k) {
      v.ema[k] = k < static_cast<int>(d.ema.size()) ? d.ema[k].data() : nullptr;
    }
    v.model_param = model_copy ? d.model.data() : nullptr;
    v.step = &d.step;
    v.numel = static_cast<int64_t>(d.param.size());
  }
  return out;
}

bool close(float actual, float expected) {
  return std::fabs(actual - expected) <= 1e-7f + 1e-6f * std::fabs(expected);
}

// ---- tests ---------------------------------------------------------------------------
// The fused update against a straightforward scalar loop over the same formulas.
void test_update_matches_scalar_reference(ElemType grad_type, ElemType model_type,
                                          int num_emas, int num_threads) {
  std::mt19937 rng(1234 + static_cast<int>(grad_type) * 7 + num_emas);
  const std::vector<int64_t> sizes = {0, 1, 2, 3, 4, 5, 7, 8, 15, 17, 1023, 1024, 1025,
                                      65535, 65536, 65537, 140001};
  std::vector<TensorData> data = make_tensors(sizes, num_emas, grad_type, rng);
  const std::vector<TensorData> before = data;

  const float lr = 1e-3f;
  const float inv_scale = 0.25f;
  const float clip = 0.75f;
  AdamEmaOptions options{};
  options.lr = &lr;
  options.beta1 = 0.9;
  options.beta2 = 0.999;
  options.eps = 1e-8;
  options.weight_decay = 0.05;
  options.num_emas = num_emas;
  const double rates[] = {0.9999, 0.99, 0.5};
  for (int k = 0; k < num_emas; ++k) options.ema_rates[k] = rates[k];
  options.inv_scale = &inv_scale;
  options.clip_factor = &clip;

  std::vector<AdamEmaTensor> tensors = views(data, model_type != ElemType::kNone);
  fastdiff::adam_ema_cpu(tensors.data(), static_cast<int64_t>(tensors.size()), grad_type,
                         model_type, options, num_threads);

  for (size_t t = 0; t < sizes.size(); ++t) {
    const TensorData& b = before[t];
    const TensorData& d = data[t];
    const fastdiff::AdamCoefficients c =
        fastdiff::adam_coefficients(lr, static_cast<double>(b.step) + 1.0, options);
    EXPECT(d.step == b.step + 1.0f, "step of tensor %zu: %f", t, d.step);
    for (int64_t i = 0; i < sizes[t]; ++i) {
      const float g = decode(grad_type, b.grad.data(), i) * inv_scale * clip;
      float m = b.exp_avg[i];
      float v = b.exp_avg_sq[i];
      float p = b.param[i] * c.decay;
      m = m + c.lerp_weight * (g - m);
      v = v * c.beta2 + c.one_minus_beta2 * g * g;
      p = p + c.neg_step_size * m / (std::sqrt(v) / c.bias_correction2_sqrt + c.eps);
      EXPECT(close(d.param[i], p), "param t=%zu i=%lld: %.9g vs %.9g", t,
             static_cast<long long>(i), d.param[i], p);
      EXPECT(close(d.exp_avg[i], m), "exp_avg t=%zu i=%lld", t, static_cast<long long>(i));
      EXPECT(close(d.exp_avg_sq[i], v), "exp_avg_sq t=%zu i=%lld", t,
             static_cast<long long>(i));
      for (int k = 0; k < num_emas; ++k) {
        const float rate = static_cast<float>(rates[k]);
        const float expected = b.ema[k][i] * rate + static_cast<float>(1.0 - rates[k]) * p;
        EXPECT(close(d.ema[k][i], expected), "ema%d t=%zu i=%lld", k, t,
               static_cast<long long>(i));
      }
      if (model_type != ElemType::kNone) {
        // The copy rounds the kernel's own new parameter: compare bit-exactly.
        const uint16_t expected = model_type == ElemType::kBFloat16
                                      ? bfloat16_reference(d.param[i])
                                      : half_reference(d.param[i]);
        EXPECT(d.model[i] == expected, "model copy t=%zu i=%lld: %04x vs %04x", t,
               static_cast<long long>(i), d.model[i], expected);
      }
    }
  }
}

// Every bf16/fp16 bit pattern decodes exactly, and values chosen around every rounding
// boundary (ties, subnormals, overflow) encode exactly as round-to-nearest-even.
void test_conversions(ElemType type) {
  const int64_t n = 65536;
  std::vector<int64_t> sizes = {n};
  std::mt19937 rng(7);
  std::vector<TensorData> data = make_tensors(sizes, 0, type, rng);
  TensorData& d = data[0];
  std::vector<uint16_t> patterns(n);
  for (int64_t i = 0; i < n; ++i) {
    patterns[i] = static_cast<uint16_t>(i);
    std::memcpy(d.grad.data() + 2 * i, &patterns[i], 2);
  }
  // lr = 0, beta1 = 0: exp_avg becomes the decoded gradient, the parameter stays.
  std::vector<float> probes;
  for (int64_t i = 0; i < n; ++i) {
    const double value = type == ElemType::kFloat16 ? half_value(static_cast<uint16_t>(i))
                                                    : bfloat16_value(static_cast<uint16_t>(i));
    if (std::isnan(value)) continue;
    const float f = static_cast<float>(value);
    probes.push_back(f);
    probes.push_back(std::nextafter(f, INFINITY));
    probes.push_back(std::nextafter(f, -INFINITY));
  }
  for (int64_t i = 0; i < n - 1; ++i) {  // exact midpoints between neighbours: ties
    const double lo = type == ElemType::kFloat16 ? half_value(static_cast<uint16_t>(i))
                                                 : bfloat16_value(static_cast<uint16_t>(i));
    const double hi = type == ElemType::kFloat16 ? half_value(static_cast<uint16_t>(i + 1))
                                                 : bfloat16_value(static_cast<uint16_t>(i + 1));
    if (std::isfinite(lo) && std::isfinite(hi) && (i & 0x7fff) != 0x7fff) {
      probes.push_back(static_cast<float>((lo + hi) / 2));
    }
  }
  probes.push_back(INFINITY);
  probes.push_back(-INFINITY);
  probes.push_back(3.0e38f);
  probes.push_back(1e-30f);
  probes.push_back(-0.0f);

  std::vector<int64_t> probe_sizes = {static_cast<int64_t>(probes.size())};
  std::vector<TensorData> probe_data = make_tensors(probe_sizes, 0, type, rng);
  probe_data[0].param = probes;
  std::fill(probe_data[0].exp_avg.begin(), probe_data[0].exp_avg.end(), 0.0f);
  std::fill(probe_data[0].exp_avg_sq.begin(), probe_data[0].exp_avg_sq.end(), 0.0f);
  std::fill(d.exp_avg.begin(), d.exp_avg.end(), 0.0f);

  const float lr = 0.0f;
  AdamEmaOptions options{};
  options.lr = &lr;
  options.beta1 = 0.0;
  options.beta2 = 0.999;
  options.eps = 1e-8;
  options.num_emas = 0;

  std::vector<AdamEmaTensor> decode_view = views(data, false);
  fastdiff::adam_ema_cpu(decode_view.data(), 1, type, ElemType::kNone, options, 2);
  for (int64_t i = 0; i < n; ++i) {
    const double expected = type == ElemType::kFloat16 ? half_value(patterns[i])
                                                       : bfloat16_value(patterns[i]);
    if (std::isnan(expected)) {
      EXPECT(std::isnan(d.exp_avg[i]), "decode %04llx: NaN expected",
             static_cast<long long>(i));
    } else if (std::isfinite(expected)) {
      EXPECT(d.exp_avg[i] == static_cast<float>(expected), "decode %04llx: %.9g vs %.9g",
             static_cast<long long>(i), d.exp_avg[i], expected);
    }
  }

  std::vector<AdamEmaTensor> encode_view = views(probe_data, true);
  fastdiff::adam_ema_cpu(encode_view.data(), 1, type, type, options, 2);
  for (size_t i = 0; i < probes.size(); ++i) {
    // With lr = 0 the parameter keeps its value (only the sign of a zero may change).
    const float p = probe_data[0].param[i];
    EXPECT(p == probes[i], "lr = 0 moved %.9g to %.9g", probes[i], p);
    const uint16_t expected = type == ElemType::kFloat16 ? half_reference(p)
                                                         : bfloat16_reference(p);
    EXPECT(probe_data[0].model[i] == expected, "encode %.9g: %04x vs %04x", p,
           probe_data[0].model[i], expected);
  }
}

void test_found_inf_skips_bit_exactly() {
  std::mt19937 rng(99);
  std::vector<TensorData> data = make_tensors({5, 70000}, 2, ElemType::kFloat32, rng);
  const std::vector<TensorData> before = data;
  const float lr = 1e-3f;
  const float found_inf = 1.0f;
  AdamEmaOptions options{};
  options.lr = &lr;
  options.beta1 = 0.9;
  options.beta2 = 0.999;
  options.eps = 1e-8;
  options.weight_decay = 0.1;
  options.num_emas = 2;
  options.ema_rates[0] = 0.99;
  options.ema_rates[1] = 0.9;
  options.found_inf = &found_inf;
  std::vector<AdamEmaTensor> tensors = views(data, true);
  fastdiff::adam_ema_cpu(tensors.data(), 2, ElemType::kFloat32, ElemType::kBFloat16, options, 2);
  for (size_t t = 0; t < data.size(); ++t) {
    const size_t bytes = data[t].param.size() * 4;
    EXPECT(std::memcmp(data[t].param.data(), before[t].param.data(), bytes) == 0, "param");
    EXPECT(std::memcmp(data[t].exp_avg.data(), before[t].exp_avg.data(), bytes) == 0, "m");
    EXPECT(std::memcmp(data[t].exp_avg_sq.data(), before[t].exp_avg_sq.data(), bytes) == 0,
           "v");
    for (int k = 0; k < 2; ++k) {
      EXPECT(std::memcmp(data[t].ema[k].data(), before[t].ema[k].data(), bytes) == 0, "ema");
    }
    EXPECT(data[t].model == before[t].model, "model copy written on a skipped step");
    EXPECT(data[t].step == before[t].step, "step advanced on a skipped step");
  }
}

void test_grad_norm(ElemType type) {
  std::mt19937 rng(5);
  const std::vector<int64_t> sizes = {0, 1, 3, 4097, 65536, 65537, 200003};
  std::vector<TensorData> data = make_tensors(sizes, 0, type, rng);
  std::vector<const void*> grads;
  std::vector<int64_t> numels;
  double expected = 0.0;
  const float inv_scale = 1.0f / 1024.0f;
  for (size_t t = 0; t < sizes.size(); ++t) {
    grads.push_back(data[t].grad.data());
    numels.push_back(sizes[t]);
    for (int64_t i = 0; i < sizes[t]; ++i) {
      const float x = decode(type, data[t].grad.data(), i) * inv_scale;
      expected += static_cast<double>(x) * x;
    }
  }
  float sum_sq[3];
  float found_inf[3];
  const int thread_counts[3] = {1, 2, 3};
  for (int r = 0; r < 3; ++r) {
    fastdiff::grad_norm_sq_cpu(grads.data(), numels.data(), static_cast<int64_t>(sizes.size()),
                               type, &inv_scale, &sum_sq[r], &found_inf[r], thread_counts[r]);
    EXPECT(found_inf[r] == 0.0f, "found_inf on finite grads");
    EXPECT(std::fabs(sum_sq[r] - expected) <= 1e-6 * expected, "sum_sq %.9g vs %.9g",
           sum_sq[r], expected);
  }
  EXPECT(to_bits(sum_sq[0]) == to_bits(sum_sq[1]) && to_bits(sum_sq[1]) == to_bits(sum_sq[2]),
         "sum_sq depends on the thread count");

  // One non-finite value anywhere (first, chunk boundary, last) is found.
  const float specials[2] = {INFINITY, NAN};
  const int64_t positions[3] = {0, 65536, 200002};
  for (float special : specials) {
    for (int64_t pos : positions) {
      std::vector<TensorData> copy = data;
      TensorData& target = pos == 0 ? copy[1] : copy[6];
      encode(type, target.grad.data(), pos == 0 ? 0 : pos, special);
      std::vector<const void*> ptrs;
      for (auto& d : copy) ptrs.push_back(d.grad.data());
      float s = 0.0f;
      float f = 0.0f;
      fastdiff::grad_norm_sq_cpu(ptrs.data(), numels.data(), static_cast<int64_t>(sizes.size()),
                                 type, nullptr, &s, &f, 2);
      EXPECT(f == 1.0f, "non-finite %f at %lld not found", special, static_cast<long long>(pos));
    }
  }
}

}  // namespace

int main() {
  const ElemType grad_types[] = {ElemType::kFloat32, ElemType::kBFloat16, ElemType::kFloat16};
  const ElemType model_types[] = {ElemType::kNone, ElemType::kBFloat16, ElemType::kFloat16};
  for (ElemType g : grad_types) {
    for (ElemType m : model_types) test_update_matches_scalar_reference(g, m, 1, 2);
  }
  for (int k : {0, 2, 3}) {
    test_update_matches_scalar_reference(ElemType::kFloat32, ElemType::kNone, k, 3);
  }
  test_update_matches_scalar_reference(ElemType::kBFloat16, ElemType::kBFloat16, 2, 1);
  test_conversions(ElemType::kBFloat16);
  test_conversions(ElemType::kFloat16);
  test_found_inf_skips_bit_exactly();
  for (ElemType g : grad_types) test_grad_norm(g);
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all adam_ema CPU checks passed\n");
  return 0;
}
