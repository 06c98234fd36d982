"""Compile every kept Triton kernel configuration for a GPU, on this CPU, and report what
ptxas says about it: registers, spills, stack frame, shared memory and compile time.

    python benchmarks/compile_report.py [--arch 90] [--family attention|group_norm]

Why: a config that spills registers to local memory (or needs a stack frame) is slow
before anyone times it, and the autotuner would still time it on the GPU, where device
minutes are scarce. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
runs the real compiler down to a cubin without a GPU (~0.5 s per config), and ptxas' own
``-v`` log gives the figures, so this can run in CI.

Covered (``report_cases``): each attention kernel (forward; backward delta, dK/dV and dQ)
in every config its autotuner may pick (``usable_configs``) for head dims 32, 64 and 128
in bf16 and fp16, and the GroupNorm+SiLU kernels in every (TILE, BLOCK_C) their launchers
can pick, with every epilogue flag on (the most registers), plus the split variants and
the dweight/dbias kernel. fp32 attention does not run Triton on CUDA (the custom ops in
fastdiff.ops.attention send it to torch: every IEEE fp32 tile spilled registers, 0.3-25 KB
of stack per thread, and took up to minutes to compile), so no fp32 config is compiled here.

Output: one JSON line per config on stdout, with the keys ``kernel`` (the Triton
function's name), ``config``, ``dtype`` (bf16/fp16/fp32), ``D`` (head dim; null for
GroupNorm), ``registers``, ``spill_bytes`` (spill stores + spill loads per thread),
``stack_bytes`` (stack frame per thread), ``shared_bytes`` (dynamic shared memory per
program) and ``seconds`` (compile time); then a summary per kernel on stderr. The exit
status is 1 when any config spills, has a stack frame, or needs more shared memory than
the chip has per block.

The tests (tests/triton_compile.py and the test_triton_compile_* modules) compile through
:func:`compile_case`, which caches per process, so CI compiles each config once.
"""
import argparse
import contextlib
import dataclasses
import functools
import io
import json
import re
import sys
import time

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastdiff.kernels import attention, group_norm_silu

# Usable shared memory per block: 228 KB (H100) and 164 KB (A100) less 1 KB reserved.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}

ATTENTION_KERNELS = {
    "forward": "_attention_fwd_kernel",
    "backward_dkdv": "_attention_bwd_dkdv_kernel",
    "backward_dq": "_attention_bwd_dq_kernel",
}
ATTENTION_DELTA_KERNEL = "_attention_bwd_delta_kernel"
ATTENTION_HEAD_DIMS = (32, 64, 128)
# The dtypes whose attention runs the Triton kernels on CUDA (fp32 goes to SDPA).
ATTENTION_DTYPES = ("bf16", "fp16")
ATTENTION_FP32_PTRS = {"lse_ptr", "delta_ptr"}
# Which strides triton sees as 1: GD's [N, 3·H·C, T] views have a unit sequence stride,
# contiguous [B, H, S, D] tensors a unit head-dim stride.
ATTENTION_UNIT_STRIDE_SUFFIX = {"qkv": "s", "bhsd": "d"}

GROUP_NORM_TILED_KERNELS = ("_gn_fwd_partial_stats_kernel", "_gn_fwd_kernel",
                            "_gn_bwd_partial_sums_kernel", "_gn_bwd_kernel")
GROUP_NORM_SPLIT_KERNELS = ("_gn_fwd_kernel", "_gn_bwd_kernel")
GROUP_NORM_PARAM_KERNEL = "_gn_bwd_param_kernel"
GROUP_NORM_ACTIVATION_PTRS = {"x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "scale_ptr", "shift_ptr",
                              "dscale_ptr", "dshift_ptr"}
GROUP_NORM_UNIT_STRIDES = {
    "nchw": ("stride_xs", "stride_ys", "stride_ds", "stride_gs"),
    "channels_last": ("stride_xc", "stride_yc", "stride_dc", "stride_gc"),
}
# Integer arguments that are sizes, not multiples of 16 in general (group counts, channels).
GROUP_NORM_UNALIGNED_INTS = ("cpg", "G", "N", "C")

_STACK_AND_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


# ----------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel specialization to compile: what the launcher would hand triton."""
    family: str  # "attention" or "group_norm": which kernels module holds ``kernel``
    kernel: str
    config: str  # label of the block config, as the report prints it
    dtype: str
    head_dim: object  # int, or None for GroupNorm
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int
    num_stages: int = 3  # triton's default, what a launch without num_stages gets
    arch: int = 90
    layout: str = "qkv"  # attention: qkv/bhsd; GroupNorm: nchw/channels_last
    aligned: bool = True  # sizes and strides multiples of 16 (vectorized loads)


