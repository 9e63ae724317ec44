"""Compile every Triton kernel variant that fusedskip's ops launch, for a Hopper GPU (sm_90), on the CPU.

Run as a script with ``TRITON_INTERPRET`` unset, so ``triton.jit`` yields real ``JITFunction``
objects::

    python tests/compile_recorder.py --json report.json [--workers 2] [--coverage default|wide|all]

tests/test_gpu_compile.py runs it in a subprocess and checks the report. Why: the other tests run
the kernels under Triton's CPU interpreter, which accepts code that the real compiler rejects (a
plain Python float global read in a kernel, for one), and there is no GPU here. ``triton.compile``
for ``GPUTarget("cuda", 90, 32)`` runs the whole NVIDIA pipeline (TTIR → TTGIR → LLVM IR → PTX →
ptxas → cubin) without a GPU.

1. Record. ``kernel[grid](...)`` of a ``JITFunction`` or ``Autotuner`` is replaced: the call is
   bound to the kernel's own Python signature, each argument is specialised from the kernel's
   parameter list (``JITFunction.params``: constexpr annotations, ``do_not_specialize``,
   ``do_not_specialize_on_alignment``) by the rules Triton's launcher applies (pointer dtypes and
   16-byte alignment, ints as i32 / i64 by value, ints equal to 1 and 16-divisibility
   specialised), the launch kwargs that are not parameters become compile options, the grid is
   evaluated on the bound arguments, the variant is recorded and nothing launches. Only
   documented objects are touched: ``JITFunction.params`` / ``.fn``, ``Autotuner.fn`` /
   ``.configs``, ``triton.Config``, ``triton.compile``, ``triton.compiler.ASTSource`` and
   ``GPUTarget``. ``fusedskip.backend`` is set to the Triton path for CPU tensors
   (``interpreter_active`` returns True), and ``launch.target_programs`` returns an H100's value
   so grids and S-splits are the GPU's. The op outputs are garbage (no kernel runs): only
   compilation matters. The public ops (tests/compile_cases.py) are then driven, and once more
   with ``needs_int64`` forced True in every kernels module.
2. Select (recording is cheap, a compile costs ~0.3–1 s). Per kernel, a greedy cover of targets:
   ``default``: every value of every constexpr the kernel declares (tile sizes: smallest and
   largest), every dtype of every pointer argument, every int argument that gets specialised to
   1, every num_warps, every activation × accumulation dtype pair (fp32 / fp64 math of each
   activation and its derivative); autotuned kernels compile their first, largest and widest
   configs. ``wide``: every value of every specialisation feature (all tile sizes, alignment,
   i32/i64, every autotune config) and every pair of values of the declared constexprs and
   pointer dtypes (~5x the compiles). ``all``: every recorded variant (autotune configs spread).
3. Compile the selection for sm_90 with ``triton.compile(ASTSource(fn, signature, constexprs,
   attrs), target=GPUTarget("cuda", 90, 32), options=...)`` in a process pool (spawned workers)
   and report errors per variant. A probe kernel that uses every feature of that call first
   tells whether this Triton can be driven at all; when it cannot (no NVIDIA backend or ptxas, an
   API that moved), the report says ``unavailable`` with the Triton version and the reason, and
   the test skips. A compile error in a fusedskip kernel is never taken for that.

``--extra-kernels FILE`` adds the ``_*_kernel`` kernels of FILE and drives its ``CASES()``
(``--only-extra``: those alone); tests/test_gpu_compile.py injects a known-bad kernel this way.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
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
from typing import Any, Dict, List, Optional, Tuple

TARGET_ARCH = 90       # Hopper (H100 / H200)
TARGET_WARP_SIZE = 32
H100_SMS = 132         # launch.target_programs as on an H100
COVERAGES = ("default", "wide", "all")
# Compile options a launch may pass when the backend's own list cannot be read (see option_names).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "debug", "enable_fp_fusion",
                  "launch_cooperative_grid", "launch_pdl", "ir_override")

warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


# ----------------------------------------------------------------------------------------------
# Triton plumbing: the public compile entry points only
# ----------------------------------------------------------------------------------------------
def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", TARGET_ARCH, TARGET_WARP_SIZE)


def triton_version() -> str:
    try:
        import triton
        return f"triton {triton.__version__}"
    except Exception as err:  # noqa: BLE001
        return f"triton (not importable: {type(err).__name__}: {err})"


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


def module_kernels(module) -> Dict[str, Any]:
    """The ``@triton.jit`` kernels named ``_*_kernel`` defined in ``module`` (not imported into it)."""
    found = {}
    for name, obj in vars(module).items():
        fn = _jit_function(obj)
        if fn is not None and name.startswith("_") and name.endswith("_kernel") and fn.fn.__module__ == module.__name__:
            found[kernel_id(fn)] = fn
    return found


def discover_kernels() -> Tuple[Dict[str, Any], List[Any]]:
    """(every ``_*_kernel`` defined in a fusedskip.kernels module, the modules)."""
    import fusedskip  # noqa: F401  (binds fusedskip.kernels in a source checkout)
    package = importlib.import_module("fusedskip.kernels")
    found: Dict[str, Any] = {}
    modules = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"fusedskip.kernels.{info.name}")
        modules.append(module)
        found.update(module_kernels(module))
    return found, modules


def triton_api_problem() -> Optional[str]:
    """Why this Triton cannot be driven (None when every object the recorder uses imports)."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.autotuner import Autotuner  # noqa: F401
        from triton.runtime.jit import JITFunction  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return (f"{triton_version()}: triton.compile / ASTSource / JITFunction not importable: "
                f"{type(err).__name__}: {err}")
    return None


