"""Triton attention kernels under TRITON_INTERPRET=1, against a float64 reference.

Tolerance (FlashAttention's criterion): the kernel's max error against float64 is at
most twice the error of the same-dtype torch math attention, plus a small floor for
outputs torch happens to get exact, and never above a per-dtype ceiling unless torch's
own error is already that large (ill-conditioned inputs). Errors are measured relative
to max(|reference|, 1). Shapes are tiny and odd (the interpreter runs
each program in Python) and the interpreter config uses 32×16 blocks, so 17/77/130
exercise several blocks plus a masked tail and D = 40 / 80 the masked head dim.

Everything goes through the custom ops (fastdiff.ops.attention / qkv_attention), the one
differentiable path; the tests check that the ops ran the Triton launchers (on CPU they
run them only under the interpreter).
"""
import math

import pytest
import torch

from fastdiff.kernels.attention import (INTERPRETER_CONFIG, attention_backward, attention_forward,
                                        qkv_attention_backward, qkv_attention_forward)
from fastdiff.ops.attention import attention, qkv_attention

FLOOR = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CEILING = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _randn(*shape, dtype=torch.float32):
    """Fresh random values with a non-zero mean (so softmax rows are not flat)."""
    return (torch.randn(*shape, dtype=torch.float64) + 0.3).to(dtype)


def _math_attention(q, k, v, scale):
    return torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1) @ v


def _forward_backward(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _assert_flash_close(names, got, ref64, same_dtype, dtype):
    for name, g, r, b in zip(names, got, ref64, same_dtype):
        scale = max(r.abs().max().item(), 1.0)
        err = (g.double() - r).abs().max().item() / scale
        base = (b.double() - r).abs().max().item() / scale
        bound = 2 * base + FLOOR[dtype]
        if 2 * base <= CEILING[dtype]:  # well conditioned: the dtype's ceiling holds too
            bound = min(bound, CEILING[dtype])
        assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} (torch {dtype} math: {base:.3e})"


def _check_against_reference(fn, inputs, reference, dtype, names):
    """Kernel vs float64 reference vs same-dtype torch math, forward and every gradient."""
    ref_inputs = [t.double() for t in inputs]
    grad_out = _randn(*reference(*ref_inputs).shape, dtype=torch.float64)
    ref64 = _forward_backward(reference, ref_inputs, grad_out)
    same_dtype = _forward_backward(reference, inputs, grad_out)
    got = _forward_backward(fn, inputs, grad_out)
    for g, t in zip(got[1:], inputs):
        assert g.dtype == t.dtype and g.shape == t.shape
    _assert_flash_close(names, got, ref64, same_dtype, dtype)


CASES = [  # (dtype, batch, heads, seq_q, seq_k, head_dim)
    (torch.float32, 1, 2, 77, 77, 32),
    (torch.float32, 2, 1, 17, 17, 40),
    (torch.float32, 1, 2, 1, 1, 64),
    (torch.float32, 1, 1, 33, 64, 64),   # cross attention, keys a multiple of the block
    (torch.float32, 1, 1, 20, 9, 80),
    (torch.bfloat16, 1, 2, 77, 77, 64),
    (torch.bfloat16, 1, 1, 130, 130, 40),
    (torch.bfloat16, 1, 1, 20, 20, 128),
    (torch.float16, 1, 2, 77, 77, 32),
    (torch.float16, 2, 1, 17, 17, 64),
]


@pytest.mark.parametrize("dtype,batch,heads,seq_q,seq_k,head_dim", CASES)
def test_attention_matches_float64(dtype, batch, heads, seq_q, seq_k, head_dim, launches):
    q = _randn(batch, heads, seq_q, head_dim, dtype=dtype)
    k = _randn(batch, heads, seq_k, head_dim, dtype=dtype)
    v = _randn(batch, heads, seq_k, head_dim, dtype=dtype)
    scale = 1.0 / math.sqrt(head_dim)
    _check_against_reference(lambda a, b, c: attention(a, b, c),
                             [q, k, v], lambda a, b, c: _math_attention(a, b, c, scale),
                             dtype, ["out", "dq", "dk", "dv"])
    assert launches == {"attention_forward": 1, "attention_backward": 1}


def test_interpreter_blocks_are_what_the_cases_assume():
    # The odd lengths above are chosen against these block sizes.
    assert INTERPRETER_CONFIG["BLOCK_M"] == 32 and INTERPRETER_CONFIG["BLOCK_N"] == 16


