"""VMSANet (Net-Opt-MTL): CACM and VMSM against plain-torch transcriptions of the released modules,
parameter counts of the released configuration, the ablation flags, the fused backend, the
cross-task hook."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fusedskip.backend import use_backend
from fusedskip.models.vmsanet import CACM, VMSM, VMSANet, count_parameters
from fusedskip.ops.conv_norm_act import ConvNormAct


# ----------------------------------------------------------------------------------------------
# Plain-torch transcriptions of the released modules (github.com/SyqxhSt/Net-Opt-MTL at dcd2536)
# ----------------------------------------------------------------------------------------------
def _cba(cin, cout, k, act, **kw):
    return nn.Sequential(nn.Conv2d(cin, cout, k, **kw), nn.BatchNorm2d(cout), act)


class RefDWS(nn.Module):
    def __init__(self, cin, cout, stride=1, padding=1):
        super().__init__()
        self.depthwise = _cba(cin, cin, 3, nn.LeakyReLU(0.1), stride=stride, padding=padding, groups=cin)
        self.pointwise = _cba(cin, cout, 1, nn.LeakyReLU(0.1))

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


class RefCACM(nn.Module):
    def __init__(self, c, r=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)
        self.dws = nn.ModuleList([RefDWS(c, c // d) for d in (2, 4, 8, r)])
        self.lin = nn.ModuleList([nn.Conv2d(c // d, c, 1) for d in (2, 4, 8, r)])

    def forward(self, x):
        s = self.fc2(F.gelu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        for dws, lin in zip(self.dws, self.lin):
            s = s + lin(F.gelu(F.adaptive_avg_pool2d(dws(x), 1)))
        return x * torch.sigmoid(s)


class RefVMSM(nn.Module):
    """Released forward: fuse_2(conv1 + conv2-branch + pool); the d = 4, 6 branches run unused."""

    def __init__(self, dim, in_dim):
        super().__init__()
        d = in_dim // 2
        self.down_conv = _cba(dim, in_dim, 3, nn.PReLU(), padding=1)
        self.conv1 = _cba(in_dim, d, 1, nn.PReLU())
        self.dil = nn.ModuleList([_cba(in_dim, d, 3, nn.PReLU(), dilation=r, padding=r) for r in (2, 4, 6)])
        self.conv5 = _cba(in_dim, d, 1, nn.PReLU())
        self.fuse_2 = _cba(d, in_dim, 1, nn.PReLU())
        self.dws = nn.ModuleList([RefDWS(d, d, stride=r, padding=0) for r in (2, 4, 6)])

    def forward(self, x):
        x = self.down_conv(x)
        size = x.shape[2:]
        b1 = self.conv1(x)
        br = [F.interpolate(dws(conv(x)), size=size, mode="bilinear", align_corners=False)
              for conv, dws in zip(self.dil, self.dws)]
        b5 = F.interpolate(self.conv5(F.adaptive_avg_pool2d(x, 1)), size=size, mode="bilinear", align_corners=False)
        return self.fuse_2(b1 + br[0] + b5)


def _copy_state(dst: nn.Module, src: nn.Module) -> None:
    """Copy ``src``'s state into ``dst`` in registration order (same constructors, other names)."""
    a, b = list(dst.state_dict().items()), list(src.state_dict().items())
    assert len(a) == len(b)
    new = {}
    for (ka, va), (kb, vb) in zip(a, b):
        assert va.shape == vb.shape, (ka, kb)
        new[ka] = vb.clone()
    dst.load_state_dict(new)


def _randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=g))
                else:
                    t.copy_(0.3 * torch.randn(t.shape, generator=g) + (0.1 if name.endswith("running_mean") else 0))


def _compare(ours: nn.Module, ref: nn.Module, x: torch.Tensor, atol: float = 1e-5) -> None:
    for train in (True, False):
        ours.train(train)
        ref.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb, atol=atol, rtol=1e-4)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, atol=atol, rtol=1e-4)
        pa = [p.grad for p in ours.parameters() if p.requires_grad]
        pb = [p.grad for p, q in zip(ref.parameters(), ours.parameters()) if q.requires_grad]
        for u, v in zip(pa, pb):
            torch.testing.assert_close(u, v, atol=10 * atol, rtol=1e-3)
    sa, sb = ours.state_dict(), ref.state_dict()
    for u, v in zip(sa.values(), sb.values()):  # running statistics advanced identically
        torch.testing.assert_close(u.float(), v.float(), atol=atol, rtol=1e-4)


@pytest.mark.parametrize("channels", [32, 48])
def test_cacm_matches_released(channels):
    torch.manual_seed(0)
    ref = RefCACM(channels)
    _randomise(ref, 1)
    ours = CACM(channels)
    _copy_state(ours, ref)
    assert count_parameters(ours) == count_parameters(ref)
    with use_backend("reference"):
        _compare(ours, ref, torch.randn(3, channels, 7, 9) + 0.5)


