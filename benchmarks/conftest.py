"""Benchmark setup: GPU benchmarks are marked `gpu` and skipped with a reason on CPU."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_collect_file(file_path, parent):
    """Collect the benchmark modules (bench_*.py): `pytest benchmarks/` then finds them
    (pytest's default python_files only matches test_*.py, and an empty run exits 5).
    Files pytest collects anyway (named on the command line, or matching python_files)
    are left to it, so that no benchmark runs twice."""
    import fnmatch

    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path) or any(
            fnmatch.fnmatch(file_path.name, pattern)
            for pattern in parent.config.getini("python_files")):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the torch/triton versions and the CUDA device in every benchmark JSON
    (benchmarks/report.py prints them above the table)."""
    versions = {"torch": torch.__version__}
    try:
        import triton
        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = "not installed"
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
        versions["gpu"] = torch.cuda.get_device_name()
    machine_info["fastdiff_versions"] = versions
