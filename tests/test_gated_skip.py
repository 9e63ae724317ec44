"""Gated additive skip: Triton kernels vs a float64 reference, module, backend switch, bad input."""
import math

import pytest
import torch
from helpers import LAYOUTS, assert_close, make_input, poisoned_empty
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedskip
from fusedskip import GatedSkip, gated_skip_add
from fusedskip.kernels import gated_skip as gated_skip_kernels
from fusedskip.ops import gated_skip as gated_skip_ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((2, 5, 7, 9), (1, 3, 17, 1), (3, 12, 4, 6))


def make_gate(kind, channels, device, dtype=torch.float32):
    if kind == "float":
        return 0.75
    size = 1 if kind == "scalar" else channels
    return (torch.rand(size, device=device, dtype=dtype) + 0.5).requires_grad_()


def reference_fp64(up, skip, gate):
    """up + a·skip and its gradients in float64, from detached copies."""
    up64 = up.detach().double().requires_grad_()
    skip64 = skip.detach().double().requires_grad_()
    gate64 = gate.detach().double().requires_grad_() if isinstance(gate, torch.Tensor) else gate
    a = gate64.reshape(1, -1, 1, 1) if isinstance(gate64, torch.Tensor) else gate64
    return up64, skip64, gate64, up64 + a * skip64


