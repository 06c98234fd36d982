"""Fused (flash) attention in Triton: non-causal forward and backward, any strides.

Forward: one program per (batch·head, block of BLOCK_M queries) streams over the keys
with an online softmax in base 2 (scores are pre-multiplied by scale·log2(e), so
``exp2`` replaces ``exp``), accumulates in fp32 and saves the natural-log
log-sum-exp of every query row for the backward.

Backward (deterministic, no atomics): a preprocess kernel computes
``delta = rowsum(dO · O)``; one kernel per (batch·head, key block) loops over the query
blocks to accumulate dK and dV; one kernel per (batch·head, query block) loops over
the key blocks to accumulate dQ. Both recompute the probabilities from the saved
log-sum-exp instead of storing the S×S matrix.

Every tensor is addressed through (base pointer, 4 strides), so guided-diffusion's
packed ``qkv`` tensor [N, 3·H·C, T] is read in place (no transpose or contiguous copy)
and the output is written straight into the [N, H·C, T] layout its projection reads.

Head dims up to MAX_HEAD_DIM (128, kernels/inputs.py): the head dim is padded to a power
of two ≥ 16 in registers and masked, so 32/64/128 run unmasked and e.g. 40 or 80 run
masked. Any sequence length: only the last (partial) block of a loop is masked.

Dots take bf16/fp16 operands on the GPU (tensor cores) and fp32 operands run in
IEEE fp32 unless TF32 is allowed. IEEE fp32 dots run on FMA units and every tile of
them spills registers on sm_90 (benchmarks/compile_report.py), so the custom ops send
fp32 inputs on CUDA to torch instead (fastdiff.ops.attention); the launchers still
accept fp32, and the interpreter runs it. Under TRITON_INTERPRET=1, bf16/fp16 dots are
computed in fp32 after rounding the operands to the input dtype, because the
interpreter's low-precision dot is wrong.

Public entry points: the launchers ``attention_forward`` / ``attention_backward`` (q, k, v
[B, H, S, D]) and ``qkv_attention_forward`` / ``qkv_attention_backward`` (GD's packed
qkv). The differentiable functions are the custom ops ``fastdiff.ops.attention`` and
``fastdiff.ops.qkv_attention``, which call these launchers on CUDA (and on CPU under the
interpreter).
"""
import contextlib
import functools
import math

import torch
import triton
import triton.language as tl

from fastdiff.kernels.determinism import autotuned, pin
from fastdiff.kernels.inputs import (MAX_HEAD_DIM, channels_as_heads, check_attention_inputs,
                                     interpreting, qkv_head_views)

_INTERPRET = interpreting()
_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------- configs
# Block configurations the autotuners may pick on a GPU, as plain data so that the
# compile test (tests/test_triton_compile_attention.py) compiles exactly these for
# sm_90 / sm_80 and checks their shared memory. The interpreter gets one small config
# (autotune with several configs fails there, and small blocks keep launches cheap
# while still exercising multi-block loops and masked tails on tiny test shapes).
# Order matters under fastdiff.kernels.set_deterministic: each launch then runs the
# first config that prune_configs keeps for its shape.
def _cfg(block_m, block_n, warps, stages):
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


KERNEL_CONFIGS = {
    # One program per BLOCK_M queries, BLOCK_N keys per loop step.
    "forward": [
        _cfg(128, 64, 4, 3),  # head dims <= 64 only (REGISTER_LIMITED)
        _cfg(128, 64, 8, 3),
        _cfg(128, 128, 8, 2),  # 2 stages: 3 took 224 of the 227 KB at head dim 128
        _cfg(128, 64, 8, 4),
        _cfg(64, 64, 4, 3),
        _cfg(64, 32, 4, 2),
    ],
    # dK/dV: one program per BLOCK_N keys, BLOCK_M queries per loop step. Its dK and dV
    # accumulators ([BLOCK_N, BLOCK_D] fp32 each) stay in registers: at head dim 128
    # only 8 warps, or 64 keys or fewer per program with 4 warps, fit without spilling.
    "backward_dkdv": [
        _cfg(32, 128, 8, 3),
        _cfg(64, 128, 8, 2),  # head dims <= 64 only
        _cfg(32, 64, 4, 3),
        _cfg(64, 64, 8, 2),
        _cfg(64, 64, 4, 2),  # head dims <= 64 only
        _cfg(32, 32, 4, 2),  # head dims <= 64 only
        _cfg(16, 64, 4, 2),  # fits 99 KB parts (sm_86/89) with fp32 and head dim 128
    ],
    # dQ: one program per BLOCK_M queries, BLOCK_N keys per loop step.
    "backward_dq": [
        _cfg(128, 32, 8, 3),
        _cfg(128, 64, 8, 2),
        _cfg(64, 32, 4, 3),
        _cfg(64, 64, 4, 2),
        _cfg(32, 32, 4, 2),  # fits 99 KB parts (sm_86/89) with fp32 and head dim 128
    ],
}


