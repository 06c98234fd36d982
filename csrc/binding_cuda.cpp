// CUDA kernels of torch.ops.fastdiff.adam_ema_ and grad_norm_sq (schemas in binding.cpp).
// Built only against a CUDA torch; the kernels themselves are in adam_ema_cuda.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adam_ema_binding.h"
#include "adam_ema_cuda_launch.h"

namespace fastdiff {
namespace {

void adam_ema_cuda_kernel(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
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
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const PackedAdamEma packed =
      pack_adam_ema(params, grads, exp_avgs, exp_avg_sqs, emas, model_params, steps, lr,
                    beta1, beta2, eps, weight_decay, ema_rates, inv_scale, clip_factor,
                    found_inf);
  C10_CUDA_CHECK(adam_ema_cuda(packed.tensors.data(),
                               static_cast<int64_t>(packed.tensors.size()), grad_type,
                               model_type, packed.options,
                               c10::cuda::getCurrentCUDAStream()));
}

std::tuple<at::Tensor, at::Tensor> grad_norm_sq_cuda_kernel(
    at::TensorList grads, const std::optional<at::Tensor>& inv_scale) {
  const at::Device device = grad_norm_device(grads, inv_scale);
  const ElemType grad_type = check_grad_norm_sq(grads, inv_scale, device);
  const c10::cuda::CUDAGuard guard(device);
  std::vector<const void*> pointers;
  std::vector<int64_t> numels;
  for (const at::Tensor& g : grads) {
    pointers.push_back(g.data_ptr());
    numels.push_back(g.numel());
  }
  const auto options = at::TensorOptions().device(device);
  at::Tensor sum_sq = at::empty({}, options.dtype(at::kFloat));
  at::Tensor found_inf = at::empty({}, options.dtype(at::kFloat));
  at::Tensor workspace = at::empty(
      {grad_norm_sq_cuda_workspace(numels.data(), static_cast<int64_t>(numels.size()))},
      options.dtype(at::kDouble));
  C10_CUDA_CHECK(grad_norm_sq_cuda(pointers.data(), numels.data(),
                                   static_cast<int64_t>(grads.size()), grad_type,
                                   optional_data(inv_scale), sum_sq.data_ptr<float>(),
                                   found_inf.data_ptr<float>(), workspace.data_ptr<double>(),
                                   c10::cuda::getCurrentCUDAStream()));
  return {sum_sq, found_inf};
}

}  // namespace
}  // namespace fastdiff

TORCH_LIBRARY_IMPL(fastdiff, CUDA, m) {
  m.impl("adam_ema_", &fastdiff::adam_ema_cuda_kernel);
  m.impl("grad_norm_sq", &fastdiff::grad_norm_sq_cuda_kernel);
}
