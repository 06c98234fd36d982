"""Standalone build of csrc/: CMake + the C++ test of the CPU kernels (ctest), the CUDA
kernels compiled by nvcc for sm_80 and sm_90, and the CUDA torch binding compiled against
the installed torch headers. No GPU is needed: CI checks that the CUDA code compiles.
"""
import os
import pathlib
import shutil
import subprocess

import pytest
import torch.utils.cpp_extension as cpp_extension

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
NVCC = shutil.which("nvcc")
# A CPU build of torch does not look for CUDA (CUDA_HOME is None): try the usual places.
CUDA_INCLUDE = next(
    (pathlib.Path(home) / "include"
     for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda")
     if home and (pathlib.Path(home) / "include" / "cuda_runtime_api.h").is_file()),
    None)


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed:\n"
                    f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("cmake-build")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", str(ROOT), "-B", str(build), *generator])
    run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)])
    return build


def test_ctest_passes(cmake_build):
    proc = run(["ctest", "--output-on-failure"], cwd=cmake_build)
    assert "100% tests passed" in proc.stdout


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_cuda_kernels_compile_for_sm80_and_sm90(cmake_build):
    for arch in (80, 90):
        obj = cmake_build / f"adam_ema_cuda_sm{arch}.o"
        assert obj.is_file() and obj.stat().st_size > 0, f"nvcc did not produce {obj.name}"


@pytest.mark.skipif(CUDA_INCLUDE is None, reason="CUDA headers are not installed")
def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    # A CPU wheel of torch ships the c10/cuda headers but not the one CMake generates
    # for CUDA builds; an empty stand-in (searched last) is enough for a syntax check.
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    compiler = os.environ.get("CXX", "c++")
    run([compiler, "-std=c++20", "-fsyntax-only", *includes, f"-I{CUDA_INCLUDE}",
         f"-idirafter{tmp_path}", str(CSRC / "binding_cuda.cpp")])
