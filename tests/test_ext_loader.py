"""Which Adam+EMA library the loader (fastdiff/optim/_ext.py) takes, checked on the CPU.

A prebuilt ``fastdiff/_C*.so`` built without CUDA kernels (a CPU build, or no nvcc when
setup.py ran) must not leave a GPU run on the slow foreach path without a word: on a CUDA
torch with a GPU the loader builds the missing CUDA kernels just in time, and warns if it
cannot. The GPU, the dispatcher's answer and the builds are stand-ins here, so these
tests only check the decisions, in well under a second.
"""
import logging

import pytest
import torch

from fastdiff.optim import _ext

PREBUILT = "/site-packages/fastdiff/_C.cpython-311-x86_64-linux-gnu.so"
CUDA_LIBRARY = "/cache/fastdiff_adam_ema_cuda_kernels/fastdiff_adam_ema_cuda_kernels.so"


class LogRecords(logging.Handler):
    """The "fastdiff" logger's messages (it may not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append((record.levelno, record.getMessage()))

    def at(self, level):
        return [message for levelno, message in self.messages if levelno == level]


@pytest.fixture
def records():
    logger = logging.getLogger("fastdiff")
    handler, level = LogRecords(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


class FakeLoader:
    """Stands in for the process: a prebuilt library on disk, whether a GPU is visible,
    and the dispatcher, which holds a CUDA kernel once a library has registered one."""

    def __init__(self, monkeypatch, gpu, prebuilt_has_cuda=False, cuda_build_error=None):
        self.loaded, self.cuda_builds, self.full_builds = [], [], []
        self.has_cuda_kernel = False
        self.prebuilt_has_cuda = prebuilt_has_cuda
        self.cuda_build_error = cuda_build_error
        monkeypatch.setattr(_ext, "_status", None)
        monkeypatch.setattr(_ext, "_ops_registered", lambda: False)
        monkeypatch.setattr(_ext, "_prebuilt_library", lambda: PREBUILT)
        monkeypatch.setattr(torch.ops, "load_library", self.load_library)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(_ext, "cuda_kernel_registered", lambda: self.has_cuda_kernel)
        monkeypatch.setattr(_ext, "_jit_build_cuda_kernels", self.build_cuda_kernels)
        monkeypatch.setattr(_ext, "_jit_build", self.full_build)

    def load_library(self, path):
        self.loaded.append(path)
        self.has_cuda_kernel = self.prebuilt_has_cuda

    def build_cuda_kernels(self):
        self.cuda_builds.append("cuda kernels")
        if self.cuda_build_error is not None:
            raise self.cuda_build_error
        self.has_cuda_kernel = True
        return CUDA_LIBRARY

    def full_build(self):
        self.full_builds.append("everything")
        return "/cache/full.so"


def test_prebuilt_library_without_cuda_kernels_gets_them_built_on_a_gpu(monkeypatch, records):
    fake = FakeLoader(monkeypatch, gpu=True)
    assert _ext.extension_available()
    assert fake.loaded == [PREBUILT] and fake.cuda_builds == ["cuda kernels"]
    assert fake.full_builds == []  # the ops are registered already: only the CUDA part
    assert any("has no CUDA kernels" in m and "just in time" in m for m in records.at(logging.INFO))
    assert any(CUDA_LIBRARY in m for m in records.at(logging.INFO))  # which path it took
    assert records.at(logging.WARNING) == []


def test_failed_cuda_kernel_build_warns_and_keeps_the_cpu_kernels(monkeypatch, records):
    fake = FakeLoader(monkeypatch, gpu=True, cuda_build_error=RuntimeError("nvcc not found"))
    assert _ext.extension_available()  # the CPU kernels still work
    assert fake.cuda_builds == ["cuda kernels"]
    warnings = records.at(logging.WARNING)
    assert len(warnings) == 1
    assert "no CUDA kernels" in warnings[0] and "nvcc not found" in warnings[0]
    assert "foreach" in warnings[0]
    assert any("CPU kernels only" in m for m in records.at(logging.INFO))


def test_cuda_build_that_registers_nothing_is_a_warning(monkeypatch, records):
    fake = FakeLoader(monkeypatch, gpu=True)
    fake.build_cuda_kernels = lambda: CUDA_LIBRARY  # builds, but the dispatcher has no kernel
    monkeypatch.setattr(_ext, "_jit_build_cuda_kernels", fake.build_cuda_kernels)
    assert _ext.extension_available()
    warnings = records.at(logging.WARNING)
    assert len(warnings) == 1 and "registered no CUDA kernel" in warnings[0]


def test_cpu_only_torch_uses_the_prebuilt_library_as_before(monkeypatch, records):
    fake = FakeLoader(monkeypatch, gpu=False)
    assert _ext.extension_available()
    assert fake.loaded == [PREBUILT] and fake.cuda_builds == [] and fake.full_builds == []
    assert any(m.endswith(f"loaded ({PREBUILT})") for m in records.at(logging.INFO))
    assert records.at(logging.WARNING) == []


def test_prebuilt_library_with_cuda_kernels_is_not_rebuilt(monkeypatch, records):
    fake = FakeLoader(monkeypatch, gpu=True, prebuilt_has_cuda=True)
    assert _ext.extension_available()
    assert fake.loaded == [PREBUILT] and fake.cuda_builds == [] and fake.full_builds == []
    assert records.at(logging.WARNING) == []


def test_no_prebuilt_library_builds_everything(monkeypatch, records):
    fake = FakeLoader(monkeypatch, gpu=True)
    monkeypatch.setattr(_ext, "_prebuilt_library", lambda: None)
    assert _ext.extension_available()
    assert fake.loaded == [] and fake.full_builds == ["everything"] and fake.cuda_builds == []


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch could really build")
def test_cuda_kernel_build_refuses_a_cpu_torch():
    # The real builder, not a stand-in: on a CPU torch it stops before compiling anything.
    with pytest.raises(RuntimeError):
        _ext._jit_build_cuda_kernels()


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch may hold CUDA kernels")
def test_dispatcher_check_on_the_real_library():
    # The loaded library of this CPU torch: CPU kernels, no CUDA kernel. The dispatcher
    # raises for an op it does not know, so a misspelt op name would fail here.
    assert _ext.extension_available(), "the C++ extension did not load (see the log)"
    assert _ext.cuda_kernel_registered() is False
    assert _ext.has_cuda_kernels() is False
