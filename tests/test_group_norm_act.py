"""Fused GroupNorm + activation: Triton kernels vs a float64 reference (forward and every
gradient), split/unsplit reductions, layouts, dtypes, gradcheck, opcheck, torch.compile,
determinism, modules and state_dicts, bad input."""
import math

import pytest
import torch
from helpers import assert_close, make_input, poisoned_empty
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fusedskip
from fusedskip.activations import activation_module, apply_activation_reference
from fusedskip.kernels import group_norm_act as gna_kernels
from fusedskip.kernels import launch
from fusedskip.ops import group_norm_act as gna_ops
from fusedskip.ops.group_norm_act import GroupNormAct, InstanceNormAct2d, group_norm_act, group_norm_act_reference

# Triton's interpreter evaluates sigmoid/tanh in numpy, which warns on exp overflow in the tails.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

ACTS = ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh")
HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# float64 reference and comparison helpers (also used by test_skip_norm_act.py)
# --------------------------------------------------------------------------------------------
def reference64(x, num_groups, weight, bias, eps, act, slope, skip=None, gate=None):
    """act(GroupNorm(x [+ gate·skip])) in float64 with an explicit two-pass mean/variance."""
    h = x.double()
    if skip is not None:
        a = gate.double().reshape(1, -1, 1, 1) if isinstance(gate, torch.Tensor) else float(gate)
        h = h + a * skip.double()
    n = h.shape[0]
    hg = h.reshape(n, num_groups, -1)
    mean = hg.mean(-1, keepdim=True)
    var = ((hg - mean) ** 2).mean(-1, keepdim=True)
    z = ((hg - mean) / torch.sqrt(var + eps)).reshape(h.shape)
    if weight is not None:
        z = z * weight.double().reshape(1, -1, 1, 1)
    if bias is not None:
        z = z + bias.double().reshape(1, -1, 1, 1)
    return apply_activation_reference(z, act, slope)


def leaf64(t):
    return t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t


def check_tensor(actual, expected, dtype, factor=1.0):
    """Compare at ``dtype``'s tolerance, scaled by the reference's magnitude (gradients reach
    rstd·|dy| ≈ 10 for std-0.1 inputs) and ``factor``."""
    assert actual.shape == expected.shape
    mag = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    assert_close(actual, expected, dtype, scale=mag * factor)


def run_and_check(x, num_groups, weight=None, bias=None, eps=1e-5, act="relu", slope=None, skip=None,
                  gate=None, dy_layout=None, param_factor=1.0):
    """Forward + every gradient of group_norm_act vs the float64 reference; outputs poisoned."""
    dtype = x.dtype
    name, slope_v = fusedskip.activations.resolve_activation(act, slope)
    inputs = [t for t in (x, weight, bias, skip, gate) if isinstance(t, torch.Tensor) and t.requires_grad]
    with poisoned_empty():
        y = group_norm_act(x, num_groups, weight, bias, eps, act, slope, skip=skip, gate=gate)
    assert y.dtype == dtype and y.shape == x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y.is_contiguous(memory_format=torch.channels_last)
    x64, w64, b64, k64, g64 = (leaf64(t) for t in (x, weight, bias, skip, gate))
    ref = reference64(x64, num_groups, w64, b64, eps, name, slope_v, k64, g64 if skip is not None else None)
    check_tensor(y, ref, dtype)
    if not inputs:
        return y
    dy = torch.randn(y.shape, dtype=torch.float64, device=y.device).to(dtype)
    if dy_layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    with poisoned_empty():
        grads = torch.autograd.grad(y, inputs, dy)
    inputs64 = [{id(x): x64, id(weight): w64, id(bias): b64, id(skip): k64, id(gate): g64}[id(t)] for t in inputs]
    grads64 = torch.autograd.grad(ref, inputs64, dy.double())
    for t, gr, gr64 in zip(inputs, grads, grads64):
        assert gr.dtype == t.dtype and gr.shape == t.shape
        if t is x or t is skip:
            check_tensor(gr, gr64, dtype)
        else:  # parameter sums over N·H·W (or C·N·H·W) fp32 terms
            n_terms = x.numel() / t.numel()
            tol_dtype = torch.float32 if t.dtype == torch.float64 and dtype != torch.float64 else t.dtype
            check_tensor(gr, gr64, tol_dtype, factor=max(1.0, math.sqrt(n_terms) / 4) * param_factor)
    return y


