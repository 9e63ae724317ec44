"""Property-based fuzz of the fused norms (issue 15): hypothesis over shapes, dtypes, layouts,
magnitudes (constant and non-finite inputs included), momentum variants and the module state
after rejected calls, against float64 references built from torch.nn.functional.

Sized for CI (a few dozen interpreted examples, well under a minute) and reproducible:
``derandomize=True`` draws the same examples on every run.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import make_input, tolerance
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import fusedskip
from fusedskip.activations import apply_activation_reference
from fusedskip.kernels import batch_norm_act as bn_kernels
from fusedskip.kernels import group_norm_act as gn_kernels
from fusedskip.ops.batch_norm_act import BatchNormAct2d, batch_norm_act

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns on Inf/NaN in the interpreter

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ACTS = ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh")
# (mean, std): centred, offset, large offset (|mean|/std = 1e3) and constant channels.
MAGNITUDES = ((0.0, 1.0), (3.0, 0.1), (1e4, 10.0), (10000.7, 0.0), (3.3, 0.0))
# No shrinking: every interpreted example costs ~0.1–1 s; a failure is reported as drawn.
FUZZ = settings(max_examples=14, deadline=None, derandomize=True, database=None, report_multiple_bugs=True,
                phases=(Phase.explicit, Phase.generate),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _input(shape, dtype, layout, mean, std, requires_grad=False):
    if std == 0.0:
        x = make_input(shape, dtype, layout, mean=0.0, scale=0.0)
        x = x.detach()
        x.fill_(mean)  # constant: every channel (and group) has zero variance
        return x.requires_grad_(requires_grad)
    return make_input(shape, dtype, layout, mean=mean, scale=std, requires_grad=requires_grad)


def _close(actual, expected, dtype, rel_spread=1.0, what=""):
    """``dtype``'s tolerance, scaled by the reference's magnitude and by |mean|/std (the input's
    own quantisation in fp32/fp16 carries over as ulp(mean)/std)."""
    atol, rtol = tolerance(dtype)
    mag = max(1.0, float(expected.detach().abs().nan_to_num(0.0, 0.0, 0.0).max())) if expected.numel() else 1.0
    factor = max(1.0, rel_spread / 20.0) if dtype != F64 else 1.0
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=atol * mag * factor * 4,
                               rtol=rtol * factor * 4, equal_nan=True, msg=what or None)


def _spread(mean, std, with_skip):
    """|mean|/std of the normalised tensor (the skip adds spread 0.5 to a constant input)."""
    std = max(std, 0.5 * with_skip)
    return abs(mean) / std if std else 1.0


def _close_stat(actual, expected, spread, what):
    """Running statistics; with a non-finite input torch's may be ±Inf where ours are NaN."""
    bad = ~expected.isfinite()
    assert (~actual.isfinite() == bad).all(), what
    _close(actual[~bad], expected[~bad], F32, spread, what)


@contextlib.contextmanager
def _gn_tile(tile):
    """GroupNorm's split reduction tile; a small one also forces the split design (the fuzz's
    small groups otherwise take the single-pass design, which tile 2048 keeps)."""
    previous = gn_kernels.REDUCE_TILE, gn_kernels.SINGLE_PASS_MAX_ELEMS
    gn_kernels.REDUCE_TILE = tile
    if tile < 2048:
        gn_kernels.SINGLE_PASS_MAX_ELEMS = 0
    try:
        yield
    finally:
        gn_kernels.REDUCE_TILE, gn_kernels.SINGLE_PASS_MAX_ELEMS = previous


def _poke(x, where, value):
    """Write ``value`` at flat position ``where`` of x (a leaf without grad yet)."""
    with torch.no_grad():
        x.view(-1)[where % x.numel()] = value
    return x


