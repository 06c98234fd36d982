"""fastdiff.ops.group_norm_silu on CPU: the torch fallback, the custom-op registration
(opcheck), torch.compile without graph breaks, and the input checks.

The Triton kernels themselves are checked in tests/interpret/ (interpreter) and
tests/test_triton_compile_group_norm_silu.py (GPU compiler).

Tolerances: fp32 results within 1e-5 relative (|err| <= 1e-5 * (|ref| + max|ref|)) of an
fp64 reference; fp16/bf16 within atol 1e-2 plus one ulp of the dtype relative. In fp32
the forward matches guided-diffusion's unfused sequence within 1e-6.
"""
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

gn_ops = importlib.import_module("fastdiff.ops.group_norm_silu")
group_norm_silu = gn_ops.group_norm_silu

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def reference(x, weight, bias, num_groups, scale, shift, act, eps=1e-5):
    """The unfused math (in x's dtype; call it with fp64 tensors)."""
    N, C = x.shape[:2]
    h = F.group_norm(x, num_groups, weight, bias, eps)
    per_channel = (N, C) + (1,) * (x.dim() - 2)
    if scale is not None:
        h = h * (1 + scale.reshape(per_channel))
    if shift is not None:
        h = h + shift.reshape(per_channel)
    return F.silu(h) if act else h


def gd_sequence(x, weight, bias, num_groups, scale, shift, act):
    """guided-diffusion's ResBlock out_layers: GroupNorm32, then scale/shift, then SiLU."""
    h = F.group_norm(x.float(), num_groups, weight, bias, 1e-5).type(x.dtype)
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.silu(h) if act else h


def assert_matches(name, out, ref):
    err = (out.double() - ref).abs()
    if out.dtype == F32:
        bound = 1e-5 * (ref.abs() + ref.abs().max())
    else:
        bound = 1e-2 + torch.finfo(out.dtype).eps * ref.abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{name}: |err| {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g} ({out.dtype})")


def make_inputs(N, C, spatial, dtype, channels_last=False, scale_shift=True):
    x = torch.randn(N, C, *spatial) * 1.7 + 0.6
    if channels_last:
        x = x.to(memory_format=torch.channels_last if len(spatial) == 2 else torch.channels_last_3d)
    x = x.to(dtype)
    weight = torch.randn(C) * 0.4 + 1.0
    bias = torch.randn(C) * 0.5 + 0.2
    emb = (torch.randn(N, 2 * C, *([1] * len(spatial))) * 0.5).to(dtype)
    scale, shift = emb.chunk(2, dim=1) if scale_shift else (None, None)
    return x, weight, bias, scale, shift


CASES = [
    # N, C, G, spatial, dtype, channels_last, scale/shift, act
    (3, 40, 8, (7, 9), F32, False, True, True),
    (3, 40, 8, (7, 9), F32, True, True, True),
    (3, 40, 8, (7, 9), F32, False, False, False),
    (4, 5, 5, (7, 9), F32, False, True, True),
    (2, 12, 3, (3, 4, 5), F32, True, True, False),
    (3, 12, 6, (37,), F32, False, False, True),
    (3, 40, 8, (7, 9), BF16, False, True, True),
    (3, 40, 8, (7, 9), BF16, True, False, True),
    (3, 40, 8, (7, 9), F16, True, True, True),
    (2, 32, 32, (11, 13), F16, False, True, False),
]


@pytest.mark.parametrize("N, C, G, spatial, dtype, channels_last, scale_shift, act", CASES)
def test_cpu_fallback_matches_fp64(N, C, G, spatial, dtype, channels_last, scale_shift, act):
    inputs = make_inputs(N, C, spatial, dtype, channels_last, scale_shift)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    y = group_norm_silu(leaves[0], leaves[1], leaves[2], G, scale=leaves[3], shift=leaves[4], act=act)
    assert y.dtype == dtype and y.stride() == leaves[0].stride()
    used = [t for t in leaves if t is not None]
    dy = torch.randn_like(y) + 0.3
    grads = torch.autograd.grad(y, used, dy)

    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    y_ref = reference(*ref_leaves[:3], G, ref_leaves[3], ref_leaves[4], act)
    ref_grads = torch.autograd.grad(y_ref, [t for t in ref_leaves if t is not None], dy.double())
    assert_matches("y", y, y_ref)
    for leaf, grad, ref_grad in zip(used, grads, ref_grads):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        assert_matches("grad", grad, ref_grad)


