"""Host-side launch glue shared by every kernel: launch plans cached per input signature, the
low-overhead launch (tuned kernel called directly after its first autotune), the torch.compile
route (``triton_op`` + ``wrap_triton``), configuration and tile choice, device guard, index width,
strides and views, scalar arguments and the one reduction planner (:class:`ReducePlan`).

Launch path (eager). A launcher builds a :class:`Plan` once per input signature (shapes, strides,
dtypes, device, flags; :func:`signature`, :class:`PlanCache`): grid, scalar arguments and
constexprs, all computed with host integer arithmetic (:func:`cdiv`, :func:`next_power_of_2`).
:func:`launch` runs ``kernel[grid](*pointers, *plan.args, **plan.meta)``; for an autotuned kernel
the first launch goes through ``Autotuner.run`` (which tunes), then the plan remembers the tuned
configuration and its concrete grid and every later launch calls the ``JITFunction`` directly.
Under the interpreter the fixed configuration is used from the start.

torch.compile. :func:`traced_launch` is :func:`launch` for the body of a
``torch.library.triton_op``: ``wrap_triton(kernel)[grid](...)`` so Inductor launches the kernel from
its own code (CUDA graphs can capture it). :data:`USE_TRITON_OP` says whether ops register that way
(PyTorch >= 2.6 and compiled kernels) or as opaque ``custom_op`` s (older torch, the interpreter).
"""
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


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ in host integers (``triton.cdiv`` costs a few µs a call through its wrappers)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= max(n, 1), in host integers."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


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


# --------------------------------------------------------------------------------------------
# Launch plans and the low-overhead launch
# --------------------------------------------------------------------------------------------
class Plan:
    """One launch of one kernel, computed once per input signature: ``grid`` (a tuple, or for an
    autotuned kernel a callable of the meta-parameters, as ``kernel[grid]`` takes it), ``args``
    (the scalar arguments that follow the kernel's pointer arguments, in order) and ``meta``
    (constexprs and launch options such as ``num_warps``; never an autotuned meta-parameter).

    Kernels take every pointer first and every scalar after (the convention that makes a plan
    independent of the tensors it is launched on). ``fast`` is set by :func:`launch`.
    """

    __slots__ = ("grid", "args", "meta", "fast")

    def __init__(self, grid, args: tuple = (), meta: Optional[dict] = None):
        self.grid = grid
        self.args = tuple(args)
        self.meta = dict(meta or {})
        self.fast = None

    def __repr__(self) -> str:
        return f"Plan(grid={self.grid!r}, args={self.args!r}, meta={self.meta!r})"


def _resolved_grid(grid, meta: dict) -> tuple:
    return tuple(grid(meta)) if callable(grid) else tuple(grid)


def launch(kernel, plan: Plan, *pointers) -> None:
    """Launch ``kernel`` (a ``JITFunction``, an ``Autotuner`` or the interpreter's fixed-config
    stand-in) on ``pointers`` (tensors, in the kernel's order) with ``plan``.

    After the first launch of a plan the kernel is called as ``jit[grid](...)`` with the tuned
    (or fixed) configuration and a concrete grid: no ``Autotuner.run`` key building, no grid
    callable, no dict merges on later calls. A launch that did not run (a recording hook in
    place of ``kernel[grid]``) leaves the plan on the slow path."""
    fast = plan.fast
    if fast is not None:
        fast[0][fast[1]](*pointers, *plan.args, **fast[2])
        return
    if isinstance(kernel, _FixedConfigKernel):
        meta = {**plan.meta, **kernel.config.kwargs}
        plan.fast = (kernel.fn, _resolved_grid(plan.grid, meta), meta)
        kernel.fn[plan.fast[1]](*pointers, *plan.args, **meta)
        return
    kernel[plan.grid](*pointers, *plan.args, **plan.meta)
    if hasattr(kernel, "configs"):  # Autotuner: its choice for this key, once it has run
        config = getattr(kernel, "best_config", None)
        if config is not None:
            meta = {**plan.meta, **config.all_kwargs()}
            plan.fast = (kernel.fn, _resolved_grid(plan.grid, meta), meta)
    elif not callable(plan.grid) and hasattr(kernel, "run"):
        plan.fast = (kernel, tuple(plan.grid), plan.meta)


def traced_launch(kernel, plan: Plan, *pointers) -> None:
    """:func:`launch` inside a ``torch.library.triton_op`` body: ``wrap_triton(kernel)[grid]``,
    so make_fx / Inductor capture the kernel (an autotuner stays one for Inductor to tune)."""
    wrapped = torch.library.wrap_triton(kernel)
    wrapped[plan.grid](*pointers, *plan.args, **plan.meta)