@dataclasses.dataclass
class Result:
    """A compiled case and ptxas' figures for it."""
    case: Case
    compiled: object
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    seconds: float

    def record(self):
        """The JSON line of this config."""
        return {"kernel": self.case.kernel, "config": self.case.config, "dtype": self.case.dtype,
                "D": self.case.head_dim, "registers": self.registers,
                "spill_bytes": self.spill_bytes, "stack_bytes": self.stack_bytes,
                "shared_bytes": self.shared_bytes, "seconds": round(self.seconds, 3)}

    def problems(self):
        """What makes this config unfit to keep (empty when it compiles clean)."""
        found = []
        if self.spill_bytes:
            found.append(f"{self.spill_bytes} B of register spills")
        if self.stack_bytes:
            found.append(f"{self.stack_bytes} B stack frame")
        if self.shared_bytes > SHARED_LIMIT[self.case.arch]:
            found.append(f"{self.shared_bytes} B shared memory > {SHARED_LIMIT[self.case.arch]} B")
        return found


def attention_label(cfg):
    return f"m{cfg['BLOCK_M']}n{cfg['BLOCK_N']}w{cfg['num_warps']}s{cfg['num_stages']}"


def attention_case(kind, head_dim, cfg, dtype="bf16", precision="ieee", arch=90, layout="qkv",
                   aligned=True):
    """The case of one autotuned attention kernel (``kind`` a KERNEL_CONFIGS key) in ``cfg``."""
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=attention.head_dim_block(head_dim), DOT_FP32=False,
                      INPUT_PRECISION=precision, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    label = attention_label(cfg) + ("" if precision == "ieee" else f" {precision}")
    return Case("attention", ATTENTION_KERNELS[kind], label, dtype, head_dim,
                tuple(sorted(constexprs.items())), cfg["num_warps"], cfg["num_stages"], arch,
                layout, aligned)


def attention_delta_case(head_dim, dtype="bf16", arch=90):
    """The backward's delta kernel, launched with triton's default warps and stages."""
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=attention.head_dim_block(head_dim),
                      BLOCK_M=attention.DELTA_BLOCK_M)
    return Case("attention", ATTENTION_DELTA_KERNEL, f"m{attention.DELTA_BLOCK_M}w4", dtype, head_dim,
                tuple(sorted(constexprs.items())), num_warps=4, arch=arch)


def attention_cases(arch=90, dtypes=ATTENTION_DTYPES, head_dims=ATTENTION_HEAD_DIMS):
    """Every attention config the autotuners may launch on sm_``arch`` for these dtypes."""
    cases = []
    for dtype in dtypes:
        for head_dim in head_dims:
            block_d = attention.head_dim_block(head_dim)
            for kind in ATTENTION_KERNELS:
                for cfg in attention.usable_configs(kind, block_d, ELEMENT_SIZE[dtype], "ieee",
                                                    SHARED_LIMIT[arch]):
                    cases.append(attention_case(kind, head_dim, cfg, dtype, arch=arch))
            cases.append(attention_delta_case(head_dim, dtype, arch))
    return cases


def group_norm_label(config, split=False):
    return (f"tile{config['TILE']} c{config['BLOCK_C']}xs{config['BLOCK_S']} w{config['num_warps']}"
            + (" split" if split else ""))


def group_norm_case(name, config, split=False, flags=True, dtype="bf16", arch=90, layout="nchw",
                    aligned=True):
    """The case of one tiled GroupNorm kernel in one block config (``block_configs()`` item)."""
    values = {"TILE": config["TILE"], "BLOCK_C": config["BLOCK_C"], "BLOCK_S": config["BLOCK_S"],
              "HAS_SCALE": flags, "HAS_SHIFT": flags, "ACT": flags, "SPLIT": split}
    names = {p.name for p in jit_function(group_norm_silu, name).params if p.is_constexpr}
    constexprs = {k: v for k, v in values.items() if k in names}
    return Case("group_norm", name, group_norm_label(config, split), dtype, None,
                tuple(sorted(constexprs.items())), config["num_warps"], arch=arch, layout=layout,
                aligned=aligned)


def group_norm_param_case(has_scale=True, arch=90):
    """The dweight/dbias reduction kernel (fp32 sums, one fixed block)."""
    constexprs = {"HAS_SCALE": has_scale, "BLOCK": group_norm_silu.PARAM_BLOCK}
    return Case("group_norm", GROUP_NORM_PARAM_KERNEL,
                f"block{group_norm_silu.PARAM_BLOCK} w{group_norm_silu.PARAM_WARPS}"
                + ("" if has_scale else " no-scale"),
                "bf16", None, tuple(sorted(constexprs.items())), group_norm_silu.PARAM_WARPS, arch=arch,
                layout="nchw")


def group_norm_split_config(tile, warps):
    """The first block config of a tile (the split variants need only one BLOCK_C each)."""
    return next(c for c in group_norm_silu.block_configs()
                if c["TILE"] == tile and c["num_warps"] == warps)


def group_norm_cases(arch=90):
    """Every GroupNorm config the launchers may pick, with the epilogue flags on."""
    cases = [group_norm_case(name, config, arch=arch)
             for name in GROUP_NORM_TILED_KERNELS for config in group_norm_silu.block_configs()]
    cases += [group_norm_case(name, group_norm_split_config(tile, warps), split=True, arch=arch)
              for name in GROUP_NORM_SPLIT_KERNELS
              for tile, warps in group_norm_silu.GPU_TILE_CONFIGS]
    cases.append(group_norm_param_case(arch=arch))
    return cases


