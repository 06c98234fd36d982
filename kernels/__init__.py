"""Triton kernels, imported as ``fastdiff.kernels``: one kernel family per file, each with
its @triton.jit kernels and their launchers (``*_forward`` / ``*_backward``). They run on
CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. The differentiable functions are
the custom ops in ``fastdiff.ops``, which call these launchers.

- ``fastdiff.kernels.group_norm_silu``, ``fastdiff.kernels.attention``: kernels and
  launchers (importing them imports triton);
- ``fastdiff.kernels.inputs``: the input checks, tensor views and limits the launchers
  share with the ops (imports no triton);
- ``fastdiff.kernels.determinism``: the ``set_deterministic`` switch, re-exported here.

Nothing else is imported eagerly, so ``import fastdiff.kernels.inputs`` (what the ops do on
the CPU path) imports no triton. Nothing here imports from ``fastdiff.ops`` or any other
fastdiff module above the kernels.
"""
from fastdiff.kernels.determinism import is_deterministic, set_deterministic

__all__ = ["is_deterministic", "set_deterministic"]