def make_params(c, dtype, device, affine=True):
    if not affine:
        return None, None
    w = (torch.randn(c, dtype=torch.float64, device=device) * 0.5 + 1.0).to(dtype).requires_grad_()
    b = (torch.randn(c, dtype=torch.float64, device=device) * 0.5).to(dtype).requires_grad_()
    return w, b


@pytest.fixture
def force_split(monkeypatch):
    """Small tiles and many target programs: every (n, g) reduction splits over several chunks."""
    monkeypatch.setattr(gna_kernels, "REDUCE_TILE", 32)
    monkeypatch.setattr(launch, "target_programs", lambda t: 64)


# --------------------------------------------------------------------------------------------
# Kernels vs float64
# --------------------------------------------------------------------------------------------
# (shape, groups, dtype, layout, act, affine): odd and non-power-of-two shapes and group sizes,
# groups = 1 (LayerNorm) and groups = C (InstanceNorm), every activation, every dtype and layout.
CASES = [
    ((2, 6, 5, 7), 3, torch.float32, "nchw", "relu", True),
    ((2, 12, 5, 7), 4, torch.float32, "channels_last", "silu", True),
    ((2, 12, 5, 7), 4, torch.float32, "strided", "gelu", False),
    ((1, 8, 3, 5), 1, torch.float32, "nchw", "leaky_relu", True),
    ((2, 6, 4, 3), 6, torch.float32, "channels_last", "gelu_tanh", True),
    ((3, 5, 2, 9), 5, torch.float32, "strided", "identity", True),
    ((2, 12, 5, 7), 4, torch.float16, "nchw", "silu", True),
    ((2, 12, 5, 7), 3, torch.bfloat16, "channels_last", "gelu", True),
    ((2, 10, 3, 3), 5, torch.bfloat16, "strided", "relu", False),
    ((2, 10, 3, 3), 2, torch.float64, "strided", "leaky_relu", True),
]


@pytest.mark.parametrize("shape,groups,dtype,layout,act,affine", CASES)
def test_matches_fp64_reference(triton_backend, device, shape, groups, dtype, layout, act, affine):
    x = make_input(shape, dtype, layout, mean=3.0, scale=0.1, requires_grad=True)  # cancellation-prone
    # fp32 parameters with half inputs: what autocast hands over.
    w, b = make_params(shape[1], torch.float32 if dtype in HALF else dtype, device, affine)
    slope = 0.2 if act == "leaky_relu" else None
    run_and_check(x, groups, w, b, 1e-5, act, slope, dy_layout=layout)
    assert gna_kernels.reduce_plan(x).chunks == 1  # the unsplit path on these small shapes


@pytest.mark.parametrize("layout,dtype", [("nchw", torch.float64), ("channels_last", torch.float32),
                                          ("strided", torch.float32)])
def test_split_reduction_matches_fp64(triton_backend, force_split, device, layout, dtype):
    shape = (2, 4, 5, 7)
    x = make_input(shape, dtype, layout, mean=-2.0, scale=3.0, requires_grad=True)
    assert gna_kernels.reduce_plan(x).chunks > 1
    w, b = make_params(4, dtype, device)
    run_and_check(x, 2, w, b, 1e-5, "silu")


def test_split_and_unsplit_agree(triton_backend, device, monkeypatch):
    x = make_input((2, 4, 6, 6), mean=3.0, scale=0.1)
    w, b = make_params(4, torch.float32, device)
    y1 = group_norm_act(x, 2, w, b, act="gelu")
    monkeypatch.setattr(gna_kernels, "REDUCE_TILE", 16)
    monkeypatch.setattr(launch, "target_programs", lambda t: 1000)
    assert gna_kernels.reduce_plan(x).chunks > 1
    y2 = group_norm_act(x, 2, w, b, act="gelu")
    torch.testing.assert_close(y1, y2, atol=2e-5, rtol=2e-5)


def test_large_mean_small_std(triton_backend, device):
    # |mean| / std = 3000: E[x²] − E[x]² in fp32 would be off by ~100% (or negative); Welford
    # keeps rstd to ~1e-4. The output is then limited by fp32's resolution of x and of the mean
    # (ulp(300) / std ≈ 3e-4), not by the variance.
    x = make_input((2, 4, 8, 8), mean=300.0, scale=0.1)
    y, mean, rstd = torch.ops.fusedskip.group_norm_act_forward(x, None, None, None, None, 2, 1e-5, "identity", 0.0)
    xg = x.double().reshape(2, 2, -1)
    rstd64 = 1.0 / torch.sqrt(xg.var(-1, unbiased=False) + 1e-5)
    torch.testing.assert_close(rstd.double(), rstd64, rtol=1e-3, atol=0)
    ref = reference64(x, 2, None, None, 1e-5, "identity", 0.0)
    torch.testing.assert_close(y.double(), ref, atol=3e-3, rtol=0)
    with fusedskip.use_backend("reference"):  # the reference path is centred against the same trap
        torch.testing.assert_close(group_norm_act(x, 2, act=None).double(), ref, atol=3e-3, rtol=0)