def check_against_reference(up, skip, gate, dtype, grad_scale=1.0):
    up.requires_grad_()
    skip.requires_grad_()
    with poisoned_empty():
        out = gated_skip_add(up, skip, gate)
    up64, skip64, gate64, ref = reference_fp64(up, skip, gate)
    assert out.dtype == dtype and out.shape == up.shape
    assert_close(out, ref, dtype)
    grad = make_input(tuple(out.shape), torch.float64, mean=0.3, device=out.device)
    with poisoned_empty():
        out.backward(grad.to(dtype))
    ref.backward(grad.to(dtype).double())
    assert_close(up.grad, up64.grad, dtype)
    assert_close(skip.grad, skip64.grad, dtype)
    if isinstance(gate, torch.Tensor):
        # Σ over N·H·W (·C) elements: tolerance grows with the reduction length.
        n_terms = up.numel() / gate.numel()
        assert_close(gate.grad, gate64.grad, torch.float32, scale=max(1.0, math.sqrt(n_terms)) * grad_scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate_kind", ("scalar", "channel", "float"))
def test_matches_fp64_reference(triton_backend, device, dtype, layout, gate_kind):
    # Spread the shapes over the grid deterministically (str hashes vary between runs).
    shape = SHAPES[(LAYOUTS.index(layout) + ("scalar", "channel", "float").index(gate_kind)) % len(SHAPES)]
    up = make_input(shape, dtype, layout, mean=0.5)
    skip = make_input(shape, dtype, layout, mean=-1.5, scale=2.0)
    check_against_reference(up, skip, make_gate(gate_kind, shape[1], device), dtype)


def test_output_keeps_layout(triton_backend):
    up = make_input((2, 6, 5, 3), layout="channels_last")
    out = gated_skip_add(up, make_input((2, 6, 5, 3), layout="channels_last"), 0.5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = gated_skip_add(make_input((2, 6, 5, 3)), make_input((2, 6, 5, 3)), 0.5)
    assert out.is_contiguous()


def test_mixed_layouts_and_expanded_grad(triton_backend):
    up = make_input((2, 4, 5, 6), layout="channels_last", requires_grad=True)
    skip = make_input((2, 4, 5, 6), layout="strided", requires_grad=True)
    gate = torch.tensor([1.3], requires_grad=True)
    gated_skip_add(up, skip, gate).sum().backward()  # grad_output is expanded (all strides 0)
    assert torch.equal(up.grad, torch.ones_like(up))
    torch.testing.assert_close(skip.grad, torch.full_like(skip, 1.3))
    torch.testing.assert_close(gate.grad, skip.detach().sum().reshape(1), rtol=1e-5, atol=1e-4)


def test_int64_indexing_path(triton_backend, monkeypatch):
    """The int64-offset kernels (taken for tensors beyond 2^31 elements) on a small tensor."""
    monkeypatch.setattr(gated_skip_kernels, "needs_int64", lambda *tensors: True)
    up = make_input((2, 3, 5, 7), layout="channels_last")
    check_against_reference(up, make_input((2, 3, 5, 7), mean=2.0), make_gate("channel", 3, up.device), torch.float32)


def test_split_reduction_rows(triton_backend, monkeypatch):
    """Many programs per (n, channel block) each writing a partial row: still exact and ordered."""
    monkeypatch.setattr(gated_skip_kernels, "target_programs", lambda t: 64)
    up = make_input((2, 3, 40, 40))
    check_against_reference(up, make_input((2, 3, 40, 40), mean=1.0), make_gate("scalar", 3, up.device), torch.float32)


def test_deterministic(triton_backend):
    up = make_input((2, 8, 9, 11), requires_grad=True)
    skip = make_input((2, 8, 9, 11), requires_grad=True)
    gate = torch.rand(8, requires_grad=True)
    grad = torch.randn(2, 8, 9, 11)
    results = []
    for _ in range(2):
        for t in (up, skip, gate):
            t.grad = None
        out = gated_skip_add(up, skip, gate)
        out.backward(grad)
        results.append([out.detach().clone(), up.grad.clone(), skip.grad.clone(), gate.grad.clone()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_tensors(triton_backend):
    up = torch.empty(0, 4, 3, 3, requires_grad=True)
    skip = torch.empty(0, 4, 3, 3, requires_grad=True)
    gate = torch.ones(4, requires_grad=True)
    out = gated_skip_add(up, skip, gate)
    out.sum().backward()
    assert out.shape == (0, 4, 3, 3) and skip.grad.shape == skip.shape
    assert torch.equal(gate.grad, torch.zeros(4))


def test_gradcheck_fp64(triton_backend):
    for gate_shape in ((1,), (3,)):
        up = make_input((2, 3, 4, 5), torch.float64, requires_grad=True)
        skip = make_input((2, 3, 4, 5), torch.float64, layout="channels_last", requires_grad=True)
        gate = (torch.rand(gate_shape, dtype=torch.float64) + 0.5).requires_grad_()
        assert torch.autograd.gradcheck(gated_skip_add, (up, skip, gate))


def test_double_backward_matches_torch(triton_backend):
    """Issue 15 item 1: under create_graph=True the gradients are differentiable again (was: a
    loud error from the kernel op); a gradient penalty and gradgradcheck agree with torch."""
    f64 = torch.float64
    up = make_input((2, 3, 3, 4), f64, requires_grad=True)
    skip = make_input((2, 3, 3, 4), f64, mean=-0.4, requires_grad=True)
    beta = torch.randn(3, dtype=f64, requires_grad=True)

    def penalty(fn):
        y = fn(up, skip, torch.nn.functional.softplus(beta))
        gs, = torch.autograd.grad((y * y).sum(), skip, create_graph=True)  # non-constant incoming grad
        assert gs.requires_grad
        return torch.autograd.grad((gs ** 2).sum(), [up, skip, beta])

    ours = penalty(gated_skip_add)
    ref = penalty(lambda u, s, a: u + a.reshape(1, -1, 1, 1) * s)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)
    gate = torch.tensor([0.7], dtype=f64, requires_grad=True)
    assert torch.autograd.gradgradcheck(gated_skip_add, (up[:1, :2, :2, :2].detach().requires_grad_(),
                                                         skip[:1, :2, :2, :2].detach().requires_grad_(), gate))


def test_sparse_input_rejected_clearly():
    """Issue 15 item 10: sparse input names the problem and the fix."""
    up = make_input((1, 2, 3, 3))
    with pytest.raises(TypeError, match="up must be a dense.*to_dense"):
        gated_skip_add(up.to_sparse(), up, 1.0)


def test_opcheck(triton_backend):
    up = make_input((2, 3, 4, 5))
    skip = make_input((2, 3, 4, 5), layout="channels_last")
    gate = torch.rand(3) + 0.5
    torch.library.opcheck(torch.ops.fusedskip.gated_skip_add_forward.default, (up, skip, gate))
    grad = make_input((2, 3, 4, 5))
    for need_dskip, need_dgate in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(torch.ops.fusedskip.gated_skip_add_backward.default,
                              (grad, skip, gate, need_dskip, need_dgate))


@pytest.mark.parametrize("backend_name", ("triton", "reference"))
def test_torch_compile_fullgraph(backend_name):
    torch._dynamo.reset()
    module = GatedSkip(channels=4, gate="softplus_channel")

    def step(m, up, skip):
        return (m(up, skip) * 2).square().mean()

    up = make_input((2, 4, 5, 5), requires_grad=True)
    skip = make_input((2, 4, 5, 5), layout="channels_last", requires_grad=True)
    with fusedskip.use_backend(backend_name):
        eager = step(module, up, skip)
        eager_grads = torch.autograd.grad(eager, (up, skip, module.beta))
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(module, up, skip)
        compiled_grads = torch.autograd.grad(compiled, (up, skip, module.beta))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 8), w=st.integers(1, 8),
    dtype=st.sampled_from(DTYPES), up_layout=st.sampled_from(LAYOUTS), skip_layout=st.sampled_from(LAYOUTS),
    gate_kind=st.sampled_from(("scalar", "channel", "float")), mean=st.floats(-4, 4).filter(lambda m: abs(m) > 0.1),
)
def test_hypothesis_shapes_layouts_gates(n, c, h, w, dtype, up_layout, skip_layout, gate_kind, mean):
    with fusedskip.use_backend("triton"):
        up = make_input((n, c, h, w), dtype, up_layout, mean=mean)
        skip = make_input((n, c, h, w), dtype, skip_layout, mean=-mean, scale=0.5)
        check_against_reference(up, skip, make_gate(gate_kind, c, up.device), dtype)


# ------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, before any launch.
# ------------------------------------------------------------------------------------------
@pytest.fixture
def no_launch(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a kernel was launched for bad input")
    monkeypatch.setattr(gated_skip_ops.GatedSkipAddFunction, "apply", fail)
    monkeypatch.setattr(gated_skip_ops, "gated_skip_add_reference", fail)


@pytest.mark.parametrize("backend_name", ("triton", "reference"))
@pytest.mark.parametrize("args, error, match", [
    ((torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 5), 1.0), ValueError, r"skip must have the same shape as up"),
    ((torch.randn(2, 3, 4, 4), torch.randn(1, 3, 4, 4), 1.0), ValueError, r"no broadcasting"),
    ((torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4).half(), 1.0), TypeError, r"skip must have up's dtype"),
    ((torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4, device="meta"), 1.0), ValueError,
     r"skip must be on up's device"),
    ((torch.ones(2, 3, 4, 4, dtype=torch.int32), torch.ones(2, 3, 4, 4, dtype=torch.int32), 1.0), TypeError,
     r"up must be float16"),
    ((torch.randn(3, 4, 4), torch.randn(3, 4, 4), 1.0), ValueError, r"up must be a 4-D tensor"),
    ((torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.ones(2)), ValueError,
     r"gate must have shape \(3,\), \(\) or \(1,\)"),
    ((torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.ones(1, 3)), ValueError, r"gate must have shape"),
    ((torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.ones(3, dtype=torch.int64)), TypeError,
     r"gate must be a floating-point"),
    ((torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), "1"), TypeError, r"gate must be a float or a tensor"),
    ((torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), float("nan")), ValueError, r"gate must be finite"),
    (("up", torch.randn(2, 3, 4, 4), 1.0), TypeError, r"up must be a torch.Tensor"),
])
def test_bad_input(no_launch, backend_name, args, error, match):
    with fusedskip.use_backend(backend_name), pytest.raises(error, match=match):
        gated_skip_add(*args)


