"""Likelihood terms of the diffusion variational bound (guided-diffusion's losses.py semantics).

The arithmetic is written in the same order as guided-diffusion so that fp32 results agree
bit for bit; see tests/test_diffusion.py for the closed-form checks.
"""
import math

import torch

# Half the width of one 8-bit pixel bin once pixels are scaled from [0, 255] to [-1, 1].
_HALF_BIN = 1.0 / 255.0
# Edge bins (pixel 0 and 255) integrate the Gaussian out to -inf / +inf.
_EDGE = 0.999
# Floor inside the logs so empty bins give a large finite penalty rather than -inf.
_LOG_FLOOR = 1e-12


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Arguments broadcast; any of them may be a Python float, but at least one must be a tensor
    (its dtype and device are used for the scalar log-variances).
    """
    like = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if like is None:
        raise TypeError("normal_kl: at least one argument must be a torch.Tensor")
    # exp() needs tensors, so scalar log-variances are lifted to the reference tensor's dtype.
    logvar1, logvar2 = (
        v if isinstance(v, torch.Tensor) else torch.tensor(v).to(like) for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Standard normal CDF via the tanh approximation (max abs error ~3e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability (nats) of 8-bit images under a Gaussian discretised to 256 bins.

    :param x: images scaled from uint8 to [-1, 1].
    :param means: Gaussian means, same shape as x.
    :param log_scales: log standard deviations, same shape as x.
    :return: a tensor shaped like x.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            "discretized_gaussian_log_likelihood: x, means and log_scales must have the same "
            f"shape, got {tuple(x.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + _HALF_BIN))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - _HALF_BIN))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=_LOG_FLOOR))
    log_survival_lower = torch.log((1.0 - cdf_lower).clamp(min=_LOG_FLOOR))
    log_bin_mass = torch.log((cdf_upper - cdf_lower).clamp(min=_LOG_FLOOR))
    return torch.where(
        x < -_EDGE,
        log_cdf_upper,
        torch.where(x > _EDGE, log_survival_lower, log_bin_mass),
    )
