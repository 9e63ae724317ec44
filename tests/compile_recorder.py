"""Compile every Triton kernel variant that fusedskip's ops launch for a Hopper GPU (sm_90), on the CPU.

Run as a script (``python tests/compile_recorder.py --json OUT``) with ``TRITON_INTERPRET`` unset,
so ``triton.jit`` yields real ``JITFunction`` objects. tests/test_gpu_compile.py does that in a
subprocess and checks the report. Why: Triton's CPU interpreter, which runs the kernels in the other
tests, accepts code that the real compiler rejects (plain Python float globals in a kernel, for
one), and this machine has no GPU. ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` runs the
whole NVIDIA pipeline (TTIR → TTGIR → LLVM → PTX → ptxas → cubin) without one.

How:
  1. Record. ``JITFunction.run`` and ``Autotuner.run`` are replaced: a launch computes the
     specialisation exactly as Triton's launcher would (Triton's own binder: pointer dtypes,
     i32/i64 by value, ints equal to 1 and 16-divisibility specialised, ``do_not_specialize``
     honoured, constexprs from kwargs / autotune config / defaults, launch options), checks the
     grid callable, records the variant and launches nothing. An autotuned kernel records one
     variant per config of ``self.configs``. ``fusedskip.backend.interpreter_active`` returns True
     so the public ops take the Triton path on CPU tensors; the op outputs are garbage (nothing
     runs), which is fine because only compilation matters. Then the public ops are driven,
     forward and backward, over dtypes, layouts, activations, affine, skip, gate kinds, training /
     eval, and once more with ``needs_int64`` forced True in every kernels module.
  2. Select. Recording is cheap, compiling is not (~0.3–1 s a variant), so a greedy cover picks,
     per kernel, variants until every value of every specialisation feature (each constexpr, each
     argument's type / specialisation, num_warps, autotune config) is compiled at least once AND
     every pair of values of the "semantic" features (the kernel's own constexprs other than tile
     sizes, and its pointer dtypes: e.g. ACT × dtype, INT64 × MERGED_HW) is compiled at least
     once. ``--all`` compiles every distinct recorded variant instead.
  3. Compile the selection for sm_90 in a process pool; report errors per variant.

The JSON report: kernels discovered (every ``_*_kernel`` JITFunction / Autotuner in the
``fusedskip.kernels`` modules), variants recorded / compiled per kernel, compile errors, driver
errors (an op that raised while being driven), timings.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import json
import os
import pkgutil
import sys
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Tuple

TARGET_ARCH = 90       # Hopper (H100 / H200)
TARGET_WARP_SIZE = 32
H100_SMS = 132         # launch.target_programs as on an H100 (grids / S-splits as on the GPU)

warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


# ----------------------------------------------------------------------------------------------
# Triton plumbing (private Triton APIs, probed by `toolchain_problem` so a Triton without them
# skips the test with a reason instead of erroring)
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
    seen = 0
    while obj is not None and not isinstance(obj, JITFunction) and seen < 8:
        obj = getattr(obj, "fn", None)
        seen += 1
    return obj if isinstance(obj, JITFunction) else None


def kernel_id(fn) -> str:
    return f"{fn.fn.__module__}.{fn.fn.__qualname__}"


def discover_kernels() -> Dict[str, Any]:
    """Every ``@triton.jit`` kernel (name ``_*_kernel``) defined in the fusedskip.kernels modules."""
    import fusedskip  # noqa: F401  (binds fusedskip.kernels from a source checkout)
    package = importlib.import_module("fusedskip.kernels")
    found: Dict[str, Any] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"fusedskip.kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = _jit_function(obj)
            if fn is None or not (name.startswith("_") and name.endswith("_kernel")):
                continue
            if fn.fn.__module__ != module.__name__:  # imported from another module: counted there
                continue
            found[kernel_id(fn)] = fn
    return found


def _compile(fn, signature, constexprs, attrs, options):
    import triton
    from triton.compiler import ASTSource
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target(), options=options)


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------
class Variant:
    """One compilation: a kernel with a full specialisation and launch options."""

    def __init__(self, kid, module, name, signature, constexprs, attrs, options, features, semantic,
                 configs=None, option_kwargs=None, param_index=None):
        self.kid, self.module, self.name = kid, module, name
        self.signature, self.constexprs, self.attrs, self.options = signature, constexprs, attrs, options
        self.features = features    # name -> value (str), every specialisation feature
        self.semantic = semantic    # names of the features covered pairwise
        self.key = (kid, json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())),
                    repr(sorted(attrs.items())), repr(sorted((k, repr(v)) for k, v in options.items())))
        self.cases: List[str] = []  # the driving cases that launched it (first few)
        # Autotuned kernels: the call is recorded once (with config 0); `with_config` derives the
        # variant of any config (configs change only constexprs and launch options).
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
        features["num_stages"] = str(options["num_stages"])
        features["config"] = str(index)
        v = Variant(self.kid, self.module, self.name, self.signature, constexprs, self.attrs, options, features,
                    self.semantic)
        v.cases, v.config_index = self.cases, index
        return v

    def describe(self) -> Dict[str, Any]:
        return {"kernel": self.kid, "features": self.features, "cases": self.cases[:3]}


class Recorder:
    def __init__(self):
        self.variants: Dict[tuple, Variant] = {}
        self.launches: Dict[str, int] = {}
        self.launch_errors: List[Dict[str, str]] = []
        self.case = "?"
        self._binders: Dict[int, Callable] = {}

    def _binder(self, fn):
        binder = self._binders.get(id(fn))
        if binder is None:
            from triton.runtime.jit import create_function_from_signature
            binder = create_function_from_signature(fn.signature, fn.params, _backend())
            self._binders[id(fn)] = binder
        return binder

    def record(self, fn, args, kwargs, grid, configs=None):
        """One launch of ``fn``; ``configs``: the autotuner's configs (recorded with the first,
        checked with each)."""
        from triton import knobs
        kid = kernel_id(fn)
        self.launches[kid] = self.launches.get(kid, 0) + 1
        option_kwargs = dict(kwargs)
        if configs:
            kwargs = {**kwargs, **configs[0].all_kwargs()}
        try:
            kwargs = dict(kwargs)
            # What JITFunction.run adds before binding (options that enter the cache key).
            kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
            bound_args, specialization, options = self._binder(fn)(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(_backend(), kwargs, bound_args, specialization,
                                                                  options)
            # The launcher's grid must evaluate on the bound arguments (as JITFunction.run calls it).
            for config in (configs or [None]):
                meta = bound_args if config is None else {**bound_args, **config.all_kwargs()}
                g = grid(meta) if callable(grid) else grid
                if not (isinstance(g, (tuple, list)) and 1 <= len(g) <= 3
                        and all(isinstance(v, int) and v >= 0 for v in g)):
                    raise TypeError(f"grid must be a tuple of 1 to 3 ints >= 0, got {g!r}")
        except Exception as err:  # a launch Triton itself would refuse
            self.launch_errors.append({"kernel": kid, "case": self.case,
                                       "error": f"{type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc(limit=6)})
            return
        features: Dict[str, str] = {}
        semantic: List[str] = []
        tuned = set(configs[0].kwargs) if configs else set()
        for param, spec in zip(fn.params, specialization):
            kind, value = spec[0], spec[1]
            if param.name in tuned:  # set per config by with_config
                continue
            if param.is_constexpr:
                features[param.name] = repr(value)
                if not param.name.startswith("BLOCK"):
                    semantic.append(param.name)
            elif kind == "constexpr":  # an int specialised by value (== 1), or None
                features[param.name] = f"={value!r}"
            else:
                features[param.name] = kind + (f":{value}" if value else "")
                if kind.startswith("*"):
                    semantic.append(param.name)
        if not configs:
            features["num_warps"] = str(options.num_warps)
            features["num_stages"] = str(options.num_stages)
        opts = dict(options.__dict__)
        variant = Variant(kid, fn.fn.__module__, fn.fn.__name__, signature,
                          {k: v for k, v in constexprs.items()}, {k: v for k, v in attrs.items()},
                          opts, features, semantic, configs=list(configs) if configs else None,
                          option_kwargs={k: v for k, v in option_kwargs.items()},
                          param_index={p.name: p.num for p in fn.params})
        known = self.variants.setdefault(variant.key, variant)
        if len(known.cases) < 3 and self.case not in known.cases:
            known.cases.append(self.case)


RECORDER = Recorder()


def install_hooks(kernel_modules) -> None:
    """Launch nothing: record. The public ops take the Triton path on CPU tensors."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    import fusedskip.backend
    from fusedskip.kernels import launch

    def jit_run(self, *args, grid, warmup, **kwargs):
        RECORDER.record(self, args, kwargs, grid)
        return None

    def autotuner_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        fn = _jit_function(self)
        if fn is not self.fn:
            raise NotImplementedError(f"{self.fn!r}: autotuning over heuristics is not recorded")
        RECORDER.record(fn, args, kwargs, grid, configs=self.configs)
        return None

    JITFunction.run = jit_run
    Autotuner.run = autotuner_run
    fusedskip.backend.interpreter_active = lambda: True
    fusedskip.backend.set_backend("triton")
    # Grids and S-splits sized for an H100, as the launchers would size them there.
    gpu_programs = lambda tensor: 4 * H100_SMS  # noqa: E731
    launch.target_programs = gpu_programs
    for module in kernel_modules:
        if hasattr(module, "target_programs"):
            module.target_programs = gpu_programs


