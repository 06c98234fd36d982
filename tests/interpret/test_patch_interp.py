"""fastdiff.patch through the Triton kernels (TRITON_INTERPRET=1) on tiny real blocks.

Runs in its own process (see tests/test_interpreted_kernels.py). A diffusers
UNetMidBlock2D (ResnetBlock2D → Attention → ResnetBlock2D) in both time-embedding modes
and a guided-diffusion ResBlock (scale/shift) + AttentionBlock: patched output and
gradients must match the unpatched block in fp32 within 1e-5 relative, and every Triton
launcher the patched modules should reach must have run. Shapes are tiny and odd
(each interpreted launch runs its programs in Python).
"""
import os

import pytest
import torch

from fastdiff.models.layers import AttentionBlock, ResBlock, TimestepEmbedSequential
from fastdiff.patch import patch

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_interpreted_kernels.py"

diffusers_blocks = pytest.importorskip("diffusers.models.unets.unet_2d_blocks")

# The interpreter turns one-element arrays into Python ints for range() bounds.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

RTOL = 1e-5


def run(model, *inputs):
    out = model(*inputs)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), [inputs[0]] + list(model.parameters()))
    return [out.detach()] + list(grads)


def assert_runs_match(got, ref):
    # Mathematically zero gradients (key biases under softmax, a conv bias before a
    # one-channel-per-group norm) hold rounding noise only: both must stay below it.
    noise_floor = RTOL * max(t.abs().max().item() for t in ref[1:])
    for i, (a, b) in enumerate(zip(got, ref)):
        if b.abs().max() <= noise_floor:
            assert a.abs().max() <= noise_floor, f"tensor {i}: {a.abs().max():.3g} should be ~0"
            continue
        err = (a - b).abs()
        assert (err <= RTOL * (b.abs() + b.abs().max())).all(), f"tensor {i}: max err {err.max():.3g}"


def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.parametrize("time_norm", ["default", "scale_shift"])
def test_diffusers_mid_block(time_norm, launches):
    torch.manual_seed(0)
    block = diffusers_blocks.UNetMidBlock2D(in_channels=16, temb_channels=12, resnet_groups=4,
                                            attention_head_dim=8, resnet_time_scale_shift=time_norm)
    x = (torch.randn(2, 16, 5, 3) + 0.4).requires_grad_()
    temb = torch.randn(2, 12)
    ref = run(block, x, temb)
    report = patch(block)
    assert len(report.replaced) == (4 if time_norm == "default" else 3) and not report.left_alone
    assert_runs_match(run(block, x, temb), ref)
    for name in ("group_norm_silu_forward", "group_norm_silu_backward", "attention_forward",
                 "attention_backward"):
        assert launches.get(name, 0) > 0, name


def test_guided_diffusion_blocks(launches):
    torch.manual_seed(0)
    model = perturb(TimestepEmbedSequential(
        ResBlock(32, 16, dropout=0.0, out_channels=32, use_scale_shift_norm=True),
        AttentionBlock(32, num_heads=2)))
    x = (torch.randn(2, 32, 3, 5) + 0.4).requires_grad_()
    emb = torch.randn(2, 16)
    ref = run(model, x, emb)
    report = patch(model)
    assert len(report.replaced) == 4 and not report.left_alone
    assert_runs_match(run(model, x, emb), ref)
    for name in ("group_norm_silu_forward", "group_norm_silu_backward", "qkv_attention_forward",
                 "qkv_attention_backward"):
        assert launches.get(name, 0) > 0, name