def _config_key(cfg):
    return cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]


# Configs that spill registers on sm_90 (bf16/fp16, benchmarks/compile_report.py) above
# this head-dim block, so they are kept only up to it: a spilling config is slow before it
# is timed, and each one costs the autotuner a compile on the GPU.
REGISTER_LIMITED = {
    "forward": {(128, 64, 4, 3): 64},  # 255 registers + 512 B of spills at head dim 128
    "backward_dkdv": {(64, 128, 8, 2): 64, (64, 64, 4, 2): 64, (32, 32, 4, 2): 64},
    "backward_dq": {},
}


def max_block_d(kind, cfg):
    """The largest head-dim block ``cfg`` of ``kind`` compiles for without spilling."""
    return REGISTER_LIMITED[kind].get(_config_key(cfg), MAX_HEAD_DIM)


INTERPRETER_CONFIG = _cfg(32, 16, 4, 1)
DELTA_BLOCK_M = 64
SM90_SHARED_BYTES = 227 * 1024  # opt-in shared memory per block, H100/H200
# IEEE fp32 dots run on FMA units: large tiles spill registers and take up to a minute
# each to compile, so fp32 without TF32 is limited to tiles of at most this many scores.
_FP32_IEEE_MAX_TILE = 64 * 64


def head_dim_block(head_dim):
    """Register width of the head dim: next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def shared_memory_estimate(kind, cfg, block_d, element_size):
    """Upper bound of the shared memory (bytes) a config uses: the tiles that stay
    resident for the whole program plus ``num_stages`` copies of the two tiles each loop
    step loads (K, V in the forward and dQ kernels; Q, dO in the dK/dV kernel, which also
    streams the fp32 lse and delta rows). The compile test checks this bound against the
    compiler's own figure."""
    m, n, stages = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_stages"]
    resident, streamed = {"forward": (m, 2 * n), "backward_dkdv": (2 * n, 2 * m),
                          "backward_dq": (2 * m, 2 * n)}[kind]
    row_vectors = stages * 2 * m * 4 if kind == "backward_dkdv" else 0
    return (resident + stages * streamed) * block_d * element_size + row_vectors


def _fits(kind, cfg, block_d, element_size, input_precision, shared_limit):
    """Whether ``cfg`` fits the shared memory, its register limit (REGISTER_LIMITED) and,
    for IEEE fp32 dots, the tile cap."""
    if shared_memory_estimate(kind, cfg, block_d, element_size) > shared_limit:
        return False
    if block_d > max_block_d(kind, cfg):
        return False
    return not (element_size == 4 and input_precision == "ieee"
                and cfg["BLOCK_M"] * cfg["BLOCK_N"] > _FP32_IEEE_MAX_TILE)


def usable_configs(kind, block_d, element_size, input_precision="ieee", shared_limit=SM90_SHARED_BYTES):
    """The configs of ``kind`` the autotuner may try for this head-dim block and dtype."""
    return [cfg for cfg in KERNEL_CONFIGS[kind]
            if _fits(kind, cfg, block_d, element_size, input_precision, shared_limit)]


def _covering_block(seq_len, blocks):
    """The longest block worth using on a sequence: its length rounded up to a power of two,
    or the shortest block there is when every block is longer."""
    return max(triton.next_power_of_2(seq_len), min(blocks))


