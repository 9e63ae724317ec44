"""Fused skip → GroupNorm → activation, act(GN(up + a·skip)): Triton kernels vs a float64
reference (forward and every gradient, the gate's included), no materialised sum, SkipNormAct
module (gates, overrides, state_dict, BatchNorm composition), gradcheck, torch.compile, bad input."""
import math

import pytest
import torch
from helpers import make_input
from test_group_norm_act import check_tensor, force_path, make_params, reference64, run_and_check
from torch import nn

import fusedskip
from fusedskip.activations import activation_module
from fusedskip.kernels import group_norm_act as gna_kernels
from fusedskip.kernels import launch
from fusedskip.ops.gated_skip import GatedSkip
from fusedskip.ops.group_norm_act import group_norm_act
from fusedskip.ops.skip_norm_act import SkipNormAct

# Triton's interpreter evaluates sigmoid/tanh in numpy, which warns on exp overflow in the tails.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


def make_gate(kind, channels, device):
    if kind == "float":
        return 0.75
    size = 1 if kind == "scalar" else channels
    return (torch.rand(size, device=device) + 0.5).requires_grad_()


# (shape, groups, dtype, up layout, skip layout, act, gate kind, affine)
CASES = [
    ((2, 6, 5, 7), 3, torch.float32, "nchw", "nchw", "silu", "scalar", True),
    ((2, 12, 3, 5), 4, torch.float32, "channels_last", "channels_last", "gelu", "channel", True),
    ((2, 6, 4, 3), 6, torch.float32, "strided", "channels_last", "relu", "float", False),
    ((1, 8, 5, 3), 1, torch.bfloat16, "channels_last", "nchw", "leaky_relu", "channel", True),
    ((2, 6, 3, 5), 2, torch.float16, "nchw", "strided", "gelu_tanh", "scalar", True),
    ((2, 4, 3, 3), 2, torch.float64, "strided", "strided", "identity", "channel", True),
]


@pytest.mark.parametrize("design", ["single", "split"])
@pytest.mark.parametrize("shape,groups,dtype,up_layout,skip_layout,act,gate_kind,affine", CASES)
def test_matches_fp64_reference(triton_backend, device, monkeypatch, shape, groups, dtype, up_layout, skip_layout,
                                act, gate_kind, affine, design):
    """Both GroupNorm designs (single pass: the gate's gradient from in-kernel sums; split: per-chunk
    partials), forced through the rule's thresholds."""
    force_path(monkeypatch, design)
    up = make_input(shape, dtype, up_layout, mean=3.0, scale=0.1, requires_grad=True)
    skip = make_input(shape, dtype, skip_layout, mean=-1.0, scale=0.5, requires_grad=True)
    w, b = make_params(shape[1], torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype, device, affine)
    gate = make_gate(gate_kind, shape[1], device)
    if isinstance(gate, torch.Tensor) and dtype == torch.float64:
        gate = gate.detach().double().requires_grad_()
    run_and_check(up, groups, w, b, 1e-5, act, None, skip=skip, gate=gate)


def test_split_reduction_with_skip(triton_backend, device, monkeypatch):
    force_path(monkeypatch, "split")
    monkeypatch.setattr(gna_kernels, "REDUCE_TILE", 32)
    monkeypatch.setattr(launch, "target_programs", lambda t: 64)
    up = make_input((2, 4, 5, 7), torch.float64, "nchw", mean=2.0, requires_grad=True)
    skip = make_input((2, 4, 5, 7), torch.float64, "channels_last", mean=-3.0, scale=2.0, requires_grad=True)
    assert gna_kernels.reduce_plan(up).chunks > 1
    w, b = make_params(4, torch.float64, device)
    gate = torch.rand(4, device=device, dtype=torch.float64).add_(0.5).requires_grad_()
    run_and_check(up, 2, w, b, 1e-5, "silu", skip=skip, gate=gate)


def test_gradient_subsets(triton_backend, device):
    up = make_input((2, 6, 3, 4), mean=1.0)
    skip = make_input((2, 6, 3, 4), layout="channels_last", mean=-1.0)
    w, b = make_params(6, torch.float32, device)
    gate = torch.tensor([0.8], device=device, requires_grad=True)
    # Only skip and the gate need gradients (d_up not written) ...
    run_and_check(up, 3, w.detach(), b.detach(), 1e-5, "silu", skip=skip.requires_grad_(), gate=gate)
    # ... only the gate ...
    run_and_check(up, 3, None, None, 1e-5, "relu", skip=skip.detach(), gate=gate)
    # ... only up (no gate partials, no d_skip).
    run_and_check(up.requires_grad_(), 3, None, b.detach(), 1e-5, "gelu", skip=skip.detach(), gate=0.5)


