// Argument checking and pointer packing shared by the CPU/Meta binding (binding.cpp) and
// the CUDA binding (binding_cuda.cpp): one place decides what a valid call is.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

#include "adam_ema.h"

namespace fastdiff {

inline ElemType elem_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ElemType::kFloat32;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    case at::kHalf:
      return ElemType::kFloat16;
    default:
      return ElemType::kNone;
  }
}

// Checks shared by every tensor of a list: device, layout, dtype, size.
struct ListCheck {
  const char* op;
  at::Device device;

  void tensor(const at::Tensor& t, const std::string& name,
              const std::vector<at::ScalarType>& dtypes) const {
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(),
                      " but the parameters are on ", device);
    bool dtype_ok = false;
    for (at::ScalarType d : dtypes) dtype_ok = dtype_ok || t.scalar_type() == d;
    if (!dtype_ok) {
      std::string allowed;
      for (at::ScalarType d : dtypes) {
        allowed += (allowed.empty() ? "" : " or ") + std::string(c10::toString(d));
      }
      TORCH_CHECK_TYPE(false, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
                       allowed);
    }
    TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " is not contiguous");
  }

  void same_shape(const at::Tensor& t, const std::string& name, const at::Tensor& ref,
                  const std::string& ref_name) const {
    TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " has shape ", t.sizes(),
                      " but ", ref_name, " has shape ", ref.sizes());
  }

  void scalar(const at::Tensor& t, const std::string& name) const {
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(),
                      " but the parameters are on ", device);
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name,
                     " must be a float32 tensor, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.numel() == 1, op, ": ", name, " must hold one value, got ",
                      t.numel());
  }
};