def prune_configs(kind, configs, seq_q, seq_k, block_d, element_size, input_precision, shared_limit):
    """The configs (dicts, in preference order) worth timing for one launch; never empty.

    Dropped: configs over the GPU's shared memory, over their head-dim limit
    (REGISTER_LIMITED) or over the IEEE fp32 tile cap (:func:`usable_configs`), and configs
    whose query block (BLOCK_M, over ``seq_q``) or key block (BLOCK_N, over ``seq_k``) is
    longer than the sequence rounded up to a power of two: more than half of such a block is
    padding, and a shorter block covers the sequence in as few steps. If the length rule
    drops every config that fits, the configs that fit are kept; if none fits (a GPU with
    less shared memory than any listed part), the one with the smallest estimate is
    returned, so that Triton reports the resource error instead of failing on an empty
    list. With :func:`fastdiff.kernels.set_deterministic` on, only the first kept config is
    returned: one pinned config per shape, chosen without timing.
    """
    fitting = [cfg for cfg in configs
               if _fits(kind, cfg, block_d, element_size, input_precision, shared_limit)]
    if not fitting:
        return [min(configs, key=lambda cfg: shared_memory_estimate(kind, cfg, block_d, element_size))]
    longest_m = _covering_block(seq_q, [cfg["BLOCK_M"] for cfg in fitting])
    longest_n = _covering_block(seq_k, [cfg["BLOCK_N"] for cfg in fitting])
    short = [cfg for cfg in fitting if cfg["BLOCK_M"] <= longest_m and cfg["BLOCK_N"] <= longest_n]
    return pin(short or fitting)