# ------------------------------------------------------------------------------------------
# Module
# ------------------------------------------------------------------------------------------
def test_module_default_is_softplus_scalar_at_one():
    module = GatedSkip()
    assert module.beta.shape == (1,)
    torch.testing.assert_close(module.learned_gate(), torch.ones(1))
    assert [name for name, _ in module.named_parameters()] == ["beta"]


@pytest.mark.parametrize("gate, init", [("softplus", 2.5), ("softplus_channel", 0.3), ("sigmoid_channel", 0.2),
                                        ("softplus", 40.0)])
def test_module_init_and_gradients(triton_backend, gate, init):
    module = GatedSkip(channels=3, gate=gate, init=init)
    torch.testing.assert_close(module.learned_gate(), torch.full_like(module.beta, init))
    up = make_input((2, 3, 4, 5), requires_grad=True)
    skip = make_input((2, 3, 4, 5), mean=1.0, requires_grad=True)
    grad = torch.randn(2, 3, 4, 5)
    module(up, skip).backward(grad)
    beta = module.beta.detach().double().requires_grad_()
    a = torch.sigmoid(beta) if gate == "sigmoid_channel" else torch.nn.functional.softplus(beta)
    (up.double() + a.reshape(1, -1, 1, 1) * skip.double()).backward(grad.double())
    torch.testing.assert_close(module.beta.grad.double(), beta.grad, rtol=1e-5, atol=1e-4)