def test_log_sum_exp_matches_float64():
    q, k, v = (_randn(2, 2, 37, 32) for _ in range(3))
    scale = 0.7
    _, lse = attention_forward(q, k, v, scale)
    ref = torch.logsumexp((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs_and_custom_scale(dtype):
    # q as a [B, S, H, D] tensor permuted to [B, H, S, D]; k a slice of a wider head dim;
    # v with the sequence as its innermost axis. None of them is contiguous.
    q = _randn(2, 29, 3, 32, dtype=dtype).permute(0, 2, 1, 3)
    k = _randn(2, 3, 45, 64, dtype=dtype)[..., 5:37]
    v = _randn(2, 3, 32, 45, dtype=dtype).transpose(2, 3)
    assert not any(t.is_contiguous() for t in (q, k, v))
    scale = 0.3
    _check_against_reference(lambda a, b, c: attention(a, b, c, scale=scale),
                             [q, k, v], lambda a, b, c: _math_attention(a, b, c, scale),
                             dtype, ["out", "dq", "dk", "dv"])


def test_broadcast_grad_out_with_zero_strides():
    q, k, v = (_randn(1, 2, 21, 32).requires_grad_() for _ in range(3))
    attention(q, k, v).sum().backward()  # grad_out is an expanded (stride 0) tensor
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _math_attention(*ref, 1 / math.sqrt(32)).sum().backward()
    for got, r in zip((q, k, v), ref):
        torch.testing.assert_close(got.grad.double(), r.grad, rtol=1e-5, atol=1e-5)


def _gd_attention_float64(qkv, num_heads, legacy_order):
    """guided-diffusion's QKVAttention(Legacy) math in float64, written from its layout."""
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if legacy_order:
        q, k, v = qkv.reshape(batch * num_heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(batch * num_heads, ch, length) for t in qkv.chunk(3, dim=1))
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    return torch.einsum("bts,bcs->bct", weights, v).reshape(batch, -1, length)


@pytest.mark.parametrize("legacy_order", [True, False])
@pytest.mark.parametrize("dtype,heads,head_dim,length", [
    (torch.float32, 2, 32, 77),
    (torch.bfloat16, 2, 40, 45),
    (torch.float16, 1, 64, 33),
])
def test_qkv_layout_matches_guided_diffusion(legacy_order, dtype, heads, head_dim, length, launches):
    qkv = _randn(2, 3 * heads * head_dim, length, dtype=dtype)
    _check_against_reference(lambda x: qkv_attention(x, heads, legacy_order), [qkv],
                             lambda x: _gd_attention_float64(x, heads, legacy_order),
                             dtype, ["out", "dqkv"])
    assert launches["qkv_attention_forward"] == 1 and launches["qkv_attention_backward"] == 1


def test_qkv_reads_strided_input_and_writes_gd_layout():
    # qkv with a non-unit sequence stride (every other time step of a wider tensor).
    heads, head_dim = 2, 32
    qkv = _randn(2, 3 * heads * head_dim, 2 * 23)[:, :, ::2]
    out = qkv_attention(qkv, heads, legacy_order=True)
    assert out.shape == (2, heads * head_dim, 23) and out.is_contiguous()
    ref = _gd_attention_float64(qkv.double(), heads, True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_ops_return_the_launchers_results_unchanged():
    # The ops' forward and backward are the launchers' outputs, bit for bit (not a
    # fallback that agrees within tolerance).
    q, k, v = (_randn(1, 2, 19, 32, dtype=torch.bfloat16) for _ in range(3))
    grad_out = _randn(1, 2, 19, 32, dtype=torch.bfloat16)
    got = _forward_backward(attention, [q, k, v], grad_out)
    out, lse = attention_forward(q, k, v)
    assert torch.equal(got[0], out)
    for g, ref in zip(got[1:], attention_backward(grad_out, q, k, v, out, lse)):
        assert torch.equal(g, ref)

    qkv = _randn(1, 3 * 2 * 32, 19, dtype=torch.bfloat16)
    grad_out = _randn(1, 2 * 32, 19, dtype=torch.bfloat16)
    for legacy in (True, False):
        out_got, grad_got = _forward_backward(lambda x: qkv_attention(x, 2, legacy), [qkv], grad_out)
        out, lse = qkv_attention_forward(qkv, 2, legacy)
        assert torch.equal(out_got, out)
        assert torch.equal(grad_got, qkv_attention_backward(grad_out, qkv, out, lse, 2, legacy))


def test_head_dim_over_128_is_rejected():
    q = _randn(1, 1, 8, 160)
    with pytest.raises(ValueError, match="head dim 160"):
        attention(q, q, q)
    with pytest.raises(ValueError, match="head dim 136"):
        qkv_attention(_randn(1, 3 * 136, 8), 1)


def test_bad_inputs_are_rejected():
    q = _randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="mismatched shapes"):
        attention(q, _randn(1, 2, 8, 16), _randn(1, 2, 8, 16))
    with pytest.raises(ValueError, match="mismatched shapes"):
        attention(q, q, _randn(1, 2, 9, 32))
    with pytest.raises(TypeError, match="dtypes differ"):
        attention(q, q, q.half())
    with pytest.raises(TypeError, match="float64"):
        attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="multiple of 3\\*num_heads"):
        qkv_attention(_randn(1, 100, 8), 2)


def test_very_negative_scores_stay_finite():
    # Every score ≈ −110: the log-sum-exp is far below 0, so anything computed as
    # exp(0 − lse) (e.g. for a masked key of the tail block) would overflow.
    k = -torch.ones(1, 1, 21, 32) + 0.01 * torch.randn(1, 1, 21, 32)
    q = 20 * torch.ones(1, 1, 21, 32)
    v = _randn(1, 1, 21, 32)
    scale = 1 / math.sqrt(32)
    _check_against_reference(lambda a, b, c: attention(a, b, c), [q, k, v],
                             lambda a, b, c: _math_attention(a, b, c, scale),
                             torch.float32, ["out", "dq", "dk", "dv"])