@pytest.mark.parametrize("scale_shift, act", [(True, True), (False, True), (False, False)])
def test_fp32_fallback_equals_guided_diffusion_sequence(scale_shift, act):
    x, weight, bias, scale, shift = make_inputs(3, 64, (9, 10), F32, scale_shift=scale_shift)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, weight, bias, scale, shift)]
    used = [t for t in leaves if t is not None]
    y = group_norm_silu(leaves[0], leaves[1], leaves[2], 32, scale=leaves[3], shift=leaves[4], act=act)
    y_gd = gd_sequence(leaves[0], leaves[1], leaves[2], 32, leaves[3], leaves[4], act)
    assert (y - y_gd).abs().max() <= 1e-6
    dy = torch.randn_like(y)
    for grad, grad_gd in zip(torch.autograd.grad(y, used, dy), torch.autograd.grad(y_gd, used, dy)):
        torch.testing.assert_close(grad, grad_gd, rtol=1e-5, atol=1e-5 * grad_gd.abs().max().item())


@pytest.mark.parametrize("scale_shift", [True, False])
def test_opcheck_forward_and_backward_ops(scale_shift):
    x, weight, bias, scale, shift = make_inputs(2, 12, (5, 7), F32, scale_shift=scale_shift)
    weight.requires_grad_()
    bias.requires_grad_()
    x.requires_grad_()
    if scale_shift:
        scale = scale.reshape(2, 12).detach().requires_grad_()
        shift = shift.reshape(2, 12).detach().requires_grad_()
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default,
                          (x, weight, bias, 3, 1e-5, scale, shift, True))
    # The backward op has no autograd formula of its own (no double backward): plain inputs.
    plain = [t.detach() if t is not None else None for t in (x, weight, bias, scale, shift)]
    x, weight, bias, scale, shift = plain
    _, mean, rstd = torch.ops.fastdiff.group_norm_silu(x, weight, bias, 3, 1e-5, scale, shift, True)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu_backward.default,
                          (torch.randn(2, 12, 5, 7), x, weight, bias, mean, rstd, 3, scale, shift, True))


class _NormConv(nn.Module):
    """A ResBlock-sized use of the op: scale/shift from an embedding, SiLU, then a conv."""

    def __init__(self, channels=8, groups=4):
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.randn(channels) * 0.2 + 1)
        self.bias = nn.Parameter(torch.randn(channels) * 0.2)
        self.emb = nn.Linear(4, 2 * channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb):
        scale, shift = self.emb(emb)[..., None, None].chunk(2, dim=1)
        h = group_norm_silu(x, self.weight, self.bias, self.groups, scale=scale, shift=shift)
        return self.conv(h)


def test_torch_compile_fullgraph_forward_and_backward():
    model = _NormConv()
    x = torch.randn(2, 8, 6, 5) + 0.5
    emb = torch.randn(2, 4)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    out = compiled(x, emb)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out_eager = model(x, emb)
    out_eager.square().mean().backward()
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
    for grad, p in zip(grads, model.parameters()):
        torch.testing.assert_close(grad, p.grad, rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 12, 5, 5)
    w, b = torch.ones(12), torch.zeros(12)
    with pytest.raises(ValueError, match=r"channels \(12\) must be divisible by num_groups \(5\)"):
        group_norm_silu(x, w, b, 5)
    with pytest.raises(ValueError, match="scale must have shape"):
        group_norm_silu(x, w, b, 4, scale=torch.zeros(2, 12, 5), shift=torch.zeros(2, 12))
    with pytest.raises(ValueError, match="shift must have shape"):
        group_norm_silu(x, w, b, 4, scale=torch.zeros(2, 12), shift=torch.zeros(3, 12))
    with pytest.raises(ValueError, match="bias must have shape"):
        group_norm_silu(x, w, torch.zeros(6), 4)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        group_norm_silu(x, w, b, 0)
    with pytest.raises(ValueError, match=r"x must be \[N, C, \*spatial\]"):
        group_norm_silu(torch.randn(12), w, b, 4)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        group_norm_silu(x.to(torch.int32), w, b, 4)