@FUZZ
@given(
    n=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 4), w=st.integers(1, 4),
    dtype=st.sampled_from((F32, F16, BF16, F64)), layout=st.sampled_from(("nchw", "channels_last", "strided")),
    magnitude=st.sampled_from(MAGNITUDES), act=st.sampled_from(ACTS), training=st.booleans(),
    momentum=st.sampled_from((0.1, None, 0.0, 1.0)), affine=st.booleans(), with_skip=st.booleans(),
    nonfinite=st.sampled_from((None, float("inf"), float("-inf"), float("nan"))), where=st.integers(0, 10**6),
    split=st.booleans(),
)
def test_fuzz_batch_norm_act(n, c, h, w, dtype, layout, magnitude, act, training, momentum, affine, with_skip,
                             nonfinite, where, split):
    if nonfinite is not None:
        training = True  # batch statistics: NaN spreads over the channel, as torch (eval: pointwise)
    if training and n * h * w == 1:
        n = 2  # one value per channel is rejected (tested elsewhere)
    shape = (n, c, h, w)
    mean, std = magnitude
    x = _input(shape, dtype, layout if nonfinite is None else "nchw", mean, std)
    if nonfinite is not None:
        _poke(x, where, nonfinite)
    x.requires_grad_(nonfinite is None)
    skip = make_input(shape, dtype, "channels_last", mean=-0.5, scale=0.5, requires_grad=True) if with_skip else None
    weight = (torch.rand(c, dtype=F64) + 0.5).to(F32).requires_grad_() if affine else None
    bias = (torch.randn(c, dtype=F64)).to(F32).requires_grad_() if affine else None
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm64, rv64 = rm.double(), rv.double()
    nbt = torch.tensor(3)
    slope = 0.2 if act == "leaky_relu" else None
    config = dict(rows=3, block_s=4, block_c=2) if split else dict(rows=1)
    with fusedskip.use_backend("triton"), bn_kernels.reduction_config(**config):
        y = batch_norm_act(x, rm, rv, weight, bias, training, momentum, 1e-5, act, slope, skip,
                           0.75 if with_skip else None, num_batches_tracked=nbt)
    leaf = [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
            for t in (x, skip, weight, bias)]
    xr, sr, wr, br = leaf
    h64 = xr + 0.75 * sr if with_skip else xr
    factor = 1.0 / 3 if momentum is None else momentum
    z = F.batch_norm(h64, rm64, rv64, wr, br, training, factor, 1e-5)
    yr = apply_activation_reference(z, act, slope or 0.0)
    spread = _spread(mean, std, with_skip)
    _close(y, yr, dtype, spread, "output")
    assert y.dtype == dtype and y.shape == x.shape
    if training and std == 0.0 and not with_skip and act == "identity":
        expected = (bias.detach() if affine else torch.zeros(c)).reshape(1, c, 1, 1).expand(shape).to(dtype)
        assert torch.equal(y, expected), "a constant channel must normalise to exactly β"
    _close_stat(rm, rm64, spread, "running_mean")
    _close_stat(rv, rv64, spread, "running_var")
    if nonfinite is not None:
        return
    g = torch.randn(shape, dtype=F64)
    y.backward(g.to(dtype))
    yr.backward(g.to(dtype).double())
    for got, ref, name in ((x, xr, "dx"), (skip, sr, "dskip"), (weight, wr, "dweight"), (bias, br, "dbias")):
        if got is not None:
            _close(got.grad, ref.grad, dtype if name in ("dx", "dskip") else F32, spread * 4, name)


