"""Triton kernels, imported as ``fastdiff.kernels``: one kernel family per file, each with
its @triton.jit kernels, launchers and the autograd.Function (the differentiable Triton
path). Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

Importing this package imports triton. The functions are imported eagerly because each
submodule is named like its function and would otherwise shadow it.
"""
from fastdiff.kernels.attention import attention, qkv_attention
from fastdiff.kernels.group_norm_silu import group_norm_silu

__all__ = ["attention", "group_norm_silu", "qkv_attention"]
