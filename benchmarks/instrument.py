"""Counters behind ``python -m benchmarks account``: what an op costs, measured without a GPU.

Four instruments, each usable on its own:

* :class:`MockDriver` / :func:`install_mock_driver` — a fake active Triton driver (device 0,
  stream 0, an sm_90 target) plus a compile step that returns :class:`StubKernel` instead of a
  cubin. ``JITFunction.run`` then does all of its real host work — argument binding and
  specialisation, kernel-cache lookup, ``Autotuner.run`` key lookup, grid evaluation, launch
  metadata — and ends in :meth:`StubKernel.run`, which records the launch (kernel, programs)
  and does nothing. Needs ``TRITON_INTERPRET=0`` when the kernels are decorated (a real
  ``JITFunction``); tensors stay on the CPU.
* :func:`install_interpreter_counters` — under ``TRITON_INTERPRET=1``, wraps the interpreter's
  masked load/store handlers and ``InterpretedFunction.run``: every launch is recorded with its
  grid and the bytes its programs load from and store to every argument's storage (active mask
  lanes × element size).
* :class:`OpCounter` — a ``TorchDispatchMode`` that records every ATen op that would launch a
  CUDA kernel (views, ``empty*`` and metadata ops excluded), with the bytes of its tensor
  inputs and outputs; the Python implementations of ``torch.library`` custom ops are entered
  with the counter still active, so the torch ops a launcher runs around its kernels count too.
* :class:`SavedBytes` — ``saved_tensors_hooks`` that sum the distinct storages autograd keeps
  for backward (parameters excluded: they exist anyway).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

SM_COUNT = 132  # H100 SXM / H200


# --------------------------------------------------------------------------------------------
# Launch records shared by the mock driver and the interpreter counters
# --------------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch: its programs and (interpreter only) the bytes it loaded from and stored
    to each argument's storage, keyed by storage address; ``args`` names them."""
    kernel: str
    programs: int
    reads: Dict[int, int] = field(default_factory=dict)
    writes: Dict[int, int] = field(default_factory=dict)
    args: Dict[int, tuple] = field(default_factory=dict)    # storage address -> (arg name, storage bytes)

    @property
    def bytes(self) -> int:
        return sum(self.reads.values()) + sum(self.writes.values())


class LaunchLog:
    """Launches recorded while :meth:`recording` is active (thread-safe enough: autograd may
    run backward on another thread)."""

    def __init__(self) -> None:
        self.launches: Optional[List[Launch]] = None
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def recording(self) -> Iterator[List[Launch]]:
        self.launches = []
        try:
            yield self.launches
        finally:
            self.launches = None

    def add(self, launch: Launch) -> None:
        with self.lock:
            if self.launches is not None:
                self.launches.append(launch)


LOG = LaunchLog()


# --------------------------------------------------------------------------------------------
# Mock driver: Triton's real host launch path, no device
# --------------------------------------------------------------------------------------------
class StubKernel:
    """Stands in for a ``CompiledKernel``: the attributes ``JITFunction.run`` touches, and a
    ``run`` that records the launch instead of calling the C launcher."""

    def __init__(self, name: str):
        self.name = name
        self.function = None
        self.packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, grid_0, grid_1, grid_2, *rest):
        if LOG.launches is not None:
            LOG.add(Launch(self.name, int(grid_0) * int(grid_1) * int(grid_2)))


class MockDriver:
    """The methods of Triton's ``DriverBase`` that the launch path and the autotuner call."""

    def __init__(self, capability: int = 90):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability, 32)

    def is_active(self) -> bool:
        return True

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def bench(fn, *args, **kwargs):  # every autotune config "takes" 1 ms: the first one wins
            return 1.0
        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(0)

    def clear_cache(self, cache) -> None:
        pass


