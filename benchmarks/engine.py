"""Cases × shapes × dtypes × layouts × providers × passes → timed rows, through the one timer.

Shared by the runner (``python -m benchmarks``) and the pytest-benchmark suite (``pytest
benchmarks/ --benchmark-only``): :func:`expand` lists the specs, :meth:`Bench.prepare` builds a
provider and the ``step(i)`` callable of a pass, :meth:`Bench.run` times it into a row.
"""
from __future__ import annotations

import contextlib
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from . import bytes_model
from .cases import (
    CASES,
    COMPILE_PROVIDERS,
    DTYPES,
    FUSED_BACKENDS,
    LAYOUTS,
    PROVIDERS,
    Case,
    Impl,
    Unavailable,
    shape_label,
)
from .models import scalar_loss
from .timing import Timer, free_memory, peak_memory, sets_needed

NO_CUDA_MESSAGE = ("no CUDA device: timing the reference path on the CPU at small sizes; "
                   "no kernel timings are claimed")
CPU_PROVIDERS = ("reference", "eager")
MEMORY_PASSES = ("full", "train", "infer")


@dataclass(frozen=True)
class Spec:
    case: str
    shape: Tuple[int, ...]
    dtype: str
    layout: str
    provider: str
    pass_: str

    @property
    def shape_label(self) -> str:
        return shape_label(self.shape)

    @property
    def group(self) -> str:
        """What the providers are compared within."""
        return f"{self.case}/{self.pass_}/{self.shape_label}/{self.dtype}/{self.layout}"

    @property
    def id(self) -> str:
        shape = self.shape_label.replace("/", "-")
        return f"{self.case}-{self.pass_}-{shape}-{self.dtype}-{self.layout}-{self.provider}"

    def impl_key(self) -> Tuple:
        return (self.case, self.shape, self.dtype, self.layout, self.provider)


def expand(size: str, cases: Optional[Sequence[str]] = None, providers: Sequence[str] = PROVIDERS,
           dtypes: Sequence[str] = tuple(DTYPES), layouts: Sequence[str] = LAYOUTS,
           passes: Optional[Sequence[str]] = None, kind: Optional[str] = None) -> List[Spec]:
    """Every spec, ordered so that one built provider serves all its passes in a row."""
    names = list(CASES) if not cases else list(cases)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    specs = []
    for name in names:
        case = CASES[name]
        if kind and case.kind != kind:
            continue
        for shape in case.shapes[size]:
            for dtype in dtypes:
                for layout in layouts:
                    for provider in providers:
                        if provider not in case.providers:
                            continue
                        for pass_ in case.passes:
                            if passes and pass_ not in passes:
                                continue
                            specs.append(Spec(name, tuple(shape), dtype, layout, provider, pass_))
    return specs


# --------------------------------------------------------------------------------------------
def compile_module(fn: Callable, provider: str) -> Callable:
    """torch.compile of an eager module, fresh: dynamo's caches are reset first so recompile
    limits can never silently drop a case back to eager."""
    import torch._dynamo
    torch._dynamo.reset()
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    if provider == "compile":
        return torch.compile(fn, dynamic=False)
    return torch.compile(fn, dynamic=False, options=max_autotune_options())


def max_autotune_options() -> Dict[str, Any]:
    import torch._inductor
    import torch._inductor.config as inductor_config
    try:
        opts = dict(torch._inductor.list_mode_options("max-autotune-no-cudagraphs"))
    except Exception:
        opts = {"max_autotune": True}
    opts["triton.cudagraphs"] = False
    if hasattr(inductor_config, "max_autotune_conv_backends"):
        opts["max_autotune_conv_backends"] = "ATEN"
    return opts


@contextlib.contextmanager
def backend_scope(name: Optional[str]) -> Iterator[None]:
    if name is None:
        yield
        return
    import fusedskip
    with fusedskip.use_backend(name):
        yield


