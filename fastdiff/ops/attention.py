"""Attention custom ops: ``torch.ops.fastdiff.attention`` and ``torch.ops.fastdiff.qkv_attention``.

Each op returns ``(out, lse)``; the log-sum-exp rows (fp32, natural log) are what the
flash backward recomputes the probabilities from, so they are an op output the autograd
formula saves. The Python wrappers :func:`attention` and :func:`qkv_attention` return
only ``out``.

Dispatch: every device but CUDA → a torch fallback (for ``qkv_attention`` exactly
guided-diffusion's einsum math, so fp32 results equal GD's: :func:`gd_qkv_attention`), or the
Triton launchers under TRITON_INTERPRET=1; CUDA → the Triton launchers
(kernels/attention.py) for bf16/fp16 and the same torch fallback for fp32 (logged once: IEEE
fp32 Triton tiles spill registers on sm_90, see benchmarks/compile_report.py). The backward
passes are custom ops too, so torch.compile sees the whole op pair as opaque nodes.

The input checks and views are the launchers' too (fastdiff.kernels.inputs, no triton);
the launchers are imported inside the functions that call them, so this module imports
no triton unless a Triton path runs.
"""
import logging
import math
from typing import Optional

import torch

from fastdiff.kernels.inputs import (channels_as_heads, check_attention_inputs, check_qkv_inputs,
                                     interpreting, qkv_head_views)


logger = logging.getLogger("fastdiff")
_logged_fp32_fallback = False


def _runs_triton(t):
    """Whether the CUDA impls launch the Triton kernels for ``t`` (bf16/fp16), or run the
    torch fallback (fp32, logged once per process). Runs outside torch.compile's tracing
    (inside the custom op), so the log line costs no graph break."""
    global _logged_fp32_fallback
    if t.dtype != torch.float32:
        return True
    if not _logged_fp32_fallback:
        logger.info("fastdiff attention: fp32 inputs run torch's attention math on CUDA, not the "
                    "Triton kernels (IEEE fp32 tiles spill registers on sm_90); bf16/fp16 run Triton")
        _logged_fp32_fallback = True
    return False


def _launchers():
    """The Triton launchers' module, imported on first use (it imports triton)."""
    from fastdiff.kernels import attention as launchers

    return launchers


def _default_scale(head_dim, scale):
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


