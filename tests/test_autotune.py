"""The autotuners' config choice, checked on the CPU: the attention prune function and the
``fastdiff.kernels.set_deterministic`` switch that pins one config per shape.

On a GPU, Triton's autotuner calls each kernel's ``early_config_prune`` before timing the
configs it returns; under the interpreter every kernel has a single config and the prune
never runs. Here the prune runs on stub configs (dicts, and triton.Config objects) with a
stub device (its shared memory), and one autotuned launch is replayed through Triton's
real Autotuner with the timing and the kernel launch replaced: what would be launched is
recorded, nothing runs.
"""
import importlib
import types

import pytest
import torch
import triton

import fastdiff.kernels
from fastdiff.kernels import determinism

attention = importlib.import_module("fastdiff.kernels.attention")
group_norm_silu = importlib.import_module("fastdiff.kernels.group_norm_silu")

KB = 1024
LONG = 1000  # a sequence longer than every block


def cfg(block_m, block_n, warps=4, stages=3):
    return attention._cfg(block_m, block_n, warps, stages)


# Forward-kernel stubs, preference order. Shared memory of each with head dim 64 in bf16
# (attention.shared_memory_estimate): 112, 64, 56, 24, 12 KB.
STUBS = [cfg(128, 128), cfg(128, 64), cfg(64, 64), cfg(64, 32, stages=2), cfg(32, 32, stages=1)]


def blocks(configs):
    return [(c["BLOCK_M"], c["BLOCK_N"]) for c in configs]


def prune(seq_q, seq_k, shared_kb=227, element_size=2, precision="ieee", configs=STUBS):
    return blocks(attention.prune_configs("forward", configs, seq_q, seq_k, 64, element_size,
                                          precision, shared_kb * KB))


@pytest.fixture
def deterministic():
    """The switch on for one test; off again afterwards (and the autotuners' caches reset)."""
    fastdiff.kernels.set_deterministic(True)
    yield
    fastdiff.kernels.set_deterministic(False)


# ----------------------------------------------------------------------------- prune
def test_prune_keeps_every_config_that_fits_a_long_sequence():
    assert prune(LONG, LONG) == [(128, 128), (128, 64), (64, 64), (64, 32), (32, 32)]


def test_prune_drops_configs_over_the_shared_memory_limit():
    assert prune(LONG, LONG, shared_kb=99) == [(128, 64), (64, 64), (64, 32), (32, 32)]
    assert prune(LONG, LONG, shared_kb=32) == [(64, 32), (32, 32)]


def test_prune_drops_ieee_fp32_tiles_over_the_cap():
    # 4-byte elements double every estimate (224, 128, 112, 48, 24 KB); IEEE fp32 dots
    # also cap the tile at 64x64 scores, TF32 does not.
    assert prune(LONG, LONG, element_size=4) == [(64, 64), (64, 32), (32, 32)]
    assert prune(LONG, LONG, element_size=4, precision="tf32") == \
        [(128, 128), (128, 64), (64, 64), (64, 32), (32, 32)]


def test_prune_drops_blocks_longer_than_the_sequence():
    # 50 queries: a 128-query block is mostly padding, 64 covers them in one block.
    assert prune(50, LONG) == [(64, 64), (64, 32), (32, 32)]
    # 20 keys: key blocks of 32 at most (the shortest there is).
    assert prune(LONG, 20) == [(64, 32), (32, 32)]
    # 64 queries and keys: a block of exactly the sequence is kept.
    assert prune(64, 64) == [(64, 64), (64, 32), (32, 32)]
    # Shorter than every block: the shortest blocks remain.
    assert prune(1, 1) == [(32, 32)]


def test_prune_never_returns_an_empty_list():
    # Nothing fits 8 KB: the config with the smallest estimate, for Triton to report.
    assert prune(LONG, LONG, shared_kb=8) == [(32, 32)]
    # No config is short along both sequences: the length rule is dropped, not the configs.
    crossed = [cfg(128, 32), cfg(32, 128)]
    assert prune(10, 10, configs=crossed) == [(128, 32), (32, 128)]


