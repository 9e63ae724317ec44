"""AddUNet: shapes of every variant, config round trip, gates and overrides, parameter split,
input checks, and a whole small model forward + backward on the Triton kernels vs the reference."""
import copy

import pytest
import torch

import fusedskip
from fusedskip.models import AddUNet, ConcatUNet, build_model, pad_to_multiple
from fusedskip.ops.conv_norm_act import ConvNormAct
from fusedskip.ops.gated_skip import GatedSkip

VARIANTS = [
    dict(),
    dict(num_classes=10),
    dict(num_classes=10, residual=True),
    dict(num_classes=3, classifier_hidden=16, kernel_size=[3, 5, 3]),
    dict(variant="hierarchical", num_classes=10),
    dict(variant="hierarchical", down="conv", up="transpose", norm="group", num_groups=4),
    dict(variant="hierarchical", down="avgpool", up="nearest", max_width=16, residual=True),
    dict(fusion="gated_norm_act", norm="group", num_groups=4, num_classes=4),
    dict(fusion="gated_norm_act", norm="batch", variant="hierarchical"),
    dict(fusion="concat", num_classes=10),
    dict(fusion="concat", variant="hierarchical"),
    dict(norm="instance", act="silu", last_act=False, stem_act=None, gate="softplus_channel"),
    dict(norm=None, act="leaky_relu", negative_slope=0.1, gate="sigmoid_channel", encoder_update="plain"),
    dict(gate=0.5, in_channels=3),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "paper")
def test_shapes_and_config_round_trip(kw):
    kw = dict(kw)
    c = kw.pop("in_channels", 1)
    model = AddUNet(in_channels=c, width=8, depth=3, **kw)
    x = torch.randn(2, c, 16, 16)
    out, logits = model(x)
    assert out.shape == x.shape
    if kw.get("num_classes"):
        assert logits.shape == (2, kw["num_classes"])
    else:
        assert logits is None and model.classifier is None
    out.mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters()
               if p.requires_grad and not n.startswith("classifier")), "a parameter got no gradient"
    # rebuild from the JSON-able config: same keys and shapes, loads strictly
    rebuilt = build_model(model.config)
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict())
    assert list(rebuilt.state_dict()) == list(model.state_dict())


def test_paper_form_structure():
    model = AddUNet(width=8, depth=4, num_classes=10)
    assert model.widths == [8] * 4 and model.size_multiple == 1 and model.encoder_update == "subtract"
    assert model.downs is None and model.ups is None and model.mid is None
    assert all(isinstance(f, GatedSkip) for f in model.fuses)
    assert model.head.kernel_size == (1, 1)
    # conv-BN-ReLU ×2 blocks built from fusedskip ConvNormAct
    assert len(model.encoders[0]) == 2 and isinstance(model.encoders[0][0], ConvNormAct)
    # any spatial size works (no resampling)
    out, logits = model(torch.randn(1, 1, 7, 13))
    assert out.shape == (1, 1, 7, 13) and logits.shape == (1, 10)


def test_paper_form_equations():
    """x_{i+1} = x_i − r_i; u_{j+1} = Dec_j(u_j + a_j r_{L−j}); logits from GAP(x_{L+1})."""
    model = AddUNet(width=8, depth=3, num_classes=5, norm=None).eval()
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        h = model.stem(x)
        rs = []
        for enc in model.encoders:
            r = enc(h)
            rs.append(r)
            h = h - r
        u = h
        gates = model.gates()
        for j in range(3):
            u = model.decoders[j](u + gates[2 - j] * rs[2 - j])
        expected = model.head(u)
        expected_logits = model.classifier[-1](h.mean((2, 3)))
        out, logits = model(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(logits, expected_logits)
    with torch.no_grad():
        res_model = AddUNet(width=8, depth=3, norm=None, residual=True)
        res_model.load_state_dict(model.state_dict(), strict=False)
        res_model.eval()
        torch.testing.assert_close(res_model(x)[0], x - res_model.decode(*res_model.encode(x)))


def test_hierarchical_shapes_and_padding():
    model = AddUNet(width=4, depth=3, variant="hierarchical", num_classes=2)
    assert model.widths == [4, 8, 16] and model.size_multiple == 8
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 1, 12, 16))
    x = torch.randn(1, 1, 12, 20)
    padded, (h, w) = pad_to_multiple(x, 8)
    assert padded.shape[-2:] == (16, 24) and (h, w) == (12, 20)
    torch.testing.assert_close(padded[..., :12, :20], x)
    with pytest.raises(ValueError, match="encoder_update"):
        AddUNet(variant="hierarchical", encoder_update="subtract")