@contextlib.contextmanager
def forced_int64(kernel_modules):
    """Every launcher indexes in int64 (its ``needs_int64`` returns True)."""
    saved = {m: m.needs_int64 for m in kernel_modules if hasattr(m, "needs_int64")}
    for module in saved:
        module.needs_int64 = lambda *tensors: True
    try:
        yield
    finally:
        for module, fn in saved.items():
            module.needs_int64 = fn


# ----------------------------------------------------------------------------------------------
# Driving the public ops
# ----------------------------------------------------------------------------------------------
ACTS = ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh")
LAYOUTS = ("nchw", "channels_last", "strided")


def _dtypes():
    import torch
    return (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def make(shape, dtype, layout="nchw", requires_grad=False):
    """A [N, C, H, W] tensor in a layout; ``strided`` is a non-contiguous view whose (H, W) do not
    merge into one stride (every other column of a wider tensor, channels permuted)."""
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


def _backward(out, how: str = "randn"):
    import torch
    if how == "sum":  # an expanded (stride-0) incoming gradient
        out.float().sum().backward()
    elif how == "channels_last":
        out.backward(torch.randn_like(out).contiguous(memory_format=torch.channels_last))
    else:
        out.backward(torch.randn_like(out))


def cases_gated_skip(run):
    import torch
    import fusedskip
    shape = (2, 8, 5, 6)
    for dtype, layout, gate_kind in itertools.product(_dtypes(), LAYOUTS, ("float", "scalar", "channel")):
        def case(dtype=dtype, layout=layout, gate_kind=gate_kind):
            up = make(shape, dtype, layout, True)
            skip = make(shape, dtype, layout, True)
            gate = {"float": 0.7, "scalar": torch.tensor([0.5], requires_grad=True),
                    "channel": torch.rand(shape[1], requires_grad=True)}[gate_kind]
            _backward(fusedskip.gated_skip_add(up, skip, gate))
        run(f"gated_skip_add {dtype} {layout} gate={gate_kind}", case)
    for dtype in _dtypes():
        def no_dskip(dtype=dtype):  # NEED_DSKIP off, NEED_DGATE on
            up = make(shape, dtype, "nchw", True)
            skip = make(shape, dtype, "channels_last", False)
            _backward(fusedskip.gated_skip_add(up, skip, torch.rand(shape[1], requires_grad=True)), "sum")
        run(f"gated_skip_add {dtype} mixed layouts, skip without grad", no_dskip)
    for kind in ("softplus", "softplus_channel", "sigmoid_channel", 0.5):
        for shp, layout in (((1, 1, 7, 3), "channels_last"), ((2, 3, 1, 1), "nchw"), ((2, 64, 48, 48), "nchw"),
                            ((2, 256, 16, 16), "channels_last"), ((3, 5, 6, 1), "strided")):
            def module_case(kind=kind, shp=shp, layout=layout):
                m = fusedskip.GatedSkip(shp[1], gate=kind)
                _backward(m(make(shp, torch.float32, layout, True), make(shp, torch.float32, layout, True)),
                          "channels_last")
            run(f"GatedSkip({kind}) {shp} {layout}", module_case)


def cases_group_norm(run):
    import torch
    import fusedskip
    from fusedskip.ops.group_norm_act import group_norm_act
    shape, groups = (2, 8, 5, 6), 4
    for dtype, layout, act, has_skip in itertools.product(_dtypes(), LAYOUTS, ACTS, (False, True)):
        def case(dtype=dtype, layout=layout, act=act, has_skip=has_skip):
            x = make(shape, dtype, layout, True)
            w = torch.rand(shape[1], dtype=dtype, requires_grad=True)
            b = torch.rand(shape[1], dtype=dtype, requires_grad=True)
            skip = make(shape, dtype, layout, True) if has_skip else None
            gate = torch.rand(shape[1], requires_grad=True) if has_skip else None
            _backward(group_norm_act(x, groups, w, b, 1e-5, act, 0.2, skip=skip, gate=gate))
        run(f"group_norm_act {dtype} {layout} {act} skip={has_skip}", case)
    # Affine variants (weight only, bias only, none), fp32 params with low-precision x (autocast),
    # the needs_input_grad combinations, scalar / float gates.
    for dtype, (has_w, has_b), act in itertools.product(_dtypes(), ((True, False), (False, True), (False, False)),
                                                        ("relu", "gelu")):
        def affine_case(dtype=dtype, has_w=has_w, has_b=has_b, act=act):
            x = make(shape, dtype, "nchw", True)
            w = torch.rand(shape[1], requires_grad=True) if has_w else None  # fp32 params
            b = torch.rand(shape[1], requires_grad=True) if has_b else None
            _backward(group_norm_act(x, groups, w, b, 1e-5, act), "sum")
        run(f"group_norm_act {dtype} weight={has_w} bias={has_b} {act}", affine_case)
    for dtype, (x_grad, skip_grad, gate_kind) in itertools.product(
            _dtypes(), ((False, True, "channel"), (True, False, "scalar"), (False, False, "channel"),
                        (True, True, "float"), (False, False, "float"))):
        def grads_case(dtype=dtype, x_grad=x_grad, skip_grad=skip_grad, gate_kind=gate_kind):
            x = make(shape, dtype, "channels_last", x_grad)
            skip = make(shape, dtype, "nchw", skip_grad)
            gate = {"float": 0.3, "scalar": torch.tensor(0.5, requires_grad=True),
                    "channel": torch.rand(shape[1], requires_grad=True)}[gate_kind]
            w = torch.rand(shape[1], dtype=dtype, requires_grad=True)
            _backward(group_norm_act(x, 2, w, None, 1e-5, "silu", skip=skip, gate=gate))
        run(f"group_norm_act {dtype} x.grad={x_grad} skip.grad={skip_grad} gate={gate_kind}", grads_case)
    # Modules and shapes that move tiles, chunks and specialised ints (N = 1, C = 1, H/W = 1, large S).
    for (shp, g), layout in itertools.product(
            (((1, 1, 1, 3), 1), ((1, 4, 1, 1), 2), ((2, 3, 7, 1), 3), ((1, 64, 48, 48), 32),
             ((4, 256, 8, 8), 32), ((2, 96, 33, 17), 32)), LAYOUTS):
        def module_case(shp=shp, g=g, layout=layout):
            m = fusedskip.GroupNormAct(g, shp[1], act="silu")
            _backward(m(make(shp, torch.float32, layout, True)))
        run(f"GroupNormAct({g}, {shp[1]}) {shp} {layout}", module_case)
    for dtype, affine in itertools.product(_dtypes(), (False, True)):
        def instance_case(dtype=dtype, affine=affine):
            m = fusedskip.InstanceNormAct2d(6, affine=affine, act="leaky_relu")
            x = make((2, 6, 9, 10), dtype, "channels_last", True)
            out = m(x) if dtype == torch.float32 or not affine else m.to(dtype)(x)
            _backward(out)
        run(f"InstanceNormAct2d {dtype} affine={affine}", instance_case)


def cases_skip_norm_act(run):
    import torch
    import fusedskip
    shape = (2, 8, 5, 6)
    for dtype, layout, gate in itertools.product(_dtypes(), LAYOUTS, ("softplus", "softplus_channel", 0.5)):
        def group_case(dtype=dtype, layout=layout, gate=gate):
            m = fusedskip.SkipNormAct(shape[1], norm="group", num_groups=4, act="gelu_tanh", gate=gate).to(dtype)
            _backward(m(make(shape, dtype, layout, True), make(shape, dtype, layout, True)))
        run(f"SkipNormAct(group) {dtype} {layout} gate={gate}", group_case)
    for dtype, layout, training, track in itertools.product(_dtypes(), LAYOUTS, (True, False), (True, False)):
        def batch_case(dtype=dtype, layout=layout, training=training, track=track):
            m = fusedskip.SkipNormAct(shape[1], norm="batch", act="relu", gate="sigmoid_channel",
                                      track_running_stats=track)
            m.train(training)
            _backward(m(make(shape, dtype, layout, True), make(shape, dtype, layout, True)))
        run(f"SkipNormAct(batch) {dtype} {layout} training={training} track={track}", batch_case)


def cases_batch_norm(run):
    import torch
    from fusedskip.ops.batch_norm_act import BatchNormAct2d, batch_norm_act
    shape = (2, 8, 5, 6)
    c = shape[1]
    for dtype, layout, act, training, has_skip in itertools.product(_dtypes(), LAYOUTS, ACTS, (True, False),
                                                                    (False, True)):
        def case(dtype=dtype, layout=layout, act=act, training=training, has_skip=has_skip):
            m = BatchNormAct2d(c, act=act, negative_slope=0.1).to(dtype)
            m.train(training)
            x = make(shape, dtype, layout, True)
            if has_skip:
                out = m(x, make(shape, dtype, layout, True), torch.rand(c, requires_grad=True))
            else:
                out = m(x)
            _backward(out)
        run(f"BatchNormAct2d {dtype} {layout} {act} training={training} skip={has_skip}", case)
    # Affine off / weight only / bias only (fp32 params with any x), no running statistics,
    # cumulative average, scalar and float gates, the needs_input_grad combinations.
    for dtype, (has_w, has_b), training in itertools.product(
            _dtypes(), ((False, False), (True, False), (False, True)), (True, False)):
        def affine_case(dtype=dtype, has_w=has_w, has_b=has_b, training=training):
            x = make(shape, dtype, "nchw", True)
            w = torch.rand(c, requires_grad=True) if has_w else None
            b = torch.rand(c, requires_grad=True) if has_b else None
            rm, rv = torch.zeros(c), torch.ones(c)
            _backward(batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5, "silu"), "sum")
        run(f"batch_norm_act {dtype} weight={has_w} bias={has_b} training={training}", affine_case)
    for dtype, momentum, track in itertools.product(_dtypes(), (0.1, None), (True, False)):
        def stats_case(dtype=dtype, momentum=momentum, track=track):
            m = BatchNormAct2d(c, momentum=momentum, track_running_stats=track, affine=False, act="gelu")
            x = make(shape, dtype, "channels_last", True)
            _backward(m(x))
            m.eval()  # without running statistics eval normalises with batch statistics
            _backward(m(make(shape, dtype, "channels_last", True)))
        run(f"BatchNormAct2d {dtype} momentum={momentum} track={track}", stats_case)
    for dtype, (x_grad, skip_grad, gate_kind), training in itertools.product(
            _dtypes(), ((False, True, "channel"), (True, False, "scalar"), (False, False, "channel"),
                        (True, True, "float"), (False, True, "float")), (True, False)):
        def grads_case(dtype=dtype, x_grad=x_grad, skip_grad=skip_grad, gate_kind=gate_kind, training=training):
            m = BatchNormAct2d(c, act="leaky_relu")
            m.train(training)
            if not (x_grad or skip_grad or gate_kind != "float"):
                m.weight.requires_grad_(True)
            gate = {"float": 0.3, "scalar": torch.tensor([0.5], requires_grad=True),
                    "channel": torch.rand(c, requires_grad=True)}[gate_kind]
            out = m(make(shape, dtype, "strided", x_grad), make(shape, dtype, "nchw", skip_grad), gate)
            _backward(out, "channels_last")
        run(f"BatchNormAct2d {dtype} x.grad={x_grad} skip.grad={skip_grad} gate={gate_kind} training={training}",
            grads_case)
    for (shp, layout), training in itertools.product(
            (((2, 1, 1, 1), "nchw"), ((1, 3, 1, 5), "channels_last"), ((2, 5, 7, 1), "strided"),
             ((8, 16, 48, 48), "nchw"), ((4, 512, 8, 8), "channels_last"), ((16, 3, 64, 64), "channels_last"),
             ((2, 96, 33, 17), "strided")), (True, False)):
        def shape_case(shp=shp, layout=layout, training=training):
            m = BatchNormAct2d(shp[1], act="relu")
            m.train(training)
            _backward(m(make(shp, torch.float32, layout, True)))
        run(f"BatchNormAct2d {shp} {layout} training={training}", shape_case)
    for dtype, track in itertools.product((torch.float32, torch.float64), (True, False)):
        def merge_case(dtype=dtype, track=track):  # SyncBatchNorm's merge of per-rank statistics
            counts = torch.tensor([12.0, 20.0, 7.0], dtype=dtype)
            means, m2s = torch.randn(3, c, dtype=dtype), torch.rand(3, c, dtype=dtype)
            rm, rv = (torch.zeros(c), torch.ones(c)) if track else (None, None)
            nbt = torch.tensor(3) if track else None
            torch.ops.fusedskip.batch_norm_act_merge_stats(counts, means, m2s, rm, rv, nbt, 0.0, 1e-5)
        run(f"batch_norm_act_merge_stats {dtype} running={track}", merge_case)