def test_every_kind_keeps_a_config_for_any_sequence_and_head_dim():
    for kind, configs in attention.KERNEL_CONFIGS.items():
        for seq_q, seq_k in [(1, 1), (7, 300), (300, 7), (64, 64), (4096, 4096)]:
            for head_dim in (16, 40, 64, 128):
                kept = attention.prune_configs(kind, configs, seq_q, seq_k,
                                               attention.head_dim_block(head_dim), 2, "ieee",
                                               99 * KB)
                assert kept, (kind, seq_q, seq_k, head_dim)


# --------------------------------------------------------- the hook Triton calls
def triton_configs(configs):
    return [triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                          num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs]


@pytest.fixture
def consumer_gpu(monkeypatch):
    """A stand-in GPU with 99 KB of shared memory per block (sm_86, as an RTX 3090)."""
    props = types.SimpleNamespace(name="NVIDIA GeForce RTX 3090", major=8, minor=6,
                                  shared_memory_per_block_optin=99 * KB)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    return props


def launch_args(seq_q, seq_k, dtype=torch.bfloat16, batch_heads=1):
    """What a launch hands the prune: named arguments (q decides the element size and the
    device) and the constexpr keywords."""
    named = {"q_ptr": torch.empty(1, dtype=dtype), "seq_q": seq_q, "seq_k": seq_k,
             "batch_heads": batch_heads}
    constexprs = dict(HEAD_DIM=64, BLOCK_D=64, DOT_FP32=False, INPUT_PRECISION="ieee")
    return named, constexprs


def test_early_prune_hook_filters_triton_configs_for_the_device(consumer_gpu):
    configs = triton_configs(STUBS)
    named, constexprs = launch_args(LONG, LONG)
    kept = attention.early_prune("forward", configs, named, **constexprs)
    assert kept == configs[1:]  # the same Config objects, 112 KB one dropped
    named, constexprs = launch_args(50, LONG)
    assert attention.early_prune("forward", configs, named, **constexprs) == configs[2:]


def test_early_prune_hook_pins_one_config_when_deterministic(consumer_gpu, deterministic):
    configs = triton_configs(STUBS)
    named, constexprs = launch_args(50, LONG)
    assert attention.early_prune("forward", configs, named, **constexprs) == [configs[2]]


# ------------------------------------------------- a launch through the real autotuner
class RecordedLaunch:
    """Stands in for the compiled kernel: records the blocks each launch would use."""

    def __init__(self):
        self.blocks = []

    def run(self, *args, **kwargs):
        self.blocks.append((kwargs["BLOCK_M"], kwargs["BLOCK_N"]))


