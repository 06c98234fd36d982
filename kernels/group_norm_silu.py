"""Fused GroupNorm (+ per-sample scale/shift) + SiLU in Triton, forward and backward.

    y = act((GN(x) * weight + bias) * (1 + scale) + shift)

with GN's statistics in fp32 over each (sample, group), ``scale``/``shift`` optional
per-(n, c) tensors (guided-diffusion's use_scale_shift_norm path) and ``act`` SiLU or the
identity. Eager PyTorch moves the activation through memory once per op (norm, affine,
scale-shift, SiLU); here the forward reads x once for the statistics and once more
(mostly from L2) to write y.

Layout: x is [N, C, *spatial], handled as [N, C, S] through strides, so NCHW and
channels_last tensors both work without a copy. Each program walks [BLOCK_C, BLOCK_S]
tiles of one group; the tile's long side follows the contiguous axis.

Work split: one program per (n, g) group when there are enough groups to fill the GPU.
Otherwise (batch 1: [1, 320, 64, 64] has only 32 groups) every group's spatial range is
cut into chunks: a first kernel writes per-chunk partial statistics, the second merges
them (same order every time) and normalizes its chunk. The backward does the same with
its per-channel sums. No floating-point atomics anywhere, so results are deterministic.

Public entry points:
- ``group_norm_silu_forward`` / ``group_norm_silu_backward``: the launchers. The
  differentiable function is the custom op ``fastdiff.ops.group_norm_silu``, which calls
  them on CUDA (and on CPU under the interpreter); they take scale/shift as [N, C] views
  (``fastdiff.kernels.inputs.scale_shift_2d``) and check no arguments but the device.
- ``TILE_CONFIGS`` / ``block_configs()``: every launch configuration, for the GPU-compile
  test.
"""
import functools

import torch
import triton
import triton.language as tl

from fastdiff.kernels.determinism import autotuned, pin
from fastdiff.kernels.inputs import interpreting, output_like

INTERPRET = interpreting()

# (TILE = elements per tile, num_warps) tried by the autotuner on the GPU. Small tiles
# suit small groups (low-resolution layers), large tiles keep more bytes in flight. Every
# config gives each thread 8 elements per tile (16-byte bf16 loads): the backward keeps
# two fp32 accumulators of the tile in registers, and at 16 elements per thread (2048
# with 4 warps, 4096 with 8) it needed 128 registers on sm_90; at 8 it needs <= 59
# (benchmarks/compile_report.py). 4096 elements would need 16 warps, where ptxas caps
# the backward at 64 registers and spills.
GPU_TILE_CONFIGS = ((1024, 4), (2048, 8), (512, 2))
# The interpreter runs exactly one config (autotuning several fails there); a small
# tile makes the tiny test shapes cross tile boundaries and partial tiles.
INTERPRETER_TILE_CONFIGS = ((256, 1),)
TILE_CONFIGS = INTERPRETER_TILE_CONFIGS if INTERPRET else GPU_TILE_CONFIGS

# Channels per tile are capped: channels_last rows longer than this gain little.
MAX_BLOCK_C = 32
BLOCK_C_CHOICES = tuple(1 << i for i in range(MAX_BLOCK_C.bit_length()))

# The dweight/dbias reduction over the batch: one program per PARAM_BLOCK channels.
PARAM_BLOCK = 128
PARAM_WARPS = 4

# Split a group over several programs only while there are fewer groups than this many
# programs per SM, and never into chunks shorter than MIN_SPLIT_S spatial positions.
PROGRAMS_PER_SM = 2
MIN_SPLIT_S = 8 if INTERPRET else 256
SPLIT_ALIGN = 16  # chunk starts, in spatial positions (see plan_splits)
# Under the interpreter there is no SM count; this value makes tiny test shapes with
# few groups take the split path.
INTERPRETER_TARGET_PROGRAMS = 16


