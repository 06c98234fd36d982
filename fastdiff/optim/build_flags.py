"""How the C++/CUDA extension is compiled: sources and compiler flags, in one place.

Read by setup.py (the ahead-of-time build, which loads this file by path: it must import
nothing) and by fastdiff/optim/_ext.py (the just-in-time build).
"""
CPU_SOURCES = ("adam_ema_cpu.cpp", "binding.cpp")
CUDA_SOURCES = ("adam_ema_cuda.cu", "binding_cuda.cpp")
# -fno-math-errno: without it gcc does not vectorise sqrt (the CPU update is ~3x slower).
CXX_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno")
NVCC_FLAGS = ("-O3",)
LD_FLAGS = ("-fopenmp",)
