"""Gated additive skip fusion: ``out = up + a ⊙ skip`` with a per-channel (or scalar) gate ``a``.

Tensors are walked as a 3-D view [N, C, S] of the 4-D [N, C, H, W] input, S = H·W, through each
tensor's own strides, so NCHW, channels_last and any strided view run without layout copies.
When (H, W) of every tensor merge into one stride (true for NCHW, channels_last and most views),
the spatial offset is ``s·stride``; otherwise it is split back into (h, w) per element.

Forward: one program per [BLOCK_S, BLOCK_C] tile; 2 reads + 1 write per element, the minimum.
Backward: ``d_skip = a·g`` and, per program, an fp32 partial of Σ g·skip over its tiles written
to a [programs, C] buffer that the host sums (deterministic: no float atomics). ``d_up = g`` is
the incoming gradient itself and is not touched.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import chunk_program, tile_program
from .launch import (
    FIXED_TILE,
    acc_dtype,
    all_spatial_mergeable,
    autotune,
    channels_inner,
    device_guard,
    empty_like_layout,
    gate_gradient,
    kernel_strides,
    needs_int64,
    reduce_plan,
    target_programs,
    tile_configs,
    tile_grid,
    vector_stride,
)


@triton.jit
def spatial_offset(s, W, stride_h, stride_w, MERGED_HW: tl.constexpr):
    """Element offset of spatial index s = h·W + w; ``stride_w`` is the merged stride if MERGED_HW."""
    if MERGED_HW:
        return s * stride_w
    else:
        return (s // W) * stride_h + (s % W) * stride_w


@autotune(configs=tile_configs(), key=["C", "S", "CHANNELS_INNER", "INT64"], fixed=FIXED_TILE)
@triton.jit
def _gated_skip_forward_kernel(
    up_ptr, skip_ptr, gate_ptr, out_ptr,
    C, S, W,
    up_sn, up_sc, up_sh, up_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    out_sn, out_sc, out_sh, out_sw,
    gate_sc,
    MERGED_HW: tl.constexpr, CHANNELS_INNER: tl.constexpr, INT64: tl.constexpr,
    ACC_FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    n, s, c, c_mask, mask = tile_program(S, C, BLOCK_S, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32

    a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
    up_off = n * up_sn + c[None, :] * up_sc + spatial_offset(s, W, up_sh, up_sw, MERGED_HW)[:, None]
    skip_off = n * skip_sn + c[None, :] * skip_sc + spatial_offset(s, W, skip_sh, skip_sw, MERGED_HW)[:, None]
    out_off = n * out_sn + c[None, :] * out_sc + spatial_offset(s, W, out_sh, out_sw, MERGED_HW)[:, None]
    u = tl.load(up_ptr + up_off, mask=mask, other=0.0).to(acc_ty)
    k = tl.load(skip_ptr + skip_off, mask=mask, other=0.0).to(acc_ty)
    out = u + a[None, :] * k
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_skip_backward_kernel(
    grad_ptr, skip_ptr, gate_ptr, dskip_ptr, partial_ptr,
    C, S, W, num_s_progs, S_PER_PROG,
    g_sn, g_sc, g_sh, g_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    dskip_sn, dskip_sc, dskip_sh, dskip_sw,
    gate_sc,
    MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    NEED_DSKIP: tl.constexpr, NEED_DGATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row, n, s_begin, c, c_mask = chunk_program(C, num_s_progs, S_PER_PROG, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for i in range(0, S_PER_PROG, BLOCK_S):
        s = s_begin + i + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_mask[None, :]
        g_off = n * g_sn + c[None, :] * g_sc + spatial_offset(s, W, g_sh, g_sw, MERGED_HW)[:, None]
        g = tl.load(grad_ptr + g_off, mask=mask, other=0.0).to(acc_ty)
        if NEED_DSKIP:
            d_off = n * dskip_sn + c[None, :] * dskip_sc + spatial_offset(s, W, dskip_sh, dskip_sw, MERGED_HW)[:, None]
            tl.store(dskip_ptr + d_off, (a[None, :] * g).to(dskip_ptr.dtype.element_ty), mask=mask)
        if NEED_DGATE:
            k_off = n * skip_sn + c[None, :] * skip_sc + spatial_offset(s, W, skip_sh, skip_sw, MERGED_HW)[:, None]
            k = tl.load(skip_ptr + k_off, mask=mask, other=0.0).to(acc_ty)
            acc += g * k
    if NEED_DGATE:
        tl.store(partial_ptr + row * C + c, tl.sum(acc, axis=0), mask=c_mask)


def gated_skip_forward(up: torch.Tensor, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel. ``gate``: fp32 (fp64 for fp64 inputs) tensor of 1 or C values."""
    n, c, h, w = up.shape
    out = empty_like_layout(up)
    if out.numel() == 0:
        return out
    s = h * w
    merged = all_spatial_mergeable((up, skip, out))
    with device_guard(up):
        _gated_skip_forward_kernel[tile_grid(n, s, c)](
            up, skip, gate, out,
            c, s, w,
            *kernel_strides(up, merged), *kernel_strides(skip, merged), *kernel_strides(out, merged),
            vector_stride(gate),
            MERGED_HW=merged, CHANNELS_INNER=channels_inner(up),
            INT64=needs_int64(up, skip, out), ACC_FP64=acc_dtype(up) == torch.float64,
        )
    return out


def gated_skip_backward(
    grad: torch.Tensor, skip: torch.Tensor, gate: torch.Tensor, need_dskip: bool, need_dgate: bool
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(d_skip, d_gate)``: ``a·grad`` and Σ grad·skip reduced to the gate's shape.

    ``grad`` may have any strides (autograd hands over expanded or sliced gradients).
    """
    n, c, h, w = skip.shape
    s = h * w
    acc = acc_dtype(skip)
    dskip = empty_like_layout(skip) if need_dskip else None
    if not (need_dskip or need_dgate):
        return None, None
    if skip.numel() == 0:
        dgate = torch.zeros_like(gate) if need_dgate else None
        return dskip, dgate

    # S split over enough programs to fill the device; each writes one row of partials.
    plan = reduce_plan(skip, target_programs(skip))
    partial = torch.empty((n * plan.chunks, c), dtype=acc, device=skip.device) if need_dgate else None

    tensors = [grad, skip] + ([dskip] if need_dskip else [])
    merged = all_spatial_mergeable(tensors)
    dskip_arg = dskip if need_dskip else skip  # never written when NEED_DSKIP is off
    with device_guard(skip):
        _gated_skip_backward_kernel[(n * plan.chunks, plan.c_blocks)](
            grad, skip, gate, dskip_arg, partial if need_dgate else gate,
            c, s, w, plan.chunks, plan.s_per_chunk,
            *kernel_strides(grad, merged), *kernel_strides(skip, merged), *kernel_strides(dskip_arg, merged),
            vector_stride(gate),
            MERGED_HW=merged, INT64=needs_int64(*tensors), ACC_FP64=acc == torch.float64,
            NEED_DSKIP=need_dskip, NEED_DGATE=need_dgate, BLOCK_S=plan.block_s, BLOCK_C=plan.block_c,
            num_warps=4,
        )
    dgate = gate_gradient(partial.sum(dim=0), gate) if need_dgate else None
    return dskip, dgate
