"""BatchNorm2d + activation (optionally on a gated skip sum ``x = up + a·skip``): Triton kernels.

Every tensor is walked as a 3-D view [N', C, S'] of the 4-D [N, C, H, W] input through its own
strides: S = H·W when (H, W) merge into one stride, and N·S merges further into one index when
``stride(0) == S·stride_s`` (channels_last, or N = 1), so small spatial maps in channels_last do
not waste tile lanes. NCHW, channels_last and other strided views run without layout copies.

Forward, training (batch statistics), 3 launches:
  1. ``_bn_stats_kernel``: grid (rows, channel blocks). The N'·S' reduction of each channel is
     split into ``rows`` contiguous ranges of [BLOCK_S, BLOCK_C] tiles (the small-C, large-N·HW
     case needs this: one program per channel would leave the GPU idle). Each lane keeps its own
     Welford (mean, M2, count); lanes merge with Chan's formula in the delta form
     (``common.merge_partials``: exact for constant channels) and each program
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

Scalars (eps, slope, momentum, 1/M) travel as fp32 (hi, lo) pairs rebuilt in-kernel in the
accumulation dtype (``common.acc_scalar``): in fp32 that is hi (never promoted to fp64
arithmetic), in fp64 (gradcheck) hi + lo, the host double to ~2⁻⁴⁸ (Triton passes floats as fp32).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from .activations import IDENTITY, activation, activation_grad, welford_combine
from .common import acc_scalar, load_affine, merge_partials, row_program, tile_program
from .launch import (
    FIXED_TILE,
    TILE_SHAPES,
    acc_dtype,
    all_spatial_mergeable,
    autotune,
    channels_inner,
    device_guard,
    empty_like_layout,
    finalize_blocks,
    kernel_strides,
    merged_spatial_stride,
    needs_int64,
    reduction_tile,
    split_fp64,
    target_programs,
    tile_configs,
    tile_grid,
    vector_stride,
)


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------
# Program prologues and the statistics merge come from kernels/common.py (once per program); code that runs per tile is
# written inline: under Triton's interpreter every nested jit call costs ~0.5 ms. Per-channel
# offsets (c·stride_c) are hoisted out of loops.
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
    row, c, c_mask = row_program(C, BLOCK_C, INT64)  # row: this program's row of the partial buffers
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
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
    m_c, m2_c, n_c = merge_partials(mean, m2, tl.broadcast_to(cnt, [BLOCK_S, BLOCK_C]))
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
# Forward: normalise + affine + activation
# --------------------------------------------------------------------------------------------
# The shared tile shapes and larger ones: the N·S merge makes long rows common.
_TILE_SHAPES = TILE_SHAPES + ((2048, 1), (1024, 2), (32, 64), (16, 128))


@autotune(configs=tile_configs(_TILE_SHAPES), key=["C", "S", "CHANNELS_INNER", "INT64", "HAS_SKIP", "ACT"],
          fixed=FIXED_TILE)
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
    n, s, c, c_mask, mask = tile_program(S, C, BLOCK_S, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32

    # Per-channel affine: z = (x − mean)·scale + shift, scale = γ·rstd, shift = β.
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    src = tl.load(scale_src_ptr + c, mask=c_mask, other=1.0).to(acc_ty)
    if FROM_VAR:  # eval: rstd from the running variance
        src = 1.0 / tl.sqrt(src + acc_scalar(eps_hi, eps_lo, ACC_FP64))
    gam, shift = load_affine(w_ptr, b_ptr, c, c_mask, 1, 1, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
    scale = src * gam

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
    y = activation(z, ACT, acc_scalar(slope_hi, slope_lo, ACC_FP64))
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
    row, c, c_mask = row_program(C, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)[None, :]
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    if ACT != IDENTITY:  # z is needed for act'(z) only
        gam, shift = load_affine(w_ptr, b_ptr, c, c_mask, 1, 1, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
        scale = (rstd * gam)[None, :]
        shift = shift[None, :]
        slope = acc_scalar(slope_hi, slope_lo, ACC_FP64)
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


@autotune(configs=tile_configs(_TILE_SHAPES),
          key=["C", "S", "CHANNELS_INNER", "INT64", "HAS_SKIP", "ACT", "TRAINING"], fixed=FIXED_TILE)
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
    n, s, c, c_mask, mask = tile_program(S, C, BLOCK_S, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32

    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    rstd = tl.load(rstd_ptr + c, mask=c_mask, other=0.0).to(acc_ty)
    gam, bet = load_affine(w_ptr, b_ptr, c, c_mask, 1, 1, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
    k1 = gam * rstd

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
        z = xhat * gam[None, :] + bet[None, :]
        dyp = g * activation_grad(z, ACT, acc_scalar(slope_hi, slope_lo, ACC_FP64))
    if TRAINING:
        inv_count = acc_scalar(inv_count_hi, inv_count_lo, ACC_FP64)
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


class _Geometry:
    """How the kernels walk a group of same-shape [N, C, H, W] tensors: as [n, C, s] with strides."""

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


def _reduction_launch(x: torch.Tensor, geo: _Geometry):
    """Launch shape of a reduction kernel: (rows, tiles_per_prog, num_tiles, num_s_blocks, BLOCK_S,
    BLOCK_C, channel blocks, num_warps).

    Tiles of ~2048 elements (``launch.reduction_tile``, at most 64 channels wide); the N'·S' tiles
    of each channel block are split into ``rows`` contiguous ranges so that rows × channel blocks
    ≈ a few waves of SMs (small C with large N·H·W would otherwise leave most SMs idle)."""
    block_s, block_c = reduction_tile(x, geo.s, max_block_c=64)
    block_s = _REDUCTION_OVERRIDE.get("block_s", block_s)
    block_c = _REDUCTION_OVERRIDE.get("block_c", block_c)
    c_blocks = triton.cdiv(geo.c, block_c)
    num_s_blocks = triton.cdiv(geo.s, block_s)
    num_tiles = geo.n * num_s_blocks
    rows = _REDUCTION_OVERRIDE.get("rows", triton.cdiv(target_programs(x), c_blocks))
    rows = max(1, min(rows, num_tiles))
    tiles_per_prog = triton.cdiv(num_tiles, rows)
    rows = triton.cdiv(num_tiles, tiles_per_prog)
    num_warps = 8 if block_s * block_c >= 2048 else 4
    return rows, tiles_per_prog, num_tiles, num_s_blocks, block_s, block_c, c_blocks, num_warps


def _finalize(mean_part, m2_part, count_part, eps, running_mean, running_var, num_batches_tracked,
              momentum, acc):
    rows, c = mean_part.shape
    device = mean_part.device
    mean = torch.empty(c, dtype=acc, device=device)
    rstd = torch.empty(c, dtype=acc, device=device)
    m2 = torch.empty(c, dtype=acc, device=device)
    has_running = running_mean is not None
    use_cma = has_running and num_batches_tracked is not None
    block_r, block_c = finalize_blocks(rows, c)
    with device_guard(mean_part):
        _bn_finalize_kernel[(triton.cdiv(c, block_c),)](
            mean_part, m2_part, count_part, rows, c,
            mean, rstd, m2,
            running_mean if has_running else mean, running_var if has_running else mean,
            num_batches_tracked if use_cma else mean,
            *split_fp64(momentum), *split_fp64(eps),
            HAS_RUNNING=has_running, USE_CMA=use_cma, ACC_FP64=acc == torch.float64,
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
    acc = acc_dtype(x)
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
            *geo.strides(x), *geo.strides(skip), vector_stride(gate),
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
    with device_guard(x):
        _bn_apply_kernel[tile_grid(geo.n, geo.s, c)](
            x, skip if skip is not None else x, gate if gate is not None else mean, out, mean, scale_src,
            weight if weight is not None else mean, bias if bias is not None else mean,
            c, geo.s, geo.w, *split_fp64(eps), *split_fp64(slope),
            *geo.strides(x), *geo.strides(skip), *geo.strides(out), vector_stride(gate),
            FROM_VAR=from_var, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_SKIP=skip is not None, ACT=act, MERGED_HW=geo.merged_hw, CHANNELS_INNER=channels_inner(x),
            INT64=geo.int64, ACC_FP64=acc_dtype(x) == torch.float64,
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
    acc = acc_dtype(x)
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
            c, geo.s, geo.w, num_s_blocks, num_tiles, tpp, rows, *split_fp64(slope),
            *geo.strides(grad), *geo.strides(x), *geo.strides(skip), vector_stride(gate),
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
    dummy = mean
    with device_guard(x):
        _bn_backward_dx_kernel[tile_grid(geo.n, geo.s, c)](
            grad, x, skip if skip is not None else x, gate if gate is not None else dummy,
            mean, rstd, weight if weight is not None else dummy, bias if bias is not None else dummy,
            sums.contiguous(),
            dx if dx is not None else x, dskip if dskip is not None else x,
            c, geo.s, geo.w, *split_fp64(inv_count), *split_fp64(slope),
            *geo.strides(grad), *geo.strides(x), *geo.strides(skip), *geo.strides(dx), *geo.strides(dskip),
            vector_stride(gate),
            TRAINING=training, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_SKIP=skip is not None, NEED_DX=need_dx, NEED_DSKIP=need_dskip, ACT=act,
            MERGED_HW=geo.merged_hw, CHANNELS_INNER=channels_inner(x), INT64=geo.int64,
            ACC_FP64=acc_dtype(x) == torch.float64,
        )
    return dx, dskip
