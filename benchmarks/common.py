"""Timing helpers shared by the benchmark modules.

GPU: device-event timing through triton.testing.do_bench (median, L2 flushed between
repetitions by do_bench's cache clearing), and the device's copy bandwidth / bf16 matmul
rate measured once per session so each result can be reported as a fraction of what
this card really does. CPU: interleaved medians, because the 2-core CI machines are noisy.
"""
import functools
import statistics
import time

import torch


def gpu_time_ms(fn, warmup_ms=25, rep_ms=100):
    """Median time of fn() in milliseconds on the current CUDA device (L2 flushed)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


@functools.lru_cache(maxsize=None)
def copy_bandwidth_gbs():
    """Measured device-to-device copy bandwidth in GB/s (bytes read + bytes written)."""
    n = 1 << 28  # 512 MiB of bf16: far larger than L2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = gpu_time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


@functools.lru_cache(maxsize=None)
def matmul_tflops():
    """Measured dense bf16 matmul rate in TFLOP/s."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = gpu_time_ms(lambda: a @ b)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def cpu_interleaved(fns, rounds=7, inner=1):
    """Median seconds per call of each fn in ``fns`` (a dict name → fn), interleaved.

    Each round runs every function once (``inner`` calls) in turn, so load on the shared
    machine hits all candidates alike; returns {name: median seconds per call}.
    """
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(v) for name, v in samples.items()}
