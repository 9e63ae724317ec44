"""GroupNorm / InstanceNorm + activation with a residual, a per-(sample, channel) scale / shift and
PReLU: ``y = act(GN(x)·(1 + scale) + shift + residual)``. Triton kernels (the single-pass and the
split design, each forced) vs a float64 reference for the output and every gradient, gradcheck,
second order, layouts, fp16 / bf16, determinism, launch counts, the MONAI UnetResBlock and
diffusers ResnetBlock2D patterns, module state_dicts (owned and borrowed PReLU slope), bad input."""
import math

import pytest
import torch
from helpers import fused_twin, make_input, poisoned_empty, spy_launches
from test_group_norm_act import check_tensor, force_path, leaf64, make_params, reference64
from torch import nn
from torch.nn import functional as F

import fusedskip
from fusedskip.activations import apply_activation_reference
from fusedskip.kernels import group_norm_act as gna_kernels
from fusedskip.kernels import launch
from fusedskip.ops.group_norm_act import GroupNormAct, InstanceNormAct2d, group_norm_act, group_norm_act_reference

# Triton's interpreter evaluates sigmoid in numpy, which warns on exp overflow in the tails.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

HALF = (torch.float16, torch.bfloat16)
EXTRA_NAMES = ("residual", "scale", "shift", "act_weight")


# --------------------------------------------------------------------------------------------
# float64 reference, operands, comparison
# --------------------------------------------------------------------------------------------
def reference64_extras(x, groups, w, b, eps, act, slope, skip=None, gate=None, residual=None, scale=None,
                       shift=None, act_weight=None):
    """act(GN(x [+ gate·skip])·(1 + scale) + shift + residual) in float64 (explicit two-pass GN)."""
    z = reference64(x, groups, w, b, eps, "identity", 0.0, skip, gate)
    n, c = x.shape[:2]
    if scale is not None:
        z = z * (1.0 + scale.double().reshape(n, c, 1, 1))
    if shift is not None:
        z = z + shift.double().reshape(n, c, 1, 1)
    if residual is not None:
        z = z + residual.double()
    if act == "prelu":
        return F.prelu(z, act_weight.double())
    return apply_activation_reference(z, act, slope)


def make_extras(shape, dtype, device, kinds, residual_layout="nchw", nc_dtype=None, nc_shape="nc11",
                slopes=None):
    """The operands named in ``kinds`` (residual, scale, shift) with gradients; ``slopes``: None, 1
    or C PReLU slopes. scale/shift as [N, C] or [N, C, 1, 1] (``nc_shape``) in ``nc_dtype``."""
    n, c = shape[:2]
    nc_dtype = nc_dtype or dtype
    out = {}
    if "residual" in kinds:
        out["residual"] = make_input(shape, dtype, residual_layout, mean=-0.3, requires_grad=True)
    for name, centre in (("scale", 0.1), ("shift", -0.2)):
        if name in kinds:
            t = (torch.randn(n, c, dtype=torch.float64, device=device) * 0.5 + centre).to(nc_dtype)
            out[name] = (t.reshape(n, c, 1, 1) if nc_shape == "nc11" else t).requires_grad_()
    if slopes is not None:
        aw_dtype = torch.float32 if dtype in HALF else dtype
        out["act_weight"] = (torch.rand(slopes, dtype=torch.float64, device=device) * 0.4 + 0.05).to(
            aw_dtype).requires_grad_()
    return out


