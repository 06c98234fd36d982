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


def pytest_terminal_summary(terminalreporter):
    """Print every benchmark's measured speedups and throughputs (from extra_info), so a CI
    log shows the ratios and not only raw times. Reported, never asserted."""
    session = terminalreporter.config._benchmarksession if hasattr(
        terminalreporter.config, "_benchmarksession") else None
    benchmarks = getattr(session, "benchmarks", None) or []
    lines = []
    for bench in benchmarks:
        info = getattr(bench, "extra_info", {}) or {}
        keys = [k for k in sorted(info) if k.startswith(("speedup", "img_per_s", "gbs", "frac"))
                and isinstance(info[k], (int, float))]
        if keys:
            lines.append(f"{bench.name}: " + ", ".join(f"{k}={info[k]:.3g}" for k in keys))
    if lines:
        terminalreporter.section("fastdiff: measured ratios (extra_info)")
        for line in lines:
            terminalreporter.write_line(line)