def _gradients_of(tensors: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


@dataclass
class Prepared:
    """A provider ready to time in one pass: ``step(i)`` runs one call on input set ``i``."""
    spec: Spec
    impl: Impl
    step: Callable[[int], Any]
    n_sets: int
    set_bytes: int


class Bench:
    """Builds providers (keeping the last one, so all passes of a provider share it) and times
    specs with one :class:`Timer`."""

    def __init__(self, device: torch.device, timer: Timer, measure_memory: bool = True,
                 interpreted_kernels: bool = False):
        self.device = torch.device(device)
        self.interpreted_kernels = interpreted_kernels  # dry runs: fusedskip on the CPU interpreter
        self.timer = timer
        self.measure_memory = measure_memory and self.device.type == "cuda"
        self._impl_key: Optional[Tuple] = None
        self._impl: Optional[Impl] = None
        self._flops: Dict[str, float] = {}

    # ---------------------------------------------------------------------------------------
    def provider_unavailable(self, case: Case, provider: str) -> Optional[str]:
        if provider == "fusedskip" and self.device.type != "cuda" and not self.interpreted_kernels:
            return "the Triton kernels are timed on CUDA only (the CPU interpreter checks correctness, not speed)"
        if provider in ("fusedskip", "reference") and case.build_fused is None:
            return f"{case.name} has no fused module"
        if provider in ("eager",) + COMPILE_PROVIDERS and case.build_eager is None:
            return f"{case.name} declares no eager equivalent ({case.note})" if case.note else \
                f"{case.name} declares no eager equivalent"
        return None

    def impl(self, spec: Spec) -> Impl:
        if self._impl_key == spec.impl_key() and self._impl is not None:
            return self._impl
        self.release()
        case = CASES[spec.case]
        case.check()
        reason = self.provider_unavailable(case, spec.provider)
        if reason:
            raise Unavailable(reason)
        dtype = DTYPES[spec.dtype]
        torch.manual_seed(0)
        if spec.provider in FUSED_BACKENDS:
            impl = case.build_fused(spec.shape, dtype, spec.layout, self.device)
            impl.backend = FUSED_BACKENDS[spec.provider]
        else:
            impl = case.build_eager(spec.shape, dtype, spec.layout, self.device)
            if spec.provider in COMPILE_PROVIDERS:
                impl.fn = compile_module(impl.fn, spec.provider)
        self._impl_key, self._impl = spec.impl_key(), impl
        return impl

    def release(self) -> None:
        self._impl_key, self._impl = None, None
        free_memory(self.device, collect=True)

    # ---------------------------------------------------------------------------------------
    def prepare(self, spec: Spec, n_sets: Optional[int] = None) -> Prepared:
        """Build (or reuse) the provider, make the input sets and the step of ``spec.pass_``.
        Must run inside :meth:`scope` (backend and train/eval mode)."""
        case = CASES[spec.case]
        impl = self.impl(spec)
        dtype = DTYPES[spec.dtype]
        grad = spec.pass_ in ("fwd", "bwd", "full")

        def make():
            return case.inputs(spec.shape, dtype, spec.layout, self.device, grad)

        first = make()
        set_bytes = sum(t.numel() * t.element_size() for t in first)
        if spec.pass_ in ("bwd", "full"):
            set_bytes *= 2  # + the output gradient (and the saved activations, for bwd)
        if n_sets is None:
            n_sets = sets_needed(set_bytes, self.timer.flush_bytes) if case.rotate_inputs else 1
        sets = [first] + [make() for _ in range(n_sets - 1)]
        params = _gradients_of(impl.params)
        fn = impl.fn

        if spec.pass_ == "fwd":
            def step(i):
                return fn(*sets[i])
        elif spec.pass_ == "infer":
            def step(i):
                with torch.no_grad():
                    return fn(*sets[i])
        elif spec.pass_ == "bwd":
            outs = [fn(*s) for s in sets]
            douts = [torch.randn_like(o) for o in outs]
            wrt = [_gradients_of(s) + params for s in sets]

            def step(i):
                return torch.autograd.grad(outs[i], wrt[i], douts[i], retain_graph=True, allow_unused=True)
        elif spec.pass_ == "full":
            probe = fn(*sets[0])  # grad mode: a compiled provider compiles the graph it is timed with
            douts = [torch.randn_like(probe) for _ in sets]
            del probe
            wrt = [_gradients_of(s) + params for s in sets]

            def step(i):
                out = fn(*sets[i])
                return torch.autograd.grad(out, wrt[i], douts[i], allow_unused=True)
        elif spec.pass_ == "train":
            if not params:
                raise Unavailable("model has no trainable parameters")

            def step(i):
                return torch.autograd.grad(scalar_loss(fn(*sets[i])), params, allow_unused=True)
        else:
            raise ValueError(f"unknown pass {spec.pass_!r}")
        return Prepared(spec, impl, step, n_sets, set_bytes)

    @contextlib.contextmanager
    def scope(self, spec: Spec) -> Iterator[Impl]:
        impl = self.impl(spec)
        module = impl.module
        previous = module.training if module is not None else None
        if module is not None:
            module.train(spec.pass_ != "infer")
        try:
            with backend_scope(impl.backend):
                yield impl
        finally:
            if module is not None and previous is not None:
                module.train(previous)

    # ---------------------------------------------------------------------------------------
    def count_flops(self, spec: Spec, prepared: Prepared) -> Optional[float]:
        """Model FLOPs (convs and matmuls) with FlopCounterMode, once per group, on a plain
        PyTorch provider (custom ops would be invisible to the counter)."""
        key = f"{spec.case}/{spec.pass_}/{spec.shape_label}"  # FLOPs do not depend on dtype or layout
        if key in self._flops:
            return self._flops[key]
        if spec.provider not in ("eager", "reference"):
            return None
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            prepared.step(0)
        self._flops[key] = float(counter.get_total_flops())
        return self._flops[key]

    def run(self, spec: Spec) -> Dict[str, Any]:
        """Time ``spec``; returns a row (status ``ok`` or ``error``); raises Unavailable for a
        case or provider that cannot run here."""
        case = CASES[spec.case]
        row = base_row(spec, case)
        started = time.perf_counter()
        try:
            with self.scope(spec) as impl:
                row["note"] = impl.note
                if self.measure_memory and spec.pass_ in MEMORY_PASSES:
                    one = self.prepare(spec, n_sets=1)
                    self.timer.warmup(one.step, 1)
                    row.update(peak_memory(one.step, self.device) or {})
                    del one
                    free_memory(self.device)
                prepared = self.prepare(spec)
                timing = self.timer.measure(prepared.step, prepared.n_sets)
                row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                           mean_ms=timing.mean_ms, runs=timing.runs, input_sets=timing.input_sets,
                           method=timing.method)
                if timing.note:
                    row["note"] = "; ".join(filter(None, [row["note"], timing.note]))
                if case.kind == "model":
                    row["flops"] = self.count_flops(spec, prepared)
                del prepared
        except Unavailable:
            raise
        except Exception as exc:  # one failing provider must not end the run
            first_line = str(exc).splitlines()[0] if str(exc) else ""
            row.update(status="error", error=f"{type(exc).__name__}: {first_line}"[:300])
            row["traceback"] = traceback.format_exc(limit=6)
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                self.release()
        finally:
            free_memory(self.device)
            row["wall_s"] = time.perf_counter() - started  # build + compile + warm-up + timing
        return row