def test_module_fixed_gate():
    module = GatedSkip(gate=0.25)
    assert list(module.parameters()) == []
    up, skip = make_input((1, 2, 3, 3)), make_input((1, 2, 3, 3))
    torch.testing.assert_close(module(up, skip), up + 0.25 * skip)


def test_module_inference_override():
    module = GatedSkip(channels=2, gate="softplus_channel", init=2.0)
    up, skip = make_input((1, 2, 3, 3)), make_input((1, 2, 3, 3))
    with module.override_gate(scale=0.5), pytest.raises(RuntimeError, match="override is for inference"):
        module(up, skip)
    module.eval()
    with module.override_gate(scale=0.5):
        torch.testing.assert_close(module(up, skip), up + 1.0 * skip)
    with module.override_gate(value=0.0):
        torch.testing.assert_close(module(up, skip), up)
    torch.testing.assert_close(module(up, skip), up + 2.0 * skip)
    with pytest.raises(ValueError, match="exactly one of"):
        with module.override_gate():
            pass


@pytest.mark.parametrize("kwargs, match", [
    (dict(gate="tanh"), "gate must be one of"),
    (dict(gate="softplus_channel"), "pass channels"),
    (dict(channels=3, gate="sigmoid_channel", init=1.0), r"init must lie in \(0, 1\)"),
    (dict(gate="softplus", init=0.0), "init must be > 0"),
    (dict(channels=0), "channels must be a positive int"),
])
def test_module_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedSkip(**kwargs)


def test_module_channel_mismatch():
    with pytest.raises(ValueError, match="up must have 4 channels"):
        GatedSkip(channels=4)(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2))


# ------------------------------------------------------------------------------------------
# Backend switch
# ------------------------------------------------------------------------------------------
def test_backend_switch(monkeypatch):
    assert fusedskip.get_backend() == "auto"
    monkeypatch.setenv("FUSEDSKIP_BACKEND", "reference")
    assert fusedskip.get_backend() == "reference"
    fusedskip.set_backend("triton")
    assert fusedskip.get_backend() == "triton"  # the function wins over the variable
    with fusedskip.use_backend("auto"):
        assert fusedskip.get_backend() == "auto"
    assert fusedskip.get_backend() == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedskip.set_backend("cuda")
    fusedskip.set_backend(None)
    monkeypatch.setenv("FUSEDSKIP_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSEDSKIP_BACKEND: backend must be one of"):
        fusedskip.get_backend()


def test_auto_uses_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(gated_skip_ops.GatedSkipAddFunction, "apply",
                        lambda *a: (_ for _ in ()).throw(AssertionError("kernel path taken")))
    up = make_input((1, 2, 3, 3))
    if up.device.type == "cpu":
        torch.testing.assert_close(gated_skip_add(up, up, 1.0), 2 * up)


def test_triton_backend_without_interpreter_refuses_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fusedskip.use_backend("triton"), pytest.raises(RuntimeError, match="cannot run on a cpu tensor"):
        gated_skip_add(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), 1.0)
