"""Fused GroupNorm + activation: Triton kernels vs a float64 reference (forward and every
gradient), the single-pass and split designs (the rule that picks one, and both forced on the
same inputs), split/unsplit reductions, layouts, dtypes, gradcheck, opcheck, torch.compile,
determinism, modules and state_dicts, bad input."""
import math

import pytest
import torch
from helpers import assert_close, fused_twin, make_input, poisoned_empty, spy_launches
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


def force_path(monkeypatch, path: str) -> None:
    """Force one design through the rule's own thresholds: ``"single"`` (every group goes single
    pass, whatever its size or count) or ``"split"`` (none does)."""
    if path == "single":
        for name in ("SINGLE_PASS_MAX_ELEMS", "SINGLE_PASS_BWD_MAX_ELEMS", "SMALL_GROUP_ELEMS"):
            monkeypatch.setattr(gna_kernels, name, 1 << 30)
    else:
        monkeypatch.setattr(gna_kernels, "SINGLE_PASS_MAX_ELEMS", 0)


@pytest.fixture
def force_split(monkeypatch):
    """The split design with small tiles and many target programs: every (n, g) reduction splits
    over several chunks."""
    force_path(monkeypatch, "split")
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
    # Small groups: the single-pass design under the rule, forward and backward.
    assert gna_kernels.single_pass_tile(x, groups) is not None
    assert gna_kernels.single_pass_tile(x, groups, backward=True) is not None


@pytest.mark.parametrize("layout,dtype", [("nchw", torch.float64), ("channels_last", torch.float32),
                                          ("strided", torch.float32)])
def test_split_reduction_matches_fp64(triton_backend, force_split, device, layout, dtype):
    shape = (2, 4, 5, 7)
    x = make_input(shape, dtype, layout, mean=-2.0, scale=3.0, requires_grad=True)
    assert gna_kernels.reduce_plan(x).chunks > 1 and gna_kernels.single_pass_tile(x, 2) is None
    w, b = make_params(4, dtype, device)
    run_and_check(x, 2, w, b, 1e-5, "silu")


