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

from .launch import (autotune, device_guard, empty_like_layout, merged_spatial_stride, needs_int64,
                     next_power_of_2, spatial_strides_mergeable, target_programs)


@triton.jit
def spatial_offset(s, W, stride_h, stride_w, MERGED_HW: tl.constexpr):
    """Element offset of spatial index s = h·W + w; ``stride_w`` is the merged stride if MERGED_HW."""
    if MERGED_HW:
        return s * stride_w
    else:
        return (s // W) * stride_h + (s % W) * stride_w


def _tile_configs():
    # (BLOCK_S, BLOCK_C): tall tiles suit NCHW (s contiguous), wide ones channels_last (c contiguous).
    shapes = [(1024, 1), (512, 2), (256, 4), (128, 8), (64, 16), (32, 32), (16, 64), (8, 128)]
    return [triton.Config({"BLOCK_S": bs, "BLOCK_C": bc}, num_warps=w) for bs, bc in shapes for w in (4, 8)]


@autotune(configs=_tile_configs(), key=["C", "S", "CHANNELS_INNER", "INT64"],
          fixed=triton.Config({"BLOCK_S": 64, "BLOCK_C": 16}))
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
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    if INT64:
        pid = pid.to(tl.int64)
        pid_c = pid_c.to(tl.int64)
    num_s_blocks = tl.cdiv(S, BLOCK_S)
    n = pid // num_s_blocks
    s = (pid % num_s_blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s_mask = s < S
    c_mask = c < C
    mask = s_mask[:, None] & c_mask[None, :]
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
    pid = tl.program_id(0)  # = n · num_s_progs + chunk: also this program's row of the partials
    pid_c = tl.program_id(1)
    if INT64:
        pid = pid.to(tl.int64)
        pid_c = pid_c.to(tl.int64)
    n = pid // num_s_progs
    s_begin = (pid % num_s_progs) * S_PER_PROG
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
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
        tl.store(partial_ptr + pid * C + c, tl.sum(acc, axis=0), mask=c_mask)


def _strides(t: torch.Tensor, merged: bool):
    """(n, c, h, w) strides as the kernels take them; w carries the merged stride when merged."""
    sn, sc, sh, sw = t.stride()
    return (sn, sc, sh, merged_spatial_stride(t) if merged else sw)


def _acc_fp64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def gated_skip_forward(up: torch.Tensor, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel. ``gate``: fp32 (fp64 for fp64 inputs) tensor of 1 or C values."""
    n, c, h, w = up.shape
    out = empty_like_layout(up)
    if out.numel() == 0:
        return out
    s = h * w
    merged = all(spatial_strides_mergeable(t) for t in (up, skip, out))

    def grid(meta):
        return (n * triton.cdiv(s, meta["BLOCK_S"]), triton.cdiv(c, meta["BLOCK_C"]))

    with device_guard(up):
        _gated_skip_forward_kernel[grid](
            up, skip, gate, out,
            c, s, w,
            *_strides(up, merged), *_strides(skip, merged), *_strides(out, merged),
            0 if gate.numel() == 1 else gate.stride(0),
            MERGED_HW=merged, CHANNELS_INNER=up.stride(1) == 1 and c > 1,
            INT64=needs_int64(up, skip, out), ACC_FP64=_acc_fp64(up),
        )
    return out


def _backward_tile(t: torch.Tensor, c: int, s: int) -> Tuple[int, int]:
    """(BLOCK_S, BLOCK_C) of about 2048 elements, wide along whichever axis is contiguous."""
    tile = 2048
    if t.stride(1) == 1 and c > 1:  # channels_last: channels contiguous
        block_c = min(next_power_of_2(c), 128)
        return max(tile // block_c, 1), block_c
    block_s = min(next_power_of_2(s), tile)
    return block_s, min(next_power_of_2(c), max(tile // block_s, 1))


def gated_skip_backward(
    grad: torch.Tensor, skip: torch.Tensor, gate: torch.Tensor, need_dskip: bool, need_dgate: bool
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(d_skip, d_gate)``: ``a·grad`` and Σ grad·skip reduced to the gate's shape.

    ``grad`` may have any strides (autograd hands over expanded or sliced gradients).
    """
    n, c, h, w = skip.shape
    s = h * w
    acc_dtype = torch.float64 if _acc_fp64(skip) else torch.float32
    dskip = empty_like_layout(skip) if need_dskip else None
    if not (need_dskip or need_dgate):
        return None, None
    if skip.numel() == 0:
        dgate = torch.zeros_like(gate) if need_dgate else None
        return dskip, dgate

    block_s, block_c = _backward_tile(skip, c, s)
    c_blocks = triton.cdiv(c, block_c)
    s_blocks = triton.cdiv(s, block_s)
    # Split S over enough programs to fill the device; each writes one row of partials.
    s_progs = max(1, min(s_blocks, triton.cdiv(target_programs(skip), n * c_blocks)))
    s_per_prog = triton.cdiv(s_blocks, s_progs) * block_s
    s_progs = triton.cdiv(s, s_per_prog)
    partial = torch.empty((n * s_progs, c), dtype=acc_dtype, device=skip.device) if need_dgate else None

    tensors = [grad, skip] + ([dskip] if need_dskip else [])
    merged = all(spatial_strides_mergeable(t) for t in tensors)
    dskip_arg = dskip if need_dskip else skip  # never written when NEED_DSKIP is off
    with device_guard(skip):
        _gated_skip_backward_kernel[(n * s_progs, c_blocks)](
            grad, skip, gate, dskip_arg, partial if need_dgate else gate,
            c, s, w, s_progs, s_per_prog,
            *_strides(grad, merged), *_strides(skip, merged), *_strides(dskip_arg, merged),
            0 if gate.numel() == 1 else gate.stride(0),
            MERGED_HW=merged, INT64=needs_int64(*tensors), ACC_FP64=acc_dtype == torch.float64,
            NEED_DSKIP=need_dskip, NEED_DGATE=need_dgate, BLOCK_S=block_s, BLOCK_C=block_c,
            num_warps=4,
        )
    dgate = None
    if need_dgate:
        per_channel = partial.sum(dim=0)
        dgate = per_channel.sum().reshape(gate.shape) if gate.numel() == 1 else per_channel.reshape(gate.shape)
    return dskip, dgate