def install_mock_driver() -> None:
    """Activate :class:`MockDriver` and make every compile return a :class:`StubKernel`
    (process-wide; for the accounting's host-time subprocess only)."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(MockDriver())

    def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = StubKernel(self.fn.__name__)
        self.device_caches[device][0][key] = kernel
        return kernel

    JITFunction._do_compile = _do_compile


def emulate_sm_count(sm_count: int = SM_COUNT) -> int:
    """Make the launchers plan their grids for a ``sm_count``-SM GPU although tensors are on the
    CPU: every ``target_programs`` helper imported by a fusedskip kernel module is replaced by
    one returning ``4 × sm_count`` (launch.py's GPU rule). Returns how many were replaced."""
    import sys

    import fusedskip  # noqa: F401  (binds fusedskip.kernels)
    launch = sys.modules["fusedskip.kernels.launch"]
    original = getattr(launch, "target_programs", None)
    if original is None:
        return 0

    def target_programs(tensor):
        return 4 * sm_count

    replaced = 0
    for name, module in list(sys.modules.items()):
        if name.startswith("fusedskip.kernels") and getattr(module, "target_programs", None) is original:
            module.target_programs = target_programs
            replaced += 1
    return replaced


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


# --------------------------------------------------------------------------------------------
# Interpreter counters
# --------------------------------------------------------------------------------------------
class _InterpState(threading.local):
    def __init__(self) -> None:
        self.ranges: Optional[List[tuple]] = None  # (start, end, label) of the running launch
        self.launch: Optional[Launch] = None


_STATE = _InterpState()
_INSTALLED = {"interp": False}


def _account(ptrs, mask, reads: bool) -> None:
    launch, ranges = _STATE.launch, _STATE.ranges
    if launch is None or not ranges:
        return
    addr = np.asarray(ptrs.data).reshape(-1).astype(np.uint64)
    active = np.asarray(mask.data).reshape(-1) if mask is not None else None
    if active is not None:
        if active.size == 1 and addr.size > 1:
            active = np.broadcast_to(active, addr.shape)
        addr = addr[active.astype(bool)]
    if addr.size == 0:
        return
    itemsize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    target = launch.reads if reads else launch.writes
    for start, end in ranges:
        hit = int(np.count_nonzero((addr >= start) & (addr < end)))
        if hit:
            target[start] = target.get(start, 0) + hit * itemsize


def install_interpreter_counters() -> None:
    """Wrap the Triton interpreter (``TRITON_INTERPRET=1``) so that launches and their loaded
    and stored bytes go to :data:`LOG` while it records."""
    if _INSTALLED["interp"]:
        return
    from triton.runtime import interpreter as interp

    builder = interp.interpreter_builder
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store
    set_grid_dim = builder.set_grid_dim

    def create_masked_load(ptrs, mask, other, *args):
        _account(ptrs, mask, True)
        return masked_load(ptrs, mask, other, *args)

    def create_masked_store(ptrs, value, mask, *args):
        _account(ptrs, mask, False)
        return masked_store(ptrs, value, mask, *args)

    def grid_dim(x, y, z):
        if _STATE.launch is not None:
            _STATE.launch.programs = int(x) * int(y) * int(z)
        return set_grid_dim(x, y, z)

    builder.create_masked_load, builder.create_masked_store = create_masked_load, create_masked_store
    builder.set_grid_dim = grid_dim
    run = interp.InterpretedFunction.run

    def counted_run(self, *args, grid, warmup, **kwargs):
        if warmup or LOG.launches is None:
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        launch = Launch(self.fn.__name__, 0)
        ranges = []
        for name, value in list(zip(self.arg_names, args)) + list(kwargs.items()):
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                span = (storage.data_ptr(), storage.data_ptr() + storage.nbytes())
                if span not in ranges:  # a tensor passed twice (a placeholder pointer) counts once
                    ranges.append(span)
                launch.args.setdefault(storage.data_ptr(), (name, storage.nbytes()))
        _STATE.launch, _STATE.ranges = launch, ranges
        try:
            # The interpreter's own argument copies are not the kernel's traffic: keep them
            # away from any OpCounter.
            from torch.utils._python_dispatch import _disable_current_modes
            with _disable_current_modes():
                return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            _STATE.launch, _STATE.ranges = None, None
            LOG.add(launch)

    interp.InterpretedFunction.run = counted_run
    _INSTALLED["interp"] = True


# --------------------------------------------------------------------------------------------
# ATen ops that launch kernels
# --------------------------------------------------------------------------------------------
# Ops that allocate, alias or only read metadata: no kernel on a GPU.
_NO_KERNEL = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "view",
    "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "squeeze", "unsqueeze", "slice",
    "select", "split", "split_with_sizes", "unbind", "lift_fresh", "set_", "resize_", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_reshape_alias", "reshape", "view_as",
    "unflatten", "flatten", "_local_scalar_dense", "is_nonzero", "result_type", "size", "stride", "dim",
}


def _overload_name(func) -> str:
    return func._schema.name.split("::", 1)[-1]


def _custom_impl(func):
    """The Python function of a ``torch.library.custom_op`` (None for other ops)."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:
        return None
    opdef = OPDEFS.get(func._schema.name)
    return getattr(opdef, "_init_fn", None) if opdef is not None else None


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    return 0


@dataclass
class AtenOp:
    name: str
    bytes: int


class OpCounter(TorchDispatchMode):
    """Records the ATen ops that launch a kernel (one kernel each, assumed) and their bytes:
    one read of every tensor input and one write of every tensor output (a lower bound for
    ops such as GroupNorm whose CUDA kernels re-read their input)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[AtenOp] = []
        self.custom_ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims"):
            impl = _custom_impl(func)
            self.custom_ops.append(func._schema.name)
            if impl is not None:
                with self:
                    return impl(*args, **kwargs)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        name = _overload_name(func)
        if name not in _NO_KERNEL and not getattr(func, "is_view", False):
            self.ops.append(AtenOp(name, _tensor_bytes(list(args) + list(kwargs.values())) + _tensor_bytes(out)))
        return out


# --------------------------------------------------------------------------------------------
# Saved for backward
# --------------------------------------------------------------------------------------------
class SavedBytes:
    """``with SavedBytes(params) as saved: forward`` → ``saved.bytes``: distinct storages that
    autograd keeps for backward, parameters excluded."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        self.exclude = {storage_key(t) for t in exclude}
        self.storages: Dict[int, int] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        key = storage_key(t)
        if key not in self.exclude and t.device.type != "meta":
            self.storages[key] = max(self.storages.get(key, 0), t.untyped_storage().nbytes())
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())