def pick_block_c(cpg, s_chunk, stride_c, stride_s, tile):
    """Channels per tile: the contiguous axis gets as much of the tile as it can use."""
    rows = min(triton.next_power_of_2(cpg), MAX_BLOCK_C)
    channels_inner = stride_c == 1 and stride_s != 1
    if not channels_inner:
        rows = min(rows, max(1, tile // triton.next_power_of_2(s_chunk)))
    return rows


def block_configs():
    """Every (TILE, BLOCK_C, BLOCK_S, num_warps) the GPU launchers can pick."""
    return [
        {"TILE": tile, "BLOCK_C": block_c, "BLOCK_S": tile // block_c, "num_warps": warps}
        for tile, warps in GPU_TILE_CONFIGS
        for block_c in BLOCK_C_CHOICES
    ]


def prune_tile_configs(configs, named_args, **kwargs):
    """Triton's ``early_config_prune`` hook: every config is timed, except under
    fastdiff.kernels.set_deterministic, where the first (GPU_TILE_CONFIGS[0]) is pinned
    for every shape: the tile decides the order the statistics are summed in."""
    return pin(configs)


def _tiled(kernel):
    """Autotune TILE/num_warps and derive the tile's shape from the group's layout."""
    configs = [triton.Config({"TILE": tile}, num_warps=warps) for tile, warps in TILE_CONFIGS]
    shaped = triton.heuristics({
        "BLOCK_C": lambda a: pick_block_c(a["cpg"], a["s_chunk"], a["stride_xc"],
                                          a["stride_xs"], a["TILE"]),
        "BLOCK_S": lambda a: a["TILE"] // a["BLOCK_C"],
    })(kernel)
    tune = triton.autotune(configs, key=["cpg", "S", "s_chunk", "stride_xc"],
                           prune_configs_by={"early_config_prune": prune_tile_configs})
    return autotuned(tune(shaped))


# --------------------------------------------------------------------------- helpers


@triton.jit
def _merge_stats(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """Chan et al.'s pairwise merge of two (count, mean, sum of squared deviations)."""
    count = count_a + count_b
    frac_b = count_b / count
    delta = mean_b - mean_a
    mean = mean_a + delta * frac_b
    m2 = m2_a + m2_b + delta * delta * count_a * frac_b
    return count, mean, m2


@triton.jit
def _chunk_stats(x_base, cpg, s_begin, s_end, stride_c, stride_s,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) in fp32 of x[0:cpg, s_begin:s_end] of one group.

    Each tile is reduced exactly (its mean, then its squared deviations from it) and
    merged into the running result, so no E[x^2] - E[x]^2 cancellation.
    """
    count = tl.full((), 0.0, tl.float32)
    mean = tl.full((), 0.0, tl.float32)
    m2 = tl.full((), 0.0, tl.float32)
    for c0 in range(0, cpg, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        for s0 in range(s_begin, s_end, BLOCK_S):
            cols = s0 + tl.arange(0, BLOCK_S)
            mask = (rows < cpg)[:, None] & (cols < s_end)[None, :]
            x = tl.load(x_base + rows[:, None] * stride_c + cols[None, :] * stride_s,
                        mask=mask, other=0.0).to(tl.float32)
            tile_count = (tl.minimum(cpg - c0, BLOCK_C) * tl.minimum(s_end - s0, BLOCK_S)).to(tl.float32)
            tile_mean = tl.sum(x) / tile_count
            dev = tl.where(mask, x - tile_mean, 0.0)
            count, mean, m2 = _merge_stats(count, mean, m2, tile_count, tile_mean, tl.sum(dev * dev))
    return count, mean, m2


@triton.jit
def _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, ch, cmask,
                    stride_sn, stride_sc, stride_hn, stride_hc,
                    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Per-channel weight, bias, (1 + scale) and shift of sample n, as fp32 vectors."""
    w = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
    gain = tl.full(w.shape, 1.0, tl.float32)
    offset = tl.full(w.shape, 0.0, tl.float32)
    if HAS_SCALE:
        gain += tl.load(scale_ptr + n * stride_sn + ch * stride_sc, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        offset = tl.load(shift_ptr + n * stride_hn + ch * stride_hc, mask=cmask, other=0.0).to(tl.float32)
    return w, b, gain, offset


@triton.jit
def _pre_activation(xhat, w, b, gain, offset, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """(h, u): h = xhat * w + b, then u = h * (1 + scale) + shift; GD's order of operations."""
    h = xhat * w[:, None] + b[:, None]
    u = h
    if HAS_SCALE:
        u = u * gain[:, None]
    if HAS_SHIFT:
        u = u + offset[:, None]
    return h, u


@triton.jit
def _grad_pre_activation(dy, u, ACT: tl.constexpr):
    """dL/du from dL/dy: SiLU'(u) = sigmoid(u) * (1 + u * (1 - sigmoid(u)))."""
    if ACT:
        sig = 1.0 / (1.0 + tl.exp(-u))
        return dy * sig * (1.0 + u * (1.0 - sig))
    else:
        return dy


@triton.jit
def _channel_sums(x_base, dy_base, n, ch0, cpg, s_begin, s_end, mean, rstd,
                  w_ptr, b_ptr, scale_ptr, shift_ptr,
                  stride_xc, stride_xs, stride_dc, stride_ds,
                  stride_sn, stride_sc, stride_hn, stride_hc,
                  c0, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per-channel sum(du) and sum(du * xhat) over s_begin:s_end, rows c0:c0+BLOCK_C."""
    rows = c0 + tl.arange(0, BLOCK_C)
    rmask = rows < cpg
    w, b, gain, offset = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, ch0 + rows, rmask,
                                         stride_sn, stride_sc, stride_hn, stride_hc,
                                         HAS_SCALE, HAS_SHIFT)
    acc_du = tl.full((BLOCK_C, BLOCK_S), 0.0, tl.float32)
    acc_du_xhat = tl.full((BLOCK_C, BLOCK_S), 0.0, tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        cols = s0 + tl.arange(0, BLOCK_S)
        mask = rmask[:, None] & (cols < s_end)[None, :]
        x = tl.load(x_base + rows[:, None] * stride_xc + cols[None, :] * stride_xs,
                    mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_base + rows[:, None] * stride_dc + cols[None, :] * stride_ds,
                     mask=mask, other=0.0).to(tl.float32)
        xhat = (x - mean) * rstd
        h, u = _pre_activation(xhat, w, b, gain, offset, HAS_SCALE, HAS_SHIFT)
        du = tl.where(mask, _grad_pre_activation(dy, u, ACT), 0.0)
        acc_du += du
        acc_du_xhat += du * xhat
    return tl.sum(acc_du, axis=1), tl.sum(acc_du_xhat, axis=1)


# --------------------------------------------------------------------------- forward


@_tiled
@triton.jit
def _gn_fwd_partial_stats_kernel(
    x_ptr, part_ptr, S, cpg, G, s_chunk,
    stride_xn, stride_xc, stride_xs,
    TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Split path, step 1: (count, mean, M2) of one spatial chunk of one group."""
    ng = tl.program_id(0)
    split = tl.program_id(1)
    n = ng // G
    g = ng % G
    x_base = x_ptr + n.to(tl.int64) * stride_xn + (g * cpg).to(tl.int64) * stride_xc
    s_begin = split * s_chunk
    s_end = tl.minimum(s_begin + s_chunk, S)
    count, mean, m2 = _chunk_stats(x_base, cpg, s_begin, s_end, stride_xc, stride_xs, BLOCK_C, BLOCK_S)
    out = part_ptr + (ng * tl.num_programs(1) + split) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@_tiled
@triton.jit
def _gn_fwd_kernel(
    x_ptr, y_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr,
    S, cpg, G, s_chunk, eps,
    stride_xn, stride_xc, stride_xs, stride_yn, stride_yc, stride_ys,
    stride_sn, stride_sc, stride_hn, stride_hc,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, SPLIT: tl.constexpr,
    TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Normalize one group (or one spatial chunk of it with SPLIT) and apply the epilogue."""
    ng = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    n = ng // G
    g = ng % G
    x_base = x_ptr + n.to(tl.int64) * stride_xn + (g * cpg).to(tl.int64) * stride_xc
    y_base = y_ptr + n.to(tl.int64) * stride_yn + (g * cpg).to(tl.int64) * stride_yc
    if SPLIT:
        # Merge the chunks' partial statistics, always in chunk order.
        part = part_ptr + ng * num_splits * 3
        count = tl.load(part)
        mean = tl.load(part + 1)
        m2 = tl.load(part + 2)
        for k in range(1, num_splits):
            count, mean, m2 = _merge_stats(count, mean, m2, tl.load(part + 3 * k),
                                           tl.load(part + 3 * k + 1), tl.load(part + 3 * k + 2))
    else:
        count, mean, m2 = _chunk_stats(x_base, cpg, 0, S, stride_xc, stride_xs, BLOCK_C, BLOCK_S)
    rstd = 1.0 / tl.sqrt_rn(m2 / count + eps)
    if split == 0:
        tl.store(mean_ptr + ng, mean)
        tl.store(rstd_ptr + ng, rstd)

    s_begin = split * s_chunk
    s_end = tl.minimum(s_begin + s_chunk, S)
    for c0 in range(0, cpg, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        rmask = rows < cpg
        w, b, gain, offset = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, g * cpg + rows,
                                             rmask, stride_sn, stride_sc, stride_hn, stride_hc,
                                             HAS_SCALE, HAS_SHIFT)
        for s0 in range(s_begin, s_end, BLOCK_S):
            cols = s0 + tl.arange(0, BLOCK_S)
            mask = rmask[:, None] & (cols < s_end)[None, :]
            x = tl.load(x_base + rows[:, None] * stride_xc + cols[None, :] * stride_xs,
                        mask=mask, other=0.0).to(tl.float32)
            h, u = _pre_activation((x - mean) * rstd, w, b, gain, offset, HAS_SCALE, HAS_SHIFT)
            if ACT:
                u = u / (1.0 + tl.exp(-u))  # SiLU: u * sigmoid(u)
            tl.store(y_base + rows[:, None] * stride_yc + cols[None, :] * stride_ys,
                     u.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- backward
#
# With du = dL/du and xhat the normalized input, per (n, c):
#   A = sum_s du,  B = sum_s du * xhat
#   dshift = A,  dscale = weight * B + bias * A
#   dbias = sum_n (1 + scale) * A,  dweight = sum_n (1 + scale) * B
#   dx = rstd * (k * du - mean_g(k * A) / S - xhat * mean_g(k * B) / S),  k = weight * (1 + scale)
# where mean_g averages over the group's channels (the /S makes it a mean over the group).


@_tiled
@triton.jit
def _gn_bwd_partial_sums_kernel(
    x_ptr, dy_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr,
    S, cpg, G, s_chunk, NC,
    stride_xn, stride_xc, stride_xs, stride_dn, stride_dc, stride_ds,
    stride_sn, stride_sc, stride_hn, stride_hc,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
    TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Split path, step 1: per-channel A and B over one spatial chunk -> part[split, 2, N*C]."""
    ng = tl.program_id(0)
    split = tl.program_id(1)
    n = ng // G
    g = ng % G
    x_base = x_ptr + n.to(tl.int64) * stride_xn + (g * cpg).to(tl.int64) * stride_xc
    dy_base = dy_ptr + n.to(tl.int64) * stride_dn + (g * cpg).to(tl.int64) * stride_dc
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)
    s_begin = split * s_chunk
    s_end = tl.minimum(s_begin + s_chunk, S)
    out = part_ptr + split * 2 * NC + n * (G * cpg) + g * cpg
    for c0 in range(0, cpg, BLOCK_C):
        sum_du, sum_du_xhat = _channel_sums(
            x_base, dy_base, n, g * cpg, cpg, s_begin, s_end, mean, rstd,
            w_ptr, b_ptr, scale_ptr, shift_ptr, stride_xc, stride_xs, stride_dc, stride_ds,
            stride_sn, stride_sc, stride_hn, stride_hc, c0, HAS_SCALE, HAS_SHIFT, ACT, BLOCK_C, BLOCK_S)
        rows = c0 + tl.arange(0, BLOCK_C)
        tl.store(out + rows, sum_du, mask=rows < cpg)
        tl.store(out + NC + rows, sum_du_xhat, mask=rows < cpg)


@_tiled
@triton.jit
def _gn_bwd_kernel(
    x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, part_ptr,
    sums_ptr, dscale_ptr, dshift_ptr,
    S, cpg, G, s_chunk, NC,
    stride_xn, stride_xc, stride_xs, stride_dn, stride_dc, stride_ds,
    stride_gn, stride_gc, stride_gs,
    stride_sn, stride_sc, stride_hn, stride_hc,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, SPLIT: tl.constexpr,
    TILE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """dx of one group (or chunk); the chunk-0 program also writes A, B, dscale, dshift."""
    ng = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    n = ng // G
    g = ng % G
    ch0 = g * cpg
    x_base = x_ptr + n.to(tl.int64) * stride_xn + ch0.to(tl.int64) * stride_xc
    dy_base = dy_ptr + n.to(tl.int64) * stride_dn + ch0.to(tl.int64) * stride_dc
    dx_base = dx_ptr + n.to(tl.int64) * stride_gn + ch0.to(tl.int64) * stride_gc
    mean = tl.load(mean_ptr + ng)
    rstd = tl.load(rstd_ptr + ng)

    # Pass 1: per-channel A, B (computed here, or merged from the chunks in chunk order)
    # and the group sums of k * A and k * B.
    group_ka = tl.full((), 0.0, tl.float32)
    group_kb = tl.full((), 0.0, tl.float32)
    nc0 = n * (G * cpg) + ch0
    for c0 in range(0, cpg, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        rmask = rows < cpg
        if SPLIT:
            sum_du = tl.load(part_ptr + nc0 + rows, mask=rmask, other=0.0)
            sum_du_xhat = tl.load(part_ptr + NC + nc0 + rows, mask=rmask, other=0.0)
            for k in range(1, num_splits):
                sum_du += tl.load(part_ptr + k * 2 * NC + nc0 + rows, mask=rmask, other=0.0)
                sum_du_xhat += tl.load(part_ptr + (k * 2 + 1) * NC + nc0 + rows, mask=rmask, other=0.0)
        else:
            sum_du, sum_du_xhat = _channel_sums(
                x_base, dy_base, n, ch0, cpg, 0, S, mean, rstd,
                w_ptr, b_ptr, scale_ptr, shift_ptr, stride_xc, stride_xs, stride_dc, stride_ds,
                stride_sn, stride_sc, stride_hn, stride_hc, c0, HAS_SCALE, HAS_SHIFT, ACT,
                BLOCK_C, BLOCK_S)
        w, b, gain, offset = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, ch0 + rows, rmask,
                                             stride_sn, stride_sc, stride_hn, stride_hc,
                                             HAS_SCALE, HAS_SHIFT)
        group_ka += tl.sum(w * gain * sum_du)
        group_kb += tl.sum(w * gain * sum_du_xhat)
        if split == 0:
            tl.store(sums_ptr + nc0 + rows, sum_du, mask=rmask)
            tl.store(sums_ptr + NC + nc0 + rows, sum_du_xhat, mask=rmask)
            if HAS_SCALE:
                tl.store(dscale_ptr + nc0 + rows, (w * sum_du_xhat + b * sum_du).to(dscale_ptr.dtype.element_ty),
                         mask=rmask)
            if HAS_SHIFT:
                tl.store(dshift_ptr + nc0 + rows, sum_du.to(dshift_ptr.dtype.element_ty), mask=rmask)
    inv_count = 1.0 / (cpg * S).to(tl.float32)
    mean_ka = group_ka * inv_count
    mean_kb = group_kb * inv_count

    # Pass 2: dx over this program's chunk.
    s_begin = split * s_chunk
    s_end = tl.minimum(s_begin + s_chunk, S)
    for c0 in range(0, cpg, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        rmask = rows < cpg
        w, b, gain, offset = _channel_params(w_ptr, b_ptr, scale_ptr, shift_ptr, n, ch0 + rows, rmask,
                                             stride_sn, stride_sc, stride_hn, stride_hc,
                                             HAS_SCALE, HAS_SHIFT)
        k_gain = w * gain
        for s0 in range(s_begin, s_end, BLOCK_S):
            cols = s0 + tl.arange(0, BLOCK_S)
            mask = rmask[:, None] & (cols < s_end)[None, :]
            x = tl.load(x_base + rows[:, None] * stride_xc + cols[None, :] * stride_xs,
                        mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_base + rows[:, None] * stride_dc + cols[None, :] * stride_ds,
                         mask=mask, other=0.0).to(tl.float32)
            xhat = (x - mean) * rstd
            h, u = _pre_activation(xhat, w, b, gain, offset, HAS_SCALE, HAS_SHIFT)
            du = _grad_pre_activation(dy, u, ACT)
            dx = rstd * (k_gain[:, None] * du - mean_ka - xhat * mean_kb)
            tl.store(dx_base + rows[:, None] * stride_gc + cols[None, :] * stride_gs,
                     dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_param_kernel(
    sums_ptr, scale_ptr, dw_ptr, db_ptr, N, C, stride_sn, stride_sc,
    HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    """dweight, dbias: sum over the batch of (1 + scale) * B and (1 + scale) * A, in order."""
    ch = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = ch < C
    dw = tl.full((BLOCK,), 0.0, tl.float32)
    db = tl.full((BLOCK,), 0.0, tl.float32)
    NC = N * C
    for n in range(0, N):
        sum_du = tl.load(sums_ptr + n * C + ch, mask=cmask, other=0.0)
        sum_du_xhat = tl.load(sums_ptr + NC + n * C + ch, mask=cmask, other=0.0)
        if HAS_SCALE:
            gain = 1.0 + tl.load(scale_ptr + n * stride_sn + ch * stride_sc, mask=cmask, other=0.0).to(tl.float32)
            sum_du *= gain
            sum_du_xhat *= gain
        db += sum_du
        dw += sum_du_xhat
    tl.store(dw_ptr + ch, dw.to(dw_ptr.dtype.element_ty), mask=cmask)
    tl.store(db_ptr + ch, db.to(db_ptr.dtype.element_ty), mask=cmask)


# --------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_splits(num_group_rows, S, device):
    """(num_splits, s_chunk): how many programs share each group's spatial range.

    ``num_group_rows`` is N * G. One program per group when that fills the device;
    otherwise enough chunks to reach the target, none shorter than MIN_SPLIT_S.
    """
    if device.type == "cuda":
        target = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None
                                             else torch.cuda.current_device())
    else:
        target = INTERPRETER_TARGET_PROGRAMS
    if num_group_rows >= target or S < 2 * MIN_SPLIT_S:
        return 1, S
    splits = min(triton.cdiv(target, num_group_rows), S // MIN_SPLIT_S)
    # Chunks start at multiples of SPLIT_ALIGN so that, when S is a multiple of it, every
    # chunk's tiles stay 16-byte aligned and the loads vectorize.
    s_chunk = triton.cdiv(triton.cdiv(S, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return triton.cdiv(S, s_chunk), s_chunk


def _check_triton_device(x):
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and INTERPRET:
        return
    raise ValueError(
        f"group_norm_silu (Triton): x is on {x.device}; the Triton kernels need CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported). "
        "Use fastdiff.ops.group_norm_silu for the CPU fallback.")


def _as_ncs(t):
    """[N, C, *spatial] -> [N, C, S] without copying when the spatial dims flatten."""
    n, c = t.shape[:2]
    try:
        return t.view(n, c, -1)
    except RuntimeError:
        return t.reshape(n, c, -1)


def _vector_args(t, like):
    """Pointer and (n, c) strides of an optional [N, C] tensor; a dummy when absent."""
    if t is None:
        return like, 0, 0
    return t, t.stride(0), t.stride(1)


def _device_guard(x):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def group_norm_silu_forward(x, weight, bias, num_groups, eps, scale, shift, act):
    """Launch the forward. scale/shift are [N, C] (or None).

    Returns (y, mean, rstd): y like x; mean and rstd fp32 [N, num_groups] for the backward.
    """
    _check_triton_device(x)
    N, C = x.shape[:2]
    G = num_groups
    cpg = C // G
    y = output_like(x)
    mean = torch.empty((N, G), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd
    x3, y3 = _as_ncs(x), y.view(N, C, -1)
    S = x3.shape[2]
    splits, s_chunk = plan_splits(N * G, S, x.device)
    scale_t, stride_sn, stride_sc = _vector_args(scale, x)
    shift_t, stride_hn, stride_hc = _vector_args(shift, x)
    with _device_guard(x):
        part = mean  # unused unless split
        if splits > 1:
            part = torch.empty((N * G, splits, 3), device=x.device, dtype=torch.float32)
            _gn_fwd_partial_stats_kernel[(N * G, splits)](
                x3, part, S, cpg, G, s_chunk, *x3.stride())
        _gn_fwd_kernel[(N * G, splits)](
            x3, y3, weight, bias, scale_t, shift_t, mean, rstd, part,
            S, cpg, G, s_chunk, eps, *x3.stride(), *y3.stride(),
            stride_sn, stride_sc, stride_hn, stride_hc,
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACT=act, SPLIT=splits > 1)
    return y, mean, rstd


def group_norm_silu_backward(dy, x, weight, bias, mean, rstd, num_groups, scale, shift, act):
    """Launch the backward. Returns (dx, dweight, dbias, dscale, dshift).

    dscale/dshift are [N, C] in scale's/shift's dtype, or None when that input is None.
    """
    _check_triton_device(x)
    N, C = x.shape[:2]
    G = num_groups
    cpg = C // G
    dx = output_like(x)
    dweight = torch.empty_like(weight)
    dbias = torch.empty_like(bias)
    dscale = None if scale is None else torch.empty((N, C), device=x.device, dtype=scale.dtype)
    dshift = None if shift is None else torch.empty((N, C), device=x.device, dtype=shift.dtype)
    if x.numel() == 0:
        for grad in (dweight, dbias, dscale, dshift):
            if grad is not None:
                grad.zero_()
        return dx, dweight, dbias, dscale, dshift
    x3, dy3, dx3 = _as_ncs(x), _as_ncs(dy), dx.view(N, C, -1)
    S = x3.shape[2]
    splits, s_chunk = plan_splits(N * G, S, x.device)
    scale_t, stride_sn, stride_sc = _vector_args(scale, x)
    shift_t, stride_hn, stride_hc = _vector_args(shift, x)
    flags = dict(HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, ACT=act)
    sums = torch.empty((2, N, C), device=x.device, dtype=torch.float32)
    with _device_guard(x):
        part = sums  # unused unless split
        if splits > 1:
            part = torch.empty((splits, 2, N, C), device=x.device, dtype=torch.float32)
            _gn_bwd_partial_sums_kernel[(N * G, splits)](
                x3, dy3, weight, bias, scale_t, shift_t, mean, rstd, part,
                S, cpg, G, s_chunk, N * C, *x3.stride(), *dy3.stride(),
                stride_sn, stride_sc, stride_hn, stride_hc, **flags)
        _gn_bwd_kernel[(N * G, splits)](
            x3, dy3, dx3, weight, bias, scale_t, shift_t, mean, rstd, part, sums,
            dscale if dscale is not None else sums, dshift if dshift is not None else sums,
            S, cpg, G, s_chunk, N * C, *x3.stride(), *dy3.stride(), *dx3.stride(),
            stride_sn, stride_sc, stride_hn, stride_hc, SPLIT=splits > 1, **flags)
        _gn_bwd_param_kernel[(triton.cdiv(C, PARAM_BLOCK),)](
            sums, scale_t, dweight, dbias, N, C, stride_sn, stride_sc,
            HAS_SCALE=scale is not None, BLOCK=PARAM_BLOCK, num_warps=PARAM_WARPS)
    return dx, dweight, dbias, dscale, dshift
