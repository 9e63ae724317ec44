"""Host-side launch glue shared by every kernel: configuration and tile choice, device guard, index
width, strides and views, scalar arguments and the gate-gradient reduction."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import triton

INT32_LIMIT = 2**31 - 1


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class _FixedConfigKernel:
    """Stands in for ``triton.autotune`` under the interpreter, where autotuning cannot run.

    ``kernel[grid](...)`` launches with one fixed configuration whose meta-parameters are passed
    to ``grid`` exactly as the autotuner would, so launchers are written once for both paths.
    """

    def __init__(self, fn, config: triton.Config):
        self.fn = fn
        self.config = config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(self.config.kwargs)
            launch_grid = grid(meta) if callable(grid) else grid
            return self.fn[launch_grid](*args, **kwargs, **meta)

        return launch


# (BLOCK_S, BLOCK_C) of the one-tile-per-program kernels: tall tiles suit NCHW (s contiguous),
# wide ones channels_last (c contiguous).
TILE_SHAPES = ((1024, 1), (512, 2), (256, 4), (128, 8), (64, 16), (32, 32), (16, 64), (8, 128))
# Their configuration under the interpreter, where every program is a slow Python loop: few, large tiles.
FIXED_TILE = triton.Config({"BLOCK_S": 64, "BLOCK_C": 16})


def tile_configs(shapes: Sequence[Tuple[int, int]] = TILE_SHAPES):
    """Autotuning space of the one-tile-per-program kernels: every tile shape with 4 and 8 warps."""
    return [triton.Config({"BLOCK_S": bs, "BLOCK_C": bc}, num_warps=w) for bs, bc in shapes for w in (4, 8)]


def autotune(configs: Sequence[triton.Config], key: Sequence[str], fixed: triton.Config, **kwargs):
    """``triton.autotune`` on a GPU; the ``fixed`` configuration under ``TRITON_INTERPRET=1``.

    Only for kernels without side effects beyond their outputs (autotuning replays a launch many
    times, which would corrupt in-place updates such as running statistics).
    """

    def decorate(fn):
        if interpreter_active():
            return _FixedConfigKernel(fn, fixed)
        return triton.autotune(configs=list(configs), key=list(key), **kwargs)(fn)

    return decorate


def device_guard(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (autograd runs backward
    on another thread, and models may live on ``cuda:1`` while ``cuda:0`` is current)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether any element offset of these tensors can exceed int32 (then kernels index in int64)."""
    for t in tensors:
        if t.numel() == 0:
            continue
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if span > INT32_LIMIT or t.numel() > INT32_LIMIT:
            return True
    return False


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(tensor: torch.Tensor) -> int:
    """How many programs keep the device busy: a few waves of SMs on a GPU; few on the
    interpreter, where every program is a slow Python loop."""
    if tensor.device.type == "cuda":
        return 4 * multiprocessor_count(tensor.device.index or torch.cuda.current_device())
    return 4


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation / statistics dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (gradcheck)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def split_fp64(value: float) -> Tuple[float, float]:
    """A host double as the fp32 (hi, lo) pair that kernels take for float scalars (Triton passes
    Python floats as fp32): hi is the fp32 rounding, hi + lo the double to ~48 bits. Kernels
    rebuild it with ``common.acc_scalar``."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def vector_stride(t: Optional[torch.Tensor]) -> int:
    """Stride of a per-channel vector (gate, γ, β) as kernels index it: 0 broadcasts a single
    value (or stands in for an absent vector, never read)."""
    return 0 if t is None or t.numel() <= 1 else t.stride(0)


def channels_inner(t: torch.Tensor) -> bool:
    """Whether channels are the contiguous axis of a [N, C, H, W] tensor (channels_last)."""
    return t.stride(1) == 1 and t.shape[1] > 1


def spatial_strides_mergeable(t: torch.Tensor) -> bool:
    """Whether (H, W) of a 4-D tensor can be walked as one index s = h·W + w with stride ``t.stride(3)``."""
    _, _, h, w = t.shape
    return h <= 1 or w <= 1 or t.stride(2) == w * t.stride(3)


def merged_spatial_stride(t: torch.Tensor) -> int:
    """The stride of the merged spatial index s when the tensor's (H, W) merge (see above)."""
    _, _, h, w = t.shape
    if w == 1:
        return t.stride(2)
    return t.stride(3)