# ----------------------------------------------------------------------------- torch fallbacks
def _math_attention(q, k, v, scale):
    """Reference attention in fp32; returns (out in q's dtype, lse fp32)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs, v.float()).to(q.dtype), lse


def _math_attention_backward(grad_out, q, k, v, scale):
    """dq, dk, dv of softmax(q·kᵀ·scale)·v, computed in fp32 (probabilities recomputed)."""
    qf, kf, vf, gf = q.float(), k.float(), v.float(), grad_out.float()
    probs = torch.softmax(torch.matmul(qf, kf.transpose(-1, -2)) * scale, dim=-1)
    dv = torch.matmul(probs.transpose(-1, -2), gf)
    dprobs = torch.matmul(gf, vf.transpose(-1, -2))
    dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
    dq = torch.matmul(dscores, kf) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def gd_qkv_attention(qkv, num_heads, legacy_order, need_lse=False):
    """guided-diffusion's QKVAttentionLegacy (``legacy_order``) / QKVAttention forward on the
    packed [N, 3·H·C, T] qkv, op for op, so that results equal GD's bitwise: C^-1/4 applied
    to q and to k in the input dtype, scores by einsum, softmax in fp32, probabilities cast
    back to the input dtype, einsum with v. Returns [N, H·C, T], and with ``need_lse`` also
    the scores' log-sum-exp [N, H, T] in fp32 (what the op's backward is given).

    The models' ``attention_backend="math"`` and the qkv op's CPU forward both run this.
    """
    batch, width, length = qkv.shape
    head_dim = width // (3 * num_heads)
    rows = batch * num_heads
    # Scaling q and k by C^-1/4 each, before the product, keeps fp16 logits in range.
    quarter_scale = 1 / math.sqrt(math.sqrt(head_dim))
    if legacy_order:
        q, k, v = qkv.reshape(rows, 3 * head_dim, length).split(head_dim, dim=1)
        q_scaled, k_scaled = q * quarter_scale, k * quarter_scale
    else:
        q, k, v = qkv.chunk(3, dim=1)
        q_scaled = (q * quarter_scale).view(rows, head_dim, length)
        k_scaled = (k * quarter_scale).view(rows, head_dim, length)
        v = v.reshape(rows, head_dim, length)
    scores = torch.einsum("bct,bcs->bts", q_scaled, k_scaled)
    probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    out = torch.einsum("bts,bcs->bct", probs, v).reshape(batch, -1, length)
    if not need_lse:
        return out
    return out, torch.logsumexp(scores.float(), dim=-1).view(batch, num_heads, length)


# ----------------------------------------------------------------------------- attention op
@torch.library.custom_op("fastdiff::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    check_attention_inputs(q, k, v)
    scale = _default_scale(q.shape[-1], scale)
    if interpreting():
        return _launchers().attention_forward(q, k, v, scale)
    return _math_attention(q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale=None):
    check_attention_inputs(q, k, v)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@_attention_op.register_kernel("cuda")
def _(q, k, v, scale=None):
    if not _runs_triton(q):
        return _math_attention(q, k, v, _default_scale(q.shape[-1], scale))
    return _launchers().attention_forward(q, k, v, _default_scale(q.shape[-1], scale))


@torch.library.custom_op("fastdiff::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor,
                           scale: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = _default_scale(q.shape[-1], scale)
    if interpreting():
        return _launchers().attention_backward(grad_out, q, k, v, out, lse, scale)
    return _math_attention_backward(grad_out, q, k, v, scale)


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@_attention_backward_op.register_kernel("cuda")
def _(grad_out, q, k, v, out, lse, scale=None):
    if not _runs_triton(q):
        return _math_attention_backward(grad_out, q, k, v, _default_scale(q.shape[-1], scale))
    return _launchers().attention_backward(grad_out, q, k, v, out, lse, _default_scale(q.shape[-1], scale))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


# ----------------------------------------------------------------------------- qkv op
@torch.library.custom_op("fastdiff::qkv_attention", mutates_args=())
def _qkv_attention_op(qkv: torch.Tensor, num_heads: int,
                      legacy_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    check_qkv_inputs(qkv, num_heads)
    if interpreting():
        return _launchers().qkv_attention_forward(qkv, num_heads, legacy_order)
    return _torch_qkv_attention(qkv, num_heads, legacy_order)


def _torch_qkv_attention(qkv, num_heads, legacy_order):
    out, lse = gd_qkv_attention(qkv, num_heads, legacy_order, need_lse=True)
    return out.contiguous(), lse  # the fake impl's layout


@_qkv_attention_op.register_fake
def _(qkv, num_heads, legacy_order=True):
    head_dim = check_qkv_inputs(qkv, num_heads)
    batch, _, length = qkv.shape
    return (qkv.new_empty((batch, num_heads * head_dim, length)),
            qkv.new_empty((batch, num_heads, length), dtype=torch.float32))


@_qkv_attention_op.register_kernel("cuda")
def _(qkv, num_heads, legacy_order=True):
    if not _runs_triton(qkv):
        return _torch_qkv_attention(qkv, num_heads, legacy_order)
    return _launchers().qkv_attention_forward(qkv, num_heads, legacy_order)


@torch.library.custom_op("fastdiff::qkv_attention_backward", mutates_args=())
def _qkv_attention_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor,
                               lse: torch.Tensor, num_heads: int, legacy_order: bool = True) -> torch.Tensor:
    if interpreting():
        return _launchers().qkv_attention_backward(grad_out, qkv, out, lse, num_heads, legacy_order)
    return _torch_qkv_attention_backward(grad_out, qkv, num_heads, legacy_order)


def _torch_qkv_attention_backward(grad_out, qkv, num_heads, legacy_order):
    q, k, v = qkv_head_views(qkv, num_heads, legacy_order)
    grads = _math_attention_backward(channels_as_heads(grad_out, num_heads), q, k, v,
                                     1.0 / math.sqrt(q.shape[-1]))
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    for view, grad in zip(qkv_head_views(grad_qkv, num_heads, legacy_order), grads):
        view.copy_(grad)
    return grad_qkv


@_qkv_attention_backward_op.register_fake
def _(grad_out, qkv, out, lse, num_heads, legacy_order=True):
    return qkv.new_empty(qkv.shape)


@_qkv_attention_backward_op.register_kernel("cuda")
def _(grad_out, qkv, out, lse, num_heads, legacy_order=True):
    if not _runs_triton(qkv):
        return _torch_qkv_attention_backward(grad_out, qkv, num_heads, legacy_order)
    return _launchers().qkv_attention_backward(grad_out, qkv, out, lse, num_heads, legacy_order)


def _qkv_setup_context(ctx, inputs, output):
    qkv, num_heads, legacy_order = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.layout = (num_heads, legacy_order)
    ctx.mark_non_differentiable(lse)


def _qkv_backward(ctx, grad_out, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return _qkv_attention_backward_op(grad_out, qkv, out, lse, *ctx.layout), None, None


_qkv_attention_op.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


# ----------------------------------------------------------------------------- public API
def attention(q, k, v, scale=None):
    """softmax(q·kᵀ·scale)·v as a differentiable custom op (no graph break under compile).

    q: [B, H, Sq, D], k and v: [B, H, Sk, D], float16/bfloat16/float32, any strides;
    ``scale`` defaults to 1/sqrt(D). CUDA runs the Triton flash kernels (D ≤ 128) for
    bf16/fp16, and fp32 through the torch fallback that the CPU runs for every dtype (the
    Triton kernels under TRITON_INTERPRET=1).
    """
    return _attention_op(q, k, v, scale)[0]


def qkv_attention(qkv, num_heads, legacy_order=True):
    """guided-diffusion's QKV attention on the packed [N, 3·H·C, T] tensor → [N, H·C, T].

    ``legacy_order=True`` matches QKVAttentionLegacy, False QKVAttention. CUDA runs the
    Triton kernels reading qkv in place (C ≤ 128) for bf16/fp16; fp32 on CUDA, and every
    dtype on the CPU, runs GD's einsum math.
    """
    return _qkv_attention_op(qkv, num_heads, legacy_order)[0]
