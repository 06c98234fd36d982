"""``torch.ops.fastdiff.group_norm_silu``: GroupNorm (+ scale/shift) (+ SiLU) as a custom op.

    y = act((GroupNorm(x) * weight + bias) * (1 + scale) + shift)

The op is opaque to torch.compile (one node in the graph, forward and backward), so one
model definition compiles everywhere and dispatches by device:
- CUDA: the Triton kernels in kernels/group_norm_silu.py;
- CPU: a torch fallback in fp32 that follows guided-diffusion's GroupNorm32 (group_norm
  on x.float(), then the scale/shift and SiLU, cast back to x's dtype), or the Triton
  kernels when TRITON_INTERPRET=1 (how the tests check the Triton code without a GPU).

This module imports no triton unless a Triton path runs (the launchers are imported
inside the functions that call them), so the CPU fallback works without triton installed.
The input checks and views are the launchers' too: fastdiff.kernels.inputs.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdiff.kernels.inputs import (check_group_norm_inputs, interpreting, output_like,
                                     scale_shift_2d)


def _launchers():
    """The Triton launchers' module, imported on first use (it imports triton)."""
    from fastdiff.kernels import group_norm_silu as launchers

    return launchers


# --------------------------------------------------------------------------- torch fallback


def _expand(t, x):
    """[N, C] -> [N, C, 1, ...] so it broadcasts against x."""
    return t.reshape(t.shape + (1,) * (x.dim() - 2))


def _torch_forward(x, weight, bias, num_groups, eps, scale, shift, act):
    """GD's GroupNorm32 and epilogue, all in fp32; returns (y, mean, rstd)."""
    N, C = x.shape[:2]
    xf = x.float()
    if not (xf.is_contiguous() or xf.is_contiguous(memory_format=torch.channels_last)):
        xf = xf.contiguous()  # native_group_norm takes only NCHW or channels_last layouts
    h, mean, rstd = torch.ops.aten.native_group_norm(
        xf, weight.float(), bias.float(), N, C, math.prod(x.shape[2:]), num_groups, eps)
    if scale is not None:
        h = h * (1 + _expand(scale.float(), x))
    if shift is not None:
        h = h + _expand(shift.float(), x)
    if act:
        h = F.silu(h)
    y = output_like(x)
    y.copy_(h)
    return y, mean, rstd


