"""GroupNorm + activation, optionally fused with a gated additive skip, forward and backward.

Computes ``y = act(γ ⊙ x̂ + β)`` with ``x̂ = (h − μ_{n,g}) · rstd_{n,g}`` over the groups of a 4-D
input ``h`` [N, C, H, W]; ``h = x`` or, with a skip (constexpr ``HAS_SKIP``),
``h = up + a ⊙ skip`` with the gate ``a`` (1 or C values), which is never materialised.

Tensors are walked as [N, C, S] (S = H·W) through their own strides: NCHW, channels_last and any
strided view run without layout copies. Two designs, chosen per call by :func:`single_pass_tile`:

**Single pass** (a group fits on chip). One program per (n, GP consecutive groups) loads its
groups once as one [BLOCK_S, GP·BLOCK_CG] register tile (BLOCK_S ≥ S, BLOCK_CG ≥ C/G), computes
the statistics there, normalises, applies the activation and writes:
  forward   1 launch: reads x (and skip) once, writes y: the 2-pass minimum (3 with skip);
  backward  1 launch: reads x (skip), dy once, writes dx (d_skip): the 3-pass minimum (5 with
            skip); its last program to finish sums dγ, dβ and the gate's gradient.
Statistics are two-level and exact in registers: per-channel sums over S, then per-group sums of
those, about the group's first element (so a constant group has exactly its value as mean and
normalises to exactly β), and the variance as the mean squared deviation from that mean (no
E[x²] − E[x]²). GP > 1 (channels_last only) widens each row of the tile towards 16 channels
(32 contiguous bytes in bf16) while GP divides G and the rule below still holds.
Rule (documented here, tested on both sides in tests/test_group_norm_act.py): single pass when
the padded tile BLOCK_S·GP·BLOCK_CG fits on chip, forward ≤ ``SINGLE_PASS_MAX_ELEMS`` (32 K
elements = 64 KB in bf16: one live fp32 tile, 64 elements a thread at 16 warps, 128 registers),
backward ≤ ``SINGLE_PASS_BWD_MAX_ELEMS`` (16 K: two live fp32 tiles, x̂ and dz, at 16 warps;
the gate's sums are taken while the skip tile is live so that it dies early), and either
N·G/GP ≥ the number of SMs (the grid fills the device) or the tile is at most
``SMALL_GROUP_ELEMS`` (one program's work is then below a launch's latency, so the split
design's extra launches cost more than its parallelism gains). Otherwise the split design. The
two passes decide independently (only mean and rstd pass between them). Measured for sm_90
(``triton.compile`` + ptxas, bf16 channels_last, 16×128×64×64, G = 32): forward 128 registers,
no spill; backward 128 registers, no spill (48 bytes of stack with a skip).

**Split** (groups too large for the chip, or too few of them). Every reduction is first *per
channel* over a chunk of S, merged per group by a tiny finalize kernel:
  forward:  stats (grid (N·chunks, C-blocks), per-lane Welford, Chan-merged) → finalize (grid
            N·G: mean, rstd) → apply (grid (N·S-tiles, C-blocks), autotuned). 2 reads + 1 write.
  backward: reduce (per-channel Σ dz, Σ dz·x̂ over S-chunks) → finalize (per-(n, c) sums and the
            per-group means m1 = mean(g), m2 = mean(g·x̂)) → dx (dh, d_skip, gate partials).
  ``chunks > 1`` splits S for small N·G.

Backward formulas (only h's inputs and fp32 (mean, rstd) are saved; z and act'(z) are recomputed):
with dz = dy·act'(z), g = γ·dz and means over the M = (C/G)·S elements of a group,
  dh = rstd·(g − mean(g) − x̂·mean(g·x̂)),   dγ_c = Σ dz·x̂,   dβ_c = Σ dz,
  d_up = dh,   d_skip = a·dh,   d_a = Σ dh·skip.
Both designs write per-(n, c) (single pass) or per-(n·chunk, c) (split) partials of dβ, dγ and
d_a and sum them in a fixed order (deterministic, no float atomics) straight into the parameters'
and the gate's gradients: no host-side torch ops. The single pass does it in its last program
(an int32 ticket counts finished programs), the split design in ``_group_norm_act_param_grad_kernel``.

Optional operands after the norm (constexpr flags HAS_RES, HAS_SCALE, HAS_SHIFT; ACT = PRELU),
any combination, also with the skip: ``u = z·(1 + scale) + shift + residual``, ``y = act(u)``, with
z = γ ⊙ x̂ + β as above, ``scale``/``shift`` one value per (n, c) (diffusers' time-embedding
"scale_shift") and ``residual`` a tensor of x's shape (``act(norm(x) + residual)``: MONAI
UnetResBlock, ResNet blocks). Folded into an effective per-(n, c) affine γ' = γ·(1 + scale),
β' = β·(1 + scale) + shift, so every formula above holds with γ', β' and u in place of γ, β and z
(the backward recomputes u from x and the residual). With du = dy·act'(u), A = Σ_S du·x̂ and
B = Σ_S du per (n, c):
  d_residual = du (single pass: written beside dx; split: written by the reduce pass, and the dx
  pass reads it in place of dy and the residual, 7 passes instead of 8; for the identity
  activation the autograd Function returns dy itself and asks the kernels for no d_residual, and
  then no kernel reads the residual),   d_shift = B,   d_scale = γ·A + β·B
  (both per (n, c), written in-kernel: the single pass by each program, the split design by its
  finalize kernel),   dγ_c = Σ_n (1 + scale)·A,   dβ_c = Σ_n (1 + scale)·B (the per-(n, c) partials
  are stored pre-multiplied by 1 + scale and summed as before).
PReLU (ACT = PRELU) takes its learned slope ``act_weight`` (1 or C values) from memory; its
gradient Σ dy·u over u ≤ 0 (``prelu_slope_grad``) per channel is one more partial next to dγ/dβ
(per (n, c) in the single pass, per (n·chunk, c) in the split reduce pass), summed by the same
fixed-order code (over the channels too for a single slope). No float atomics anywhere.
Without these operands every kernel compiles to the same PTX instructions as before they existed
(checked for sm_90 on 72 variants: both designs, fp32/bf16, NCHW/channels_last, with/without skip;
param loads and register numbering aside). Measured for sm_90 like the rule below (bf16
channels_last 16×128×64×64, G = 32, 16 warps, 128 registers): single-pass spill stores per thread,
forward / backward: residual 0 / 96 B, scale + shift 0 / 0 B, residual + scale + shift + PReLU(C)
8 / 108 B, the same with the gated skip 20 / 380 B (without operands: 0 / 0 B, 48 B with the skip).
The single-pass rule does not (yet) take the operands into account.

Accumulation is fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs (gradcheck). Float scalars
(eps, slope) arrive as an fp32 (hi, lo) pair and are rebuilt in the accumulation dtype in-kernel.

Arguments (the scheme of every kernel file): pointers first, then scalars, then constexprs. A
tensor ``t`` is ``t_ptr`` with strides ``t_sn, t_sc, t_sh, t_sw`` ([N, C, H, W]; ``t_sw`` carries
the merged spatial stride under ``MERGED_HW``); a per-channel vector ``v`` is ``v_ptr`` with stride
``v_sc`` (0 broadcasts one value). Tensors: x (= up), skip, grad (= dy), out (= y), dx, dskip;
vectors: gate (a), weight (γ), bias (β), aw (PReLU's slope); per-(n, c) values ``v`` (scale,
shift) are ``v_ptr`` with strides ``v_sn, v_sc``; residual is ``res`` (its gradient ``dres``);
statistics and partials are dense fp32/fp64 buffers; dscale / dshift are dense [N, C].
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from . import launch
from .activations import IDENTITY, PRELU, activation, activation_grad, prelu_slope_grad
from .common import acc_scalar, chunk_program, load_affine, merge_partials, tile_program
from .launch import (
    FIXED_TILE,
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
    needs_int64,
    signature,
    split_fp64,
    tickets,
    tile_configs,
    tile_grid,
    vector_stride,
)

# Elements per tile of the split reduction passes (per-lane accumulators live in registers: 3 per
# element for Welford, 2 for the backward sums). Tests shrink it to force many chunks.
REDUCE_TILE = 2048
# The single-pass rule (see the module docstring); tests set them to force either design.
SINGLE_PASS_MAX_ELEMS = 32768
SINGLE_PASS_BWD_MAX_ELEMS = 16384
SMALL_GROUP_ELEMS = 4096
# Single-pass tile elements per thread: sets num_warps (4..16).
SINGLE_PASS_ELEMS_PER_THREAD = 16
MAX_WARPS = 16


# --------------------------------------------------------------------------------------------
# Kernels. Program prologues come from kernels/common.py; loads and offsets in the tile loops
# are written inline rather than through jit helpers: under TRITON_INTERPRET=1 every helper
# call costs ~0.5 ms, which per tile would dominate the CPU tests; compiled, both are the same.
#
# Spatial offsets: s = h·W + w. When every tensor's (H, W) merge (MERGED_HW), s_hi = 0 and
# s_lo = s with the merged stride in the w slot; otherwise s_hi = h, s_lo = w (one div/mod per
# tile shared by all tensors). The offset of a tensor is n·sn + c·sc + s_hi·sh + s_lo·sw.
# --------------------------------------------------------------------------------------------
# Single pass
# --------------------------------------------------------------------------------------------
@triton.jit
def _group_tile_program(S, G, CG, GP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr,
                        CG_EXACT: tl.constexpr, INT64: tl.constexpr):
    """Prologue of the single-pass kernels, grid (N · G/GP,): program = (n, GP groups from g0).
    Returns ``(n, g0, s, c, c_mask, mask)``: the tile's spatial indices [BLOCK_S], channels
    [GP·BLOCK_CG] (group-major; padded channels of a group are masked) and the in-bounds masks."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    g_blocks = G // GP  # GP divides G
    n = pid // g_blocks
    g0 = (pid % g_blocks) * GP
    col = tl.arange(0, GP * BLOCK_CG)
    s = tl.arange(0, BLOCK_S)
    if CG_EXACT:  # BLOCK_CG == C/G: the channels are one contiguous run (vectorisable)
        c = g0 * CG + col
        c_mask = col < GP * BLOCK_CG
    else:
        c = (g0 + col // BLOCK_CG) * CG + col % BLOCK_CG
        c_mask = col % BLOCK_CG < CG
    mask = (s < S)[:, None] & c_mask[None, :]
    return n, g0, s, c, c_mask, mask


@triton.jit
def _per_group(v, GP: tl.constexpr, BLOCK_CG: tl.constexpr):
    """[GP·BLOCK_CG] per-channel values → [GP] per-group sums."""
    return tl.sum(tl.reshape(v, (GP, BLOCK_CG)), axis=1)


@triton.jit
def _to_channels(v, GP: tl.constexpr, BLOCK_CG: tl.constexpr):
    """[GP] per-group values → [GP·BLOCK_CG], each repeated over its group's channels."""
    return tl.reshape(tl.broadcast_to(v[:, None], (GP, BLOCK_CG)), (GP * BLOCK_CG,))


@triton.jit
def _modulate(gam, bet, scale_ptr, shift_ptr, n, c, c_mask, scale_sn, scale_sc, shift_sn, shift_sc,
              HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACC_FP64: tl.constexpr):
    """The effective affine of sample n's channels c: ``(γ·m, β·m + shift[n, c], m)`` with
    m = 1 + scale[n, c] (per-(n, c) values, strides sn, sc); without the operands γ and β come back
    unchanged (no extra arithmetic) and m = 1."""
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    if HAS_SCALE:
        mod = 1.0 + tl.load(scale_ptr + n * scale_sn + c * scale_sc, mask=c_mask, other=0.0).to(acc_ty)
        gam = gam * mod
        bet = bet * mod
    else:
        mod = tl.full(gam.shape, 1.0, acc_ty)
    if HAS_SHIFT:
        bet = bet + tl.load(shift_ptr + n * shift_sn + c * shift_sc, mask=c_mask, other=0.0).to(acc_ty)
    return gam, bet, mod


@triton.jit
def _act_slope(slope_hi, slope_lo, aw_ptr, c, c_mask, aw_sc, ACT: tl.constexpr, ACC_FP64: tl.constexpr):
    """The activation's slope: for PRELU the learned slope of channels c as a [1, len(c)] row
    (aw_sc = 0 broadcasts a single slope), else the host scalar (LeakyReLU's slope, ELU's alpha)."""
    if ACT == PRELU:
        acc_ty = tl.float64 if ACC_FP64 else tl.float32
        return tl.load(aw_ptr + c * aw_sc, mask=c_mask, other=0.0).to(acc_ty)[None, :]
    else:
        return acc_scalar(slope_hi, slope_lo, ACC_FP64)


@triton.jit
def _group_norm_act_fused_kernel(
    x_ptr, skip_ptr, gate_ptr, weight_ptr, bias_ptr, res_ptr, scale_ptr, shift_ptr, aw_ptr,
    out_ptr, mean_ptr, rstd_ptr,
    S, W, G, CG, eps_hi, eps_lo, slope_hi, slope_lo,
    x_sn, x_sc, x_sh, x_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    res_sn, res_sc, res_sh, res_sw,
    out_sn, out_sc, out_sh, out_sw,
    gate_sc, weight_sc, bias_sc, scale_sn, scale_sc, shift_sn, shift_sc, aw_sc,
    HAS_SKIP: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
    MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr, CG_EXACT: tl.constexpr,
    GP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    """Single-pass forward: y = act(GN(x [+ a·skip])·(1 + scale) + shift + residual) and the group
    statistics (mean, rstd).

    Grid (N · G/GP,); each program holds GP whole groups in registers. Pointers: x, skip, res
    (residual, read), y (written); gate / w / b / aw (PReLU slope) per-channel vectors; scale /
    shift per-(n, c) values; mean / rstd [N, G] outputs. Strides per tensor as the module
    docstring names them."""
    n, g0, s, c, c_mask, mask = _group_tile_program(S, G, CG, GP, BLOCK_S, BLOCK_CG, CG_EXACT, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    eps = acc_scalar(eps_hi, eps_lo, ACC_FP64)
    slope = _act_slope(slope_hi, slope_lo, aw_ptr, c, c_mask, aw_sc, ACT, ACC_FP64)
    gam, bet = load_affine(weight_ptr, bias_ptr, c, c_mask, weight_sc, bias_sc, HAS_WEIGHT, HAS_BIAS, ACC_FP64,
                           GP * BLOCK_CG)
    gam, bet, _ = _modulate(gam, bet, scale_ptr, shift_ptr, n, c, c_mask, scale_sn, scale_sc, shift_sn, shift_sc,
                            HAS_SCALE, HAS_SHIFT, ACC_FP64)
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
        k = tl.load(skip_ptr + n * skip_sn + c[None, :] * skip_sc + (s_hi * skip_sh + s_lo * skip_sw)[:, None],
                    mask=mask, other=0.0).to(acc_ty)
        h += a[None, :] * k
    # Exact two-level statistics about each group's first element h[s=0, first channel].
    first = tl.sum(tl.where((s == 0)[:, None], h, 0.0), axis=0)
    ref_g = tl.sum(tl.where(tl.arange(0, BLOCK_CG)[None, :] == 0, tl.reshape(first, (GP, BLOCK_CG)), 0.0), axis=1)
    count = tl.cast(CG, acc_ty) * tl.cast(S, acc_ty)
    dev = tl.where(mask, h - _to_channels(ref_g, GP, BLOCK_CG)[None, :], 0.0)
    mean_g = ref_g + _per_group(tl.sum(dev, axis=0), GP, BLOCK_CG) / count
    mu = _to_channels(mean_g, GP, BLOCK_CG)
    dev = tl.where(mask, h - mu[None, :], 0.0)
    var_g = _per_group(tl.sum(dev * dev, axis=0), GP, BLOCK_CG) / count
    rstd_g = 1.0 / tl.sqrt(var_g + eps)  # NaN from a non-finite group propagates
    gi = n * G + g0 + tl.arange(0, GP)
    tl.store(mean_ptr + gi, mean_g)
    tl.store(rstd_ptr + gi, rstd_g)
    # The same u formula as the backward recomputation, so act'(u) matches the forward exactly.
    xhat = (h - mu[None, :]) * _to_channels(rstd_g, GP, BLOCK_CG)[None, :]
    u = xhat * gam[None, :] + bet[None, :]
    if HAS_RES:
        u += tl.load(res_ptr + n * res_sn + c[None, :] * res_sc + (s_hi * res_sh + s_lo * res_sw)[:, None],
                     mask=mask, other=0.0).to(acc_ty)
    y = activation(u, ACT, slope)
    tl.store(out_ptr + n * out_sn + c[None, :] * out_sc + (s_hi * out_sh + s_lo * out_sw)[:, None],
             y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_act_backward_fused_kernel(
    grad_ptr, x_ptr, skip_ptr, gate_ptr, weight_ptr, bias_ptr, res_ptr, scale_ptr, shift_ptr, aw_ptr,
    mean_ptr, rstd_ptr, dx_ptr, dskip_ptr, dres_ptr, sums_ptr, pgate_ptr, pslope_ptr,
    dweight_ptr, dbias_ptr, dgate_ptr, dscale_ptr, dshift_ptr, dslope_ptr, ticket_ptr,
    N, C, S, W, G, CG, slope_hi, slope_lo,
    grad_sn, grad_sc, grad_sh, grad_sw,
    x_sn, x_sc, x_sh, x_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    res_sn, res_sc, res_sh, res_sw,
    dx_sn, dx_sc, dx_sh, dx_sw,
    dskip_sn, dskip_sc, dskip_sh, dskip_sw,
    dres_sn, dres_sc, dres_sh, dres_sw,
    gate_sc, weight_sc, bias_sc, scale_sn, scale_sc, shift_sn, shift_sc, aw_sc,
    HAS_SKIP: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
    MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr, CG_EXACT: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DSKIP: tl.constexpr, NEED_DGATE: tl.constexpr, NEED_DRES: tl.constexpr,
    NEED_DWEIGHT: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr,
    NEED_DSLOPE: tl.constexpr, SCALAR_GATE: tl.constexpr, SCALAR_SLOPE: tl.constexpr,
    GP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_PC: tl.constexpr,
):
    """Single-pass backward: dx (= d_up), d_skip, d_residual (= du), d_scale and d_shift per (n, c),
    then dγ, dβ, the gate's and PReLU's slope gradients.

    Grid (N · G/GP,) as the forward. Pointers: grad, x, skip, res (read), dx, dskip, dres
    (written); gate / weight / bias / aw vectors; scale / shift per-(n, c) values; mean / rstd
    [N, G] from the forward; sums [2, N, C] ((1 + scale)·Σ du, (1 + scale)·Σ du·x̂ per (n, c)),
    pgate [N, C] (Σ dh·skip) and pslope [N, C] (Σ dy·u, u ≤ 0) partials; dweight, dbias, dgate,
    dslope outputs; dscale / dshift dense [N, C] outputs; an int32 ticket. Each program writes its
    rows of partials and draws a ticket; the program with the last ticket sums the partials in a
    fixed order (``_sum_param_partials``: deterministic, in the same launch) and resets the ticket."""
    n, g0, s, c, c_mask, mask = _group_tile_program(S, G, CG, GP, BLOCK_S, BLOCK_CG, CG_EXACT, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    slope = _act_slope(slope_hi, slope_lo, aw_ptr, c, c_mask, aw_sc, ACT, ACC_FP64)
    gam0, bet0 = load_affine(weight_ptr, bias_ptr, c, c_mask, weight_sc, bias_sc, HAS_WEIGHT, HAS_BIAS, ACC_FP64,
                             GP * BLOCK_CG)
    gam, bet, mod = _modulate(gam0, bet0, scale_ptr, shift_ptr, n, c, c_mask, scale_sn, scale_sc, shift_sn,
                              shift_sc, HAS_SCALE, HAS_SHIFT, ACC_FP64)
    gi = n * G + g0 + tl.arange(0, GP)
    mu = _to_channels(tl.load(mean_ptr + gi), GP, BLOCK_CG)
    r = _to_channels(tl.load(rstd_ptr + gi), GP, BLOCK_CG)
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
        k = tl.load(skip_ptr + n * skip_sn + c[None, :] * skip_sc + (s_hi * skip_sh + s_lo * skip_sw)[:, None],
                    mask=mask, other=0.0)  # kept in its own dtype (half the registers for fp16/bf16)
        h += a[None, :] * k.to(acc_ty)
    xhat = (h - mu[None, :]) * r[None, :]
    if NEED_DGATE:  # the k-only sums first, so that k is live only until Σ dz·k
        sum_k = tl.sum(k.to(acc_ty), axis=0)
        sum_xk = tl.sum(xhat * k.to(acc_ty), axis=0)
    dy = tl.load(grad_ptr + n * grad_sn + c[None, :] * grad_sc + (s_hi * grad_sh + s_lo * grad_sw)[:, None],
                 mask=mask, other=0.0).to(acc_ty)
    u = xhat * gam[None, :] + bet[None, :]
    if HAS_RES:
        u += tl.load(res_ptr + n * res_sn + c[None, :] * res_sc + (s_hi * res_sh + s_lo * res_sw)[:, None],
                     mask=mask, other=0.0).to(acc_ty)
    dz = dy * activation_grad(u, ACT, slope)  # masked lanes: dy = 0
    if NEED_DSLOPE:
        tl.store(pslope_ptr + n * C + c, tl.sum(prelu_slope_grad(dy, u), axis=0), mask=c_mask)
    sum_dz = tl.sum(dz, axis=0)
    sum_dzx = tl.sum(dz * xhat, axis=0)
    if NEED_DGATE:
        # Σ dh·skip = rstd·(γ·Σ dz·k − m1·Σ k − m2·Σ x̂·k), summed while k is live: the tile of k
        # dies here, leaving two live fp32 tiles (x̂, dz) for the rest of the program.
        sum_dzk = tl.sum(dz * k.to(acc_ty), axis=0)
    _store_nc_sums(sums_ptr, dscale_ptr, dshift_ptr, n, N, C, c, c_mask, sum_dz, sum_dzx, gam0, bet0, mod,
                   HAS_SCALE, NEED_DWEIGHT or NEED_DBIAS, NEED_DSCALE, NEED_DSHIFT)
    count = tl.cast(CG, acc_ty) * tl.cast(S, acc_ty)
    m1 = _to_channels(_per_group(gam * sum_dz, GP, BLOCK_CG) / count, GP, BLOCK_CG)
    m2 = _to_channels(_per_group(gam * sum_dzx, GP, BLOCK_CG) / count, GP, BLOCK_CG)
    if NEED_DGATE:
        tl.store(pgate_ptr + n * C + c, r * (gam * sum_dzk - m1 * sum_k - m2 * sum_xk), mask=c_mask)
    dh = r[None, :] * (gam[None, :] * dz - m1[None, :] - xhat * m2[None, :])
    if NEED_DX:
        tl.store(dx_ptr + n * dx_sn + c[None, :] * dx_sc + (s_hi * dx_sh + s_lo * dx_sw)[:, None],
                 dh.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DSKIP:
        tl.store(dskip_ptr + n * dskip_sn + c[None, :] * dskip_sc + (s_hi * dskip_sh + s_lo * dskip_sw)[:, None],
                 (a[None, :] * dh).to(dskip_ptr.dtype.element_ty), mask=mask)
    if NEED_DRES:
        tl.store(dres_ptr + n * dres_sn + c[None, :] * dres_sc + (s_hi * dres_sh + s_lo * dres_sw)[:, None],
                 dz.to(dres_ptr.dtype.element_ty), mask=mask)
    if NEED_DWEIGHT or NEED_DBIAS or NEED_DGATE or NEED_DSLOPE:
        ticket = tl.atomic_add(ticket_ptr, 1)  # acq_rel: every program's partials are visible to the last
        if ticket == tl.num_programs(0) - 1:
            _sum_param_partials(sums_ptr, pgate_ptr, pslope_ptr, dweight_ptr, dbias_ptr, dgate_ptr, dslope_ptr,
                                C, N, N, 0, BLOCK_PC, NEED_DWEIGHT, NEED_DBIAS, NEED_DGATE, SCALAR_GATE,
                                NEED_DSLOPE, SCALAR_SLOPE, ACC_FP64, BLOCK_R, BLOCK_PC)
            tl.store(ticket_ptr, 0)


@triton.jit
def _store_nc_sums(sums_ptr, dscale_ptr, dshift_ptr, n, N, C, c, c_mask, sum_dz, sum_dzx, gam, bet, mod,
                   HAS_SCALE: tl.constexpr, STORE_SUMS: tl.constexpr, NEED_DSCALE: tl.constexpr,
                   NEED_DSHIFT: tl.constexpr):
    """The per-(n, c) results of B = Σ du and A = Σ du·x̂ of sample n's channels c: the rows of
    sums [2, N, C] that dβ and dγ sum over N, as (1 + scale)·B and (1 + scale)·A (``mod``), and
    d_shift = B, d_scale = γ·A + β·B (γ, β the parameters, not the modulated ones) into the dense
    [N, C] outputs dshift, dscale (their dtypes)."""
    if STORE_SUMS:
        if HAS_SCALE:
            tl.store(sums_ptr + n * C + c, sum_dz * mod, mask=c_mask)
            tl.store(sums_ptr + N * C + n * C + c, sum_dzx * mod, mask=c_mask)
        else:
            tl.store(sums_ptr + n * C + c, sum_dz, mask=c_mask)
            tl.store(sums_ptr + N * C + n * C + c, sum_dzx, mask=c_mask)
    if NEED_DSHIFT:
        tl.store(dshift_ptr + n * C + c, sum_dz.to(dshift_ptr.dtype.element_ty), mask=c_mask)
    if NEED_DSCALE:
        tl.store(dscale_ptr + n * C + c, (gam * sum_dzx + bet * sum_dz).to(dscale_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _sum_rows(ptr, ROWS, C, c, c_mask, ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ over the ROWS rows of a dense [ROWS, C] partial buffer for channels c, in a fixed order."""
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    acc = tl.zeros([BLOCK_C], dtype=acc_ty)
    for r0 in range(0, ROWS, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < ROWS)[:, None] & c_mask[None, :]
        acc += tl.sum(tl.load(ptr + rows[:, None] * C + c[None, :], mask=m, other=0.0), axis=0)
    return acc


@triton.jit
def _sum_param_partials(sums_ptr, pgate_ptr, pslope_ptr, dweight_ptr, dbias_ptr, dgate_ptr, dslope_ptr,
                        C, SUM_ROWS, PART_ROWS, c_first, c_step,
                        NEED_DWEIGHT: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_DGATE: tl.constexpr,
                        SCALAR_GATE: tl.constexpr, NEED_DSLOPE: tl.constexpr, SCALAR_SLOPE: tl.constexpr,
                        ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dβ, dγ, the gate's and PReLU's slope gradients from the backward's partials, summed over
    rows in a fixed order (deterministic), for the channel blocks from c_first in steps of c_step
    (all of them, and a single-value gate's / slope's sum over channels, when one program runs it).
    Pointers: sums [2, SUM_ROWS, C] ((1 + scale)·Σ du, (1 + scale)·Σ du·x̂), pgate and pslope
    [PART_ROWS, C] (Σ dh·skip, Σ dy·u over u ≤ 0) in; dweight, dbias (C values, contiguous, the
    parameters' dtype), dgate and dslope (C values or one) out."""
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    gate_total = tl.zeros([BLOCK_C], dtype=acc_ty)
    slope_total = tl.zeros([BLOCK_C], dtype=acc_ty)
    for c0 in range(c_first, C, c_step):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        if NEED_DWEIGHT or NEED_DBIAS:
            acc_db = tl.zeros([BLOCK_C], dtype=acc_ty)
            acc_dw = tl.zeros([BLOCK_C], dtype=acc_ty)
            for r0 in range(0, SUM_ROWS, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                m = (rows < SUM_ROWS)[:, None] & c_mask[None, :]
                off = rows[:, None] * C + c[None, :]
                if NEED_DBIAS:
                    acc_db += tl.sum(tl.load(sums_ptr + off, mask=m, other=0.0), axis=0)
                if NEED_DWEIGHT:
                    acc_dw += tl.sum(tl.load(sums_ptr + SUM_ROWS * C + off, mask=m, other=0.0), axis=0)
            if NEED_DBIAS:
                tl.store(dbias_ptr + c, acc_db.to(dbias_ptr.dtype.element_ty), mask=c_mask)
            if NEED_DWEIGHT:
                tl.store(dweight_ptr + c, acc_dw.to(dweight_ptr.dtype.element_ty), mask=c_mask)
        if NEED_DGATE:
            acc_gate = _sum_rows(pgate_ptr, PART_ROWS, C, c, c_mask, ACC_FP64, BLOCK_R, BLOCK_C)
            if SCALAR_GATE:
                gate_total += acc_gate
            else:
                tl.store(dgate_ptr + c, acc_gate.to(dgate_ptr.dtype.element_ty), mask=c_mask)
        if NEED_DSLOPE:
            acc_slope = _sum_rows(pslope_ptr, PART_ROWS, C, c, c_mask, ACC_FP64, BLOCK_R, BLOCK_C)
            if SCALAR_SLOPE:
                slope_total += acc_slope
            else:
                tl.store(dslope_ptr + c, acc_slope.to(dslope_ptr.dtype.element_ty), mask=c_mask)
    if NEED_DGATE and SCALAR_GATE:
        tl.store(dgate_ptr, tl.sum(gate_total, axis=0).to(dgate_ptr.dtype.element_ty))
    if NEED_DSLOPE and SCALAR_SLOPE:
        tl.store(dslope_ptr, tl.sum(slope_total, axis=0).to(dslope_ptr.dtype.element_ty))


@triton.jit
def _group_norm_act_param_grad_kernel(
    sums_ptr, pgate_ptr, pslope_ptr, dweight_ptr, dbias_ptr, dgate_ptr, dslope_ptr,
    C, SUM_ROWS, PART_ROWS,
    NEED_DWEIGHT: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_DGATE: tl.constexpr, SCALAR_GATE: tl.constexpr,
    NEED_DSLOPE: tl.constexpr, SCALAR_SLOPE: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The split backward's dβ, dγ, gate and PReLU slope gradients (``_sum_param_partials``).
    Grid (programs,): program p sums channel blocks p, p + programs, … (one program for a
    single-value gate or slope). Pointers: sums [2, SUM_ROWS, C], pgate / pslope [PART_ROWS, C]
    in; dweight, dbias, dgate, dslope out."""
    pid = tl.program_id(0)
    _sum_param_partials(sums_ptr, pgate_ptr, pslope_ptr, dweight_ptr, dbias_ptr, dgate_ptr, dslope_ptr,
                        C, SUM_ROWS, PART_ROWS, pid * BLOCK_C, tl.num_programs(0) * BLOCK_C,
                        NEED_DWEIGHT, NEED_DBIAS, NEED_DGATE, SCALAR_GATE, NEED_DSLOPE, SCALAR_SLOPE,
                        ACC_FP64, BLOCK_R, BLOCK_C)


# --------------------------------------------------------------------------------------------
# Split design: forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _group_norm_act_stats_kernel(
    x_ptr, skip_ptr, gate_ptr, pmean_ptr, pm2_ptr,
    C, S, W, num_chunks, S_PER_PROG,
    x_sn, x_sc, x_sh, x_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    gate_sc,
    HAS_SKIP: tl.constexpr, MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split forward, pass 1: per-channel (mean, M2) of h = x [+ a·skip] over one S-chunk.

    Grid (N · chunks, C-blocks) (``chunk_program``). Pointers: x, skip (read), gate vector;
    pmean / pm2 [N · chunks, C] partial outputs (the count of a chunk is implied by its size)."""
    row, n, s_begin, c, c_mask = chunk_program(C, num_chunks, S_PER_PROG, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
    x_base = n * x_sn + c[None, :] * x_sc
    skip_base = n * skip_sn + c[None, :] * skip_sc

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
            k = tl.load(skip_ptr + skip_base + (s_hi * skip_sh + s_lo * skip_sw)[:, None],
                        mask=mask, other=0.0).to(acc_ty)
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
    """Split forward, pass 2: Chan-merges the chunks × C/G partials of one group → mean, rstd.

    Grid (N · G,). Pointers: pmean / pm2 [N · chunks, C] in; mean / rstd [N, G] out."""
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


@autotune(configs=tile_configs(), key=["C", "S", "CHANNELS_INNER", "INT64", "HAS_SKIP", "HAS_RES"], fixed=FIXED_TILE)
@triton.jit
def _group_norm_act_apply_kernel(
    x_ptr, skip_ptr, gate_ptr, weight_ptr, bias_ptr, res_ptr, scale_ptr, shift_ptr, aw_ptr, mean_ptr, rstd_ptr,
    out_ptr,
    C, S, W, G, CG, slope_hi, slope_lo,
    x_sn, x_sc, x_sh, x_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    res_sn, res_sc, res_sh, res_sw,
    out_sn, out_sc, out_sh, out_sw,
    gate_sc, weight_sc, bias_sc, scale_sn, scale_sc, shift_sn, shift_sc, aw_sc,
    HAS_SKIP: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
    MERGED_HW: tl.constexpr, CHANNELS_INNER: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split forward, pass 3: y = act((h − μ)·rstd·γ' + β' [+ residual]) for one tile,
    h = x [+ a·skip], γ' = γ·(1 + scale), β' = β·(1 + scale) + shift.

    Grid (N · S-tiles, C-tiles) (``tile_program``), autotuned tile. Pointers: x, skip, res
    (residual, read), y (written); gate / w / b / aw (PReLU slope) vectors; scale / shift
    per-(n, c) values; mean / rstd [N, G] from pass 2."""
    n, s, c, c_mask, mask = tile_program(S, C, BLOCK_S, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    slope = _act_slope(slope_hi, slope_lo, aw_ptr, c, c_mask, aw_sc, ACT, ACC_FP64)

    mu = _group_stats(mean_ptr, n, G, c, c_mask, CG)
    r = _group_stats(rstd_ptr, n, G, c, c_mask, CG)
    gam, bet = load_affine(weight_ptr, bias_ptr, c, c_mask, weight_sc, bias_sc, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
    gam, bet, _ = _modulate(gam, bet, scale_ptr, shift_ptr, n, c, c_mask, scale_sn, scale_sc, shift_sn, shift_sc,
                            HAS_SCALE, HAS_SHIFT, ACC_FP64)

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
        k = tl.load(skip_ptr + n * skip_sn + c[None, :] * skip_sc + (s_hi * skip_sh + s_lo * skip_sw)[:, None],
                    mask=mask, other=0.0).to(acc_ty)
        h += a[None, :] * k
    # The same u formula as the backward recomputation, so act'(u) matches the forward exactly.
    xhat = (h - mu[None, :]) * r[None, :]
    u = xhat * gam[None, :] + bet[None, :]
    if HAS_RES:
        u += tl.load(res_ptr + n * res_sn + c[None, :] * res_sc + (s_hi * res_sh + s_lo * res_sw)[:, None],
                     mask=mask, other=0.0).to(acc_ty)
    y = activation(u, ACT, slope)
    tl.store(out_ptr + n * out_sn + c[None, :] * out_sc + (s_hi * out_sh + s_lo * out_sw)[:, None],
             y.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Split design: backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _group_norm_act_backward_reduce_kernel(
    grad_ptr, x_ptr, skip_ptr, gate_ptr, weight_ptr, bias_ptr, res_ptr, scale_ptr, shift_ptr, aw_ptr,
    mean_ptr, rstd_ptr, psum_dz_ptr, psum_dzx_ptr, pslope_ptr, dres_ptr,
    C, S, W, G, CG, num_chunks, S_PER_PROG, slope_hi, slope_lo,
    grad_sn, grad_sc, grad_sh, grad_sw,
    x_sn, x_sc, x_sh, x_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    res_sn, res_sc, res_sh, res_sw,
    gate_sc, weight_sc, bias_sc, scale_sn, scale_sc, shift_sn, shift_sc, aw_sc,
    dres_sn, dres_sc, dres_sh, dres_sw,
    HAS_SKIP: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
    MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr, NEED_DSLOPE: tl.constexpr,
    NEED_DRES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split backward, pass 1: per-channel Σ du and Σ du·x̂ over one S-chunk (du = dy·act'(u),
    u = x̂·γ' + β' [+ residual]), and PReLU's slope partial Σ dy·u over u ≤ 0; with NEED_DRES it
    also writes d_residual = du, which pass 3 then reads in place of dy and the residual.

    Grid (N · chunks, C-blocks). Pointers: dy, x, skip, res (read); gate / w / b / aw vectors;
    scale / shift per-(n, c) values; mean / rstd [N, G]; psum_dz / psum_dzx / pslope
    [N · chunks, C] partial outputs; dres (written, any strides: its strides come last)."""
    row, n, s_begin, c, c_mask = chunk_program(C, num_chunks, S_PER_PROG, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    slope = _act_slope(slope_hi, slope_lo, aw_ptr, c, c_mask, aw_sc, ACT, ACC_FP64)
    mu = _group_stats(mean_ptr, n, G, c, c_mask, CG)
    r = _group_stats(rstd_ptr, n, G, c, c_mask, CG)
    gam, bet = load_affine(weight_ptr, bias_ptr, c, c_mask, weight_sc, bias_sc, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
    gam, bet, _ = _modulate(gam, bet, scale_ptr, shift_ptr, n, c, c_mask, scale_sn, scale_sc, shift_sn, shift_sc,
                            HAS_SCALE, HAS_SHIFT, ACC_FP64)
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
    x_base = n * x_sn + c[None, :] * x_sc
    skip_base = n * skip_sn + c[None, :] * skip_sc
    res_base = n * res_sn + c[None, :] * res_sc
    grad_base = n * grad_sn + c[None, :] * grad_sc
    dres_base = n * dres_sn + c[None, :] * dres_sc

    acc_dz = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    acc_dzx = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    acc_slope = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
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
            k = tl.load(skip_ptr + skip_base + (s_hi * skip_sh + s_lo * skip_sw)[:, None],
                        mask=mask, other=0.0).to(acc_ty)
            h += a[None, :] * k
        dy = tl.load(grad_ptr + grad_base + (s_hi * grad_sh + s_lo * grad_sw)[:, None], mask=mask, other=0.0).to(acc_ty)
        xhat = (h - mu[None, :]) * r[None, :]
        u = xhat * gam[None, :] + bet[None, :]
        if HAS_RES:
            u += tl.load(res_ptr + res_base + (s_hi * res_sh + s_lo * res_sw)[:, None],
                         mask=mask, other=0.0).to(acc_ty)
        dz = dy * activation_grad(u, ACT, slope)  # masked lanes: dy = 0
        acc_dz += dz
        acc_dzx += dz * xhat
        if NEED_DSLOPE:
            acc_slope += prelu_slope_grad(dy, u)
        if NEED_DRES:
            tl.store(dres_ptr + dres_base + (s_hi * dres_sh + s_lo * dres_sw)[:, None],
                     dz.to(dres_ptr.dtype.element_ty), mask=mask)
    tl.store(psum_dz_ptr + row * C + c, tl.sum(acc_dz, axis=0), mask=c_mask)
    tl.store(psum_dzx_ptr + row * C + c, tl.sum(acc_dzx, axis=0), mask=c_mask)
    if NEED_DSLOPE:
        tl.store(pslope_ptr + row * C + c, tl.sum(acc_slope, axis=0), mask=c_mask)


@triton.jit
def _group_norm_act_backward_finalize_kernel(
    psum_dz_ptr, psum_dzx_ptr, weight_ptr, bias_ptr, scale_ptr, sums_ptr, m1_ptr, m2_ptr, dscale_ptr, dshift_ptr,
    N, C, G, CG, S, num_chunks, weight_sc, bias_sc, scale_sn, scale_sc,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr,
    NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    """Split backward, pass 2: per-(n, c) B = Σ du, A = Σ du·x̂ → the rows of sums for dβ, dγ
    (times 1 + scale), d_shift = B and d_scale = γ·A + β·B; and the group means
    m1 = mean(γ'·du), m2 = mean(γ'·du·x̂) of one group (γ' = γ·(1 + scale)).

    Grid (N · G,). Pointers: psum_dz / psum_dzx [N · chunks, C] in; w / b vectors; scale
    per-(n, c) values; sums [2, N, C], m1 / m2 [N, G], dscale / dshift dense [N, C] out."""
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
        gam, bet = load_affine(weight_ptr, bias_ptr, ch, cm, weight_sc, bias_sc, HAS_WEIGHT, HAS_BIAS and NEED_DSCALE,
                               ACC_FP64, BLOCK_CG)
        gam_e, _, mod = _modulate(gam, bet, scale_ptr, scale_ptr, n, ch, cm, scale_sn, scale_sc, 0, 0,
                                  HAS_SCALE, False, ACC_FP64)
        # Per-(n, c) sums; _group_norm_act_param_grad_kernel sums them over N into dβ (row 0), dγ (row 1).
        _store_nc_sums(sums_ptr, dscale_ptr, dshift_ptr, n, N, C, ch, cm, sum_dz, sum_dzx, gam, bet, mod,
                       HAS_SCALE, True, NEED_DSCALE, NEED_DSHIFT)
        if HAS_WEIGHT or HAS_SCALE:
            grp_dz += gam_e * sum_dz  # Σ_group g = Σ_c γ'_c Σ du
            grp_dzx += gam_e * sum_dzx  # Σ_group g·x̂ = Σ_c γ'_c Σ du·x̂
        else:
            grp_dz += sum_dz
            grp_dzx += sum_dzx
    count = tl.cast(CG, acc_ty) * tl.cast(S, acc_ty)
    tl.store(m1_ptr + pid, tl.sum(grp_dz, axis=0) / count)
    tl.store(m2_ptr + pid, tl.sum(grp_dzx, axis=0) / count)


@triton.jit
def _group_norm_act_backward_dx_kernel(
    grad_ptr, x_ptr, skip_ptr, gate_ptr, weight_ptr, bias_ptr, res_ptr, scale_ptr, shift_ptr, aw_ptr,
    mean_ptr, rstd_ptr, m1_ptr, m2_ptr, dx_ptr, dskip_ptr, pgate_ptr,
    C, S, W, G, CG, num_chunks, S_PER_PROG, slope_hi, slope_lo,
    grad_sn, grad_sc, grad_sh, grad_sw,
    x_sn, x_sc, x_sh, x_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    res_sn, res_sc, res_sh, res_sw,
    dx_sn, dx_sc, dx_sh, dx_sw,
    dskip_sn, dskip_sc, dskip_sh, dskip_sw,
    gate_sc, weight_sc, bias_sc, scale_sn, scale_sc, shift_sn, shift_sc, aw_sc,
    HAS_SKIP: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
    MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DSKIP: tl.constexpr, NEED_DGATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Split backward, pass 3: dh = rstd·(γ'·du − m1 − x̂·m2) → dx, d_skip = a·dh, and per-chunk
    partials of the gate's gradient Σ dh·skip. du = dy·act'(u), recomputed with the residual (read
    only for u) — or, when the residual needs its gradient, pass 1's d_residual = du given as dy
    with the identity activation and no residual.

    Grid (N · chunks, C-blocks). Pointers: dy, x, skip, res (read), dx, dskip (written);
    gate / w / b / aw vectors; scale / shift per-(n, c) values; mean / rstd / m1 / m2 [N, G];
    pgate [N · chunks, C] partial output."""
    row, n, s_begin, c, c_mask = chunk_program(C, num_chunks, S_PER_PROG, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    slope = _act_slope(slope_hi, slope_lo, aw_ptr, c, c_mask, aw_sc, ACT, ACC_FP64)
    mu = _group_stats(mean_ptr, n, G, c, c_mask, CG)
    r = _group_stats(rstd_ptr, n, G, c, c_mask, CG)
    m1 = _group_stats(m1_ptr, n, G, c, c_mask, CG)
    m2 = _group_stats(m2_ptr, n, G, c, c_mask, CG)
    gam, bet = load_affine(weight_ptr, bias_ptr, c, c_mask, weight_sc, bias_sc, HAS_WEIGHT, HAS_BIAS, ACC_FP64, BLOCK_C)
    gam, bet, _ = _modulate(gam, bet, scale_ptr, shift_ptr, n, c, c_mask, scale_sn, scale_sc, shift_sn, shift_sc,
                            HAS_SCALE, HAS_SHIFT, ACC_FP64)
    if HAS_SKIP:
        a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
    x_base = n * x_sn + c[None, :] * x_sc
    skip_base = n * skip_sn + c[None, :] * skip_sc
    res_base = n * res_sn + c[None, :] * res_sc
    grad_base = n * grad_sn + c[None, :] * grad_sc
    dx_base = n * dx_sn + c[None, :] * dx_sc
    dskip_base = n * dskip_sn + c[None, :] * dskip_sc

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
            k = tl.load(skip_ptr + skip_base + (s_hi * skip_sh + s_lo * skip_sw)[:, None],
                        mask=mask, other=0.0).to(acc_ty)
            h += a[None, :] * k
        dy = tl.load(grad_ptr + grad_base + (s_hi * grad_sh + s_lo * grad_sw)[:, None], mask=mask, other=0.0).to(acc_ty)
        xhat = (h - mu[None, :]) * r[None, :]
        u = xhat * gam[None, :] + bet[None, :]
        if HAS_RES:
            u += tl.load(res_ptr + res_base + (s_hi * res_sh + s_lo * res_sw)[:, None],
                         mask=mask, other=0.0).to(acc_ty)
        dz = dy * activation_grad(u, ACT, slope)
        dh = r[None, :] * (gam[None, :] * dz - m1[None, :] - xhat * m2[None, :])
        if NEED_DX:
            tl.store(dx_ptr + dx_base + (s_hi * dx_sh + s_lo * dx_sw)[:, None],
                     dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DSKIP:
            tl.store(dskip_ptr + dskip_base + (s_hi * dskip_sh + s_lo * dskip_sw)[:, None],
                     (a[None, :] * dh).to(dskip_ptr.dtype.element_ty), mask=mask)
        if NEED_DGATE:
            acc_gate += dh * k  # masked lanes: k = 0
    if NEED_DGATE:
        tl.store(pgate_ptr + row * C + c, tl.sum(acc_gate, axis=0), mask=c_mask)


# --------------------------------------------------------------------------------------------
# Host-side launchers (no validation: fusedskip.ops.group_norm_act does that before any launch)
# --------------------------------------------------------------------------------------------
class GroupTile(NamedTuple):
    """Single-pass tile: a [block_s, gp·block_cg] register tile per program on the grid
    (N · G/gp,): gp whole groups of ``block_cg`` (≥ C/G) channels × ``block_s`` (≥ S) positions."""
    block_s: int
    block_cg: int
    gp: int
    num_warps: int


def single_pass_tile(x: torch.Tensor, num_groups: int, backward: bool = False) -> Optional[GroupTile]:
    """The single-pass tile for ``x`` [N, C, H, W] with ``num_groups`` groups, or None when the
    split design runs (the rule of the module docstring: the tile fits, and the grid fills the
    device or the groups are small). On channels_last, up to 16 channels (≥ 32 contiguous bytes in
    bf16) of GP groups share a program while GP divides G, the tile fits and the grid stays full.
    The backward's limit is ``SINGLE_PASS_BWD_MAX_ELEMS`` (two live fp32 tiles, x̂ and dz)."""
    limit = min(SINGLE_PASS_MAX_ELEMS, SINGLE_PASS_BWD_MAX_ELEMS) if backward else SINGLE_PASS_MAX_ELEMS
    n, c, h, w = x.shape
    block_s = launch.next_power_of_2(h * w)
    block_cg = launch.next_power_of_2(c // num_groups)
    elems = block_s * block_cg
    if elems > limit:
        return None
    sms = max(launch.target_programs(x) // 4, 1)  # target_programs is a few waves of SMs

    def ok(gp: int) -> bool:
        tile = elems * gp
        return (num_groups % gp == 0 and tile <= limit
                and (tile <= SMALL_GROUP_ELEMS or n * num_groups // gp >= sms))

    if not ok(1):
        return None
    gp = 1
    while channels_inner(x) and 2 * gp * block_cg <= 16 and ok(2 * gp):
        gp *= 2
    per_warp = 32 * SINGLE_PASS_ELEMS_PER_THREAD
    num_warps = min(MAX_WARPS, max(4, launch.next_power_of_2(elems * gp // per_warp)))
    return GroupTile(block_s, block_cg, gp, num_warps)


def reduce_plan(t: torch.Tensor) -> launch.ReducePlan:
    """Tile and S-split of the split design's reduction passes for a [N, C, H, W] tensor (the
    shared ``launch.reduce_plan`` with tiles of ~REDUCE_TILE elements): ``chunks > 1`` splits S."""
    return launch.reduce_plan(t, launch.target_programs(t), REDUCE_TILE)


_FORWARD_PLANS = PlanCache("group_norm_act_forward")
_BACKWARD_PLANS = PlanCache("group_norm_act_backward")


def _state_key() -> tuple:
    """The module state that plans depend on (tests and tests/compile_recorder.py patch it)."""
    return (needs_int64, launch.target_programs, SINGLE_PASS_MAX_ELEMS, SINGLE_PASS_BWD_MAX_ELEMS,
            SMALL_GROUP_ELEMS, SINGLE_PASS_ELEMS_PER_THREAD, MAX_WARPS, REDUCE_TILE)


class Extras(NamedTuple):
    """The optional operands after the norm, each None when absent: ``residual`` (x's shape, any
    strides), ``scale`` and ``shift`` (one value per (n, c): [N, C] or [N, C, 1, 1], any float
    dtype) and PReLU's learned slope ``act_weight`` (1 or C values; only with the PRELU activation).
    Their presence is part of every plan key (through :func:`launch.signature`)."""
    residual: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None
    act_weight: Optional[torch.Tensor] = None

    def flags(self) -> dict:
        """The kernels' HAS_RES / HAS_SCALE / HAS_SHIFT constexprs."""
        return dict(HAS_RES=self.residual is not None, HAS_SCALE=self.scale is not None,
                    HAS_SHIFT=self.shift is not None)

    def strides(self) -> tuple:
        """``(scale_sn, scale_sc, shift_sn, shift_sc, aw_sc)`` as the kernels take them (zeros for
        absent operands, 0 for a single slope: broadcast)."""
        nc = [(0, 0) if t is None else (t.stride(0), t.stride(1)) for t in (self.scale, self.shift)]
        return (*nc[0], *nc[1], vector_stride(self.act_weight))


class _Plans(NamedTuple):
    """The launches of one call: ``single`` (the single-pass launch) or ``split`` (the split
    design's three), ``params`` (the split backward's dγ/dβ/gate/slope sums, or None), ``rows``
    (rows of the partial buffers, N · chunks; N for the single pass) and ``dz_in`` (split
    backward: the reduce pass writes d_residual = du and the dx pass reads it as its gradient)."""
    single: Optional[Plan]
    split: Tuple[Plan, ...]
    params: Optional[Plan]
    rows: int
    dz_in: bool = False


def _single_meta(tile: GroupTile, cg: int, flags: dict) -> dict:
    return dict(flags, CG_EXACT=tile.block_cg == cg, GP=tile.gp, BLOCK_S=tile.block_s, BLOCK_CG=tile.block_cg,
                num_warps=tile.num_warps)


def _forward_plans(x, y, weight, bias, skip, gate, g: int, eps: float, act_id: int, slope: float,
                   ex: Extras) -> _Plans:
    n, c, hh, ww = x.shape
    s = hh * ww
    tensors = [t for t in (x, y, skip, ex.residual) if t is not None]
    merged = all_spatial_mergeable(tensors)
    flags = dict(HAS_SKIP=skip is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **ex.flags(),
                 ACT=act_id, MERGED_HW=merged, INT64=needs_int64(*tensors), ACC_FP64=x.dtype == torch.float64)
    vectors = (vector_stride(gate), vector_stride(weight), vector_stride(bias), *ex.strides())
    strides = (*kernel_strides(x, merged), *kernel_strides(skip, merged), *kernel_strides(ex.residual, merged),
               *kernel_strides(y, merged))
    tile = single_pass_tile(x, g)
    if tile is not None:
        args = (s, ww, g, c // g, *split_fp64(eps), *split_fp64(slope), *strides, *vectors)
        return _Plans(Plan((n * g // tile.gp,), args, _single_meta(tile, c // g, flags)), (), None, n)
    rp = reduce_plan(x)
    block_k, block_cg = finalize_blocks(rp.chunks, c // g)
    stats = Plan((rp.rows, rp.c_blocks), (c, s, ww, rp.chunks, rp.s_per_chunk, *strides[:8], vectors[0]),
                 dict(HAS_SKIP=skip is not None, MERGED_HW=merged, INT64=flags["INT64"], ACC_FP64=flags["ACC_FP64"],
                      BLOCK_S=rp.block_s, BLOCK_C=rp.block_c, num_warps=rp.num_warps))
    finalize = Plan((n * g,), (c, g, c // g, s, rp.chunks, rp.s_per_chunk, *split_fp64(eps)),
                    dict(ACC_FP64=flags["ACC_FP64"], BLOCK_K=block_k, BLOCK_CG=block_cg, num_warps=4))
    apply = Plan(tile_grid(n, s, c), (c, s, ww, g, c // g, *split_fp64(slope), *strides, *vectors),
                 dict(flags, CHANNELS_INNER=channels_inner(x)))
    return _Plans(None, (stats, finalize, apply), None, rp.rows)


def group_norm_act_forward(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    skip: Optional[torch.Tensor], gate: Optional[torch.Tensor],
    num_groups: int, eps: float, act_id: int, slope: float, launcher=launch.launch, *,
    residual: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, act_weight: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``: y = act(GN(h)·(1 + scale) + shift + residual) in x's dtype and layout,
    h = x (+ gate ⊙ skip); mean/rstd [N, G] in fp32 (fp64 for fp64 x). ``gate``: 1 or C values in
    that dtype; ``residual``, ``scale``, ``shift``, ``act_weight`` (PReLU's slope, needed by the
    PRELU activation) as :class:`Extras` describes, each optional.
    ``launcher``: ``launch.launch`` (eager: plans cached per signature) or ``launch.traced_launch``
    (a triton_op body under torch.compile: plans built afresh)."""
    n, c = x.shape[:2]
    g = num_groups
    acc = acc_dtype(x)
    y = empty_like_layout(x)
    if x.numel() == 0:
        mean = torch.zeros((n, g), dtype=acc, device=x.device)
        rstd = torch.full((n, g), 1.0 / float(np.sqrt(eps)) if eps > 0 else float("inf"), dtype=acc, device=x.device)
        return y, mean, rstd
    ex = Extras(residual, scale, shift, act_weight)
    build = (x, y, weight, bias, skip, gate, g, eps, act_id, slope, ex)
    if launcher is launch.launch:
        key = (signature(x, weight, bias, skip, gate, *ex), g, eps, act_id, slope, _state_key())
        plans = _FORWARD_PLANS.get(key, _forward_plans, *build)
    else:
        plans = _forward_plans(*build)
    mean = torch.empty((n, g), dtype=acc, device=x.device)
    rstd = torch.empty((n, g), dtype=acc, device=x.device)
    # Absent tensors: the statistics stand in (never read: their loads sit behind constexpr flags).
    k, a, w, b, res, sc, sh, aw = (t if t is not None else mean for t in (
        skip, gate if skip is not None else None, weight, bias, *ex))
    with device_guard(x):
        if plans.single is not None:
            launcher(_group_norm_act_fused_kernel, plans.single, x, k, a, w, b, res, sc, sh, aw, y, mean, rstd)
        else:
            pmean = torch.empty((plans.rows, c), dtype=acc, device=x.device)
            pm2 = torch.empty((plans.rows, c), dtype=acc, device=x.device)
            stats, finalize, apply = plans.split
            launcher(_group_norm_act_stats_kernel, stats, x, k, a, pmean, pm2)
            launcher(_group_norm_stats_finalize_kernel, finalize, pmean, pm2, mean, rstd)
            launcher(_group_norm_act_apply_kernel, apply, x, k, a, w, b, res, sc, sh, aw, mean, rstd, y)
    return y, mean, rstd


class _Need(NamedTuple):
    """Which gradients the backward computes (after dropping those of absent inputs); also the
    order of :func:`group_norm_act_backward`'s results."""
    dx: bool
    dskip: bool
    dgate: bool
    dweight: bool
    dbias: bool
    dres: bool = False
    dscale: bool = False
    dshift: bool = False
    dslope: bool = False


class _Grads(NamedTuple):
    """The backward's outputs, in :class:`_Need`'s order (None where not asked for)."""
    dx: Optional[torch.Tensor]
    dskip: Optional[torch.Tensor]
    dgate: Optional[torch.Tensor]
    dweight: Optional[torch.Tensor]
    dbias: Optional[torch.Tensor]
    dres: Optional[torch.Tensor]
    dscale: Optional[torch.Tensor]
    dshift: Optional[torch.Tensor]
    dslope: Optional[torch.Tensor]


def _param_flags(need: _Need, gate, act_weight) -> dict:
    """The constexprs of ``_sum_param_partials`` but NEED_DGATE (single-pass backward and, with
    NEED_DGATE, the param-grad kernel)."""
    return dict(NEED_DWEIGHT=need.dweight, NEED_DBIAS=need.dbias,
                SCALAR_GATE=need.dgate and gate.numel() == 1, NEED_DSLOPE=need.dslope,
                SCALAR_SLOPE=need.dslope and act_weight.numel() == 1)


def _backward_plans(grad, x, weight, bias, skip, gate, g: int, act_id: int, slope: float, need: _Need,
                    ex: Extras) -> _Plans:
    n, c, hh, ww = x.shape
    s = hh * ww
    # dx, dskip and dres as empty_like_layout will allocate them (their strides, no storage).
    outs = [torch.empty_like(t, device="meta", memory_format=torch.preserve_format) if needed else None
            for t, needed in ((x, need.dx), (skip, need.dskip), (ex.residual, need.dres))]
    tensors = [t for t in (grad, x, skip, ex.residual, *outs) if t is not None]
    merged = all_spatial_mergeable(tensors)
    flags = dict(HAS_SKIP=skip is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, **ex.flags(),
                 ACT=act_id, MERGED_HW=merged, INT64=needs_int64(*tensors), ACC_FP64=x.dtype == torch.float64)
    need_flags = dict(NEED_DX=need.dx, NEED_DSKIP=need.dskip, NEED_DGATE=need.dgate)
    nc_flags = dict(NEED_DSCALE=need.dscale, NEED_DSHIFT=need.dshift)
    vectors = (vector_stride(gate), vector_stride(weight), vector_stride(bias), *ex.strides())
    strides = tuple(st for t in (grad, x, skip, ex.residual) for st in kernel_strides(t, merged))
    out_strides = tuple(st for t in outs for st in kernel_strides(t, merged))
    tile = single_pass_tile(x, g, backward=True)
    if tile is not None:  # the parameter sums run in the same launch (its last program)
        args = (n, c, s, ww, g, c // g, *split_fp64(slope), *strides, *out_strides, *vectors)
        block_r, block_pc = finalize_blocks(n, c)
        meta = _single_meta(tile, c // g, dict(flags, **need_flags, NEED_DRES=need.dres, **nc_flags, BLOCK_R=block_r,
                                               BLOCK_PC=block_pc, **_param_flags(need, gate, ex.act_weight)))
        return _Plans(Plan((n * g // tile.gp,), args, meta), (), None, n)
    rp = reduce_plan(x)
    block_k, block_cg = finalize_blocks(rp.chunks, c // g)
    tiles = dict(BLOCK_S=rp.block_s, BLOCK_C=rp.block_c, num_warps=rp.num_warps)
    chunked = (c, s, ww, g, c // g, rp.chunks, rp.s_per_chunk, *split_fp64(slope))
    # The residual's gradient du is written by the reduce pass, which computes it anyway; the dx pass
    # then reads du (identity activation, no residual, no shift) instead of dy and the residual.
    dz_in = need.dres
    reduce = Plan((rp.rows, rp.c_blocks), (*chunked, *strides, *vectors, *kernel_strides(outs[2], merged)),
                  dict(flags, NEED_DSLOPE=need.dslope, NEED_DRES=dz_in, **tiles))
    finalize = Plan((n * g,), (n, c, g, c // g, s, rp.chunks, *vectors[1:5]),  # weight_sc, bias_sc, scale_sn, scale_sc
                    dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_SCALE=ex.scale is not None,
                         **nc_flags, ACC_FP64=flags["ACC_FP64"], BLOCK_K=block_k, BLOCK_CG=block_cg, num_warps=4))
    dx_out_strides = out_strides[:8]  # dx, dskip
    if dz_in:
        dz_strides = tuple(st for t in (outs[2], x, skip, None) for st in kernel_strides(t, merged))
        dx = Plan((rp.rows, rp.c_blocks), (*chunked, *dz_strides, *dx_out_strides, *vectors),
                  dict(flags, **need_flags, **tiles, ACT=IDENTITY.value, HAS_RES=False, HAS_SHIFT=False))
    else:
        dx = Plan((rp.rows, rp.c_blocks), (*chunked, *strides, *dx_out_strides, *vectors),
                  dict(flags, **need_flags, **tiles))
    return _Plans(None, (reduce, finalize, dx), _param_plan(c, n, rp.rows, need, gate, ex.act_weight, flags), rp.rows,
                  dz_in)


def _param_plan(c: int, n: int, rows: int, need: _Need, gate, act_weight, flags: dict) -> Optional[Plan]:
    """The launch of ``_group_norm_act_param_grad_kernel``: one program for a single-value gate or
    slope, else one per channel block; None when no parameter, gate or slope gradient is asked for."""
    if not (need.dweight or need.dbias or need.dgate or need.dslope):
        return None
    block_r, block_c = finalize_blocks(max(rows, n), c)
    pflags = _param_flags(need, gate, act_weight)
    programs = 1 if pflags["SCALAR_GATE"] or pflags["SCALAR_SLOPE"] else cdiv(c, block_c)
    return Plan((programs,), (c, n, rows),
                dict(pflags, NEED_DGATE=need.dgate, ACC_FP64=flags["ACC_FP64"], BLOCK_R=block_r, BLOCK_C=block_c,
                     num_warps=4))


def group_norm_act_backward(
    grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    skip: Optional[torch.Tensor], gate: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    num_groups: int, act_id: int, slope: float,
    need_dx: bool, need_dskip: bool, need_dgate: bool, need_dweight: bool, need_dbias: bool,
    launcher=launch.launch, *,
    residual: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None, act_weight: Optional[torch.Tensor] = None,
    need_dres: bool = False, need_dscale: bool = False, need_dshift: bool = False, need_dslope: bool = False,
) -> Tuple[Optional[torch.Tensor], ...]:
    """``(dx, dskip, dgate, dweight, dbias, dresidual, dscale, dshift, dact_weight)``; ``None`` for
    gradients not asked for (or of absent inputs).

    dx (= d_up), dskip and dresidual have x's / skip's / residual's layout and dtype; dgate,
    dweight, dbias, dscale, dshift and dact_weight are dense in their input's shape and dtype.
    ``grad`` may have any strides (expanded, sliced). ``launcher`` as for
    :func:`group_norm_act_forward`.
    """
    ex = Extras(residual, scale, shift, act_weight)
    has_skip = skip is not None
    need = _Need(need_dx, need_dskip and has_skip, need_dgate and has_skip,
                 need_dweight and weight is not None, need_dbias and bias is not None,
                 need_dres and residual is not None, need_dscale and scale is not None,
                 need_dshift and shift is not None, need_dslope and act_weight is not None)
    if x.numel() == 0:
        return _empty_grads(x, skip, gate, weight, bias, ex, need)
    if act_id == IDENTITY.value and not need.dres:  # u (and so the residual) is not needed: du = dy
        ex = ex._replace(residual=None)
    if not any(need):
        return (None,) * len(need)
    build = (grad, x, weight, bias, skip, gate, num_groups, act_id, slope, need, ex)
    if launcher is launch.launch:
        key = (signature(grad, x, weight, bias, skip, gate, *ex), num_groups, act_id, slope, need, _state_key())
        plans = _BACKWARD_PLANS.get(key, _backward_plans, *build)
    else:
        plans = _backward_plans(*build)

    def new(t, needed):  # a dense gradient of a vector / per-(n, c) operand, written by a kernel
        return torch.empty(t.shape, dtype=t.dtype, device=t.device) if needed else None

    grads = _Grads(empty_like_layout(x) if need.dx else None, empty_like_layout(skip) if need.dskip else None,
                  new(gate, need.dgate), new(weight, need.dweight), new(bias, need.dbias),
                  empty_like_layout(residual) if need.dres else None, new(scale, need.dscale),
                  new(shift, need.dshift), new(act_weight, need.dslope))
    with device_guard(x):
        _launch_backward(plans, launcher, grad, x, weight, bias, skip, gate, ex, mean, rstd, grads, need)
    return tuple(grads)


def _empty_grads(x, skip, gate, weight, bias, ex: Extras, need: _Need) -> tuple:
    """The gradients of an empty batch: empty tensors, zero for the parameters and the slope."""
    return (torch.empty_like(x) if need.dx else None, torch.empty_like(skip) if need.dskip else None,
            *(torch.zeros_like(t) if needed else None for t, needed in (
                (gate, need.dgate), (weight, need.dweight), (bias, need.dbias))),
            torch.empty_like(ex.residual) if need.dres else None,
            *(torch.zeros_like(t) if needed else None for t, needed in (
                (ex.scale, need.dscale), (ex.shift, need.dshift), (ex.act_weight, need.dslope))))


def _launch_backward(plans: _Plans, launcher, grad, x, weight, bias, skip, gate, ex: Extras, mean, rstd,
                     grads: _Grads, need: _Need) -> None:
    """The backward's launches on freshly allocated partial buffers; ``grads`` holds the outputs
    (None where not asked for)."""
    n, c = x.shape[:2]
    acc = mean.dtype
    # Absent tensors: the statistics stand in (never read nor written: constexpr flags guard them).
    k, a, w, b, res, sc, sh, aw = (t if t is not None else mean for t in (
        skip, gate if skip is not None else None, weight, bias, *ex))
    dx_, dskip_, dgate_, dw_, db_, dres_, dscale_, dshift_, dslope_ = (t if t is not None else mean for t in grads)
    split = plans.single is None
    sums = (torch.empty((2, n, c), dtype=acc, device=x.device)
            if (need.dweight or need.dbias or split) else mean)  # the split finalize always writes them
    pgate = torch.empty((plans.rows, c), dtype=acc, device=x.device) if need.dgate else mean
    pslope = torch.empty((plans.rows, c), dtype=acc, device=x.device) if need.dslope else mean
    if not split:
        ticket = tickets(x.device, 1, traced=launcher is not launch.launch)
        launcher(_group_norm_act_backward_fused_kernel, plans.single, grad, x, k, a, w, b, res, sc, sh, aw,
                 mean, rstd, dx_, dskip_, dres_, sums, pgate, pslope, dw_, db_, dgate_, dscale_, dshift_, dslope_,
                 ticket)
    else:
        psum_dz = torch.empty((plans.rows, c), dtype=acc, device=x.device)
        psum_dzx = torch.empty((plans.rows, c), dtype=acc, device=x.device)
        m1 = torch.empty_like(mean)
        m2 = torch.empty_like(mean)
        reduce, finalize, dx_plan = plans.split
        launcher(_group_norm_act_backward_reduce_kernel, reduce, grad, x, k, a, w, b, res, sc, sh, aw, mean, rstd,
                 psum_dz, psum_dzx, pslope, dres_)
        launcher(_group_norm_act_backward_finalize_kernel, finalize, psum_dz, psum_dzx, w, b, sc, sums, m1, m2,
                 dscale_, dshift_)
        if need.dx or need.dskip or need.dgate:  # with dz_in: du in place of dy and the residual
            dy, res_dx = (dres_, mean) if plans.dz_in else (grad, res)
            launcher(_group_norm_act_backward_dx_kernel, dx_plan, dy, x, k, a, w, b, res_dx, sc, sh, aw,
                     mean, rstd, m1, m2, dx_, dskip_, pgate)
    if plans.params is not None:
        launcher(_group_norm_act_param_grad_kernel, plans.params, sums, pgate, pslope, dw_, db_, dgate_, dslope_)
