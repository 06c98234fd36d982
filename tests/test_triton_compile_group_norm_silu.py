"""Compile the GroupNorm+SiLU Triton kernels with the real GPU compiler, on the CPU.

The interpreter accepts code that the GPU compiler rejects (shapes, dtypes, shared-memory
overflow), and a config that spills registers is slow before the autotuner ever times it.
So every kernel is compiled down to a cubin for sm_90 in every block configuration its
launcher or autotuner can pick (kernels.block_configs(), with every epilogue flag on: the
most registers) -- the cases of benchmarks/compile_report.py -- and must fit the shared
memory and neither spill nor need a stack frame; then once more for sm_80, fp32 and fp16
activations, channels_last and odd sizes. Argument types follow the launchers (see the
report): activations bf16, GroupNorm parameters, statistics and partial sums fp32, NCHW
strides with sizes that are multiples of 16.
"""
import importlib
import json

import pytest
# tests/ is on sys.path (rootdir conftest, no __init__.py): the shared helpers import by name.
from triton_compile import case_id, compile_clean, report

kernels = importlib.import_module("fastdiff.kernels.group_norm_silu")

CONFIGS = kernels.block_configs()
SM90_CASES = report.group_norm_cases(90)
# The variants below compile the largest tile (the most registers per thread).
LARGEST = max(CONFIGS, key=lambda c: (c["TILE"], c["BLOCK_C"]))


def test_block_configs_cover_what_the_launcher_can_pick():
    picked = {(tile, kernels.pick_block_c(cpg, s, stride_c, stride_s, tile), warps)
              for tile, warps in kernels.GPU_TILE_CONFIGS
              for cpg in (1, 3, 5, 8, 16, 20, 32, 64, 512)
              for s in (1, 7, 64, 100, 1024, 4096)
              for stride_c, stride_s in ((s, 1), (1, 64))}
    listed = {(c["TILE"], c["BLOCK_C"], c["num_warps"]) for c in CONFIGS}
    assert picked <= listed
    assert all(c["BLOCK_C"] * c["BLOCK_S"] == c["TILE"] for c in CONFIGS)


@pytest.mark.parametrize("case", SM90_CASES, ids=case_id)
def test_every_config_compiles_clean_for_sm90(case):
    compile_clean(case)


def test_report_covers_every_kernel_and_config():
    # The parametrization above would silently shrink if the report dropped a kernel.
    tiled = {(c.kernel, c.config) for c in SM90_CASES}
    for name in report.GROUP_NORM_TILED_KERNELS:
        for config in CONFIGS:
            assert (name, report.group_norm_label(config)) in tiled


@pytest.mark.parametrize("dtype, layout, flags, aligned", [
    ("fp32", "nchw", False, True), ("fp16", "channels_last", True, True),
    ("bf16", "channels_last", False, False), ("bf16", "nchw", True, False)])
def test_dtypes_layouts_and_flags_compile_clean_for_sm90(dtype, layout, flags, aligned):
    for name in report.GROUP_NORM_TILED_KERNELS:
        compile_clean(report.group_norm_case(name, LARGEST, flags=flags, dtype=dtype, layout=layout,
                                             aligned=aligned))


def test_param_kernel_without_scale_compiles_clean_for_sm90():
    compile_clean(report.group_norm_param_case(has_scale=False))


def test_kernels_compile_clean_for_sm80():
    for name in report.GROUP_NORM_TILED_KERNELS:
        compile_clean(report.group_norm_case(name, LARGEST, arch=80))
    compile_clean(report.group_norm_param_case(arch=80))


# At most 64 registers per thread leaves room for 32 resident warps per SM (65,536
# registers), half the maximum: enough bytes in flight for these memory-bound kernels.
# The backward at 16 elements per thread (TILE 2048 with 4 warps) needed 128.
MAX_REGISTERS = 64


def test_register_pressure_stays_low():
    heavy = {case_id(case): report.compile_case(case).registers for case in SM90_CASES
             if report.compile_case(case).registers > MAX_REGISTERS}
    assert not heavy, f"more than {MAX_REGISTERS} registers: {heavy}"


def test_report_prints_one_json_line_per_config(capsys):
    # The GroupNorm family only (compiled above already, cached in this process); the
    # attention family goes through the same code.
    assert report.main(["--arch", "90", "--family", "group_norm"]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == len(SM90_CASES)
    assert all(set(r) == {"kernel", "config", "dtype", "D", "registers", "spill_bytes", "stack_bytes",
                          "shared_bytes", "seconds"} for r in records)
    assert {r["kernel"] for r in records} == {c.kernel for c in SM90_CASES}
    assert all(r["D"] is None and r["dtype"] == "bf16" and r["spill_bytes"] == 0 for r in records)
    assert "total: " in captured.err