def _torch_backward(dy, x, weight, bias, mean, rstd, num_groups, scale, shift, act):
    """The backward in fp32 torch, from the saved statistics (same formulas as the kernel)."""
    N, C = x.shape[:2]
    if x.numel() == 0:  # nothing to reduce over: every parameter gradient is zero
        return (output_like(x), torch.zeros_like(weight), torch.zeros_like(bias),
                None if scale is None else scale.new_zeros((N, C)),
                None if shift is None else shift.new_zeros((N, C)))
    G = num_groups
    group_size = (C // G) * math.prod(x.shape[2:])
    per_group = (N, G, 1, 1)
    grouped = (N, G, C // G, -1)
    xhat = ((x.float().reshape(grouped) - mean.reshape(per_group)) * rstd.reshape(per_group))
    xhat = xhat.reshape(N, C, -1)
    w = weight.float().reshape(1, C, 1)
    b = bias.float().reshape(1, C, 1)
    gain = x.new_ones((N, C, 1), dtype=torch.float32)
    if scale is not None:
        gain = gain + scale.float().reshape(N, C, 1)
    du = dy.float().reshape(N, C, -1)
    if act:
        u = (xhat * w + b) * gain
        if shift is not None:
            u = u + shift.float().reshape(N, C, 1)
        sig = torch.sigmoid(u)
        du = du * sig * (1 + u * (1 - sig))
    sum_du = du.sum(2)
    sum_du_xhat = (du * xhat).sum(2)
    k = (w * gain)[..., 0]
    mean_ka = (k * sum_du).reshape(N, G, -1).sum(2) / group_size
    mean_kb = (k * sum_du_xhat).reshape(N, G, -1).sum(2) / group_size
    dx = rstd.reshape(per_group) * (
        (k[..., None] * du).reshape(grouped) - mean_ka.reshape(per_group)
        - xhat.reshape(grouped) * mean_kb.reshape(per_group))
    dx_out = output_like(x)
    dx_out.copy_(dx.reshape(x.shape))
    gain = gain[..., 0]
    dweight = (gain * sum_du_xhat).sum(0).to(weight.dtype)
    dbias = (gain * sum_du).sum(0).to(bias.dtype)
    dscale = None if scale is None else (weight.float() * sum_du_xhat + bias.float() * sum_du).to(scale.dtype)
    dshift = None if shift is None else sum_du.to(shift.dtype)
    return dx_out, dweight, dbias, dscale, dshift


# --------------------------------------------------------------------------- custom ops


def _interpreted(x):
    """CPU tensors run the Triton kernels under TRITON_INTERPRET=1 (how tests check them)."""
    return x.device.type == "cpu" and interpreting()


def _fill_absent(grads, x):
    """Custom-op outputs cannot be None: an absent scale/shift gets an empty gradient
    (two separate empties, since custom-op outputs must not alias each other)."""
    dx, dweight, dbias, dscale, dshift = grads
    return (dx, dweight, dbias,
            x.new_empty((0,)) if dscale is None else dscale,
            x.new_empty((0,)) if dshift is None else dshift)


@torch.library.custom_op("fastdiff::group_norm_silu", mutates_args=())
def _group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, num_groups: int, eps: float,
                     scale: Optional[Tensor], shift: Optional[Tensor],
                     act: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Forward: (y, mean, rstd); scale/shift are [N, C] or None; mean/rstd fp32 [N, G].

    This body is the non-CUDA implementation; CUDA is registered below.
    """
    if _interpreted(x):
        return _launchers().group_norm_silu_forward(x, weight, bias, num_groups, eps, scale, shift, act)
    return _torch_forward(x, weight, bias, num_groups, eps, scale, shift, act)


@_group_norm_silu.register_fake
def _(x, weight, bias, num_groups, eps, scale, shift, act):
    stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
    return output_like(x), stats, torch.empty_like(stats)


@_group_norm_silu.register_kernel("cuda")
def _(x, weight, bias, num_groups, eps, scale, shift, act):
    return _launchers().group_norm_silu_forward(x, weight, bias, num_groups, eps, scale, shift, act)


@torch.library.custom_op("fastdiff::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                              rstd: Tensor, num_groups: int, scale: Optional[Tensor],
                              shift: Optional[Tensor],
                              act: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: (dx, dweight, dbias, dscale, dshift); an absent scale/shift gets an empty grad.

    This body is the non-CUDA implementation; CUDA is registered below.
    """
    backward = _launchers().group_norm_silu_backward if _interpreted(x) else _torch_backward
    return _fill_absent(backward(dy, x, weight, bias, mean, rstd, num_groups, scale, shift, act), x)


@_group_norm_silu_backward.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, scale, shift, act):
    N, C = x.shape[:2]
    return (output_like(x), torch.empty_like(weight), torch.empty_like(bias),
            x.new_empty((0,)) if scale is None else x.new_empty((N, C), dtype=scale.dtype),
            x.new_empty((0,)) if shift is None else x.new_empty((N, C), dtype=shift.dtype))


@_group_norm_silu_backward.register_kernel("cuda")
def _(dy, x, weight, bias, mean, rstd, num_groups, scale, shift, act):
    return _fill_absent(_launchers().group_norm_silu_backward(
        dy, x, weight, bias, mean, rstd, num_groups, scale, shift, act), x)


def _setup_context(ctx, inputs, output):
    x, weight, bias, num_groups, eps, scale, shift, act = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups = num_groups
    ctx.act = act
    ctx.has_scale = scale is not None
    ctx.has_shift = shift is not None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias, dscale, dshift = torch.ops.fastdiff.group_norm_silu_backward(
        dy, x, weight, bias, mean, rstd, ctx.num_groups, scale, shift, ctx.act)
    return (dx, dweight, dbias, None, None,
            dscale if ctx.has_scale else None, dshift if ctx.has_shift else None, None)


_group_norm_silu.register_autograd(_backward, setup_context=_setup_context)


def group_norm_silu(x, weight, bias, num_groups, eps=1e-5, scale=None, shift=None, act=True):
    """act((GroupNorm(x) * weight + bias) * (1 + scale) + shift), the op the model calls.

    x: [N, C, *spatial] fp32/fp16/bf16 (NCHW, channels_last or any dense layout); weight,
    bias: [C]; scale/shift: optional [N, C] or [N, C, 1, ...] (guided-diffusion's
    use_scale_shift_norm); act: SiLU if True, identity if False. Statistics in fp32,
    eps added to the variance, output in x's dtype. CUDA runs the Triton kernels; CPU the
    fp32 torch fallback (or the Triton kernels under TRITON_INTERPRET=1).
    """
    check_group_norm_inputs(x, weight, bias, num_groups, scale, shift)
    y, _, _ = torch.ops.fastdiff.group_norm_silu(
        x, weight, bias, num_groups, float(eps),
        scale_shift_2d(scale, x), scale_shift_2d(shift, x), bool(act))
    return y
