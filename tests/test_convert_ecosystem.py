"""Converted models under the tools people run on them (issue 14), the graph matcher, and the
activations added for conversion (ReLU6, Hardswish, Hardsigmoid, Sigmoid, Mish, ELU)."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fusedskip
from fusedskip import BatchNormAct2d, GroupNormAct, batch_norm_act, convert, group_norm_act, unconvert
from fusedskip.conversion import ecosystem, interop

NEW_ACTS = {"relu6": nn.ReLU6, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid,
            "mish": nn.Mish, "elu": lambda: nn.ELU(0.7)}


def _x(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * 3 + 0.5).requires_grad_()


# ============================================================================================
# New activations: kernels vs float64 torch references, gradcheck
# ============================================================================================
@pytest.mark.parametrize("act", sorted(NEW_ACTS))
def test_new_activation_kernels_match_float64_reference(act, triton_backend):
    module = NEW_ACTS[act]()
    name, slope = fusedskip.activations.resolve_activation(module)
    assert name == act
    x = _x((2, 4, 2, 3))
    w = torch.rand(4, dtype=torch.float64) + 0.5
    b = torch.randn(4, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    out = batch_norm_act(x, rm, rv, w * 3, b, True, 0.1, 1e-5, act, slope if act == "elu" else None)
    ref = module(F.batch_norm(x, torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64),
                              w * 3, b, True, 0.1, 1e-5))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    gn = group_norm_act(x, 2, w * 3, b, 1e-5, act, slope if act == "elu" else None)
    torch.testing.assert_close(gn, module(F.group_norm(x, 2, w * 3, b, 1e-5)), atol=1e-10, rtol=1e-9)
    gx, = torch.autograd.grad(out.sum() + gn.square().sum(), x)
    xr = x.detach().clone().requires_grad_()
    ref_b = module(F.batch_norm(xr, None, None, w * 3, b, True, 0.1, 1e-5))
    ref_g = module(F.group_norm(xr, 2, w * 3, b, 1e-5))
    gr, = torch.autograd.grad(ref_b.sum() + ref_g.square().sum(), xr)
    torch.testing.assert_close(gx, gr, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("act", sorted(NEW_ACTS))
def test_new_activation_gradcheck(act, triton_backend):
    slope = 0.7 if act == "elu" else None
    x = _x((2, 2, 1, 3), seed=1)
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: batch_norm_act(x, None, None, w, b, True, 0.1, 1e-5, act, slope),
                                    (x, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x, w, b: group_norm_act(x, 1, w, b, 1e-5, act, slope), (x, w, b),
                                    fast_mode=True)


@pytest.mark.parametrize("act", sorted(NEW_ACTS))
def test_new_activations_convert(act):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), NEW_ACTS[act]())
    original = copy.deepcopy(model)
    _, report = convert(model)
    assert report.norms_fused == 1 and type(model[1]) is BatchNormAct2d, str(report)
    x = torch.randn(2, 3, 5, 5)
    for mode in (True, False):
        model.train(mode)
        original.train(mode)
        torch.testing.assert_close(model(x), original(x), atol=2e-5, rtol=1e-4)
    unconvert(model)
    assert type(model[2]) is type(original[2]) and getattr(model[2], "alpha", None) == getattr(original[2], "alpha",
                                                                                                None)


# ============================================================================================
# The five failures after conversion (issue 14), as passing tests
# ============================================================================================
def test_compile_aot_eager_on_group_norm_channels_last():
    torch.manual_seed(0)
    block = lambda: [nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.SiLU()]  # noqa: E731
    model = nn.Sequential(*block(), *block())
    convert(model)
    x = torch.randn(2, 16, 6, 6).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


def _resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval()


def test_fx_symbolic_trace_sees_fused_modules_as_leaves():
    model = _resnet18()
    convert(model)
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"bn1", "relu", "layer1.0.bn1"} <= targets  # one node per fused module, FusedIdentity kept
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(traced(x), model(x))
    traced.train()  # the training flag is the module's, not baked into the graph
    model.train()
    torch.testing.assert_close(traced(x), model(x))
    from torchvision.models.feature_extraction import create_feature_extractor
    features = create_feature_extractor(model.eval(), ["relu", "layer1"])(x)
    assert features["relu"].shape == (2, 64, 32, 32) and features["relu"].min() >= 0


def test_torchscript_refusal_names_the_module_and_the_way_out():
    model = _resnet18()
    convert(model)
    match = r"BatchNormAct2d at 'bn1' cannot be compiled by torch.jit.script.*unconvert"
    with pytest.raises(RuntimeError, match=match):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(model)
    unconvert(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(model)  # the documented way out works


def test_quantization_fuse_modules_on_a_converted_model():
    model = _resnet18()
    expected = torch.ao.quantization.fuse_modules(copy.deepcopy(model), [["conv1", "bn1", "relu"]])
    convert(model)
    fused = torch.ao.quantization.fuse_modules(model, [["conv1", "bn1", "relu"]])
    assert type(fused.conv1).__name__ == "ConvReLU2d" and type(fused.bn1) is nn.Identity
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fused(x), expected(x))
    # Also through the explicit mapping, in a block without the global registration path.
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU()).eval()
    ref = copy.deepcopy(seq)
    convert(seq)
    q = torch.ao.quantization.fuse_modules(seq, [["0", "1", "2"]], fuse_custom_config_dict={
        "additional_fuser_method_mapping": ecosystem.quantization_fuser_mapping()})
    torch.testing.assert_close(q(torch.ones(1, 3, 5, 5)), ref(torch.ones(1, 3, 5, 5)))


def test_report_counts_timm_conv_norm_act_exactly():
    timm = pytest.importorskip("timm")
    model = timm.create_model("regnety_002", pretrained=False, num_classes=4)
    n_norms = sum(1 for m in model.modules() if type(m).__name__ == "BatchNormAct2d")
    _, report = convert(model)
    assert (report.norms_total, report.norms_fused, len(report.norms_left)) == (n_norms, n_norms, 0), str(report)
    assert f"coverage: {n_norms}/{n_norms} norm layers fused (100.0 %), 0 left" in str(report)


# ============================================================================================
# Graph-level matching: attribute- and functional-style blocks
# ============================================================================================
class AttrDoubleConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))  # one ReLU, twice


class OwnActs(AttrDoubleConv):
    def __init__(self, c):
        super().__init__(c)
        self.act2 = nn.LeakyReLU(0.2)

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class Functional(AttrDoubleConv):
    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return F.silu(self.bn2(self.conv2(x)))


class Residual(AttrDoubleConv):
    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class TrainingBranch(AttrDoubleConv):
    def forward(self, x):
        y = self.bn1(self.conv1(x))
        return self.relu(y) if self.training else y


class OptionalArg(AttrDoubleConv):
    def forward(self, x, extra=None):
        y = self.bn1(self.conv1(x))
        return self.relu(y if extra is None else y + extra)


def _check(model, x, fused_expected):
    original = copy.deepcopy(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    _, report = convert(model)
    assert report.norms_fused == fused_expected, str(report)
    assert report.norms_total == report.norms_fused + len(report.norms_left)
    assert list(model.state_dict()) == list(sd)
    for mode in (True, False):
        model.train(mode)
        original.train(mode)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = model(xa), original(xb)
        torch.testing.assert_close(ya, yb, atol=2e-5, rtol=1e-4)
        ga, = torch.autograd.grad(ya.square().sum(), xa)
        gb, = torch.autograd.grad(yb.square().sum(), xb)
        torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-4)
    for k, v in original.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)  # running stats moved identically
    return original, report


@pytest.mark.parametrize("cls", [AttrDoubleConv, OwnActs, Functional])
def test_graph_matcher_fuses_attribute_and_functional_blocks(cls):
    model = nn.Sequential(cls(4), cls(4))
    original, report = _check(model, torch.randn(2, 4, 5, 5), 4)
    assert {r.rule for r in report.replaced} == {"graph:norm-act"}
    assert all(type(b).__name__ == cls.__name__ and isinstance(b, cls) for b in model)
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 4, 5, 5)
    model.eval()
    clone.eval()
    torch.testing.assert_close(clone(x), model(x))
    unconvert(model)
    assert all(type(b) is cls for b in model) and all(type(m) is not BatchNormAct2d for m in model.modules())
    original.eval()
    torch.testing.assert_close(model(x), original(x))


class ResidualNoAct(AttrDoubleConv):
    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return x + self.bn2(self.conv2(y))  # the add's operands swapped; no activation after it


class ResidualDropout(AttrDoubleConv):
    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.relu(self.drop(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))) + x)


@pytest.mark.parametrize("cls", [Residual, ResidualNoAct])
def test_graph_matcher_fuses_the_residual_add(cls):
    model = nn.Sequential(cls(4))
    original, report = _check(model, torch.randn(2, 4, 5, 5), 2)
    assert "graph:norm-residual-act" in {r.rule for r in report.replaced} and "residual add" in str(report)
    assert "residual = " in type(model[0])._fusedskip_graph_source and not report.norms_left
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 4, 5, 5)
    for m in (clone, model, original):
        m.eval()
    torch.testing.assert_close(clone(x), original(x), atol=2e-5, rtol=1e-4)
    unconvert(model)
    assert type(model[0]) is cls and all(type(m) is not BatchNormAct2d for m in model.modules())
    torch.testing.assert_close(model(x), original(x))


@pytest.mark.parametrize("cls,reason", [(ResidualDropout, "dropout between the norm and the residual add"),
                                        (TrainingBranch, "differs between training"),
                                        (OptionalArg, "optional forward parameter")])
def test_graph_matcher_leaves_what_it_cannot_prove(cls, reason):
    model = nn.Sequential(cls(4))
    _, report = convert(model)
    assert any(reason in e.reason for e in report.norms_left), str(report)
    if cls is ResidualDropout:  # bn1 -> shared relu still fuses
        assert report.norms_fused == 1


def test_library_blocks_through_the_graph_matcher():
    pytest.importorskip("monai")
    from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
    basic = UnetBasicBlock(2, 4, 4, kernel_size=3, stride=1, norm_name="instance")
    _check(basic, torch.randn(2, 4, 6, 6), 2)
    for norm in ("batch", "instance"):  # norm2 takes the add and the LeakyReLU; norm3 (after conv3) alone
        res = UnetResBlock(2, 4, 6, kernel_size=3, stride=1, norm_name=norm)
        _, report = _check(res, torch.randn(2, 4, 6, 6), 3)
        assert not report.norms_left and "residual add" in str(report), str(report)
    pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock, Bottleneck
    _, report = _check(BasicBlock(4, 4), torch.randn(2, 4, 6, 6), 2)
    assert not report.norms_left and "residual add" in str(report), str(report)
    _check(Bottleneck(8, 2), torch.randn(2, 8, 6, 6), 3)


# ============================================================================================
# isinstance helpers, SyncBatchNorm routes, the unsynchronised warning
# ============================================================================================
def test_isinstance_helpers_see_fused_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4),
                          nn.SiLU())
    norm_before, other_before = ecosystem.split_normalization_params(model)
    convert(model)
    assert isinstance(model[1], ecosystem.BATCH_NORM_TYPES) and isinstance(model[4], ecosystem.GROUP_NORM_TYPES)
    norm_after, other_after = ecosystem.split_normalization_params(model)
    assert [id(p) for p in norm_after] == [id(p) for p in norm_before]
    assert [id(p) for p in other_after] == [id(p) for p in other_before]
    ecosystem.freeze_batch_norm(model.train())
    assert not model[1].training and not model[1].weight.requires_grad and model[4].weight.requires_grad


def test_sync_batchnorm_routes_on_a_converted_model(monkeypatch):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    model.add_module("head", nn.Sequential(nn.Flatten(), nn.BatchNorm1d(16)))
    convert(model)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # torch's converter keeps the activation (the fused module is no _BatchNorm) ...
    assert type(synced[1]) is BatchNormAct2d and synced[1].act_name == "relu"
    # ... and fusedskip's synchronises the fused ones: every BN of the model ends up synchronised.
    fusedskip.convert_sync_batchnorm(synced)
    assert synced[1].sync and synced[4].sync and type(synced.head[1]) is nn.SyncBatchNorm
    # Training unsynchronised under a world of size > 1 warns once.
    monkeypatch.setattr(interop, "_WARNED_UNSYNCED", False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    plain = BatchNormAct2d(4).train()
    with pytest.warns(RuntimeWarning, match="local batch statistics in a process group of world size 2"):
        plain(torch.randn(2, 4, 3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain(torch.randn(2, 4, 3, 3))  # once
        GroupNormAct(2, 4)(torch.randn(2, 4, 3, 3))


def test_forward_hook_sees_post_activation_output_and_exclude_keeps_the_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    convert(model)
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(o))
    model(torch.randn(1, 3, 5, 5))
    assert seen[0].min() >= 0  # documented: the fused norm's output is post-activation
    kept = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    _, report = convert(kept, exclude=["1"])
    assert type(kept[1]) is nn.BatchNorm2d and "excluded" in str(report)


# ============================================================================================
# smp's native EfficientNet (MBConvBlock, EfficientNetEncoder) and DeepLabV3's ASPP
# ============================================================================================
def _mbconv(expand: int, cin: int, cout: int, stride: int = 1):
    eff = pytest.importorskip("segmentation_models_pytorch.encoders._efficientnet")
    args = eff.BlockArgs(num_repeat=1, kernel_size=3, stride=stride, expand_ratio=expand, input_filters=cin,
                         output_filters=cout, se_ratio=0.25, id_skip=True)
    glob = eff.GlobalParams(batch_norm_momentum=0.99, batch_norm_epsilon=1e-3, image_size=None)
    torch.manual_seed(0)
    return eff.MBConvBlock(args, glob)


@pytest.mark.parametrize("expand,cin,cout,fused,residual", [(4, 4, 4, 3, True), (4, 4, 6, 3, False),
                                                            (1, 4, 4, 2, True)])
def test_smp_mbconv_block_rule_exact_for_every_drop_connect_rate(expand, cin, cout, fused, residual):
    block = _mbconv(expand, cin, cout)
    original = copy.deepcopy(block)
    _, report = convert(block)
    rules = [r.rule for r in report.replaced]
    assert report.norms_fused == fused and not report.norms_left, str(report)
    assert rules.count("smp:mbconv-conv-norm") == (not residual) and rules.count("smp:mbconv-norm-residual") == residual
    assert type(block).__name__ == "FusedMBConvBlock" and type(block._swish) is nn.SiLU  # shared: kept
    assert block._fusedskip_bn0_act == (expand != 1) and block._fusedskip_bn1_act
    assert block._fusedskip_bn2_residual == residual
    x = torch.randn(2, cin, 6, 6)
    for mode in (True, False):
        for rate in (None, 0.0, 0.5):  # drop_connect draws random numbers: same seed for both
            block.train(mode)
            original.train(mode)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            torch.manual_seed(7)
            ya = block(xa, rate)
            torch.manual_seed(7)
            yb = original(xb, drop_connect_rate=rate)
            torch.testing.assert_close(ya, yb, atol=2e-5, rtol=1e-4)
            ga, = torch.autograd.grad(ya.square().sum(), xa)
            gb, = torch.autograd.grad(yb.square().sum(), xb)
            torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-4)
    for k, v in original.state_dict().items():
        torch.testing.assert_close(block.state_dict()[k], v)  # running stats moved identically
    clone = pickle.loads(pickle.dumps(block))
    assert type(clone).__name__ == "FusedMBConvBlock" and clone._fusedskip_bn1_act
    unconvert(block)
    assert type(block) is type(original) and not [k for k in vars(block) if k.startswith("_fusedskip")]
    assert all(type(m) is not BatchNormAct2d for m in block.modules())


def test_smp_mbconv_block_with_a_hooked_norm_keeps_its_swish():
    block = _mbconv(4, 4, 4)
    block._bn0.register_forward_hook(lambda *a: None)
    original = copy.deepcopy(block)
    _, report = convert(block)
    assert report.norms_fused == 2 and "hooks" in str(report)  # _bn1 and _bn2 fused, _bn0 left
    assert not block._fusedskip_bn0_act and block._fusedskip_bn1_act
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(block(x, 0.0), original(x, 0.0), atol=2e-5, rtol=1e-4)


def test_smp_efficientnet_encoder_stem_and_head():
    smp_eff = pytest.importorskip("segmentation_models_pytorch.encoders.efficientnet")
    torch.manual_seed(0)
    params = smp_eff.efficient_net_encoders["efficientnet-b0"]["params"]
    encoder = smp_eff.EfficientNetEncoder(**params)
    original = copy.deepcopy(encoder)
    _, report = convert(encoder)
    counts = report.counts()
    assert counts["smp:efficientnet-encoder"] == 2 and counts["smp:mbconv-block"] == 31, str(report)
    assert counts["smp:mbconv-conv-norm"] == 7 and counts["smp:mbconv-norm-residual"] == 9, str(report)
    assert not report.norms_left
    assert type(encoder).__name__ == "FusedEfficientNetEncoder" and type(encoder._swish) is nn.SiLU
    x = torch.randn(2, 3, 32, 32)
    for mode in (True, False):  # drop connect is on in training (rate 0.2): same seed for both
        encoder.train(mode)
        original.train(mode)
        for method in ("forward", "extract_features"):
            torch.manual_seed(3)
            a = getattr(encoder, method)(x)
            torch.manual_seed(3)
            b = getattr(original, method)(x)
            for fa, fb in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                torch.testing.assert_close(fa, fb, atol=5e-5, rtol=1e-4)
    unconvert(encoder)
    assert type(encoder) is type(original) and type(encoder._blocks[1]) is type(original._blocks[1])


def test_smp_aspp_with_its_pooling_branch_is_fused():
    deeplab = pytest.importorskip("segmentation_models_pytorch.decoders.deeplabv3.decoder")
    torch.manual_seed(0)
    aspp = deeplab.ASPP(4, 4, (1, 2, 3), separable=False, dropout=0.5)
    pool = aspp.convs[4]
    assert type(pool) is deeplab.ASPPPooling
    # AdaptiveAvgPool -> Conv -> BN (on 1x1 maps) -> ReLU, then bilinear upsampling in its own forward
    _, report = _check(nn.Sequential(copy.deepcopy(pool)), torch.randn(3, 4, 6, 6), 1)
    assert {r.rule for r in report.replaced} == {"graph:norm-act"}
    aspp.project[3].p = 0.0  # the dropout after the project's ReLU: deterministic for the comparison
    _, report = _check(aspp, torch.randn(3, 4, 6, 6), 6)
    assert report.norms_left == []


def test_diffusers_transformer_2d_input_group_norm_is_left_with_its_reason():
    transformer_2d = pytest.importorskip("diffusers.models.transformers.transformer_2d")
    torch.manual_seed(0)
    model = transformer_2d.Transformer2DModel(num_attention_heads=1, attention_head_dim=8, in_channels=8,
                                              norm_num_groups=2)
    original = copy.deepcopy(model)
    _, report = convert(model)
    left = {e.path: e.reason for e in report.norms_left}
    assert "no activation follows" in left["norm"] and "saves nothing" in left["norm"], str(report)
    assert type(model.norm) is nn.GroupNorm
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(model(x).sample, original(x).sample)


class _TwoMethods(nn.Module):
    """forward fuses cleanly, but extract_features reads the same norm / activation on its own."""

    def __init__(self, uses: str):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.uses = uses

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def extract_features(self, x):
        if self.uses == "norm":
            return self.bn(self.conv(x))        # no activation: a fused norm would add one
        return self.act(self.conv(x))           # the activation alone: FusedIdentity would drop it


@pytest.mark.parametrize("uses", ["norm", "act"])
def test_graph_matcher_leaves_chains_other_methods_use(uses):
    """Fusing a norm -> act pair must not change any other method of the block."""
    model = _TwoMethods(uses).eval()
    x = torch.randn(2, 4, 5, 5)
    before = (model(x), model.extract_features(x))
    converted, report = convert(copy.deepcopy(model))
    assert not any(isinstance(m, (BatchNormAct2d,)) for m in converted.modules())
    assert "also used by _TwoMethods.extract_features" in str(report)
    torch.testing.assert_close(converted(x), before[0])
    torch.testing.assert_close(converted.extract_features(x), before[1])


# ============================================================================================
# Residual operands eager's add would broadcast or promote; PReLU slopes kept in their slots
# ============================================================================================
class BroadcastResidual(AttrDoubleConv):
    def __init__(self, c):
        super().__init__(c)
        self.offset = nn.Parameter(torch.randn(1, c, 1, 1))

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + self.offset)


def test_graph_residual_that_broadcasts_keeps_eager_semantics():
    model = nn.Sequential(BroadcastResidual(4))
    original, report = _check(model, torch.randn(2, 4, 5, 5), 2)
    assert "graph:norm-residual-act" in {r.rule for r in report.replaced}
    x = torch.randn(2, 4, 5, 5)
    for m in (model, original):
        m.train()
        m(x).square().sum().backward()
    torch.testing.assert_close(model[0].offset.grad, original[0].offset.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", [lambda: BatchNormAct2d(4), lambda: GroupNormAct(2, 4, act="silu")])
def test_fused_module_residual_broadcasts_and_promotes_like_eager(cls):
    m = cls()
    x = torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)
    for residual in (torch.randn(1, 4, 1, 1), torch.randn(2, 4, 3, 3, dtype=torch.float64)):
        y = m(x, residual=residual)
        dt = residual.dtype
        w, b = m.weight.detach().to(dt), m.bias.detach().to(dt)
        plain = (F.batch_norm(x.to(dt), None, None, w, b, True) if isinstance(m, BatchNormAct2d) else
                 F.group_norm(x.to(dt), 2, w, b))
        ref = (torch.relu if isinstance(m, BatchNormAct2d) else F.silu)(plain + residual)
        assert y.dtype == (x + residual).dtype
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="residual must broadcast"):
        m(x, residual=torch.randn(2, 4, 3, 4))


def test_prelu_slope_survives_skip_norm_act_and_fold_bn():
    skip_norm = fusedskip.SkipNormAct(4, norm="group", num_groups=2, act=nn.PReLU(4))
    up, skip = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    y = skip_norm(up, skip)
    ref = F.prelu(F.group_norm(up + skip_norm.gate() * skip, 2, skip_norm.norm.weight, skip_norm.norm.bias),
                  skip_norm.norm.act_weight)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    cna = fusedskip.ConvNormAct(3, 4, 3, padding=1, norm="batch", act="prelu").eval()
    with torch.no_grad():
        cna.norm.act_weight.fill_(0.3)
    slope = cna.norm.act_weight
    x = torch.randn(2, 3, 5, 5)
    before = cna(x)
    cna.fold_bn()
    assert type(cna.norm) is nn.PReLU and cna.norm.weight is slope
    torch.testing.assert_close(cna(x), before, atol=1e-5, rtol=1e-5)