def test_sum_is_never_materialised(triton_backend, device, monkeypatch):
    # The forward allocates one full-size tensor (y); the backward two (d_up, d_skip).
    shape = (2, 6, 3, 4)
    up = make_input(shape, requires_grad=True)
    skip = make_input(shape, requires_grad=True)
    gate = torch.rand(6, device=device).add_(0.5).requires_grad_()
    dy = torch.randn(shape, device=device)
    sizes = []
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def record(fn):
        def wrapped(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.device.type != "meta":  # meta tensors (strides of a plan) allocate nothing
                sizes.append(t.numel())
            return t
        return wrapped

    monkeypatch.setattr(torch, "empty", record(real_empty))
    monkeypatch.setattr(torch, "empty_like", record(real_empty_like))
    y = group_norm_act(up, 3, act="silu", skip=skip, gate=gate)
    assert sizes.count(up.numel()) == 1
    sizes.clear()
    torch.autograd.grad(y, (up, skip, gate), dy)
    assert sizes.count(up.numel()) == 2
    monkeypatch.undo()


def test_gradcheck_with_skip(triton_backend, device):
    up = make_input((2, 4, 3, 3), torch.float64, "nchw", mean=1.0, requires_grad=True)
    skip = make_input((2, 4, 3, 3), torch.float64, "channels_last", mean=-0.5, requires_grad=True)
    w, b = make_params(4, torch.float64, device)
    gate = torch.rand(4, device=device, dtype=torch.float64).add_(0.5).requires_grad_()

    def fn(up, skip, w, b, gate):
        return group_norm_act(up, 2, w, b, 1e-3, "leaky_relu", 0.2, skip=skip, gate=gate)

    assert torch.autograd.gradcheck(fn, (up, skip, w, b, gate), fast_mode=True)


def test_deterministic_with_skip(triton_backend, device):
    up = make_input((2, 6, 5, 7), layout="channels_last", mean=3.0, scale=0.1, requires_grad=True)
    skip = make_input((2, 6, 5, 7), layout="channels_last", requires_grad=True)
    gate = torch.rand(1, device=device).add_(0.5).requires_grad_()
    w, b = make_params(6, torch.float32, device)
    dy = torch.randn(up.shape, device=device)

    def run():
        y = group_norm_act(up, 3, w, b, act="silu", skip=skip, gate=gate)
        return (y, *torch.autograd.grad(y, (up, skip, gate, w, b), dy))

    for a, b_ in zip(run(), run()):
        assert torch.equal(a, b_)


# --------------------------------------------------------------------------------------------
# SkipNormAct module
# --------------------------------------------------------------------------------------------
def unfused_reference(m, up, skip):
    """GatedSkip, then nn.GroupNorm and the activation as separate torch modules (float64)."""
    gn = nn.GroupNorm(m.norm.num_groups, m.channels, m.norm.eps, affine=m.norm.affine).to(up.device).double()
    if m.norm.affine:
        gn.load_state_dict({k: v.double() for k, v in m.norm.state_dict().items()})
    kind = m.skip.kind if m.skip.kind != "fixed" else m.skip.fixed_value
    gs = GatedSkip(m.channels, gate=kind).to(up.device).double()
    gs.load_state_dict({k: v.double() for k, v in m.skip.state_dict().items()})
    act = activation_module(m.norm.act, m.norm.negative_slope)
    with fusedskip.use_backend("reference"):
        return act(gn(gs(up.double(), skip.double()))), gs, gn


@pytest.mark.parametrize("gate", ("softplus", "softplus_channel", "sigmoid_channel", 0.5))
def test_module_matches_unfused_modules(triton_backend, device, gate):
    m = SkipNormAct(6, num_groups=3, act="silu", gate=gate, gate_init=0.7 if gate != 0.5 else None).to(device)
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.5, 0.5)
    up = make_input((2, 6, 3, 5), layout="channels_last", mean=2.0, requires_grad=True)
    skip = make_input((2, 6, 3, 5), mean=-1.0, requires_grad=True)
    y = m(up, skip)
    ref, gs, gn = unfused_reference(m, up, skip)
    check_tensor(y, ref, torch.float32)
    dy = torch.randn(y.shape, device=device)
    y.backward(dy)
    ref.backward(dy.double())
    for p, p_ref in [(m.norm.weight, gn.weight), (m.norm.bias, gn.bias)] + (
            [(m.skip.beta, gs.beta)] if m.skip.beta is not None else []):
        check_tensor(p.grad, p_ref.grad, torch.float32, factor=4.0)
    assert set(m.state_dict()) == {"norm.weight", "norm.bias"} | ({"skip.beta"} if gate != 0.5 else set())