def launch_through_autotuner(monkeypatch, kernel, seq_q, seq_k, batch_heads=1, cache=None):
    """One launch of an attention ``kernel`` through Triton's Autotuner.run with its timing
    replaced (the smallest blocks "time" fastest) and its launch recorded; returns the
    (BLOCK_M, BLOCK_N) launched and the configs that were timed. ``cache``: the tuned
    choices it starts from (empty by default)."""
    timed = []

    def fake_timing(*args, config, **meta):
        timed.append((config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]))
        return [float(config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"])] * 3

    launch = RecordedLaunch()
    monkeypatch.setattr(kernel, "_bench", fake_timing)
    monkeypatch.setattr(kernel, "fn", launch)
    monkeypatch.setattr(kernel, "cache", {} if cache is None else cache)
    named, constexprs = launch_args(seq_q, seq_k, batch_heads=batch_heads)
    args = [named.get(name, 1) for name in kernel.arg_names
            if name not in constexprs and name not in ("BLOCK_M", "BLOCK_N")]
    kernel.run(*args, grid=(1,), warmup=False, **constexprs)
    return launch.blocks, timed


@pytest.mark.parametrize("kernel_name", ["_attention_fwd_kernel", "_attention_bwd_dkdv_kernel",
                                         "_attention_bwd_dq_kernel"])
def test_launch_uses_the_fastest_config_or_the_pinned_one(monkeypatch, consumer_gpu, kernel_name):
    kernel = getattr(attention, kernel_name)
    kind = {"_attention_fwd_kernel": "forward", "_attention_bwd_dkdv_kernel": "backward_dkdv",
            "_attention_bwd_dq_kernel": "backward_dq"}[kernel_name]
    kept = blocks(attention.prune_configs(kind, attention.KERNEL_CONFIGS[kind], 300, 300, 64, 2,
                                          "ieee", 99 * KB))
    assert len(kept) > 1  # else this test could not tell timing from pinning

    launched, timed = launch_through_autotuner(monkeypatch, kernel, 300, 300)
    assert timed == kept and launched == [min(kept, key=lambda b: b[0] * b[1])]

    fastdiff.kernels.set_deterministic(True)
    try:
        launched, timed = launch_through_autotuner(monkeypatch, kernel, 300, 300)
    finally:
        fastdiff.kernels.set_deterministic(False)
    assert timed == [kept[0]] and launched == [kept[0]]  # the first kept config, untimed choice


@pytest.mark.parametrize("kernel_name", ["_attention_fwd_kernel", "_attention_bwd_dkdv_kernel",
                                         "_attention_bwd_dq_kernel"])
def test_a_new_batch_times_heads_is_tuned_again(monkeypatch, consumer_gpu, kernel_name):
    # The grid grows with batch·heads, which decides how well each block size fills the
    # GPU: the tuned choice is cached per batch·heads, not reused across them.
    kernel = getattr(attention, kernel_name)
    cache = {}
    _, first = launch_through_autotuner(monkeypatch, kernel, 300, 300, batch_heads=8, cache=cache)
    _, again = launch_through_autotuner(monkeypatch, kernel, 300, 300, batch_heads=8, cache=cache)
    _, other = launch_through_autotuner(monkeypatch, kernel, 300, 300, batch_heads=64, cache=cache)
    assert len(first) > 1 and again == [] and other == first


# --------------------------------------------------------------- GroupNorm + SiLU
def test_group_norm_tile_prune_pins_the_first_config(deterministic):
    configs = [triton.Config({"TILE": tile}, num_warps=warps)
               for tile, warps in group_norm_silu.GPU_TILE_CONFIGS]
    assert group_norm_silu.prune_tile_configs(configs, {}) == configs[:1]
    fastdiff.kernels.set_deterministic(False)
    assert group_norm_silu.prune_tile_configs(configs, {}) == configs


# ------------------------------------------------------------------- the switch
def autotuners_in(module):
    return [value for value in vars(module).values()
            if isinstance(value, triton.runtime.autotuner.Autotuner)]


def test_every_autotuned_kernel_is_reached_by_the_switch():
    # A new autotuned kernel must be registered (its cache reset by the switch) and pruned
    # through determinism.pin, or the switch would leave it timing its configs.
    found = autotuners_in(attention) + autotuners_in(group_norm_silu)
    assert len(found) >= 4
    assert set(map(id, found)) == set(map(id, determinism.autotuned_kernels()))
    for kernel in found:
        assert kernel.early_config_prune is not None, kernel.base_fn.__name__


def test_switch_clears_choices_already_cached():
    kernel = attention._attention_fwd_kernel
    kernel.cache[("stale", "key")] = kernel.configs[0]
    try:
        fastdiff.kernels.set_deterministic(True)
        assert fastdiff.kernels.is_deterministic()
        assert ("stale", "key") not in kernel.cache
    finally:
        fastdiff.kernels.set_deterministic(False)
        kernel.cache.pop(("stale", "key"), None)
    assert not fastdiff.kernels.is_deterministic()