def check_case(x, groups, w, b, act, slope=None, extras=None, skip=None, gate=None, dy_layout=None):
    """Forward and every gradient of group_norm_act with ``extras`` vs the float64 reference
    (outputs poisoned: a missed store is NaN). Returns (y, {name: gradient}, {name: reference})."""
    extras = extras or {}
    dtype = x.dtype
    named = dict(x=x, weight=w, bias=b, skip=skip, gate=gate, **extras)
    with poisoned_empty():
        y = group_norm_act(x, groups, w, b, 1e-5, act, slope, skip=skip, gate=gate, **extras)
    assert y.dtype == dtype and y.shape == x.shape
    leaves = {k: leaf64(t) for k, t in named.items()}
    ref = reference64_extras(leaves["x"], groups, leaves["weight"], leaves["bias"], 1e-5, act,
                             0.01 if slope is None else slope, leaves["skip"], leaves["gate"],
                             *(leaves.get(k) for k in EXTRA_NAMES))
    check_tensor(y, ref, dtype)
    wanted = [k for k, t in named.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    dy = torch.randn(y.shape, dtype=torch.float64, device=y.device).to(dtype)
    if dy_layout == "channels_last":
        dy = dy.contiguous(memory_format=torch.channels_last)
    with poisoned_empty():
        grads = torch.autograd.grad(y, [named[k] for k in wanted], dy)
    grads64 = torch.autograd.grad(ref, [leaves[k] for k in wanted], dy.double())
    for k, gr, gr64 in zip(wanted, grads, grads64):
        t = named[k]
        assert gr.dtype == t.dtype and gr.shape == t.shape, k
        if t.shape == x.shape:  # x, skip, residual: elementwise
            check_tensor(gr, gr64, dtype)
        else:  # sums over H·W (scale, shift), N·H·W (γ, β, slopes) or more fp32 terms
            n_terms = x.numel() / t.numel()
            tol_dtype = torch.float32 if t.dtype == torch.float64 and dtype != torch.float64 else t.dtype
            check_tensor(gr, gr64, tol_dtype, factor=max(1.0, math.sqrt(n_terms) / 4))
    return y, dict(zip(wanted, grads)), dict(zip(wanted, grads64))


def use_path(monkeypatch, x, groups, path):
    """Force one design; the split one with tiny tiles so that every reduction spans chunks."""
    force_path(monkeypatch, path)
    if path == "split":
        # NCHW-like walks: 8-position tiles; channels_last: 8 channels × 4 positions.
        monkeypatch.setattr(gna_kernels, "REDUCE_TILE", 32 if launch.channels_inner(x) else 8)
        monkeypatch.setattr(launch, "target_programs", lambda t: 64)
        assert gna_kernels.reduce_plan(x).chunks > 1
    assert (gna_kernels.single_pass_tile(x, groups, backward=True) is None) == (path == "split")


# --------------------------------------------------------------------------------------------
# Kernels vs float64, both designs
# --------------------------------------------------------------------------------------------
# (id, shape, groups, dtype, layout, act, extras, slopes): each operand alone and combined, every
# activation the task names, per-channel and single slopes, C/G not a power of two, G = C.
CASES = [
    ("residual-relu", (2, 6, 5, 7), 3, torch.float32, "nchw", "relu", ("residual",), None),
    ("scale-shift-silu", (2, 8, 4, 5), 4, torch.float32, "channels_last", "silu", ("scale", "shift"), None),
    ("scale-leaky", (2, 6, 3, 5), 2, torch.float32, "strided", "leaky_relu", ("scale",), None),
    ("shift-relu", (2, 6, 4, 3), 6, torch.float32, "nchw", "relu", ("shift",), None),
    ("prelu-C", (2, 6, 5, 3), 3, torch.float32, "nchw", "prelu", (), 6),
    ("prelu-1", (2, 8, 3, 4), 2, torch.float32, "channels_last", "prelu", (), 1),
    ("all-prelu-fp64", (2, 6, 3, 5), 3, torch.float64, "strided", "prelu", ("residual", "scale", "shift"), 6),
    ("all-silu", (3, 12, 3, 4), 4, torch.float32, "channels_last", "silu", ("residual", "scale", "shift"), None),
]


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("shape,groups,dtype,layout,act,kinds,slopes", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_matches_fp64(triton_backend, device, monkeypatch, shape, groups, dtype, layout, act, kinds, slopes, path):
    x = make_input(shape, dtype, layout, mean=2.0, scale=0.5, requires_grad=True)
    use_path(monkeypatch, x, groups, path)
    w, b = make_params(shape[1], dtype, device)
    extras = make_extras(shape, dtype, device, kinds, residual_layout=layout,
                         nc_shape="nc" if "leaky" in act else "nc11", slopes=slopes)
    check_case(x, groups, w, b, act, 0.2 if act == "leaky_relu" else None, extras, dy_layout=layout)


@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("act", ["gelu", "identity"])
def test_frozen_residual_and_shift(triton_backend, device, monkeypatch, path, act):
    """A residual (and shift) without gradients: the split dx pass recomputes u from dy and the
    residual itself; with the residual's gradient wanted it reads pass 1's du instead (above)."""
    shape = (2, 6, 5, 3)
    x = make_input(shape, layout="strided", mean=1.0, requires_grad=True)
    use_path(monkeypatch, x, 3, path)
    w, b = make_params(6, torch.float32, device)
    extras = make_extras(shape, torch.float32, device, ("residual", "scale", "shift"), residual_layout="channels_last")
    extras["residual"].requires_grad_(False)
    extras["shift"].requires_grad_(False)
    _, grads, _ = check_case(x, 3, w, b, act, None, extras)
    assert set(grads) == {"x", "weight", "bias", "scale"}


@pytest.mark.parametrize("path", ["single", "split"])
def test_with_skip_gate_and_every_operand(triton_backend, device, monkeypatch, path):
    """Pre-norm gated skip + residual + scale + shift + PReLU(C) at once; d_scale and d_residual are
    checked against values that the plausible mutants (β·B dropped from d_scale, d_residual = dx
    instead of du) are far from."""
    shape, groups = (2, 8, 3, 5), 4
    x = make_input(shape, torch.float32, "channels_last", mean=1.5, scale=0.5, requires_grad=True)
    use_path(monkeypatch, x, groups, path)
    w, b = make_params(8, torch.float32, device)
    skip = make_input(shape, torch.float32, "nchw", mean=-1.0, requires_grad=True)
    gate = (torch.rand(8, device=device) + 0.5).requires_grad_()
    extras = make_extras(shape, torch.float32, device, ("residual", "scale", "shift"), slopes=8)
    _, grads, ref = check_case(x, groups, w, b, "prelu", None, extras, skip, gate)
    # β·B matters in d_scale (β ~ 0.5) and d_residual = du is not dx: a mutant misses by far more
    # than the tolerance the comparisons above used.
    mutant_dscale = ref["scale"] - b.detach().double().reshape(1, -1, 1, 1) * ref["shift"]
    assert (mutant_dscale - ref["scale"]).abs().max() > 0.1
    assert (ref["x"] - ref["residual"]).abs().max() > 0.1
    torch.testing.assert_close(grads["scale"].double(), ref["scale"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads["residual"].double(), ref["residual"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", ["single", "split"])
def test_partial_affine_and_gradients(triton_backend, device, monkeypatch, path):
    """No γ/β (d_scale = A), γ without β, and operands without gradients beside ones with them
    (scale fixed, shift and residual learned; x fixed)."""
    shape = (2, 6, 3, 5)
    x = make_input(shape, torch.float32, "nchw", mean=1.0, scale=0.7, requires_grad=True)
    use_path(monkeypatch, x, 3, path)
    extras = make_extras(shape, torch.float32, device, ("residual", "scale", "shift"), slopes=6)
    check_case(x, 3, None, None, "prelu", None, extras)
    w, _ = make_params(6, torch.float32, device)
    extras["scale"] = extras["scale"].detach()
    check_case(x.detach(), 3, w, None, "silu", None, {k: extras[k] for k in ("residual", "scale", "shift")})


@pytest.mark.parametrize("path", ["single", "split"])
def test_more_channels_than_one_block(triton_backend, device, monkeypatch, path):
    """C = 136 > 128: the parameter and single-slope sums run over two channel blocks."""
    shape, groups = (2, 136, 2, 2), 8
    force_path(monkeypatch, path)
    x = make_input(shape, torch.float32, "channels_last", mean=1.0, requires_grad=True)
    w, b = make_params(shape[1], torch.float32, device)
    extras = make_extras(shape, torch.float32, device, ("scale",), slopes=1)
    check_case(x, groups, w, b, "prelu", None, extras)


@pytest.mark.parametrize("path", ["single", "split"])
def test_layouts_strided_residual(triton_backend, device, monkeypatch, path):
    """channels_last x with a sliced (non-mergeable H, W) residual, and NCHW x with a channels_last
    residual; d_residual keeps a dense residual's layout."""
    shape = (2, 6, 4, 5)
    x = make_input(shape, torch.float32, "channels_last", mean=1.0, requires_grad=True)
    use_path(monkeypatch, x, 3, path)
    w, b = make_params(6, torch.float32, device)
    extras = make_extras(shape, torch.float32, device, ("residual", "shift"), residual_layout="strided", nc_shape="nc")
    check_case(x, 3, w, b, "leaky_relu", 0.1, extras, dy_layout="channels_last")
    x2 = make_input(shape, torch.float32, "nchw", mean=1.0, requires_grad=True)
    res = make_input(shape, torch.float32, "channels_last", requires_grad=True)
    y = group_norm_act(x2, 3, w, b, act="relu", residual=res)
    (dres,) = torch.autograd.grad(y, res, torch.randn_like(y))
    assert dres.is_contiguous(memory_format=torch.channels_last)
    check_case(x2, 3, w, b, "relu", None, {"residual": res})


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision(triton_backend, device, dtype):
    """fp16 / bf16 activations with fp32 parameters, slopes and (bf16) time-embedding scale/shift."""
    shape = (2, 8, 4, 4)
    x = make_input(shape, dtype, "channels_last", mean=3.0, scale=0.2, requires_grad=True)
    w, b = make_params(8, torch.float32, device)
    nc_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    extras = make_extras(shape, dtype, device, ("residual", "scale", "shift"), residual_layout="channels_last",
                         nc_dtype=nc_dtype, slopes=8)
    check_case(x, 4, w, b, "prelu", None, extras, dy_layout="channels_last")
    extras = make_extras(shape, dtype, device, ("scale", "shift"), nc_dtype=nc_dtype)
    check_case(x, 2, w, b, "silu", None, extras)


# --------------------------------------------------------------------------------------------
# gradcheck, second order, determinism, launches
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["single", "split"])
def test_gradcheck(triton_backend, device, monkeypatch, path):
    f64 = torch.float64
    shape = (2, 2, 3, 3)
    x = make_input(shape, f64, "nchw", mean=1.0, requires_grad=True)
    use_path(monkeypatch, x, 1, path)
    w, b = make_params(2, f64, device)
    ex = make_extras(shape, f64, device, ("residual", "scale", "shift"), slopes=2)

    def fn(x, w, b, residual, scale, shift, act_weight):
        return group_norm_act(x, 1, w, b, 1e-3, "prelu", residual=residual, scale=scale, shift=shift,
                              act_weight=act_weight)

    assert torch.autograd.gradcheck(fn, (x, w, b, *(ex[k] for k in EXTRA_NAMES)), fast_mode=True)


def test_double_backward_matches_torch(triton_backend, device):
    """create_graph=True: a gradient penalty's gradients w.r.t. every input, the new ones included,
    equal torch's (the backward is rebuilt from differentiable torch ops)."""
    f64 = torch.float64
    shape = (2, 4, 3, 3)
    x = make_input(shape, f64, requires_grad=True)
    w, b = make_params(4, f64, device)
    ex = make_extras(shape, f64, device, ("residual", "scale", "shift"), slopes=4)
    no_slope = {k: ex[k] for k in EXTRA_NAMES[:3]}

    def penalty(fn, operands):
        y = fn(x)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
        return torch.autograd.grad((gx ** 2).sum(), [x, w, b, *operands.values()])

    ours = penalty(lambda t: group_norm_act(t, 2, w, b, act="silu", **no_slope), no_slope)
    ref = penalty(lambda t: reference64_extras(t, 2, w, b, 1e-5, "silu", 0.0, **no_slope), no_slope)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-9)
    # PReLU: the slope's gradient reaches the penalty through act'(u) = slope on u ≤ 0.
    ours = penalty(lambda t: group_norm_act(t, 2, w, b, act="prelu", **ex), ex)
    ref = penalty(lambda t: reference64_extras(t, 2, w, b, 1e-5, "prelu", 0.0, **ex), ex)
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("path", ["single", "split"])
def test_deterministic(triton_backend, device, monkeypatch, path):
    """Bit-for-bit equal outputs and gradients on a rerun (fixed-order sums, no float atomics)."""
    shape = (2, 8, 5, 6)
    x = make_input(shape, torch.float32, "channels_last", mean=2.0, scale=0.3, requires_grad=True)
    use_path(monkeypatch, x, 4, path)
    w, b = make_params(8, torch.float32, device)
    ex = make_extras(shape, torch.float32, device, ("residual", "scale", "shift"), slopes=1)
    inputs = (x, w, b, *(ex[k] for k in EXTRA_NAMES))
    dy = torch.randn(shape, device=device)

    def run():
        y = group_norm_act(x, 4, w, b, act="prelu", **ex)
        return (y, *torch.autograd.grad(y, inputs, dy))

    first, second = run(), run()
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("path,expected", [
    ("single", ["_group_norm_act_fused_kernel", "_group_norm_act_backward_fused_kernel"]),
    ("split", ["_group_norm_act_stats_kernel", "_group_norm_stats_finalize_kernel", "_group_norm_act_apply_kernel",
               "_group_norm_act_backward_reduce_kernel", "_group_norm_act_backward_finalize_kernel",
               "_group_norm_act_backward_dx_kernel", "_group_norm_act_param_grad_kernel"]),
])
def test_no_extra_launches(triton_backend, device, monkeypatch, path, expected):
    """The new operands add no launch and no host-side torch op: d_residual beside dx, d_scale /
    d_shift per (n, c) and the slope's sum in the launches that ran without them."""
    launches = spy_launches(monkeypatch, gna_kernels, {*expected, "_group_norm_act_param_grad_kernel"})
    shape = (2, 8, 4, 4)
    x = make_input(shape, layout="channels_last", requires_grad=True)
    use_path(monkeypatch, x, 4, path)
    w, b = make_params(8, torch.float32, device)
    ex = make_extras(shape, torch.float32, device, ("residual", "scale", "shift"), slopes=8)
    y = group_norm_act(x, 4, w, b, act="prelu", **ex)
    y.backward(torch.randn_like(y))
    assert launches == expected
    assert all(t.grad is not None for t in ex.values()) and ex["scale"].grad.shape == ex["scale"].shape
    assert int(launch.tickets(x.device, 1)[0]) == 0


@pytest.mark.parametrize("act", ["silu", "identity"])
@pytest.mark.parametrize("path", ["single", "split"])
def test_backward_reads_residual_and_grad_once(triton_backend, device, monkeypatch, path, act):
    """Bytes the backward's kernels load, counted by the instrumented interpreter: dy and the
    residual once each (the split design's reduce pass writes d_residual = du, which its dx pass
    reads instead of both), and d_residual is dy itself for the identity activation."""
    if torch.device(device).type != "cpu":
        pytest.skip("counts the Triton interpreter's loads")
    import os
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import instrument

    instrument.install_interpreter_counters()
    shape = (2, 8, 4, 4)
    x = make_input(shape, layout="channels_last", requires_grad=True)
    use_path(monkeypatch, x, 4, path)
    w, b = make_params(8, torch.float32, device)
    ex = make_extras(shape, torch.float32, device, ("residual", "scale"))
    y = group_norm_act(x, 4, w, b, act=act, **ex)
    dy = torch.randn_like(y)
    with instrument.LOG.recording() as launches:
        y.backward(dy)

    def passes(t, table):
        return sum(getattr(la, table).get(instrument.storage_key(t), 0) for la in launches) / t.nbytes

    res = ex["residual"]
    # The identity activation: du = dy, read by both split passes (the minimum there, as without a residual).
    assert passes(dy, "reads") == pytest.approx(2.0 if path == "split" and act == "identity" else 1.0)
    assert passes(res, "reads") == pytest.approx(0.0 if act == "identity" else 1.0)
    assert passes(x, "reads") == pytest.approx(1.0 if path == "single" else 2.0)
    if act == "identity":  # d_residual is dy: the kernels write dx alone
        assert torch.equal(res.grad, dy)
        large = sum(v for la in launches for k, v in la.writes.items() if la.args[k][1] >= x.nbytes)
        assert large == x.nbytes
    else:
        assert passes(res.grad, "writes") == pytest.approx(1.0)
        assert passes(res.grad, "reads") == pytest.approx(0.0 if path == "single" else 1.0)


# --------------------------------------------------------------------------------------------
# Library patterns, modules, state_dicts
# --------------------------------------------------------------------------------------------
def test_instance_norm_residual_leaky_relu_monai(triton_backend, device):
    """MONAI UnetResBlock's tail, lrelu(norm2(conv2(x)) + residual) with InstanceNorm(affine):
    InstanceNormAct2d(residual=) vs the torch modules, forward and every gradient."""
    torch.manual_seed(1)
    norm = nn.InstanceNorm2d(6, affine=True).to(device)
    fused = fused_twin(norm, InstanceNormAct2d(6, affine=True, act="leaky_relu", negative_slope=0.01).to(device))
    x = make_input((2, 6, 5, 4), mean=2.0, requires_grad=True)
    res = make_input((2, 6, 5, 4), mean=-0.5, layout="channels_last", requires_grad=True)
    y = fused(x, residual=res)
    norm64 = nn.InstanceNorm2d(6, affine=True).double()
    norm64.load_state_dict(norm.state_dict())
    x64, res64 = leaf64(x), leaf64(res)
    ref = F.leaky_relu(norm64(x64) + res64, 0.01)
    _check_forward_backward(y, ref, ((x, x64), (res, res64), (fused.weight, norm64.weight),
                                     (fused.bias, norm64.bias)))
    assert "act_weight" not in fused.state_dict()


def _check_forward_backward(y, ref, leaves):
    """y against its float64 reference, then the gradients of each (fused leaf, float64 leaf) pair
    after one backward of both with the same random dy."""
    check_tensor(y, ref, torch.float32)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref.backward(dy.double())
    for got, want in leaves:
        check_tensor(got.grad, want.grad, torch.float32, factor=2.0)


def test_group_norm_scale_shift_silu_diffusers(triton_backend, device):
    """diffusers ResnetBlock2D, time_embedding_norm="scale_shift": scale, shift = temb.chunk(2, 1)
    (strided [N, C, 1, 1] views); h = silu(norm2(h)·(1 + scale) + shift). The time embedding's
    gradient flows back through both views."""
    torch.manual_seed(2)
    gn = nn.GroupNorm(4, 8).to(device)
    fused = fused_twin(gn, GroupNormAct(4, 8, act="silu").to(device))
    h = make_input((2, 8, 4, 5), mean=1.0, layout="channels_last", requires_grad=True)
    temb = (torch.randn(2, 16, 1, 1, device=device) * 0.5).requires_grad_()
    scale, shift = temb.chunk(2, dim=1)
    assert not scale.is_contiguous()
    y = fused(h, scale=scale, shift=shift)
    gn64 = nn.GroupNorm(4, 8).double()
    gn64.load_state_dict(gn.state_dict())
    h64, temb64 = leaf64(h), leaf64(temb)
    s64, t64 = temb64.chunk(2, dim=1)
    ref = F.silu(gn64(h64) * (1 + s64) + t64)
    _check_forward_backward(y, ref, ((h, h64), (temb, temb64), (fused.weight, gn64.weight), (fused.bias, gn64.bias)))


def test_module_prelu_weight_state_dict_and_borrow(triton_backend, device):
    """act_weight is a state_dict entry only when the module owns the slope; a borrowed slope
    (fusedskip.convert's PReLU slot) adds no key and receives the gradient."""
    assert "act_weight" not in GroupNormAct(2, 8, act="relu").state_dict()
    own1 = GroupNormAct(2, 8, act="prelu")
    own8 = InstanceNormAct2d(8, affine=True, act="prelu", prelu_parameters=8)
    assert own1.state_dict()["act_weight"].shape == (1,) and own8.state_dict()["act_weight"].shape == (8,)
    assert torch.equal(own8.act_weight.detach(), torch.full((8,), 0.25))
    prelu = nn.PReLU(8, init=0.1)
    copied = GroupNormAct(2, 8, act=prelu)
    assert copied.act_weight is not prelu.weight and torch.equal(copied.act_weight.detach(), prelu.weight.detach())
    assert "prelu(num_parameters=8)" in repr(copied) and "prelu(num_parameters=1)" in repr(own1)

    owner = nn.PReLU(8, init=0.2)
    with torch.no_grad():
        owner.weight.uniform_(0.05, 0.5)
    borrower = GroupNormAct(2, 8, act="prelu")
    borrower.borrow_act_weight(owner)
    assert set(borrower.state_dict()) == {"weight", "bias"} and borrower.prelu_weight is owner.weight
    x = make_input((2, 8, 3, 3), mean=0.5, requires_grad=True)
    res = make_input((2, 8, 3, 3), requires_grad=True)
    y = borrower(x, residual=res)
    ref = owner(F.group_norm(x, 2, borrower.weight, borrower.bias) + res)
    check_tensor(y, ref.double(), torch.float32)
    y.square().sum().backward()
    got = owner.weight.grad.clone()
    owner.weight.grad = None
    (slope_ref,) = torch.autograd.grad(ref.square().sum(), owner.weight)
    check_tensor(got, slope_ref.double(), torch.float32, factor=2.0)
    with pytest.raises(ValueError, match="prelu_parameters must be 1 or the channel count 8"):
        GroupNormAct(2, 8, act="prelu", prelu_parameters=4)


def test_fx_trace_passes_the_operands(triton_backend, device):
    """torch.fx sees GroupNormAct(x, residual=, scale=, shift=) as one call_module node with the
    operands as kwargs, and the traced module computes the same."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = GroupNormAct(2, 4, act="silu")

        def forward(self, x, r, s, t):
            return self.norm(x, residual=r, scale=s, shift=t)

    block = Block().to(device)
    traced = torch.fx.symbolic_trace(block)
    nodes = [nd for nd in traced.graph.nodes if nd.op == "call_module"]
    assert len(nodes) == 1 and set(nodes[0].kwargs) == {"residual", "scale", "shift"}
    args = (make_input((2, 4, 3, 3)), make_input((2, 4, 3, 3)), torch.randn(2, 4), torch.randn(2, 4, 1, 1))
    assert torch.equal(traced(*args), block(*args))


def test_reference_backend_and_empty_batch(device):
    """The reference backend computes the same function; an empty batch runs with every operand."""
    shape = (2, 6, 3, 4)
    x = make_input(shape, mean=1.0)
    w, b = make_params(6, torch.float32, device)
    ex = {k: v.detach() for k, v in make_extras(shape, torch.float32, device, ("residual", "scale", "shift"),
                                                slopes=6).items()}
    with fusedskip.use_backend("reference"):
        y = group_norm_act(x, 3, w, b, act="prelu", **ex)
    check_tensor(y, reference64_extras(x, 3, w, b, 1e-5, "prelu", 0.0, **ex), torch.float32)
    with fusedskip.use_backend("triton"):
        x0 = torch.randn(0, 6, 3, 4, requires_grad=True)
        ex0 = make_extras((0, 6, 3, 4), torch.float32, device, ("residual", "scale", "shift"), slopes=1)
        y0 = group_norm_act(x0, 3, w, b, act="prelu", **ex0)
        y0.sum().backward()
    assert y0.shape == x0.shape and ex0["scale"].grad.shape == (0, 6, 1, 1)
    assert torch.equal(ex0["act_weight"].grad, torch.zeros(1))


def test_opcheck_with_operands(device):
    """The torch.library ops with the new optional tensors: schema, fake implementations, autograd
    registration (torch.library.opcheck)."""
    shape = (2, 4, 3, 3)
    x = make_input(shape, layout="channels_last")
    w, b = (t.detach() for t in make_params(4, torch.float32, device))
    ex = {k: v.detach() for k, v in make_extras(shape, torch.float32, device, ("residual", "scale", "shift"),
                                                slopes=4).items()}
    with fusedskip.use_backend("triton"):
        fwd = torch.ops.fusedskip.group_norm_act_forward
        bwd = torch.ops.fusedskip.group_norm_act_backward
        args = (x, w, b, None, None, 2, 1e-5, "prelu", 0.0, *(ex[k] for k in EXTRA_NAMES))
        torch.library.opcheck(fwd, args)
        y, mean, rstd = fwd(*args)
        torch.library.opcheck(bwd, (torch.randn_like(y), x, w, b, None, None, mean, rstd, 2, "prelu", 0.0,
                                    True, False, False, True, True, *(ex[k] for k in EXTRA_NAMES),
                                    True, True, True, True))


# --------------------------------------------------------------------------------------------
# Bad input: clear errors naming the argument, before any launch, in both backends
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_bad_inputs(device, monkeypatch, backend_name):
    def no_launch(*args, **kwargs):
        raise AssertionError("launched a kernel on invalid input")

    monkeypatch.setattr(gna_kernels, "group_norm_act_forward", no_launch)
    fusedskip.set_backend(backend_name)
    x = make_input((2, 6, 3, 3))
    nc = torch.zeros(2, 6)
    cases = [
        (dict(residual=x[:, :3]), ValueError, "residual must have the same shape as x"),
        (dict(residual=x.double()), TypeError, "residual must have x's dtype"),
        (dict(residual=torch.empty(x.shape, device="meta")), ValueError, "residual must be on"),
        (dict(residual=x.tolist()), TypeError, "residual must be a torch.Tensor"),
        (dict(scale=torch.zeros(2, 6, 2)), ValueError, r"scale must have shape \[N, C\]"),
        (dict(shift=torch.zeros(6)), ValueError, r"shift must have shape \[N, C\]"),
        (dict(scale=torch.zeros(2, 6, 1, 1, device="meta")), ValueError, "scale must be on x's device"),
        (dict(shift=nc.long()), TypeError, "shift must be a floating-point tensor"),
        (dict(scale=0.5), TypeError, "scale must be a torch.Tensor"),
        (dict(act_weight=torch.ones(6)), ValueError, "act_weight is PReLU's learned slope"),
        (dict(act="prelu", act_weight=torch.ones(3)), ValueError, "act_weight must have shape"),
        (dict(act="prelu", act_weight=torch.ones(6, device="meta")), ValueError, "act_weight must be on"),
        (dict(act="prelu"), ValueError, "needs its learned slope"),
        (dict(act=nn.PReLU(4)), ValueError, "act_weight must have shape"),
    ]
    for kwargs, err, match in cases:
        kwargs = dict(kwargs)
        act = kwargs.pop("act", "relu")
        with pytest.raises(err, match=match):
            group_norm_act(x, 3, act=act, **kwargs)
    with pytest.raises(ValueError, match="needs its learned slope"):
        group_norm_act_reference(x, 3, act="prelu")


@pytest.mark.parametrize("act", ["prelu", "identity"])
def test_compile_fullgraph_matches_eager(triton_backend, device, act):
    """torch.compile(fullgraph=True) through the torch.library ops with every new operand: the
    forward and every gradient equal eager's bit for bit (identity: d_residual is dy itself, which
    no custom op returns)."""
    torch._dynamo.reset()
    m = GroupNormAct(2, 4, act=act, **({"prelu_parameters": 4} if act == "prelu" else {})).to(device)
    shape = (2, 4, 3, 4)
    x = make_input(shape, layout="channels_last", mean=1.0, requires_grad=True)
    ex = make_extras(shape, torch.float32, device, ("residual", "scale", "shift"))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    params = (m.act_weight, m.weight) if act == "prelu" else (m.weight,)
    results = []
    for fn in (compiled, m):
        y = fn(x, **ex)
        results.append((y, *torch.autograd.grad(y.square().sum(), (x, *params, *ex.values()))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    torch._dynamo.reset()