def test_triton_path_refuses_cpu_tensors_without_interpreter():
    kernels = importlib.import_module("fastdiff.kernels.group_norm_silu")
    assert not kernels.INTERPRET
    x, weight, bias = torch.randn(2, 8, 3, 3), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.group_norm_silu_forward(x, weight, bias, 4, 1e-5, None, None, True)
    stats = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kernels.group_norm_silu_backward(x, x, weight, bias, stats, stats, 4, None, None, True)


def test_interpreter_flag_is_read_like_triton(monkeypatch):
    # The ops send CPU tensors to the launchers exactly when Triton interprets the kernels:
    # both must read TRITON_INTERPRET the same way (triton's knob reads the variable anew).
    import triton

    from fastdiff.kernels.inputs import interpreting

    for value in ["1", "true", "TRUE", "On", "yes", "y", "0", "false", "off", "2", "", " 1", "t"]:
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert interpreting() == triton.knobs.runtime.interpret, repr(value)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not interpreting()


def test_split_plan_fills_the_gpu_and_covers_the_spatial_range(monkeypatch):
    kernels = importlib.import_module("fastdiff.kernels.group_norm_silu")
    monkeypatch.setattr(kernels, "_sm_count", lambda index: 132)  # an H100, without one
    gpu = torch.device("cuda", 0)
    assert kernels.plan_splits(32 * 32, 32 * 32, gpu) == (1, 1024)  # [32, 512, 32, 32]: enough groups
    for groups, S in [(32, 64 * 64), (1, 4096), (8, 300 * 7)]:
        splits, chunk = kernels.plan_splits(groups, S, gpu)
        assert splits > 1 and (splits - 1) * chunk < S <= splits * chunk
        assert chunk >= kernels.MIN_SPLIT_S and groups * (splits - 1) < 2 * 132


GPU_CASES = [
    # N, C, G, spatial, dtype, channels_last, scale/shift, act
    (3, 40, 8, (7, 9), F32, False, True, True),
    (4, 128, 32, (32, 32), BF16, False, True, True),
    (4, 128, 32, (16, 16), F16, True, True, True),
    (1, 320, 32, (64, 64), BF16, False, True, True),  # few groups: the split-statistics path
    (2, 64, 32, (8, 8), F32, True, False, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("N, C, G, spatial, dtype, channels_last, scale_shift, act", GPU_CASES)
def test_cuda_triton_op_matches_fp64_and_is_deterministic(N, C, G, spatial, dtype, channels_last,
                                                          scale_shift, act):
    inputs = [t.cuda() if t is not None else None
              for t in make_inputs(N, C, spatial, dtype, channels_last, scale_shift)]
    dy = torch.randn(N, C, *spatial, device="cuda", dtype=dtype)

    def forward_backward():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
        y = group_norm_silu(leaves[0], leaves[1], leaves[2], G, scale=leaves[3], shift=leaves[4], act=act)
        return [y] + list(torch.autograd.grad(y, [t for t in leaves if t is not None], dy))

    first, second = forward_backward(), forward_backward()
    for a, b in zip(first, second):
        assert torch.equal(a, b), "two identical runs differ: the kernels must be deterministic"
    ref_leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    y_ref = reference(*ref_leaves[:3], G, ref_leaves[3], ref_leaves[4], act)
    refs = [y_ref] + list(torch.autograd.grad(y_ref, [t for t in ref_leaves if t is not None], dy.double()))
    for name, out, ref in zip(["y", "dx", "dweight", "dbias", "dscale", "dshift"], first, refs):
        assert_matches(name, out, ref)
