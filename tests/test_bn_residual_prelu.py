"""batch_norm_act / BatchNormAct2d with a residual added after the norm and with PReLU (learned
slope ``act_weight``): Triton kernels (interpreted on the CPU) vs a float64 reference.

Every comparison covers the output and each gradient (x, skip, gate, γ, β, residual, slope) and
the running statistics, with uninitialised allocations poisoned with NaN. Kept small: every
Triton program is a Python loop under the interpreter.
"""
import pytest
import torch
import torch.distributed as dist
from helpers import make_input, poisoned_empty
from test_batch_norm_act import _fp64, _params, close
from torch import nn
from torch.nn import functional as F

import fusedskip
from fusedskip.distributed import sync_batch_norm_act
from fusedskip.kernels import batch_norm_act as bn_kernels
from fusedskip.ops.batch_norm_act import BatchNormAct2d, batch_norm_act, batch_norm_act_reference

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _inputs(shape, dtype, layout, training, *, skip_layout=None, gate=None, res_layout="nchw", slopes=0,
            param_dtype=F32, mean=3.0, scale=0.1):
    """The fused op's arguments: x (mean ``mean``), skip, residual (mixed signs, so the
    activation's kinks are crossed), γ, β, the slope (``slopes`` values, 0: none) and running
    statistics; in eval, running statistics near the data's, so z has both signs there too."""
    c = shape[1]
    x = make_input(shape, dtype, layout, mean=mean, scale=scale, requires_grad=True)
    skip = make_input(shape, dtype, skip_layout, mean=-1.0, scale=0.5, requires_grad=True) if skip_layout else None
    res = make_input(shape, dtype, res_layout, mean=-0.2, scale=1.0, requires_grad=True) if res_layout else None
    weight, bias = _params(c, param_dtype)
    act_weight = (torch.rand(slopes, dtype=F64) * 0.5 + 0.05).to(param_dtype).requires_grad_() if slopes else None
    if training:
        rm, rv = torch.randn(c, dtype=F64), torch.rand(c, dtype=F64) + 0.5
    else:
        xa = x.detach().double()
        if skip is not None:
            a = 1.0 if gate is None else gate.detach().double().reshape(-1, 1, 1) if gate.numel() > 1 else float(gate)
            xa = xa + a * skip.detach().double()
        var, mu = torch.var_mean(xa, dim=(0, 2, 3))
        rm = mu + var.sqrt() * 0.3 * torch.randn(c, dtype=F64)
        rv = var * (torch.rand(c, dtype=F64) + 0.5)
    return dict(x=x, skip=skip, gate=gate, residual=res, weight=weight, bias=bias, act_weight=act_weight,
                running_mean=rm.to(param_dtype), running_var=rv.to(param_dtype))


def _fused(a, training, act, momentum=0.1):
    slope = 0.2 if act == "leaky_relu" else None
    return batch_norm_act(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"], training, momentum,
                          1e-5, act, slope, a["skip"], a["gate"], residual=a["residual"], act_weight=a["act_weight"])


def _stats(a):
    """fp64 copies of the running statistics of ``a`` (take them before the fused op updates them)."""
    return {k: a[k].detach().double().clone() for k in ("running_mean", "running_var")}