def cases_conv_norm_act(run):
    import torch
    from fusedskip.ops.conv_norm_act import ConvNormAct
    for norm, bias, training, layout in itertools.product(("batch", "group", "instance", None), (None, True),
                                                          (True, False), ("nchw", "channels_last")):
        def case(norm=norm, bias=bias, training=training, layout=layout):
            m = ConvNormAct(3, 16, 3, norm=norm, num_groups=4, bias=bias, act="silu")
            m.train(training)
            x = make((2, 3, 9, 8), torch.float32, layout, True)
            if layout == "channels_last":
                m = m.to(memory_format=torch.channels_last)
            _backward(m(x))
            if norm == "batch" and not training:
                m.fold_bn()
                _backward(m(x))
        run(f"ConvNormAct norm={norm} bias={bias} training={training} {layout}", case)


DRIVERS = (("gated_skip", cases_gated_skip), ("group_norm_act", cases_group_norm),
           ("skip_norm_act", cases_skip_norm_act), ("batch_norm_act", cases_batch_norm),
           ("conv_norm_act", cases_conv_norm_act))


def drive(kernel_modules, int64_pass: bool = True) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """Run every case (and again with int64 indexing forced); returns (driver errors, skipped ops)."""
    import torch
    errors: List[Dict[str, str]] = []
    skipped: List[Dict[str, str]] = []

    def run(label, fn):
        RECORDER.case = label
        torch.manual_seed(0)
        try:
            fn()
        except Exception as err:
            errors.append({"case": label, "error": f"{type(err).__name__}: {err}",
                           "traceback": traceback.format_exc(limit=8)})

    passes = [("", contextlib.nullcontext)] + ([("[int64] ", lambda: forced_int64(kernel_modules))] if int64_pass else [])
    for prefix, ctx in passes:
        for op, driver in DRIVERS:
            try:
                importlib.import_module(f"fusedskip.ops.{op}")
            except ImportError as err:
                if not prefix:
                    skipped.append({"op": op, "reason": f"fusedskip.ops.{op} cannot be imported: {err}"})
                continue
            with ctx():
                driver(lambda label, fn: run(prefix + label, fn))
    return errors, skipped


