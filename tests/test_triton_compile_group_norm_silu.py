"""Compile the GroupNorm+SiLU Triton kernels with the real GPU compiler, on the CPU.

The interpreter accepts code that the GPU compiler rejects (shapes, dtypes, shared-memory
overflow), so every kernel is compiled down to a cubin for sm_90 in every block
configuration its launcher or autotuner can pick (kernels.block_configs()), and once for
sm_80; the shared memory each program needs is checked against the chip's per-block
limit. Argument types follow the launchers: activations bf16 (plus fp32 and fp16 once),
GroupNorm parameters fp32, statistics and partial sums fp32, NCHW strides (the spatial
stride is 1, which triton specializes as a constant) with sizes that are multiples of 16
(what lets the loads vectorize), and a few channels_last and odd-size variants.
"""
import importlib

import pytest
# tests/ is on sys.path (rootdir conftest, no __init__.py): the shared helpers import by name.
from triton_compile import compile_for_gpu, jit_function

kernels = importlib.import_module("fastdiff.kernels.group_norm_silu")


TILED_KERNELS = ["_gn_fwd_partial_stats_kernel", "_gn_fwd_kernel",
                 "_gn_bwd_partial_sums_kernel", "_gn_bwd_kernel"]
ACTIVATION_PTRS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "scale_ptr", "shift_ptr",
                   "dscale_ptr", "dshift_ptr"}
PARAM_PTRS = {"w_ptr", "b_ptr", "dw_ptr", "db_ptr"}
TRITON_DTYPE = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
LAYOUT_UNIT_STRIDES = {
    "nchw": ("stride_xs", "stride_ys", "stride_ds", "stride_gs"),
    "channels_last": ("stride_xc", "stride_yc", "stride_dc", "stride_gc"),
}


def compile_kernel(name, constexprs, num_warps, arch=90, dtype="bf16", layout="nchw", aligned=True):
    """triton.compile one kernel as the launcher would specialize it; check shared memory.

    aligned: sizes and strides are multiples of 16 (e.g. [32, 512, 32, 32]), which lets
    triton vectorize; otherwise (odd H*W) they are plain i32.
    """
    fn = jit_function(kernels, name)
    signature, attrs = {}, {}
    constants = dict(constexprs)
    for index, param in enumerate(fn.params):
        arg = param.name
        if param.is_constexpr:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            pointee = dtype if arg in ACTIVATION_PTRS else "fp32"
            signature[arg] = TRITON_DTYPE[pointee]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are aligned
        elif arg == "eps":
            signature[arg] = "fp32"
        elif arg in LAYOUT_UNIT_STRIDES[layout] or arg in ("stride_sc", "stride_hc"):
            signature[arg] = "constexpr"  # triton specializes integer arguments equal to 1
            constants[arg] = 1
        else:
            signature[arg] = "i32"
            if aligned and arg not in ("cpg", "G", "N", "C"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return compile_for_gpu(fn, name, signature, constants, attrs, constexprs, arch,
                           num_warps=num_warps)


def tiled_constexprs(name, config, split=False, flags=True):
    """Constexpr values of a tiled kernel for one block config (only those it takes)."""
    values = {"TILE": config["TILE"], "BLOCK_C": config["BLOCK_C"], "BLOCK_S": config["BLOCK_S"],
              "HAS_SCALE": flags, "HAS_SHIFT": flags, "ACT": flags, "SPLIT": split}
    names = {p.name for p in jit_function(kernels, name).params if p.is_constexpr}
    return {k: v for k, v in values.items() if k in names}


CONFIGS = kernels.block_configs()


def test_block_configs_cover_what_the_launcher_can_pick():
    picked = {(tile, kernels.pick_block_c(cpg, s, stride_c, stride_s, tile), warps)
              for tile, warps in kernels.GPU_TILE_CONFIGS
              for cpg in (1, 3, 5, 8, 16, 20, 32, 64, 512)
              for s in (1, 7, 64, 100, 1024, 4096)
              for stride_c, stride_s in ((s, 1), (1, 64))}
    listed = {(c["TILE"], c["BLOCK_C"], c["num_warps"]) for c in CONFIGS}
    assert picked <= listed
    assert all(c["BLOCK_C"] * c["BLOCK_S"] == c["TILE"] for c in CONFIGS)


@pytest.mark.parametrize("name", TILED_KERNELS)
def test_every_block_config_compiles_for_sm90(name):
    for config in CONFIGS:
        compile_kernel(name, tiled_constexprs(name, config), config["num_warps"])


@pytest.mark.parametrize("name", ["_gn_fwd_kernel", "_gn_bwd_kernel"])
def test_split_variants_compile_for_sm90(name):
    for tile, warps in kernels.GPU_TILE_CONFIGS:
        config = next(c for c in CONFIGS if c["TILE"] == tile and c["num_warps"] == warps)
        compile_kernel(name, tiled_constexprs(name, config, split=True), warps)


@pytest.mark.parametrize("dtype, layout, flags, aligned", [
    ("fp32", "nchw", False, True), ("fp16", "channels_last", True, True),
    ("bf16", "channels_last", False, False), ("bf16", "nchw", True, False)])
def test_dtypes_layouts_and_flags_compile_for_sm90(dtype, layout, flags, aligned):
    config = CONFIGS[-1]
    for name in TILED_KERNELS:
        compile_kernel(name, tiled_constexprs(name, config, flags=flags), config["num_warps"],
                       dtype=dtype, layout=layout, aligned=aligned)


@pytest.mark.parametrize("has_scale", [True, False])
def test_param_kernel_compiles_for_sm90(has_scale):
    compile_kernel("_gn_bwd_param_kernel", {"HAS_SCALE": has_scale, "BLOCK": kernels.PARAM_BLOCK},
                   kernels.PARAM_WARPS)


def test_kernels_compile_for_sm80():
    config = CONFIGS[-1]
    for name in TILED_KERNELS:
        compile_kernel(name, tiled_constexprs(name, config), config["num_warps"], arch=80)
    compile_kernel("_gn_bwd_param_kernel", {"HAS_SCALE": True, "BLOCK": kernels.PARAM_BLOCK},
                   kernels.PARAM_WARPS, arch=80)
