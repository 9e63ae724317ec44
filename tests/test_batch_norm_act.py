"""BatchNormAct2d / batch_norm_act: Triton kernels (interpreted on the CPU) vs a float64 reference.

Kept small: every Triton program is a Python loop under the interpreter.
"""

import pytest
import torch
from helpers import make_input, poisoned_empty, tolerance
from torch import nn
from torch.nn import functional as F

import fusedskip
from fusedskip.activations import apply_activation_reference
from fusedskip.kernels import batch_norm_act as bn_kernels
from fusedskip.ops.batch_norm_act import BatchNormAct2d, batch_norm_act, batch_norm_act_reference

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def close(actual, expected, dtype, factor=1.0, msg=""):
    """Compare with a float64 reference at ``dtype``'s tolerance relative to the largest value
    (gradients of a std-0.1 input are ~10× the incoming gradient)."""
    atol, rtol = tolerance(dtype)
    scale = factor * max(1.0, float(expected.detach().abs().max())) if expected.numel() else factor
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=atol * scale,
                               rtol=rtol * factor, msg=msg or None)


def _params(c, dtype=F32, affine=True):
    if not affine:
        return None, None
    w = (torch.rand(c, dtype=F64) + 0.5).to(dtype).requires_grad_()
    b = (torch.randn(c, dtype=F64) * 0.5).to(dtype).requires_grad_()
    return w, b


def _fp64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def _compare(shape, dtype, layout, act, affine, training, param_dtype=F32, skip_layout=None, gate=None,
             mean=3.0, scale=0.1, slope=None, grad_expanded=False):
    """Run the fused op (poisoned allocations) and the fp64 reference; compare outputs, every
    gradient and the running statistics."""
    n, c, h, w_ = shape
    x = make_input(shape, dtype, layout, mean=mean, scale=scale, requires_grad=True)
    skip = None
    if skip_layout is not None:
        skip = make_input(shape, dtype, skip_layout, mean=-1.0, scale=0.5, requires_grad=True)
    weight, bias = _params(c, param_dtype, affine)
    rm = torch.randn(c, dtype=F64).to(param_dtype)
    rv = (torch.rand(c, dtype=F64) + 0.5).to(param_dtype)
    rm_ref, rv_ref = rm.double(), rv.double()
    with poisoned_empty():
        y = batch_norm_act(x, rm, rv, weight, bias, training, 0.1, 1e-5, act, slope, skip, gate)
        g = torch.randn(y.shape, dtype=F64).to(dtype)
        if grad_expanded:
            (y.float() * 1.0).sum().backward()  # autograd hands the kernel a stride-0 gradient
            g = torch.ones_like(g)
        else:
            y.backward(g)
    assert y.dtype == dtype and y.shape == x.shape
    if layout in ("nchw", "channels_last"):
        assert y.stride() == x.stride()
    xr, skr, wr, br = _fp64(x), _fp64(skip), _fp64(weight), _fp64(bias)
    gate_r = _fp64(gate) if isinstance(gate, torch.Tensor) else gate
    yr = batch_norm_act_reference(xr, rm_ref, rv_ref, wr, br, training, 0.1, 1e-5, act, slope, skr, gate_r)
    yr.backward(g.double())
    close(y, yr, dtype, msg="output")
    close(x.grad, xr.grad, dtype, msg="d_x")
    if skip is not None:
        close(skip.grad, skr.grad, dtype, msg="d_skip")
    if isinstance(gate, torch.Tensor) and gate.requires_grad:
        close(gate.grad, gate_r.grad, F32, factor=4.0, msg="d_gate")
    if affine:
        close(weight.grad, wr.grad, param_dtype, factor=2.0, msg="d_weight")
        close(bias.grad, br.grad, param_dtype, factor=2.0, msg="d_bias")
        assert weight.grad.dtype == param_dtype
    close(rm, rm_ref, param_dtype, msg="running_mean")
    close(rv, rv_ref, param_dtype, msg="running_var")


