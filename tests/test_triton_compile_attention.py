"""Compile the attention Triton kernels with the real GPU compiler, on the CPU.

The interpreter accepts code that the GPU compiler rejects (dot shapes and dtypes,
shared-memory overflow), and a config that spills registers is slow before the autotuner
ever times it. So every config the autotuners may launch on sm_90 (kernels.usable_configs)
for head dims 32, 64 and 128 in bf16 and fp16 -- the cases of
benchmarks/compile_report.py -- is compiled down to a cubin and must fit the shared
memory, stay within the estimate the autotuner prunes with, and neither spill nor need a
stack frame. One config per kernel is compiled (and must be clean) for sm_80, a masked
head dim and the contiguous [B, H, S, D] layout, and only compiled for odd sizes and for
fp32 (IEEE and TF32, which the launchers still accept).

fp32 inputs do not reach these kernels on CUDA: every IEEE fp32 tile spilled (1.8-12 KB
of stack per thread) and took 3-20 s to compile, so the custom ops run fp32 with torch;
the last tests pin that routing.
"""
import importlib

import pytest
import torch
# tests/ is on sys.path (rootdir conftest, no __init__.py): the shared helpers import by name.
from triton_compile import SHARED_LIMIT, case_id, compile_clean, compile_fitting, report

kernels = importlib.import_module("fastdiff.kernels.attention")
ops = importlib.import_module("fastdiff.ops.attention")

KIND_OF_KERNEL = {name: kind for kind, name in report.ATTENTION_KERNELS.items()}
SM90_CASES = report.attention_cases(90)


@pytest.mark.parametrize("case", SM90_CASES, ids=case_id)
def test_every_kept_config_compiles_clean_for_sm90(case):
    result = compile_clean(case)
    kind = KIND_OF_KERNEL.get(case.kernel)
    if kind is None:
        return  # the delta kernel: no autotuned blocks, no estimate
    cfg = dict(BLOCK_M=dict(case.constexprs)["BLOCK_M"], BLOCK_N=dict(case.constexprs)["BLOCK_N"],
               num_warps=case.num_warps, num_stages=case.num_stages)
    # The autotuner prunes by this estimate: below the real figure it could pick configs
    # that do not fit.
    estimate = kernels.shared_memory_estimate(kind, cfg, kernels.head_dim_block(case.head_dim),
                                              report.ELEMENT_SIZE[case.dtype])
    assert result.shared_bytes <= estimate, (
        f"{case_id(case)}: {result.shared_bytes} B > estimate {estimate} B")


def test_every_kernel_keeps_two_configs_for_each_head_dim_and_dtype():
    # The parametrization above would silently shrink if pruning emptied a list, and one
    # config leaves the autotuner nothing to choose from.
    for dtype in report.ATTENTION_DTYPES:
        for head_dim in report.ATTENTION_HEAD_DIMS:
            for kernel in report.ATTENTION_KERNELS.values():
                kept = [c for c in SM90_CASES
                        if (c.kernel, c.dtype, c.head_dim) == (kernel, dtype, head_dim)]
                assert len(kept) >= 2, (kernel, dtype, head_dim)


def test_register_limited_configs_are_kept_up_to_their_limit_only():
    # m128n64w4s3 spills at head dim 128 (255 registers): kept for 64, not for 128.
    spilling = kernels._cfg(128, 64, 4, 3)
    assert spilling in kernels.usable_configs("forward", 64, 2)
    assert spilling not in kernels.usable_configs("forward", 128, 2)


@pytest.mark.parametrize("kind", list(report.ATTENTION_KERNELS))
@pytest.mark.parametrize("variant", ["sm80", "masked-head-dim", "bhsd-layout", "odd-sizes"])
def test_one_config_per_variant_compiles(kind, variant):
    head_dim, arch, extra = 64, 90, {}
    if variant == "sm80":
        arch = 80
    elif variant == "masked-head-dim":
        head_dim = 40
    elif variant == "odd-sizes":
        head_dim, extra = 40, dict(aligned=False)  # no divisibility hints: unvectorized loads
    else:
        extra = dict(layout="bhsd")
    usable = kernels.usable_configs(kind, kernels.head_dim_block(head_dim), 2, "ieee", SHARED_LIMIT[arch])
    case = report.attention_case(kind, head_dim, usable[0], arch=arch, **extra)
    # Odd sizes with a masked head dim only have to compile: their masked, unvectorized
    # loads spill in some configs (16 B in the forward's m128n64w4s3 at head dim 40).
    (compile_fitting if variant == "odd-sizes" else compile_clean)(case)


