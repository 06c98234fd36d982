// torch.ops.fastdiff.adam_ema_ and torch.ops.fastdiff.grad_norm_sq: schemas, CPU and Meta
// kernels. The CUDA kernels are registered by binding_cuda.cpp, which is compiled only
// where torch has CUDA. Other fastdiff ops are defined from Python under the same
// namespace, hence TORCH_LIBRARY_FRAGMENT.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "adam_ema.h"
#include "adam_ema_binding.h"

namespace fastdiff {
namespace {

void adam_ema_cpu_kernel(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList emas,
                         at::TensorList model_params, at::TensorList steps,
                         const at::Tensor& lr, double beta1, double beta2, double eps,
                         double weight_decay, c10::ArrayRef<double> ema_rates,
                         const std::optional<at::Tensor>& inv_scale,
                         const std::optional<at::Tensor>& clip_factor,
                         const std::optional<at::Tensor>& found_inf) {
  const auto [grad_type, model_type] =
      check_adam_ema(params, grads, exp_avgs, exp_avg_sqs, emas, model_params, steps, lr,
                     ema_rates, inv_scale, clip_factor, found_inf);
  const PackedAdamEma packed =
      pack_adam_ema(params, grads, exp_avgs, exp_avg_sqs, emas, model_params, steps, lr,
                    beta1, beta2, eps, weight_decay, ema_rates, inv_scale, clip_factor,
                    found_inf);
  adam_ema_cpu(packed.tensors.data(), static_cast<int64_t>(packed.tensors.size()), grad_type,
               model_type, packed.options, at::get_num_threads());
}

// Shape-only: the update mutates its inputs in place and returns nothing.
void adam_ema_meta_kernel(at::TensorList params, at::TensorList grads,
                          at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                          at::TensorList emas, at::TensorList model_params,
                          at::TensorList steps, const at::Tensor& lr, double, double, double,
                          double, c10::ArrayRef<double> ema_rates,
                          const std::optional<at::Tensor>& inv_scale,
                          const std::optional<at::Tensor>& clip_factor,
                          const std::optional<at::Tensor>& found_inf) {
  check_adam_ema(params, grads, exp_avgs, exp_avg_sqs, emas, model_params, steps, lr,
                 ema_rates, inv_scale, clip_factor, found_inf);
}

std::tuple<at::Tensor, at::Tensor> grad_norm_sq_cpu_kernel(
    at::TensorList grads, const std::optional<at::Tensor>& inv_scale) {
  const at::Device device = grad_norm_device(grads, inv_scale);
  const ElemType grad_type = check_grad_norm_sq(grads, inv_scale, device);
  std::vector<const void*> pointers;
  std::vector<int64_t> numels;
  for (const at::Tensor& g : grads) {
    pointers.push_back(g.data_ptr());
    numels.push_back(g.numel());
  }
  at::Tensor sum_sq = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
  at::Tensor found_inf = at::empty({}, at::TensorOptions().dtype(at::kFloat).device(device));
  grad_norm_sq_cpu(pointers.data(), numels.data(), static_cast<int64_t>(grads.size()),
                   grad_type, optional_data(inv_scale), sum_sq.data_ptr<float>(),
                   found_inf.data_ptr<float>(), at::get_num_threads());
  return {sum_sq, found_inf};
}

std::tuple<at::Tensor, at::Tensor> grad_norm_sq_meta_kernel(
    at::TensorList grads, const std::optional<at::Tensor>& inv_scale) {
  const at::Device device = grad_norm_device(grads, inv_scale);
  check_grad_norm_sq(grads, inv_scale, device);
  const auto options = at::TensorOptions().dtype(at::kFloat).device(device);
  return {at::empty({}, options), at::empty({}, options)};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_FRAGMENT(fastdiff, m) {
  // emas is rate-major: emas[k * len(params) + i] is the EMA at ema_rates[k] of params[i].
  // steps[i] counts the steps params[i] has taken; the update uses steps[i] + 1 and then
  // stores it, unless found_inf is nonzero, in which case nothing at all is written.
  m.def(
      "adam_ema_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] emas, Tensor(e!)[] model_params, "
      "Tensor(f!)[] steps, Tensor lr, float beta1, float beta2, float eps, "
      "float weight_decay, float[] ema_rates, Tensor? inv_scale=None, "
      "Tensor? clip_factor=None, Tensor? found_inf=None) -> ()");
  // Returns (sum of squares of grads * inv_scale, 1.0 if any of them is non-finite else 0.0).
  m.def("grad_norm_sq(Tensor[] grads, Tensor? inv_scale=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastdiff, CPU, m) {
  m.impl("adam_ema_", &fastdiff::adam_ema_cpu_kernel);
  m.impl("grad_norm_sq", &fastdiff::grad_norm_sq_cpu_kernel);
}

TORCH_LIBRARY_IMPL(fastdiff, Meta, m) {
  m.impl("adam_ema_", &fastdiff::adam_ema_meta_kernel);
  m.impl("grad_norm_sq", &fastdiff::grad_norm_sq_meta_kernel);
}