def test_vmsm_matches_released():
    torch.manual_seed(0)
    ref = RefVMSM(6, 8)
    _randomise(ref, 2)
    ours = VMSM(6, 8, fusion="released")
    _copy_state(ours, ref)
    assert count_parameters(ours) == count_parameters(ref)
    with use_backend("reference"):
        _compare(ours, ref, torch.randn(2, 6, 13, 16) + 0.3)


def test_vmsm_fusions_and_small_maps():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 12, 12)
    with use_backend("reference"):
        outs = {}
        for fusion in ("released", "intended", "concat"):
            torch.manual_seed(1)
            m = VMSM(4, 8, fusion=fusion)
            outs[fusion] = m(x)
            assert outs[fusion].shape == (2, 8, 12, 12)
        assert not torch.allclose(outs["released"], outs["intended"])
        # the released model raises on maps below the stride-6 kernel; ours pads them to 3 pixels
        assert VMSM(4, 8, fusion="intended")(torch.randn(2, 4, 2, 2)).shape == (2, 8, 2, 2)
        # the released fusion ignores the d = 4, 6 branches: their gradients are exactly zero
        m = VMSM(4, 8, fusion="released")
        m(x).sum().backward()
        assert m.dilated[1].conv.conv.weight.grad is None or float(m.dilated[1].conv.conv.weight.grad.abs().max()) == 0
        assert float(m.dilated[0].conv.conv.weight.grad.abs().max()) > 0
    with pytest.raises(ValueError, match="fusion"):
        VMSM(4, 8, fusion="sum")


def _released_mtan_count(classes: int) -> int:
    """Parameters of the released two-task MTAN-SegNet (seg ``classes`` + depth), logsigma excluded:
    an analytic count of its constructors."""
    f = [64, 128, 256, 512, 512]

    def conv(cin, cout, k=3):
        return cin * cout * k * k + cout

    def cbr(cin, cout, k=3):
        return conv(cin, cout, k) + 2 * cout

    def att(cin, mid, cout):
        return cbr(cin, mid, 1) + cbr(mid, cout, 1)

    n = cbr(3, f[0]) + sum(cbr(f[i], f[i + 1]) for i in range(4))  # encoder_block
    n += cbr(f[0], f[0]) + sum(cbr(f[i + 1], f[i]) for i in range(4))  # decoder_block
    n += cbr(f[0], f[0]) + cbr(f[1], f[1]) + sum(2 * cbr(f[i], f[i]) for i in (2, 3, 4))  # conv_block_enc
    n += 2 * cbr(f[0], f[0]) + sum(2 * cbr(f[i], f[i]) for i in (1, 2, 3))  # conv_block_dec
    n += 2 * (att(f[0], f[0], f[0]) + sum(att(2 * f[i + 1], f[i + 1], f[i + 1]) for i in range(4)))  # encoder_att
    n += 2 * (att(2 * f[0], f[0], f[0]) + sum(att(f[i + 1] + f[i], f[i], f[i]) for i in range(4)))  # decoder_att
    n += cbr(f[0], f[1]) + sum(cbr(f[i + 1], f[i + 2]) for i in range(3)) + cbr(f[4], f[4])  # encoder_block_att
    n += cbr(f[0], f[0]) + sum(cbr(f[i + 1], f[i]) for i in range(3)) + cbr(f[4], f[4])  # decoder_block_att
    n += 2 * conv(f[0], f[0]) + conv(f[0], classes, 1) + conv(f[0], 1, 1)  # prediction heads
    return n


def test_parameter_counts_of_the_released_configuration():
    with torch.device("meta"):
        counts = {(c, v): count_parameters(VMSANet({"seg": 7, "depth": 1}, use_cacm=c, use_vmsm=v))
                  for c in (False, True) for v in (False, True)}
        vmsm_swap = sum(count_parameters(RefVMSM(a, b)) - (a * b * 9 + b + 2 * b)
                        for a, b in ((64, 128), (128, 256), (256, 512), (512, 512), (512, 512)))
    # published-by-count figures (papers notes §3.5) include the 3-element logsigma parameter
    assert counts[(False, False)] == _released_mtan_count(7) == 41_206_987 - 3
    assert counts[(True, False)] == 43_271_571 - 3
    assert counts[(True, False)] - counts[(False, False)] == 2_064_584  # the ten CACMs
    assert counts[(False, True)] - counts[(False, False)] == vmsm_swap
    assert counts[(True, True)] == counts[(True, False)] + vmsm_swap
    print("VMSANet parameters (7 classes + depth):", counts)


def _tiny(**kw):
    return VMSANet({"seg": 3, "cls": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))},
                   in_channels=1, filters=(4, 4, 8, 8, 8), **kw)