def test_bf16_params_and_autocast(triton_backend, device):
    # bf16 parameters with bf16 input.
    x = make_input((2, 6, 3, 5), torch.bfloat16, mean=3.0, scale=0.1, requires_grad=True)
    w, b = make_params(6, torch.bfloat16, device)
    run_and_check(x, 3, w, b, 1e-5, "silu")
    # fp32 module parameters with a bf16 input under autocast: y is bf16, gradients fp32.
    m = GroupNormAct(3, 6, act="silu").to(device)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    xb = make_input((2, 6, 3, 5), torch.bfloat16, layout="channels_last", mean=1.0, requires_grad=True)
    with torch.autocast(device_type=xb.device.type, dtype=torch.bfloat16):
        y = m(xb)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert m.weight.grad.dtype == torch.float32 and xb.grad.dtype == torch.bfloat16
    x64, w64, b64 = leaf64(xb), leaf64(m.weight), leaf64(m.bias)
    ref = reference64(x64, 3, w64, b64, 1e-5, "silu", 0.0)
    ref.to(torch.bfloat16).double().square().sum().backward()
    check_tensor(y, ref, torch.bfloat16)
    check_tensor(m.weight.grad, w64.grad, torch.bfloat16)
    check_tensor(xb.grad, x64.grad, torch.bfloat16)


def test_partial_gradients(triton_backend, device):
    x = make_input((2, 6, 3, 4), mean=1.0, requires_grad=True)
    w, b = make_params(6, torch.float32, device)
    # Only the parameters need gradients (no dx pass) ...
    run_and_check(x.detach(), 3, w, b, 1e-5, "relu")
    # ... only x and γ, with no bias (no dβ sums) ...
    run_and_check(x, 2, w, None, 1e-5, "leaky_relu")
    # ... and β without γ.
    run_and_check(x.detach(), 6, None, b, 1e-5, "silu")


def test_expanded_and_sliced_grad_output(triton_backend, device):
    x = make_input((2, 6, 5, 3), layout="channels_last", mean=2.0, requires_grad=True)
    w, b = make_params(6, torch.float32, device)
    y = group_norm_act(x, 3, w, b, act="silu")
    y.sum().backward()  # grad_output expanded: all strides 0
    x64, w64, b64 = leaf64(x), leaf64(w), leaf64(b)
    reference64(x64, 3, w64, b64, 1e-5, "silu", 0.0).sum().backward()
    check_tensor(x.grad, x64.grad, torch.float32)
    check_tensor(w.grad, w64.grad, torch.float32)
    x.grad = w.grad = b.grad = None
    x64.grad = w64.grad = b64.grad = None
    y = group_norm_act(x, 3, w, b, act="silu")
    y[:, :, 1:, ::2].square().sum().backward()  # grad_output with holes
    reference64(x64, 3, w64, b64, 1e-5, "silu", 0.0)[:, :, 1:, ::2].square().sum().backward()
    check_tensor(x.grad, x64.grad, torch.float32)
    check_tensor(b.grad, b64.grad, torch.float32)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 3), cg=st.integers(1, 5), g=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 7),
    layout=st.sampled_from(("nchw", "channels_last", "strided")), act=st.sampled_from(ACTS),
)
def test_random_shapes(triton_backend, device, n, cg, g, h, w, layout, act):
    torch.manual_seed(n * 1000 + cg * 100 + g * 10 + h + w)
    c = cg * g
    x = make_input((n, c, h, w), torch.float32, layout, mean=1.5, scale=0.5, requires_grad=True)
    wt, b = make_params(c, torch.float32, device)
    run_and_check(x, g, wt, b, 1e-3, act)


