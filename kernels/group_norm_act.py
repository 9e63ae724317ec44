"""GroupNorm + activation, optionally fused with a gated additive skip, forward and backward.

Computes ``y = act(γ ⊙ x̂ + β)`` with ``x̂ = (h − μ_{n,g}) · rstd_{n,g}`` over the groups of a 4-D
input ``h`` [N, C, H, W]; ``h = x`` or, with a skip (constexpr ``HAS_SKIP``),
``h = up + a ⊙ skip`` with the gate ``a`` (1 or C values), which is never materialised.

Tensors are walked as [N, C, S] (S = H·W) through their own strides, as in the gated-skip
kernels: NCHW, channels_last and any strided view run without layout copies. Every pass tiles
[BLOCK_S, BLOCK_C] with the contiguous axis wide (S for NCHW, C for channels_last) so loads
coalesce, and every reduction is first *per channel* over a chunk of S: partial statistics of
channels that belong to one group are merged afterwards by a tiny finalize kernel. Grouping by
channel keeps the hot loop independent of the group size (any C/G, powers of two or not, and
channels_last tiles spanning several groups) and gives parallelism over S when N·G is small.

Forward (2 passes over the input + 1 write):
  1. stats:    grid (N·chunks, C-blocks); per-lane Welford over the chunk, Chan-merged across
               lanes → fp32 per-channel partial (mean, M2) [N·chunks, C] (count known per chunk).
  2. finalize: grid (N·G); Chan-merges the chunks × C/G partials of a group → mean, rstd [N, G].
  3. apply:    grid (N·S-tiles, C-blocks); y = act(z), z = (h − μ)·rstd·γ + β. Autotuned.
  With one chunk per (n, C-block) (enough programs already, ``chunks == 1``) step 1 is the plain
  one-pass-per-channel-block reduction; ``chunks > 1`` is the split reduction for small N·G.

Backward (2 passes; only h's inputs and fp32 (mean, rstd) were saved, z and act'(z) are
recomputed): with dz = dy·act'(z), g = γ·dz and means over the M = (C/G)·S elements of a group,
  dh = rstd·(g − mean(g) − x̂·mean(g·x̂)),   dγ_c = Σ dz·x̂,   dβ_c = Σ dz,
  d_up = dh,   d_skip = a·dh,   d_a = Σ dh·skip.
  1. reduce:   per-channel partials Σ dz and Σ dz·x̂ over S-chunks → [N·chunks, C] (fp32).
  2. finalize: grid (N·G): per-(n, c) sums (host sums them over N into dβ, dγ: deterministic,
               no float atomics) and the per-(n, g) means m1 = mean(g), m2 = mean(g·x̂).
  3. dx:       dh, d_skip, and per-program partials of Σ dh·skip for the gate.

Accumulation is fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs (gradcheck). Float scalars
(eps, slope) arrive as an fp32 (hi, lo) pair and are rebuilt in the accumulation dtype in-kernel:
fp32 work never sees fp64 scalars, fp64 work keeps ~48 bits of them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from . import launch
from .activations import activation, activation_grad
from .common import acc_scalar, chunk_program, load_affine, merge_partials, tile_program
from .launch import (
    FIXED_TILE,
    acc_dtype,
    all_spatial_mergeable,
    autotune,
    channels_inner,
    device_guard,
    empty_like_layout,
    finalize_blocks,
    gate_gradient,
    kernel_strides,
    needs_int64,
    split_fp64,
    tile_configs,
    tile_grid,
    vector_stride,
)

# Elements per tile of the reduction passes (per-lane accumulators live in registers: 3 per
# element for Welford, 2 for the backward sums). Tests shrink it to force many chunks.
REDUCE_TILE = 2048


# --------------------------------------------------------------------------------------------
# Kernels. Program prologues come from kernels/common.py; loads and offsets in the tile loops
# are written inline rather than through jit helpers: under TRITON_INTERPRET=1 every helper
# call costs ~0.5 ms, which per tile would dominate the CPU tests; compiled, both are the same.
#
# Spatial offsets: s = h·W + w. When every tensor's (H, W) merge (MERGED_HW), s_hi = 0 and
# s_lo = s with the merged stride in the w slot; otherwise s_hi = h, s_lo = w (one div/mod per
# tile shared by all tensors). The offset of a tensor is n·sn + c·sc + s_hi·sh + s_lo·sw.
# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _group_norm_act_stats_kernel(
    x_ptr, skip_ptr, gate_ptr, pmean_ptr, pm2_ptr,
    C, S, W, num_chunks, S_PER_PROG,
    x_sn, x_sc, x_sh, x_sw,
    k_sn, k_sc, k_sh, k_sw,
    gate_sc,
    HAS_SKIP: tl.constexpr, MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row, n, s_begin, c, c_mask = chunk_program(C, num_chunks, S_PER_PROG, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
    x_base = n * x_sn + c[None, :] * x_sc
    k_base = n * k_sn + c[None, :] * k_sc

    # Per-lane Welford (each lane sees one element per step; masked lanes do not count), then a
    # Chan merge across the S lanes: exact for any |mean| / std, no E[x²] − E[x]². A lane valid
    # at step j was valid at every earlier step (s only grows), so its count is j + 1: one scalar
    # reciprocal per step replaces a division per element.
    mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    cnt = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for i in range(0, S_PER_PROG, BLOCK_S):
        inv_step = 1.0 / tl.cast(i // BLOCK_S + 1, acc_ty)
        s = s_begin + i + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_mask[None, :]
        if MERGED_HW:
            s_hi = s * 0
            s_lo = s
        else:
            s_hi = s // W
            s_lo = s % W
        h = tl.load(x_ptr + x_base + (s_hi * x_sh + s_lo * x_sw)[:, None], mask=mask, other=0.0).to(acc_ty)
        if HAS_SKIP:
            k = tl.load(skip_ptr + k_base + (s_hi * k_sh + s_lo * k_sw)[:, None], mask=mask, other=0.0).to(acc_ty)
            h += a[None, :] * k
        cnt += tl.where(mask, 1.0, 0.0)
        delta = h - mean
        mean += tl.where(mask, delta * inv_step, 0.0)
        m2 += tl.where(mask, delta * (h - mean), 0.0)
    mean_c, m2_c, _ = merge_partials(mean, m2, cnt)
    tl.store(pmean_ptr + row * C + c, mean_c, mask=c_mask)
    tl.store(pm2_ptr + row * C + c, m2_c, mask=c_mask)


@triton.jit
def _group_norm_stats_finalize_kernel(
    pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr,
    C, G, CG, S, num_chunks, S_PER_PROG, eps_hi, eps_lo,
    ACC_FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    pid = tl.program_id(0)  # = n · G + g
    n = pid // G
    g = pid % G
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    eps = acc_scalar(eps_hi, eps_lo, ACC_FP64)
    # Chan's merge of the chunks × C/G partials of group (n, g) in two passes over them (they
    # are few: KBs): μ = μ₀ + Σ nᵢ(μᵢ − μ₀) / Σ nᵢ in the delta form about the first partial μ₀
    # (chunk 0, never empty; exact for a constant group, which then normalises to exactly β),
    # then M2 = Σ M2ᵢ + Σ nᵢ(μᵢ − μ)². Fixed order: deterministic.
    ref = tl.load(pmean_ptr + (n * num_chunks) * C + g * CG)
    acc_n = tl.zeros([BLOCK_K, BLOCK_CG], dtype=acc_ty)
    acc_sum = tl.zeros([BLOCK_K, BLOCK_CG], dtype=acc_ty)
    for k0 in range(0, num_chunks, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < num_chunks
        # Every channel of chunk k saw min(S_PER_PROG, S − k·S_PER_PROG) elements.
        cnt = tl.where(k_mask, tl.minimum(S - k * S_PER_PROG, S_PER_PROG), 0).to(acc_ty)
        for c0 in range(0, CG, BLOCK_CG):
            cc = c0 + tl.arange(0, BLOCK_CG)
            mask = k_mask[:, None] & (cc < CG)[None, :]
            off = (n * num_chunks + k)[:, None] * C + (g * CG + cc)[None, :]
            pm = tl.load(pmean_ptr + off, mask=mask, other=0.0)
            w = tl.where(mask, cnt[:, None], 0.0)
            acc_n += w
            acc_sum += tl.where(mask, w * (pm - ref), 0.0)
    count = tl.sum(tl.sum(acc_n, axis=1), axis=0)
    mean = ref + tl.sum(tl.sum(acc_sum, axis=1), axis=0) / tl.maximum(count, 1.0)
    acc_m2 = tl.zeros([BLOCK_K, BLOCK_CG], dtype=acc_ty)
    for k0 in range(0, num_chunks, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < num_chunks
        cnt = tl.where(k_mask, tl.minimum(S - k * S_PER_PROG, S_PER_PROG), 0).to(acc_ty)
        for c0 in range(0, CG, BLOCK_CG):
            cc = c0 + tl.arange(0, BLOCK_CG)
            mask = k_mask[:, None] & (cc < CG)[None, :]
            off = (n * num_chunks + k)[:, None] * C + (g * CG + cc)[None, :]
            pm = tl.load(pmean_ptr + off, mask=mask, other=0.0)
            pv = tl.load(pm2_ptr + off, mask=mask, other=0.0)
            dev = tl.where(mask, pm - mean, 0.0)
            acc_m2 += pv + tl.where(mask, cnt[:, None], 0.0) * dev * dev
    m2 = tl.sum(tl.sum(acc_m2, axis=1), axis=0)
    var = m2 / tl.maximum(count, 1.0)  # biased, as GroupNorm; NaN from a non-finite group propagates
    var = tl.where(var < 0.0, 0.0, var)  # (tl.maximum would turn NaN into 0: finite output for Inf input)
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)


@triton.jit
def _group_stats(stat_ptr, n, G, c, c_mask, CG):
    """A [BLOCK_C] gather of one per-(n, group) statistic for channels ``c`` (cached, negligible)."""
    return tl.load(stat_ptr + n * G + c // CG, mask=c_mask, other=0.0)


@autotune(configs=tile_configs(), key=["C", "S", "CHANNELS_INNER", "INT64", "HAS_SKIP"], fixed=FIXED_TILE)
@triton.jit
def _group_norm_act_apply_kernel(
    x_ptr, skip_ptr, gate_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, y_ptr,
    C, S, W, G, CG, slope_hi, slope_lo,
    x_sn, x_sc, x_sh, x_sw,
    k_sn, k_sc, k_sh, k_sw,
    y_sn, y_sc, y_sh, y_sw,
    gate_sc, w_sc, b_sc,
    HAS_SKIP: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    MERGED_HW: tl.constexpr, CHANNELS_INNER: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, s, c, c_mask, mask = tile_program(S, C, BLOCK_S, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    slope = acc_scalar(slope_hi, slope_lo, ACC_FP64)

    mu = _group_stats(mean_ptr, n, G, c, c_mask, CG)
    r = _group_stats(rstd_ptr, n, G, c, c_mask, CG)
    gam, bet = load_affine(w_ptr, b_ptr, c, c_mask, w_sc, b_sc, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)

    if MERGED_HW:
        s_hi = s * 0
        s_lo = s
    else:
        s_hi = s // W
        s_lo = s % W
    h = tl.load(x_ptr + n * x_sn + c[None, :] * x_sc + (s_hi * x_sh + s_lo * x_sw)[:, None],
                mask=mask, other=0.0).to(acc_ty)
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
        k = tl.load(skip_ptr + n * k_sn + c[None, :] * k_sc + (s_hi * k_sh + s_lo * k_sw)[:, None],
                    mask=mask, other=0.0).to(acc_ty)
        h += a[None, :] * k
    # The same z formula as the backward recomputation, so act'(z) matches the forward exactly.
    xhat = (h - mu[None, :]) * r[None, :]
    z = xhat * gam[None, :] + bet[None, :]
    y = activation(z, ACT, slope)
    tl.store(y_ptr + n * y_sn + c[None, :] * y_sc + (s_hi * y_sh + s_lo * y_sw)[:, None],
             y.to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _group_norm_act_backward_reduce_kernel(
    dy_ptr, x_ptr, skip_ptr, gate_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, psum_dz_ptr, psum_dzx_ptr,
    C, S, W, G, CG, num_chunks, S_PER_PROG, slope_hi, slope_lo,
    dy_sn, dy_sc, dy_sh, dy_sw,
    x_sn, x_sc, x_sh, x_sw,
    k_sn, k_sc, k_sh, k_sw,
    gate_sc, w_sc, b_sc,
    HAS_SKIP: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row, n, s_begin, c, c_mask = chunk_program(C, num_chunks, S_PER_PROG, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    slope = acc_scalar(slope_hi, slope_lo, ACC_FP64)
    mu = _group_stats(mean_ptr, n, G, c, c_mask, CG)
    r = _group_stats(rstd_ptr, n, G, c, c_mask, CG)
    gam, bet = load_affine(w_ptr, b_ptr, c, c_mask, w_sc, b_sc, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
    x_base = n * x_sn + c[None, :] * x_sc
    k_base = n * k_sn + c[None, :] * k_sc
    dy_base = n * dy_sn + c[None, :] * dy_sc

    acc_dz = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    acc_dzx = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for i in range(0, S_PER_PROG, BLOCK_S):
        s = s_begin + i + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_mask[None, :]
        if MERGED_HW:
            s_hi = s * 0
            s_lo = s
        else:
            s_hi = s // W
            s_lo = s % W
        h = tl.load(x_ptr + x_base + (s_hi * x_sh + s_lo * x_sw)[:, None], mask=mask, other=0.0).to(acc_ty)
        if HAS_SKIP:
            k = tl.load(skip_ptr + k_base + (s_hi * k_sh + s_lo * k_sw)[:, None], mask=mask, other=0.0).to(acc_ty)
            h += a[None, :] * k
        dy = tl.load(dy_ptr + dy_base + (s_hi * dy_sh + s_lo * dy_sw)[:, None], mask=mask, other=0.0).to(acc_ty)
        xhat = (h - mu[None, :]) * r[None, :]
        z = xhat * gam[None, :] + bet[None, :]
        dz = dy * activation_grad(z, ACT, slope)  # masked lanes: dy = 0
        acc_dz += dz
        acc_dzx += dz * xhat
    tl.store(psum_dz_ptr + row * C + c, tl.sum(acc_dz, axis=0), mask=c_mask)
    tl.store(psum_dzx_ptr + row * C + c, tl.sum(acc_dzx, axis=0), mask=c_mask)


@triton.jit
def _group_norm_act_backward_finalize_kernel(
    psum_dz_ptr, psum_dzx_ptr, w_ptr, sums_ptr, m1_ptr, m2_ptr,
    N, C, G, CG, S, num_chunks, w_sc,
    HAS_WEIGHT: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    pid = tl.program_id(0)  # = n · G + g
    n = pid // G
    g = pid % G
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    grp_dz = tl.zeros([BLOCK_CG], dtype=acc_ty)
    grp_dzx = tl.zeros([BLOCK_CG], dtype=acc_ty)
    for c0 in range(0, CG, BLOCK_CG):
        cc = c0 + tl.arange(0, BLOCK_CG)
        cm = cc < CG
        ch = g * CG + cc
        sum_dz = tl.zeros([BLOCK_CG], dtype=acc_ty)
        sum_dzx = tl.zeros([BLOCK_CG], dtype=acc_ty)
        for k0 in range(0, num_chunks, BLOCK_K):  # fixed order: deterministic
            k = k0 + tl.arange(0, BLOCK_K)
            mask = (k < num_chunks)[:, None] & cm[None, :]
            off = (n * num_chunks + k)[:, None] * C + ch[None, :]
            sum_dz += tl.sum(tl.load(psum_dz_ptr + off, mask=mask, other=0.0), axis=0)
            sum_dzx += tl.sum(tl.load(psum_dzx_ptr + off, mask=mask, other=0.0), axis=0)
        # Per-(n, c) sums; the host sums them over N into dβ (row 0) and dγ (row 1).
        tl.store(sums_ptr + n * C + ch, sum_dz, mask=cm)
        tl.store(sums_ptr + N * C + n * C + ch, sum_dzx, mask=cm)
        if HAS_WEIGHT:
            gam = tl.load(w_ptr + ch * w_sc, mask=cm, other=0.0).to(acc_ty)
            grp_dz += gam * sum_dz  # Σ_group g = Σ_c γ_c Σ dz
            grp_dzx += gam * sum_dzx  # Σ_group g·x̂ = Σ_c γ_c Σ dz·x̂
        else:
            grp_dz += sum_dz
            grp_dzx += sum_dzx
    count = tl.cast(CG, acc_ty) * tl.cast(S, acc_ty)
    tl.store(m1_ptr + pid, tl.sum(grp_dz, axis=0) / count)
    tl.store(m2_ptr + pid, tl.sum(grp_dzx, axis=0) / count)


@triton.jit
def _group_norm_act_backward_dx_kernel(
    dy_ptr, x_ptr, skip_ptr, gate_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, m1_ptr, m2_ptr,
    dx_ptr, dskip_ptr, pgate_ptr,
    C, S, W, G, CG, num_chunks, S_PER_PROG, slope_hi, slope_lo,
    dy_sn, dy_sc, dy_sh, dy_sw,
    x_sn, x_sc, x_sh, x_sw,
    k_sn, k_sc, k_sh, k_sw,
    dx_sn, dx_sc, dx_sh, dx_sw,
    dk_sn, dk_sc, dk_sh, dk_sw,
    gate_sc, w_sc, b_sc,
    HAS_SKIP: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DSKIP: tl.constexpr, NEED_DGATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row, n, s_begin, c, c_mask = chunk_program(C, num_chunks, S_PER_PROG, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    slope = acc_scalar(slope_hi, slope_lo, ACC_FP64)
    mu = _group_stats(mean_ptr, n, G, c, c_mask, CG)
    r = _group_stats(rstd_ptr, n, G, c, c_mask, CG)
    m1 = _group_stats(m1_ptr, n, G, c, c_mask, CG)
    m2 = _group_stats(m2_ptr, n, G, c, c_mask, CG)
    gam, bet = load_affine(w_ptr, b_ptr, c, c_mask, w_sc, b_sc, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
    x_base = n * x_sn + c[None, :] * x_sc
    k_base = n * k_sn + c[None, :] * k_sc
    dy_base = n * dy_sn + c[None, :] * dy_sc
    dx_base = n * dx_sn + c[None, :] * dx_sc
    dk_base = n * dk_sn + c[None, :] * dk_sc

    acc_gate = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for i in range(0, S_PER_PROG, BLOCK_S):
        s = s_begin + i + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_mask[None, :]
        if MERGED_HW:
            s_hi = s * 0
            s_lo = s
        else:
            s_hi = s // W
            s_lo = s % W
        h = tl.load(x_ptr + x_base + (s_hi * x_sh + s_lo * x_sw)[:, None], mask=mask, other=0.0).to(acc_ty)
        if HAS_SKIP:
            k = tl.load(skip_ptr + k_base + (s_hi * k_sh + s_lo * k_sw)[:, None], mask=mask, other=0.0).to(acc_ty)
            h += a[None, :] * k
        dy = tl.load(dy_ptr + dy_base + (s_hi * dy_sh + s_lo * dy_sw)[:, None], mask=mask, other=0.0).to(acc_ty)
        xhat = (h - mu[None, :]) * r[None, :]
        z = xhat * gam[None, :] + bet[None, :]
        dz = dy * activation_grad(z, ACT, slope)
        dh = r[None, :] * (gam[None, :] * dz - m1[None, :] - xhat * m2[None, :])
        if NEED_DX:
            tl.store(dx_ptr + dx_base + (s_hi * dx_sh + s_lo * dx_sw)[:, None],
                     dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DSKIP:
            tl.store(dskip_ptr + dk_base + (s_hi * dk_sh + s_lo * dk_sw)[:, None],
                     (a[None, :] * dh).to(dskip_ptr.dtype.element_ty), mask=mask)
        if NEED_DGATE:
            acc_gate += dh * k  # masked lanes: k = 0
    if NEED_DGATE:
        tl.store(pgate_ptr + row * C + c, tl.sum(acc_gate, axis=0), mask=c_mask)


# --------------------------------------------------------------------------------------------
# Host-side launchers (no validation: fusedskip.ops.group_norm_act does that before any launch)
# --------------------------------------------------------------------------------------------
def reduce_plan(t: torch.Tensor) -> launch.ReducePlan:
    """Tile and S-split of the reduction passes for a [N, C, H, W] tensor (``launch.reduce_plan``
    with tiles of ~REDUCE_TILE elements): ``chunks > 1`` is the split reduction for small N·G."""
    return launch.reduce_plan(t, launch.target_programs(t), REDUCE_TILE)


def group_norm_act_forward(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    num_groups: int, eps: float, act_id: int, slope: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``: y = act(GN(h)) in x's dtype and layout, h = x (+ gate ⊙ skip);
    mean/rstd [N, G] in fp32 (fp64 for fp64 x). ``gate``: 1 or C values in that dtype."""
    n, c, hh, ww = x.shape
    s = hh * ww
    g = num_groups
    acc = acc_dtype(x)
    y = empty_like_layout(x)
    if x.numel() == 0:
        mean = torch.zeros((n, g), dtype=acc, device=x.device)
        rstd = torch.full((n, g), 1.0 / float(np.sqrt(eps)) if eps > 0 else float("inf"), dtype=acc, device=x.device)
        return y, mean, rstd
    has_skip = skip is not None
    skip_arg = skip if has_skip else x
    gate_arg = gate if has_skip else x
    tensors = [x, y] + ([skip] if has_skip else [])
    merged = all_spatial_mergeable(tensors)
    int64 = needs_int64(*tensors)
    acc_fp64 = acc == torch.float64
    plan = reduce_plan(x)
    pmean = torch.empty((n * plan.chunks, c), dtype=acc, device=x.device)
    pm2 = torch.empty((n * plan.chunks, c), dtype=acc, device=x.device)
    mean = torch.empty((n, g), dtype=acc, device=x.device)
    rstd = torch.empty((n, g), dtype=acc, device=x.device)
    block_k, block_cg = finalize_blocks(plan.chunks, c // g)
    with device_guard(x):
        _group_norm_act_stats_kernel[(n * plan.chunks, plan.c_blocks)](
            x, skip_arg, gate_arg, pmean, pm2,
            c, s, ww, plan.chunks, plan.s_per_chunk,
            *kernel_strides(x, merged), *kernel_strides(skip_arg, merged), vector_stride(gate),
            HAS_SKIP=has_skip, MERGED_HW=merged, INT64=int64, ACC_FP64=acc_fp64,
            BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, num_warps=4,
        )
        _group_norm_stats_finalize_kernel[(n * g,)](
            pmean, pm2, mean, rstd,
            c, g, c // g, s, plan.chunks, plan.s_per_chunk, *split_fp64(eps),
            ACC_FP64=acc_fp64, BLOCK_K=block_k, BLOCK_CG=block_cg, num_warps=4,
        )
        _group_norm_act_apply_kernel[tile_grid(n, s, c)](
            x, skip_arg, gate_arg,
            weight if weight is not None else x, bias if bias is not None else x,
            mean, rstd, y,
            c, s, ww, g, c // g, *split_fp64(slope),
            *kernel_strides(x, merged), *kernel_strides(skip_arg, merged), *kernel_strides(y, merged),
            vector_stride(gate), vector_stride(weight), vector_stride(bias),
            HAS_SKIP=has_skip, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act_id,
            MERGED_HW=merged, CHANNELS_INNER=channels_inner(x), INT64=int64, ACC_FP64=acc_fp64,
        )
    return y, mean, rstd


def group_norm_act_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    skip: Optional[torch.Tensor], gate: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    num_groups: int, act_id: int, slope: float,
    need_dx: bool, need_dskip: bool, need_dgate: bool, need_dweight: bool, need_dbias: bool,
) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dx, dskip, dgate, dweight, dbias)``; ``None`` for gradients not asked for.

    dx (= d_up) and dskip have x's / skip's layout and dtype, dgate the gate's shape and dtype,
    dweight / dbias the parameters' dtype. ``grad`` may have any strides (expanded, sliced).
    """
    has_skip = skip is not None
    need_dskip = need_dskip and has_skip
    need_dgate = need_dgate and has_skip
    need_dweight = need_dweight and weight is not None
    need_dbias = need_dbias and bias is not None
    n, c, hh, ww = x.shape
    s = hh * ww
    g = num_groups
    acc = acc_dtype(x)
    dx = empty_like_layout(x) if need_dx else None
    dskip = empty_like_layout(skip) if need_dskip else None
    if x.numel() == 0:
        dgate = torch.zeros_like(gate) if need_dgate else None
        dweight = torch.zeros_like(weight) if need_dweight else None
        dbias = torch.zeros_like(bias) if need_dbias else None
        return dx, dskip, dgate, dweight, dbias
    if not (need_dx or need_dskip or need_dgate or need_dweight or need_dbias):
        return None, None, None, None, None

    skip_arg = skip if has_skip else x
    gate_arg = gate if has_skip else x
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    tensors = [grad, x] + ([skip] if has_skip else []) + ([dx] if need_dx else []) + ([dskip] if need_dskip else [])
    merged = all_spatial_mergeable(tensors)
    int64 = needs_int64(*tensors)
    acc_fp64 = acc == torch.float64
    plan = reduce_plan(x)
    slope_hi, slope_lo = split_fp64(slope)
    common = dict(HAS_SKIP=has_skip, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act_id,
                  MERGED_HW=merged, INT64=int64, ACC_FP64=acc_fp64,
                  BLOCK_S=plan.block_s, BLOCK_C=plan.block_c, num_warps=4)
    psum_dz = torch.empty((n * plan.chunks, c), dtype=acc, device=x.device)
    psum_dzx = torch.empty((n * plan.chunks, c), dtype=acc, device=x.device)
    sums = torch.empty((2, n, c), dtype=acc, device=x.device)  # [Σ dz, Σ dz·x̂] per (n, c)
    m1 = torch.empty((n, g), dtype=acc, device=x.device)
    m2 = torch.empty((n, g), dtype=acc, device=x.device)
    block_k, block_cg = finalize_blocks(plan.chunks, c // g)
    need_dh = need_dx or need_dskip or need_dgate
    pgate = torch.empty((n * plan.chunks, c), dtype=acc, device=x.device) if need_dgate else None

    with device_guard(x):
        _group_norm_act_backward_reduce_kernel[(n * plan.chunks, plan.c_blocks)](
            grad, x, skip_arg, gate_arg, w_arg, b_arg, mean, rstd, psum_dz, psum_dzx,
            c, s, ww, g, c // g, plan.chunks, plan.s_per_chunk, slope_hi, slope_lo,
            *kernel_strides(grad, merged), *kernel_strides(x, merged), *kernel_strides(skip_arg, merged),
            vector_stride(gate), vector_stride(weight), vector_stride(bias),
            **common,
        )
        _group_norm_act_backward_finalize_kernel[(n * g,)](
            psum_dz, psum_dzx, w_arg, sums, m1, m2,
            n, c, g, c // g, s, plan.chunks, vector_stride(weight),
            HAS_WEIGHT=weight is not None, ACC_FP64=acc_fp64, BLOCK_K=block_k, BLOCK_CG=block_cg, num_warps=4,
        )
        if need_dh:
            dx_arg = dx if need_dx else x  # never written when NEED_DX is off
            dskip_arg = dskip if need_dskip else x
            _group_norm_act_backward_dx_kernel[(n * plan.chunks, plan.c_blocks)](
                grad, x, skip_arg, gate_arg, w_arg, b_arg, mean, rstd, m1, m2,
                dx_arg, dskip_arg, pgate if need_dgate else psum_dz,
                c, s, ww, g, c // g, plan.chunks, plan.s_per_chunk, slope_hi, slope_lo,
                *kernel_strides(grad, merged), *kernel_strides(x, merged), *kernel_strides(skip_arg, merged),
                *kernel_strides(dx_arg, merged), *kernel_strides(dskip_arg, merged),
                vector_stride(gate), vector_stride(weight), vector_stride(bias),
                NEED_DX=need_dx, NEED_DSKIP=need_dskip, NEED_DGATE=need_dgate,
                **common,
            )

    dweight = dbias = dgate = None
    if need_dweight or need_dbias:
        # Fixed-order host reductions over N (separate tensors: outputs must not alias).
        dbias = sums[0].sum(dim=0).to(bias.dtype) if need_dbias else None
        dweight = sums[1].sum(dim=0).to(weight.dtype) if need_dweight else None
    if need_dgate:
        dgate = gate_gradient(pgate.sum(dim=0), gate)
    return dx, dskip, dgate, dweight, dbias
