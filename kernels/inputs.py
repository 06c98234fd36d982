"""What the Triton launchers (kernels/*.py) and the custom ops (fastdiff/ops/*.py) share.

The ops check their arguments and build the same tensor views before either of their
implementations runs (the torch fallback, or a Triton launcher), and the launchers check and
view their arguments the same way when called directly. Both read the rules here, so an
argument the op accepts is one the launcher accepts.

This module imports torch only, never triton: the ops import it on every path, including
the CPU fallback on a machine without triton, and the kernels import nothing from the
ops (the data path is one-way: ops -> kernels).
"""
import os

import torch
from torch import Tensor

# Largest head dim the Triton attention kernels handle (the head dim is padded to a power
# of two in registers; beyond 128 the tiles no longer fit). Wider heads go to SDPA.
MAX_HEAD_DIM = 128

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Triton's own reading of a boolean environment variable (triton._C getenv_bool):
# case-insensitive, exactly one of these words.
_TRUE_WORDS = ("1", "true", "on", "yes", "y")


def interpreting():
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter, read the way Triton reads it.

    Triton decides when a kernel is decorated (on import of its kernels/ module): the
    launchers read this once, on import, to fit their configs to the interpreter; the ops
    read it on each call to send CPU tensors to the launchers.
    """
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE_WORDS


# --------------------------------------------------------------------------- group norm


def check_group_norm_inputs(x, weight, bias, num_groups, scale=None, shift=None):
    """Raise TypeError/ValueError with a one-line message when the arguments don't fit."""
    if not isinstance(x, Tensor):
        raise TypeError(f"group_norm_silu: x must be a Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"group_norm_silu: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"group_norm_silu: x must be [N, C, *spatial], got shape {tuple(x.shape)}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
        raise ValueError(f"group_norm_silu: num_groups must be a positive int, got {num_groups!r}")
    N, C = x.shape[:2]
    if C % num_groups != 0:
        raise ValueError(f"group_norm_silu: channels ({C}) must be divisible by num_groups ({num_groups})")
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"group_norm_silu: {name} must be a floating-point Tensor")
        if tuple(t.shape) != (C,):
            raise ValueError(f"group_norm_silu: {name} must have shape ({C},), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"group_norm_silu: {name} is on {t.device} but x is on {x.device}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"group_norm_silu: {name} must be a floating-point Tensor or None")
        shape = tuple(t.shape)
        per_channel = (len(shape) >= 2 and shape[:2] == (N, C) and len(shape) <= x.dim()
                       and all(d == 1 for d in shape[2:]))
        if not per_channel:
            raise ValueError(f"group_norm_silu: {name} must have shape ({N}, {C}) or ({N}, {C}, 1, ...), "
                             f"got {shape}")
        if t.device != x.device:
            raise ValueError(f"group_norm_silu: {name} is on {t.device} but x is on {x.device}")


def scale_shift_2d(t, x):
    """A per-(n, c) tensor given as [N, C] or [N, C, 1, ...] as an [N, C] view (or None)."""
    if t is None:
        return None
    return t.reshape(x.shape[0], x.shape[1])


def output_like(x):
    """Output buffer for x: x's layout when its spatial dims flatten to one, else contiguous.

    Shared by the op's fake impl and every real impl so their strides agree.
    """
    out = torch.empty_like(x)
    n, c = x.shape[:2]
    try:
        out.view(n, c, -1)
    except RuntimeError:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return out


# --------------------------------------------------------------------------- attention


def check_attention_inputs(q, k, v):
    """Raise a one-line error unless q [B, H, Sq, D] and k, v [B, H, Sk, D] fit together."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D [batch, heads, seq, head_dim], "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attention: {name} has dtype {t.dtype}; expected float16, bfloat16 or float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: mismatched shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}; expected [B, H, Sq, D], [B, H, Sk, D], [B, H, Sk, D]")
    if k.shape[2] == 0 or q.shape[3] == 0:
        raise ValueError(f"attention: empty key sequence or head dim (k shape {tuple(k.shape)})")


def check_qkv_inputs(qkv, num_heads):
    """Raise unless qkv is [N, 3·H·C, T] for ``num_heads`` heads; return the head dim C."""
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv_attention: qkv must be a tensor, got {type(qkv).__name__}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"qkv_attention: num_heads must be a positive int, got {num_heads!r}")
    if qkv.dim() != 3:
        raise ValueError(f"qkv_attention: qkv must be 3-D [N, 3*heads*C, T], got shape {tuple(qkv.shape)}")
    if qkv.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"qkv_attention: dtype {qkv.dtype}; expected float16, bfloat16 or float32")
    width, length = qkv.shape[1], qkv.shape[2]
    if width == 0 or width % (3 * num_heads) != 0:
        raise ValueError(f"qkv_attention: channel count {width} is not a positive multiple of "
                         f"3*num_heads = {3 * num_heads}")
    if length == 0:
        raise ValueError("qkv_attention: empty sequence (T = 0)")
    return width // (3 * num_heads)


def qkv_head_views(x, num_heads, legacy_order):
    """q, k, v of a packed [N, 3·H·C, T] tensor as [N, H, T, C] views (no copy).

    Legacy order (QKVAttentionLegacy): channels are (head, q|k|v, c). New order
    (QKVAttention): channels are (q|k|v, head, c).
    """
    head_dim = check_qkv_inputs(x, num_heads)
    if legacy_order:
        split = x.unflatten(1, (num_heads, 3, head_dim))
        parts = (split[:, :, 0], split[:, :, 1], split[:, :, 2])
    else:
        split = x.unflatten(1, (3, num_heads, head_dim))
        parts = (split[:, 0], split[:, 1], split[:, 2])
    return tuple(p.transpose(2, 3) for p in parts)


def channels_as_heads(x, num_heads):
    """[N, H·C, T] → its [N, H, T, C] view."""
    return x.unflatten(1, (num_heads, -1)).transpose(2, 3)
