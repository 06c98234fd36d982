"""fastdiff install.

The C++ fused Adam+EMA extension (csrc/) is built here only when torch is importable
at build time (`pip install --no-build-isolation -e .`). A plain `pip install -e .`
builds in an isolated environment without torch: the extension is then skipped and
built just in time on first use (fastdiff/optim/_ext.py).
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_flags():
    """fastdiff/optim/build_flags.py, loaded by path (importing the package needs torch)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "fastdiff_build_flags", os.path.join(HERE, "fastdiff", "optim", "build_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_build():
    """Return (ext_modules, cmdclass) for the C++/CUDA extension, or ([], {...}).

    The extension is described only when torch is importable at build time
    (`pip install --no-build-isolation -e .`): CppExtension with a CPU-only torch,
    CUDAExtension when torch has CUDA and nvcc is found. A plain isolated
    `pip install -e .` has no torch: the extension is skipped (never an error, and torch
    is not a build requirement) and fastdiff/optim/_ext.py builds it just in time.
    FASTDIFF_SKIP_EXT=1 skips it too. Either way build_py copies csrc/ into the package
    (fastdiff/csrc/) so that a regular, non-editable install can build just in time.
    """
    import glob
    import shutil

    from setuptools.command.build_py import build_py

    csrc = os.path.join(HERE, "csrc")

    class BuildPyWithSources(build_py):
        def run(self):
            super().run()
            if getattr(self, "editable_mode", False):
                return  # editable installs read csrc/ from the checkout
            target = os.path.join(self.build_lib, "fastdiff", "csrc")
            os.makedirs(target, exist_ok=True)
            for pattern in ("*.h", "*.cpp", "*.cu"):
                for path in glob.glob(os.path.join(csrc, pattern)):
                    if not os.path.basename(path).startswith("test_"):
                        shutil.copy2(path, target)

    cmdclass = {"build_py": BuildPyWithSources}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("fastdiff: torch not importable at build time; the C++ extension will be "
              "built just in time on first use")
        return [], cmdclass
    if os.environ.get("FASTDIFF_SKIP_EXT") == "1":
        return [], cmdclass

    flags = _build_flags()
    sources = [f"csrc/{name}" for name in flags.CPU_SOURCES]
    cxx_flags = list(flags.CXX_FLAGS)
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # No GPU to read the architecture from (a login or build node): build for the
            # data-centre and workstation GPUs this project targets (Ampere to Hopper).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.6;8.9;9.0"
            print("fastdiff: no GPU visible; building the CUDA kernels for "
                  "TORCH_CUDA_ARCH_LIST=8.0;8.6;8.9;9.0 (set it to choose)")
        ext = cpp_extension.CUDAExtension(
            "fastdiff._C", sources + [f"csrc/{name}" for name in flags.CUDA_SOURCES],
            extra_compile_args={"cxx": cxx_flags, "nvcc": list(flags.NVCC_FLAGS)},
            extra_link_args=list(flags.LD_FLAGS),
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastdiff._C", sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=list(flags.LD_FLAGS),
        )
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtensionOrWarn(base):
        """A failed extension build must not abort the install (and take the package
        with it): the package installs, this says the extension is missing, and
        fastdiff/optim/_ext.py builds it just in time (or runs the foreach path, and
        logs so) on first use."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any compiler failure, same outcome
                print(f"fastdiff: WARNING: building the C++/CUDA extension failed "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                      "installing without it. It is built just in time on first use, or "
                      "the slower foreach path runs (the log says which).")

    cmdclass["build_ext"] = BuildExtensionOrWarn
    return [ext], cmdclass


ext_modules, cmdclass = _extension_build()

setup(
    name="fastdiff",
    version="0.1.0",
    description="Kernel-optimized, guided-diffusion-compatible trainer for image diffusion models",
    # Every package under fastdiff/ (a new one cannot be forgotten), plus kernels/ installed
    # as fastdiff.kernels.
    packages=find_packages(include=["fastdiff", "fastdiff.*"]) + ["fastdiff.kernels"],
    package_dir={"fastdiff.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "numpy>=2",
        "pillow",
        "scikit-learn",
        "tqdm",
        "tensorboard",
        "matplotlib",  # python -m fastdiff.plot works after the plain install
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "plot": [],  # kept so that existing `pip install 'fastdiff[plot]'` lines still work
        # Real FID (python -m fastdiff.evaluate --inception_weights): torch-fidelity's
        # Inception-v3 (it pulls torchvision; pick the build that matches your torch).
        "fid": ["torch-fidelity"],
        # numpy < 2.3: Triton 3.6's interpreter (the CPU tests of the kernels) needs it.
        "test": ["pytest", "pytest-benchmark", "ninja", "pybind11", "diffusers", "triton>=3.6",
                 "numpy>=2,<2.3"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