def test_int64_indexing_path(triton_backend, device, monkeypatch):
    # Tensors past 2³¹ elements do not fit here: force the int64 path on a small one.
    monkeypatch.setattr(gna_kernels, "needs_int64", lambda *ts: True)
    x = make_input((2, 6, 3, 5), layout="strided", mean=2.0, requires_grad=True)
    w, b = make_params(6, torch.float32, device)
    skip = make_input((2, 6, 3, 5), layout="channels_last", requires_grad=True)
    gate = (torch.rand(6, device=device) + 0.5).requires_grad_()
    run_and_check(x, 2, w, b, 1e-5, "gelu_tanh", skip=skip, gate=gate)


def test_empty_tensors(triton_backend, device):
    for shape in ((0, 4, 3, 3), (2, 4, 0, 3)):
        x = torch.randn(shape, device=device, requires_grad=True)
        w, b = make_params(4, torch.float32, device)
        y = group_norm_act(x, 2, w, b, act="silu")
        assert y.shape == shape
        y.sum().backward()
        assert x.grad.shape == shape
        assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_deterministic(triton_backend, force_split, device):
    x = make_input((2, 4, 5, 7), layout="channels_last", mean=3.0, scale=0.1, requires_grad=True)
    assert gna_kernels.reduce_plan(x).chunks > 1
    w, b = make_params(4, torch.float32, device)
    dy = torch.randn(x.shape, device=device)

    def run():
        y = group_norm_act(x, 2, w, b, act="gelu")
        return (y, *torch.autograd.grad(y, (x, w, b), dy))

    first, second = run(), run()
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


# --------------------------------------------------------------------------------------------
# torch.autograd.gradcheck, torch.library.opcheck, torch.compile
# --------------------------------------------------------------------------------------------
def test_gradcheck(triton_backend, device):
    # Every activation's gradients are compared with float64 autograd at 1e-10 above; gradcheck
    # (fast mode: the interpreter is slow) checks the Function's own wiring once more.
    x = make_input((2, 4, 3, 3), torch.float64, "channels_last", mean=1.0, requires_grad=True)
    w, b = make_params(4, torch.float64, device)

    def fn(x, w, b):
        return group_norm_act(x, 2, w, b, 1e-3, "gelu_tanh")

    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)


def test_opcheck(device):
    x = make_input((2, 6, 3, 4), layout="channels_last")
    w, b = make_params(6, torch.float32, device)
    w, b = w.detach(), b.detach()
    skip = make_input((2, 6, 3, 4), layout="channels_last")
    gate = torch.rand(6, device=device) + 0.5
    with fusedskip.use_backend("triton"):
        fwd = torch.ops.fusedskip.group_norm_act_forward
        bwd = torch.ops.fusedskip.group_norm_act_backward
        torch.library.opcheck(fwd, (x, None, b, skip, gate, 2, 1e-5, "leaky_relu", 0.1))
        y, mean, rstd = fwd(x, w, b, skip, gate, 3, 1e-5, "gelu", 0.0)
        dy = torch.randn_like(y)
        torch.library.opcheck(bwd, (dy, x, w, b, skip, gate, mean, rstd, 3, "gelu", 0.0, True, True, True, True, False))


def test_compile_fullgraph_matches_eager(triton_backend, device):
    torch._dynamo.reset()
    m = GroupNormAct(3, 6, act="gelu_tanh").to(device)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    x = make_input((2, 6, 4, 5), layout="channels_last", mean=2.0, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, m):
        y = fn(x)
        grads.append((y, *torch.autograd.grad(y.square().sum(), (x, m.weight, m.bias))))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# Reference path, modules, state_dicts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
def test_reference_path(device, act):
    x = make_input((2, 6, 3, 5), torch.float32, "channels_last", mean=3.0, scale=0.1)
    w, b = make_params(6, torch.float32, device)
    with fusedskip.use_backend("reference"):
        y = group_norm_act(x, 3, w, b, act=act)
    check_tensor(y, reference64(x, 3, w, b, 1e-5, act, 0.01), torch.float32)
    yb = group_norm_act_reference(x.bfloat16(), 3, w, b, act=act)
    assert yb.dtype == torch.bfloat16


def test_state_dict_round_trip_with_group_norm(triton_backend, device):
    gn = nn.GroupNorm(4, 12).to(device)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-0.5, 0.5)
    fused = GroupNormAct(4, 12, act=nn.GELU(approximate="tanh")).to(device)
    fused.load_state_dict(gn.state_dict())
    x = make_input((2, 12, 3, 5), mean=1.0)
    check_tensor(fused(x), nn.GELU(approximate="tanh")(gn(x)).double(), torch.float32)
    back = nn.GroupNorm(4, 12).to(device)
    back.load_state_dict(fused.state_dict())
    assert torch.equal(back.weight, gn.weight) and torch.equal(back.bias, gn.bias)
    assert set(GroupNormAct(4, 12, affine=False).state_dict()) == set(nn.GroupNorm(4, 12, affine=False).state_dict())
    assert "act=gelu_tanh" in repr(fused)


