"""Shared by the interpreter tests (collected only under TRITON_INTERPRET=1, see
tests/conftest.py): a count of the Triton launchers' calls.

The custom ops fall back to torch on CPU unless TRITON_INTERPRET is set, and the fallback
is accurate enough to pass these tests' tolerances too; a test proves it checked the
Triton code only by seeing the launchers run.
"""
import importlib

import pytest

LAUNCHERS = {
    "fastdiff.kernels.group_norm_silu": ("group_norm_silu_forward", "group_norm_silu_backward"),
    "fastdiff.kernels.attention": ("attention_forward", "attention_backward",
                                   "qkv_attention_forward", "qkv_attention_backward"),
}


@pytest.fixture
def launches(monkeypatch):
    """{launcher name: calls} during the test; the launchers still run."""
    counts = {}
    for module_name, names in LAUNCHERS.items():
        module = importlib.import_module(module_name)
        for name in names:
            def counted(*args, _fn=getattr(module, name), _name=name, **kwargs):
                counts[_name] = counts.get(_name, 0) + 1
                return _fn(*args, **kwargs)
            monkeypatch.setattr(module, name, counted)
    return counts