def test_ablation_flags_build_the_right_modules():
    for cacm in (False, True):
        for vmsm in (False, True):
            m = _tiny(use_cacm=cacm, use_vmsm=vmsm)
            assert (m.encoder_cacm is not None) == cacm and (m.decoder_cacm is not None) == cacm
            assert sum(isinstance(x, CACM) for x in m.modules()) == (10 if cacm else 0)
            assert sum(isinstance(x, VMSM) for x in m.modules()) == (5 if vmsm else 0)
            assert all(isinstance(b, VMSM if vmsm else ConvNormAct) for b in m.encoder_block_att)
            assert [c.channels for c in m.decoder_cacm or []] == ([8, 8, 4, 4, 4] if cacm else [])
    m = _tiny(use_cacm=False, use_vmsm=False)
    shared = {id(p) for p in m.shared_parameters()}
    assert all(id(p) not in shared for ps in m.task_parameters() for p in ps)
    trainable = [p for p in m.parameters() if p.requires_grad]  # conv biases absorbed by BN are frozen
    assert len(shared) + sum(len(ps) for ps in m.task_parameters()) == len(trainable)
    with pytest.raises(ValueError, match="multiples of 32"):
        m(torch.randn(1, 1, 40, 40))
    with pytest.raises(ValueError, match="tasks"):
        VMSANet({})
    with pytest.raises(ValueError, match="output channels"):
        VMSANet({"seg": 0})


def test_cross_task_hook():
    class Swap(nn.Module):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def forward(self, feats):
            self.shapes.append([tuple(f.shape) for f in feats])
            return list(reversed(feats))

    torch.manual_seed(0)
    plain = _tiny(use_cacm=False, use_vmsm=False)
    hook = Swap()
    hooked = _tiny(use_cacm=False, use_vmsm=False, cross_task=hook, cross_task_stage=2)
    hooked.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with use_backend("reference"):
        a, b = plain(x), hooked(x)
    assert hook.shapes == [[(2, VMSANet.decoder_channels(2, (4, 4, 8, 8, 8)), 8, 8)] * 2]
    assert a["seg"].shape == b["seg"].shape and not torch.allclose(a["seg"], b["seg"])
    with pytest.raises(ValueError, match="cross_task_stage"):
        _tiny(cross_task=hook, cross_task_stage=5)


def test_fused_and_reference_backends_agree():
    """Forward + backward of a small VMSANet with all modules, Triton (interpreter) vs reference."""
    torch.manual_seed(0)
    m = VMSANet({"seg": 3}, in_channels=1, filters=(2, 2, 4, 4, 4), use_cacm=True, use_vmsm=True,
                vmsm_fusion="intended", cacm_reduction=4)
    x = torch.randn(2, 1, 32, 32) + 0.2
    results = {}
    for backend in ("reference", "triton"):
        net = VMSANet({"seg": 3}, in_channels=1, filters=(2, 2, 4, 4, 4), vmsm_fusion="intended", cacm_reduction=4)
        net.load_state_dict(m.state_dict())
        with use_backend(backend):
            out = net(x)["seg"]
            out.pow(2).mean().backward()
        results[backend] = (out.detach(), [p.grad for p in net.parameters()], net.state_dict())
    (oa, ga, sa), (ob, gb, sb) = results["reference"], results["triton"]
    torch.testing.assert_close(oa, ob, atol=1e-4, rtol=1e-4)
    for u, v in zip(ga, gb):
        if u is None:
            assert v is None
            continue
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-3)
    for u, v in zip(sa.values(), sb.values()):
        torch.testing.assert_close(u.float(), v.float(), atol=1e-5, rtol=1e-4)


def test_residual_task_returns_input_minus_head_and_round_trips():
    """A residual (denoising) task outputs x − head(features): with the head's last conv zeroed the
    output is the input itself; the choice survives from_config; bad names and shapes are refused."""
    torch.manual_seed(0)
    net = VMSANet({"seg": 3, "denoise": 1}, 1, filters=(2, 4, 4, 8, 8), use_cacm=False, use_vmsm=False,
                  residual_tasks=["denoise"])
    last = net.heads["denoise"][-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    x = torch.rand(2, 1, 32, 32)
    out = net.eval()(x)
    assert torch.equal(out["denoise"], x) and out["seg"].shape == (2, 3, 32, 32)
    again = VMSANet.from_config(net.config)
    assert again.residual_tasks == ("denoise",) and net.config["residual_tasks"] == ["denoise"]
    assert "residual_tasks" not in VMSANet({"seg": 3}, 1, filters=(2, 4, 4, 8, 8)).config
    with pytest.raises(ValueError, match="residual_tasks names tasks"):
        VMSANet({"seg": 3}, 1, filters=(2, 4, 4, 8, 8), residual_tasks=["denoise"])
    with pytest.raises(ValueError, match="residual task 'seg'"):
        VMSANet({"seg": 3}, 1, filters=(2, 4, 4, 8, 8), residual_tasks=["seg"])(x)