def device_shared_memory(device):
    """Opt-in shared memory per block (bytes) of the GPU ``device``."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", SM90_SHARED_BYTES)


def _as_dict(config):
    return _cfg(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
                config.num_stages)


def early_prune(kind, triton_configs, named_args, **kwargs):
    """Triton's ``early_config_prune`` hook of the ``kind`` kernel: the autotuner's configs
    that :func:`prune_configs` keeps for this launch (its arguments are ``named_args``, the
    constexprs ``kwargs``)."""
    q = named_args["q_ptr"]
    kept = prune_configs(kind, [_as_dict(c) for c in triton_configs], named_args["seq_q"],
                         named_args["seq_k"], kwargs["BLOCK_D"], q.element_size(),
                         kwargs["INPUT_PRECISION"], device_shared_memory(q.device))
    return [c for c in triton_configs if _as_dict(c) in kept]


# What a tuned choice is cached by. The grid is (blocks per sequence) × batch·heads, so
# batch·heads decides how well each block size fills the GPU: a new value re-tunes. The
# kernels receive ``batch_heads`` only for this key (unspecialized, so no recompiles).
AUTOTUNE_KEY = ("batch_heads", "seq_q", "seq_k", "HEAD_DIM", "INPUT_PRECISION")


def _autotune(kind):
    """@triton.autotune over KERNEL_CONFIGS[kind], pruned per launch by :func:`early_prune`."""
    configs = [INTERPRETER_CONFIG] if _INTERPRET else KERNEL_CONFIGS[kind]
    triton_configs = [
        triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                      num_warps=c["num_warps"], num_stages=c["num_stages"])
        for c in configs
    ]
    tune = triton.autotune(configs=triton_configs, key=list(AUTOTUNE_KEY),
                           prune_configs_by={"early_config_prune": functools.partial(early_prune, kind)})
    return lambda kernel: autotuned(tune(kernel))


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _load_tile(ptr, offs_r, offs_c, stride_r, stride_c, lim_r, lim_c,
               MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Load a [R, C] tile at ptr + r·stride_r + c·stride_c, zero outside the limits."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if MASK_R:
        if MASK_C:
            tile = tl.load(ptrs, mask=(offs_r[:, None] < lim_r) & (offs_c[None, :] < lim_c), other=0.0)
        else:
            tile = tl.load(ptrs, mask=offs_r[:, None] < lim_r, other=0.0)
    else:
        if MASK_C:
            tile = tl.load(ptrs, mask=offs_c[None, :] < lim_c, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _store_tile(ptr, value, offs_r, offs_c, stride_r, stride_c, lim_r, lim_c, MASK_C: tl.constexpr):
    """Store a [R, C] tile (rows always masked: the row block may overhang the sequence)."""
    ptrs = ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    value = value.to(ptr.dtype.element_ty)
    if MASK_C:
        tl.store(ptrs, value, mask=(offs_r[:, None] < lim_r) & (offs_c[None, :] < lim_c))
    else:
        tl.store(ptrs, value, mask=offs_r[:, None] < lim_r)


@triton.jit
def _dot_operand(x, dtype: tl.constexpr, DOT_FP32: tl.constexpr):
    """Round x to the input dtype; under the interpreter, hand the dot fp32 values."""
    x = x.to(dtype)
    if DOT_FP32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _program_coords(num_blocks, num_heads):
    """(block index, batch, head) of this program; consecutive programs share a head."""
    pid = tl.program_id(0)
    bh = pid // num_blocks
    block = pid % num_blocks
    return block, (bh // num_heads).to(tl.int64), (bh % num_heads).to(tl.int64), bh.to(tl.int64)


# ----------------------------------------------------------------------------- forward
@triton.jit
def _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, start_n, offs_n, offs_d,
              stride_ks, stride_kd, stride_vs, stride_vd, seq_k, scale_log2,
              HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
              DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    offs = start_n + offs_n
    k_t = _load_tile(k_ptr, offs_d, offs, stride_kd, stride_ks, HEAD_DIM, seq_k, MASK_D, MASK_N)
    v = _load_tile(v_ptr, offs, offs_d, stride_vs, stride_vd, seq_k, HEAD_DIM, MASK_N, MASK_D)
    dtype: tl.constexpr = v.dtype
    s = tl.dot(q, _dot_operand(k_t, dtype, DOT_FP32), input_precision=INPUT_PRECISION) * scale_log2
    if MASK_N:
        s = tl.where(offs[None, :] < seq_k, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(_dot_operand(p, dtype, DOT_FP32), _dot_operand(v, dtype, DOT_FP32), acc,
                 input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@_autotune("forward")
@triton.jit(do_not_specialize=["batch_heads"])
def _attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    num_heads, seq_q, seq_k, batch_heads, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    block, batch, head, bh = _program_coords(tl.cdiv(seq_q, BLOCK_M), num_heads)
    q_ptr += batch * stride_qb + head * stride_qh
    k_ptr += batch * stride_kb + head * stride_kh
    v_ptr += batch * stride_vb + head * stride_vh
    o_ptr += batch * stride_ob + head * stride_oh

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM, True, MASK_D)
    q = _dot_operand(q, q.dtype, DOT_FP32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = (seq_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, start_n, offs_n, offs_d,
                                  stride_ks, stride_kd, stride_vs, stride_vd, seq_k, scale_log2,
                                  HEAD_DIM, False, MASK_D, DOT_FP32, INPUT_PRECISION)
    if full_end < seq_k:
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k_ptr, v_ptr, full_end, offs_n, offs_d,
                                  stride_ks, stride_kd, stride_vs, stride_vd, seq_k, scale_log2,
                                  HEAD_DIM, True, MASK_D, DOT_FP32, INPUT_PRECISION)

    acc = acc / l_i[:, None]
    _store_tile(o_ptr, acc, offs_m, offs_d, stride_os, stride_od, seq_q, HEAD_DIM, MASK_D)
    # m_i is in log2 units (scores were scaled by log2 e): convert to a natural log.
    lse = m_i * _LN2 + tl.log(l_i)
    tl.store(lse_ptr + bh * seq_q + offs_m, lse, mask=offs_m < seq_q)


# ----------------------------------------------------------------------------- backward
@triton.jit
def _attention_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_dob, stride_doh, stride_dos, stride_dod,
    num_heads, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO · O): the softmax-Jacobian term shared by the dK/dV and dQ kernels."""
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    block, batch, head, bh = _program_coords(tl.cdiv(seq_q, BLOCK_M), num_heads)
    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(o_ptr + batch * stride_ob + head * stride_oh, offs_m, offs_d,
                   stride_os, stride_od, seq_q, HEAD_DIM, True, MASK_D)
    do = _load_tile(do_ptr + batch * stride_dob + head * stride_doh, offs_m, offs_d,
                    stride_dos, stride_dod, seq_q, HEAD_DIM, True, MASK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start_m, offs_m, offs_d,
               stride_qs, stride_qd, stride_dos, stride_dod, seq_q, scale_log2,
               HEAD_DIM: tl.constexpr, MASK_M: tl.constexpr, MASK_D: tl.constexpr,
               DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    offs = start_m + offs_m
    q_t = _load_tile(q_ptr, offs_d, offs, stride_qd, stride_qs, HEAD_DIM, seq_q, MASK_D, MASK_M)
    do = _load_tile(do_ptr, offs, offs_d, stride_dos, stride_dod, seq_q, HEAD_DIM, MASK_M, MASK_D)
    if MASK_M:
        lse = tl.load(lse_ptr + offs, mask=offs < seq_q, other=0.0) * _LOG2E
        delta = tl.load(delta_ptr + offs, mask=offs < seq_q, other=0.0)
    else:
        lse = tl.load(lse_ptr + offs) * _LOG2E
        delta = tl.load(delta_ptr + offs)
    dtype: tl.constexpr = do.dtype
    q_t = _dot_operand(q_t, dtype, DOT_FP32)
    do_op = _dot_operand(do, dtype, DOT_FP32)
    # Transposed probabilities P^T [keys, queries], recomputed from the saved LSE. Query
    # rows past the sequence need no mask: their q, dO, lse and delta load as 0, so
    # P^T = 1 there but dO = 0 adds nothing to dV and dS = P·(dP − delta) = 0 to dK.
    s_t = tl.dot(k, q_t, input_precision=INPUT_PRECISION)
    p_t = tl.math.exp2(s_t * scale_log2 - lse[None, :])
    dv = tl.dot(_dot_operand(p_t, dtype, DOT_FP32), do_op, dv, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do_op), input_precision=INPUT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(_dot_operand(ds_t, dtype, DOT_FP32), tl.trans(q_t), dk, input_precision=INPUT_PRECISION)
    return dk, dv


@_autotune("backward_dkdv")
@triton.jit(do_not_specialize=["batch_heads"])
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    num_heads, seq_q, seq_k, batch_heads, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    block, batch, head, bh = _program_coords(tl.cdiv(seq_k, BLOCK_N), num_heads)
    q_ptr += batch * stride_qb + head * stride_qh
    k_ptr += batch * stride_kb + head * stride_kh
    v_ptr += batch * stride_vb + head * stride_vh
    do_ptr += batch * stride_dob + head * stride_doh
    lse_ptr += bh * seq_q
    delta_ptr += bh * seq_q

    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptr, offs_n, offs_d, stride_ks, stride_kd, seq_k, HEAD_DIM, True, MASK_D)
    v = _load_tile(v_ptr, offs_n, offs_d, stride_vs, stride_vd, seq_k, HEAD_DIM, True, MASK_D)
    k = _dot_operand(k, k.dtype, DOT_FP32)
    v = _dot_operand(v, v.dtype, DOT_FP32)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    full_end = (seq_q // BLOCK_M) * BLOCK_M
    for start_m in range(0, full_end, BLOCK_M):
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, start_m, offs_m, offs_d,
                            stride_qs, stride_qd, stride_dos, stride_dod, seq_q, scale_log2,
                            HEAD_DIM, False, MASK_D, DOT_FP32, INPUT_PRECISION)
    if full_end < seq_q:
        dk, dv = _dkdv_step(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, full_end, offs_m, offs_d,
                            stride_qs, stride_qd, stride_dos, stride_dod, seq_q, scale_log2,
                            HEAD_DIM, True, MASK_D, DOT_FP32, INPUT_PRECISION)

    _store_tile(dk_ptr + batch * stride_dkb + head * stride_dkh, dk * scale, offs_n, offs_d,
                stride_dks, stride_dkd, seq_k, HEAD_DIM, MASK_D)
    _store_tile(dv_ptr + batch * stride_dvb + head * stride_dvh, dv, offs_n, offs_d,
                stride_dvs, stride_dvd, seq_k, HEAD_DIM, MASK_D)


