"""Every kernel of every op, forward and backward, each dtype, both dense layouts: one compact matrix.

This is the fast subset `make test-device` runs on the GPU machines' stack (torch 2.11, triton
3.6) before any GPU minute is spent, and part of the normal suite. Each case drives one public op
on the Triton backend (interpreted on the CPU, native on a GPU) and compares output and every
input gradient with the float64 reference path; the activations rotate over the cases so each
one runs forward and backward. The last test checks that the matrix launched every
``_*_kernel`` defined in ``fusedskip.kernels``: a new kernel that no case reaches fails here.
The per-op test files hold the exhaustive versions (odd shapes, strides, gradcheck, opcheck,
bad input); this file is about reach, at tolerances that still catch a wrong formula.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import pkgutil

import pytest
import torch
from helpers import TOLERANCES, make_input

import fusedskip
from fusedskip import backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last")
ACTS = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "identity")
SHAPE = (2, 6, 3, 5)

_LAUNCHED: set = set()


def _kernel_name(fn) -> str:
    inner = getattr(fn, "fn", fn)
    return f"{inner.__module__}.{inner.__qualname__}"


@pytest.fixture(scope="module", autouse=True)
def _record_launches():
    """Record the name of every Triton kernel launched while this module runs."""
    if not backend.interpreter_active():
        # Native GPU run: JITFunction.run is the launch entry point.
        from triton.runtime.jit import JITFunction as runner
    else:
        from triton.runtime.interpreter import InterpretedFunction as runner
    real_run = runner.run

    def run(self, *args, **kwargs):
        _LAUNCHED.add(_kernel_name(self))
        return real_run(self, *args, **kwargs)

    runner.run = run
    yield
    runner.run = real_run


def _gated_skip(x, skip, w, b, gate, act, training):
    return fusedskip.gated_skip_add(x, skip, gate)


def _group_norm(x, skip, w, b, gate, act, training):
    return fusedskip.group_norm_act(x, 3, w, b, act=act, skip=skip, gate=gate)


def _batch_norm(x, skip, w, b, gate, act, training):
    rm = torch.linspace(-0.2, 0.3, x.shape[1], dtype=torch.float32)
    rv = torch.linspace(0.5, 1.5, x.shape[1], dtype=torch.float32)
    return fusedskip.batch_norm_act(x, rm, rv, w, b, training=training, act=act, skip=skip, gate=gate)


# (name, function, uses a skip, gate: None / "scalar" / "channel", training)
OPS = [
    ("gated_skip/scalar", _gated_skip, True, "scalar", None),
    ("gated_skip/channel", _gated_skip, True, "channel", None),
    ("group_norm", _group_norm, False, None, None),
    ("group_norm/skip", _group_norm, True, "channel", None),
    # Small groups take GroupNorm's single-pass design; "split" forces its split design.
    ("group_norm/split/skip", _group_norm, True, "scalar", None),
    ("batch_norm/train", _batch_norm, False, None, True),
    ("batch_norm/eval", _batch_norm, False, None, False),
    ("batch_norm/train/skip", _batch_norm, True, "scalar", True),
    ("batch_norm/eval/skip", _batch_norm, True, "channel", False),
]
CASES = list(itertools.product(range(len(OPS)), DTYPES, LAYOUTS))


def _inputs(op, dtype, layout, seed):
    _, _, uses_skip, gate_kind, _ = op
    torch.manual_seed(seed)
    c = SHAPE[1]
    x = make_input(SHAPE, dtype, layout, mean=0.4, requires_grad=True)
    skip = make_input(SHAPE, dtype, layout, mean=-0.3, requires_grad=True) if uses_skip else None
    w = (torch.rand(c) + 0.5).requires_grad_()
    b = (torch.randn(c) * 0.2).requires_grad_()
    gate = {None: None, "scalar": torch.tensor(0.7), "channel": torch.rand(c) + 0.3}[gate_kind]
    if gate is not None:
        gate.requires_grad_()
    return x, skip, w, b, gate


def _double(t):
    return None if t is None else t.detach().double().requires_grad_()


@pytest.mark.parametrize("op_idx, dtype, layout", CASES,
                         ids=[f"{OPS[i][0]}-{str(d).split('.')[-1]}-{lay}" for i, d, lay in CASES])
def test_kernels_forward_backward(op_idx, dtype, layout, monkeypatch):
    op = OPS[op_idx]
    name, fn, _, _, training = op
    if "/split" in name:
        from fusedskip.kernels import group_norm_act as gn_kernels
        monkeypatch.setattr(gn_kernels, "SINGLE_PASS_MAX_ELEMS", 0)
    act = ACTS[CASES.index((op_idx, dtype, layout)) % len(ACTS)]
    inputs = _inputs(op, dtype, layout, seed=op_idx)
    with fusedskip.use_backend("triton"):
        y = fn(*inputs, act, training)
    assert y.dtype == dtype and y.shape == SHAPE
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), "the output keeps the input's layout"
    ref_inputs = [_double(t) for t in inputs]
    with fusedskip.use_backend("reference"):
        ref = fn(*ref_inputs, act, training)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol * 4, rtol=rtol * 4, msg=f"{name} {act} forward")

    g = torch.randn(SHAPE, dtype=torch.float64) + 0.2
    y.backward(g.to(dtype))
    ref.backward(g)
    for label, t, r in zip(("x", "skip", "weight", "bias", "gate"), inputs, ref_inputs):
        if t is None or (name.startswith("gated_skip") and label in ("weight", "bias")):
            continue
        assert t.grad is not None, f"{name}: no gradient for {label}"
        scale = 8.0 * max(1.0, float(r.grad.abs().max()))  # sums over many fp16/bf16 terms
        torch.testing.assert_close(t.grad.double(), r.grad, atol=atol * scale, rtol=rtol * 8,
                                   msg=f"{name} {act} {str(dtype)} {layout}: grad of {label}")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_batch_norm_merge_stats_kernel(dtype):
    """SyncBatchNorm's merge of per-rank (count, mean, M2) rows (its own kernel; the single-rank
    statistics kernel finalizes in-kernel): mean, rstd and the running update vs float64."""
    dev = "cpu" if backend.interpreter_active() else "cuda"
    counts = torch.tensor([12.0, 20.0, 7.0], dtype=dtype, device=dev)
    means, m2s = torch.randn(3, 6, dtype=dtype, device=dev), torch.rand(3, 6, dtype=dtype, device=dev) * 10
    rm, rv = torch.zeros(6, device=dev), torch.ones(6, device=dev)
    mean, rstd = torch.ops.fusedskip.batch_norm_act_merge_stats(counts, means, m2s, rm, rv, None, 0.1, 1e-5)
    c64, mu64, m264 = counts.double()[:, None], means.double(), m2s.double()
    mu = (c64 * mu64).sum(0) / c64.sum()
    m2 = m264.sum(0) + (c64 * (mu64 - mu) ** 2).sum(0)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean.double(), mu, **tol)
    torch.testing.assert_close(rstd.double(), (m2 / c64.sum() + 1e-5).rsqrt(), **tol)
    torch.testing.assert_close(rm.double(), 0.1 * mu, **tol)
    torch.testing.assert_close(rv.double(), 0.9 + 0.1 * m2 / (c64.sum() - 1), **tol)


def _python_function(obj):
    """The plain function under a triton.jit / autotune / heuristics wrapper (each keeps it in ``fn``)."""
    for _ in range(8):
        if inspect.isfunction(obj):
            return obj
        obj = getattr(obj, "fn", None)
    return None


def _defined_kernels() -> set:
    import fusedskip.kernels as package
    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"fusedskip.kernels.{info.name}")
        for attr, obj in vars(module).items():
            fn = _python_function(obj) if attr.startswith("_") and attr.endswith("_kernel") else None
            if fn is not None and fn.__module__ == module.__name__:
                found.add(f"{fn.__module__}.{fn.__qualname__}")
    return found


def test_every_kernel_was_launched():
    """Runs after the matrix (same module, same worker): each defined kernel ran at least once."""
    defined = _defined_kernels()
    assert defined, "no kernels found in fusedskip.kernels"
    missing = sorted(defined - _LAUNCHED)
    assert not missing, f"kernels no case of the matrix launched: {missing}"