CASES = [
    # shape, dtype, layout, act, affine, training, param dtype
    ((2, 3, 5, 7), F32, "nchw", "relu", True, True, F32),
    ((3, 5, 5, 7), F32, "channels_last", "silu", True, True, F32),
    ((2, 12, 5, 7), F32, "strided", "leaky_relu", False, True, F32),
    ((2, 5, 3, 3), F16, "nchw", "gelu", True, True, F16),
    ((2, 3, 5, 7), BF16, "channels_last", "gelu_tanh", True, True, F32),
    ((2, 5, 5, 7), F32, "nchw", "identity", True, False, F32),
    ((2, 3, 5, 7), F32, "channels_last", "leaky_relu", True, False, F32),
]


@pytest.mark.parametrize("shape,dtype,layout,act,affine,training,param_dtype", CASES)
def test_matches_fp64_reference(triton_backend, shape, dtype, layout, act, affine, training, param_dtype):
    _compare(shape, dtype, layout, act, affine, training, param_dtype, slope=0.2 if act == "leaky_relu" else None)


def test_expanded_grad_output(triton_backend):
    _compare((2, 3, 5, 7), F32, "nchw", "silu", True, True, grad_expanded=True)


@pytest.mark.parametrize("gate_kind,training", [("channel", True), ("scalar", True), ("float", False)])
def test_fused_skip(triton_backend, gate_kind, training):
    c = 5
    if gate_kind == "channel":
        gate = (torch.rand(c) + 0.5).requires_grad_()
    elif gate_kind == "scalar":
        gate = torch.tensor([0.7], requires_grad=True)
    else:
        gate = 0.7
    _compare((2, c, 5, 7), F32, "nchw", "silu", True, training, skip_layout="channels_last", gate=gate)


@pytest.mark.parametrize("split", ["off", "on"])
def test_split_reduction(triton_backend, split):
    """The statistics / backward-sum reduction as one program per channel block, or split over
    many programs with small tiles (several tiles per program, ragged last tiles)."""
    config = dict(rows=1) if split == "off" else dict(rows=3, block_s=8, block_c=2)
    with bn_kernels.reduction_config(**config):
        _compare((3, 3, 5, 7), F32, "nchw", "relu", True, True)
        # Large mean, tiny spread: Welford/Chan stays accurate where E[x²] − E[x]² would not.
        x = make_input((2, 3, 5, 7), F32, "channels_last", mean=1000.0, scale=0.01)
        mean, rstd, m2 = bn_kernels.batch_norm_stats(x, None, None, None, None, None, 0.1, 0.0)
    # fp32 data at 1000 ± 0.01 is itself quantised to 0.6% of the spread; E[x²] − E[x]² in fp32
    # would be off by orders of magnitude (x² has an ulp of 0.06, the variance is 1e-4).
    var = x.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(m2.double() / 70, var, rtol=1e-2, atol=0)
    torch.testing.assert_close(mean.double(), x.double().mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)


def test_deterministic(triton_backend):
    x = make_input((3, 5, 5, 7), F32, "channels_last", mean=3, scale=0.1)
    w, b = _params(5)
    g = torch.randn(x.shape)

    def run():
        xx = x.clone().requires_grad_()
        ww, bb = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        rm, rv = torch.zeros(5), torch.ones(5)
        y = batch_norm_act(xx, rm, rv, ww, bb, True, act="gelu")
        y.backward(g)
        return y, xx.grad, ww.grad, bb.grad, rm, rv

    with bn_kernels.reduction_config(rows=3, block_s=16, block_c=8):
        first, second = run(), run()
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


def test_int64_offsets_path(triton_backend, monkeypatch):
    """The int64 indexing variant (chosen beyond 2³¹ elements) computes the same thing."""
    monkeypatch.setattr(bn_kernels, "needs_int64", lambda *tensors: True)
    _compare((2, 3, 5, 7), F32, "channels_last", "relu", True, True)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("config", [dict(momentum=0.1), dict(momentum=None), dict(track_running_stats=False),
                                    dict(momentum=0.9, eps=1e-4, affine=False)])