def report_cases(arch=90, families=("group_norm", "attention")):
    """The cases the report compiles, GroupNorm first (the fastest to compile)."""
    builders = {"group_norm": group_norm_cases, "attention": attention_cases}
    return [case for family in families for case in builders[family](arch)]


# ----------------------------------------------------------------------------- compiling
def jit_function(module, name):
    """The @triton.jit function ``name`` of ``module``, under any autotune/heuristics wrappers."""
    fn = getattr(module, name)
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn
    return fn


def _attention_argument(arg, dtype, layout, aligned):
    """(triton type, divisibility hint?) of one non-constexpr attention argument, or
    ("constexpr", None) for a stride triton specializes as 1."""
    if arg.endswith("_ptr"):
        return ("*fp32" if arg in ATTENTION_FP32_PTRS else f"*{dtype}"), True
    if arg.startswith("scale"):
        return "fp32", False
    if arg.startswith("stride_") and arg.endswith(ATTENTION_UNIT_STRIDE_SUFFIX[layout]):
        return "constexpr", None
    # Head counts are sizes, and batch_heads is never specialized (do_not_specialize).
    return "i32", aligned and arg not in ("num_heads", "batch_heads")


def _group_norm_argument(arg, dtype, layout, aligned):
    if arg.endswith("_ptr"):
        return ("*" + (dtype if arg in GROUP_NORM_ACTIVATION_PTRS else "fp32")), True
    if arg == "eps":
        return "fp32", False
    if arg in GROUP_NORM_UNIT_STRIDES[layout] or arg in ("stride_sc", "stride_hc"):
        return "constexpr", None
    return "i32", aligned and arg not in GROUP_NORM_UNALIGNED_INTS


_FAMILIES = {"attention": (attention, _attention_argument),
             "group_norm": (group_norm_silu, _group_norm_argument)}


def source_of(case):
    """The ASTSource of ``case``: argument types and hints as its launcher specializes them
    (pointers 16-byte aligned as torch allocates; unit strides as constants)."""
    module, argument = _FAMILIES[case.family]
    fn = jit_function(module, case.kernel)
    constants = dict(case.constexprs)
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            continue
        kind, divisible = argument(param.name, case.dtype, case.layout, case.aligned)
        signature[param.name] = kind
        if kind == "constexpr":
            constants[param.name] = 1
        elif divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constants]
    assert not missing, f"{case.kernel}: no value for constexpr {missing}"
    return ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)


def parse_ptxas_log(log, kernel):
    """(registers, spill bytes, stack bytes) of ``kernel`` from ptxas' ``-v`` log."""
    section = log[log.index(f"Function properties for {kernel}"):]
    stack, stores, loads = map(int, _STACK_AND_SPILLS.search(section).groups())
    return int(_REGISTERS.search(section).group(1)), stores + loads, stack


@functools.lru_cache(maxsize=None)
def compile_case(case):
    """triton.compile ``case`` to a cubin for its arch; a :class:`Result`.

    Triton's on-disk cache is bypassed so that ptxas runs (its log is the only source of
    the spill figures without a GPU) and ``seconds`` is a real compile time; the
    in-process cache keeps each case to one compile per process.
    """
    source = source_of(case)
    log = io.StringIO()
    start = time.perf_counter()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(source, target=GPUTarget("cuda", case.arch, 32),
                                  options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    seconds = time.perf_counter() - start
    assert compiled.asm.get("cubin"), f"{case.kernel} {case.config}: no cubin produced"
    registers, spills, stack = parse_ptxas_log(log.getvalue(), case.kernel)
    return Result(case, compiled, registers, spills, stack, compiled.metadata.shared, seconds)


# ----------------------------------------------------------------------------- report
def summarize(results):
    """One line per (kernel, dtype): configs, max registers, spilling configs, compile time."""
    groups = {}
    for result in results:
        groups.setdefault((result.case.kernel, result.case.dtype), []).append(result)
    lines = []
    for (kernel, dtype), group in groups.items():
        spilled = [f"{r.case.config} D={r.case.head_dim}" for r in group if r.problems()]
        lines.append(f"{kernel} {dtype}: {len(group)} configs, max {max(r.registers for r in group)} "
                     f"registers, max {max(r.shared_bytes for r in group) // 1024} KB shared, "
                     f"{sum(r.seconds for r in group):.1f} s; "
                     + (f"NOT CLEAN: {', '.join(spilled)}" if spilled else "no spills, no stack"))
    total = sum(r.seconds for r in results)
    lines.append(f"total: {len(results)} configs, {total:.1f} s of compiling")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT),
                        help="compute capability to compile for (90: H100/H200, 80: A100)")
    parser.add_argument("--family", choices=["attention", "group_norm"], action="append",
                        help="only these kernel families (default: both)")
    args = parser.parse_args(argv)
    results = []
    for case in report_cases(args.arch, tuple(args.family or ("group_norm", "attention"))):
        result = compile_case(case)
        results.append(result)
        print(json.dumps(result.record()), flush=True)
    for line in summarize(results):
        print(line, file=sys.stderr)
    return 1 if any(r.problems() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