def signature(*tensors: Optional[torch.Tensor]) -> tuple:
    """The part of a plan's cache key that the tensors give: shape, strides, dtype, device
    (None for an absent tensor)."""
    return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors])


_PLAN_CACHES: list = []


class PlanCache:
    """Plans of one launcher, keyed by :func:`signature` plus the launcher's flags.

    ``cache.get(key, build, *args)``: the cached plan(s), else ``build(*args)`` stored under key.
    The key also carries the launch module's state that changes plans (the :func:`forced_reduction`
    override), so tests that force a split never reuse a plan built without it. Keys must hold
    plain ints (static shapes); traced code (symbolic shapes) calls its builder directly.
    """

    def __init__(self, name: str, max_entries: int = 4096):
        self.name = name
        self.max_entries = max_entries
        self.plans: dict = {}
        _PLAN_CACHES.append(self)

    def get(self, key, build: Callable, *args):
        key = (key, _REDUCTION_OVERRIDE_KEY[0])
        plans = self.plans.get(key)
        if plans is None:
            plans = build(*args)
            if len(self.plans) >= self.max_entries:  # unbounded shape streams: start afresh
                self.plans.clear()
            self.plans[key] = plans
        return plans


def clear_plan_caches() -> None:
    """Forget every cached plan (after monkeypatching what plans depend on, e.g. in tests)."""
    for cache in _PLAN_CACHES:
        cache.plans.clear()


def _triton_op_available() -> bool:
    return hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


# Whether fused ops register as torch.library.triton_op (Inductor sees and launches the kernels;
# CUDA graphs capture them) or, on older torch and under the interpreter (whose kernels
# wrap_triton cannot take), as opaque custom ops.
USE_TRITON_OP = _triton_op_available() and not interpreter_active()


def register_op(name: str, mutates_args=(), schema: Optional[str] = None):
    """Decorator: the op ``fusedskip::<name>`` around a launcher body that takes a ``launcher``
    keyword (:func:`launch` or :func:`traced_launch`). With :data:`USE_TRITON_OP` the body is a
    ``triton_op`` launching through :func:`traced_launch`; otherwise a ``custom_op`` launching
    through :func:`launch`. Returns the op object (``register_fake`` etc. work on both)."""

    def decorate(body):
        if USE_TRITON_OP:
            @functools.wraps(body)
            def traced(*args, **kwargs):
                return body(*args, **kwargs, launcher=traced_launch)

            traced.__signature__ = _without_launcher(body)
            return torch.library.triton_op(f"fusedskip::{name}", traced, mutates_args=mutates_args, schema=schema)

        @functools.wraps(body)
        def eager(*args, **kwargs):
            return body(*args, **kwargs, launcher=launch)

        eager.__signature__ = _without_launcher(body)
        return torch.library.custom_op(f"fusedskip::{name}", eager, mutates_args=mutates_args, schema=schema)

    return decorate


def _without_launcher(fn):
    import inspect
    sig = inspect.signature(fn)
    return sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "launcher"])


