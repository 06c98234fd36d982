"""torch.library custom ops the models call (``torch.ops.fastdiff.*``).

One file per kernel family. Each op has a fake (meta) impl and an autograd formula, a
CUDA impl that launches the Triton kernel (kernels/), and a CPU impl that is a torch
fallback, or the Triton kernel under TRITON_INTERPRET=1. These modules import triton only
when a Triton path runs, so importing them is cheap.

The functions are imported eagerly on purpose: a submodule named like its function would
otherwise shadow the function once imported (``fastdiff.ops.group_norm_silu`` the module).
"""
from fastdiff.ops.attention import attention, qkv_attention
from fastdiff.ops.group_norm_silu import group_norm_silu

__all__ = ["attention", "group_norm_silu", "qkv_attention"]
