"""Attention custom ops in the main process: CPU fallbacks, op registration, compile.

The Triton kernels themselves are tested under the interpreter
(tests/interpret/test_attention_interp.py) and compiled for sm_90/sm_80 in
tests/test_triton_compile_attention.py; GPU parity runs here when CUDA is present.
"""
import importlib
import math

import pytest
import torch

import fastdiff.ops
from fastdiff.models.layers import MultiHeadQKVAttention
from fastdiff.ops.attention import attention, gd_qkv_attention, qkv_attention

kernels = importlib.import_module("fastdiff.kernels.attention")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# CPU fallback error vs float64, relative to max(|reference|, 1), as (forward output,
# gradients): about 2x the worst error measured over these tests' shapes and seed, so a
# fallback that loses precision fails. The attention fallback computes in fp32 and rounds
# each result once: measured out 2.5e-3 / 3.1e-4 and grads 3.5e-3 / 5.4e-4 (bf16 / fp16),
# about one rounding to the dtype (2^-8 / 2^-11; the incoming gradient is rounded too). A softmax
# computed in bf16/fp16 measured out 8.6e-3 / 1.1e-3 and grads 9.2e-3 / 1.5e-3: it fails.
# fp32 (unchanged, 1.5x): measured 1.3e-6 (qkv 6.8e-7), rounding of sums of up to 160 terms.
ATTENTION_TOL = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (5e-3, 7e-3),
                 torch.float16: (6e-4, 1.1e-3)}
# The qkv fallback's forward is guided-diffusion's math (scores and probabilities rounded to
# the input dtype), so its output error is GD's: measured 9.8e-3 / 1.1e-3, bound 2x. Its
# backward is the fp32 one: measured 3.2e-3 / 4.3e-4, bound ~1.5x, because a bf16/fp16
# softmax there measured 6.3e-3 / 7.9e-4 (2x would let it pass).
QKV_TOL = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (2e-2, 5e-3),
           torch.float16: (2.3e-3, 6.5e-4)}


def _randn(*shape, dtype=torch.float32, device="cpu"):
    return (torch.randn(*shape, dtype=torch.float64) + 0.3).to(device=device, dtype=dtype)


def _rel_err(got, ref):
    return (got.double() - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)


def _math_attention(q, k, v, scale):
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def _gd_reference(qkv, num_heads, legacy_order, quarter_scale=None):
    """guided-diffusion's QKVAttentionLegacy / QKVAttention forward, step by step: C^-1/4
    on q and k in the input dtype, einsum, softmax in fp32 cast back, einsum with v."""
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    s = 1 / math.sqrt(math.sqrt(ch)) if quarter_scale is None else quarter_scale
    if legacy_order:
        q, k, v = qkv.reshape(batch * num_heads, 3 * ch, length).split(ch, dim=1)
        q, k = q * s, k * s
    else:
        q, k, v = qkv.chunk(3, dim=1)
        q = (q * s).view(batch * num_heads, ch, length)
        k = (k * s).view(batch * num_heads, ch, length)
        v = v.reshape(batch * num_heads, ch, length)
    w = torch.einsum("bct,bcs->bts", q, k)
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    return torch.einsum("bts,bcs->bct", w, v).reshape(batch, -1, length)


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