def test_concat_baseline_same_depth_and_width():
    add = AddUNet(width=8, depth=3, num_classes=10)
    cat = ConcatUNet(width=8, depth=3, num_classes=10)
    assert cat.widths == add.widths and cat.depth == add.depth and cat.config["name"] == "concat-unet"
    assert cat.decoders[0][0].conv.in_channels == 16 and add.decoders[0][0].conv.in_channels == 8
    assert cat.gates() == [None, None, None]
    with pytest.raises(ValueError, match="not gated"):
        with cat.eval().override_gates(value=0.0):
            pass
    assert build_model(cat.config).fusion == "concat"
    with pytest.raises(ValueError):
        ConcatUNet(fusion="gated")


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        AddUNet(variant="flat")
    with pytest.raises(ValueError, match="fusion"):
        AddUNet(fusion="multiply")
    with pytest.raises(ValueError, match="num_classes"):
        AddUNet(num_classes=1)
    with pytest.raises(ValueError, match="kernel_size"):
        AddUNet(depth=3, kernel_size=[3, 3])
    with pytest.raises(ValueError, match="odd"):
        AddUNet(kernel_size=4)
    with pytest.raises(ValueError, match="unknown model options"):
        build_model({"name": "addunet", "widht": 3})
    with pytest.raises(ValueError, match="unknown model"):
        build_model({"name": "resnet"})
    with pytest.raises(ValueError, match="model expects 3"):
        AddUNet(in_channels=3, width=4, depth=1)(torch.randn(1, 1, 8, 8))


def test_gates_read_override_and_scale():
    model = AddUNet(width=8, depth=3, gate_init=0.7, num_classes=4).eval()
    assert model.gates() == pytest.approx([0.7] * 3, rel=1e-5)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        base, logits = model(x)
        with model.override_gates(value=[0.0, None, 2.0]):
            assert model.gates() == pytest.approx([0.0, 0.7, 2.0], rel=1e-5)
            assert model.gates(learned=True) == pytest.approx([0.7] * 3, rel=1e-5)
            zeroed, logits2 = model(x)
        with model.override_gates(scale=2.0):
            assert model.gates() == pytest.approx([1.4] * 3, rel=1e-5)
        assert model.gates() == pytest.approx([0.7] * 3, rel=1e-5)  # restored
        again, _ = model(x)
    assert not torch.allclose(base, zeroed)
    torch.testing.assert_close(base, again)
    torch.testing.assert_close(logits, logits2)  # the classifier sees the encoder only
    # skip 1 (shallowest) is the last decoder step's
    assert model.gate_modules()[0] is model.fuses[-1]
    with pytest.raises(ValueError, match="one entry per skip"):
        with model.override_gates(value=[1.0, 2.0]):
            pass
    with pytest.raises(ValueError, match="exactly one"):
        with model.override_gates():
            pass
    model.train()
    with pytest.raises(RuntimeError, match="inference"):
        with model.override_gates(value=0.0):
            model(x)


def test_gates_learn_and_per_channel_gates():
    model = AddUNet(width=8, depth=2, gate="softplus_channel")
    assert len(model.gates()[0]) == 8
    out, _ = model(torch.randn(2, 1, 8, 8))
    out.pow(2).mean().backward()
    for g in model.gate_modules():
        assert g.beta.grad is not None and torch.isfinite(g.beta.grad).all() and g.beta.grad.abs().sum() > 0


def test_shared_and_task_parameters_partition():
    for kw in (dict(num_classes=10), dict(num_classes=10, variant="hierarchical"), dict()):
        model = AddUNet(width=8, depth=3, **kw)
        shared = {id(p) for p in model.shared_parameters()}
        tasks = model.task_parameters()
        assert set(tasks) == ({"denoise", "classify"} if kw else {"denoise"})
        ids = [id(p) for ps in tasks.values() for p in ps]
        assert len(ids) == len(set(ids)) and not (set(ids) & shared)
        assert shared | set(ids) == {id(p) for p in model.parameters()}
        gate_ids = {id(g.beta) for g in model.gate_modules()}
        assert gate_ids <= {id(p) for p in tasks["denoise"]}
        assert {id(p) for p in model.encoders.parameters()} <= shared


@pytest.mark.parametrize("kw", [dict(norm="batch"), dict(fusion="gated_norm_act", fusion_norm="group", num_groups=4,
                                                          variant="hierarchical")],
                         ids=["paper-batchnorm", "hierarchical-skipnormact-group"])
def test_whole_model_triton_matches_reference(kw, triton_backend):
    """A tiny AddUNet forward + backward with every fusedskip op on the Triton kernels (interpreted
    on the CPU) equals the reference path: outputs, logits, every parameter gradient, BN stats."""
    torch.manual_seed(0)
    model = AddUNet(width=8, depth=2, num_classes=3, **kw)
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([0, 2])

    def run(m):
        out, logits = m(x)
        loss = out.pow(2).mean() + torch.nn.functional.cross_entropy(logits, labels)
        loss.backward()
        return out.detach(), logits.detach()

    out, logits = run(model)  # the fixture selected the Triton backend
    with fusedskip.use_backend("reference"):
        ref_out, ref_logits = run(ref_model)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=2e-4, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(model.named_buffers(), ref_model.buffers()):
        torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    # eval mode (running statistics) too, with a gate override
    model.eval()
    ref_model.eval()
    with torch.no_grad(), model.override_gates(scale=0.5), ref_model.override_gates(scale=0.5):
        out = model(x)[0]
        with fusedskip.use_backend("reference"):
            ref = ref_model(x)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # identical parameters and state_dict keys whichever backend ran
    assert list(model.state_dict()) == list(ref_model.state_dict())
