"""A regular (non-editable) install carries everything: kernels/ as fastdiff.kernels, the
C++/CUDA sources for the just-in-time build, every subpackage; and a failed extension build
never aborts the install.

The package is installed into a temporary target (no extension: FASTDIFF_SKIP_EXT=1, as a
build node without a compiler would) and every module is imported from outside the
repository, so the checkout cannot stand in for a missing file.
"""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMPORT_EVERYTHING = textwrap.dedent("""
    import importlib, json, pkgutil, sys
    import fastdiff, fastdiff.kernels
    found = []
    for package in (fastdiff, fastdiff.kernels):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith(".__main__") and info.name != "fastdiff._C":
                importlib.import_module(info.name)
                found.append(info.name)
    print(json.dumps({"file": fastdiff.__file__, "kernels": fastdiff.kernels.__file__,
                      "modules": found}))
""")


def _pip_install(target, env):
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
           "--no-cache-dir", "--target", str(target), ROOT]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    env = dict(os.environ, FASTDIFF_SKIP_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = _pip_install(target, env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return target


def test_non_editable_install_has_the_kernels_and_every_module(installed, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(installed))
    proc = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(installed))
    assert report["kernels"].startswith(str(installed))
    for name in ("fastdiff.kernels.attention", "fastdiff.kernels.group_norm_silu",
                 "fastdiff.kernels.inputs", "fastdiff.optim.build_flags", "fastdiff.sampling",
                 "fastdiff.train.cli", "fastdiff.evaluate.cli"):
        assert name in report["modules"], name
    # The sources of the just-in-time build travel with the package.
    csrc = os.path.join(installed, "fastdiff", "csrc")
    assert {"adam_ema_cpu.cpp", "binding.cpp", "adam_ema_cuda.cu"} <= set(os.listdir(csrc))


def test_a_failing_extension_build_does_not_abort_the_install(tmp_path):
    """A compiler that fails (here: CXX is `false`) leaves the package installed and says so."""
    pytest.importorskip("torch.utils.cpp_extension")
    env = dict(os.environ, CXX="false", CC="false", PIP_DISABLE_PIP_VERSION_CHECK="1",
               MAX_JOBS="1")
    env.pop("FASTDIFF_SKIP_EXT", None)
    proc = _pip_install(tmp_path / "site", env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "site" / "fastdiff" / "kernels" / "attention.py")
    assert not any(name.startswith("_C") for name in os.listdir(tmp_path / "site" / "fastdiff"))