def device_guard(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (autograd runs backward
    on another thread, and models may live on ``cuda:1`` while ``cuda:0`` is current)."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return _NO_GUARD


_NO_GUARD = contextlib.nullcontext()  # stateless: one instance serves every CPU (interpreter) launch


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
        return (n * cdiv(s, meta["BLOCK_S"]), cdiv(c, meta["BLOCK_C"]))

    return grid


class ReducePlan(NamedTuple):
    """How a reduction pass tiles [N, C, S] (the one planner of GroupNorm, BatchNorm and the
    gate gradient): grid (N · chunks, c_blocks), each program looping over ``s_per_chunk``
    spatial positions (a multiple of ``block_s``) of ``block_c`` channels of one sample and
    writing row ``n · chunks + chunk`` of [N · chunks, C] partial buffers. ``num_warps`` for the
    launch; ``rows = N · chunks``."""
    block_s: int
    block_c: int
    c_blocks: int
    chunks: int
    s_per_chunk: int
    num_warps: int = 4
    rows: int = 0


# Test hook (forced_reduction): (rows, block_s, block_c) forced on every reduction plan; the key
# is part of every PlanCache key.
_REDUCTION_OVERRIDE: dict = {}
_REDUCTION_OVERRIDE_KEY = [()]


@contextlib.contextmanager
def forced_reduction(rows: Optional[int] = None, block_s: Optional[int] = None, block_c: Optional[int] = None):
    """Force the split of every reduction plan (tests): ``rows`` programs along N·S per channel
    block at least (1 = no split beyond one per sample), ``block_s``/``block_c`` the tile (powers
    of two)."""
    previous = dict(_REDUCTION_OVERRIDE)
    _REDUCTION_OVERRIDE.update({k: v for k, v in (("rows", rows), ("block_s", block_s), ("block_c", block_c))
                                if v is not None})
    _REDUCTION_OVERRIDE_KEY[0] = tuple(sorted(_REDUCTION_OVERRIDE.items()))
    try:
        yield
    finally:
        _REDUCTION_OVERRIDE.clear()
        _REDUCTION_OVERRIDE.update(previous)
        _REDUCTION_OVERRIDE_KEY[0] = tuple(sorted(previous.items()))


def plan_reduction(n: int, c: int, s: int, inner: bool, programs: int, tile: int = 2048,
                   max_block_c: int = 128) -> ReducePlan:
    """:class:`ReducePlan` of a reduction over a [n, c, s] view (``inner``: channels are the
    contiguous axis): tiles of about ``tile`` elements, wide along the contiguous axis so loads
    coalesce; S split into as many chunks as it takes for n · chunks · c_blocks to reach
    ``programs``; no empty chunks. :func:`forced_reduction` overrides apply."""
    tile = max(int(tile), 1)
    if inner:
        block_c = min(next_power_of_2(c), max_block_c, tile)
        block_s = min(max(tile // block_c, 1), next_power_of_2(s))
    else:
        block_s = min(next_power_of_2(s), tile)
        block_c = min(next_power_of_2(c), max(tile // block_s, 1))
    force = _REDUCTION_OVERRIDE
    block_s = force.get("block_s", block_s)
    block_c = force.get("block_c", block_c)
    c_blocks = cdiv(c, block_c)
    s_blocks = cdiv(max(s, 1), block_s)
    if "rows" in force:
        want = cdiv(force["rows"], max(n, 1))
    else:
        want = cdiv(programs, max(n * c_blocks, 1))
    chunks = max(1, min(s_blocks, want))
    s_per_chunk = cdiv(s_blocks, chunks) * block_s
    chunks = cdiv(max(s, 1), s_per_chunk)
    num_warps = 8 if block_s * block_c >= 2048 else 4
    return ReducePlan(block_s, block_c, c_blocks, chunks, s_per_chunk, num_warps, n * chunks)


def reduction_tile(t: torch.Tensor, s: int, tile: int = 2048, max_block_c: int = 128) -> Tuple[int, int]:
    """(BLOCK_S, BLOCK_C) of a reduction pass over ``t``'s channels and ``s`` spatial positions
    (the tile :func:`plan_reduction` picks)."""
    plan = plan_reduction(1, t.shape[1], s, channels_inner(t), 1, tile, max_block_c)
    return plan.block_s, plan.block_c


def reduce_plan(t: torch.Tensor, programs: int, tile: int = 2048) -> ReducePlan:
    """:func:`plan_reduction` for a [N, C, H, W] tensor walked per sample (S = H·W)."""
    n, c, h, w = t.shape
    return plan_reduction(n, c, h * w, channels_inner(t), programs, tile)


_TICKETS: dict = {}


def tickets(device: torch.device, count: int, traced: bool = False) -> torch.Tensor:
    """int32 counters, all zero, for kernels that finish with their last program (each program
    takes an atomic ticket after writing its partials; the one that draws the last ticket merges
    them in a fixed order, so results stay deterministic). Eager launches share one persistent
    buffer per device that those kernels reset to zero before they exit (no memset launch; launches
    on one stream run in order). Traced launches (torch.compile) get a fresh zeroed tensor."""
    if traced:
        return torch.zeros(count, dtype=torch.int32, device=device)
    buf = _TICKETS.get(device)
    if buf is None or buf.numel() < count:
        buf = _TICKETS[device] = torch.zeros(next_power_of_2(max(count, 32)), dtype=torch.int32, device=device)
    return buf


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


def empty_like_layout(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An output with the input's memory layout when it is dense (NCHW or channels_last stay as
    they are, no copies), contiguous NCHW otherwise."""
    return torch.empty_like(t, dtype=dtype)  # memory_format=torch.preserve_format is empty_like's default


Grid = Callable[[dict], tuple]