# ----------------------------------------------------------------------------------------------
# Selection: per kernel, every feature value once and every pair of semantic feature values once
# ----------------------------------------------------------------------------------------------
def _targets(v: Variant):
    singles = {("1", name, value) for name, value in v.features.items()}
    sem = sorted(v.semantic)
    pairs = {("2", a, v.features[a], b, v.features[b]) for a, b in itertools.combinations(sem, 2)}
    return singles | pairs


def select(variants: List[Variant]) -> List[Variant]:
    """Greedy cover per kernel (see the module docstring); autotuned kernels then get every config
    of the autotuner, spread over the chosen calls (each chosen call compiles with one config)."""
    by_kernel: Dict[str, List[Variant]] = {}
    for v in variants:
        by_kernel.setdefault(v.kid, []).append(v)
    chosen: List[Variant] = []
    for kid in sorted(by_kernel):
        candidates = [(v, _targets(v)) for v in by_kernel[kid]]
        uncovered = set().union(*(t for _, t in candidates))
        picks: List[Variant] = []
        while uncovered:
            best, gain = None, 0
            for v, t in candidates:  # first best in recording order: deterministic
                g = len(t & uncovered)
                if g > gain:
                    best, gain = (v, t), g
            picks.append(best[0])
            uncovered -= best[1]
            candidates.remove(best)
        configs = picks[0].configs
        if configs:
            picks = [picks[i % len(picks)].with_config(i % len(configs))
                     for i in range(max(len(picks), len(configs)))]
        chosen.extend(picks)
    return chosen