_OPTION_NAMES: Optional[frozenset] = None


def option_names() -> frozenset:
    """The compile options the NVIDIA backend knows (launch kwargs that are not kernel parameters)."""
    global _OPTION_NAMES
    if _OPTION_NAMES is None:
        try:
            from triton.compiler import make_backend
            _OPTION_NAMES = frozenset(make_backend(_target()).parse_options({}).__dict__)
        except Exception:  # noqa: BLE001 - an API that moved: the documented launch options
            _OPTION_NAMES = frozenset(LAUNCH_OPTIONS)
    return _OPTION_NAMES


def compile_variant(fn, signature, constexprs, attrs, options):
    import triton
    from triton.compiler import ASTSource
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=_target(), options=options)


# ----------------------------------------------------------------------------------------------
# Specialisation: what Triton's launcher compiles for a call, from the kernel's own parameters
# ----------------------------------------------------------------------------------------------
# torch dtype name → Triton pointee type
_POINTEE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8",
            "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "u1",
            "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5"}
DIVISIBLE = "D"  # the launcher's mark for a pointer 16-byte aligned / an int divisible by 16


def _int_type(value: int) -> str:
    if -2**31 <= value < 2**31:
        return "i32"
    return "i64" if -2**63 <= value < 2**63 else "u64"


def specialize_arg(param, value) -> Tuple[str, Any]:
    """(signature type, spec) of one argument as Triton's launcher specialises it.

    ``spec`` is the constexpr value when the type is ``constexpr``, else ``"D"`` (divisible /
    aligned), ``""`` (may be, is not) or None (never specialised). Constexpr parameters, None and
    ints equal to 1 become constexprs; ``do_not_specialize`` parameters keep no spec;
    ``do_not_specialize_on_alignment`` ones lose the ``D``; floats and bools are never specialised.
    """
    name = param.name
    if getattr(param, "is_constexpr", False) or value is None:
        return "constexpr", value
    specialize = not getattr(param, "do_not_specialize", False)
    align = not getattr(param, "do_not_specialize_on_alignment", False)
    annotated = getattr(param, "annotation_type", "") or ""
    if annotated and not annotated.startswith("*"):  # e.g. `n: tl.int64`: the type is fixed
        if not specialize or annotated == "u1" or annotated[:2] in ("fp", "bf") or not isinstance(value, int):
            return annotated, None
        return annotated, DIVISIBLE if align and value % 16 == 0 else ""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        dtype = str(value.dtype).split(".")[-1]
        if dtype not in _POINTEE:
            raise TypeError(f"argument {name}: tensor dtype {value.dtype} has no Triton pointer type here")
        kind = ("*k" if getattr(param, "is_const", False) else "*") + _POINTEE[dtype]
        if not specialize:
            return kind, None
        return kind, DIVISIBLE if align and value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if not specialize:
            return _int_type(value), None
        if value == 1:
            return "constexpr", 1
        return _int_type(value), DIVISIBLE if align and value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"argument {name}: cannot pass {type(value).__name__} {value!r} to a Triton kernel")