@triton.jit
def _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, start_n, offs_n, offs_d,
             stride_ks, stride_kd, stride_vs, stride_vd, seq_k, scale_log2,
             HEAD_DIM: tl.constexpr, MASK_N: tl.constexpr, MASK_D: tl.constexpr,
             DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    offs = start_n + offs_n
    k_t = _load_tile(k_ptr, offs_d, offs, stride_kd, stride_ks, HEAD_DIM, seq_k, MASK_D, MASK_N)
    v_t = _load_tile(v_ptr, offs_d, offs, stride_vd, stride_vs, HEAD_DIM, seq_k, MASK_D, MASK_N)
    dtype: tl.constexpr = k_t.dtype
    k_t = _dot_operand(k_t, dtype, DOT_FP32)
    s = tl.dot(q, k_t, input_precision=INPUT_PRECISION)
    p = tl.math.exp2(s * scale_log2 - lse[:, None])
    if MASK_N:
        # Keys past the sequence load as 0, so their score is 0 and exp2(0 − lse) can
        # overflow when every real score is very negative: zero them explicitly.
        p = tl.where(offs[None, :] < seq_k, p, 0.0)
    dp = tl.dot(do, _dot_operand(v_t, dtype, DOT_FP32), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(_dot_operand(ds, dtype, DOT_FP32), tl.trans(k_t), dq, input_precision=INPUT_PRECISION)
    return dq


@_autotune("backward_dq")
@triton.jit(do_not_specialize=["batch_heads"])
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    num_heads, seq_q, seq_k, batch_heads, scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    MASK_D: tl.constexpr = HEAD_DIM != BLOCK_D
    block, batch, head, bh = _program_coords(tl.cdiv(seq_q, BLOCK_M), num_heads)
    q_ptr += batch * stride_qb + head * stride_qh
    k_ptr += batch * stride_kb + head * stride_kh
    v_ptr += batch * stride_vb + head * stride_vh
    do_ptr += batch * stride_dob + head * stride_doh

    offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr, offs_m, offs_d, stride_qs, stride_qd, seq_q, HEAD_DIM, True, MASK_D)
    do = _load_tile(do_ptr, offs_m, offs_d, stride_dos, stride_dod, seq_q, HEAD_DIM, True, MASK_D)
    q = _dot_operand(q, q.dtype, DOT_FP32)
    do = _dot_operand(do, do.dtype, DOT_FP32)
    row_ok = offs_m < seq_q
    lse = tl.load(lse_ptr + bh * seq_q + offs_m, mask=row_ok, other=0.0) * _LOG2E
    delta = tl.load(delta_ptr + bh * seq_q + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end = (seq_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, start_n, offs_n, offs_d,
                      stride_ks, stride_kd, stride_vs, stride_vd, seq_k, scale_log2,
                      HEAD_DIM, False, MASK_D, DOT_FP32, INPUT_PRECISION)
    if full_end < seq_k:
        dq = _dq_step(dq, q, do, lse, delta, k_ptr, v_ptr, full_end, offs_n, offs_d,
                      stride_ks, stride_kd, stride_vs, stride_vd, seq_k, scale_log2,
                      HEAD_DIM, True, MASK_D, DOT_FP32, INPUT_PRECISION)

    _store_tile(dq_ptr + batch * stride_dqb + head * stride_dqh, dq * scale, offs_m, offs_d,
                stride_dqs, stride_dqd, seq_q, HEAD_DIM, MASK_D)


# ----------------------------------------------------------------------------- launchers
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_launchable(*tensors):
    """Errors the Triton path adds on top of the op's shape rules."""
    q = tensors[0]
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"attention kernel: dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention kernel: head dim {q.shape[-1]} > {MAX_HEAD_DIM} is not supported; "
                         "use torch's scaled_dot_product_attention for larger heads")
    for t in tensors:
        if t.device != q.device:
            raise ValueError(f"attention kernel: tensors on different devices ({q.device} and {t.device})")
    if q.device.type != "cuda" and not (_INTERPRET and q.device.type == "cpu"):
        raise ValueError(f"attention kernel: needs CUDA tensors (got {q.device}); CPU tensors run only "
                         "under TRITON_INTERPRET=1")


