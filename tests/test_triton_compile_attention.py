"""Compile the attention Triton kernels with the real GPU compiler, on the CPU.

The interpreter accepts code that the GPU compiler rejects (dot shapes and dtypes,
shared-memory overflow), so every kernel is compiled down to a cubin for sm_90 in every
block configuration its autotuner can pick (kernels.usable_configs) for head dims 32,
64 and 128 in bf16, and once per kernel for sm_80, fp16, fp32 (IEEE and TF32), a masked
head dim and the contiguous [B, H, S, D] layout. The shared memory each program needs
is checked against the chip's limit and against the estimate the autotuner prunes with.

Argument types follow the launchers: q/k/v/o and gradients in the input dtype, lse and
delta fp32; guided-diffusion's in-place qkv layout by default (the sequence stride is 1,
which triton specializes as a constant), with sizes that are multiples of 16 (what lets
the loads vectorize).
"""
import importlib

import pytest
# tests/ is on sys.path (rootdir conftest, no __init__.py): the shared helpers import by name.
from triton_compile import SHARED_LIMIT, compile_for_gpu, jit_function

kernels = importlib.import_module("fastdiff.kernels.attention")

KERNEL_NAMES = {
    "forward": "_attention_fwd_kernel",
    "backward_dkdv": "_attention_bwd_dkdv_kernel",
    "backward_dq": "_attention_bwd_dq_kernel",
}
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
FP32_PTRS = {"lse_ptr", "delta_ptr"}
# Which strides triton sees as 1: GD's [N, 3·H·C, T] views have a unit sequence stride,
# contiguous [B, H, S, D] tensors a unit head-dim stride.
UNIT_STRIDE_SUFFIX = {"qkv": "s", "bhsd": "d"}


def compile_kernel(name, constexprs, num_warps, num_stages, arch=90, dtype="bf16",
                   layout="qkv", aligned=True):
    """triton.compile one kernel as the launcher would specialize it; check shared memory."""
    fn = jit_function(kernels, name)
    signature, attrs = {}, {}
    constants = dict(constexprs)
    for index, param in enumerate(fn.params):
        arg = param.name
        if param.is_constexpr:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*fp32" if arg in FP32_PTRS else f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are aligned
        elif arg.startswith("scale"):
            signature[arg] = "fp32"
        elif arg.startswith("stride_") and arg.endswith(UNIT_STRIDE_SUFFIX[layout]):
            signature[arg] = "constexpr"  # triton specializes integer arguments equal to 1
            constants[arg] = 1
        else:
            signature[arg] = "i32"
            if aligned and arg != "num_heads":
                attrs[(index,)] = [["tt.divisibility", 16]]
    return compile_for_gpu(fn, name, signature, constants, attrs, constexprs, arch,
                           num_warps=num_warps, num_stages=num_stages)


def compile_tiled(kind, head_dim, cfg, dtype="bf16", precision="ieee", **kwargs):
    """Compile one autotuned kernel in one config; the shared memory must stay within the
    estimate the autotuner prunes by (else it could pick configs that do not fit)."""
    block_d = kernels.head_dim_block(head_dim)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_FP32=False, INPUT_PRECISION=precision,
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    compiled = compile_kernel(KERNEL_NAMES[kind], constexprs, cfg["num_warps"], cfg["num_stages"],
                              dtype=dtype, **kwargs)
    estimate = kernels.shared_memory_estimate(kind, cfg, block_d, ELEMENT_SIZE[dtype])
    assert compiled.metadata.shared <= estimate, (
        f"{kind} {cfg} D={head_dim} {dtype}: {compiled.metadata.shared} B > estimate {estimate} B")
    return compiled


def _sm90_bf16_cases():
    for head_dim in (32, 64, 128):
        for kind in KERNEL_NAMES:
            for cfg in kernels.usable_configs(kind, kernels.head_dim_block(head_dim), 2):
                yield pytest.param(kind, head_dim, cfg,
                                   id=f"{kind}-D{head_dim}-m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}"
                                      f"w{cfg['num_warps']}s{cfg['num_stages']}")


@pytest.mark.parametrize("kind,head_dim,cfg", list(_sm90_bf16_cases()))
def test_every_bf16_config_compiles_for_sm90(kind, head_dim, cfg):
    compile_tiled(kind, head_dim, cfg)


def test_every_kernel_has_bf16_configs_for_each_head_dim():
    # The parametrization above would silently shrink if pruning emptied a list.
    for head_dim in (32, 64, 128):
        for kind in KERNEL_NAMES:
            assert kernels.usable_configs(kind, kernels.head_dim_block(head_dim), 2)


@pytest.mark.parametrize("kind", list(KERNEL_NAMES))
@pytest.mark.parametrize("variant", ["sm80", "fp16", "fp32-ieee", "fp32-tf32", "masked-head-dim",
                                     "bhsd-layout"])
def test_one_config_per_variant_compiles(kind, variant):
    head_dim, dtype, precision, arch, extra = 64, "bf16", "ieee", 90, {}
    if variant == "sm80":
        arch = 80
    elif variant == "fp16":
        dtype = "fp16"
    elif variant.startswith("fp32"):
        head_dim, dtype, precision = 32, "fp32", variant.split("-")[1]
    elif variant == "masked-head-dim":
        head_dim, extra = 40, dict(aligned=False)  # odd sizes: no divisibility hints
    else:
        extra = dict(layout="bhsd")
    limit = SHARED_LIMIT[arch]
    usable = kernels.usable_configs(kind, kernels.head_dim_block(head_dim), ELEMENT_SIZE[dtype],
                                    precision, limit)
    assert usable
    # The smallest config: fp32 FMA dots compile slowly and the rest are covered above.
    cfg = usable[-1] if dtype == "fp32" else usable[0]
    compile_tiled(kind, head_dim, cfg, dtype=dtype, precision=precision, arch=arch, **extra)


@pytest.mark.parametrize("head_dim", [32, 40, 64, 128])
def test_delta_kernel_compiles(head_dim):
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=kernels.head_dim_block(head_dim),
                      BLOCK_M=kernels.DELTA_BLOCK_M)
    for arch in (90, 80):
        compile_kernel("_attention_bwd_delta_kernel", constexprs, num_warps=4, num_stages=1, arch=arch)
