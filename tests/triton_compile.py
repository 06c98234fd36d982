"""Shared by the test_triton_compile_* modules: the compiler of benchmarks/compile_report.py
(Triton kernels compiled for a GPU target on this CPU, no GPU needed, with ptxas' register,
spill and stack figures), so that the tests and the report compile the same
specializations and a config compiled by one is not compiled again by the other.

benchmarks/ is not a package: the report is imported from its file, once, as
``compile_report``.
"""
import importlib.util
import os
import sys

_REPORT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "benchmarks", "compile_report.py")


def _load_report():
    if "compile_report" in sys.modules:
        return sys.modules["compile_report"]
    spec = importlib.util.spec_from_file_location("compile_report", _REPORT_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compile_report"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


report = _load_report()
SHARED_LIMIT = report.SHARED_LIMIT


def compile_fitting(case):
    """Compile ``case`` (cached per process); its shared memory must fit the chip."""
    result = report.compile_case(case)
    assert result.shared_bytes <= SHARED_LIMIT[case.arch], (
        f"{case.kernel} {case.config} D={case.head_dim} {case.dtype}: {result.shared_bytes} B "
        f"of shared memory > {SHARED_LIMIT[case.arch]} B on sm_{case.arch}")
    return result


def compile_clean(case):
    """Compile ``case``; it must fit the shared memory and neither spill registers nor need a
    stack frame (a spilled config is slow before the autotuner ever times it)."""
    result = compile_fitting(case)
    assert not result.problems(), (
        f"{case.kernel} {case.config} D={case.head_dim} {case.dtype} sm_{case.arch}: "
        f"{', '.join(result.problems())} ({result.registers} registers)")
    return result


def case_id(case):
    """A short pytest id: kernel, config, dtype, head dim."""
    head_dim = "" if case.head_dim is None else f"-D{case.head_dim}"
    return f"{case.kernel.strip('_')}-{case.config.replace(' ', '-')}-{case.dtype}{head_dim}"
