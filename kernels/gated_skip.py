"""Gated additive skip fusion: ``out = up + a ⊙ skip`` with a per-channel (or scalar) gate ``a``.

Tensors are walked as a 3-D view [N, C, S] of the 4-D [N, C, H, W] input, S = H·W, through each
tensor's own strides, so NCHW, channels_last and any strided view run without layout copies.
When (H, W) of every tensor merge into one stride (true for NCHW, channels_last and most views),
the spatial offset is ``s·stride``; otherwise it is split back into (h, w) per element.

Forward: one program per [BLOCK_S, BLOCK_C] tile; 2 reads + 1 write per element, the minimum.
Backward, one launch: ``d_skip = a·g`` and, per program, an fp32 partial of Σ g·skip over its
tiles written to a [programs, C] buffer that the last program to finish sums in a fixed order into
the gate gradient (deterministic: no float atomics, an integer ticket decides who sums).
``d_up = g`` is the incoming gradient itself and is not touched.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .common import chunk_program, tile_program
from .launch import (
    FIXED_TILE,
    Plan,
    PlanCache,
    acc_dtype,
    all_spatial_mergeable,
    autotune,
    channels_inner,
    device_guard,
    empty_like_layout,
    finalize_blocks,
    kernel_strides,
    launch,
    needs_int64,
    reduce_plan,
    signature,
    target_programs,
    tickets,
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
    """out = up + a ⊙ skip on one [BLOCK_S, BLOCK_C] tile per program.

    Grid: (N · S-blocks, C-blocks) (``launch.tile_grid``). Pointers: the inputs up, skip, the
    gate a (1 or C values, stride ``gate_sc``), the output; each 4-D tensor with its own (n, c, h,
    w) strides (w = the merged spatial stride when MERGED_HW).
    """
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
    grad_ptr, skip_ptr, gate_ptr, dskip_ptr, partial_ptr, dgate_ptr, ticket_ptr,
    C, S, W, num_chunks, S_PER_PROG, num_rows,
    grad_sn, grad_sc, grad_sh, grad_sw,
    skip_sn, skip_sc, skip_sh, skip_sw,
    dskip_sn, dskip_sc, dskip_sh, dskip_sw,
    gate_sc,
    MERGED_HW: tl.constexpr, INT64: tl.constexpr, ACC_FP64: tl.constexpr,
    NEED_DSKIP: tl.constexpr, NEED_DGATE: tl.constexpr, SCALAR_GATE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """d_skip = a ⊙ grad and the gate gradient d_a = Σ grad ⊙ skip, in one launch.

    Grid: (N · chunks, C-blocks) (``launch.ReducePlan``): each program walks ``S_PER_PROG``
    positions of one sample and channel block, writes d_skip and one row of [num_rows, C] fp32
    partials of Σ grad·skip, then draws a ticket; the program with the last ticket sums the rows
    in a fixed order (deterministic) into ``dgate_ptr`` (C values, or their sum for a scalar
    gate) and resets the ticket. Pointers: grad (any strides), skip, the gate a, the output
    d_skip; partials, d_a and the int32 ticket.
    """
    row, n, s_begin, c, c_mask = chunk_program(C, num_chunks, S_PER_PROG, BLOCK_C, INT64)
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    a = tl.load(gate_ptr + c * gate_sc, mask=c_mask, other=0.0).to(acc_ty)
    acc = tl.zeros([BLOCK_S, BLOCK_C], dtype=acc_ty)
    for i in range(0, S_PER_PROG, BLOCK_S):
        s = s_begin + i + tl.arange(0, BLOCK_S)
        mask = (s < S)[:, None] & c_mask[None, :]
        g_off = n * grad_sn + c[None, :] * grad_sc + spatial_offset(s, W, grad_sh, grad_sw, MERGED_HW)[:, None]
        g = tl.load(grad_ptr + g_off, mask=mask, other=0.0).to(acc_ty)
        if NEED_DSKIP:
            d_off = (n * dskip_sn + c[None, :] * dskip_sc
                     + spatial_offset(s, W, dskip_sh, dskip_sw, MERGED_HW)[:, None])
            tl.store(dskip_ptr + d_off, (a[None, :] * g).to(dskip_ptr.dtype.element_ty), mask=mask)
        if NEED_DGATE:
            k_off = n * skip_sn + c[None, :] * skip_sc + spatial_offset(s, W, skip_sh, skip_sw, MERGED_HW)[:, None]
            k = tl.load(skip_ptr + k_off, mask=mask, other=0.0).to(acc_ty)
            acc += g * k
    if NEED_DGATE:
        tl.store(partial_ptr + row * C + c, tl.sum(acc, axis=0), mask=c_mask)
        ticket = tl.atomic_add(ticket_ptr, 1)  # acq_rel: every program's partials are visible to the last
        if ticket == num_rows * tl.num_programs(1) - 1:
            sum_partial_rows(partial_ptr, dgate_ptr, num_rows, C, SCALAR_GATE, ACC_FP64, BLOCK_R, BLOCK_C)
            tl.store(ticket_ptr, 0)


@triton.jit
def sum_partial_rows(partial_ptr, out_ptr, num_rows, C, SCALAR: tl.constexpr, ACC_FP64: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ over the rows of a [num_rows, C] partial buffer, in a fixed order, into ``out_ptr``
    (C values, or one value, their sum in channel order, when SCALAR). Run by one program."""
    acc_ty = tl.float64 if ACC_FP64 else tl.float32
    total = tl.zeros([BLOCK_C], dtype=acc_ty)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        col = tl.zeros([BLOCK_C], dtype=acc_ty)
        for r0 in range(0, num_rows, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            m = (r < num_rows)[:, None] & c_mask[None, :]
            col += tl.sum(tl.load(partial_ptr + r[:, None] * C + c[None, :], mask=m, other=0.0), axis=0)
        if SCALAR:
            total += col
        else:
            tl.store(out_ptr + c, col.to(out_ptr.dtype.element_ty), mask=c_mask)
    if SCALAR:
        tl.store(out_ptr, tl.sum(total, axis=0).to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------
# Host side: plans cached per signature, launched through launch.launch (eager) or
# launch.traced_launch (the triton_op body under torch.compile).
# --------------------------------------------------------------------------------------------
_FORWARD_PLANS = PlanCache("gated_skip_forward")
_BACKWARD_PLANS = PlanCache("gated_skip_backward")


def _forward_plan(up, skip, gate, out) -> Plan:
    n, c, h, w = up.shape
    merged = all_spatial_mergeable((up, skip, out))
    args = (c, h * w, w, *kernel_strides(up, merged), *kernel_strides(skip, merged), *kernel_strides(out, merged),
            vector_stride(gate))
    meta = dict(MERGED_HW=merged, CHANNELS_INNER=channels_inner(up), INT64=needs_int64(up, skip, out),
                ACC_FP64=acc_dtype(up) == torch.float64)
    return Plan(tile_grid(n, h * w, c), args, meta)


def gated_skip_forward(up: torch.Tensor, skip: torch.Tensor, gate: torch.Tensor, launcher=launch) -> torch.Tensor:
    """Launch the forward kernel. ``gate``: fp32 (fp64 for fp64 inputs) tensor of 1 or C values."""
    out = empty_like_layout(up)
    if out.numel() == 0:
        return out
    if launcher is launch:
        plan = _FORWARD_PLANS.get((signature(up, skip, gate, out), needs_int64, target_programs),
                                  _forward_plan, up, skip, gate, out)
    else:
        plan = _forward_plan(up, skip, gate, out)
    with device_guard(up):
        launcher(_gated_skip_forward_kernel, plan, up, skip, gate, out)
    return out


def _backward_plan(grad, skip, gate, dskip, need_dskip: bool, need_dgate: bool) -> Tuple[Plan, int]:
    n, c, h, w = skip.shape
    # S split over enough programs to fill the device; each writes one row of partials.
    rp = reduce_plan(skip, target_programs(skip))
    tensors = [grad, skip] + ([dskip] if need_dskip else [])
    merged = all_spatial_mergeable(tensors)
    block_r, block_c = finalize_blocks(rp.rows, c)
    args = (c, h * w, w, rp.chunks, rp.s_per_chunk, rp.rows,
            *kernel_strides(grad, merged), *kernel_strides(skip, merged),
            *kernel_strides(dskip if need_dskip else None, merged), vector_stride(gate))
    meta = dict(MERGED_HW=merged, INT64=needs_int64(*tensors), ACC_FP64=acc_dtype(skip) == torch.float64,
                NEED_DSKIP=need_dskip, NEED_DGATE=need_dgate, SCALAR_GATE=gate.numel() == 1,
                BLOCK_S=rp.block_s, BLOCK_C=rp.block_c, BLOCK_R=block_r, num_warps=4)
    return Plan((rp.rows, rp.c_blocks), args, meta), rp.rows


def gated_skip_backward(
    grad: torch.Tensor, skip: torch.Tensor, gate: torch.Tensor, need_dskip: bool, need_dgate: bool,
    launcher=launch,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(d_skip, d_gate)``: ``a·grad`` and Σ grad·skip reduced to the gate's shape, one launch.

    ``grad`` may have any strides (autograd hands over expanded or sliced gradients).
    """
    if not (need_dskip or need_dgate):
        return None, None
    dskip = empty_like_layout(skip) if need_dskip else None
    if skip.numel() == 0:
        return dskip, (torch.zeros_like(gate) if need_dgate else None)
    traced = launcher is not launch
    if traced:
        plan, rows = _backward_plan(grad, skip, gate, dskip, need_dskip, need_dgate)
    else:
        plan, rows = _BACKWARD_PLANS.get(
            (signature(grad, skip, gate), need_dskip, need_dgate, needs_int64, target_programs),
            _backward_plan, grad, skip, gate, dskip, need_dskip, need_dgate)
    acc = acc_dtype(skip)
    partial = dgate = ticket = gate  # placeholders of absent buffers: never touched
    if need_dgate:
        partial = torch.empty((rows, skip.shape[1]), dtype=acc, device=skip.device)
        dgate = torch.empty_like(gate)
        ticket = tickets(skip.device, 1, traced)
    with device_guard(skip):
        launcher(_gated_skip_backward_kernel, plan, grad, skip, gate, dskip if need_dskip else gate,
                 partial, dgate, ticket)
    return dskip, (dgate if need_dgate else None)