def test_running_stats_match_nn_batchnorm(backend_name, config):
    """Several training steps then eval, against nn.BatchNorm2d + the activation."""
    fusedskip.set_backend(backend_name)
    c = 3
    ours = BatchNormAct2d(c, act="relu", **config)
    ref = nn.BatchNorm2d(c, **config).double()
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    for step in range(2):
        x = make_input((2, c, 4, 5), F32, "nchw", mean=3.0 + step, scale=0.1 * (step + 1))
        close(ours(x), F.relu(ref(x.double())), F32, msg=f"train step {step}")
    ours.eval()
    ref.eval()
    x = make_input((2, c, 4, 5), F32, "channels_last", mean=3.5, scale=0.2)
    close(ours(x), F.relu(ref(x.double())), F32, msg="eval")
    if ours.track_running_stats:
        close(ours.running_mean, ref.running_mean, F32)
        close(ours.running_var, ref.running_var, F32)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 2
    else:
        assert ours.running_mean is None and ours.num_batches_tracked is None


def test_autocast_fp32_params_bf16_input(triton_backend):
    m = BatchNormAct2d(5, act="silu")
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
    ref = BatchNormAct2d(5, act="silu").double()
    ref.load_state_dict(m.state_dict())
    x = make_input((2, 5, 4, 5), BF16, "channels_last", mean=3, scale=0.1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == BF16
    g = torch.randn(y.shape).to(BF16)
    y.backward(g)
    assert m.weight.grad.dtype == F32
    with fusedskip.use_backend("reference"):
        xr = x.detach().double().requires_grad_()
        yr = ref(xr)
        yr.backward(g.double())
    close(y, yr, BF16)
    close(x.grad, xr.grad, BF16)
    close(m.weight.grad, ref.weight.grad, F32, factor=50)  # sums of bf16-rounded gradients
    close(m.running_var, ref.running_var, F32)


def test_gradcheck_fp64(triton_backend):
    x = make_input((2, 3, 2, 3), F64, "channels_last", mean=3, scale=0.5, requires_grad=True)
    skip = make_input((2, 3, 2, 3), F64, "nchw", requires_grad=True)
    w, b = _params(3, F64)
    gate = torch.rand(3, dtype=F64, requires_grad=True)

    def train(x, w, b, skip, gate):
        return batch_norm_act(x, None, None, w, b, True, act="silu", skip=skip, gate=gate)

    def evaluate(x, w, b):
        return batch_norm_act(x, torch.full((3,), 2.9, dtype=F64), torch.full((3,), 0.3, dtype=F64), w, b, False,
                              act="leaky_relu", negative_slope=0.1)

    assert torch.autograd.gradcheck(train, (x, w, b, skip, gate), fast_mode=True)
    assert torch.autograd.gradcheck(evaluate, (x, w, b), fast_mode=True)


def test_opcheck():
    x = make_input((2, 3, 4, 5), F32, "channels_last", mean=3, scale=0.1)
    skip = make_input((2, 3, 4, 5), F32, "nchw")
    gate = torch.rand(3)
    w, b = (t.detach() for t in _params(3))
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(2)
    ops = torch.ops.fusedskip
    mean, rstd, m2 = ops.batch_norm_act_stats(x, skip, gate, None, None, None, 0.1, 1e-5)
    grad = torch.randn(x.shape)
    sums, _, _ = ops.batch_norm_act_backward_reduce(grad, x, skip, gate, mean, rstd, w, b, 3, 0.0, True, True,
                                                    1 / 40, True)
    samples = [
        (ops.batch_norm_act_stats.default, (x, skip, gate, rm, rv, nbt, 0.1, 1e-5)),
        (ops.batch_norm_act_merge_stats.default, (torch.tensor([40.0, 12.0]), torch.stack([mean, mean + 1]),
                                                  torch.stack([m2, m2]), rm, rv, None, 0.1, 1e-5)),
        (ops.batch_norm_act_apply.default, (x, None, None, mean, rstd, w, b, False, 1e-5, 3, 0.0)),
        (ops.batch_norm_act_backward_reduce.default, (grad, x, skip, gate, mean, rstd, w, b, 3, 0.0, True, True,
                                                      1 / 40, True)),
        (ops.batch_norm_act_backward_reduce.default, (grad, x, None, None, mean, rstd, w, b, 3, 0.0, False, False,
                                                      1 / 40, False)),
        (ops.batch_norm_act_backward_dx.default, (grad, x, skip, gate, mean, rstd, w, b, sums, 1 / 40, True,
                                                  3, 0.0, True, True)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_matches_eager(triton_backend):
    """fwd + bwd compiled with fullgraph=True equal eager, running statistics included (momentum=None:
    the kernel reads num_batches_tracked, incremented in the graph)."""
    torch._dynamo.reset()
    eager = BatchNormAct2d(3, act="silu", momentum=None)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.normal_()
    compiled_module = BatchNormAct2d(3, act="silu", momentum=None)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = make_input((2, 3, 4, 5), F32, "nchw", mean=3, scale=0.1)
    g = torch.randn(x.shape)
    x_grads = []
    for module in (eager, compiled):
        xx = x.clone().requires_grad_()
        module(xx).backward(g)
        x_grads.append(xx.grad)
    assert torch.equal(x_grads[0], x_grads[1])
    assert torch.equal(eager.weight.grad, compiled_module.weight.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(eager, name), getattr(compiled_module, name)), name
    eager.eval()
    compiled.eval()
    assert torch.equal(eager(x), compiled(x))


# --------------------------------------------------------------------------------------------
# Issue 15: defects found by an independent fuzz (each test fails on the code before the fix)
# --------------------------------------------------------------------------------------------
def _penalty_grads(fn, x, params, create_graph_inputs=None):
    """A WGAN-GP style penalty ‖∂y/∂x‖² with a *constant* grad_outputs: its gradients w.r.t. x
    and ``params`` (they are silently zero/absent when the first gradient is detached)."""
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
    assert gx.requires_grad, "the first gradient is detached: the penalty would contribute nothing"
    return torch.autograd.grad((gx ** 2).sum(), [x] + list(params))


@pytest.mark.parametrize("training", (True, False))
def test_double_backward_gradient_penalty_matches_torch(triton_backend, training):
    """Item 1: batch_norm_act under create_graph=True with a constant grad_outputs (the fp64
    2×4×3×3 SiLU reproduction): the penalty's gradients match torch's."""
    x = make_input((2, 4, 3, 3), F64, mean=0.3, requires_grad=True)
    w = (torch.rand(4, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=F64).requires_grad_()
    rm, rv = torch.randn(4, dtype=F64), torch.rand(4, dtype=F64) + 0.5
    ours = _penalty_grads(lambda t: batch_norm_act(t, rm.clone(), rv.clone(), w, b, training=training, act="silu"),
                          x, [w, b])
    ref = _penalty_grads(lambda t: F.silu(F.batch_norm(t, rm.clone(), rv.clone(), w, b, training=training)),
                         x, [w, b])
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-9)


def _module_penalty(module, x, *extra):
    params = [p for p in module.parameters() if p.requires_grad]
    return _penalty_grads(lambda t: module(t, *extra), x, params)


@pytest.mark.parametrize("kind", ("module", "skip_norm_act", "conv_norm_act"))
def test_double_backward_modules_match_torch(triton_backend, kind):
    """Item 1 for BatchNormAct2d, SkipNormAct(norm="batch") and ConvNormAct(norm="batch"),
    training mode, against the same computation built from torch modules."""
    torch.manual_seed(1)
    x = make_input((2, 3, 3, 3), F64, mean=0.2, requires_grad=True)
    if kind == "module":
        ours = BatchNormAct2d(3, act="silu").double()
        nn.init.uniform_(ours.weight, 0.5, 1.5)
        ref = nn.Sequential(nn.BatchNorm2d(3), nn.SiLU()).double()
        ref[0].load_state_dict(ours.state_dict())
        got, want = _module_penalty(ours, x), _module_penalty(ref, x)
    elif kind == "skip_norm_act":
        skip = make_input((2, 3, 3, 3), F64, mean=-0.1)
        ours = fusedskip.SkipNormAct(3, norm="batch", act="gelu").double()
        bn = nn.BatchNorm2d(3).double()
        gate = ours.skip

        class Ref(nn.Module):
            def forward(self, t, s):
                return F.gelu(bn(t + F.softplus(gate.beta) * s))

        got = _module_penalty(ours, x, skip)
        want = _penalty_grads(lambda t: Ref()(t, skip), x, [gate.beta, bn.weight, bn.bias])
    else:
        ours = fusedskip.ConvNormAct(3, 4, 3, norm="batch", act="silu").double()
        ref = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.SiLU()).double()
        ref[0].weight.data.copy_(ours.conv.weight)
        got, want = _module_penalty(ours, x), _module_penalty(ref, x)
    assert len(got) == len(want)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("training", (True, False))
def test_gradgradcheck_fp64(triton_backend, training):
    """Item 1: second derivatives (w.r.t. x, skip, gate, γ, β and the incoming gradient)."""
    x = make_input((2, 2, 2, 2), F64, mean=0.5, requires_grad=True)
    skip = make_input((2, 2, 2, 2), F64, mean=-0.3, requires_grad=True)
    gate = (torch.rand(2, dtype=F64) + 0.5).requires_grad_()
    w = (torch.rand(2, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=F64).requires_grad_()
    rm, rv = torch.randn(2, dtype=F64), torch.rand(2, dtype=F64) + 0.5

    def fn(x, skip, gate, w, b):
        return batch_norm_act(x, rm.clone(), rv.clone(), w, b, training=training, act="silu", skip=skip, gate=gate)

    assert torch.autograd.gradgradcheck(fn, (x, skip, gate, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("value", [10000.7, 3.3, -0.25])
def test_constant_channels_normalise_to_beta(backend_name, skip, value):
    """Item 3: a zero-variance channel normalises to exactly β (the kernels merge partial
    statistics in the delta form, exact for equal means), with the reduction split into many
    partials; the reference path stays within torch's own error."""
    fusedskip.set_backend(backend_name)
    c = 3
    x = torch.full((3, c, 5, 7), value)
    skip_t = torch.full((3, c, 5, 7), 0.5) if skip else None
    bias = torch.tensor([0.25, -1.5, 2.0])
    weight = torch.tensor([1.5, 0.5, 2.0])
    with bn_kernels.reduction_config(rows=5, block_s=8, block_c=2):
        y = batch_norm_act(x, None, None, weight, bias, training=True, act="identity", skip=skip_t)
    expected = bias.reshape(1, c, 1, 1).expand_as(y)
    if backend_name == "triton":
        assert torch.equal(y, expected), (y - expected).abs().max()
    else:
        torch_err = F.batch_norm(x + (0.5 if skip else 0.0), None, None, weight, bias, True).sub(expected).abs().max()
        assert (y - expected).abs().max() <= torch_err + 1e-6


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_large_magnitude_with_skip_half(triton_backend, dtype):
    """Item 3: BN + skip at magnitude 1e4 in fp16/bf16 (was off by 0.2–0.3)."""
    torch.manual_seed(3)
    x = (1e4 + torch.randn(2, 3, 4, 5, dtype=F64) * 20).to(dtype)
    skip = (torch.randn(2, 3, 4, 5, dtype=F64) * 4).to(dtype)
    y = batch_norm_act(x, None, None, training=True, act="relu", skip=skip, gate=0.5)
    ref = batch_norm_act_reference(x.double(), None, None, training=True, act="relu", skip=skip.double(), gate=0.5)
    close(y, ref, dtype, factor=2.0)


def test_nonfinite_input_propagates_nan_per_channel(triton_backend):
    """Item 2's check for BatchNorm: ±Inf in a channel gives NaN for that channel only, as torch;
    item 4: with the identity activation dβ = Σ dy stays finite (act' = 1 also at non-finite z)."""
    x = make_input((2, 3, 3, 3), F32).requires_grad_(False)
    x[1, 0, 2, 1] = float("inf")
    x[0, 2, 0, 0] = float("-inf")
    x.requires_grad_()
    w = torch.ones(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    y = batch_norm_act(x, None, None, w, b, training=True, act="identity")
    x_ref = x.detach().clone().requires_grad_()
    w_ref, b_ref = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y_ref = F.batch_norm(x_ref, None, None, w_ref, b_ref, True)
    torch.testing.assert_close(y, y_ref, equal_nan=True, atol=1e-5, rtol=1e-5)
    assert y[:, 0].isnan().all() and y[:, 2].isnan().all() and y[:, 1].isfinite().all()
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(b.grad, b_ref.grad)
    assert b.grad.isfinite().all()


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_momentum_none_needs_a_counted_batch(backend_name):
    """Item 5: momentum=None with num_batches_tracked = 0 raises (was: NaN running statistics on
    the kernels, ZeroDivisionError on the reference), also in eval where the factor is unused."""
    fusedskip.set_backend(backend_name)
    x = make_input((2, 3, 2, 2))
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="num_batches_tracked must be >= 1"):
        batch_norm_act(x, rm, rv, training=True, momentum=None, num_batches_tracked=torch.tensor(0))
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    y = batch_norm_act(x, rm, rv, training=False, momentum=None, num_batches_tracked=torch.tensor(0))
    assert y.isfinite().all()
    batch_norm_act(x, rm, rv, training=True, momentum=None, num_batches_tracked=torch.tensor(1))
    torch.testing.assert_close(rm, x.mean((0, 2, 3)))  # factor 1: the batch statistics


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(training="no"), TypeError, "training must be a bool"),
    (dict(training=1), TypeError, "training must be a bool"),
    (dict(act="leaky_relu", negative_slope="0.1"), TypeError, "negative_slope must be a float"),
    (dict(act="leaky_relu", negative_slope=float("nan")), ValueError, "negative_slope must be finite"),
    (dict(act=nn.LeakyReLU(float("inf"))), ValueError, "negative_slope must be finite"),
    (dict(training=True, eps=0.0), ValueError, "eps must be positive during training"),
])
def test_loose_arguments_rejected(backend_name, kwargs, error, match):
    """Items 6 and 8: non-bool training, string/NaN slopes and (as torch) eps = 0 in training."""
    fusedskip.set_backend(backend_name)
    args = dict(x=make_input((2, 3, 2, 2)), running_mean=torch.zeros(3), running_var=torch.ones(3))
    with pytest.raises(error, match=match):
        batch_norm_act(**{**args, **kwargs})
    if "eps" in kwargs:  # the rule is torch's
        with pytest.raises(error, match=match):
            F.batch_norm(args["x"], None, None, training=True, eps=0.0)
    assert batch_norm_act(**{**args, "training": False, "eps": 0.0}).isfinite().all()  # eval: eps = 0 is fine


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("call", ["bad_skip", "bad_gate", "gate_without_skip", "one_value", "bad_input_bias",
                                  "backend_cannot_run"])
def test_rejected_call_leaves_module_state(triton_backend, monkeypatch, call):
    """Item 7: a rejected call changes neither num_batches_tracked nor the running statistics."""
    m = BatchNormAct2d(3, momentum=None)
    m(make_input((2, 3, 2, 2)))
    before = _state(m)
    x = make_input((2, 3, 2, 2))
    calls = {
        "bad_skip": lambda: m(x, torch.randn(2, 3, 2, 3)),
        "bad_gate": lambda: m(x, torch.randn(2, 3, 2, 2), torch.ones(2)),
        "gate_without_skip": lambda: m(x, None, 0.5),
        "one_value": lambda: m(torch.randn(1, 3, 1, 1)),
        "bad_input_bias": lambda: m(x, input_bias=torch.ones(4)),
        "backend_cannot_run": lambda: m(x),
    }
    if call == "backend_cannot_run":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        calls[call]()
    after = _state(m)
    for k in before:
        assert torch.equal(before[k], after[k]), k


def _manual_bn_dx(x, w, b, g):
    x = x.detach().double().requires_grad_()
    m = x.mean((0, 2, 3), keepdim=True)
    v = x.var((0, 2, 3), unbiased=False, keepdim=True)
    y = (x - m) / torch.sqrt(v + 1e-5) * w.double().reshape(1, -1, 1, 1) + b.double().reshape(1, -1, 1, 1)
    y.backward(g.double())
    return x.grad


@pytest.mark.parametrize("x_strides,g_strides", [
    ((9, 3, 3, 1), (3, 1, 1, 3)),  # the case: contiguous x, channels_last-like gradient
    ((3, 1, 9, 3), (9, 3, 3, 1)),
    ((9, 3, 3, 1), (9, 3, 9, 1)),
])
def test_reference_path_immune_to_cpu_layout_bug(x_strides, g_strides):
    """Item 9: torch's CPU batch_norm backward gets dx wrong (by ~0.6 in fp64) for H = 1 when the
    input's and the gradient's strides disagree on the channels_last ambiguity; the reference
    path (``auto`` on CPU tensors) hands it consistent layouts."""
    torch.manual_seed(0)
    shape = (1, 3, 1, 3)
    x = torch.empty_strided(shape, x_strides, dtype=F64).copy_(torch.randn(shape, dtype=F64)).requires_grad_()
    g = torch.empty_strided(shape, g_strides, dtype=F64).copy_(torch.randn(shape, dtype=F64))
    w, b = torch.rand(3, dtype=F64) + 0.5, torch.randn(3, dtype=F64)
    y = batch_norm_act(x, None, None, w, b, training=True, act="identity")  # auto: reference on CPU
    y.backward(g)
    torch.testing.assert_close(x.grad, _manual_bn_dx(x, w, b, g), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_reference_path_strided_weight(layout):
    """Item 9: a strided weight (``buf[1::2]``) read as contiguous by torch's CPU kernel gave NaN
    dx (H = W = 1); the reference path passes contiguous parameters."""
    buf = torch.full((8,), float("nan"))
    buf[1::2] = torch.rand(4) + 0.5
    w = buf[1::2]
    x = make_input((2, 4, 1, 1), F32, layout).requires_grad_()
    g = torch.randn(2, 4, 1, 1)
    y = batch_norm_act(x, None, None, w, None, training=True, act="identity")
    y.backward(g)
    assert x.grad.isfinite().all()
    torch.testing.assert_close(x.grad.double(), _manual_bn_dx(x, w, torch.zeros(4), g), atol=1e-5, rtol=1e-5)


def test_empty_batch_like_torch(triton_backend):
    ours, ref = BatchNormAct2d(3, act="identity"), nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 4, 5, requires_grad=True)
    y = ours(x)
    y_ref = ref(x)
    assert y.shape == y_ref.shape == x.shape
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(ours.weight.grad, ref.weight.grad) and torch.equal(ours.bias.grad, ref.bias.grad)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    assert torch.equal(ours.running_mean, ref.running_mean) and torch.equal(ours.running_var, ref.running_var)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_single_value_per_channel_raises(backend_name):
    fusedskip.set_backend(backend_name)
    m = BatchNormAct2d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1, 3, 1, 1))
    m.eval()
    assert m(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def test_state_dict_loads_both_ways():
    ours = BatchNormAct2d(4, act="gelu")
    torch_bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        torch_bn.weight.normal_()
        torch_bn.running_var.uniform_(0.5, 2)
        torch_bn.num_batches_tracked.fill_(7)
    ours.load_state_dict(torch_bn.state_dict())
    assert list(ours.state_dict()) == list(torch_bn.state_dict())
    assert ours.num_batches_tracked.item() == 7
    back = nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    for k, v in torch_bn.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    # A checkpoint from before num_batches_tracked existed (state_dict version 1) still loads.
    old = torch_bn.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    BatchNormAct2d(4).load_state_dict(old)
    # Without running statistics, like nn.BatchNorm2d(track_running_stats=False).
    assert list(BatchNormAct2d(4, track_running_stats=False).state_dict()) == ["weight", "bias"]


def test_activation_by_module_and_repr():
    m = BatchNormAct2d(4, act=nn.LeakyReLU(0.2))
    assert (m.act_name, m.negative_slope) == ("leaky_relu", 0.2)
    assert BatchNormAct2d(4, act=nn.GELU(approximate="tanh")).act_name == "gelu_tanh"
    assert BatchNormAct2d(4, act=None).act_name == "identity"
    assert "act=leaky_relu(0.2)" in repr(m)
    with pytest.raises(ValueError, match="act"):
        BatchNormAct2d(4, act="tanh")


def test_reference_path_matches_torch_modules():
    """The reference backend equals nn.BatchNorm2d + the activation for every activation."""
    fusedskip.set_backend("reference")
    x = make_input((2, 3, 4, 5), F32, "nchw", mean=3, scale=0.1)
    for act in ("identity", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh"):
        ours, ref = BatchNormAct2d(3, act=act, negative_slope=0.3), nn.BatchNorm2d(3)
        expected = apply_activation_reference(ref(x), act, 0.3)
        torch.testing.assert_close(ours(x), expected)


def _bad(**overrides):
    c = 3
    args = dict(x=torch.randn(2, c, 4, 5), running_mean=torch.zeros(c), running_var=torch.ones(c),
                weight=torch.ones(c), bias=torch.zeros(c), training=True)
    args.update(overrides)
    return args


BAD_INPUTS = [
    (_bad(x=torch.randn(2, 3, 4)), ValueError, "4-D"),
    (_bad(x=torch.randint(0, 3, (2, 3, 4, 5))), TypeError, "float"),
    (_bad(weight=torch.ones(4)), ValueError, "weight"),
    (_bad(bias=torch.ones(3, dtype=torch.int32)), TypeError, "bias"),
    (_bad(running_mean=torch.zeros(3, device="meta")), ValueError, "device"),
    (_bad(running_var=None), ValueError, "together"),
    (_bad(running_mean=None, running_var=None, training=False), ValueError, "training=False"),
    (_bad(skip=torch.randn(2, 3, 4, 6)), ValueError, "same shape"),
    (_bad(skip=torch.randn(2, 3, 4, 5, dtype=F64)), TypeError, "dtype"),
    (_bad(gate=0.5), ValueError, "skip"),
    (_bad(skip=torch.randn(2, 3, 4, 5), gate=torch.ones(2)), ValueError, "gate"),
    (_bad(act="swishy"), ValueError, "act"),
    (_bad(momentum=None), ValueError, "num_batches_tracked"),
    (_bad(eps=-1.0), ValueError, "eps"),
    (_bad(x=torch.randn(1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
]


@pytest.mark.parametrize("args,error,match", BAD_INPUTS)
def test_bad_inputs_raise_before_launch(triton_backend, monkeypatch, args, error, match):
    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched")

    for name in ("batch_norm_stats", "batch_norm_apply"):
        monkeypatch.setattr(bn_kernels, name, no_launch)
    with pytest.raises(error, match=match):
        batch_norm_act(**args)


def test_module_bad_inputs():
    with pytest.raises(ValueError, match="num_features"):
        BatchNormAct2d(0)
    m = BatchNormAct2d(3)
    with pytest.raises(ValueError, match="3 channels"):
        m(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(2, 3, 3))


@pytest.mark.parametrize("training", (True, False))
def test_strided_parameters_and_statistics(triton_backend, training):
    """γ, β and the running statistics given as strided views (every other element)."""
    c = 6
    x = make_input((3, c, 4, 5), mean=1.5)
    weight = (torch.rand(2 * c, dtype=torch.float64) + 0.5).float()[::2]
    bias = torch.randn(2 * c)[::2]
    rm_fused, rv_fused = torch.randn(2 * c)[::2], (torch.rand(2 * c) + 0.5)[::2]
    rm_ref, rv_ref = rm_fused.clone(), rv_fused.clone()
    y = batch_norm_act(x, rm_fused, rv_fused, weight, bias, training=training, act="silu")
    expected = torch.nn.functional.silu(torch.nn.functional.batch_norm(
        x.double(), rm_ref.double(), rv_ref.double(), weight.double(), bias.double(), training=training))
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    if training:  # F.batch_norm updated the fp64 copies, not rm_ref: recompute the update
        mean = x.double().mean((0, 2, 3))
        var = x.double().var((0, 2, 3), unbiased=True)
        torch.testing.assert_close(rm_fused.double(), 0.9 * rm_ref.double() + 0.1 * mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(rv_fused.double(), 0.9 * rv_ref.double() + 0.1 * var, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(rm_fused, rm_ref)
