"""BatchNorm2d + activation (optionally on a gated skip sum ``x = up + a·skip``, optionally with a
residual added after the norm, optionally PReLU with a learned slope): Triton kernels.

Every tensor is walked as a 3-D view [N', C, S'] of the 4-D [N, C, H, W] input through its own
strides: S = H·W when (H, W) merge into one stride, and N·S merges further into one index when
``stride(0) == S·stride_s`` (channels_last, or N = 1), so small spatial maps in channels_last do
not waste tile lanes. NCHW, channels_last and other strided views run without layout copies.
Reductions are tiled by the shared planner (``launch.ReducePlan``: grid (N'·chunks, C-blocks)).

Forward, training (batch statistics), 2 launches, 2 passes over x (the minimum):
  1. ``_bn_stats_kernel``: each program reduces one S'-chunk of one sample and channel block with
     per-lane Welford (mean, M2, count), merges its lanes with Chan's formula in the delta form
     (``common.merge_partials``: exact for constant channels) and writes one row of fp32 partials;
     then it draws an integer ticket, and the program that draws the last ticket of its channel
     block merges all rows in a fixed order (deterministic), writes mean, rstd and M2 and updates
     running_mean / running_var with momentum and the unbiased variance exactly as torch does (or
     the cumulative average 1/num_batches_tracked). Never autotuned: no replayed update.
  2. ``_bn_apply_kernel`` (autotuned, pure): y = act((x − mean)·rstd·γ + β [+ residual]), one tile
     per program; for PReLU (ACT = PRELU) the slope is loaded per channel (stride 0: one slope).
  ``_bn_finalize_kernel`` (the same merge as a kernel of its own) merges per-rank statistics
  gathered by SyncBatchNorm (rows = ranks).
Forward, eval (running statistics): ``_bn_apply_kernel`` alone, rstd computed from running_var.

Backward (saved: the input(s), the residual and fp32 mean/rstd; z = x̂·γ + β [+ residual] and act'(z)
are recomputed), 2 launches:
  1. ``_bn_backward_reduce_kernel``: per program fp32 partials of Σ dy', Σ dy'·x̂ (dy' = dy·act'(z)),
     for the gate gradient Σ dy'·skip, Σ skip, Σ x̂·skip, and for PReLU Σ dy·z·[z ≤ 0] (the slope
     gradient per channel, always the last of the K rows); the last program of each channel
     block sums the rows in a fixed order into [K, C] sums and computes the gate gradient
     Σ dx·skip = γ·rstd·(Σdy'·skip − Σdy'/M·Σskip − Σ(dy'·x̂)/M·Σx̂·skip) (training; γ·rstd·Σdy'·skip
     in eval), summed over channels by the last channel block for a scalar gate.
     dβ = Σ dy', dγ = Σ dy'·x̂. When the residual needs its gradient it also writes
     d_residual = dy' (NEED_DRES).
  2. ``_bn_backward_dx_kernel`` (autotuned, elementwise):
     dx = γ·rstd·(dy' − Σdy'/M − x̂·Σ(dy'·x̂)/M) in training (M values per channel), γ·rstd·dy' in
     eval; d_up = dx, d_skip = a·dx, d_residual = dy' when the reduce kernel did not write it
     (eval without parameter gradients). Given the reduce kernel's d_residual as its gradient
     (identity activation, no residual) it reads x and dy' only: with a residual the backward
     moves x, grad, residual in + d_residual out, then x, dy' in + dx out (7 passes, not 8).

Scalars (eps, slope, momentum, 1/M) travel as fp32 (hi, lo) pairs rebuilt in-kernel in the
accumulation dtype (``common.acc_scalar``): in fp32 that is hi (never promoted to fp64
arithmetic), in fp64 (gradcheck) hi + lo, the host double to ~2⁻⁴⁸ (Triton passes floats as fp32).

Pointer and stride names: ``<tensor>_ptr`` with strides ``<tensor>_sn, _sc, _sh, _sw`` (x, skip,
res, out, grad, dx, dskip, dres), per-channel vectors with ``_sc`` (gate, act_w: the PReLU slope);
every pointer precedes every scalar. Absent tensors get a placeholder pointer that is never read
(HAS_SKIP, HAS_RES, ACT != PRELU), as for the skip.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import launch as _launch
from .activations import IDENTITY, PRELU, activation, activation_grad, prelu_slope_grad, welford_combine
from .common import acc_scalar, chunk_program, load_affine, merge_partials, tile_program
from .launch import (
    FIXED_TILE,
    TILE_SHAPES,
    Plan,
    PlanCache,
    acc_dtype,
    all_spatial_mergeable,
    autotune,
    cdiv,
    channels_inner,
    device_guard,
    empty_like_layout,
    finalize_blocks,
    kernel_strides,
    launch,
    merged_spatial_stride,
    needs_int64,
    plan_reduction,
    signature,
    split_fp64,
    target_programs,
    tickets,
    tile_configs,
    tile_grid,
    vector_stride,
)


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------
# Program prologues and the statistics merge come from kernels/common.py (once per program); code
# that runs per tile is written inline: under Triton's interpreter every nested jit call costs
# ~0.5 ms. Per-channel offsets (c·stride_c) are hoisted out of loops.
@triton.jit
def finalize_channels(
    mean_part_ptr, m2_part_ptr, count_part_ptr, mean_ptr, rstd_ptr, m2_ptr,
    running_mean_ptr, running_var_ptr, nbt_ptr, num_rows, C, c, c_mask,
    momentum_hi, momentum_lo, eps_hi, eps_lo,
    HAS_RUNNING: tl.constexpr, USE_CMA: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge the [num_rows, C] partial (mean, M2, count) rows of channels ``c`` in a fixed order
    (blocks of BLOCK_R rows, then block after block: deterministic), write mean, rstd and M2 and
    update the running statistics as torch does (momentum or 1/num_batches_tracked; unbiased
    variance; nothing for an empty batch)."""
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    n = tl.zeros([BLOCK_C], dtype=acc_ty)
    for r0 in range(0, num_rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < num_rows)[:, None] & c_mask[None, :]
        off = r[:, None] * C + c[None, :]
        pm = tl.load(mean_part_ptr + off, mask=mask, other=0.0).to(acc_ty)
        pm2 = tl.load(m2_part_ptr + off, mask=mask, other=0.0).to(acc_ty)
        pn = tl.load(count_part_ptr + off, mask=mask, other=0.0).to(acc_ty)
        bm, bm2, bn = merge_partials(pm, pm2, pn)
        mean, m2, n = welford_combine(mean, m2, n, bm, bm2, bn)
    eps = acc_scalar(eps_hi, eps_lo, ACC_FP64)
    var = m2 / tl.maximum(n, 1.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(rstd_ptr + c, rstd, mask=c_mask)
    tl.store(m2_ptr + c, m2, mask=c_mask)
    if HAS_RUNNING:
        if USE_CMA:  # momentum=None: cumulative average, factor 1/num_batches_tracked (already incremented)
            factor = 1.0 / tl.load(nbt_ptr).to(acc_ty)
        else:
            factor = acc_scalar(momentum_hi, momentum_lo, ACC_FP64)
        unbiased = m2 / tl.maximum(n - 1.0, 1.0)
        upd = c_mask & (n > 0)  # torch leaves the running statistics alone for an empty batch
        rm = tl.load(running_mean_ptr + c, mask=upd, other=0.0)
        rv = tl.load(running_var_ptr + c, mask=upd, other=0.0)
        new_rm = factor * mean + (1.0 - factor) * rm.to(acc_ty)
        new_rv = factor * unbiased + (1.0 - factor) * rv.to(acc_ty)
        tl.store(running_mean_ptr + c, new_rm.to(rm.dtype), mask=upd)
        tl.store(running_var_ptr + c, new_rv.to(rv.dtype), mask=upd)


# --------------------------------------------------------------------------------------------
# Forward: statistics (+ finalize by the last program of each channel block)
# --------------------------------------------------------------------------------------------
@triton.jit
def _bn_stats_kernel(
    x_ptr, skip_ptr, gate_ptr, mean_part_ptr, m2_part_ptr, count_part_ptr,
    mean_ptr, rstd_ptr, m2_ptr, running_mean_ptr, running_var_ptr, nbt_ptr, ticket_ptr,
    C, S, W, num_chunks, S_PER_PROG, num_rows, momentum_hi, momentum_lo, eps_hi, eps_lo,
    x_sn, x_sc, x_sh, x_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    gate_sc,
    HAS_SKIP: tl.constexpr, MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    HAS_RUNNING: tl.constexpr, USE_CMA: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Per-channel batch statistics of x (or x + a·skip, never stored), finalized in-kernel.

    Grid: (N'·chunks, C-blocks) (``launch.ReducePlan``, rows = N'·chunks). Pointers: x, skip, the
    gate a; [rows, C] partial (mean, M2, count); the results mean, rstd, M2 [C]; running_mean,
    running_var, num_batches_tracked (updated by the finalizing program); int32 tickets, one per
    channel block (left at zero). Strides (n, c, h, w) of x and skip, ``gate_sc`` of the gate.
    """
    row, n, s_begin, c, c_mask = chunk_program(C, num_chunks, S_PER_PROG, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    x_c = (c * x_sc)[None, :]
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)[None, :]
        skip_c = (c * skip_sc)[None, :]

    # Per-lane Welford state. The count is per row of the tile (identical across channels), so
    # 1/count costs BLOCK_S divisions per tile, not one per element.
    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    cnt = tl.zeros([BLOCK_S, 1], dtype=acc_ty)
    for i in range(0, S_PER_PROG, BLOCK_S):
        s = s_begin + i + tl.arange(0, BLOCK_S)
        row_ok = s < S
        mask = row_ok[:, None] & c_mask[None, :]
        if MERGED_HW:
            x_s = n * x_sn + s * x_sw
        else:
            x_s = n * x_sn + (s // W) * x_sh + (s % W) * x_sw
        x = tl.load(x_ptr + (x_s[:, None] + x_c), mask=mask, other=0.0).to(acc_ty)
        if HAS_SKIP:  # x = up + a·skip, recomputed, never stored
            if MERGED_HW:
                k_s = n * skip_sn + s * skip_sw
            else:
                k_s = n * skip_sn + (s // W) * skip_sh + (s % W) * skip_sw
            x += a * tl.load(skip_ptr + (k_s[:, None] + skip_c), mask=mask, other=0.0).to(acc_ty)
        cnt += row_ok[:, None].to(acc_ty)
        inv = 1.0 / tl.maximum(cnt, 1.0)
        delta = x - mean
        mean += tl.where(mask, delta * inv, 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    m_c, m2_c, n_c = merge_partials(mean, m2, tl.broadcast_to(cnt, [BLOCK_S, BLOCK_C]))
    off = row * C + c
    tl.store(mean_part_ptr + off, m_c, mask=c_mask)
    tl.store(m2_part_ptr + off, m2_c, mask=c_mask)
    tl.store(count_part_ptr + off, n_c, mask=c_mask)
    # Last program of this channel block: merge every row (acq_rel ticket: their stores are visible).
    slot = tl.program_id(1)
    ticket = tl.atomic_add(ticket_ptr + slot, 1)
    if ticket == num_rows - 1:
        finalize_channels(mean_part_ptr, m2_part_ptr, count_part_ptr, mean_ptr, rstd_ptr, m2_ptr,
                          running_mean_ptr, running_var_ptr, nbt_ptr, num_rows, C, c, c_mask,
                          momentum_hi, momentum_lo, eps_hi, eps_lo,
                          HAS_RUNNING, USE_CMA, ACC_FP64, BLOCK_R, BLOCK_C)
        tl.store(ticket_ptr + slot, 0)


@triton.jit
def _bn_finalize_kernel(
    mean_part_ptr, m2_part_ptr, count_part_ptr, mean_ptr, rstd_ptr, m2_ptr,
    running_mean_ptr, running_var_ptr, nbt_ptr,
    num_rows, C, momentum_hi, momentum_lo, eps_hi, eps_lo,
    HAS_RUNNING: tl.constexpr, USE_CMA: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merge per-rank statistics (SyncBatchNorm): rows of [R, C] (mean, M2, count) → mean, rstd,
    M2 and the running-statistics update, as the statistics kernel's finalizing program does.

    Grid: (C-blocks,). Pointers as ``finalize_channels``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    finalize_channels(mean_part_ptr, m2_part_ptr, count_part_ptr, mean_ptr, rstd_ptr, m2_ptr,
                      running_mean_ptr, running_var_ptr, nbt_ptr, num_rows, C, c, c < C,
                      momentum_hi, momentum_lo, eps_hi, eps_lo,
                      HAS_RUNNING, USE_CMA, ACC_FP64, BLOCK_R, BLOCK_C)


# --------------------------------------------------------------------------------------------
# Forward: normalise + affine + activation
# --------------------------------------------------------------------------------------------
# The shared tile shapes and larger ones: the N·S merge makes long rows common.
_TILE_SHAPES = TILE_SHAPES + ((2048, 1), (1024, 2), (32, 64), (16, 128))


@autotune(configs=tile_configs(_TILE_SHAPES),
          key=["C", "S", "CHANNELS_INNER", "INT64", "HAS_SKIP", "HAS_RES", "ACT"], fixed=FIXED_TILE)
@triton.jit
def _bn_apply_kernel(
    x_ptr, skip_ptr, gate_ptr, res_ptr, out_ptr, mean_ptr, scale_src_ptr, weight_ptr, bias_ptr, act_w_ptr,
    C, S, W, eps_hi, eps_lo, slope_hi, slope_lo,
    x_sn, x_sc, x_sh, x_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    res_sn, res_sc, res_sh, res_sw,
    out_sn, out_sc, out_sh, out_sw,
    gate_sc, act_w_sc,
    FROM_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, MERGED_HW: tl.constexpr, CHANNELS_INNER: tl.constexpr,
    INT64: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = act((x − mean)·rstd·γ + β + residual) (x = up + a·skip with HAS_SKIP, the residual
    with HAS_RES), one tile per program.

    Grid: (N'·S'-blocks, C-blocks) (``launch.tile_grid``). Pointers: x, skip, gate a, the
    residual (added after the norm, read once), the output; per-channel mean and rstd (or the
    running variance when FROM_VAR), γ, β and the PReLU slope act_w (ACT = PRELU; ``act_w_sc`` 0:
    one slope for every channel). Strides (n, c, h, w) of x, skip, residual and out."""
    n, s, c, c_mask, mask = tile_program(S, C, BLOCK_S, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32

    # Per-channel affine: z = (x − mean)·scale + shift, scale = γ·rstd, shift = β.
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    src = tl.load(scale_src_ptr + c, mask=c_mask, other=1.0).to(acc_ty)
    if FROM_VAR:  # eval: rstd from the running variance
        src = 1.0 / tl.sqrt(src + acc_scalar(eps_hi, eps_lo, ACC_FP64))
    gam, shift = load_affine(weight_ptr, bias_ptr, c, c_mask, 1, 1, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
    scale = src * gam

    if MERGED_HW:
        x_s = s * x_sw
        o_s = s * out_sw
        if HAS_RES:
            r_s = s * res_sw
    else:
        h = s // W
        w = s % W
        x_s = h * x_sh + w * x_sw
        o_s = h * out_sh + w * out_sw
        if HAS_RES:
            r_s = h * res_sh + w * res_sw
    x = tl.load(x_ptr + (n * x_sn + x_s[:, None] + (c * x_sc)[None, :]), mask=mask, other=0.0).to(acc_ty)
    if HAS_SKIP:  # x = up + a·skip, recomputed, never stored
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
        if MERGED_HW:
            k_s = s * skip_sw
        else:
            k_s = (s // W) * skip_sh + (s % W) * skip_sw
        k = tl.load(skip_ptr + (n * skip_sn + k_s[:, None] + (c * skip_sc)[None, :]), mask=mask, other=0.0)
        x += a[None, :] * k.to(acc_ty)
    # (x − mean)·scale + β, not x·scale + (β − mean·scale): no cancellation when |mean| ≫ std.
    z = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    if HAS_RES:  # after the norm: the statistics never see it
        r = tl.load(res_ptr + (n * res_sn + r_s[:, None] + (c * res_sc)[None, :]), mask=mask, other=0.0)
        z += r.to(acc_ty)
    if ACT == PRELU:  # the learned slope, per channel (stride 0: a single slope)
        slope = tl.load(act_w_ptr + c * act_w_sc, mask=c_mask, other=0.0).to(acc_ty)[None, :]
    else:
        slope = acc_scalar(slope_hi, slope_lo, ACC_FP64)
    y = activation(z, ACT, slope)
    tl.store(out_ptr + (n * out_sn + o_s[:, None] + (c * out_sc)[None, :]), y.to(out_ptr.dtype.element_ty),
             mask=mask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _bn_backward_reduce_kernel(
    grad_ptr, x_ptr, skip_ptr, gate_ptr, res_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, act_w_ptr,
    partial_ptr, sums_ptr, gate_pc_ptr, dgate_ptr, ticket_ptr, dres_ptr,
    C, S, W, num_chunks, S_PER_PROG, num_rows, slope_hi, slope_lo, inv_count_hi, inv_count_lo,
    grad_sn, grad_sc, grad_sh, grad_sw,
    x_sn, x_sc, x_sh, x_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    res_sn, res_sc, res_sh, res_sw,
    dres_sn, dres_sc, dres_sh, dres_sw,
    gate_sc, act_w_sc,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_RES: tl.constexpr,
    NEED_DRES: tl.constexpr, GATE_SUMS: tl.constexpr, DGATE: tl.constexpr, SCALAR_GATE: tl.constexpr,
    TRAINING: tl.constexpr,
    ACT: tl.constexpr, MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Per-channel backward sums, reduced in-kernel: Σdy', Σdy'·x̂, (GATE_SUMS) Σdy'·skip, Σskip,
    Σx̂·skip and (ACT = PRELU) the slope gradient Σ grad·z·[z ≤ 0], with z = x̂·γ + β (+ the
    residual with HAS_RES) and dy' = grad·act'(z); with DGATE also the gate gradient Σ dx·skip; with
    NEED_DRES it also writes dy' (the residual's gradient) to ``dres``, which the dx kernel then
    reads in place of grad and the residual (one pass less than recomputing z there).

    Grid: (N'·chunks, C-blocks) (``launch.ReducePlan``). Each program writes one row of the
    [K, rows, C] partials and draws a ticket of its channel block; the last one sums the rows in
    a fixed order into ``sums`` [K, C] (the PReLU row last: row 2, or 5 with GATE_SUMS) and, with
    DGATE, writes the gate gradient of its channels (``dgate``; for a SCALAR_GATE into ``gate_pc``
    [C], which the last channel block — ticket slot C-blocks — sums in channel order into
    ``dgate[0]``). Pointers: grad (any strides), x, skip, gate a, the residual (read only to
    recompute z), mean, rstd, γ, β, the PReLU slope act_w (``act_w_sc`` 0: one slope); partials,
    sums, gate_pc, dgate, int32 tickets (left at zero), d_residual (any strides)."""
    row, n, s_begin, c, c_mask = chunk_program(C, num_chunks, S_PER_PROG, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)[None, :]
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    gam, shift = load_affine(weight_ptr, bias_ptr, c, c_mask, 1, 1, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
    if ACT != IDENTITY:  # z is needed for act'(z) only
        scale = (rstd * gam)[None, :]
        shift2 = shift[None, :]
        if ACT == PRELU:
            slope = tl.load(act_w_ptr + c * act_w_sc, mask=c_mask, other=0.0).to(acc_ty)[None, :]
        else:
            slope = acc_scalar(slope_hi, slope_lo, ACC_FP64)
        if HAS_RES:
            res_c = (c * res_sc)[None, :]
    x_c = (c * x_sc)[None, :]
    g_c = (c * grad_sc)[None, :]
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)[None, :]
        skip_c = (c * skip_sc)[None, :]

    # Per-lane accumulators, reduced across lanes once at the end (no barrier inside the loop).
    acc_dy = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    acc_dyx = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    if GATE_SUMS:
        acc_dys = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
        acc_s = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
        acc_xs = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    if ACT == PRELU:
        acc_ds = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for i in range(0, S_PER_PROG, BLOCK_S):
        s = s_begin + i + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_mask[None, :]
        if MERGED_HW:
            x_s = n * x_sn + s * x_sw
            g_s = n * grad_sn + s * grad_sw
        else:
            h = s // W
            w = s % W
            x_s = n * x_sn + h * x_sh + w * x_sw
            g_s = n * grad_sn + h * grad_sh + w * grad_sw
        x = tl.load(x_ptr + (x_s[:, None] + x_c), mask=mask, other=0.0).to(acc_ty)
        if HAS_SKIP:
            if MERGED_HW:
                k_s = n * skip_sn + s * skip_sw
            else:
                k_s = n * skip_sn + (s // W) * skip_sh + (s % W) * skip_sw
            k = tl.load(skip_ptr + (k_s[:, None] + skip_c), mask=mask, other=0.0).to(acc_ty)
            x += a * k
        g = tl.load(grad_ptr + (g_s[:, None] + g_c), mask=mask, other=0.0).to(acc_ty)
        xc = tl.where(mask, x - mean, 0.0)
        if ACT == IDENTITY:
            dyp = g
        else:
            z = xc * scale + shift2
            if HAS_RES:  # z includes the residual (added after the norm)
                if MERGED_HW:
                    r_s = n * res_sn + s * res_sw
                else:
                    r_s = n * res_sn + (s // W) * res_sh + (s % W) * res_sw
                z += tl.load(res_ptr + (r_s[:, None] + res_c), mask=mask, other=0.0).to(acc_ty)
            dyp = tl.where(mask, g * activation_grad(z, ACT, slope), 0.0)
            if ACT == PRELU:
                acc_ds += tl.where(mask, prelu_slope_grad(g, z), 0.0)
            if NEED_DRES:  # d_residual = dy'
                if MERGED_HW:
                    q_s = n * dres_sn + s * dres_sw
                else:
                    q_s = n * dres_sn + (s // W) * dres_sh + (s % W) * dres_sw
                tl.store(dres_ptr + (q_s[:, None] + (c * dres_sc)[None, :]), dyp.to(dres_ptr.dtype.element_ty),
                         mask=mask)
        acc_dy += dyp
        acc_dyx += dyp * xc
        if GATE_SUMS:
            acc_dys += dyp * k
            acc_s += k
            acc_xs += xc * k
    # Rows of the [K, num_rows, C] partial buffer: Σdy', Σdy'·x̂, then Σdy'·skip, Σskip, Σx̂·skip.
    plane = num_rows * C
    off = row * C + c
    tl.store(partial_ptr + off, tl.sum(acc_dy, axis=0), mask=c_mask)
    tl.store(partial_ptr + plane + off, tl.sum(acc_dyx, axis=0) * rstd, mask=c_mask)
    if GATE_SUMS:
        tl.store(partial_ptr + 2 * plane + off, tl.sum(acc_dys, axis=0), mask=c_mask)
        tl.store(partial_ptr + 3 * plane + off, tl.sum(acc_s, axis=0), mask=c_mask)
        tl.store(partial_ptr + 4 * plane + off, tl.sum(acc_xs, axis=0) * rstd, mask=c_mask)
    if ACT == PRELU:  # the slope-gradient row comes last: 2, or 5 after the gate sums
        if GATE_SUMS:
            ds_row = 5
        else:
            ds_row = 2
        tl.store(partial_ptr + ds_row * plane + off, tl.sum(acc_ds, axis=0), mask=c_mask)

    slot = tl.program_id(1)
    ticket = tl.atomic_add(ticket_ptr + slot, 1)
    if ticket == num_rows - 1:  # last program of this channel block: fixed-order row sums
        tot_dy = tl.zeros([BLOCK_C], dtype=acc_ty)
        tot_dyx = tl.zeros([BLOCK_C], dtype=acc_ty)
        tot_dys = tl.zeros([BLOCK_C], dtype=acc_ty)
        tot_s = tl.zeros([BLOCK_C], dtype=acc_ty)
        tot_xs = tl.zeros([BLOCK_C], dtype=acc_ty)
        tot_ds = tl.zeros([BLOCK_C], dtype=acc_ty)
        for r0 in range(0, num_rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = (r < num_rows)[:, None] & c_mask[None, :]
            p = partial_ptr + r[:, None] * C + c[None, :]
            tot_dy += tl.sum(tl.load(p, mask=m, other=0.0), axis=0)
            tot_dyx += tl.sum(tl.load(p + plane, mask=m, other=0.0), axis=0)
            if GATE_SUMS:
                tot_dys += tl.sum(tl.load(p + 2 * plane, mask=m, other=0.0), axis=0)
                tot_s += tl.sum(tl.load(p + 3 * plane, mask=m, other=0.0), axis=0)
                tot_xs += tl.sum(tl.load(p + 4 * plane, mask=m, other=0.0), axis=0)
            if ACT == PRELU:
                tot_ds += tl.sum(tl.load(p + ds_row * plane, mask=m, other=0.0), axis=0)
        tl.store(sums_ptr + c, tot_dy, mask=c_mask)
        tl.store(sums_ptr + C + c, tot_dyx, mask=c_mask)
        if GATE_SUMS:
            tl.store(sums_ptr + 2 * C + c, tot_dys, mask=c_mask)
            tl.store(sums_ptr + 3 * C + c, tot_s, mask=c_mask)
            tl.store(sums_ptr + 4 * C + c, tot_xs, mask=c_mask)
        if ACT == PRELU:
            tl.store(sums_ptr + ds_row * C + c, tot_ds, mask=c_mask)
        if DGATE:  # Σ dx·skip = γ·rstd·(Σdy'·skip − Σdy'/M·Σskip − Σ(dy'·x̂)/M·Σx̂·skip) (training)
            per = tot_dys
            if TRAINING:
                inv_count = acc_scalar(inv_count_hi, inv_count_lo, ACC_FP64)
                per = per - tot_dy * inv_count * tot_s - tot_dyx * inv_count * tot_xs
            dg = tl.where(c_mask, gam * rstd * per, 0.0)
            if SCALAR_GATE:
                tl.store(gate_pc_ptr + c, dg, mask=c_mask)
            else:
                tl.store(dgate_ptr + c, dg.to(dgate_ptr.dtype.element_ty), mask=c_mask)
        tl.store(ticket_ptr + slot, 0)
        if DGATE and SCALAR_GATE:  # the last channel block sums the channels in order
            done = tl.atomic_add(ticket_ptr + tl.num_programs(1), 1)
            if done == tl.num_programs(1) - 1:
                tot = tl.zeros([BLOCK_C], dtype=acc_ty)
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + tl.arange(0, BLOCK_C)
                    tot += tl.load(gate_pc_ptr + cc, mask=cc < C, other=0.0)
                tl.store(dgate_ptr, tl.sum(tot, axis=0).to(dgate_ptr.dtype.element_ty))
                tl.store(ticket_ptr + tl.num_programs(1), 0)


@autotune(configs=tile_configs(_TILE_SHAPES),
          key=["C", "S", "CHANNELS_INNER", "INT64", "HAS_SKIP", "HAS_RES", "ACT", "TRAINING"], fixed=FIXED_TILE)
@triton.jit
def _bn_backward_dx_kernel(
    grad_ptr, x_ptr, skip_ptr, gate_ptr, res_ptr, mean_ptr, rstd_ptr, weight_ptr, bias_ptr, act_w_ptr, sums_ptr,
    dx_ptr, dskip_ptr, dres_ptr,
    C, S, W, inv_count_hi, inv_count_lo, slope_hi, slope_lo,
    grad_sn, grad_sc, grad_sh, grad_sw,
    x_sn, x_sc, x_sh, x_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    res_sn, res_sc, res_sh, res_sw,
    dx_sn, dx_sc, dx_sh, dx_sw,
    dskip_sn, dskip_sc, dskip_sh, dskip_sw,
    dres_sn, dres_sc, dres_sh, dres_sw,
    gate_sc, act_w_sc,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
    HAS_RES: tl.constexpr, NEED_DX: tl.constexpr, NEED_DSKIP: tl.constexpr, NEED_DRES: tl.constexpr,
    ACT: tl.constexpr, MERGED_HW: tl.constexpr, CHANNELS_INNER: tl.constexpr, INT64: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = γ·rstd·(dy' − Σdy'/M − x̂·Σ(dy'·x̂)/M) (training; γ·rstd·dy' in eval), d_skip = a·dx,
    d_residual = dy' = grad·act'(z), z = x̂·γ + β (+ the residual with HAS_RES), one tile per program.

    Grid: (N'·S'-blocks, C-blocks) (``launch.tile_grid``). Pointers: grad (any strides), x, skip,
    gate a, the residual (read only to recompute z), mean, rstd, γ, β, the PReLU slope act_w
    (``act_w_sc`` 0: one slope), the [K, C] sums of the reduce pass (rows 0 and 1 read); outputs
    dx, d_skip, d_residual."""
    n, s, c, c_mask, mask = tile_program(S, C, BLOCK_S, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32

    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    gam, bet = load_affine(weight_ptr, bias_ptr, c, c_mask, 1, 1, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
    k1 = gam * rstd

    if MERGED_HW:
        x_s = s * x_sw
        g_s = s * grad_sw
    else:
        hh = s // W
        ww = s % W
        x_s = hh * x_sh + ww * x_sw
        g_s = hh * grad_sh + ww * grad_sw
    x = tl.load(x_ptr + (n * x_sn + x_s[:, None] + (c * x_sc)[None, :]), mask=mask, other=0.0).to(acc_ty)
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
        if MERGED_HW:
            k_s = s * skip_sw
        else:
            k_s = (s // W) * skip_sh + (s % W) * skip_sw
        k = tl.load(skip_ptr + (n * skip_sn + k_s[:, None] + (c * skip_sc)[None, :]), mask=mask, other=0.0)
        x += a[None, :] * k.to(acc_ty)
    g = tl.load(grad_ptr + (n * grad_sn + g_s[:, None] + (c * grad_sc)[None, :]), mask=mask, other=0.0).to(acc_ty)
    xhat = (x - mean[None, :]) * rstd[None, :]
    if ACT == IDENTITY:
        dyp = g
    else:
        z = xhat * gam[None, :] + bet[None, :]
        if HAS_RES:  # z includes the residual (added after the norm)
            if MERGED_HW:
                r_s = s * res_sw
            else:
                r_s = (s // W) * res_sh + (s % W) * res_sw
            r = tl.load(res_ptr + (n * res_sn + r_s[:, None] + (c * res_sc)[None, :]), mask=mask, other=0.0)
            z += r.to(acc_ty)
        if ACT == PRELU:
            slope = tl.load(act_w_ptr + c * act_w_sc, mask=c_mask, other=0.0).to(acc_ty)[None, :]
        else:
            slope = acc_scalar(slope_hi, slope_lo, ACC_FP64)
        dyp = g * activation_grad(z, ACT, slope)
    if NEED_DRES:  # d_residual = dy'
        if MERGED_HW:
            q_s = s * dres_sw
        else:
            q_s = (s // W) * dres_sh + (s % W) * dres_sw
        tl.store(dres_ptr + (n * dres_sn + q_s[:, None] + (c * dres_sc)[None, :]), dyp.to(dres_ptr.dtype.element_ty),
                 mask=mask)
    if TRAINING:
        inv_count = acc_scalar(inv_count_hi, inv_count_lo, ACC_FP64)
        mdy = tl.load(sums_ptr + c, mask=c_mask, other=0.0).to(acc_ty) * inv_count
        mdyx = tl.load(sums_ptr + C + c, mask=c_mask, other=0.0).to(acc_ty) * inv_count
        dx = k1[None, :] * (dyp - mdy[None, :] - xhat * mdyx[None, :])
    else:
        dx = k1[None, :] * dyp
    if NEED_DX:
        if MERGED_HW:
            d_s = s * dx_sw
        else:
            d_s = (s // W) * dx_sh + (s % W) * dx_sw
        tl.store(dx_ptr + (n * dx_sn + d_s[:, None] + (c * dx_sc)[None, :]), dx.to(dx_ptr.dtype.element_ty),
                 mask=mask)
    if NEED_DSKIP:
        if MERGED_HW:
            e_s = s * dskip_sw
        else:
            e_s = (s // W) * dskip_sh + (s % W) * dskip_sw
        tl.store(dskip_ptr + (n * dskip_sn + e_s[:, None] + (c * dskip_sc)[None, :]),
                 (a[None, :] * dx).to(dskip_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side: geometry, plans cached per input signature, launches
# --------------------------------------------------------------------------------------------
reduction_config = _launch.forced_reduction  # test hook: force the reduction split (launch.forced_reduction)


class _Geometry:
    """How the kernels walk a group of same-shape [N, C, H, W] tensors: as [n, C, s] with strides
    (``merged_ns``: N·S folded into one spatial index)."""

    __slots__ = ("c", "w", "n", "s", "merged_hw", "merged_ns", "int64")

    def __init__(self, shape, tensors):
        n, c, h, w = shape
        s = h * w
        self.c, self.w = c, w
        self.merged_hw = all_spatial_mergeable(tensors)
        self.merged_ns = self.merged_hw and (n == 1 or all(t.stride(0) == s * merged_spatial_stride(t)
                                                           for t in tensors))
        self.n, self.s = (1, n * s) if self.merged_ns else (n, s)
        self.int64 = needs_int64(*tensors)

    def strides(self, t: Optional[torch.Tensor]):
        return kernel_strides(t, self.merged_hw, self.merged_ns)

    def reduction(self, x: torch.Tensor, tile: int = 2048) -> _launch.ReducePlan:
        """The shared reduction planner on the [n, C, s] view (tiles at most 64 channels wide)."""
        return plan_reduction(self.n, self.c, self.s, channels_inner(x), target_programs(x), tile, max_block_c=64)


_STATS_PLANS = PlanCache("batch_norm_stats")
_APPLY_PLANS = PlanCache("batch_norm_apply")
_REDUCE_PLANS = PlanCache("batch_norm_backward_reduce")
_DX_PLANS = PlanCache("batch_norm_backward_dx")


def _cached(cache: PlanCache, launcher, key, build, *args):
    """The plan of ``build(*args)``: cached under ``key`` for eager launches, built afresh when
    traced (torch.compile: shapes may be symbolic)."""
    if launcher is launch:
        return cache.get((key, needs_int64, target_programs), build, *args)
    return build(*args)


def _stats_plan(x, skip, gate, has_running: bool, use_cma: bool, momentum: float, eps: float):
    geo = _Geometry(x.shape, [x] + ([skip] if skip is not None else []))
    rp = geo.reduction(x)
    block_r, _ = finalize_blocks(rp.rows, rp.block_c)
    args = (geo.c, geo.s, geo.w, rp.chunks, rp.s_per_chunk, rp.rows, *split_fp64(momentum), *split_fp64(eps),
            *geo.strides(x), *geo.strides(skip), vector_stride(gate))
    meta = dict(HAS_SKIP=skip is not None, MERGED_HW=geo.merged_hw, INT64=geo.int64,
                ACC_FP64=acc_dtype(x) == torch.float64, HAS_RUNNING=has_running, USE_CMA=use_cma,
                BLOCK_S=rp.block_s, BLOCK_C=rp.block_c, BLOCK_R=block_r, num_warps=rp.num_warps)
    return Plan((rp.rows, rp.c_blocks), args, meta), rp


def batch_norm_stats(
    x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float, launcher=launch,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics of ``x`` (or ``x + gate·skip``) per channel: ``(mean, rstd, M2)``, one launch.

    Accumulation dtype (fp32, fp64 for fp64 input). ``M2 = Σ (x − mean)²``; rstd = 1/√(M2/M + eps).
    Updates ``running_mean``/``running_var`` in place when given (momentum, or 1/num_batches_tracked
    when ``num_batches_tracked`` is given). An empty input gives zeros and updates nothing.
    """
    n, c, h, w = x.shape
    acc = acc_dtype(x)
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=acc, device=x.device)
        return zeros, torch.full_like(zeros, float(eps)).rsqrt(), zeros.clone()
    has_running = running_mean is not None
    use_cma = has_running and num_batches_tracked is not None
    plan, rp = _cached(_STATS_PLANS, launcher, (signature(x, skip, gate), has_running, use_cma, momentum, eps),
                       _stats_plan, x, skip, gate, has_running, use_cma, momentum, eps)
    mean, rstd, m2 = (torch.empty(c, dtype=acc, device=x.device) for _ in range(3))
    part = torch.empty((3, rp.rows, c), dtype=acc, device=x.device)  # partial mean, M2, count
    ticket = tickets(x.device, rp.c_blocks, traced=launcher is not launch)
    placeholder = part  # stands in for absent tensors: never read or written
    with device_guard(x):
        launcher(_bn_stats_kernel, plan, x, skip if skip is not None else placeholder,
                 gate if gate is not None else placeholder, part[0], part[1], part[2], mean, rstd, m2,
                 running_mean if has_running else placeholder, running_var if has_running else placeholder,
                 num_batches_tracked if use_cma else placeholder, ticket)
    return mean, rstd, m2


def batch_norm_merge_stats(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor,
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float, launcher=launch,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank statistics (rows of ``counts`` [R], ``means``/``m2s`` [R, C]) with Chan's
    formula: ``(mean, rstd)``, updating the running statistics like :func:`batch_norm_stats`."""
    acc = means.dtype
    rows, c = means.shape
    count_part = counts.to(acc).reshape(-1, 1).expand_as(means).contiguous()
    mean, rstd, m2 = (torch.empty(c, dtype=acc, device=means.device) for _ in range(3))
    has_running = running_mean is not None
    use_cma = has_running and num_batches_tracked is not None
    block_r, block_c = finalize_blocks(rows, c)
    plan = Plan((cdiv(c, block_c),), (rows, c, *split_fp64(momentum), *split_fp64(eps)),
                dict(HAS_RUNNING=has_running, USE_CMA=use_cma, ACC_FP64=acc == torch.float64,
                     BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4))
    with device_guard(means):
        launcher(_bn_finalize_kernel, plan, means.contiguous(), m2s.contiguous(), count_part, mean, rstd, m2,
                 running_mean if has_running else m2, running_var if has_running else m2,
                 num_batches_tracked if use_cma else m2)
    return mean, rstd


PRELU_ID = PRELU.value  # the kernels' ACT id of PReLU (fusedskip.activations.ACTIVATION_IDS["prelu"])


def sum_rows(gate_sums: bool, act: int) -> int:
    """K, the rows of the backward ``sums`` [K, C]: Σdy', Σdy'·x̂, with ``gate_sums`` Σdy'·skip,
    Σskip, Σx̂·skip, for PReLU (``act``) the slope gradient (always the last row)."""
    return 2 + (3 if gate_sums else 0) + (1 if act == PRELU_ID else 0)


def _apply_plan(x, skip, gate, residual, out, weight, bias, act_weight, from_var: bool, eps: float, act: int,
                slope: float) -> Plan:
    geo = _Geometry(x.shape, [x, out] + [t for t in (skip, residual) if t is not None])
    args = (geo.c, geo.s, geo.w, *split_fp64(eps), *split_fp64(slope),
            *geo.strides(x), *geo.strides(skip), *geo.strides(residual), *geo.strides(out),
            vector_stride(gate), vector_stride(act_weight))
    meta = dict(FROM_VAR=from_var, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                HAS_SKIP=skip is not None, HAS_RES=residual is not None, ACT=act, MERGED_HW=geo.merged_hw,
                CHANNELS_INNER=channels_inner(x), INT64=geo.int64, ACC_FP64=acc_dtype(x) == torch.float64)
    return Plan(tile_grid(geo.n, geo.s, geo.c), args, meta)


def batch_norm_apply(
    x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    mean: torch.Tensor, scale_src: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    from_var: bool, eps: float, act: int, slope: float, residual: Optional[torch.Tensor] = None,
    act_weight: Optional[torch.Tensor] = None, launcher=launch,
) -> torch.Tensor:
    """``act((x − mean)·rstd·weight + bias + residual)`` with rstd = ``scale_src`` or, when
    ``from_var``, 1/√(scale_src + eps); ``residual`` (x's shape, any strides) is optional and
    ``act_weight`` (1 or C values) is the PReLU slope (``act`` = PReLU's id). Output in ``x``'s
    dtype and (dense) layout."""
    out = empty_like_layout(x)
    if out.numel() == 0:
        return out
    plan = _cached(_APPLY_PLANS, launcher,
                   (signature(x, skip, gate, residual, out, weight, bias, act_weight), from_var, eps, act, slope),
                   _apply_plan, x, skip, gate, residual, out, weight, bias, act_weight, from_var, eps, act, slope)
    with device_guard(x):
        launcher(_bn_apply_kernel, plan, x, skip if skip is not None else mean, gate if gate is not None else mean,
                 residual if residual is not None else mean, out, mean, scale_src,
                 weight if weight is not None else mean, bias if bias is not None else mean,
                 act_weight if act_weight is not None else mean)
    return out


def _reduce_plan(grad, x, skip, gate, residual, weight, bias, act_weight, act: int, slope: float, gate_sums: bool,
                 dgate: bool, inv_count: float, training: bool, dres):
    geo = _Geometry(x.shape, [grad, x] + [t for t in (skip, residual, dres) if t is not None])
    rp = geo.reduction(x, tile=1024 if gate_sums else 2048)  # five accumulators: half the tile
    block_r, _ = finalize_blocks(rp.rows, rp.block_c)
    args = (geo.c, geo.s, geo.w, rp.chunks, rp.s_per_chunk, rp.rows, *split_fp64(slope), *split_fp64(inv_count),
            *geo.strides(grad), *geo.strides(x), *geo.strides(skip), *geo.strides(residual), *geo.strides(dres),
            vector_stride(gate), vector_stride(act_weight))
    meta = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SKIP=skip is not None,
                HAS_RES=residual is not None, NEED_DRES=dres is not None, GATE_SUMS=gate_sums, DGATE=dgate,
                SCALAR_GATE=gate is not None and gate.numel() == 1, TRAINING=training, ACT=act,
                MERGED_HW=geo.merged_hw, INT64=geo.int64, ACC_FP64=acc_dtype(x) == torch.float64,
                BLOCK_S=rp.block_s, BLOCK_C=rp.block_c, BLOCK_R=block_r, num_warps=rp.num_warps)
    return Plan((rp.rows, rp.c_blocks), args, meta), rp


def batch_norm_backward_reduce(
    grad: torch.Tensor, x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    act: int, slope: float, gate_sums: bool, need_dgate: bool = False, inv_count: float = 0.0,
    training: bool = True, residual: Optional[torch.Tensor] = None, act_weight: Optional[torch.Tensor] = None,
    need_dres: bool = False, launcher=launch,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(sums, d_gate, d_residual)``, one launch. ``sums`` [K, C] (accumulation dtype, K =
    :func:`sum_rows`): Σdy', Σdy'·x̂, with ``gate_sums`` Σdy'·skip, Σskip, Σx̂·skip, and for PReLU
    (slope ``act_weight``) last the slope gradient Σ grad·z·[z ≤ 0] per channel; dy' = grad·act'(z),
    z = x̂·γ + β (+ ``residual``). With ``need_dgate`` (needs ``gate_sums``) the gate gradient
    Σ dx·skip in the gate's shape, computed in-kernel from the sums with ``inv_count`` = 1/M
    (``training``); else None. With ``need_dres`` (needs ``residual``) d_residual = dy' in the
    residual's layout and dtype, else None: :func:`batch_norm_backward_dx` given it as ``grad``
    with the identity activation and no residual then needs neither grad nor the residual again.
    ``grad`` may have any strides."""
    n, c, h, w = x.shape
    k = sum_rows(gate_sums, act)
    acc = acc_dtype(x)
    need_dres = need_dres and residual is not None
    dres = empty_like_layout(residual) if need_dres else None
    if x.numel() == 0:
        return (torch.zeros((k, c), dtype=acc, device=x.device), (torch.zeros_like(gate) if need_dgate else None),
                dres)
    plan, rp = _cached(_REDUCE_PLANS, launcher,
                       (signature(grad, x, skip, gate, residual, weight, bias, act_weight), act, slope, gate_sums,
                        need_dgate, inv_count, training, need_dres),
                       _reduce_plan, grad, x, skip, gate, residual, weight, bias, act_weight, act, slope, gate_sums,
                       need_dgate, inv_count, training, dres)
    partial = torch.empty((k, rp.rows, c), dtype=acc, device=x.device)
    sums = torch.empty((k, c), dtype=acc, device=x.device)
    dgate = torch.empty_like(gate) if need_dgate else None
    gate_pc = torch.empty(c, dtype=acc, device=x.device) if need_dgate and gate.numel() == 1 else sums
    ticket = tickets(x.device, rp.c_blocks + 1, traced=launcher is not launch)
    with device_guard(x):
        launcher(_bn_backward_reduce_kernel, plan, grad, x, skip if skip is not None else sums,
                 gate if gate is not None else sums, residual if residual is not None else sums, mean, rstd,
                 weight if weight is not None else sums, bias if bias is not None else sums,
                 act_weight if act_weight is not None else sums, partial,
                 sums, gate_pc, dgate if need_dgate else sums, ticket, dres if need_dres else sums)
    return sums, dgate, dres


def _dx_plan(grad, x, skip, gate, residual, weight, bias, act_weight, dx, dskip, dres, inv_count: float,
             training: bool, act: int, slope: float) -> Plan:
    tensors = [grad, x] + [t for t in (skip, residual, dx, dskip, dres) if t is not None]
    geo = _Geometry(x.shape, tensors)
    args = (geo.c, geo.s, geo.w, *split_fp64(inv_count), *split_fp64(slope),
            *geo.strides(grad), *geo.strides(x), *geo.strides(skip), *geo.strides(residual), *geo.strides(dx),
            *geo.strides(dskip), *geo.strides(dres), vector_stride(gate), vector_stride(act_weight))
    meta = dict(TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                HAS_SKIP=skip is not None, HAS_RES=residual is not None, NEED_DX=dx is not None,
                NEED_DSKIP=dskip is not None, NEED_DRES=dres is not None, ACT=act, MERGED_HW=geo.merged_hw,
                CHANNELS_INNER=channels_inner(x), INT64=geo.int64, ACC_FP64=acc_dtype(x) == torch.float64)
    return Plan(tile_grid(geo.n, geo.s, geo.c), args, meta)


def batch_norm_backward_dx(
    grad: torch.Tensor, x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    sums: torch.Tensor, inv_count: float, training: bool, act: int, slope: float,
    need_dx: bool, need_dskip: bool, residual: Optional[torch.Tensor] = None,
    act_weight: Optional[torch.Tensor] = None, need_dres: bool = False, launcher=launch,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dx, d_skip, d_residual)``: dx = γ·rstd·(dy' − Σdy'·inv_count − x̂·Σ(dy'·x̂)·inv_count) in
    training (``sums`` rows 0 and 1, global under SyncBatchNorm), γ·rstd·dy' in eval; d_skip =
    gate·dx; d_residual = dy' = grad·act'(z) (z with ``residual``, PReLU slope ``act_weight``), in
    the residual's layout. Each only when asked for (else None)."""
    dx = empty_like_layout(x) if need_dx else None
    dskip = empty_like_layout(skip) if need_dskip else None
    dres = empty_like_layout(residual) if need_dres else None
    if x.numel() == 0 or not (need_dx or need_dskip or need_dres):
        return dx, dskip, dres
    plan = _cached(_DX_PLANS, launcher,
                   (signature(grad, x, skip, gate, residual, weight, bias, act_weight), need_dx, need_dskip,
                    need_dres, inv_count, training, act, slope),
                   _dx_plan, grad, x, skip, gate, residual, weight, bias, act_weight, dx, dskip, dres, inv_count,
                   training, act, slope)
    if not sums.is_contiguous():
        sums = sums.contiguous()
    with device_guard(x):
        launcher(_bn_backward_dx_kernel, plan, grad, x, skip if skip is not None else mean,
                 gate if gate is not None else mean, residual if residual is not None else mean, mean, rstd,
                 weight if weight is not None else mean, bias if bias is not None else mean,
                 act_weight if act_weight is not None else mean, sums,
                 dx if dx is not None else mean, dskip if dskip is not None else mean,
                 dres if dres is not None else mean)
    return dx, dskip, dres