ROW_FIELDS = ("case", "kind", "pass", "shape", "dtype", "layout", "provider", "status",
              "median_ms", "p20_ms", "p80_ms", "mean_ms", "runs", "input_sets", "method",
              "act_mb", "bytes", "flops", "gbps", "copy_gbps", "frac_copy", "tflops", "peak_mb", "peak_extra_mb",
              "speedup_vs_eager", "speedup_vs_compile", "speedup_vs_compile_max_autotune",
              "speedup_vs_reference", "wall_s", "note", "error")


def base_row(spec: Spec, case: Case) -> Dict[str, Any]:
    row: Dict[str, Any] = {k: None for k in ROW_FIELDS}
    itemsize = DTYPES[spec.dtype].itemsize if hasattr(DTYPES[spec.dtype], "itemsize") else \
        torch.empty((), dtype=DTYPES[spec.dtype]).element_size()
    n, c, h, w = spec.shape[:4]
    row.update(case=spec.case, kind=case.kind, shape=spec.shape_label, dtype=spec.dtype, layout=spec.layout,
               provider=spec.provider, status="ok", note="", error="", act_mb=n * c * h * w * itemsize / 1e6)
    row["pass"] = spec.pass_
    if case.byte_model:
        row["bytes"], row["flops"] = bytes_model.traffic(case.byte_model, spec.pass_, case.dims(spec.shape), itemsize)
    return row