def test_split_and_unsplit_agree(triton_backend, device, monkeypatch):
    x = make_input((2, 4, 6, 6), mean=3.0, scale=0.1)
    w, b = make_params(4, torch.float32, device)
    force_path(monkeypatch, "split")
    y1 = group_norm_act(x, 2, w, b, act="gelu")
    monkeypatch.setattr(gna_kernels, "REDUCE_TILE", 16)
    monkeypatch.setattr(launch, "target_programs", lambda t: 1000)
    assert gna_kernels.reduce_plan(x).chunks > 1
    y2 = group_norm_act(x, 2, w, b, act="gelu")
    torch.testing.assert_close(y1, y2, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------------
# The single-pass design vs the split one: the rule, and both forced on the same inputs
# --------------------------------------------------------------------------------------------
H100_PROGRAMS = 4 * 132  # launch.target_programs on an H100: the rule then sees 132 SMs


@pytest.mark.parametrize("shape,groups,layout,fwd,bwd,gp", [
    ((2, 64, 8, 8), 32, "nchw", True, True, 1),             # small groups (128 elements): single pass
    ((1, 64, 48, 48), 32, "nchw", False, False, None),       # 8 K-element groups, N·G = 32 < 132 SMs
    ((8, 64, 48, 48), 32, "nchw", True, True, 1),            # the same groups, N·G = 256 fills the device
    ((8, 64, 96, 96), 32, "nchw", True, False, 1),           # 32 K elements: forward only (two live tiles)
    ((8, 64, 256, 256), 32, "nchw", False, False, None),     # 128 K elements: too large for the chip
    ((2, 128, 8, 8), 32, "channels_last", True, True, 4),    # channels_last: 4 groups = 16 channels a row
    ((16, 128, 64, 64), 32, "channels_last", True, True, 2),  # U-Net shape: the tile caps GP at 2 (fwd)
    ((2, 96, 8, 8), 32, "channels_last", True, True, 4),     # C/G = 3 padded to 4; GP divides G
    ((2, 40, 8, 8), 5, "channels_last", True, True, 1),      # G odd: GP must divide it
])
def test_single_pass_rule(monkeypatch, shape, groups, layout, fwd, bwd, gp):
    """Both sides of each condition of the rule (module docstring of kernels/group_norm_act.py)."""
    monkeypatch.setattr(launch, "target_programs", lambda t: H100_PROGRAMS)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(shape, device="meta").to(memory_format=fmt)
    tile_f = gna_kernels.single_pass_tile(x, groups)
    tile_b = gna_kernels.single_pass_tile(x, groups, backward=True)
    assert (tile_f is not None, tile_b is not None) == (fwd, bwd)
    if tile_f is not None:
        assert tile_f.gp == gp and groups % tile_f.gp == 0
        assert tile_f.block_s >= shape[2] * shape[3] and tile_f.block_cg >= shape[1] // groups
        assert tile_f.block_s * tile_f.block_cg * tile_f.gp <= gna_kernels.SINGLE_PASS_MAX_ELEMS
    if tile_b is not None:
        assert tile_b.block_s * tile_b.block_cg * tile_b.gp <= gna_kernels.SINGLE_PASS_BWD_MAX_ELEMS


def _forward_backward(x, groups, w, b, act, skip, gate, dy):
    y = group_norm_act(x, groups, w, b, 1e-5, act, skip=skip, gate=gate)
    inputs = [t for t in (x, w, b, skip, gate) if isinstance(t, torch.Tensor) and t.requires_grad]
    return [y, *torch.autograd.grad(y, inputs, dy)]


# (shape, groups, layout, dtype, act, gate): C/G a power of two or not (padded channels), GP > 1
# on channels_last, strided views, a per-channel, a single-value and a float gate, fp64.
PATH_CASES = [
    ((2, 8, 5, 6), 4, "nchw", torch.float32, "silu", "channel"),
    ((2, 12, 3, 5), 4, "channels_last", torch.float32, "relu", "scalar"),
    ((3, 16, 4, 4), 4, "channels_last", torch.bfloat16, "gelu", "channel"),
    ((2, 6, 5, 7), 2, "strided", torch.float16, "leaky_relu", "float"),
    ((2, 6, 3, 5), 3, "channels_last", torch.float64, "silu", "channel"),
    ((1, 4, 7, 9), 1, "nchw", torch.float32, "gelu_tanh", None),
]


@pytest.mark.parametrize("shape,groups,layout,dtype,act,gate_kind", PATH_CASES)
def test_single_pass_and_split_match_fp64_and_each_other(triton_backend, device, monkeypatch,
                                                         shape, groups, layout, dtype, act, gate_kind):
    """Each design forced on the same inputs: both within tolerance of float64 (forward and every
    gradient: x, γ, β, skip, gate) and within a few fp32 roundings of each other."""
    c = shape[1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_input(shape, dtype, layout, mean=2.0, scale=0.5, requires_grad=True)
    w, b = make_params(c, torch.float32 if dtype in HALF else dtype, device)
    skip = gate = None
    if gate_kind is not None:
        skip = make_input(shape, dtype, layout, mean=-1.0, requires_grad=True)
        gate = {"channel": lambda: (torch.rand(c, dtype=acc, device=device) + 0.5).requires_grad_(),
                "scalar": lambda: torch.tensor([0.7], dtype=acc, device=device, requires_grad=True),
                "float": lambda: 0.3}[gate_kind]()
    dy = torch.randn(shape, device=device).to(dtype)
    results = {}
    for path in ("single", "split"):
        with monkeypatch.context() as m:
            force_path(m, path)
            assert (gna_kernels.single_pass_tile(x, groups, backward=True) is None) == (path == "split")
            run_and_check(x, groups, w, b, 1e-5, act, None, skip, gate)
            results[path] = _forward_backward(x, groups, w, b, act, skip, gate, dy)
    tol = {torch.float64: 1e-12, torch.float32: 2e-5}.get(dtype, 2e-2)
    for single, split in zip(results["single"], results["split"]):
        mag = max(1.0, split.abs().max().item())
        torch.testing.assert_close(single.double(), split.double(), atol=tol * mag, rtol=tol)


def test_single_pass_launches(triton_backend, device, monkeypatch):
    """The single-pass design launches one kernel forward and one backward (its last program sums
    dγ, dβ and the gate's gradient), with no torch ops on the host for the gate or the parameters;
    the ticket it counts programs with is back to zero afterwards (the next call reuses it)."""
    launches = spy_launches(monkeypatch, gna_kernels, ("_group_norm_act_fused_kernel",
                                                      "_group_norm_act_backward_fused_kernel",
                                                      "_group_norm_act_param_grad_kernel"))
    x = make_input((2, 8, 4, 4), layout="channels_last", requires_grad=True)
    skip = make_input((2, 8, 4, 4), layout="channels_last", requires_grad=True)
    w, b = make_params(8, torch.float32, device)
    gate = torch.tensor([0.5], requires_grad=True)
    y = group_norm_act(x, 4, w, b, act="silu", skip=skip, gate=gate)
    assert launches == ["_group_norm_act_fused_kernel"]
    y.backward(torch.randn_like(y))
    assert launches[1:] == ["_group_norm_act_backward_fused_kernel"]
    assert gate.grad.shape == gate.shape and w.grad.dtype == w.dtype
    assert int(launch.tickets(x.device, 1)[0]) == 0


@pytest.mark.parametrize("path", ["single", "split"])
def test_large_mean_small_std(triton_backend, device, monkeypatch, path):
    # |mean| / std = 3000: E[x²] − E[x]² in fp32 would be off by ~100% (or negative); Welford
    # keeps rstd to ~1e-4. The output is then limited by fp32's resolution of x and of the mean
    # (ulp(300) / std ≈ 3e-4), not by the variance.
    force_path(monkeypatch, path)
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
    if n * cg * h * w == 1:
        h = 2  # a single value per group is rejected, as by F.group_norm
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
    """An empty batch runs (as F.group_norm); H·W = 0 is rejected (as F.group_norm, item 8 of issue 15)."""
    shape = (0, 4, 3, 3)
    x = torch.randn(shape, device=device, requires_grad=True)
    w, b = make_params(4, torch.float32, device)
    y = group_norm_act(x, 2, w, b, act="silu")
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# --------------------------------------------------------------------------------------------
# Issue 15: defects found by an independent fuzz (each test fails on the code before the fix)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("shape,groups", [((2, 4, 0, 3), 2), ((0, 4, 0, 3), 2), ((1, 4, 1, 1), 4), ((1, 6, 1, 1), 6)])
def test_rejects_what_torch_rejects(backend_name, shape, groups):
    """Item 8: H·W = 0 and a single value per group raise in both backends, as F.group_norm does."""
    fusedskip.set_backend(backend_name)
    x = torch.randn(shape)
    with pytest.raises((ValueError, RuntimeError)):
        torch.nn.functional.group_norm(x, groups)
    with pytest.raises(ValueError, match="H·W > 0|more than 1 value per group"):
        group_norm_act(x, groups)
    ok = torch.randn(2, shape[1], 1, 1)  # N = 2: two values per group, as torch accepts
    torch.testing.assert_close(group_norm_act(ok, groups, act="identity"),
                               torch.nn.functional.group_norm(ok, groups), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("split", [False, True])
def test_nonfinite_value_makes_its_group_nan(triton_backend, monkeypatch, bad, split):
    """Item 2: ±Inf/NaN in a group gives NaN for the whole group (as torch), not finite values
    (after ReLU: zeros that look valid); other groups are unaffected."""
    if split:
        force_path(monkeypatch, "split")
        monkeypatch.setattr(gna_kernels, "REDUCE_TILE", 16)
    x = make_input((2, 6, 4, 5), layout="channels_last")
    x[1, 2, 3, 1] = bad  # sample 1, group 1 of 3
    y = group_norm_act(x, 3, act="relu")
    ref = torch.relu(torch.nn.functional.group_norm(x, 3))
    assert y[1, 2:4].isnan().all()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[1, 2:4] = False
    assert y[mask].isfinite().all()
    torch.testing.assert_close(y, ref, equal_nan=True, atol=2e-5, rtol=2e-5)


def test_identity_grad_with_nonfinite_input(triton_backend):
    """Item 4: with the identity activation dβ = Σ dy (act'(z) = 1 even where z is ±Inf/NaN;
    z·0 + 1 made it NaN), as torch; dγ is NaN in the affected group only, as torch."""
    x = make_input((2, 4, 3, 3))
    x[0, 0, 0, 0] = float("inf")
    w = torch.ones(4, requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    y = group_norm_act(x, 2, w, b, act="identity")
    g = torch.randn_like(y)
    y.backward(g)
    w_ref, b_ref = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.nn.functional.group_norm(x, 2, w_ref, b_ref).backward(g)
    torch.testing.assert_close(b.grad, b_ref.grad)
    assert b.grad.isfinite().all()
    torch.testing.assert_close(w.grad, w_ref.grad, equal_nan=True)


@pytest.mark.parametrize("value", [10000.7, 3.3])
@pytest.mark.parametrize("split", [False, True])
def test_constant_groups_normalise_to_beta(triton_backend, monkeypatch, value, split):
    """Item 3: a zero-variance group normalises to exactly β (delta-form merge of the per-lane,
    per-chunk and per-channel partials), split into many chunks or not; mixed with a normal group."""
    if split:
        force_path(monkeypatch, "split")
        monkeypatch.setattr(gna_kernels, "REDUCE_TILE", 16)
    x = make_input((2, 4, 6, 7), layout="channels_last")
    x[:, :2] = value
    bias = torch.tensor([0.25, -1.5, 2.0, 0.5])
    weight = torch.tensor([1.5, 0.5, 2.0, 1.0])
    y = group_norm_act(x, 2, weight, bias, act="identity")
    assert torch.equal(y[:, :2], bias[:2].reshape(1, 2, 1, 1).expand(2, 2, 6, 7))
    check_tensor(y[:, 2:], reference64(x, 2, weight, bias, 1e-5, "identity", 0.0)[:, 2:], torch.float32)


def _gn_penalty(fn, x, params):
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)
    assert gx.requires_grad
    return torch.autograd.grad((gx ** 2).sum(), [x] + params)


def test_double_backward_gradient_penalty_matches_torch(triton_backend):
    """Item 1: group_norm_act (with a fused skip) under create_graph=True gives torch's
    second-order gradients (was: a loud error; now correct)."""
    x = make_input((2, 4, 3, 3), torch.float64, requires_grad=True)
    skip = make_input((2, 4, 3, 3), torch.float64, mean=-0.2)
    beta = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64).requires_grad_()
    nn_f = torch.nn.functional
    ours = _gn_penalty(lambda t: group_norm_act(t, 2, w, b, act="silu", skip=skip, gate=nn_f.softplus(beta)),
                       x, [w, b, beta])
    ref = _gn_penalty(lambda t: nn_f.silu(nn_f.group_norm(t + nn_f.softplus(beta) * skip, 2, w, b)), x, [w, b, beta])
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, atol=1e-9, rtol=1e-9)


def test_gradgradcheck(triton_backend):
    """Item 1: second derivatives w.r.t. x, skip, gate, γ, β and the incoming gradient."""
    f64 = torch.float64
    x = make_input((2, 4, 2, 2), f64, requires_grad=True)
    skip = make_input((2, 4, 2, 2), f64, mean=-0.3, requires_grad=True)
    gate = (torch.rand(4, dtype=f64) + 0.5).requires_grad_()
    w = (torch.rand(4, dtype=f64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=f64).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x, skip, gate, w, b: group_norm_act(x, 2, w, b, act="gelu", skip=skip, gate=gate),
        (x, skip, gate, w, b), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_sparse_input_and_string_slope_rejected(backend_name):
    """Items 6 and 10: a sparse input gets a clear error (was: 'memory format option is only
    supported by strided tensors'); string and NaN slopes are rejected."""
    fusedskip.set_backend(backend_name)
    x = make_input((2, 4, 3, 3))
    with pytest.raises(TypeError, match="dense.*to_dense"):
        group_norm_act(x.to_sparse(), 2)
    with pytest.raises(TypeError, match="negative_slope must be a float"):
        group_norm_act(x, 2, act="leaky_relu", negative_slope="0.1")
    with pytest.raises(ValueError, match="negative_slope must be finite"):
        group_norm_act(x, 2, act="leaky_relu", negative_slope=float("nan"))
    with pytest.raises(TypeError, match="negative_slope must be a float"):
        GroupNormAct(2, 4, act="leaky_relu", negative_slope="0.1")


def test_interpreter_enabled_after_import_is_explained(monkeypatch):
    """Item 10: TRITON_INTERPRET=1 set after fusedskip was imported (Triton reads it when the
    kernels are defined) gets an error that says so (was: '0 active drivers')."""
    if torch.cuda.is_available():
        pytest.skip("GPU present")
    monkeypatch.setattr(fusedskip.backend, "_INTERPRETER_AT_IMPORT", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with fusedskip.use_backend("triton"), pytest.raises(RuntimeError, match="set after fusedskip was imported"):
        group_norm_act(torch.randn(1, 2, 2, 2), 1)


@pytest.mark.parametrize("path", ["single", "split"])
def test_deterministic(triton_backend, device, monkeypatch, path):
    """Bit-for-bit equal results on a rerun, gate and parameter gradients included (fixed-order
    partial sums, no float atomics), in both designs."""
    if path == "split":
        force_path(monkeypatch, "split")
        monkeypatch.setattr(gna_kernels, "REDUCE_TILE", 32)
        monkeypatch.setattr(launch, "target_programs", lambda t: 64)
    x = make_input((2, 4, 5, 7), layout="channels_last", mean=3.0, scale=0.1, requires_grad=True)
    assert (gna_kernels.reduce_plan(x).chunks > 1) == (path == "split")
    assert (gna_kernels.single_pass_tile(x, 2) is None) == (path == "split")
    w, b = make_params(4, torch.float32, device)
    skip = make_input((2, 4, 5, 7), requires_grad=True)
    gate = (torch.rand(4, device=device) + 0.5).requires_grad_()
    dy = torch.randn(x.shape, device=device)

    def run():
        y = group_norm_act(x, 2, w, b, act="gelu", skip=skip, gate=gate)
        return (y, *torch.autograd.grad(y, (x, w, b, skip, gate), dy))

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
    fused = fused_twin(gn, GroupNormAct(4, 12, act=nn.GELU(approximate="tanh")).to(device))
    x = make_input((2, 12, 3, 5), mean=1.0)
    check_tensor(fused(x), nn.GELU(approximate="tanh")(gn(x)).double(), torch.float32)
    back = nn.GroupNorm(4, 12).to(device)
    back.load_state_dict(fused.state_dict())
    assert torch.equal(back.weight, gn.weight) and torch.equal(back.bias, gn.bias)
    assert set(GroupNormAct(4, 12, affine=False).state_dict()) == set(nn.GroupNorm(4, 12, affine=False).state_dict())
    assert "act=gelu_tanh" in repr(fused)


def test_instance_norm_act(triton_backend, device):
    inorm = nn.InstanceNorm2d(6, affine=True).to(device)
    m = fused_twin(inorm, InstanceNormAct2d(6, affine=True, act="leaky_relu", negative_slope=0.2).to(device))
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
        (lambda: group_norm_act(x, 3, torch.ones(6, dtype=torch.int64, device=device)), TypeError,
         "weight must be a floating"),
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