def test_instance_norm_act(triton_backend, device):
    inorm = nn.InstanceNorm2d(6, affine=True).to(device)
    with torch.no_grad():
        inorm.weight.uniform_(0.5, 1.5)
        inorm.bias.uniform_(-0.5, 0.5)
    m = InstanceNormAct2d(6, affine=True, act="leaky_relu", negative_slope=0.2).to(device)
    m.load_state_dict(inorm.state_dict())
    x = make_input((2, 6, 4, 3), mean=-1.0)
    check_tensor(m(x), activation_module("leaky_relu", 0.2)(inorm(x)).double(), torch.float32)
    assert InstanceNormAct2d(6).weight is None and not list(InstanceNormAct2d(6).parameters())
    with pytest.raises(ValueError, match="track_running_stats"):
        InstanceNormAct2d(6, track_running_stats=True)


# --------------------------------------------------------------------------------------------
# Bad input: clear errors before any launch
# --------------------------------------------------------------------------------------------
def test_bad_inputs(triton_backend, device, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("launched a kernel on invalid input")

    monkeypatch.setattr(gna_kernels, "group_norm_act_forward", no_launch)
    x = make_input((2, 6, 3, 3))
    w = torch.ones(6, device=device)
    cases = [
        (lambda: group_norm_act(x, 4), ValueError, "num_groups=4 must divide"),
        (lambda: group_norm_act(x, 0), ValueError, "num_groups must be positive"),
        (lambda: group_norm_act(x, True), TypeError, "num_groups must be an int"),
        (lambda: group_norm_act(x, 3, torch.ones(5, device=device)), ValueError, "weight must have shape"),
        (lambda: group_norm_act(x, 3, w, torch.ones(6, 1, device=device)), ValueError, "bias must have shape"),
        (lambda: group_norm_act(x, 3, torch.ones(6, dtype=torch.int64, device=device)), TypeError, "weight must be a floating"),
        (lambda: group_norm_act(x, 3, torch.ones(6, device="meta")), ValueError, "weight must be on"),
        (lambda: group_norm_act(x.to(torch.int32), 3), TypeError, "x must be float16"),
        (lambda: group_norm_act(x[0], 3), ValueError, "x must be a 4-D tensor"),
        (lambda: group_norm_act(x.tolist(), 3), TypeError, "x must be a torch.Tensor"),
        (lambda: group_norm_act(x, 3, eps=-1.0), ValueError, "eps must be finite"),
        (lambda: group_norm_act(x, 3, act="tanh"), ValueError, "act must be one of"),
        (lambda: group_norm_act(x, 3, act=nn.Tanh()), ValueError, "unsupported activation"),
        (lambda: group_norm_act(x, 3, gate=0.5), ValueError, "gate scales skip"),
        (lambda: group_norm_act(x, 3, skip=x[:, :3]), ValueError, "skip must have the same shape"),
        (lambda: group_norm_act(x, 3, skip=x.double()), TypeError, "skip must have x's dtype"),
        (lambda: group_norm_act(x, 3, skip=torch.empty(x.shape, device="meta")), ValueError, "skip must be on"),
        (lambda: group_norm_act(x, 3, skip=x, gate=torch.ones(4)), ValueError, "gate must have shape"),
        (lambda: GroupNormAct(4, 6), ValueError, "num_groups=4 must divide"),
        (lambda: GroupNormAct(3, 6)(make_input((2, 5, 3, 3))), ValueError, "x must have 6 channels"),
    ]
    for fn, err, match in cases:
        with pytest.raises(err, match=match):
            fn()


def test_triton_backend_needs_interpreter_or_gpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fusedskip.use_backend("triton"), pytest.raises(RuntimeError, match="cannot run"):
        group_norm_act(torch.randn(1, 2, 2, 2), 1)
    monkeypatch.setattr(gna_ops, "GroupNormActFunction", None)  # auto on CPU: reference, no kernels
    y = group_norm_act(torch.randn(1, 2, 2, 2), 1)
    assert y.shape == (1, 2, 2, 2)
