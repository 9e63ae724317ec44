"""Compile every Triton kernel variant that fusedskip's ops launch, for a Hopper GPU (sm_90), on the CPU.

Run as a script with ``TRITON_INTERPRET`` unset, so ``triton.jit`` yields real ``JITFunction``
objects::

    python tests/compile_recorder.py --json report.json [--workers 2] [--coverage default|wide]

tests/test_gpu_compile.py runs it in a subprocess and checks the report. Why: the other tests run
the kernels under Triton's CPU interpreter, which accepts code that the real compiler rejects (a
plain Python float global read in a kernel, for one), and there is no GPU here. ``triton.compile``
for ``GPUTarget("cuda", 90, 32)`` runs the whole NVIDIA pipeline (TTIR → TTGIR → LLVM IR → PTX →
ptxas → cubin) without a GPU.

1. Record. ``JITFunction.run`` and ``Autotuner.run`` are replaced: a launch is specialised exactly
   as Triton's launcher would do it (Triton's own binder and ``_pack_args``: pointer dtypes, ints
   as i32 / i64 by value, ints equal to 1 and 16-divisibility specialised, ``do_not_specialize``
   honoured, constexprs from kwargs / autotune config / defaults, launch options), the launcher's
   grid is evaluated, the variant is recorded and nothing launches. ``fusedskip.backend`` is set
   to the Triton path for CPU tensors (``interpreter_active`` returns True), and
   ``launch.target_programs`` returns an H100's value so grids and S-splits are the GPU's. The op
   outputs are garbage (no kernel runs): only compilation matters. The public ops are then driven,
   forward and backward, over dtypes, layouts, activations, affine, skip, gate kinds, training /
   eval and edge shapes, and once more with ``needs_int64`` forced True in every kernels module.
2. Select (recording is cheap, a compile costs ~0.3–1 s). Per kernel, a greedy cover of targets:
   ``default``: every value of every constexpr the kernel declares (tile sizes: smallest and
   largest), every dtype of every pointer argument, every int argument that gets specialised to
   1, every num_warps, every activation × accumulation dtype pair (fp32 / fp64 math of each
   activation and its derivative); autotuned kernels compile their first, largest and widest
   configs. ``wide``: every value of every specialisation feature (all tile sizes, alignment,
   i32/i64, every autotune config) and every pair of values of the declared constexprs and
   pointer dtypes (~5x the compiles). ``all``: every recorded variant (autotune configs spread).
3. Compile the selection for sm_90 in a process pool (spawned workers; a tiny probe kernel first
   tells whether the toolchain works at all) and report errors per variant.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import itertools
import json
import multiprocessing
import os
import pkgutil
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

TARGET_ARCH = 90       # Hopper (H100 / H200)
TARGET_WARP_SIZE = 32
H100_SMS = 132         # launch.target_programs as on an H100
COVERAGES = ("default", "wide", "all")

warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


# ----------------------------------------------------------------------------------------------
# Triton plumbing
# ----------------------------------------------------------------------------------------------
def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", TARGET_ARCH, TARGET_WARP_SIZE)


_BACKEND = None


def _backend():
    global _BACKEND
    if _BACKEND is None:
        from triton.compiler.compiler import make_backend
        _BACKEND = make_backend(_target())
    return _BACKEND


def _jit_function(obj):
    """The JITFunction behind a JITFunction / Autotuner / Heuristics object, else None."""
    from triton.runtime.jit import JITFunction
    for _ in range(8):
        if obj is None or isinstance(obj, JITFunction):
            break
        obj = getattr(obj, "fn", None)
    return obj if isinstance(obj, JITFunction) else None


def kernel_id(fn) -> str:
    return f"{fn.fn.__module__}.{fn.fn.__qualname__}"


def discover_kernels() -> Tuple[Dict[str, Any], List[Any]]:
    """(every ``@triton.jit`` kernel named ``_*_kernel`` defined in a fusedskip.kernels module, the modules)."""
    import fusedskip  # noqa: F401  (binds fusedskip.kernels in a source checkout)
    package = importlib.import_module("fusedskip.kernels")
    found: Dict[str, Any] = {}
    modules = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"fusedskip.kernels.{info.name}")
        modules.append(module)
        for name, obj in vars(module).items():
            fn = _jit_function(obj)
            if fn is None or not (name.startswith("_") and name.endswith("_kernel")):
                continue
            if fn.fn.__module__ == module.__name__:  # defined here, not imported from a sibling
                found[kernel_id(fn)] = fn
    return found, modules


def triton_api_problem() -> Optional[str]:
    """The private Triton APIs the recorder mirrors the launcher with (None when present)."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.compiler.compiler import make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"Triton's launcher internals are not importable: {type(err).__name__}: {err}"
    if not hasattr(JITFunction, "_pack_args"):
        return f"triton {triton.__version__} lacks JITFunction._pack_args, which the recorder mirrors"
    return None


