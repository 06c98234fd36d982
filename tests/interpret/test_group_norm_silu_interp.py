"""Triton GroupNorm(+scale/shift)+SiLU under TRITON_INTERPRET=1 against an fp64 reference.

Runs in its own process (see tests/test_interpreted_kernels.py). The cases go through the
custom op fastdiff.ops.group_norm_silu, the one differentiable path, and check that it ran
the Triton launchers (on CPU it runs them only under the interpreter). Every interpreted
launch costs about a second on 2 cores, so the axes (dtype, layout, scale/shift,
activation, fused vs split statistics) are combined in a short list of cases instead of a
full product; each case checks the forward and all five gradients.

Tolerances: fp32 results within 1e-5 relative (|err| <= 1e-5 * (|ref| + max|ref|));
fp16/bf16 results within atol 1e-2 plus one ulp of the dtype relative (apex's GroupNorm
criterion). A result's tolerance follows its own dtype (fp32 weight grads of a bf16
input get the fp32 tolerance).
"""
import importlib
import os

import pytest
import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_interpreted_kernels.py"

kernels = importlib.import_module("fastdiff.kernels.group_norm_silu")
ops = importlib.import_module("fastdiff.ops.group_norm_silu")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# The interpreter turns one-element arrays into Python ints for range() bounds, and
# numpy warns about that on every loop.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def reference(x, weight, bias, num_groups, scale, shift, act, eps=1e-5):
    """The unfused math in fp64."""
    N, C = x.shape[:2]
    h = F.group_norm(x, num_groups, weight, bias, eps)
    per_channel = (N, C) + (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + scale.reshape(per_channel))
    if shift is not None:
        h = h + shift.reshape(per_channel)
    return F.silu(h) if act else h


def assert_matches(name, out, ref):
    """fp32: 1e-5 relative; fp16/bf16: atol 1e-2 + one ulp relative."""
    err = (out.double() - ref).abs()
    if out.dtype == F32:
        bound = 1e-5 * (ref.abs() + ref.abs().max())
    else:
        bound = 1e-2 + torch.finfo(out.dtype).eps * ref.abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{name}: |err| {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} "
        f"(ref {ref.flatten()[worst]:.4g}, dtype {out.dtype})")


def make_inputs(N, C, spatial, dtype, layout, with_scale, with_shift, param_dtype):
    """Fresh random inputs with a nonzero mean; scale/shift as GD makes them (a chunk of
    a [N, 2C, 1, 1] embedding, so non-contiguous)."""
    x = torch.randn(N, C, *spatial) * 1.7 + 0.6
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x = x.to(dtype)
    weight = (torch.randn(C) * 0.4 + 1.0).to(param_dtype)
    bias = (torch.randn(C) * 0.5 + 0.2).to(param_dtype)
    emb = (torch.randn(N, 2 * C, *([1] * len(spatial))) * 0.5).to(dtype)
    scale, shift = emb.chunk(2, dim=1)
    return x, weight, bias, scale if with_scale else None, shift if with_shift else None


# (id, N, C, G, spatial, dtype, layout, scale, shift, act, param dtype, split)
CASES = [
    ("fp32-nchw-scaleshift-silu", 3, 40, 8, (7, 9), F32, "nchw", True, True, True, F32, False),
    ("fp32-cl-scaleshift-silu", 3, 40, 8, (7, 9), F32, "channels_last", True, True, True, F32, False),
    ("fp32-nchw-plain-silu", 3, 40, 8, (7, 9), F32, "nchw", False, False, True, F32, False),
    ("fp32-cl-plain-identity", 3, 40, 8, (7, 9), F32, "channels_last", False, False, False, F32, False),
    ("fp32-nchw-scaleshift-identity", 3, 40, 8, (7, 9), F32, "nchw", True, True, False, F32, False),
    ("bf16-nchw-scaleshift-silu", 3, 40, 8, (7, 9), BF16, "nchw", True, True, True, F32, False),
    ("bf16-cl-plain-silu-bf16params", 3, 40, 8, (7, 9), BF16, "channels_last", False, False, True, BF16,
     False),
    ("fp16-nchw-scaleonly-identity", 3, 40, 8, (7, 9), F16, "nchw", True, False, False, F32, False),
    ("fp16-cl-shiftonly-silu", 3, 40, 8, (7, 9), F16, "channels_last", False, True, True, F32, False),
    ("fp32-c-eq-g", 4, 5, 5, (7, 9), F32, "nchw", True, True, True, F32, False),
    ("bf16-c-eq-g-cl", 4, 5, 5, (7, 9), BF16, "channels_last", True, True, True, F32, False),
    ("fp32-split-nchw-scaleshift-silu", 1, 12, 3, (9, 11), F32, "nchw", True, True, True, F32, True),
    ("bf16-split-cl-plain-identity", 1, 12, 3, (9, 11), BF16, "channels_last", False, False, False, F32,
     True),
    ("fp16-split-c-eq-g", 2, 6, 6, (5, 13), F16, "nchw", True, True, True, F32, True),
    ("fp32-1d-spatial", 3, 12, 6, (37,), F32, "nchw", True, True, True, F32, False),
    ("bf16-split-cl-scaleshift-silu", 1, 12, 3, (9, 11), BF16, "channels_last", True, True, True, F32, True),
]