# ----------------------------------------------------------------------------------------------
# Compilation (process pool)
# ----------------------------------------------------------------------------------------------
def _worker_init():
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    import fusedskip  # noqa: F401


def compile_job(job) -> Dict[str, Any]:
    module, name, signature, constexprs, attrs, options = job
    start = time.perf_counter()
    try:
        fn = _jit_function(getattr(importlib.import_module(module), name))
        kernel = _compile(fn, signature, constexprs, attrs, options)
        ok = "cubin" in kernel.asm
        error = None if ok else "no cubin produced"
    except Exception as err:  # noqa: BLE001 - every compile failure is a finding
        ok, error = False, f"{type(err).__name__}: {err}"
    return {"ok": ok, "error": error, "seconds": round(time.perf_counter() - start, 3)}


def toolchain_problem() -> Optional[str]:
    """Why sm_90 compilation cannot run here (None when it can): a tiny kernel must compile to a cubin."""
    try:
        import triton
        import triton.language as tl
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
        if not hasattr(JITFunction, "_pack_args"):
            return f"triton {triton.__version__} lacks JITFunction._pack_args (the recorder mirrors its launcher)"
        src = ("import triton\nimport triton.language as tl\n\n@triton.jit\n"
               "def _probe_kernel(x_ptr, n, BLOCK: tl.constexpr):\n"
               "    o = tl.arange(0, BLOCK)\n"
               "    tl.store(x_ptr + o, tl.load(x_ptr + o, mask=o < n) * 2.0, mask=o < n)\n")
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "fusedskip_compile_probe.py")
            with open(path, "w") as f:
                f.write(src)
            spec = importlib.util.spec_from_file_location("fusedskip_compile_probe", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            fn = module._probe_kernel
            if not isinstance(fn, JITFunction):
                return "triton.jit did not produce a JITFunction (TRITON_INTERPRET set?)"
            opts = _backend().parse_options({"num_warps": 4}).__dict__
            kernel = _compile(fn, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {(2,): 128}, {}, opts)
        if "cubin" not in kernel.asm:
            return "triton.compile produced no cubin for sm_90"
        del tl
    except Exception as err:  # noqa: BLE001
        return f"triton.compile for cuda sm_90 is unavailable: {type(err).__name__}: {err}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--all", action="store_true", help="compile every distinct recorded variant")
    parser.add_argument("--no-int64-pass", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="record and select, compile nothing")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run with TRITON_INTERPRET unset: the interpreter replaces the JIT")

    t0 = time.perf_counter()
    report: Dict[str, Any] = {"target": f"cuda sm_{TARGET_ARCH}"}
    problem = toolchain_problem()
    if problem is not None:
        report["unavailable"] = problem
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        return 0
    import triton
    import torch
    report["triton"], report["torch"] = triton.__version__, torch.__version__
    report["probe_s"] = round(time.perf_counter() - t0, 2)

    import multiprocessing
    pool = ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)
    warm = [pool.submit(_worker_init) for _ in range(max(1, args.workers))]  # import while we record

    kernels = discover_kernels()
    kernel_modules = sorted({sys.modules[fn.fn.__module__] for fn in kernels.values()}, key=lambda m: m.__name__)
    kernel_modules += [m for name, m in sorted(sys.modules.items())
                       if name.startswith("fusedskip.kernels.") and m not in kernel_modules and m is not None]
    install_hooks(kernel_modules)
    t1 = time.perf_counter()
    driver_errors, skipped = drive(kernel_modules, int64_pass=not args.no_int64_pass)
    report["record_s"] = round(time.perf_counter() - t1, 2)

    variants = list(RECORDER.variants.values())
    t_sel = time.perf_counter()
    if args.all:
        selected = [x for v in variants
                    for x in ([v.with_config(i) for i in range(len(v.configs))] if v.configs else [v])]
    else:
        selected = select(variants)
    report["select_s"] = round(time.perf_counter() - t_sel, 2)
    report["selected_per_kernel"] = {kid: sum(v.kid == kid for v in selected) for kid in sorted(kernels)}
    if args.dry_run:
        selected = []
    for w in warm:
        w.result()
    t2 = time.perf_counter()
    jobs = [(v.module, v.name, v.signature, v.constexprs, v.attrs, v.options) for v in selected]
    # Longest-first is a better schedule, but variants of one kernel cost alike: interleave kernels.
    order = sorted(range(len(jobs)), key=lambda i: (selected[i].kid.endswith("finalize_kernel"), i))
    results: Dict[int, Dict[str, Any]] = {}
    futures = {i: pool.submit(compile_job, jobs[i]) for i in order}
    for i, fut in futures.items():
        results[i] = fut.result()
    pool.shutdown()
    report["compile_s"] = round(time.perf_counter() - t2, 2)

    per_kernel: Dict[str, Dict[str, Any]] = {
        kid: {"launches": RECORDER.launches.get(kid, 0), "variants_recorded": 0, "variants_compiled": 0,
              "compile_s": 0.0}
        for kid in kernels}
    for v in variants:
        per_kernel.setdefault(v.kid, {"launches": RECORDER.launches.get(v.kid, 0), "variants_recorded": 0,
                                      "variants_compiled": 0, "compile_s": 0.0})["variants_recorded"] += 1
    compile_errors = []
    for i, v in enumerate(selected):
        res = results[i]
        entry = per_kernel[v.kid]
        entry["compile_s"] = round(entry["compile_s"] + res["seconds"], 2)
        if res["ok"]:
            entry["variants_compiled"] += 1
        else:
            compile_errors.append({**v.describe(), "error": res["error"]})
    report.update({
        "kernels": per_kernel,
        "discovered": sorted(kernels),
        "never_compiled": sorted(kid for kid in kernels if per_kernel[kid]["variants_compiled"] == 0),
        "compile_errors": compile_errors,
        "launch_errors": RECORDER.launch_errors,
        "driver_errors": driver_errors,
        "skipped_ops": skipped,
        "variants_recorded": len(variants),
        "variants_compiled": sum(r["ok"] for r in results.values()),
        "total_s": round(time.perf_counter() - t0, 2),
    })
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
