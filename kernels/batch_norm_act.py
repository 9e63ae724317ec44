"""BatchNorm2d + activation (optionally on a gated skip sum ``x = up + a·skip``): Triton kernels.

Every tensor is walked as a 3-D view [N', C, S'] of the 4-D [N, C, H, W] input through its own
strides: S = H·W when (H, W) merge into one stride, and N·S merges further into one index when
``stride(0) == S·stride_s`` (channels_last, or N = 1), so small spatial maps in channels_last do
not waste tile lanes. NCHW, channels_last and other strided views run without layout copies.

Forward, training (batch statistics), 3 launches:
  1. ``_bn_stats_kernel``: grid (rows, channel blocks). The N'·S' reduction of each channel is
     split into ``rows`` contiguous ranges of [BLOCK_S, BLOCK_C] tiles (the small-C, large-N·HW
     case needs this: one program per channel would leave the GPU idle). Each lane keeps its own
     Welford (mean, M2, count); lanes merge with Chan's formula and each program
     writes one row of deterministic fp32 partials (mean, M2, count) — no E[x²] − E[x]², no
     atomics.
  2. ``_bn_finalize_kernel``: merges the rows per channel (Chan), writes mean, rstd (and M2), and
     updates running_mean / running_var with momentum and the unbiased variance exactly as
     torch does (or the cumulative average 1/num_batches_tracked). It is never autotuned, so a
     replayed launch cannot apply the update twice. The same kernel merges per-rank statistics
     gathered by SyncBatchNorm (rows = ranks).
  3. ``_bn_apply_kernel`` (autotuned, pure): y = act((x − mean)·rstd·γ + β), one tile per program.
Forward, eval (running statistics): ``_bn_apply_kernel`` alone, rstd computed from running_var.

Backward (saved: the input(s) and fp32 mean/rstd; z and act'(z) are recomputed), 2 passes:
  1. ``_bn_backward_reduce_kernel``: per program fp32 partials of Σ dy', Σ dy'·x̂ (dy' = dy·act'(z))
     and, for the gate gradient, Σ dy'·skip, Σ skip, Σ x̂·skip; the host sums the rows.
     dβ = Σ dy', dγ = Σ dy'·x̂.
  2. ``_bn_backward_dx_kernel`` (autotuned, elementwise):
     dx = γ·rstd·(dy' − Σdy'/M − x̂·Σ(dy'·x̂)/M) in training (M values per channel), γ·rstd·dy' in
     eval; d_up = dx, d_skip = a·dx. The gate gradient Σ dx·skip follows from the pass-1 sums
     without another pass: γ·rstd·(Σdy'·skip − Σdy'/M·Σskip − Σ(dy'·x̂)/M·Σx̂·skip).

Scalars (eps, slope, momentum, 1/M) travel as fp32 (hi, lo) pairs cast in-kernel to the
accumulation dtype and added: in fp32 that is hi (a Python float cast to fp32, never promoted to
fp64 arithmetic), in fp64 (gradcheck) the host double to ~2⁻⁴⁸ (Triton passes floats as fp32).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from .activations import IDENTITY, activation, activation_grad, welford_combine
from .launch import (autotune, device_guard, empty_like_layout, merged_spatial_stride, needs_int64,
                     next_power_of_2, spatial_strides_mergeable, target_programs)


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------
# Helpers are inlined where they run per program or per tile: under Triton's interpreter every
# nested jit call costs milliseconds. Per-channel offsets (c·stride_c) are hoisted out of loops.
@triton.jit
def _merge_rows(mean, m2, n):
    """Chan's merge of the rows (axis 0) of [R, BLOCK_C] partial (mean, M2, count) in one step:
    N = Σn, mean = Σ n·mean / N, M2 = Σ M2 + Σ n·(mean_r − mean)². Exact and centred (no
    E[x²] − E[x]²); empty rows weigh nothing. Plain sums rather than ``tl.reduce`` with a
    combine function: same result on the GPU, and Triton's interpreter runs custom combines
    element by element in Python."""
    total = tl.sum(n, axis=0)
    mean_t = tl.sum(n * mean, axis=0) / tl.maximum(total, 1.0)
    d = mean - mean_t[None, :]
    m2_t = tl.sum(m2 + n * d * d, axis=0)
    return mean_t, m2_t, total


# --------------------------------------------------------------------------------------------
# Forward: statistics
# --------------------------------------------------------------------------------------------
@triton.jit
def _bn_stats_kernel(
    x_ptr, skip_ptr, gate_ptr, mean_part_ptr, m2_part_ptr, count_part_ptr,
    C, S, W, num_s_blocks, num_tiles, tiles_per_prog,
    x_sn, x_sc, x_sh, x_sw,
    k_sn, k_sc, k_sh, k_sw,
    gate_sc,
    HAS_SKIP: tl.constexpr, MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)  # this program's row of the partial buffers
    pid_c = tl.program_id(1)
    if INT64:
        row = row.to(tl.int64)
        pid_c = pid_c.to(tl.int64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x_c = (c * x_sc)[None, :]
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)[None, :]
        k_c = (c * k_sc)[None, :]

    # Per-lane Welford state. The count is per row of the tile (identical across channels), so
    # 1/count costs BLOCK_S divisions per tile, not one per element.
    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    cnt = tl.zeros([BLOCK_S, 1], dtype=acc_ty)
    for i in range(0, tiles_per_prog):
        t = row * tiles_per_prog + i
        n = t // num_s_blocks
        s = (t % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        # Past the last tile the row limit drops to 0. (A scalar limit rather than `& (t < num_tiles)`:
        # Triton's interpreter mis-types block & scalar-bool as int32.)
        row_ok = s < tl.where(t < num_tiles, S, 0)
        mask = row_ok[:, None] & c_mask[None, :]
        if MERGED_HW:
            x_s = n * x_sn + s * x_sw
        else:
            x_s = n * x_sn + (s // W) * x_sh + (s % W) * x_sw
        x = tl.load(x_ptr + (x_s[:, None] + x_c), mask=mask, other=0.0).to(acc_ty)
        if HAS_SKIP:  # x = up + a·skip, recomputed, never stored
            if MERGED_HW:
                k_s = n * k_sn + s * k_sw
            else:
                k_s = n * k_sn + (s // W) * k_sh + (s % W) * k_sw
            x += a * tl.load(skip_ptr + (k_s[:, None] + k_c), mask=mask, other=0.0).to(acc_ty)
        cnt += row_ok[:, None].to(acc_ty)
        inv = 1.0 / tl.maximum(cnt, 1.0)
        delta = x - mean
        mean += tl.where(mask, delta * inv, 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    m_c, m2_c, n_c = _merge_rows(mean, m2, tl.broadcast_to(cnt, [BLOCK_S, BLOCK_C]))
    off = row * C + c
    tl.store(mean_part_ptr + off, m_c, mask=c_mask)
    tl.store(m2_part_ptr + off, m2_c, mask=c_mask)
    tl.store(count_part_ptr + off, n_c, mask=c_mask)


@triton.jit
def _bn_finalize_kernel(
    mean_part_ptr, m2_part_ptr, count_part_ptr, num_rows, C,
    mean_ptr, rstd_ptr, m2_ptr,
    running_mean_ptr, running_var_ptr, nbt_ptr,
    momentum_hi, momentum_lo, eps_hi, eps_lo,
    HAS_RUNNING: tl.constexpr, USE_CMA: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.zeros([BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_C], dtype=acc_ty)
    n = tl.zeros([BLOCK_C], dtype=acc_ty)
    # Rows merge in a fixed order (chunks in one step, then chunk after chunk): deterministic.
    for r0 in range(0, num_rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < num_rows)[:, None] & c_mask[None, :]
        off = r[:, None] * C + c[None, :]
        pm = tl.load(mean_part_ptr + off, mask=mask, other=0.0).to(acc_ty)
        pm2 = tl.load(m2_part_ptr + off, mask=mask, other=0.0).to(acc_ty)
        pn = tl.load(count_part_ptr + off, mask=mask, other=0.0).to(acc_ty)
        bm, bm2, bn = _merge_rows(pm, pm2, pn)
        mean, m2, n = welford_combine(mean, m2, n, bm, bm2, bn)
    eps = tl.cast(eps_hi, acc_ty) + tl.cast(eps_lo, acc_ty)  # fp32: hi; fp64: the host double
    var = m2 / tl.maximum(n, 1.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(rstd_ptr + c, rstd, mask=c_mask)
    tl.store(m2_ptr + c, m2, mask=c_mask)
    if HAS_RUNNING:
        if USE_CMA:  # momentum=None: cumulative average, factor 1/num_batches_tracked (already incremented)
            factor = 1.0 / tl.load(nbt_ptr).to(acc_ty)
        else:
            factor = tl.cast(momentum_hi, acc_ty) + tl.cast(momentum_lo, acc_ty)
        unbiased = m2 / tl.maximum(n - 1.0, 1.0)
        upd = c_mask & (n > 0)  # torch leaves the running statistics alone for an empty batch
        rm = tl.load(running_mean_ptr + c, mask=upd, other=0.0)
        rv = tl.load(running_var_ptr + c, mask=upd, other=0.0)
        new_rm = factor * mean + (1.0 - factor) * rm.to(acc_ty)
        new_rv = factor * unbiased + (1.0 - factor) * rv.to(acc_ty)
        tl.store(running_mean_ptr + c, new_rm.to(rm.dtype), mask=upd)
        tl.store(running_var_ptr + c, new_rv.to(rv.dtype), mask=upd)


# --------------------------------------------------------------------------------------------
# Forward: normalise + affine + activation
# --------------------------------------------------------------------------------------------
def _tile_configs():
    # (BLOCK_S, BLOCK_C): tall tiles suit NCHW (s contiguous), wide ones channels_last (c contiguous).
    shapes = [(1024, 1), (512, 2), (256, 4), (128, 8), (64, 16), (32, 32), (16, 64), (8, 128),
              (2048, 1), (1024, 2), (32, 64), (16, 128)]
    return [triton.Config({"BLOCK_S": bs, "BLOCK_C": bc}, num_warps=w) for bs, bc in shapes for w in (4, 8)]


# Under the interpreter every program is a slow Python loop: few, large tiles.
_FIXED = triton.Config({"BLOCK_S": 64, "BLOCK_C": 16})


@autotune(configs=_tile_configs(), key=["C", "S", "CHANNELS_INNER", "INT64", "HAS_SKIP", "ACT"], fixed=_FIXED)
@triton.jit
def _bn_apply_kernel(
    x_ptr, skip_ptr, gate_ptr, out_ptr, mean_ptr, scale_src_ptr, w_ptr, b_ptr,
    C, S, W, eps_hi, eps_lo, slope_hi, slope_lo,
    x_sn, x_sc, x_sh, x_sw,
    k_sn, k_sc, k_sh, k_sw,
    o_sn, o_sc, o_sh, o_sw,
    gate_sc,
    FROM_VAR: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
    ACT: tl.constexpr, MERGED_HW: tl.constexpr, CHANNELS_INNER: tl.constexpr, INT64: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    if INT64:
        pid = pid.to(tl.int64)
        pid_c = pid_c.to(tl.int64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    num_s_blocks = tl.cdiv(S, BLOCK_S)
    n = pid // num_s_blocks
    s = (pid % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = (s < S)[:, None] & c_mask[None, :]

    # Per-channel affine: z = (x − mean)·scale + shift, scale = γ·rstd.
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    src = tl.load(scale_src_ptr + c, mask=c_mask, other=1.0).to(acc_ty)
    if FROM_VAR:  # eval: rstd from the running variance
        scale = 1.0 / tl.sqrt(src + (tl.cast(eps_hi, acc_ty) + tl.cast(eps_lo, acc_ty)))
    else:
        scale = src
    if HAS_WEIGHT:
        scale = scale * tl.load(w_ptr + c, mask=c_mask, other=1.0).to(acc_ty)
    if HAS_BIAS:
        shift = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    else:
        shift = tl.zeros([BLOCK_C], dtype=acc_ty)

    if MERGED_HW:
        x_s = s * x_sw
        o_s = s * o_sw
    else:
        h = s // W
        w = s % W
        x_s = h * x_sh + w * x_sw
        o_s = h * o_sh + w * o_sw
    x = tl.load(x_ptr + (n * x_sn + x_s[:, None] + (c * x_sc)[None, :]), mask=mask, other=0.0).to(acc_ty)
    if HAS_SKIP:  # x = up + a·skip, recomputed, never stored
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
        if MERGED_HW:
            k_s = s * k_sw
        else:
            k_s = (s // W) * k_sh + (s % W) * k_sw
        k = tl.load(skip_ptr + (n * k_sn + k_s[:, None] + (c * k_sc)[None, :]), mask=mask, other=0.0)
        x += a[None, :] * k.to(acc_ty)
    # (x − mean)·scale + β, not x·scale + (β − mean·scale): no cancellation when |mean| ≫ std.
    z = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    y = activation(z, ACT, tl.cast(slope_hi, acc_ty) + tl.cast(slope_lo, acc_ty))
    tl.store(out_ptr + (n * o_sn + o_s[:, None] + (c * o_sc)[None, :]), y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _bn_backward_reduce_kernel(
    grad_ptr, x_ptr, skip_ptr, gate_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, partial_ptr,
    C, S, W, num_s_blocks, num_tiles, tiles_per_prog, num_rows, slope_hi, slope_lo,
    g_sn, g_sc, g_sh, g_sw,
    x_sn, x_sc, x_sh, x_sw,
    k_sn, k_sc, k_sh, k_sw,
    gate_sc,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr, GATE_SUMS: tl.constexpr,
    ACT: tl.constexpr, MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)
    pid_c = tl.program_id(1)
    if INT64:
        row = row.to(tl.int64)
        pid_c = pid_c.to(tl.int64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)[None, :]
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    if ACT != IDENTITY:  # z is needed for act'(z) only
        scale = rstd
        if HAS_WEIGHT:
            scale = scale * tl.load(w_ptr + c, mask=c_mask, other=1.0).to(acc_ty)
        if HAS_BIAS:
            shift = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(acc_ty)[None, :]
        else:
            shift = tl.zeros([1, BLOCK_C], dtype=acc_ty)
        scale = scale[None, :]
        slope = tl.cast(slope_hi, acc_ty) + tl.cast(slope_lo, acc_ty)
    x_c = (c * x_sc)[None, :]
    g_c = (c * g_sc)[None, :]
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)[None, :]
        k_c = (c * k_sc)[None, :]

    # Per-lane accumulators, reduced across lanes once at the end (no barrier inside the loop).
    acc_dy = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    acc_dyx = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    if GATE_SUMS:
        acc_dys = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
        acc_s = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
        acc_xs = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for i in range(0, tiles_per_prog):
        t = row * tiles_per_prog + i
        n = t // num_s_blocks
        s = (t % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
        mask = (s < tl.where(t < num_tiles, S, 0))[:, None] & c_mask[None, :]
        if MERGED_HW:
            x_s = n * x_sn + s * x_sw
            g_s = n * g_sn + s * g_sw
        else:
            h = s // W
            w = s % W
            x_s = n * x_sn + h * x_sh + w * x_sw
            g_s = n * g_sn + h * g_sh + w * g_sw
        x = tl.load(x_ptr + (x_s[:, None] + x_c), mask=mask, other=0.0).to(acc_ty)
        if HAS_SKIP:
            if MERGED_HW:
                k_s = n * k_sn + s * k_sw
            else:
                k_s = n * k_sn + (s // W) * k_sh + (s % W) * k_sw
            k = tl.load(skip_ptr + (k_s[:, None] + k_c), mask=mask, other=0.0).to(acc_ty)
            x += a * k
        g = tl.load(grad_ptr + (g_s[:, None] + g_c), mask=mask, other=0.0).to(acc_ty)
        xc = tl.where(mask, x - mean, 0.0)
        if ACT == IDENTITY:
            dyp = g
        else:
            dyp = tl.where(mask, g * activation_grad(xc * scale + shift, ACT, slope), 0.0)
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


@autotune(configs=_tile_configs(), key=["C", "S", "CHANNELS_INNER", "INT64", "HAS_SKIP", "ACT", "TRAINING"],
          fixed=_FIXED)
@triton.jit
def _bn_backward_dx_kernel(
    grad_ptr, x_ptr, skip_ptr, gate_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sums_ptr,
    dx_ptr, dskip_ptr,
    C, S, W, inv_count_hi, inv_count_lo, slope_hi, slope_lo,
    g_sn, g_sc, g_sh, g_sw,
    x_sn, x_sc, x_sh, x_sw,
    k_sn, k_sc, k_sh, k_sw,
    d_sn, d_sc, d_sh, d_sw,
    e_sn, e_sc, e_sh, e_sw,
    gate_sc,
    TRAINING: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SKIP: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DSKIP: tl.constexpr, ACT: tl.constexpr, MERGED_HW: tl.constexpr,
    CHANNELS_INNER: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    if INT64:
        pid = pid.to(tl.int64)
        pid_c = pid_c.to(tl.int64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    num_s_blocks = tl.cdiv(S, BLOCK_S)
    n = pid // num_s_blocks
    s = (pid % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mask = (s < S)[:, None] & c_mask[None, :]

    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c, mask=c_mask, other=1.0).to(acc_ty)
        k1 = w * rstd
    else:
        k1 = rstd

    if MERGED_HW:
        x_s = s * x_sw
        g_s = s * g_sw
    else:
        hh = s // W
        ww = s % W
        x_s = hh * x_sh + ww * x_sw
        g_s = hh * g_sh + ww * g_sw
    x = tl.load(x_ptr + (n * x_sn + x_s[:, None] + (c * x_sc)[None, :]), mask=mask, other=0.0).to(acc_ty)
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
        if MERGED_HW:
            k_s = s * k_sw
        else:
            k_s = (s // W) * k_sh + (s % W) * k_sw
        k = tl.load(skip_ptr + (n * k_sn + k_s[:, None] + (c * k_sc)[None, :]), mask=mask, other=0.0)
        x += a[None, :] * k.to(acc_ty)
    g = tl.load(grad_ptr + (n * g_sn + g_s[:, None] + (c * g_sc)[None, :]), mask=mask, other=0.0).to(acc_ty)
    xhat = (x - mean[None, :]) * rstd[None, :]
    if ACT == IDENTITY:
        dyp = g
    else:
        if HAS_WEIGHT:
            z = xhat * w[None, :]
        else:
            z = xhat
        if HAS_BIAS:
            z += tl.load(b_ptr + c, mask=c_mask, other=0.0).to(acc_ty)[None, :]
        dyp = g * activation_grad(z, ACT, tl.cast(slope_hi, acc_ty) + tl.cast(slope_lo, acc_ty))
    if TRAINING:
        inv_count = tl.cast(inv_count_hi, acc_ty) + tl.cast(inv_count_lo, acc_ty)
        mdy = tl.load(sums_ptr + c, mask=c_mask, other=0.0).to(acc_ty) * inv_count
        mdyx = tl.load(sums_ptr + C + c, mask=c_mask, other=0.0).to(acc_ty) * inv_count
        dx = k1[None, :] * (dyp - mdy[None, :] - xhat * mdyx[None, :])
    else:
        dx = k1[None, :] * dyp
    if NEED_DX:
        if MERGED_HW:
            d_s = s * d_sw
        else:
            d_s = (s // W) * d_sh + (s % W) * d_sw
        tl.store(dx_ptr + (n * d_sn + d_s[:, None] + (c * d_sc)[None, :]), dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DSKIP:
        if MERGED_HW:
            e_s = s * e_sw
        else:
            e_s = (s // W) * e_sh + (s % W) * e_sw
        tl.store(dskip_ptr + (n * e_sn + e_s[:, None] + (c * e_sc)[None, :]),
                 (a[None, :] * dx).to(dskip_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
_REDUCTION_OVERRIDE: dict = {}


@contextlib.contextmanager
def reduction_config(rows: Optional[int] = None, block_s: Optional[int] = None,
                     block_c: Optional[int] = None) -> Iterator[None]:
    """Force the split of the two reduction kernels (statistics, backward sums), for tests.

    ``rows``: programs along N·H·W per channel block (1 = no split; clamped to the tile count);
    ``block_s``/``block_c``: tile shape (powers of two).
    """
    previous = dict(_REDUCTION_OVERRIDE)
    _REDUCTION_OVERRIDE.update({k: v for k, v in (("rows", rows), ("block_s", block_s), ("block_c", block_c))
                                if v is not None})
    try:
        yield
    finally:
        _REDUCTION_OVERRIDE.clear()
        _REDUCTION_OVERRIDE.update(previous)


def _split_double(value: float) -> Tuple[float, float]:
    """(hi, lo) fp32 halves of a double (see the module docstring)."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


