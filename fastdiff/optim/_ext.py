"""Find, build and load the C++/CUDA extension behind ``torch.ops.fastdiff.adam_ema_``.

Order of preference:

1. ``fastdiff/_C*.so`` built by setup.py (``pip install --no-build-isolation -e .``),
   unless csrc/ has changed since it was built (editable checkouts). On a CUDA torch with
   a GPU, a library built without the CUDA kernels (a CPU build, or no nvcc at build
   time) is completed: its CUDA kernels are built just in time and loaded next to it
   (they register the CUDA implementations of the ops it defines), so the optimizer does
   not fall back to the slow foreach path; if that build fails, a warning says so;
2. a just-in-time build with ``torch.utils.cpp_extension.load`` (ninja, ~20 s on first
   use, then cached under ``TORCH_EXTENSIONS_DIR`` or torch's default cache);
3. nothing: ``extension_available()`` returns False, a warning on the "fastdiff" logger
   says why once, and the optimizer runs its pure-torch foreach path.

The sources are csrc/ next to the package in a checkout (editable install), or
``fastdiff/csrc/`` where setup.py copied them for a regular install.
"""
import importlib.util
import logging
import os
import pathlib
import shutil
import threading

import torch

from fastdiff.optim.build_flags import CPU_SOURCES, CUDA_SOURCES, CXX_FLAGS, LD_FLAGS, NVCC_FLAGS

LOG = logging.getLogger("fastdiff")


_lock = threading.Lock()
_status = None  # None: not tried yet; True/False: extension usable or not


PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent
CHECKOUT_SOURCES = PACKAGE_DIR.parent / "csrc"  # editable install: the repository's csrc/
PACKAGED_SOURCES = PACKAGE_DIR / "csrc"  # regular install: copied there by setup.py


def sources_dir():
    """Directory holding the csrc/ sources, or None if this install has none."""
    for candidate in (CHECKOUT_SOURCES, PACKAGED_SOURCES):
        if (candidate / "binding.cpp").is_file():
            return candidate
    return None


def _ops_registered():
    return hasattr(torch.ops.fastdiff, "adam_ema_")


def _prebuilt_library():
    """Path of the setup.py-built library, or None if absent or older than csrc/."""
    spec = importlib.util.find_spec("fastdiff._C")
    if spec is None or spec.origin is None:
        return None
    # In a checkout, csrc/ may have been edited since setup.py built the library.
    built = os.path.getmtime(spec.origin)
    if CHECKOUT_SOURCES.is_dir() and any(
            os.path.getmtime(p) > built for p in CHECKOUT_SOURCES.iterdir()
            if not p.name.startswith("test_")):
        LOG.info("fastdiff: %s is older than %s; building the extension just in time",
                 spec.origin, CHECKOUT_SOURCES)
        return None
    return spec.origin


def cuda_kernel_registered():
    """Whether the dispatcher holds a CUDA implementation of ``fastdiff::adam_ema_``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastdiff::adam_ema_", "CUDA")


def _want_cuda():
    """CUDA kernels too when torch has CUDA, nvcc is there and there is a target to build for:
    a visible GPU, or TORCH_CUDA_ARCH_LIST (a CUDA torch on a machine without a GPU would
    otherwise have no architecture to compile for, and its kernels could not run here)."""
    from torch.utils import cpp_extension
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False
    return torch.cuda.is_available() or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))


def _build_tools():
    """The csrc/ directory, after checking that a compiler and ninja are there."""
    from torch.utils import cpp_extension
    src = sources_dir()
    if src is None:
        raise RuntimeError("the csrc/ sources are not part of this install")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed")
    return src


def _jit_build():
    """Build the extension with ninja and load it into torch.ops; returns its path."""
    src = _build_tools()
    with_cuda = _want_cuda()
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    LOG.info("fastdiff: building the Adam+EMA extension just in time (%s, cached)",
             "CPU+CUDA" if with_cuda else "CPU")
    return _cpp_load("fastdiff_adam_ema_cuda" if with_cuda else "fastdiff_adam_ema_cpu",
                     [src / name for name in names], with_cuda)


def _jit_build_cuda_kernels():
    """Build only the CUDA kernels (binding_cuda.cpp + the .cu) and load them next to an
    already loaded library that defines the ops; returns the new library's path.

    The whole extension cannot be built again: its op schemas are already registered, and
    registering them twice is an error. binding_cuda.cpp needs only headers from csrc/.
    """
    from torch.utils import cpp_extension
    src = _build_tools()
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found (set CUDA_HOME to the directory of nvcc)")
    return _cpp_load("fastdiff_adam_ema_cuda_kernels", [src / name for name in CUDA_SOURCES],
                     True)


def _cpp_load(name, sources, with_cuda):
    from torch.utils import cpp_extension
    return cpp_extension.load(
        name=name,
        sources=[str(path) for path in sources],
        extra_cflags=list(CXX_FLAGS),
        extra_cuda_cflags=list(NVCC_FLAGS),
        extra_ldflags=list(LD_FLAGS),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )


def _load():
    if _ops_registered():
        return "already loaded"
    prebuilt = _prebuilt_library()
    if prebuilt is not None:
        torch.ops.load_library(prebuilt)
        return _complete_cuda_kernels(prebuilt)
    return _jit_build()


def _complete_cuda_kernels(prebuilt):
    """After loading a prebuilt library: on a GPU machine, build the CUDA kernels it lacks.

    Returns what was loaded, for the log. A failed build is not an error (the CPU kernels
    work), but it is never silent: CUDA parameters would run the slow foreach path.
    """
    if not torch.cuda.is_available() or cuda_kernel_registered():
        return prebuilt  # a CPU-only torch, or a library built with its CUDA kernels
    LOG.info("fastdiff: %s has no CUDA kernels (built without CUDA); building them just in "
             "time", prebuilt)
    try:
        cuda_library = _jit_build_cuda_kernels()
        if not cuda_kernel_registered():
            raise RuntimeError(f"{cuda_library} registered no CUDA kernel for adam_ema_")
    except Exception as error:  # any build failure: keep the CPU kernels, say what is lost
        LOG.warning(
            "fastdiff: %s has no CUDA kernels and building them failed (%s: %s); "
            "FusedAdamEMA on CUDA parameters uses the slower pure-torch foreach path. "
            "Rebuild with nvcc available: pip install --no-build-isolation -e .",
            prebuilt, type(error).__name__, _last_line(error))
        return f"{prebuilt}, CPU kernels only"
    return f"{prebuilt} + CUDA kernels built just in time ({cuda_library})"


def _last_line(error):
    text = str(error).strip()
    return text.splitlines()[-1] if text else ""


def extension_available():
    """Load the extension once per process; True if ``torch.ops.fastdiff.adam_ema_`` works.

    On failure (no compiler, no ninja, no sources, a build error) logs one warning naming
    the fallback and returns False from then on.
    """
    global _status
    with _lock:
        if _status is None:
            try:
                where = _load()
            except Exception as error:  # any build/load failure means: use the fallback
                LOG.warning(
                    "fastdiff: C++ Adam+EMA extension unavailable (%s: %s); FusedAdamEMA "
                    "uses the slower pure-torch foreach path "
                    "(fastdiff.optim.fused_adam_ema.adam_ema_foreach)",
                    type(error).__name__, _last_line(error))
                _status = False
            else:
                LOG.info("fastdiff: C++ Adam+EMA extension loaded (%s)", where)
                _status = True
        return _status


def has_cuda_kernels():
    """True if the loaded extension has CUDA kernels (it was built against a CUDA torch)."""
    return extension_available() and cuda_kernel_registered()