@pytest.mark.parametrize(
    "N, C, G, spatial, dtype, layout, with_scale, with_shift, act, param_dtype, split",
    [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_forward_and_gradients_match_fp64(N, C, G, spatial, dtype, layout, with_scale, with_shift,
                                          act, param_dtype, split, launches):
    num_splits, _ = kernels.plan_splits(N * G, torch.Size(spatial).numel(), torch.device("cpu"))
    assert (num_splits > 1) == split, "case no longer takes the statistics path it is meant to test"

    inputs = make_inputs(N, C, spatial, dtype, layout, with_scale, with_shift, param_dtype)
    names = ["x", "weight", "bias", "scale", "shift"]
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    x, weight, bias, scale, shift = leaves
    y = ops.group_norm_silu(x, weight, bias, G, eps=1e-5, scale=scale, shift=shift, act=act)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()

    used = [(n, t) for n, t in zip(names, leaves) if t is not None]
    dy = torch.randn_like(y) + 0.3
    grads = torch.autograd.grad(y, [t for _, t in used], dy)
    assert launches == {"group_norm_silu_forward": 1, "group_norm_silu_backward": 1}

    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    y_ref = reference(*ref_leaves[:3], G, ref_leaves[3], ref_leaves[4], act)
    ref_used = [t for t in ref_leaves if t is not None]
    ref_grads = torch.autograd.grad(y_ref, ref_used, dy.double())

    assert_matches("y", y, y_ref)
    for (name, leaf), grad, ref_grad in zip(used, grads, ref_grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape, name
        assert_matches(f"d{name}", grad, ref_grad)


def test_op_returns_the_launchers_results_unchanged():
    # The op's forward and backward are the launchers' outputs, bit for bit (not a
    # fallback that agrees within tolerance); absent scale/shift get no gradient.
    x, weight, bias, scale, shift = make_inputs(1, 12, (9, 11), F32, "nchw", True, False, F32)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias, scale)]
    y = ops.group_norm_silu(*leaves[:3], 3, scale=leaves[3], act=True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)

    scale_2d = scale.reshape(1, 12)
    y_ref, mean, rstd = kernels.group_norm_silu_forward(x, weight, bias, 3, 1e-5, scale_2d, None, True)
    dx, dweight, dbias, dscale, dshift = kernels.group_norm_silu_backward(
        dy, x, weight, bias, mean, rstd, 3, scale_2d, None, True)
    assert dshift is None
    assert torch.equal(y, y_ref)
    for got, ref in zip(grads, (dx, dweight, dbias, dscale.reshape(scale.shape))):
        assert torch.equal(got, ref)


def test_bad_inputs_raise_clear_errors():
    fn = ops.group_norm_silu
    x = torch.randn(2, 12, 5, 5)
    w, b = torch.ones(12), torch.zeros(12)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        fn(x, w, b, 5)
    with pytest.raises(ValueError, match="scale must have shape"):
        fn(x, w, b, 4, scale=torch.zeros(2, 6, 1, 1), shift=torch.zeros(2, 12))
    with pytest.raises(ValueError, match="weight must have shape"):
        fn(x, torch.ones(6), b, 4)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        fn(x.double(), w, b, 4)