inline std::string indexed(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

// Validates an adam_ema_ call; returns the gradient and model-copy element types.
inline std::pair<ElemType, ElemType> check_adam_ema(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList emas, at::TensorList model_params,
    at::TensorList steps, const at::Tensor& lr, c10::ArrayRef<double> ema_rates,
    const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& clip_factor,
    const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "fastdiff.adam_ema_";
  const size_t n = params.size();
  const size_t k = ema_rates.size();
  TORCH_CHECK_VALUE(k <= static_cast<size_t>(kMaxEmaRates), op, ": at most ", kMaxEmaRates,
                    " EMA rates are supported, got ", k);
  for (double rate : ema_rates) {
    TORCH_CHECK_VALUE(rate >= 0.0 && rate <= 1.0, op, ": EMA rate ", rate,
                      " is outside [0, 1]");
  }
  TORCH_CHECK_VALUE(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                        steps.size() == n,
                    op, ": params, grads, exp_avgs, exp_avg_sqs and steps must have the same "
                    "length, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ",
                    exp_avg_sqs.size(), ", ", steps.size());
  TORCH_CHECK_VALUE(emas.size() == k * n, op, ": emas must hold len(ema_rates) * len(params) = ",
                    k * n, " tensors (rate-major), got ", emas.size());
  TORCH_CHECK_VALUE(model_params.empty() || model_params.size() == n, op,
                    ": model_params must be empty or match params, got ", model_params.size(),
                    " for ", n, " params");

  const ListCheck check{op, n > 0 ? params[0].device() : lr.device()};
  const std::vector<at::ScalarType> fp32 = {at::kFloat};
  const std::vector<at::ScalarType> grad_dtypes = {at::kFloat, at::kBFloat16, at::kHalf};
  const std::vector<at::ScalarType> model_dtypes = {at::kBFloat16, at::kHalf};
  for (size_t i = 0; i < n; ++i) {
    const std::string param_name = indexed("params", i);
    check.tensor(params[i], param_name, fp32);
    check.tensor(grads[i], indexed("grads", i), grad_dtypes);
    check.same_shape(grads[i], indexed("grads", i), params[i], param_name);
    TORCH_CHECK_TYPE(grads[i].scalar_type() == grads[0].scalar_type(), op,
                     ": all grads must share one dtype, grads[", i, "] is ",
                     grads[i].scalar_type(), " and grads[0] is ", grads[0].scalar_type());
    check.tensor(exp_avgs[i], indexed("exp_avgs", i), fp32);
    check.same_shape(exp_avgs[i], indexed("exp_avgs", i), params[i], param_name);
    check.tensor(exp_avg_sqs[i], indexed("exp_avg_sqs", i), fp32);
    check.same_shape(exp_avg_sqs[i], indexed("exp_avg_sqs", i), params[i], param_name);
    for (size_t r = 0; r < k; ++r) {
      const at::Tensor& ema = emas[r * n + i];
      check.tensor(ema, indexed("emas", r * n + i), fp32);
      check.same_shape(ema, indexed("emas", r * n + i), params[i], param_name);
    }
    if (!model_params.empty()) {
      check.tensor(model_params[i], indexed("model_params", i), model_dtypes);
      check.same_shape(model_params[i], indexed("model_params", i), params[i], param_name);
      TORCH_CHECK_TYPE(model_params[i].scalar_type() == model_params[0].scalar_type(), op,
                       ": all model_params must share one dtype");
    }
    check.scalar(steps[i], indexed("steps", i));
  }
  check.scalar(lr, "lr");
  if (inv_scale) check.scalar(*inv_scale, "inv_scale");
  if (clip_factor) check.scalar(*clip_factor, "clip_factor");
  if (found_inf) check.scalar(*found_inf, "found_inf");
  const ElemType grad_type = n > 0 ? elem_type_of(grads[0].scalar_type()) : ElemType::kFloat32;
  const ElemType model_type =
      model_params.empty() ? ElemType::kNone : elem_type_of(model_params[0].scalar_type());
  return {grad_type, model_type};
}

// Raw pointers of a checked adam_ema_ call, in the layout the kernels take.
struct PackedAdamEma {
  std::vector<AdamEmaTensor> tensors;
  AdamEmaOptions options;
};

inline const float* optional_data(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<float>() : nullptr;
}

inline PackedAdamEma pack_adam_ema(
    at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList emas, at::TensorList model_params,
    at::TensorList steps, const at::Tensor& lr, double beta1, double beta2, double eps,
    double weight_decay, c10::ArrayRef<double> ema_rates,
    const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& clip_factor,
    const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  PackedAdamEma packed;
  packed.tensors.resize(n);
  for (size_t i = 0; i < n; ++i) {
    AdamEmaTensor& t = packed.tensors[i];
    t.param = params[i].data_ptr<float>();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr<float>();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    for (int r = 0; r < kMaxEmaRates; ++r) {
      t.ema[r] = r < static_cast<int>(ema_rates.size()) ? emas[r * n + i].data_ptr<float>()
                                                         : nullptr;
    }
    t.model_param = model_params.empty() ? nullptr : model_params[i].data_ptr();
    t.step = steps[i].data_ptr<float>();
    t.numel = params[i].numel();
  }
  AdamEmaOptions& o = packed.options;
  o.lr = lr.data_ptr<float>();
  o.beta1 = beta1;
  o.beta2 = beta2;
  o.eps = eps;
  o.weight_decay = weight_decay;
  o.num_emas = static_cast<int32_t>(ema_rates.size());
  for (int r = 0; r < kMaxEmaRates; ++r) {
    o.ema_rates[r] = r < o.num_emas ? ema_rates[r] : 0.0;
  }
  o.inv_scale = optional_data(inv_scale);
  o.clip_factor = optional_data(clip_factor);
  o.found_inf = optional_data(found_inf);
  return packed;
}

// Validates a grad_norm_sq call; returns the gradients' element type.
inline ElemType check_grad_norm_sq(at::TensorList grads, const std::optional<at::Tensor>& inv_scale,
                                   at::Device device) {
  constexpr const char* op = "fastdiff.grad_norm_sq";
  const ListCheck check{op, device};
  const std::vector<at::ScalarType> grad_dtypes = {at::kFloat, at::kBFloat16, at::kHalf};
  for (size_t i = 0; i < grads.size(); ++i) {
    check.tensor(grads[i], indexed("grads", i), grad_dtypes);
    TORCH_CHECK_TYPE(grads[i].scalar_type() == grads[0].scalar_type(), op,
                     ": all grads must share one dtype, grads[", i, "] is ",
                     grads[i].scalar_type(), " and grads[0] is ", grads[0].scalar_type());
  }
  if (inv_scale) check.scalar(*inv_scale, "inv_scale");
  return grads.empty() ? ElemType::kFloat32 : elem_type_of(grads[0].scalar_type());
}

inline at::Device grad_norm_device(at::TensorList grads,
                                   const std::optional<at::Tensor>& inv_scale) {
  if (!grads.empty()) return grads[0].device();
  return inv_scale ? inv_scale->device() : at::Device(at::kCPU);
}

}  // namespace fastdiff
