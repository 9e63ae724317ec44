"""Launch glue shared by every kernel: configuration choice, device guard, index width, views."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Sequence

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


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def empty_like_layout(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output with the input's memory layout when it is dense (NCHW or channels_last stay as
    they are, no copies), contiguous NCHW otherwise."""
    return torch.empty_like(t, dtype=dtype, memory_format=torch.preserve_format)


Grid = Callable[[dict], tuple]