def _reference(a, training, act, stats, momentum=0.1):
    """The fp64 reference on copies of ``a`` and the running statistics ``stats``: (output, the copies)."""
    r = {k: (_fp64(v) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    r.update(stats)
    slope = 0.2 if act == "leaky_relu" else None
    y = batch_norm_act_reference(r["x"], r["running_mean"], r["running_var"], r["weight"], r["bias"], training,
                                 momentum, 1e-5, act, slope, r["skip"], r["gate"], residual=r["residual"],
                                 act_weight=r["act_weight"])
    return y, r


GRADS = (("x", 1.0), ("skip", 1.0), ("residual", 1.0), ("weight", 2.0), ("bias", 2.0), ("act_weight", 2.0))


def _compare(shape, dtype, layout, act, training, param_dtype=F32, **kw):
    """Fused op (poisoned allocations) vs the fp64 reference: output, every gradient, running stats."""
    a = _inputs(shape, dtype, layout, training, param_dtype=param_dtype, **kw)
    stats = _stats(a)
    with poisoned_empty():
        y = _fused(a, training, act)
        g = torch.randn(y.shape, dtype=F64).to(dtype)
        y.backward(g)
    assert y.dtype == dtype and y.shape == a["x"].shape
    yr, r = _reference(a, training, act, stats)
    yr.backward(g.double())
    close(y, yr, dtype, msg="output")
    for name, factor in GRADS:
        if a[name] is not None:
            tol_dtype = dtype if name in ("x", "skip", "residual") else param_dtype
            assert a[name].grad is not None, f"no gradient for {name}"
            assert a[name].grad.dtype == a[name].dtype and a[name].grad.shape == a[name].shape, name
            close(a[name].grad, r[name].grad, tol_dtype, factor=factor, msg=f"d_{name}")
    if isinstance(a["gate"], torch.Tensor):
        close(a["gate"].grad, r["gate"].grad, F32, factor=4.0, msg="d_gate")
    close(a["running_mean"], r["running_mean"], param_dtype, msg="running_mean")
    close(a["running_var"], r["running_var"], param_dtype, msg="running_var")
    return a


RESIDUAL_CASES = [
    # act, training, skip layout, residual layout, slopes
    ("relu", True, None, "nchw", 0),
    ("relu", False, None, "channels_last", 0),
    ("silu", True, "channels_last", "nchw", 0),
    ("silu", False, "nchw", "strided", 0),
    ("leaky_relu", True, None, "strided", 0),
    ("leaky_relu", False, "channels_last", "nchw", 0),
    ("prelu", True, "nchw", "channels_last", 5),
    ("prelu", False, None, "nchw", 1),
    ("identity", True, None, "strided", 0),
]


@pytest.mark.parametrize("act,training,skip_layout,res_layout,slopes", RESIDUAL_CASES)
def test_residual_matches_fp64_reference(triton_backend, act, training, skip_layout, res_layout, slopes):
    gate = (torch.rand(5) + 0.5).requires_grad_() if skip_layout else None
    _compare((2, 5, 4, 5), F32, "nchw", act, training, skip_layout=skip_layout, gate=gate, res_layout=res_layout,
             slopes=slopes)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("slopes", [1, 4])
@pytest.mark.parametrize("training", [True, False])
def test_prelu_alone_matches_fp64_reference(triton_backend, layout, slopes, training):
    """PReLU without a residual, one slope or one per channel, x in channels_last or strided."""
    _compare((3, 4, 3, 5), F32, layout, "prelu", training, res_layout=None, slopes=slopes)


def test_split_reduction_residual_prelu(triton_backend):
    """The slope-gradient row merged from many partial rows (ragged tiles), with a scalar gate."""
    with bn_kernels.reduction_config(rows=3, block_s=8, block_c=2):
        _compare((3, 3, 5, 7), F32, "channels_last", "prelu", True, skip_layout="nchw",
                 gate=torch.tensor([0.7], requires_grad=True), res_layout="strided", slopes=3)


@pytest.mark.parametrize("dtype,param_dtype", [(F16, F16), (BF16, F32)])
def test_half_precision(triton_backend, dtype, param_dtype):
    """fp16 (fp16 parameters and slope) and bf16 (fp32 parameters, as under autocast)."""
    _compare((2, 4, 4, 5), dtype, "channels_last", "prelu", True, param_dtype=param_dtype,
             res_layout="nchw", slopes=4)
    _compare((2, 4, 4, 5), dtype, "nchw", "silu", False, param_dtype=param_dtype, res_layout="channels_last")


def test_gradcheck_fp64(triton_backend):
    shape = (2, 3, 2, 3)
    x = make_input(shape, F64, "channels_last", mean=3, scale=0.5, requires_grad=True)
    skip = make_input(shape, F64, "nchw", requires_grad=True)
    res = make_input(shape, F64, "strided", mean=-0.2, requires_grad=True)
    w, b = _params(3, F64)
    gate = torch.rand(3, dtype=F64, requires_grad=True)
    slope3 = (torch.rand(3, dtype=F64) * 0.5).requires_grad_()
    slope1 = torch.tensor([0.3], dtype=F64, requires_grad=True)
    rm, rv = torch.full((3,), 2.9, dtype=F64), torch.full((3,), 0.3, dtype=F64)

    def train(x, w, b, skip, gate, res, slope):
        return batch_norm_act(x, None, None, w, b, True, act="prelu", skip=skip, gate=gate, residual=res,
                              act_weight=slope)

    def evaluate(x, w, b, res, slope):
        return batch_norm_act(x, rm, rv, w, b, False, act="prelu", residual=res, act_weight=slope)

    def silu(x, w, b, res):
        return batch_norm_act(x, None, None, w, b, True, act="silu", residual=res)

    assert torch.autograd.gradcheck(train, (x, w, b, skip, gate, res, slope3), fast_mode=True)
    assert torch.autograd.gradcheck(evaluate, (x, w, b, res, slope1), fast_mode=True)
    assert torch.autograd.gradcheck(silu, (x, w, b, res), fast_mode=True)


def test_prelu_kink_follows_torch(triton_backend):
    """At z = 0 exactly, PReLU'(0) = slope (torch's convention) for dx and d_residual, and z = 0
    adds nothing to the slope gradient."""
    c = 3
    x = torch.zeros(2, c, 2, 2, requires_grad=True)
    res = torch.zeros(2, c, 2, 2, requires_grad=True)
    slope = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    y = batch_norm_act(x, torch.zeros(c), torch.ones(c), None, None, False, act="prelu", residual=res,
                       act_weight=slope)
    g = torch.randn(y.shape)
    y.backward(g)
    expected = g * slope.detach().reshape(1, c, 1, 1)
    torch.testing.assert_close(res.grad, expected)
    torch.testing.assert_close(x.grad, expected / (1 + 1e-5) ** 0.5)
    assert torch.equal(slope.grad, torch.zeros(c))


def test_deterministic(triton_backend):
    """Two runs (split reduction) give bitwise-equal outputs and gradients, slope and residual included."""
    a = _inputs((3, 4, 5, 7), F32, "channels_last", True, res_layout="nchw", slopes=4)
    g = torch.randn(a["x"].shape)

    def run():
        b = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
             for k, v in a.items()}
        y = _fused(b, True, "prelu")
        y.backward(g)
        return [y, b["running_mean"], b["running_var"]] + [b[k].grad for k in
                                                           ("x", "residual", "weight", "bias", "act_weight")]

    with bn_kernels.reduction_config(rows=3, block_s=16, block_c=2):
        first, second = run(), run()
    for t, u in zip(first, second):
        assert torch.equal(t, u)


def test_residual_gradient_only(triton_backend):
    """Only the residual needs a gradient (x, γ, β frozen): the dx kernel writes d_residual alone."""
    a = _inputs((2, 3, 4, 5), F32, "nchw", True, res_layout="channels_last", slopes=3)
    for k in ("x", "weight", "bias", "act_weight"):
        a[k].requires_grad_(False)
    stats = _stats(a)
    y = _fused(a, True, "prelu")
    g = torch.randn(y.shape)
    y.backward(g)
    yr, r = _reference(a, True, "prelu", stats)
    yr.backward(g.double())
    assert a["residual"].grad.stride() == a["residual"].stride()
    close(a["residual"].grad, r["residual"].grad, F32)


@pytest.mark.parametrize("act", ["prelu", "silu"])
@pytest.mark.parametrize("training", [True, False])
def test_double_backward_matches_torch(triton_backend, act, training):
    """create_graph=True: a gradient penalty ‖∂y/∂x‖²'s gradients w.r.t. x, the residual, γ, β
    and the slope equal those of the same computation in torch ops."""
    x = make_input((2, 3, 3, 3), F64, mean=0.3, requires_grad=True)
    res = make_input((2, 3, 3, 3), F64, mean=-0.1, requires_grad=True)
    w = (torch.rand(3, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=F64).requires_grad_()
    slope = (torch.rand(3, dtype=F64) * 0.5).requires_grad_() if act == "prelu" else None
    rm, rv = torch.randn(3, dtype=F64) * 0.1, torch.rand(3, dtype=F64) + 0.5
    params = [res, w, b] + ([slope] if slope is not None else [])

    def ours(t):
        return batch_norm_act(t, rm.clone(), rv.clone(), w, b, training, act=act, residual=res, act_weight=slope)

    def torch_ops(t):
        z = F.batch_norm(t, rm.clone(), rv.clone(), w, b, training=training) + res
        return F.prelu(z, slope) if act == "prelu" else F.silu(z)

    def penalty(fn):
        y = fn(x)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
        return torch.autograd.grad((gx ** 2).sum(), [x] + params, allow_unused=True)

    for got, want in zip(penalty(ours), penalty(torch_ops)):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_opcheck_residual_prelu():
    """The torch.library ops with the residual and the slope: schema, fake tensors, autograd registration."""
    x = make_input((2, 3, 4, 5), F32, "channels_last", mean=3, scale=0.1)
    res = make_input((2, 3, 4, 5), F32, "strided")
    slope = torch.rand(3)
    w, b = (t.detach() for t in _params(3))
    ops = torch.ops.fusedskip
    mean, rstd, _ = ops.batch_norm_act_stats(x, None, None, None, None, None, 0.1, 1e-5)
    grad = torch.randn(x.shape)
    sums, _, dres = ops.batch_norm_act_backward_reduce(grad, x, None, None, mean, rstd, w, b, 12, 0.0, False, False,
                                                       1 / 40, True, res, slope, True)
    assert sums.shape == (3, 3) and dres.shape == res.shape
    samples = [
        (ops.batch_norm_act_apply.default, (x, None, None, mean, rstd, w, b, False, 1e-5, 12, 0.0, res, slope)),
        (ops.batch_norm_act_backward_reduce.default, (grad, x, None, None, mean, rstd, w, b, 12, 0.0, False, False,
                                                      1 / 40, True, res, slope)),
        (ops.batch_norm_act_backward_reduce.default, (grad, x, None, None, mean, rstd, w, b, 12, 0.0, False, False,
                                                      1 / 40, True, res, slope, True)),
        (ops.batch_norm_act_backward_dx.default, (grad, x, None, None, mean, rstd, w, b, sums, 1 / 40, True, 12, 0.0,
                                                  True, False, res, slope, True)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("act", ["prelu", "identity"])
def test_compile_fullgraph_matches_eager(triton_backend, act):
    """The module with a residual and PReLU (or no activation: d_residual is dy itself) under
    torch.compile(fullgraph=True) equals eager."""
    torch._dynamo.reset()
    kw = {"prelu_parameters": 3} if act == "prelu" else {}
    eager = BatchNormAct2d(3, act=act, **kw)
    with torch.no_grad():
        eager.weight.uniform_(0.5, 1.5)
        eager.bias.normal_()
        if act == "prelu":
            eager.act_weight.uniform_(0.05, 0.5)
    module = BatchNormAct2d(3, act=act, **kw)
    module.load_state_dict(eager.state_dict())
    compiled = torch.compile(module, fullgraph=True)
    x = make_input((2, 3, 4, 5), F32, "nchw", mean=3, scale=0.1)
    res = make_input((2, 3, 4, 5), F32, "channels_last", mean=-0.2)
    g = torch.randn(x.shape)
    grads = []
    for m in (eager, compiled):
        xx, rr = x.clone().requires_grad_(), res.clone().requires_grad_()
        m(xx, residual=rr).backward(g)
        grads.append((xx.grad, rr.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    if act == "prelu":
        assert torch.equal(eager.act_weight.grad, module.act_weight.grad)
    assert torch.equal(eager.running_var, module.running_var)


# --------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------
def test_module_state_dict_keys_and_prelu_weight():
    bn_keys = list(nn.BatchNorm2d(4).state_dict())
    assert list(BatchNormAct2d(4, act="relu").state_dict()) == bn_keys
    m = BatchNormAct2d(4, act="prelu")
    assert list(m.state_dict()) == ["weight", "bias", "act_weight"] + bn_keys[2:]
    assert m.act_weight.shape == (1,) and torch.equal(m.act_weight, torch.full((1,), 0.25))
    assert m.prelu_weight is m.act_weight
    m4 = BatchNormAct2d(4, act="prelu", prelu_parameters=4, dtype=F64)
    assert m4.act_weight.shape == (4,) and m4.act_weight.dtype == F64
    assert "act=prelu(num_parameters=4)" in repr(m4)
    owner = nn.PReLU(4)
    with torch.no_grad():
        owner.weight.uniform_(0.1, 0.5)
    copied = BatchNormAct2d(4, act=owner)
    assert torch.equal(copied.act_weight, owner.weight) and copied.act_weight is not owner.weight
    with torch.no_grad():
        copied.act_weight.fill_(0.7)
    copied.reset_parameters()  # nn.PReLU's init, as nn.PReLU.reset_parameters
    assert torch.equal(copied.act_weight.detach(), torch.full((4,), 0.25))
    # The keys load into a fresh module; a plain BatchNorm2d checkpoint needs act_weight (strict).
    BatchNormAct2d(4, act="prelu").load_state_dict(m.state_dict())
    with pytest.raises(RuntimeError, match="act_weight"):
        BatchNormAct2d(4, act="prelu").load_state_dict(nn.BatchNorm2d(4).state_dict())
    with pytest.raises(ValueError, match="prelu_parameters"):
        BatchNormAct2d(4, act="prelu", prelu_parameters=3)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_module_borrowed_slope(backend_name):
    """borrow_act_weight: no state_dict key here, the owner's weight is read and receives the gradient."""
    fusedskip.set_backend(backend_name)
    c = 4
    owner = nn.PReLU(c)
    with torch.no_grad():
        owner.weight.copy_(torch.tensor([0.05, 0.2, 0.35, 0.5]))
    m = BatchNormAct2d(c, act="prelu")
    m.borrow_act_weight(owner)
    assert "act_weight" not in m.state_dict() and m.prelu_weight is owner.weight
    assert "borrowed" in repr(m)
    model = nn.ModuleDict({"norm": m, "act": owner})
    assert list(model.state_dict()) == [f"norm.{k}" for k in nn.BatchNorm2d(c).state_dict()] + ["act.weight"]
    x = make_input((2, c, 3, 4), F32, "channels_last", mean=2.0, scale=0.5, requires_grad=True)
    res = make_input((2, c, 3, 4), F32, "nchw", mean=-0.1, requires_grad=True)
    y = m(x, residual=res)
    g = torch.randn(y.shape)
    y.backward(g)
    slope = owner.weight.detach().double().requires_grad_()
    xr, rr = _fp64(x), _fp64(res)
    yr = F.prelu(F.batch_norm(xr, None, None, training=True) + rr, slope)
    yr.backward(g.double())
    close(y, yr, F32)
    close(owner.weight.grad, slope.grad, F32, factor=2.0)
    close(res.grad, rr.grad, F32)
    close(x.grad, xr.grad, F32)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_input_bias_and_residual(triton_backend, momentum):
    """input_bias (before the norm) and residual (after it) together, training then eval, against
    nn.BatchNorm2d on x + b, then + residual, then PReLU; running statistics included."""
    c = 3
    m = BatchNormAct2d(c, act="prelu", momentum=momentum, prelu_parameters=c)
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_()
        m.act_weight.uniform_(0.05, 0.5)
    ref = nn.BatchNorm2d(c, momentum=momentum).double()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k != "act_weight"})
    slope = m.act_weight.detach().double()
    ib = torch.randn(c)
    for step, training in enumerate((True, True, False)):
        m.train(training)
        ref.train(training)
        x = make_input((2, c, 3, 4), F32, "nchw", mean=1.0 + step, scale=0.3)
        res = make_input((2, c, 3, 4), F32, "channels_last", mean=-0.2)
        y = m(x, input_bias=ib, residual=res)
        expected = F.prelu(ref(x.double() + ib.double().reshape(1, c, 1, 1)) + res.double(), slope)
        close(y, expected, F32, factor=2.0, msg=f"step {step}")
    close(m.running_mean, ref.running_mean, F32)
    close(m.running_var, ref.running_var, F32)
    assert m.num_batches_tracked.item() == ref.num_batches_tracked.item() == 2


def test_module_fx_trace_keeps_residual():
    """torch.fx: one call_module node with the residual as a keyword; the traced graph runs."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = BatchNormAct2d(3, act="prelu")

        def forward(self, x, r):
            return self.bn(x, residual=r)

    net = Net()
    gm = torch.fx.symbolic_trace(net)
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert len(calls) == 1 and calls[0].target == "bn" and "residual" in calls[0].kwargs
    net.eval()
    gm.eval()
    x, r = make_input((2, 3, 2, 2)), make_input((2, 3, 2, 2))
    torch.testing.assert_close(gm(x, r), net(x, r))


# --------------------------------------------------------------------------------------------
# SyncBatchNorm path (one rank on gloo: the collectives are identities, the plumbing is real)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_sync_path_residual_and_prelu(one_rank_group, backend_name):
    fusedskip.set_backend(backend_name)
    a = _inputs((2, 3, 4, 5), F32, "channels_last", True, skip_layout="nchw", res_layout="strided", slopes=3)
    stats = _stats(a)
    y = sync_batch_norm_act(a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"], True, 0.1, 1e-5,
                            "prelu", None, a["skip"], None, residual=a["residual"], act_weight=a["act_weight"])
    g = torch.randn(y.shape)
    y.backward(g)
    yr, r = _reference(a, True, "prelu", stats)
    yr.backward(g.double())
    close(y, yr, F32)
    for name, factor in GRADS:
        close(a[name].grad, r[name].grad, F32, factor=factor, msg=f"d_{name}")
    close(a["running_var"], r["running_var"], F32)
    with pytest.raises(ValueError, match="act_weight"):
        sync_batch_norm_act(a["x"], None, None, training=True, act="prelu")


# --------------------------------------------------------------------------------------------
# Errors: named, before any launch, module state untouched
# --------------------------------------------------------------------------------------------
BAD = [
    (dict(residual=torch.randn(2, 3, 4, 6)), ValueError, "residual must have the same shape"),
    (dict(residual=torch.randn(2, 3, 20)), ValueError, "residual must be a 4-D"),
    (dict(residual=torch.randn(2, 3, 4, 5, dtype=F64)), TypeError, "residual must have x's dtype"),
    (dict(residual=torch.randn(2, 3, 4, 5, device="meta")), ValueError, "residual must be on"),
    (dict(residual=[1.0]), TypeError, "residual must be a torch.Tensor"),
    (dict(act_weight=torch.ones(1)), ValueError, "act_weight .*needs act='prelu'"),
    (dict(act="leaky_relu", act_weight=torch.ones(3)), ValueError, "act_weight .*needs act='prelu'"),
    (dict(act="prelu"), ValueError, "needs act_weight"),
    (dict(act="prelu", act_weight=torch.ones(2)), ValueError, r"act_weight must have shape \(3,\)"),
    (dict(act="prelu", act_weight=torch.ones(1, 3)), ValueError, "act_weight must have shape"),
    (dict(act="prelu", act_weight=torch.ones(3, device="meta")), ValueError, "act_weight must be on"),
    (dict(act="prelu", act_weight=torch.ones(3, dtype=torch.int32)), TypeError, "act_weight must be a floating"),
    (dict(act="prelu", act_weight=[0.25]), TypeError, "act_weight must be a torch.Tensor"),
    (dict(act=nn.PReLU(2)), ValueError, "act_weight must have shape"),
]


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("kwargs,error,match", BAD)
def test_bad_inputs_raise_before_launch(monkeypatch, backend_name, kwargs, error, match):
    fusedskip.set_backend(backend_name)

    def no_launch(*a, **k):
        raise AssertionError("a kernel was launched")

    for name in ("batch_norm_stats", "batch_norm_apply"):
        monkeypatch.setattr(bn_kernels, name, no_launch)
    c = 3
    args = dict(x=torch.randn(2, c, 4, 5), running_mean=torch.zeros(c), running_var=torch.ones(c),
                weight=torch.ones(c), bias=torch.zeros(c), training=True)
    with pytest.raises(error, match=match):
        batch_norm_act(**{**args, **kwargs})


def test_nn_prelu_as_act_uses_its_weight(triton_backend):
    """act=nn.PReLU(...) without act_weight: the module's weight is the slope (and gets the gradient)."""
    pr = nn.PReLU(3, init=0.3)
    x = make_input((2, 3, 3, 3), mean=1.0)
    y = batch_norm_act(x, None, None, training=True, act=pr)
    y.sum().backward()
    expected = F.prelu(F.batch_norm(x.double(), None, None, training=True), pr.weight.detach().double())
    close(y, expected, F32)
    assert pr.weight.grad is not None and pr.weight.grad.abs().sum() > 0


def test_rejected_residual_leaves_module_state(triton_backend):
    m = BatchNormAct2d(3, momentum=None, act="prelu")
    m(make_input((2, 3, 2, 2)))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="residual"):
        m(make_input((2, 3, 2, 2)), residual=torch.randn(2, 3, 2, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(before[k], v), k