@pytest.mark.parametrize("kind", list(report.ATTENTION_KERNELS))
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fp32_compiles(kind, precision):
    # Not run on CUDA by the ops (spills, see the module docstring), but the launchers take
    # fp32: it must still compile. The smallest config: fp32 FMA dots compile slowly.
    usable = kernels.usable_configs(kind, 32, 4, precision)
    compile_fitting(report.attention_case(kind, 32, usable[-1], "fp32", precision))


@pytest.mark.parametrize("head_dim", [40])
def test_delta_kernel_compiles_for_a_masked_head_dim_and_sm80(head_dim):
    # sm_90 with head dims 32/64/128 is among the report's cases above.
    for arch in (90, 80):
        compile_clean(report.attention_delta_case(head_dim, arch=arch))


# ----------------------------------------------------------------------------- fp32 routing
CUDA_KEY = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)


def cuda_impl(op, *args):
    """Run the op's CUDA implementation on CPU tensors (no GPU here): what a CUDA call runs."""
    return op.default.redispatch(CUDA_KEY, *args)


def test_cuda_impl_runs_fp32_with_torch_and_gets_the_gradient_right():
    torch.manual_seed(0)
    heads, head_dim, length = 2, 8, 5
    qkv = torch.randn(2, 3 * heads * head_dim, length, dtype=torch.float64)
    grad_out = torch.randn(2, heads * head_dim, length, dtype=torch.float64)
    ref_qkv = qkv.clone().requires_grad_()
    ref_out = ops.gd_qkv_attention(ref_qkv, heads, True)
    ref_out.backward(grad_out)

    out, lse = cuda_impl(torch.ops.fastdiff.qkv_attention, qkv.float(), heads, True)
    grad = cuda_impl(torch.ops.fastdiff.qkv_attention_backward, grad_out.float(), qkv.float(),
                     out, lse, heads, True)
    # fp32 against float64 autograd through GD's math, over 5 keys: rounding only (~1e-7
    # per operation); 1e-5 would not hide a wrong formula (errors of order 1).
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_qkv.grad.float(), rtol=1e-5, atol=1e-5)

    q, k, v = (t.requires_grad_() for t in torch.randn(3, 1, heads, length, head_dim,
                                                      dtype=torch.float64).unbind(0))
    ref_out = torch.softmax(q @ k.transpose(-1, -2) * head_dim ** -0.5, dim=-1) @ v
    ref_out.backward(torch.ones_like(ref_out))
    args = [t.detach().float() for t in (q, k, v)]
    out, lse = cuda_impl(torch.ops.fastdiff.attention, *args, None)
    grads = cuda_impl(torch.ops.fastdiff.attention_backward, torch.ones_like(out), *args, out, lse, None)
    torch.testing.assert_close(out, ref_out.float(), rtol=1e-5, atol=1e-5)
    for grad, ref in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(grad, ref.float(), rtol=1e-5, atol=1e-5)


def test_cuda_impl_logs_the_fp32_fallback_once(monkeypatch, caplog):
    monkeypatch.setattr(ops, "_logged_fp32_fallback", False)
    qkv = torch.randn(1, 3 * 8, 4)
    with caplog.at_level("INFO", logger="fastdiff"):
        cuda_impl(torch.ops.fastdiff.qkv_attention, qkv, 1, True)
        cuda_impl(torch.ops.fastdiff.qkv_attention, qkv, 1, True)
    assert [r.getMessage() for r in caplog.records].count(
        "fastdiff attention: fp32 inputs run torch's attention math on CUDA, not the Triton "
        "kernels (IEEE fp32 tiles spill registers on sm_90); bf16/fp16 run Triton") == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_impl_sends_bf16_and_fp16_to_triton(dtype):
    # The Triton launcher refuses CPU tensors outside the interpreter: reaching that error
    # shows the CUDA impl took the Triton path.
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda_impl(torch.ops.fastdiff.qkv_attention, torch.randn(1, 3 * 16, 4, dtype=dtype), 1, True)