def _dot_settings(dtype, allow_tf32):
    """(DOT_FP32, INPUT_PRECISION) for this dtype: fp32 dots are IEEE unless TF32 is allowed."""
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    dot_fp32 = _INTERPRET and dtype != torch.float32
    precision = "tf32" if (dtype == torch.float32 and allow_tf32 and not _INTERPRET) else "ieee"
    return dot_fp32, precision


def _device_guard(t):
    """Launch on the tensor's GPU (triton uses the current device's stream)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def attention_forward(q, k, v, scale=None, out=None, allow_tf32=None):
    """Launch the forward kernel; returns (out [B, H, Sq, D], lse [B, H, Sq] fp32, natural log).

    q: [B, H, Sq, D], k/v: [B, H, Sk, D], any strides. ``out`` may be a preallocated
    (strided) view to write into. ``scale`` defaults to 1/sqrt(D). ``allow_tf32`` (fp32
    inputs only) defaults to torch.backends.cuda.matmul.allow_tf32, so fp32 stays IEEE
    unless the caller opted into TF32 for matmuls.
    """
    check_attention_inputs(q, k, v)
    _check_launchable(q, k, v)
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    dot_fp32, precision = _dot_settings(q.dtype, allow_tf32)

    def grid(meta):
        return (triton.cdiv(seq_q, meta["BLOCK_M"]) * batch * heads,)

    with _device_guard(q):
        _attention_fwd_kernel[grid](
            q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            heads, seq_q, seq_k, batch * heads, scale * _LOG2E.value,
            HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), DOT_FP32=dot_fp32,
            INPUT_PRECISION=precision)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, scale=None, dq=None, dk=None, dv=None,
                       allow_tf32=None):
    """Launch the backward kernels; returns (dq, dk, dv), written into dq/dk/dv if given.

    ``out`` and ``lse`` are the forward's results; every tensor may have any strides.
    """
    check_attention_inputs(q, k, v)
    _check_launchable(q, k, v, out, grad_out)
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    grad_out = grad_out.to(q.dtype)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    lse = lse.contiguous()
    dot_fp32, precision = _dot_settings(q.dtype, allow_tf32)
    block_d = head_dim_block(head_dim)
    delta_block = INTERPRETER_CONFIG["BLOCK_M"] if _INTERPRET else DELTA_BLOCK_M
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, DOT_FP32=dot_fp32, INPUT_PRECISION=precision)

    with _device_guard(q):
        _attention_bwd_delta_kernel[(triton.cdiv(seq_q, delta_block) * batch * heads,)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, seq_q,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=delta_block)
        _attention_bwd_dkdv_kernel[lambda meta: (triton.cdiv(seq_k, meta["BLOCK_N"]) * batch * heads,)](
            q, k, v, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
            heads, seq_q, seq_k, batch * heads, scale, scale * _LOG2E.value, **common)
        _attention_bwd_dq_kernel[lambda meta: (triton.cdiv(seq_q, meta["BLOCK_M"]) * batch * heads,)](
            q, k, v, grad_out, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
            heads, seq_q, seq_k, batch * heads, scale, scale * _LOG2E.value, **common)
    return dq, dk, dv


def qkv_attention_forward(qkv, num_heads, legacy_order=True, allow_tf32=None):
    """Attention over guided-diffusion's packed qkv [N, 3·H·C, T], read in place.

    Returns (out [N, H·C, T] contiguous, lse [N, H, T]). Softmax scale 1/sqrt(C).
    """
    q, k, v = qkv_head_views(qkv, num_heads, legacy_order)
    batch, _, length = qkv.shape
    head_dim = q.shape[-1]
    out = torch.empty((batch, num_heads * head_dim, length), dtype=qkv.dtype, device=qkv.device)
    _, lse = attention_forward(q, k, v, 1.0 / math.sqrt(head_dim),
                               out=channels_as_heads(out, num_heads), allow_tf32=allow_tf32)
    return out, lse


def qkv_attention_backward(grad_out, qkv, out, lse, num_heads, legacy_order=True, allow_tf32=None):
    """Gradient of :func:`qkv_attention_forward` w.r.t. qkv, as one [N, 3·H·C, T] tensor."""
    q, k, v = qkv_head_views(qkv, num_heads, legacy_order)
    grad_qkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = qkv_head_views(grad_qkv, num_heads, legacy_order)
    attention_backward(channels_as_heads(grad_out, num_heads), q, k, v,
                       channels_as_heads(out, num_heads), lse, 1.0 / math.sqrt(q.shape[-1]),
                       dq=dq, dk=dk, dv=dv, allow_tf32=allow_tf32)
    return grad_qkv