class _Geometry:
    """How the kernels walk a group of same-shape [N, C, H, W] tensors: as [n, C, s] with strides."""

    def __init__(self, shape, tensors):
        n, c, h, w = shape
        s = h * w
        self.c, self.w = c, w
        self.merged_hw = all(spatial_strides_mergeable(t) for t in tensors)
        self.merged_ns = self.merged_hw and (n == 1 or all(t.stride(0) == s * merged_spatial_stride(t)
                                                           for t in tensors))
        self.n, self.s = (1, n * s) if self.merged_ns else (n, s)
        self.int64 = needs_int64(*tensors)

    def strides(self, t: Optional[torch.Tensor]):
        if t is None:
            return (0, 0, 0, 0)
        sn, sc, sh, sw = t.stride()
        if self.merged_hw:
            sw = merged_spatial_stride(t)
        if self.merged_ns:
            sn = 0
        return (sn, sc, sh, sw)


def _channels_inner(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.shape[1] > 1


def _reduction_launch(x: torch.Tensor, geo: _Geometry):
    """Launch shape of a reduction kernel: (rows, tiles_per_prog, num_tiles, num_s_blocks, BLOCK_S,
    BLOCK_C, channel blocks, num_warps).

    Tiles of ~2048 elements, wide along whichever axis is contiguous; the N'·S' tiles of each
    channel block are split into ``rows`` contiguous ranges so that rows × channel blocks ≈ a few
    waves of SMs (small C with large N·H·W would otherwise leave most SMs idle)."""
    budget = 2048
    c, s = geo.c, geo.s
    if _channels_inner(x):  # channels contiguous: wide tiles along C
        block_c = min(next_power_of_2(c), 64)
        block_s = min(max(budget // block_c, 1), next_power_of_2(s))
    else:
        block_s = min(next_power_of_2(s), budget)
        block_c = min(next_power_of_2(c), max(budget // block_s, 1))
    block_s = _REDUCTION_OVERRIDE.get("block_s", block_s)
    block_c = _REDUCTION_OVERRIDE.get("block_c", block_c)
    c_blocks = triton.cdiv(c, block_c)
    num_s_blocks = triton.cdiv(s, block_s)
    num_tiles = geo.n * num_s_blocks
    rows = _REDUCTION_OVERRIDE.get("rows", triton.cdiv(target_programs(x), c_blocks))
    rows = max(1, min(rows, num_tiles))
    tiles_per_prog = triton.cdiv(num_tiles, rows)
    rows = triton.cdiv(num_tiles, tiles_per_prog)
    num_warps = 8 if block_s * block_c >= 2048 else 4
    return rows, tiles_per_prog, num_tiles, num_s_blocks, block_s, block_c, c_blocks, num_warps


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _gate_stride(gate: Optional[torch.Tensor]) -> int:
    return 0 if gate is None or gate.numel() == 1 else gate.stride(0)


def _finalize(mean_part, m2_part, count_part, eps, running_mean, running_var, num_batches_tracked,
              momentum, acc_dtype):
    rows, c = mean_part.shape
    device = mean_part.device
    mean = torch.empty(c, dtype=acc_dtype, device=device)
    rstd = torch.empty(c, dtype=acc_dtype, device=device)
    m2 = torch.empty(c, dtype=acc_dtype, device=device)
    has_running = running_mean is not None
    use_cma = has_running and num_batches_tracked is not None
    block_c = min(next_power_of_2(c), 128)
    block_r = min(next_power_of_2(rows), max(2048 // block_c, 1))
    with device_guard(mean_part):
        _bn_finalize_kernel[(triton.cdiv(c, block_c),)](
            mean_part, m2_part, count_part, rows, c,
            mean, rstd, m2,
            running_mean if has_running else mean, running_var if has_running else mean,
            num_batches_tracked if use_cma else mean,
            *_split_double(momentum), *_split_double(eps),
            HAS_RUNNING=has_running, USE_CMA=use_cma, ACC_FP64=acc_dtype == torch.float64,
            BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
        )
    return mean, rstd, m2


def batch_norm_stats(
    x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics of ``x`` (or ``x + gate·skip``) per channel: ``(mean, rstd, M2)``.

    Accumulation dtype (fp32, fp64 for fp64 input). ``M2 = Σ (x − mean)²``; rstd = 1/√(M2/M + eps).
    Updates ``running_mean``/``running_var`` in place when given (momentum, or 1/num_batches_tracked
    when ``num_batches_tracked`` is given). An empty input gives zeros and updates nothing.
    """
    n, c, h, w = x.shape
    acc = _acc_dtype(x)
    if x.numel() == 0:
        zeros = torch.zeros(c, dtype=acc, device=x.device)
        return zeros, torch.full_like(zeros, float(eps)).rsqrt(), zeros.clone()
    tensors = [x] + ([skip] if skip is not None else [])
    geo = _Geometry(x.shape, tensors)
    rows, tpp, num_tiles, num_s_blocks, block_s, block_c, c_blocks, num_warps = _reduction_launch(x, geo)
    mean_part = torch.empty((rows, c), dtype=acc, device=x.device)
    m2_part = torch.empty_like(mean_part)
    count_part = torch.empty_like(mean_part)
    with device_guard(x):
        _bn_stats_kernel[(rows, c_blocks)](
            x, skip if skip is not None else x, gate if gate is not None else mean_part,
            mean_part, m2_part, count_part,
            c, geo.s, geo.w, num_s_blocks, num_tiles, tpp,
            *geo.strides(x), *geo.strides(skip), _gate_stride(gate),
            HAS_SKIP=skip is not None, MERGED_HW=geo.merged_hw, INT64=geo.int64,
            ACC_FP64=acc == torch.float64, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=num_warps,
        )
    return _finalize(mean_part, m2_part, count_part, eps, running_mean, running_var,
                     num_batches_tracked, momentum, acc)


def batch_norm_merge_stats(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor,
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
    num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge per-rank statistics (rows of ``counts`` [R], ``means``/``m2s`` [R, C]) with Chan's
    formula: ``(mean, rstd)``, updating the running statistics like :func:`batch_norm_stats`."""
    acc = means.dtype
    count_part = counts.to(acc).reshape(-1, 1).expand_as(means).contiguous()
    mean, rstd, _ = _finalize(means.contiguous(), m2s.contiguous(), count_part, eps, running_mean,
                              running_var, num_batches_tracked, momentum, acc)
    return mean, rstd


def batch_norm_apply(
    x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    mean: torch.Tensor, scale_src: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    from_var: bool, eps: float, act: int, slope: float,
) -> torch.Tensor:
    """``act((x − mean)·rstd·weight + bias)`` with rstd = ``scale_src`` or, when ``from_var``,
    1/√(scale_src + eps). Output in ``x``'s dtype and (dense) layout."""
    n, c, h, w = x.shape
    out = empty_like_layout(x)
    if out.numel() == 0:
        return out
    tensors = [x, out] + ([skip] if skip is not None else [])
    geo = _Geometry(x.shape, tensors)

    def grid(meta):
        return (geo.n * triton.cdiv(geo.s, meta["BLOCK_S"]), triton.cdiv(c, meta["BLOCK_C"]))

    with device_guard(x):
        _bn_apply_kernel[grid](
            x, skip if skip is not None else x, gate if gate is not None else mean, out, mean, scale_src,
            weight if weight is not None else mean, bias if bias is not None else mean,
            c, geo.s, geo.w, *_split_double(eps), *_split_double(slope),
            *geo.strides(x), *geo.strides(skip), *geo.strides(out), _gate_stride(gate),
            FROM_VAR=from_var, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_SKIP=skip is not None, ACT=act, MERGED_HW=geo.merged_hw, CHANNELS_INNER=_channels_inner(x),
            INT64=geo.int64, ACC_FP64=x.dtype == torch.float64,
        )
    return out


def batch_norm_backward_reduce(
    grad: torch.Tensor, x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    act: int, slope: float, gate_sums: bool,
) -> torch.Tensor:
    """Per-channel sums ``[K, C]`` (accumulation dtype): Σdy', Σdy'·x̂ and, with ``gate_sums``,
    Σdy'·skip, Σskip, Σx̂·skip; dy' = grad·act'(z). ``grad`` may have any strides."""
    n, c, h, w = x.shape
    k = 5 if gate_sums else 2
    acc = _acc_dtype(x)
    if x.numel() == 0:
        return torch.zeros((k, c), dtype=acc, device=x.device)
    tensors = [grad, x] + ([skip] if skip is not None else [])
    geo = _Geometry(x.shape, tensors)
    rows, tpp, num_tiles, num_s_blocks, block_s, block_c, c_blocks, num_warps = _reduction_launch(x, geo)
    if gate_sums:  # five accumulators: halve the tile to keep registers in check
        block_s = max(block_s // 2, 1) if "block_s" not in _REDUCTION_OVERRIDE else block_s
        num_s_blocks = triton.cdiv(geo.s, block_s)
        num_tiles = geo.n * num_s_blocks
        tpp = triton.cdiv(num_tiles, rows)
        rows = triton.cdiv(num_tiles, tpp)
    partial = torch.empty((k, rows, c), dtype=acc, device=x.device)
    with device_guard(x):
        _bn_backward_reduce_kernel[(rows, c_blocks)](
            grad, x, skip if skip is not None else x, gate if gate is not None else mean,
            mean, rstd, weight if weight is not None else mean, bias if bias is not None else mean, partial,
            c, geo.s, geo.w, num_s_blocks, num_tiles, tpp, rows, *_split_double(slope),
            *geo.strides(grad), *geo.strides(x), *geo.strides(skip), _gate_stride(gate),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SKIP=skip is not None,
            GATE_SUMS=gate_sums, ACT=act, MERGED_HW=geo.merged_hw, INT64=geo.int64,
            ACC_FP64=acc == torch.float64, BLOCK_S=block_s, BLOCK_C=block_c, num_warps=num_warps,
        )
    return partial.sum(dim=1)  # deterministic: a fixed-order torch reduction over the rows


def batch_norm_backward_dx(
    grad: torch.Tensor, x: torch.Tensor, skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    sums: torch.Tensor, inv_count: float, training: bool, act: int, slope: float,
    need_dx: bool, need_dskip: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(dx, d_skip)``: dx = γ·rstd·(dy' − Σdy'·inv_count − x̂·Σ(dy'·x̂)·inv_count) in training
    (``sums`` rows 0 and 1, global under SyncBatchNorm), γ·rstd·dy' in eval; d_skip = gate·dx."""
    n, c, h, w = x.shape
    dx = empty_like_layout(x) if need_dx else None
    dskip = empty_like_layout(skip) if need_dskip else None
    if x.numel() == 0 or not (need_dx or need_dskip):
        return dx, dskip
    tensors = [grad, x] + [t for t in (skip, dx, dskip) if t is not None]
    geo = _Geometry(x.shape, tensors)

    def grid(meta):
        return (geo.n * triton.cdiv(geo.s, meta["BLOCK_S"]), triton.cdiv(c, meta["BLOCK_C"]))

    dummy = mean
    with device_guard(x):
        _bn_backward_dx_kernel[grid](
            grad, x, skip if skip is not None else x, gate if gate is not None else dummy,
            mean, rstd, weight if weight is not None else dummy, bias if bias is not None else dummy,
            sums.contiguous(),
            dx if dx is not None else x, dskip if dskip is not None else x,
            c, geo.s, geo.w, *_split_double(inv_count), *_split_double(slope),
            *geo.strides(grad), *geo.strides(x), *geo.strides(skip), *geo.strides(dx), *geo.strides(dskip),
            _gate_stride(gate),
            TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_SKIP=skip is not None, NEED_DX=need_dx, NEED_DSKIP=need_dskip, ACT=act,
            MERGED_HW=geo.merged_hw, CHANNELS_INNER=_channels_inner(x), INT64=geo.int64,
            ACC_FP64=x.dtype == torch.float64,
        )
    return dx, dskip