def all_spatial_mergeable(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor that one kernel walks has mergeable (H, W): the kernel's MERGED_HW."""
    return all(spatial_strides_mergeable(t) for t in tensors)


def kernel_strides(t: Optional[torch.Tensor], merged_hw: bool, merged_ns: bool = False
                   ) -> Tuple[int, int, int, int]:
    """(n, c, h, w) strides as the kernels take them: w carries the merged spatial stride when
    ``merged_hw``, n is 0 when the batch is folded into the spatial index (``merged_ns``); an
    absent tensor (never read) gets zeros."""
    if t is None:
        return (0, 0, 0, 0)
    sn, sc, sh, sw = t.stride()
    if merged_hw:
        sw = merged_spatial_stride(t)
    if merged_ns:
        sn = 0
    return (sn, sc, sh, sw)


def tile_grid(n: int, s: int, c: int) -> Callable[[dict], tuple]:
    """Grid of the one-tile-per-program kernels: (n · S-blocks, C-blocks) for the tile the
    autotuner (or the fixed interpreter config) picks."""

    def grid(meta):
        return (n * triton.cdiv(s, meta["BLOCK_S"]), triton.cdiv(c, meta["BLOCK_C"]))

    return grid


def reduction_tile(t: torch.Tensor, s: int, tile: int = 2048, max_block_c: int = 128) -> Tuple[int, int]:
    """(BLOCK_S, BLOCK_C) of a reduction pass over ``t``'s channels and ``s`` spatial positions:
    about ``tile`` elements (per-lane accumulators live in registers), wide along whichever axis
    is contiguous so loads coalesce."""
    c = t.shape[1]
    tile = max(int(tile), 1)
    if channels_inner(t):
        block_c = min(next_power_of_2(c), max_block_c, tile)
        block_s = min(max(tile // block_c, 1), next_power_of_2(s))
    else:
        block_s = min(next_power_of_2(s), tile)
        block_c = min(next_power_of_2(c), max(tile // block_s, 1))
    return block_s, block_c


class ReducePlan(NamedTuple):
    """How a reduction pass tiles [N, C, S]: grid (N · chunks, c_blocks), each program looping
    over ``s_per_chunk`` spatial positions (a multiple of ``block_s``) of ``block_c`` channels."""
    block_s: int
    block_c: int
    c_blocks: int
    chunks: int
    s_per_chunk: int


def reduce_plan(t: torch.Tensor, programs: int, tile: int = 2048) -> ReducePlan:
    """Tile (:func:`reduction_tile`) and S-split of a per-(n, chunk) reduction over a [N, C, H, W]
    tensor: S is split into as many chunks as it takes for N · chunks · c_blocks to reach
    ``programs`` (callers pass their ``target_programs``); ``chunks == 1`` when the grid is
    already large enough. Each program writes one row of [N · chunks, C] partials."""
    n, c, h, w = t.shape
    s = h * w
    block_s, block_c = reduction_tile(t, s, tile)
    c_blocks = triton.cdiv(c, block_c)
    s_blocks = triton.cdiv(max(s, 1), block_s)
    chunks = max(1, min(s_blocks, triton.cdiv(programs, max(n * c_blocks, 1))))
    s_per_chunk = triton.cdiv(s_blocks, chunks) * block_s
    chunks = triton.cdiv(max(s, 1), s_per_chunk)  # no empty chunks
    return ReducePlan(block_s, block_c, c_blocks, chunks, s_per_chunk)


def finalize_blocks(rows: int, c: int) -> Tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of a finalize kernel merging ``rows`` partial rows of ``c`` channels:
    up to 128 channels wide, ~2048 elements a step."""
    block_c = min(next_power_of_2(c), 128)
    return min(next_power_of_2(rows), max(2048 // block_c, 1)), block_c


def gate_gradient(per_channel: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Σ over the batch per channel → the gate's gradient: summed over channels too for a
    single-value gate, in the gate's shape and dtype."""
    grad = per_channel.sum() if gate.numel() == 1 else per_channel
    return grad.reshape(gate.shape).to(gate.dtype)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def empty_like_layout(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output with the input's memory layout when it is dense (NCHW or channels_last stay as
    they are, no copies), contiguous NCHW otherwise."""
    return torch.empty_like(t, dtype=dtype, memory_format=torch.preserve_format)


Grid = Callable[[dict], tuple]