# ----------------------------------------------------------------------------- CPU fallbacks
@pytest.mark.parametrize("legacy_order", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_fallback_forward_is_guided_diffusions_math(legacy_order, dtype):
    qkv = _randn(3, 3 * 4 * 40, 77, dtype=dtype)
    out = qkv_attention(qkv, 4, legacy_order)
    assert out.is_contiguous() and out.shape == (3, 4 * 40, 77)
    assert torch.equal(out, _gd_reference(qkv, 4, legacy_order))


@pytest.mark.parametrize("legacy_order", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_model_math_backend_is_guided_diffusions_math(legacy_order, dtype):
    # attention_backend="math" runs the same function as the op's CPU forward: GD's einsum
    # op for op, so equal to it bit for bit (what GD parity of the default UNet rests on).
    qkv = _randn(2, 3 * 2 * 24, 33, dtype=dtype)
    out = MultiHeadQKVAttention(2, legacy_order, "math")(qkv)
    assert torch.equal(out, _gd_reference(qkv, 2, legacy_order))


def test_gd_qkv_attention_returns_the_lse_only_when_asked():
    qkv = _randn(2, 3 * 2 * 16, 9)
    out = gd_qkv_attention(qkv, 2, False)
    out_too, lse = gd_qkv_attention(qkv, 2, False, need_lse=True)
    assert isinstance(out, torch.Tensor) and torch.equal(out, out_too)
    assert torch.equal(lse, torch.ops.fastdiff.qkv_attention(qkv, 2, False)[1])


@pytest.mark.parametrize("legacy_order", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_fallback_matches_float64(legacy_order, dtype):
    heads, ch, length = 2, 40, 77
    qkv = _randn(2, 3 * heads * ch, length, dtype=dtype)
    grad_out = _randn(2, heads * ch, length, dtype=torch.float64)
    ref = _grads(lambda x: _gd_reference(x, heads, legacy_order), [qkv.double()], grad_out)
    got = _grads(lambda x: qkv_attention(x, heads, legacy_order), [qkv], grad_out)
    for name, g, r, tol in zip(["out", "dqkv"], got, ref, QKV_TOL[dtype]):
        assert g.dtype == dtype
        assert _rel_err(g, r) <= tol, f"{name}: {_rel_err(g, r):.3e} > {tol:.1e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_q,seq_k,head_dim", [(77, 77, 32), (17, 30, 40), (1, 1, 64), (9, 13, 160)])
def test_attention_fallback_matches_float64(dtype, seq_q, seq_k, head_dim):
    q = _randn(2, 3, seq_q, head_dim, dtype=dtype)
    k = _randn(2, 3, seq_k, head_dim, dtype=dtype)
    v = _randn(2, 3, seq_k, head_dim, dtype=dtype).transpose(2, 3).contiguous().transpose(2, 3)
    scale = 0.2
    grad_out = _randn(2, 3, seq_q, head_dim, dtype=torch.float64)
    ref = _grads(lambda a, b, c: _math_attention(a, b, c, scale),
                 [q.double(), k.double(), v.double()], grad_out)
    got = _grads(lambda a, b, c: attention(a, b, c, scale), [q, k, v], grad_out)
    out_tol, grad_tol = ATTENTION_TOL[dtype]
    for name, g, r, tol in zip(["out", "dq", "dk", "dv"], got, ref, [out_tol] + 3 * [grad_tol]):
        assert g.dtype == dtype and g.shape == r.shape
        assert _rel_err(g, r) <= tol, f"{name}: {_rel_err(g, r):.3e} > {tol:.1e}"


def test_attention_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = (_randn(1, 2, 11, 36) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, 1 / 6))


def test_log_sum_exp_output():
    q, k, v = (_randn(1, 2, 11, 32) for _ in range(3))
    _, lse = torch.ops.fastdiff.attention(q, k, v, 0.5)
    ref = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * 0.5, dim=-1)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-6, atol=1e-6)
    qkv = _randn(2, 3 * 2 * 16, 9)
    _, lse = torch.ops.fastdiff.qkv_attention(qkv, 2, False)
    q, k, _ = qkv.double().chunk(3, dim=1)
    scores = torch.einsum("nhct,nhcs->nhts", q.unflatten(1, (2, 16)), k.unflatten(1, (2, 16))) / 4
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-6)


def test_lazy_package_export_resolves_qkv_attention():
    assert fastdiff.ops.qkv_attention is qkv_attention


# ----------------------------------------------------------------------------- errors
def test_launchers_reject_cpu_tensors_without_interpreter():
    q = _randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.attention_forward(q, q, q)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.attention_backward(q, q, q, q, q, _randn(1, 1, 8))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.qkv_attention_forward(_randn(1, 3 * 32, 8), 1)


def test_launchers_reject_head_dim_over_128():
    q = _randn(1, 1, 8, 136)
    with pytest.raises(ValueError, match="head dim 136 > 128"):
        kernels.attention_forward(q, q, q)


def test_ops_reject_bad_shapes():
    q = _randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="mismatched shapes"):
        attention(q, _randn(1, 3, 8, 32), _randn(1, 3, 8, 32))
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="dtypes differ"):
        attention(q, q.bfloat16(), q)
    with pytest.raises(ValueError, match="multiple of 3\\*num_heads"):
        qkv_attention(_randn(1, 100, 8), 2)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        qkv_attention(_randn(1, 3 * 32, 8), 0)
    with pytest.raises(ValueError, match="3-D"):
        qkv_attention(_randn(3 * 32, 8), 1)


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("element_size,precision", [(2, "ieee"), (4, "ieee"), (4, "tf32")])
@pytest.mark.parametrize("shared_limit", [227 * 1024, 163 * 1024, 99 * 1024])
def test_every_head_dim_keeps_configs_within_shared_memory(element_size, precision, shared_limit):
    # H100 / A100 / consumer-Ampere shared memory: each kernel must keep a config.
    for head_dim in (16, 32, 40, 64, 80, 128):
        block_d = kernels.head_dim_block(head_dim)
        for kind in kernels.KERNEL_CONFIGS:
            kept = kernels.usable_configs(kind, block_d, element_size, precision, shared_limit)
            assert kept, f"{kind}: no config for head dim {head_dim}, {element_size}-byte dtype"
            for cfg in kept:
                assert kernels.shared_memory_estimate(kind, cfg, block_d, element_size) <= shared_limit