@FUZZ
@given(
    n=st.integers(1, 3), cg=st.integers(1, 3), g=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5),
    dtype=st.sampled_from((F32, F16, BF16, F64)), layout=st.sampled_from(("nchw", "channels_last", "strided")),
    magnitude=st.sampled_from(MAGNITUDES), act=st.sampled_from(ACTS), affine=st.booleans(), with_skip=st.booleans(),
    nonfinite=st.sampled_from((None, float("inf"), float("-inf"), float("nan"))), where=st.integers(0, 10**6),
    tile=st.sampled_from((16, 2048)),
)
def test_fuzz_group_norm_act(n, cg, g, h, w, dtype, layout, magnitude, act, affine, with_skip, nonfinite, where, tile):
    c = cg * g
    if n * cg * h * w == 1:
        h = 2  # one value per group is rejected (tested elsewhere)
    shape = (n, c, h, w)
    mean, std = magnitude
    x = _input(shape, dtype, layout if nonfinite is None else "nchw", mean, std)
    if nonfinite is not None:
        _poke(x, where, nonfinite)
    x.requires_grad_(nonfinite is None)
    skip = make_input(shape, dtype, "strided", mean=0.3, scale=0.5, requires_grad=True) if with_skip else None
    gate = (torch.rand(c) + 0.5).requires_grad_() if with_skip else None
    weight = (torch.rand(c, dtype=F64) + 0.5).to(F32).requires_grad_() if affine else None
    bias = torch.randn(c, dtype=F64).to(F32).requires_grad_() if affine else None
    slope = 0.2 if act == "leaky_relu" else None
    with fusedskip.use_backend("triton"), _gn_tile(tile):
        y = fusedskip.group_norm_act(x, g, weight, bias, 1e-5, act, slope, skip, gate)
    leaf = [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
            for t in (x, skip, gate, weight, bias)]
    xr, sr, ar, wr, br = leaf
    h64 = xr + ar.reshape(1, c, 1, 1) * sr if with_skip else xr
    yr = apply_activation_reference(F.group_norm(h64, g, wr, br, 1e-5), act, slope or 0.0)
    spread = _spread(mean, std, with_skip)
    _close(y, yr, dtype, spread, "output")
    if std == 0.0 and not with_skip and act == "identity":
        expected = (bias.detach() if affine else torch.zeros(c)).reshape(1, c, 1, 1).expand(shape).to(dtype)
        assert torch.equal(y, expected), "a constant group must normalise to exactly β"
    if nonfinite is not None:
        bad = x.detach().reshape(n, g, -1).isfinite().all(-1).logical_not()
        assert y.reshape(n, g, -1)[bad].isnan().all(), "a non-finite value must make its whole group NaN"
        return
    dy = torch.randn(shape, dtype=F64)
    with _gn_tile(tile):
        y.backward(dy.to(dtype))
    yr.backward(dy.to(dtype).double())
    for got, ref, name in ((x, xr, "dx"), (skip, sr, "dskip"), (gate, ar, "dgate"), (weight, wr, "dweight"),
                           (bias, br, "dbias")):
        if got is not None:
            _close(got.grad, ref.grad, dtype if name in ("dx", "dskip") else F32, spread * 4, name)


_BAD_CALLS = ("skip_shape", "gate_shape", "gate_without_skip", "one_value", "channels", "input_bias", "slope_call")


@settings(max_examples=10, deadline=None, derandomize=True, database=None, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow])
@given(
    momentum=st.sampled_from((0.1, None, 0.0, 1.0)),
    calls=st.lists(st.sampled_from(("good",) + _BAD_CALLS), min_size=2, max_size=5),
    backend_name=st.sampled_from(("triton", "reference")),
)
def test_fuzz_module_state_after_rejected_calls(momentum, calls, backend_name):
    """Only successful calls change BatchNormAct2d's state (num_batches_tracked, running
    statistics), which then matches nn.BatchNorm2d given the successful calls only."""
    ours = BatchNormAct2d(3, momentum=momentum, act="relu")
    ref = nn.BatchNorm2d(3, momentum=momentum)
    bad = {
        "skip_shape": lambda x: ours(x, torch.randn(2, 3, 2, 3)),
        "gate_shape": lambda x: ours(x, torch.randn_like(x), torch.ones(2)),
        "gate_without_skip": lambda x: ours(x, None, 0.5),
        "one_value": lambda x: ours(x[:1, :, :1, :1]),
        "channels": lambda x: ours(x[:, :2]),
        "input_bias": lambda x: ours(x, input_bias=torch.ones(2)),
        "slope_call": lambda x: batch_norm_act(x, ours.running_mean, ours.running_var, training="yes"),
    }
    with fusedskip.use_backend(backend_name):
        for i, call in enumerate(calls):
            x = make_input((2, 3, 2, 2), mean=float(i), scale=1.0 + i)
            if call == "good":
                y = ours(x)
                torch.testing.assert_close(y, F.relu(ref(x)), atol=1e-5, rtol=1e-5)
            else:
                with pytest.raises((ValueError, TypeError)):
                    bad[call](x)
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item(), call
            torch.testing.assert_close(ours.running_mean, ref.running_mean, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-6, rtol=1e-5)