def test_module_gate_override(triton_backend, device):
    m = SkipNormAct(4, num_groups=2, act="relu", gate_init=1.3).to(device)
    up = make_input((1, 4, 3, 3))
    skip = make_input((1, 4, 3, 3), mean=2.0)
    with pytest.raises(RuntimeError, match="call .eval"), m.override_gate(value=0.0):
        m(up, skip)
    m.eval()
    with m.override_gate(value=0.0):
        y0 = m(up, skip)
    check_tensor(y0, reference64(up, 2, m.norm.weight, m.norm.bias, 1e-5, "relu", 0.0), torch.float32)
    with m.override_gate(scale=2.0):
        y2 = m(up, skip)
    check_tensor(y2, reference64(up, 2, m.norm.weight, m.norm.bias, 1e-5, "relu", 0.0, skip, 2.6), torch.float32)
    assert m.gate().item() == pytest.approx(1.3, rel=1e-6)


def test_module_state_dict_with_group_norm(triton_backend, device):
    m = SkipNormAct(8, num_groups=4, act="gelu")
    gn = nn.GroupNorm(4, 8)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
    m.norm.load_state_dict(gn.state_dict())
    sd = m.state_dict()
    m2 = SkipNormAct(8, num_groups=4, act="gelu")
    m2.load_state_dict(sd)
    assert torch.equal(m2.norm.weight, gn.weight) and torch.equal(m2.skip.beta, m.skip.beta)
    assert "norm=group" in repr(m)


def test_compile_fullgraph_matches_eager(triton_backend, device):
    torch._dynamo.reset()
    m = SkipNormAct(6, num_groups=3, act="silu", gate="softplus_channel").to(device)
    up = make_input((2, 6, 3, 4), layout="channels_last", mean=1.0, requires_grad=True)
    skip = make_input((2, 6, 3, 4), layout="channels_last", requires_grad=True)
    params = (up, skip, m.skip.beta, m.norm.weight, m.norm.bias)
    results = []
    # Inductor on the GPU; on the CPU its C++ code generation alone takes longer than this whole
    # file, so aot_eager there (the same Dynamo capture, fake tensors and AOT autograd graphs).
    backend = "inductor" if up.device.type == "cuda" else "aot_eager"
    for fn in (torch.compile(m, fullgraph=True, backend=backend), m):
        y = fn(up, skip)
        results.append((y, *torch.autograd.grad(y.square().sum(), params)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()


def test_batch_norm(device):
    torch.manual_seed(0)
    results = []
    for backend in ("reference", "triton"):
        m = SkipNormAct(4, norm="batch", act="relu", gate="softplus_channel", gate_init=0.5).to(device)
        assert type(m.norm).__name__ == "BatchNormAct2d"
        up = make_input((2, 4, 3, 3), mean=1.0, layout="channels_last", requires_grad=True)
        skip = make_input((2, 4, 3, 3), mean=-1.0, requires_grad=True)
        with fusedskip.use_backend(backend):
            y = m(up, skip)
            grads = torch.autograd.grad(y.square().sum(), (up, skip, m.skip.beta, m.norm.weight))
        results.append((y, *grads, m.norm.running_mean.clone(), m.norm.running_var.clone()))
        torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).to(device)
    with fusedskip.use_backend("reference"):
        expected = torch.relu(bn(up.detach() + 0.5 * skip.detach()))
    torch.testing.assert_close(results[0][0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][-2], bn.running_mean, atol=1e-6, rtol=1e-5)
    for ref, tri in zip(*results):  # the fused BN skip path agrees with the reference path
        torch.testing.assert_close(tri, ref, atol=1e-4, rtol=1e-4)


def test_bad_inputs(triton_backend, device, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("launched a kernel on invalid input")

    monkeypatch.setattr(gna_kernels, "group_norm_act_forward", no_launch)
    m = SkipNormAct(6, num_groups=3)
    up = make_input((2, 6, 3, 3))
    cases = [
        (lambda: m(up, up[:, :, :2]), ValueError, "skip must have the same shape as up"),
        (lambda: m(up, up.double()), TypeError, "skip must have up's dtype"),
        (lambda: m(up, up.to(torch.int32)), TypeError, "skip must be float16"),
        (lambda: m(make_input((2, 4, 3, 3)), make_input((2, 4, 3, 3))), ValueError, "up must have 6 channels"),
        (lambda: m(up[0], up[0]), ValueError, "up must be a 4-D tensor"),
        (lambda: SkipNormAct(6, num_groups=4), ValueError, "num_groups=4 must divide"),
        (lambda: SkipNormAct(6, norm="layer"), ValueError, "norm must be one of"),
        (lambda: SkipNormAct(0), ValueError, "channels must be a positive int"),
        (lambda: SkipNormAct(6, num_groups=3, gate="tanh"), ValueError, "gate must be one of"),
        (lambda: group_norm_act(up, 3, skip=up, gate=torch.ones(2, 3)), ValueError, "gate must have shape"),
        (lambda: group_norm_act(up, 3, skip=up, gate=math.inf), ValueError, "gate must be finite"),
    ]
    for fn, err, match in cases:
        with pytest.raises(err, match=match):
            fn()