# ----------------------------------------------------------------------------- op registration
def _opcheck_inputs():
    q, k, v = (_randn(2, 2, 13, 24).requires_grad_() for _ in range(3))
    qkv = _randn(2, 3 * 2 * 24, 13).requires_grad_()
    return q, k, v, qkv


@pytest.mark.parametrize("legacy_order", [True, False])
def test_opcheck_qkv_attention(legacy_order):
    _, _, _, qkv = _opcheck_inputs()
    torch.library.opcheck(torch.ops.fastdiff.qkv_attention.default, (qkv, 2, legacy_order))
    out, lse = torch.ops.fastdiff.qkv_attention(qkv.detach(), 2, legacy_order)
    torch.library.opcheck(torch.ops.fastdiff.qkv_attention_backward.default,
                          (torch.randn_like(out), qkv.detach(), out, lse, 2, legacy_order))


def test_opcheck_attention():
    q, k, v, _ = _opcheck_inputs()
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, None))
    torch.library.opcheck(torch.ops.fastdiff.attention.default, (q, k, v, 0.25))
    out, lse = torch.ops.fastdiff.attention(q.detach(), k.detach(), v.detach(), 0.25)
    torch.library.opcheck(torch.ops.fastdiff.attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.25))


class _TwoAttentions(torch.nn.Module):
    """GD-style qkv attention followed by [B, H, S, D] attention over a strided view."""

    def __init__(self, channels=48, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Conv1d(channels, 3 * channels, 1)
        self.proj = torch.nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        h = fastdiff.ops.qkv_attention(self.qkv(x), self.heads, True)  # the UNet's call
        q = h.unflatten(1, (self.heads, -1)).transpose(2, 3)  # [N, H, T, C] view
        h = attention(q, q, q).transpose(2, 3).flatten(1, 2)
        return self.proj(h) + x


def test_torch_compile_fullgraph_matches_eager():
    model = _TwoAttentions()
    x = _randn(2, 48, 21)
    eager = _grads(model, [x], torch.ones(2, 48, 21))
    eager_weight_grad = model.qkv.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    got = _grads(compiled, [x], torch.ones(2, 48, 21))
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.qkv.weight.grad, eager_weight_grad, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("legacy_order", [True, False])
@pytest.mark.parametrize("heads,ch,length", [(4, 64, 256), (8, 32, 1024), (2, 40, 77), (1, 128, 130)])
def test_cuda_qkv_attention_matches_float64(dtype, legacy_order, heads, ch, length):
    qkv = _randn(4, 3 * heads * ch, length, dtype=dtype, device="cuda")
    grad_out = _randn(4, heads * ch, length, dtype=torch.float64, device="cuda")
    ref = _grads(lambda x: _gd_reference(x, heads, legacy_order), [qkv.double()], grad_out)
    same = _grads(lambda x: _gd_reference(x, heads, legacy_order), [qkv], grad_out)
    got = _grads(lambda x: qkv_attention(x, heads, legacy_order), [qkv], grad_out)
    floor = {torch.float32: 5e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    for name, g, r, s in zip(["out", "dqkv"], got, ref, same):
        bound = 2 * _rel_err(s, r) + floor
        assert _rel_err(g, r) <= bound, f"{name}: {_rel_err(g, r):.3e} > {bound:.3e}"


@pytest.mark.gpu
def test_cuda_fp32_does_not_run_in_tf32_by_default(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    q, k, v = (_randn(2, 4, 300, 64, device="cuda") for _ in range(3))
    ref = _math_attention(q.double(), k.double(), v.double(), 1 / 8)
    assert _rel_err(attention(q, k, v), ref) < 1e-5


@pytest.mark.gpu
def test_cuda_backward_is_deterministic():
    qkv = _randn(8, 3 * 4 * 64, 1024, dtype=torch.bfloat16, device="cuda").requires_grad_()
    grads = []
    for _ in range(2):
        qkv.grad = None
        qkv_attention(qkv, 4, True).backward(torch.ones(8, 4 * 64, 1024, device="cuda", dtype=torch.bfloat16))
        grads.append(qkv.grad.clone())
    assert torch.equal(grads[0], grads[1])