def compile_variant(fn, signature, constexprs, attrs, options):
    import triton
    from triton.compiler import ASTSource
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target(), options=options)


_PROBE_SRC = '''import triton
import triton.language as tl


@triton.jit
def _probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) * 2.0, mask=o < n)
'''


def toolchain_problem() -> Optional[str]:
    """Why sm_90 compilation cannot run here, None when a tiny kernel compiles to a cubin."""
    try:
        from triton.runtime.jit import JITFunction
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "fusedskip_compile_probe.py")
            with open(path, "w") as f:
                f.write(_PROBE_SRC)
            spec = importlib.util.spec_from_file_location("fusedskip_compile_probe", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            fn = module._probe_kernel
            if not isinstance(fn, JITFunction):
                return "triton.jit did not give a JITFunction (is TRITON_INTERPRET set?)"
            options = _backend().parse_options({"num_warps": 4}).__dict__
            kernel = compile_variant(fn, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {(2,): 128}, {},
                                     options)
        if "cubin" not in kernel.asm:
            return "triton.compile produced no cubin for sm_90"
    except Exception as err:  # noqa: BLE001
        return f"triton.compile for cuda sm_{TARGET_ARCH} is unavailable here: {type(err).__name__}: {err}"
    return None


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------
class Variant:
    """One compilation: a kernel, its full specialisation and its launch options.

    ``features`` (name → str) describe the specialisation for the selection: declared constexprs
    (``repr`` of the value), pointer arguments (``*fp32`` / ``*fp32:D`` when 16-byte aligned),
    ints (``i32``, ``i32:D``, ``i64``, or ``=1`` when specialised to the constant 1), num_warps,
    and ``config`` (index into the autotuner's configs).
    """

    def __init__(self, kid, module, name, signature, constexprs, attrs, options, features, declared,
                 configs=None, option_kwargs=None, param_index=None):
        self.kid, self.module, self.name = kid, module, name
        self.signature, self.constexprs, self.attrs, self.options = signature, constexprs, attrs, options
        self.features = features
        self.declared = declared  # the kernel's own constexpr parameters (config-set ones excluded)
        self.key = (kid, repr(sorted(signature.items())), repr(sorted(constexprs.items())),
                    repr(sorted(attrs.items())), repr(sorted((k, repr(v)) for k, v in options.items())))
        self.cases: List[str] = []  # the first driving cases that launched it
        # Autotuned kernels: a call is recorded once (with config 0); `with_config` derives the
        # variant of another config (configs set only constexprs and launch options).
        self.configs = configs
        self.option_kwargs = option_kwargs
        self.param_index = param_index
        self.config_index: Optional[int] = None

    def with_config(self, index: int) -> "Variant":
        config = self.configs[index]
        constexprs = dict(self.constexprs)
        features = dict(self.features)
        for name, value in config.kwargs.items():
            constexprs[(self.param_index[name],)] = value
            features[name] = repr(value)
        options = dict(_backend().parse_options({**self.option_kwargs, **config.all_kwargs()}).__dict__)
        features["num_warps"] = str(options["num_warps"])
        features["config"] = str(index)
        v = Variant(self.kid, self.module, self.name, self.signature, constexprs, self.attrs, options, features,
                    self.declared)
        v.cases, v.config_index = self.cases, index
        return v

    def job(self):
        return (self.module, self.name, self.signature, self.constexprs, self.attrs, self.options)

    def describe(self) -> Dict[str, Any]:
        constexprs = {n: self.features[n] for n in self.declared if n in self.features}
        constexprs.update({n: v for n, v in self.features.items() if n.startswith("BLOCK")})
        pointers = {n: v for n, v in self.features.items() if v.startswith("*")}
        return {"kernel": self.kid, "constexprs": constexprs, "pointers": pointers,
                "num_warps": self.features.get("num_warps"), "config": self.config_index,
                "signature": self.signature, "cases": self.cases[:3]}


class Recorder:
    def __init__(self):
        self.variants: Dict[tuple, Variant] = {}
        self.launches: Dict[str, int] = {}
        self.launch_errors: List[Dict[str, str]] = []
        self.case = "?"
        self._binders: Dict[int, Callable] = {}
        self._seen: Dict[tuple, Variant] = {}

    def _binder(self, fn):
        binder = self._binders.get(id(fn))
        if binder is None:
            from triton.runtime.jit import create_function_from_signature
            binder = create_function_from_signature(fn.signature, fn.params, _backend())
            self._binders[id(fn)] = binder
        return binder

    def record(self, fn, args, kwargs, grid, configs=None):
        """One launch of ``fn`` (``configs``: the autotuner's, recorded with the first)."""
        from triton import knobs
        kid = kernel_id(fn)
        self.launches[kid] = self.launches.get(kid, 0) + 1
        # What JITFunction.run adds to the launch kwargs before binding.
        option_kwargs = {**kwargs, "debug": kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                         "instrumentation_mode": knobs.compilation.instrumentation_mode,
                         "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}
        try:
            if configs:
                # Autotuner.run passes **kwargs, **config.all_kwargs(): a launcher must not set a tuned one.
                conflicts = sorted(set(kwargs) & set(configs[0].all_kwargs()))
                if conflicts:
                    raise ValueError(f"launch sets autotuned meta-parameters {conflicts}")
            kwargs = {**option_kwargs, **configs[0].all_kwargs()} if configs else dict(option_kwargs)
            bound_args, specialization, options = self._binder(fn)(*args, **kwargs)
            # The launcher's grid must evaluate on the bound arguments, as JITFunction.run calls it.
            for config in (configs or [None]):
                meta = bound_args if config is None else {**bound_args, **config.all_kwargs()}
                g = grid(meta) if callable(grid) else grid
                if not (isinstance(g, (tuple, list)) and 1 <= len(g) <= 3
                        and all(isinstance(v, int) and v >= 0 for v in g)):
                    raise TypeError(f"grid must be a tuple of 1 to 3 ints >= 0, got {g!r}")
            seen_key = (id(fn), tuple(map(tuple, specialization)),
                        tuple(sorted((k, repr(v)) for k, v in options.items())))
            known = self._seen.get(seen_key)
            if known is None:
                packed = fn._pack_args(_backend(), kwargs, bound_args, specialization, options)
        except Exception as err:  # a launch Triton itself would refuse
            self.launch_errors.append({"kernel": kid, "case": self.case, "error": f"{type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc(limit=6)})
            return
        if known is None:
            known = self._new_variant(fn, kid, specialization, packed, configs, option_kwargs)
            known = self.variants.setdefault(known.key, known)
            self._seen[seen_key] = known
        if len(known.cases) < 3 and self.case not in known.cases:
            known.cases.append(self.case)

    @staticmethod
    def _new_variant(fn, kid, specialization, packed, configs, option_kwargs) -> Variant:
        options, signature, constexprs, attrs = packed
        tuned = set(configs[0].kwargs) if configs else set()
        features: Dict[str, str] = {}
        declared: List[str] = []
        for param, (kind, value) in zip(fn.params, (s[:2] for s in specialization)):
            if param.name in tuned:  # set per config by with_config
                continue
            if param.is_constexpr:
                features[param.name] = repr(value)
                if not param.name.startswith("BLOCK"):
                    declared.append(param.name)
            elif kind == "constexpr":  # an int specialised to 1 (or None)
                features[param.name] = f"={value!r}"
            else:
                features[param.name] = kind + (f":{value}" if value else "")
        if not configs:
            features["num_warps"] = str(options.num_warps)
        return Variant(kid, fn.fn.__module__, fn.fn.__name__, signature, dict(constexprs), dict(attrs),
                       dict(options.__dict__), features, declared,
                       configs=list(configs) if configs else None, option_kwargs=option_kwargs,
                       param_index={p.name: p.num for p in fn.params})


RECORDER = Recorder()


def install_hooks(kernel_modules) -> None:
    """Launch nothing, record; the public ops take the Triton path on CPU tensors."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    import fusedskip.backend

    def jit_run(self, *args, grid, warmup, **kwargs):
        RECORDER.record(self, args, kwargs, grid)
        return None

    def autotuner_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        if _jit_function(self) is not self.fn:
            raise NotImplementedError(f"{self.fn!r}: an autotuner over heuristics is not recorded")
        RECORDER.record(self.fn, args, kwargs, grid, configs=self.configs)
        return None

    JITFunction.run = jit_run
    Autotuner.run = autotuner_run
    fusedskip.backend.interpreter_active = lambda: True
    fusedskip.backend.set_backend("triton")

    def gpu_programs(tensor):  # launch.target_programs on an H100
        return 4 * H100_SMS

    for module in kernel_modules:
        if hasattr(module, "target_programs"):
            module.target_programs = gpu_programs


@contextlib.contextmanager
def forced_int64(kernel_modules):
    """Every launcher indexes in int64 (``needs_int64`` returns True in every kernels module)."""
    saved = {m: m.needs_int64 for m in kernel_modules if hasattr(m, "needs_int64")}
    for module in saved:
        module.needs_int64 = lambda *tensors: True
    try:
        yield
    finally:
        for module, fn in saved.items():
            module.needs_int64 = fn


# ----------------------------------------------------------------------------------------------
# Driving the public ops. Each driver resolves the API it needs first (a missing op or class
# skips the driver with the reason), then yields (label, case) pairs.
# ----------------------------------------------------------------------------------------------
ACTS = ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh")
LAYOUTS = ("nchw", "channels_last", "strided")
Cases = Iterable[Tuple[str, Callable[[], None]]]


def _dtypes():
    import torch
    return (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def make(shape, dtype, layout="nchw", requires_grad=False):
    """A [N, C, H, W] tensor; ``strided``: a view whose (H, W) do not merge into one stride (every
    other column of a wider tensor, channels permuted; its data pointer is not 16-byte aligned)."""
    import torch
    n, c, h, w = shape
    if layout == "strided":
        x = torch.randn(n, h, c, 2 * w + 1, dtype=dtype).permute(0, 2, 1, 3)[..., 1::2]
    elif layout == "channels_last":
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(shape, dtype=dtype)
    assert tuple(x.shape) == tuple(shape)
    return x.requires_grad_(requires_grad)


def backward(out, how: str = "randn"):
    import torch
    if how == "sum":  # an expanded (stride-0) incoming gradient
        out.float().sum().backward()
    elif how == "channels_last":
        out.backward(torch.randn_like(out).contiguous(memory_format=torch.channels_last))
    else:
        out.backward(torch.randn_like(out))


def cases_gated_skip() -> Cases:
    import torch

    from fusedskip.ops.gated_skip import GatedSkip, gated_skip_add
    shape = (2, 8, 5, 6)
    for dtype, layout, gate_kind in itertools.product(_dtypes(), LAYOUTS, ("float", "scalar", "channel")):
        def case(dtype=dtype, layout=layout, gate_kind=gate_kind):
            gate = {"float": 0.7, "scalar": torch.tensor([0.5], requires_grad=True),
                    "channel": torch.rand(shape[1], requires_grad=True)}[gate_kind]
            backward(gated_skip_add(make(shape, dtype, layout, True), make(shape, dtype, layout, True), gate))
        yield f"gated_skip_add {dtype} {layout} gate={gate_kind}", case
    for dtype in _dtypes():
        def no_dskip(dtype=dtype):  # NEED_DSKIP off, NEED_DGATE on; mixed layouts
            out = gated_skip_add(make(shape, dtype, "nchw", True), make(shape, dtype, "channels_last"),
                                 torch.rand(shape[1], requires_grad=True))
            backward(out, "sum")
        yield f"gated_skip_add {dtype} skip without grad", no_dskip
    for kind in ("softplus", "softplus_channel", "sigmoid_channel", 0.5):
        for shp, layout in (((1, 1, 7, 3), "channels_last"), ((2, 3, 1, 1), "nchw"), ((2, 64, 48, 48), "nchw"),
                            ((2, 256, 16, 16), "channels_last"), ((3, 5, 6, 1), "strided")):
            def module_case(kind=kind, shp=shp, layout=layout):
                m = GatedSkip(shp[1], gate=kind)
                out = m(make(shp, torch.float32, layout, True), make(shp, torch.float32, layout, True))
                backward(out, "channels_last")
            yield f"GatedSkip({kind}) {shp} {layout}", module_case


def cases_group_norm() -> Cases:
    import torch

    from fusedskip.ops.group_norm_act import GroupNormAct, InstanceNormAct2d, group_norm_act
    shape, groups = (2, 8, 5, 6), 4
    c = shape[1]
    for dtype, layout, act, has_skip in itertools.product(_dtypes(), LAYOUTS, ACTS, (False, True)):
        def case(dtype=dtype, layout=layout, act=act, has_skip=has_skip):
            w = torch.rand(c, dtype=dtype, requires_grad=True)
            b = torch.rand(c, dtype=dtype, requires_grad=True)
            skip = make(shape, dtype, layout, True) if has_skip else None
            gate = torch.rand(c, requires_grad=True) if has_skip else None
            backward(group_norm_act(make(shape, dtype, layout, True), groups, w, b, 1e-5, act, 0.2,
                                    skip=skip, gate=gate))
        yield f"group_norm_act {dtype} {layout} {act} skip={has_skip}", case
    # Weight only / bias only / neither, as fp32 parameters with any x (autocast).
    for dtype, (has_w, has_b), act in itertools.product(_dtypes(), ((True, False), (False, True), (False, False)),
                                                        ("relu", "gelu")):
        def affine_case(dtype=dtype, has_w=has_w, has_b=has_b, act=act):
            w = torch.rand(c, requires_grad=True) if has_w else None
            b = torch.rand(c, requires_grad=True) if has_b else None
            backward(group_norm_act(make(shape, dtype, "nchw", True), groups, w, b, 1e-5, act), "sum")
        yield f"group_norm_act {dtype} weight={has_w} bias={has_b} {act}", affine_case
    # The needs_input_grad combinations; scalar and float gates.
    for dtype, (x_grad, skip_grad, gate_kind) in itertools.product(
            _dtypes(), ((False, True, "channel"), (True, False, "scalar"), (False, False, "channel"),
                        (True, True, "float"), (False, False, "float"))):
        def grads_case(dtype=dtype, x_grad=x_grad, skip_grad=skip_grad, gate_kind=gate_kind):
            gate = {"float": 0.3, "scalar": torch.tensor(0.5, requires_grad=True),
                    "channel": torch.rand(c, requires_grad=True)}[gate_kind]
            w = torch.rand(c, dtype=dtype, requires_grad=True)
            backward(group_norm_act(make(shape, dtype, "channels_last", x_grad), 2, w, None, 1e-5, "silu",
                                    skip=make(shape, dtype, "nchw", skip_grad), gate=gate))
        yield f"group_norm_act {dtype} x.grad={x_grad} skip.grad={skip_grad} gate={gate_kind}", grads_case
    # Shapes that move tiles, chunks and the ints specialised to 1 (N, C/G, H, W = 1; S > tile).
    for (shp, g), layout in itertools.product(
            (((1, 1, 1, 3), 1), ((1, 4, 1, 1), 2), ((2, 3, 7, 1), 3), ((1, 64, 48, 48), 32),
             ((4, 256, 8, 8), 32), ((2, 96, 33, 17), 32)), LAYOUTS):
        def module_case(shp=shp, g=g, layout=layout):
            backward(GroupNormAct(g, shp[1], act="silu")(make(shp, torch.float32, layout, True)))
        yield f"GroupNormAct({g}, {shp[1]}) {shp} {layout}", module_case
    for dtype, affine in itertools.product(_dtypes(), (False, True)):
        def instance_case(dtype=dtype, affine=affine):
            m = InstanceNormAct2d(6, affine=affine, act="leaky_relu").to(dtype)
            backward(m(make((2, 6, 9, 10), dtype, "channels_last", True)))
        yield f"InstanceNormAct2d {dtype} affine={affine}", instance_case


def cases_skip_norm_act() -> Cases:
    from fusedskip.ops.skip_norm_act import SkipNormAct
    shape = (2, 8, 5, 6)
    for dtype, layout, gate in itertools.product(_dtypes(), LAYOUTS, ("softplus", "softplus_channel", 0.5)):
        def group_case(dtype=dtype, layout=layout, gate=gate):
            m = SkipNormAct(shape[1], norm="group", num_groups=4, act="gelu_tanh", gate=gate).to(dtype)
            backward(m(make(shape, dtype, layout, True), make(shape, dtype, layout, True)))
        yield f"SkipNormAct(group) {dtype} {layout} gate={gate}", group_case
    for dtype, layout, training, track in itertools.product(_dtypes(), LAYOUTS, (True, False), (True, False)):
        def batch_case(dtype=dtype, layout=layout, training=training, track=track):
            m = SkipNormAct(shape[1], norm="batch", act="relu", gate="sigmoid_channel", track_running_stats=track)
            m.train(training)
            backward(m(make(shape, dtype, layout, True), make(shape, dtype, layout, True)))
        yield f"SkipNormAct(batch) {dtype} {layout} training={training} track={track}", batch_case


def cases_batch_norm() -> Cases:
    import torch

    from fusedskip.ops.batch_norm_act import BatchNormAct2d, batch_norm_act
    shape = (2, 8, 5, 6)
    c = shape[1]
    for dtype, layout, act, training, has_skip in itertools.product(_dtypes(), LAYOUTS, ACTS, (True, False),
                                                                    (False, True)):
        def case(dtype=dtype, layout=layout, act=act, training=training, has_skip=has_skip):
            m = BatchNormAct2d(c, act=act, negative_slope=0.1).to(dtype).train(training)
            x = make(shape, dtype, layout, True)
            out = m(x, make(shape, dtype, layout, True), torch.rand(c, requires_grad=True)) if has_skip else m(x)
            backward(out)
        yield f"BatchNormAct2d {dtype} {layout} {act} training={training} skip={has_skip}", case
    # Weight only / bias only / neither, as fp32 parameters with any x.
    for dtype, (has_w, has_b), training in itertools.product(
            _dtypes(), ((False, False), (True, False), (False, True)), (True, False)):
        def affine_case(dtype=dtype, has_w=has_w, has_b=has_b, training=training):
            w = torch.rand(c, requires_grad=True) if has_w else None
            b = torch.rand(c, requires_grad=True) if has_b else None
            out = batch_norm_act(make(shape, dtype, "nchw", True), torch.zeros(c), torch.ones(c), w, b, training,
                                 0.1, 1e-5, "silu")
            backward(out, "sum")
        yield f"batch_norm_act {dtype} weight={has_w} bias={has_b} training={training}", affine_case
    # Cumulative average (momentum=None), no running statistics (eval then uses batch statistics).
    for dtype, momentum, track in itertools.product(_dtypes(), (0.1, None), (True, False)):
        def stats_case(dtype=dtype, momentum=momentum, track=track):
            m = BatchNormAct2d(c, momentum=momentum, track_running_stats=track, affine=False, act="gelu")
            backward(m(make(shape, dtype, "channels_last", True)))
            m.eval()
            backward(m(make(shape, dtype, "channels_last", True)))
        yield f"BatchNormAct2d {dtype} momentum={momentum} track={track}", stats_case
    # The needs_input_grad combinations; scalar and float gates.
    for dtype, (x_grad, skip_grad, gate_kind), training in itertools.product(
            _dtypes(), ((False, True, "channel"), (True, False, "scalar"), (False, False, "channel"),
                        (True, True, "float"), (False, True, "float")), (True, False)):
        def grads_case(dtype=dtype, x_grad=x_grad, skip_grad=skip_grad, gate_kind=gate_kind, training=training):
            m = BatchNormAct2d(c, act="leaky_relu").train(training)
            gate = {"float": 0.3, "scalar": torch.tensor([0.5], requires_grad=True),
                    "channel": torch.rand(c, requires_grad=True)}[gate_kind]
            out = m(make(shape, dtype, "strided", x_grad), make(shape, dtype, "nchw", skip_grad), gate)
            backward(out, "channels_last")
        yield (f"BatchNormAct2d {dtype} x.grad={x_grad} skip.grad={skip_grad} gate={gate_kind} "
               f"training={training}"), grads_case
    # Shapes that move tiles, row splits and the ints specialised to 1.
    for (shp, layout), training in itertools.product(
            (((2, 1, 1, 1), "nchw"), ((1, 3, 1, 5), "channels_last"), ((2, 5, 7, 1), "strided"),
             ((8, 16, 48, 48), "nchw"), ((4, 512, 8, 8), "channels_last"), ((16, 3, 64, 64), "channels_last"),
             ((2, 96, 33, 17), "strided")), (True, False)):
        def shape_case(shp=shp, layout=layout, training=training):
            m = BatchNormAct2d(shp[1], act="relu").train(training)
            backward(m(make(shp, torch.float32, layout, True)))
        yield f"BatchNormAct2d {shp} {layout} training={training}", shape_case
    # SyncBatchNorm's merge of per-rank statistics (fusedskip.distributed), called directly.
    for dtype, track in itertools.product((torch.float32, torch.float64), (True, False)):
        def merge_case(dtype=dtype, track=track):
            counts = torch.tensor([12.0, 20.0, 7.0], dtype=dtype)
            rm, rv = (torch.zeros(c), torch.ones(c)) if track else (None, None)
            torch.ops.fusedskip.batch_norm_act_merge_stats(
                counts, torch.randn(3, c, dtype=dtype), torch.rand(3, c, dtype=dtype), rm, rv,
                torch.tensor(3) if track else None, 0.0, 1e-5)
        yield f"batch_norm_act_merge_stats {dtype} running={track}", merge_case


def cases_conv_norm_act() -> Cases:
    import torch

    from fusedskip.ops.conv_norm_act import ConvNormAct
    for norm, bias, training, layout in itertools.product(("batch", "group", "instance", None), (None, True),
                                                          (True, False), ("nchw", "channels_last")):
        def case(norm=norm, bias=bias, training=training, layout=layout):
            m = ConvNormAct(3, 16, 3, norm=norm, num_groups=4, bias=bias, act="silu").train(training)
            if layout == "channels_last":
                m = m.to(memory_format=torch.channels_last)
            x = make((2, 3, 9, 8), torch.float32, layout, True)
            backward(m(x))
            if norm == "batch" and not training:
                backward(m.fold_bn()(x))
        yield f"ConvNormAct norm={norm} bias={bias} training={training} {layout}", case


DRIVERS = (("gated_skip_add / GatedSkip", cases_gated_skip),
           ("group_norm_act / GroupNormAct / InstanceNormAct2d", cases_group_norm),
           ("SkipNormAct (group, batch)", cases_skip_norm_act),
           ("batch_norm_act / BatchNormAct2d", cases_batch_norm),
           ("ConvNormAct", cases_conv_norm_act))


def drive(kernel_modules, int64_pass: bool = True) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """Run every case, then again with int64 indexing forced: (driver errors, skipped ops)."""
    import torch
    errors: List[Dict[str, str]] = []
    skipped: Dict[str, str] = {}
    passes = [("", contextlib.nullcontext)]
    if int64_pass:
        passes.append(("[int64] ", lambda: forced_int64(kernel_modules)))
    for prefix, context in passes:
        for op, driver in DRIVERS:
            if op in skipped:
                continue
            try:
                cases = list(driver())  # resolves the op's API
            except (ImportError, AttributeError) as err:  # an op still in progress
                skipped[op] = f"{type(err).__name__}: {err}"
                continue
            with context():
                for label, case in cases:
                    RECORDER.case = prefix + label
                    torch.manual_seed(0)
                    try:
                        case()
                    except Exception as err:  # noqa: BLE001 - a launcher or op bug: reported
                        errors.append({"case": RECORDER.case, "error": f"{type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc(limit=8)})
    return errors, [{"op": op, "reason": reason} for op, reason in skipped.items()]


# ----------------------------------------------------------------------------------------------
# Selection
# ----------------------------------------------------------------------------------------------
def _dtype(feature: str) -> str:
    return feature.split(":")[0]


def _targets_default(v: Variant, block_extremes: Dict[str, set]) -> set:
    f = v.features
    out = {("const", n, f[n]) for n in v.declared}
    for name, value in f.items():
        if value.startswith("*"):
            out.add(("ptr", name, _dtype(value)))
        elif value == "=1":
            out.add(("int1", name))
        elif name.startswith("BLOCK") and value in block_extremes.get(name, ()):
            out.add(("block", name, value))
    out.add(("num_warps", f.get("num_warps")))
    if "ACT" in f:
        out.add(("act x acc", f["ACT"], f.get("ACC_FP64")))
    return out


def _targets_wide(v: Variant) -> set:
    f = v.features
    out = {("1", n, x) for n, x in f.items() if n != "config"}
    paired = sorted(list(v.declared) + [n for n, x in f.items() if x.startswith("*")])
    values = {n: (_dtype(f[n]) if f[n].startswith("*") else f[n]) for n in paired}
    out |= {("2", a, values[a], b, values[b]) for a, b in itertools.combinations(paired, 2)}
    return out


def _greedy(candidates: List[Tuple[Variant, set]]) -> List[Variant]:
    uncovered = set().union(*(t for _, t in candidates)) if candidates else set()
    candidates = list(candidates)
    picks = []
    while uncovered:
        best, gain = None, 0
        for item in candidates:  # the first best in recording order: deterministic
            g = len(item[1] & uncovered)
            if g > gain:
                best, gain = item, g
        picks.append(best[0])
        uncovered -= best[1]
        candidates.remove(best)
    return picks


def _key_configs(configs) -> List[int]:
    """First, largest (elements, then warps) and widest (BLOCK_C, then elements) of an autotuner's configs."""
    def elements(cfg):
        n = 1
        for value in cfg.kwargs.values():
            n *= value if isinstance(value, int) else 1
        return n
    indices = list(range(len(configs)))
    largest = max(indices, key=lambda i: (elements(configs[i]), configs[i].num_warps or 0, -i))
    widest = max(indices, key=lambda i: (configs[i].kwargs.get("BLOCK_C", 0), elements(configs[i]),
                                         configs[i].num_warps or 0, -i))
    return sorted({0, largest, widest})


def select(variants: List[Variant], coverage: str = "default") -> List[Variant]:
    by_kernel: Dict[str, List[Variant]] = {}
    for v in variants:
        by_kernel.setdefault(v.kid, []).append(v)
    chosen: List[Variant] = []
    for kid in sorted(by_kernel):
        group = by_kernel[kid]
        configs = group[0].configs
        if coverage == "all":
            picks = group
        elif coverage == "wide":
            picks = _greedy([(v, _targets_wide(v)) for v in group])
        else:
            values: Dict[str, set] = {}
            for v in group:
                for name, value in v.features.items():
                    if name.startswith("BLOCK"):
                        values.setdefault(name, set()).add(int(value))
            extremes = {name: {repr(min(s)), repr(max(s))} for name, s in values.items()}
            picks = _greedy([(v, _targets_default(v, extremes)) for v in group])
        if configs:  # spread the configs to compile over the picked calls, each config at least once
            wanted = list(range(len(configs))) if coverage in ("wide", "all") else _key_configs(configs)
            picks = [picks[i % len(picks)].with_config(wanted[i % len(wanted)])
                     for i in range(max(len(picks), len(wanted)))]
        chosen.extend(picks)
    return chosen


# ----------------------------------------------------------------------------------------------
# Compilation (spawned worker processes)
# ----------------------------------------------------------------------------------------------
def _worker_init():
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    import fusedskip  # noqa: F401


def compile_job(job) -> Dict[str, Any]:
    module, name, signature, constexprs, attrs, options = job
    start = time.perf_counter()
    try:
        fn = _jit_function(getattr(importlib.import_module(module), name))
        kernel = compile_variant(fn, signature, constexprs, attrs, options)
        error = None if "cubin" in kernel.asm else "no cubin produced"
    except Exception as err:  # noqa: BLE001 - every compile failure is a finding
        # Errors inside jit helpers arrive chained (the call site first): keep the whole chain.
        parts, seen = [], set()
        while err is not None and id(err) not in seen and len(parts) < 6:
            seen.add(id(err))
            parts.append(f"{type(err).__name__}: {err}")
            err = err.__cause__ or err.__context__
        error = "\n  caused by ".join(parts)
    return {"ok": error is None, "error": error, "seconds": round(time.perf_counter() - start, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--coverage", choices=COVERAGES, default="default")
    parser.add_argument("--no-int64-pass", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="record and select only")
    args = parser.parse_args(argv)

    def write(report):
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)

    t0 = time.perf_counter()
    report: Dict[str, Any] = {"target": f"cuda sm_{TARGET_ARCH}", "coverage": args.coverage}
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        report["unavailable"] = "TRITON_INTERPRET is set: triton.jit gives interpreted functions"
        write(report)
        return 0
    problem = triton_api_problem()
    if problem is not None:
        report["unavailable"] = problem
        write(report)
        return 0

    workers = max(1, args.workers)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)
    try:
        probe = pool.submit(toolchain_problem)  # workers start (and probe) while the parent records

        import torch
        import triton
        report["triton"], report["torch"] = triton.__version__, torch.__version__
        kernels, kernel_modules = discover_kernels()
        install_hooks(kernel_modules)
        t1 = time.perf_counter()
        driver_errors, skipped = drive(kernel_modules, int64_pass=not args.no_int64_pass)
        report["record_s"] = round(time.perf_counter() - t1, 2)
        variants = list(RECORDER.variants.values())
        selected = [] if args.dry_run else select(variants, args.coverage)

        problem = probe.result()
        if problem is not None:
            report["unavailable"] = problem
            write(report)
            return 0
        t2 = time.perf_counter()
        results = list(pool.map(compile_job, [v.job() for v in selected]))
        report["compile_s"] = round(time.perf_counter() - t2, 2)
    finally:
        pool.shutdown(cancel_futures=True)

    per_kernel = {kid: {"launches": RECORDER.launches.get(kid, 0), "variants_recorded": 0,
                        "variants_compiled": 0, "compile_errors": 0, "compile_s": 0.0} for kid in kernels}
    for v in variants:
        per_kernel.setdefault(v.kid, {"launches": RECORDER.launches.get(v.kid, 0), "variants_recorded": 0,
                                      "variants_compiled": 0, "compile_errors": 0, "compile_s": 0.0})
        per_kernel[v.kid]["variants_recorded"] += 1
    compile_errors = []
    compiled_values: Dict[str, Dict[str, set]] = {kid: {} for kid in per_kernel}
    for v, res in zip(selected, results):
        entry = per_kernel[v.kid]
        entry["compile_s"] = round(entry["compile_s"] + res["seconds"], 2)
        if res["ok"]:
            entry["variants_compiled"] += 1
            for name in v.declared:
                compiled_values[v.kid].setdefault(name, set()).add(v.features[name])
        else:
            entry["compile_errors"] += 1
            compile_errors.append({**v.describe(), "error": res["error"]})
    report.update({
        "kernels": per_kernel,
        "never_launched": sorted(kid for kid in kernels if per_kernel[kid]["launches"] == 0),
        "never_compiled": sorted(kid for kid in kernels if per_kernel[kid]["variants_compiled"] == 0),
        # The values each declared constexpr (tile sizes aside) was compiled with, per kernel.
        "constexpr_values_compiled": {kid: {name: sorted(vals) for name, vals in d.items()}
                                      for kid, d in compiled_values.items()},
        "compile_errors": compile_errors,
        "launch_errors": RECORDER.launch_errors,
        "driver_errors": driver_errors,
        "skipped_ops": skipped,
        "variants_recorded": len(variants),
        "variants_selected": len(selected),
        "total_s": round(time.perf_counter() - t0, 2),
    })
    write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