def bind_launch(fn, args, kwargs) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(bound arguments with defaults, compile options) of ``fn[grid](*args, **kwargs)``."""
    names = [p.name for p in fn.params]
    options = {k: v for k, v in kwargs.items() if k not in names}
    unknown = sorted(set(options) - option_names())
    if unknown:
        raise KeyError(f"keyword argument(s) {unknown} are neither parameters of {fn.fn.__name__} nor compile options")
    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    if getattr(fn, "debug", None) and "debug" not in options:
        options["debug"] = True
    return dict(bound.arguments), {k: v for k, v in options.items() if v is not None}


def specialize(fn, bound: Dict[str, Any]):
    """(signature, constexprs, attrs, per-parameter (type, spec)) for ``ASTSource``."""
    signature, constexprs, attrs, specs = {}, {}, {}, []
    for index, param in enumerate(fn.params):
        kind, spec = specialize_arg(param, bound[param.name])
        signature[param.name] = kind
        specs.append((kind, spec))
        if kind == "constexpr":
            constexprs[(index,)] = spec
        elif spec == DIVISIBLE:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, specs


_PROBE_SRC = '''import triton
import triton.language as tl


@triton.jit(do_not_specialize=["m"])
def _probe_kernel(x_ptr, y_ptr, n, m, one, scale, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + o, mask=o < n) * scale * one
    if FLAG:
        v = v + m
    tl.store(y_ptr + o, v.to(y_ptr.dtype.element_ty), mask=o < n)


@triton.jit(do_not_specialize=["p", "d"], do_not_specialize_on_alignment=["q", "e"])
def _spec_probe_kernel(p, q, r, a, b, c, d, e, f: tl.int64, g, h, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    pass
'''

# Argument sets for _spec_probe_kernel (p, q, r, a, b, c, d, e, f, g, h): aligned / unaligned /
# bool tensors and ints at every specialisation edge, plus a bool, a float and None.
_SPEC_PROBE_ARGS = (("aligned", "unaligned", "bool", 1, 16, 17, 16, 16, 16, 2**31, -2**31 - 1),
                    ("unaligned", "aligned", "aligned", 0, -16, 2**40, 1, 1, 1, 2**63, True),
                    ("aligned", "aligned", "unaligned", 32, 3.5, None, 17, 32, 7, -2**31, -16))


def toolchain_problem():
    """Why sm_90 compilation cannot be driven here (a str), or a dict of findings when the probe
    kernel compiles to a cubin.

    The probe goes through every path the recorder uses (binding, specialisation of aligned and
    unaligned pointers, a 16-divisible int, a do_not_specialize int, an int equal to 1, a float,
    constexprs, launch options, ``triton.compile`` of an ``ASTSource``): it failing means this
    Triton cannot be driven, not that a fusedskip kernel is wrong.
    """
    try:
        import torch
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
            x = torch.zeros(64)
            bound, options = bind_launch(fn, (x, torch.zeros(65, dtype=torch.float16)[1:], 64, 7, 1, 0.5),
                                         {"FLAG": True, "BLOCK": 128, "num_warps": 4, "num_stages": 2})
            signature, constexprs, attrs, _ = specialize(fn, bound)
            expected = {"x_ptr": "*fp32", "y_ptr": "*fp16", "n": "i32", "m": "i32", "one": "constexpr",
                        "scale": "fp32", "FLAG": "constexpr", "BLOCK": "constexpr"}
            if signature != expected or sorted(attrs) != [(0,), (2,)]:
                return f"the probe kernel's parameters read back as {signature} / divisibility {sorted(attrs)}"
            kernel = compile_variant(fn, signature, constexprs, attrs, options)
            drift = launcher_drift(module._spec_probe_kernel)
        if "cubin" not in kernel.asm:
            return "triton.compile produced no cubin for sm_90"
    except Exception as err:  # noqa: BLE001
        return f"triton.compile for cuda sm_{TARGET_ARCH} cannot be driven here: {type(err).__name__}: {err}"
    return {"launcher_cross_check": drift}


def launcher_drift(fn) -> str:
    """Whether ``specialize`` agrees with this Triton's own launcher binder on ``_spec_probe_kernel``.

    The binder is private (``create_function_from_signature``); where it cannot be called the
    answer says so and nothing else depends on it. A disagreement means the recorder compiles
    slightly different variants than a GPU launch would (update ``specialize_arg``): reported as a
    warning by tests/test_gpu_compile.py, not a failure, since the compile check itself still holds.
    """
    import torch
    tensors = {"aligned": torch.zeros(8), "unaligned": torch.zeros(9)[1:], "bool": torch.zeros(8, dtype=torch.bool)}
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        binder = create_function_from_signature(fn.signature, fn.params, make_backend(_target()))
        theirs = [binder(*(tensors.get(a, a) if isinstance(a, str) else a for a in args), BLOCK=64)[1]
                  for args in _SPEC_PROBE_ARGS]
    except Exception as err:  # noqa: BLE001 - a private API: only a cross-check
        return f"not compared: the launcher's binder is not callable ({type(err).__name__}: {err})"

    def norm(kind, spec):  # what reaches the compiler: type, constexpr value or divisibility
        return (kind, spec if kind == "constexpr" else spec == DIVISIBLE)
    diffs = []
    for args, their_specs in zip(_SPEC_PROBE_ARGS, theirs):
        bound, _ = bind_launch(fn, tuple(tensors.get(a, a) if isinstance(a, str) else a for a in args),
                               {"BLOCK": 64})
        for param, ours, their in zip(fn.params, specialize(fn, bound)[3], their_specs):
            if norm(*ours) != norm(*tuple(their)[:2]):
                diffs.append(f"{param.name}={bound[param.name]!r}: ours {ours}, launcher {tuple(their)[:2]}")
    if diffs:
        return "differs from the launcher: " + "; ".join(diffs)
    return f"agrees with the launcher on {len(_SPEC_PROBE_ARGS)} argument sets"


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------
class Variant:
    """One compilation: a kernel, its full specialisation and its compile options.

    ``features`` (name → str) describe the specialisation for the selection: declared constexprs
    (``repr`` of the value), pointer arguments (``*fp32`` / ``*fp32:D`` when 16-byte aligned),
    ints (``i32``, ``i32:D``, ``i64``, or ``=1`` when specialised to the constant 1), num_warps,
    and ``config`` (index into the autotuner's configs).
    """

    def __init__(self, kid, module, name, signature, constexprs, attrs, options, features, declared,
                 configs=None, param_index=None):
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
        self.param_index = param_index
        self.config_index: Optional[int] = None

    def with_config(self, index: int) -> "Variant":
        config = self.configs[index]
        constexprs = dict(self.constexprs)
        features = dict(self.features)
        for name, value in config.kwargs.items():
            constexprs[(self.param_index[name],)] = value
            features[name] = repr(value)
        options = {k: v for k, v in self.options.items() if k not in _config_options(self.configs[0])}
        options.update(_config_options(config))
        features["num_warps"] = str(options.get("num_warps", 4))
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


def _config_kwargs(config) -> Dict[str, Any]:
    """What ``Autotuner.run`` adds to the launch kwargs for ``config`` (meta-parameters and options)."""
    if hasattr(config, "all_kwargs"):
        return dict(config.all_kwargs())
    return {**config.kwargs, **_config_options(config)}


def _config_options(config) -> Dict[str, Any]:
    names = ("num_warps", "num_ctas", "num_stages", "maxnreg")
    return {k: getattr(config, k) for k in names if getattr(config, k, None) is not None}


class Recorder:
    def __init__(self):
        self.variants: Dict[tuple, Variant] = {}
        self.launches: Dict[str, int] = {}
        self.launch_errors: List[Dict[str, str]] = []
        self.case = "?"

    def record(self, fn, args, kwargs, grid, configs=None):
        """One launch ``fn[grid](*args, **kwargs)`` (``configs``: the autotuner's, recorded with the first)."""
        kid = kernel_id(fn)
        self.launches[kid] = self.launches.get(kid, 0) + 1
        try:
            if configs:
                # Autotuner.run passes **kwargs, **config.all_kwargs(): a launcher must not set a tuned one.
                conflicts = sorted(set(kwargs) & set(_config_kwargs(configs[0])))
                if conflicts:
                    raise ValueError(f"launch sets autotuned meta-parameters {conflicts}")
            bound, options = bind_launch(fn, args, {**kwargs, **(_config_kwargs(configs[0]) if configs else {})})
            # The launcher's grid must evaluate on the bound arguments, as JITFunction.run calls it.
            for config in (configs or [None]):
                meta = bound if config is None else {**bound, **config.kwargs}
                g = grid(meta) if callable(grid) else grid
                if not (isinstance(g, (tuple, list)) and 1 <= len(g) <= 3
                        and all(isinstance(v, int) and v >= 0 for v in g)):
                    raise TypeError(f"grid must be a tuple of 1 to 3 ints >= 0, got {g!r}")
            signature, constexprs, attrs, specs = specialize(fn, bound)
        except Exception as err:  # a launch Triton itself would refuse
            self.launch_errors.append({"kernel": kid, "case": self.case, "error": f"{type(err).__name__}: {err}",
                                       "traceback": traceback.format_exc(limit=6)})
            return
        variant = self._new_variant(fn, kid, signature, constexprs, attrs, options, specs, configs)
        variant = self.variants.setdefault(variant.key, variant)
        if len(variant.cases) < 3 and self.case not in variant.cases:
            variant.cases.append(self.case)

    @staticmethod
    def _new_variant(fn, kid, signature, constexprs, attrs, options, specs, configs) -> Variant:
        tuned = set(configs[0].kwargs) if configs else set()
        features: Dict[str, str] = {}
        declared: List[str] = []
        for param, (kind, value) in zip(fn.params, specs):
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
            features["num_warps"] = str(options.get("num_warps", 4))
        return Variant(kid, fn.fn.__module__, fn.fn.__name__, signature, constexprs, attrs, options, features,
                       declared, configs=list(configs) if configs else None,
                       param_index={p.name: i for i, p in enumerate(fn.params)})


RECORDER = Recorder()


def install_hooks(kernel_modules) -> None:
    """``kernel[grid](...)`` records instead of launching; the public ops take the Triton path on CPU tensors."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    import fusedskip.backend

    def jit_getitem(self, grid):
        return lambda *args, **kwargs: RECORDER.record(self, args, kwargs, grid)

    def autotuner_getitem(self, grid):
        def launch(*args, **kwargs):
            fn = _jit_function(self)
            if fn is not self.fn:
                raise NotImplementedError(f"{self.fn!r}: an autotuner over heuristics is not recorded")
            RECORDER.record(fn, args, kwargs, grid, configs=list(self.configs))
        return launch

    JITFunction.__getitem__ = jit_getitem
    Autotuner.__getitem__ = autotuner_getitem
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


def drive(drivers, kernel_modules, int64_pass: bool = True) -> Tuple[List[Dict[str, str]], List[Dict[str, str]]]:
    """Run every case of ``drivers`` ((op, yields (label, case))), then again with int64 indexing
    forced: (driver errors, skipped ops)."""
    import torch
    errors: List[Dict[str, str]] = []
    skipped: Dict[str, str] = {}
    passes = [("", contextlib.nullcontext)]
    if int64_pass:
        passes.append(("[int64] ", lambda: forced_int64(kernel_modules)))
    for prefix, context in passes:
        for op, driver in drivers:
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


def op_drivers():
    """The public-op drivers of tests/compile_cases.py (beside this file)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("compile_cases").DRIVERS


def load_extra(path: str):
    """(kernels, drivers) of an ``--extra-kernels`` file: its ``_*_kernel`` kernels and ``CASES()``.

    Its folder goes on ``sys.path`` (before the workers spawn) so workers import it by name."""
    folder, stem = os.path.split(os.path.abspath(path))
    sys.path.insert(0, folder)
    module = importlib.import_module(os.path.splitext(stem)[0])
    return module_kernels(module), [(f"extra kernels {stem}", module.CASES)]


def summarise(kernels, variants, selected, results) -> Dict[str, Any]:
    """The per-kernel part of the report."""
    blank = {"launches": 0, "variants_recorded": 0, "variants_compiled": 0, "compile_errors": 0, "compile_s": 0.0}
    per_kernel = {kid: dict(blank, launches=RECORDER.launches.get(kid, 0)) for kid in kernels}
    for v in variants:
        per_kernel.setdefault(v.kid, dict(blank, launches=RECORDER.launches.get(v.kid, 0)))
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
    return {
        "kernels": per_kernel,
        "never_launched": sorted(kid for kid in kernels if per_kernel[kid]["launches"] == 0),
        "never_compiled": sorted(kid for kid in kernels if per_kernel[kid]["variants_compiled"] == 0),
        # The values each declared constexpr (tile sizes aside) was compiled with, per kernel.
        "constexpr_values_compiled": {kid: {name: sorted(vals) for name, vals in d.items()}
                                      for kid, d in compiled_values.items()},
        "compile_errors": compile_errors,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--coverage", choices=COVERAGES, default="default")
    parser.add_argument("--no-int64-pass", action="store_true")
    parser.add_argument("--extra-kernels", help="a file with _*_kernel kernels and CASES() to compile too")
    parser.add_argument("--only-extra", action="store_true", help="drive the --extra-kernels cases alone")
    parser.add_argument("--dry-run", action="store_true", help="record and select only")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def write(report):
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)

    t0 = time.perf_counter()
    report: Dict[str, Any] = {"target": f"cuda sm_{TARGET_ARCH}", "coverage": args.coverage,
                              "triton": triton_version().removeprefix("triton ")}
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        report["unavailable"] = "TRITON_INTERPRET is set: triton.jit gives interpreted functions"
    else:
        report["unavailable"] = triton_api_problem()
    if report["unavailable"] is not None:
        write(report)
        return 0
    del report["unavailable"]

    import torch
    report["torch"] = torch.__version__
    kernels, kernel_modules = discover_kernels()
    drivers = () if args.only_extra else op_drivers()
    if args.only_extra:
        kernels = {}
    if args.extra_kernels:
        extra_kernels, extra_drivers = load_extra(args.extra_kernels)
        kernels.update(extra_kernels)
        drivers = tuple(drivers) + tuple(extra_drivers)

    pool = ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)
    try:
        probe = pool.submit(toolchain_problem)  # workers start (and probe) while the parent records
        install_hooks(kernel_modules)
        t1 = time.perf_counter()
        driver_errors, skipped = drive(drivers, kernel_modules, int64_pass=not (args.no_int64_pass or args.only_extra))
        report["record_s"] = round(time.perf_counter() - t1, 2)
        variants = list(RECORDER.variants.values())
        selected = [] if args.dry_run else select(variants, args.coverage)
        problem = probe.result()
        if isinstance(problem, str):
            report["unavailable"] = f"triton {report['triton']}: {problem}"
            write(report)
            return 0
        report.update(problem)
        t2 = time.perf_counter()
        results = list(pool.map(compile_job, [v.job() for v in selected]))
        report["compile_s"] = round(time.perf_counter() - t2, 2)
    finally:
        pool.shutdown(cancel_futures=True)

    report.update(summarise(kernels, variants, selected, results))
    report.update({
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
