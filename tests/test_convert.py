"""fusedskip.convert / unconvert: fused modules swapped into existing U-Nets.

Every library model is built offline (no pretrained weights) at its smallest configuration,
converted, and compared with an untouched copy of itself: outputs, input and parameter
gradients and running statistics, in train and eval mode, on the reference path (one small
model also on the Triton kernels under the interpreter, one under torch.compile). State dicts
must load both ways; the report must say what was replaced and why the rest was left.
Libraries that cannot be imported are skipped with the reason.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fusedskip
from fusedskip.conversion import ConversionReport, FusedIdentity, convert, unconvert
from fusedskip.conversion import libraries as conv_libraries
from fusedskip.ops.batch_norm_act import BatchNormAct2d
from fusedskip.ops.group_norm_act import GroupNormAct


# ============================================================================================
# Faithful copies of two U-Net-family models users train (structure and constructor logic as
# in the original repositories; only the base width of milesial's UNet is a parameter here).
# ============================================================================================
class DoubleConv(nn.Module):
    """milesial/Pytorch-UNet unet_parts.DoubleConv: (convolution => [BN] => ReLU) * 2"""

    def __init__(self, in_channels, out_channels, mid_channels=None):
        super().__init__()
        if not mid_channels:
            mid_channels = out_channels
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)
        )

    def forward(self, x):
        return self.double_conv(x)


class Down(nn.Module):
    """milesial: Downscaling with maxpool then double conv"""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(2),
            DoubleConv(in_channels, out_channels)
        )

    def forward(self, x):
        return self.maxpool_conv(x)


class Up(nn.Module):
    """milesial: Upscaling then double conv"""

    def __init__(self, in_channels, out_channels, bilinear=True):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        diffY = x2.size()[2] - x1.size()[2]
        diffX = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [diffX // 2, diffX - diffX // 2, diffY // 2, diffY - diffY // 2])
        x = torch.cat([x2, x1], dim=1)
        return self.conv(x)


class OutConv(nn.Module):
    def __init__(self, in_channels, out_channels):
        super(OutConv, self).__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.conv(x)


class MilesialUNet(nn.Module):
    """milesial unet_model.UNet (widths 64..1024 when ``width=64``, the original)."""

    def __init__(self, n_channels, n_classes, bilinear=False, width=64):
        super(MilesialUNet, self).__init__()
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear
        w = width
        self.inc = (DoubleConv(n_channels, w))
        self.down1 = (Down(w, 2 * w))
        self.down2 = (Down(2 * w, 4 * w))
        self.down3 = (Down(4 * w, 8 * w))
        factor = 2 if bilinear else 1
        self.down4 = (Down(8 * w, 16 * w // factor))
        self.up1 = (Up(16 * w, 8 * w // factor, bilinear))
        self.up2 = (Up(8 * w, 4 * w // factor, bilinear))
        self.up3 = (Up(4 * w, 2 * w // factor, bilinear))
        self.up4 = (Up(2 * w, w, bilinear))
        self.outc = (OutConv(w, n_classes))

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        logits = self.outc(x)
        return logits


def kair_sequential(*args):
    """KAIR models/basicblock.sequential: flatten nested Sequentials into one."""
    if len(args) == 1:
        return args[0]
    modules = []
    for module in args:
        if isinstance(module, nn.Sequential):
            for submodule in module.children():
                modules.append(submodule)
        elif isinstance(module, nn.Module):
            modules.append(module)
    return nn.Sequential(*modules)


def kair_conv(in_channels=64, out_channels=64, kernel_size=3, stride=1, padding=1, bias=True, mode='CBR',
              negative_slope=0.2):
    """KAIR basicblock.conv for the letters DnCNN uses (C, B, I, R, r, L, l)."""
    L = []
    for t in mode:
        if t == 'C':
            L.append(nn.Conv2d(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size,
                               stride=stride, padding=padding, bias=bias))
        elif t == 'B':
            L.append(nn.BatchNorm2d(out_channels, momentum=0.9, eps=1e-04))
        elif t == 'I':
            L.append(nn.InstanceNorm2d(out_channels, affine=True))
        elif t == 'R':
            L.append(nn.ReLU(inplace=True))
        elif t == 'r':
            L.append(nn.ReLU(inplace=False))
        elif t == 'L':
            L.append(nn.LeakyReLU(negative_slope=negative_slope, inplace=True))
        elif t == 'l':
            L.append(nn.LeakyReLU(negative_slope=negative_slope, inplace=False))
        else:
            raise NotImplementedError('Undefined type: {}'.format(t))
    return kair_sequential(*L)


class DnCNN(nn.Module):
    """KAIR models/network_dncnn.DnCNN: head 'C'+act, (nb-2) x 'C'+act_mode, tail 'C', flattened."""

    def __init__(self, in_nc=1, out_nc=1, nc=64, nb=17, act_mode='BR'):
        super(DnCNN, self).__init__()
        assert 'R' in act_mode or 'L' in act_mode, 'Examples of activation function: R, L, BR, BL, IR, IL'
        bias = True
        m_head = kair_conv(in_nc, nc, mode='C' + act_mode[-1], bias=bias)
        m_body = [kair_conv(nc, nc, mode='C' + act_mode, bias=bias) for _ in range(nb - 2)]
        m_tail = kair_conv(nc, out_nc, mode='C', bias=bias)
        self.model = kair_sequential(m_head, *m_body, m_tail)

    def forward(self, x):
        n = self.model(x)
        return x - n


# ============================================================================================
# Comparison helpers
# ============================================================================================
def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample  # diffusers UNet2DOutput


def _run(model, inputs, seed=1234):
    """One forward + backward with a fixed seed and a fixed upstream gradient (names without
    torch.compile's ``_orig_mod.`` prefix)."""
    model.zero_grad(set_to_none=True)
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
          for x in inputs]
    torch.manual_seed(seed)
    out = _output(model(*xs))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=out.dtype)
    out.backward(grad)
    model = getattr(model, "_orig_mod", model)
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    input_grads = [x.grad for x in xs if isinstance(x, torch.Tensor) and x.is_floating_point()]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), input_grads, grads, buffers


def _close(a, b, what, atol=2e-5, rtol=1e-4):
    if a.shape == b.shape and a.dtype == b.dtype and (torch.equal(a, b) or (
            a.is_floating_point() and torch.allclose(a, b, atol=atol, rtol=rtol))):
        return  # fast path; assert_close below explains a failure
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_same_behaviour(original, converted, inputs, modes=(True, False), atol=2e-5):
    """Outputs, gradients (inputs and parameters, by name) and buffers agree, train and eval."""
    for training in modes:
        original.train(training)
        converted.train(training)
        o_out, o_ig, o_g, o_b = _run(original, inputs)
        c_out, c_ig, c_g, c_b = _run(converted, inputs)
        tag = "train" if training else "eval"
        _close(c_out, o_out, f"{tag} output", atol=atol)
        for i, (a, b) in enumerate(zip(c_ig, o_ig)):
            _close(a, b, f"{tag} input grad {i}", atol=atol * 10)
        assert o_g.keys() == c_g.keys()
        for name in o_g:
            assert (o_g[name] is None) == (c_g[name] is None), name
            if o_g[name] is not None:
                _close(c_g[name], o_g[name], f"{tag} grad {name}", atol=atol * 10, rtol=1e-3)
        assert o_b.keys() == c_b.keys()
        for name in o_b:
            _close(c_b[name], o_b[name], f"{tag} buffer {name}", atol=atol)


def convert_copy(model, **kwargs):
    """Convert a deep copy (the original stays as the reference); check state is unchanged."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted, report = convert(copy.deepcopy(model), **kwargs)
    after = converted.state_dict()
    assert list(after) == list(before), "convert changed the state_dict keys"
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert isinstance(report, ConversionReport)
    return converted, report


def assert_state_dicts_cross_load(original, converted):
    """original -> converted and converted -> original, strict, values identical."""
    fresh_converted = copy.deepcopy(converted)
    fresh_original = copy.deepcopy(original)
    with torch.no_grad():
        for p in fresh_converted.parameters():
            p.add_(1.0)
    for source, target in ((original, fresh_converted), (converted, fresh_original)):
        state = source.state_dict()
        target.load_state_dict(state, strict=True)
        loaded = target.state_dict()
        assert list(loaded) == list(state)
        for k, v in state.items():
            assert torch.equal(loaded[k], v), k


def fused_types(model):
    return sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("fusedskip.")})


def left_reasons(report, module=None):
    return [entry.reason for entry in report.left if module is None or entry.module == module]


def need(name):
    return pytest.importorskip(name, reason=f"{name} is not installed")


# The block classes whose forward the library rules check (fusedskip.conversion.libraries.KNOWN).
RULE_CLASSES = {
    "torchvision.BasicBlock": ("torchvision.models.resnet", "BasicBlock"),
    "torchvision.Bottleneck": ("torchvision.models.resnet", "Bottleneck"),
    "torchvision.ResNet": ("torchvision.models.resnet", "ResNet"),
    "smp.ResNetEncoder": ("segmentation_models_pytorch.encoders.resnet", "ResNetEncoder"),
    "diffusers.ResnetBlock2D": ("diffusers.models.resnet", "ResnetBlock2D"),
    "diffusers.UNet2DModel": ("diffusers.models.unets.unet_2d", "UNet2DModel"),
    "monai.UpCat": ("monai.networks.nets.basic_unet", "UpCat"),
}


def verified(*keys):
    """Whether the installed libraries' block forwards are the versions the rules were written
    against. Elsewhere convert leaves those blocks with the reason; the tests then check that
    instead of the counts (the rest of the model is still converted and compared)."""
    from fusedskip.conversion.core import source_digest

    for key in keys:
        module, name = RULE_CLASSES[key]
        cls = getattr(importlib.import_module(module), name)
        for method, digests in conv_libraries.KNOWN[key].items():
            if source_digest(getattr(cls, method)) not in digests:
                return False
    return True


def expect_counts(report, expected, *keys):
    """``report.counts() == expected`` on the verified library versions; on others, the block
    rules must have refused with the version reason."""
    if verified(*keys):
        assert report.counts() == expected, str(report)
        return True
    assert any("not the version fusedskip verified" in r for r in left_reasons(report)), str(report)
    return False


# ============================================================================================
# Generic Sequential patterns
# ============================================================================================
NORMS = {
    "batch": lambda c: nn.BatchNorm2d(c),
    "group": lambda c: nn.GroupNorm(2, c),
    "instance": lambda c: nn.InstanceNorm2d(c, affine=True),
}
ACTS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "silu": lambda: nn.SiLU(),
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


@pytest.mark.parametrize("norm,act", [("batch", "relu"), ("batch", "silu"), ("batch", "gelu"),
                                      ("group", "silu"), ("group", "gelu_tanh"), ("group", "relu"),
                                      ("instance", "leaky_relu"), ("instance", "gelu")])
def test_sequential_conv_norm_act(norm, act):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), NORMS[norm](8), ACTS[act](),
                          nn.Conv2d(8, 4, 1))
    converted, report = convert_copy(model)
    assert [r.rule for r in report.replaced] == ["sequential:conv-norm-act"]
    assert report.replaced[0].path == "1" and "2 -> FusedIdentity" in report.replaced[0].also[0]
    assert isinstance(converted[2], FusedIdentity) and type(converted[0]) is nn.Conv2d
    assert converted[1].weight is converted[1].weight and converted[1].weight.shape == (8,)
    assert_same_behaviour(model, converted, [torch.randn(2, 3, 6, 6)])


@pytest.mark.parametrize("norm", sorted(NORMS))
def test_sequential_norm_first_and_norm_without_act(norm):
    # norm-first (pre-activation) block; the conv after the act shows the input is 4-D
    model = nn.Sequential(NORMS[norm](4), nn.SiLU(), nn.Conv2d(4, 8, 3, padding=1),
                          NORMS[norm](8), nn.Conv2d(8, 8, 1))
    converted, report = convert_copy(model)
    assert [r.rule for r in report.replaced] == ["sequential:norm-act", "sequential:conv-norm"]
    assert_same_behaviour(model, converted, [torch.randn(2, 4, 5, 5)])
    _, report = convert_copy(model, norm_without_act=False)
    assert [r.rule for r in report.replaced] == ["sequential:norm-act"]
    assert any("no activation follows" in r for r in left_reasons(report))


def test_torchvision_conv2d_norm_activation():
    need("torchvision")
    from torchvision.ops import Conv2dNormActivation

    model = nn.Sequential(Conv2dNormActivation(3, 8), Conv2dNormActivation(8, 8, activation_layer=nn.SiLU),
                          Conv2dNormActivation(8, 8, norm_layer=None),
                          Conv2dNormActivation(8, 4, activation_layer=None))
    converted, report = convert_copy(model)
    assert report.counts() == {"sequential:conv-norm-act": 2, "sequential:conv-norm": 1}
    assert type(converted[0]) is Conv2dNormActivation  # containers are kept, their slots change
    assert_same_behaviour(model, converted, [torch.randn(2, 3, 6, 6)])


def test_dropout_between_norm_and_act():
    # ReLU commutes with (inverted) dropout, SiLU does not; p = 0 is always fine
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Dropout(0.3), nn.ReLU(),
                          nn.Conv2d(6, 6, 1), nn.GroupNorm(3, 6), nn.Dropout2d(0.0), nn.SiLU(),
                          nn.Conv2d(6, 6, 1), nn.GroupNorm(3, 6), nn.Dropout(0.5), nn.SiLU())
    converted, report = convert_copy(model)
    assert [r.path for r in report.replaced] == ["1", "5"]
    assert any("Dropout(p=0.5) between the norm and silu" in r for r in left_reasons(report))
    assert type(converted[9]) is nn.GroupNorm and type(converted[11]) is nn.SiLU
    assert_same_behaviour(model, converted, [torch.randn(2, 3, 7, 7)])


# ============================================================================================
# Left alone, with the reason
# ============================================================================================
class BFBatchNorm2d(nn.BatchNorm2d):
    """deepinv-style bias-free BatchNorm: a subclass whose maths differ."""

    def forward(self, x):
        return x / (x.var(dim=(0, 2, 3), keepdim=True) + self.eps).sqrt()


class ResidualBlock(nn.Module):
    """Attribute order != execution order, one ReLU used twice (like torchvision's BasicBlock)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.relu(x + self.conv2(self.relu(self.bn1(self.conv1(x)))))


class DataDependentBlock(ResidualBlock):
    """Control flow on tensor values: torch.fx cannot trace it, and no rule covers it."""

    def forward(self, x):
        if x.sum() > 0:
            return self.relu(self.bn1(self.conv1(x)))
        return self.conv2(x)


def _unsafe_cases():
    shared_act = nn.ReLU()
    shared_norm = nn.BatchNorm2d(4)
    hooked_norm = nn.BatchNorm2d(4)
    hooked_norm.register_forward_hook(lambda m, i, o: None)
    hooked_act = nn.ReLU()
    hooked_act.register_forward_pre_hook(lambda m, i: None)
    patched = nn.BatchNorm2d(4)
    patched.forward = lambda x: x
    parametrized = nn.BatchNorm2d(4)
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", nn.Identity())
    conv = lambda: nn.Conv2d(4, 4, 3, padding=1)  # noqa: E731
    return {
        "hook on the norm": (nn.Sequential(conv(), hooked_norm, nn.ReLU()), "hooks registered"),
        "hook on the activation": (nn.Sequential(conv(), nn.BatchNorm2d(4), hooked_act), "hooks registered"),
        "one ReLU in two slots": (nn.Sequential(conv(), nn.BatchNorm2d(4), shared_act, conv(), nn.BatchNorm2d(4),
                                                shared_act), "held in 2 places"),
        "one BatchNorm in two slots": (nn.Sequential(conv(), shared_norm, nn.ReLU(), conv(), shared_norm,
                                                     nn.ReLU()), "held in 2 places"),
        "act before norm": (nn.Sequential(conv(), nn.ReLU(), nn.BatchNorm2d(4)), "no activation follows"),
        "BatchNorm subclass": (nn.Sequential(conv(), BFBatchNorm2d(4), nn.ReLU()), "subclasses nn.BatchNorm2d"),
        "bias-free norm": (nn.Sequential(conv(), nn.BatchNorm2d(4, bias=False), nn.ReLU()), "bias-free"),
        "PReLU with a slope count that fits no channel count": (nn.Sequential(conv(), nn.BatchNorm2d(4),
                                                                              nn.PReLU(3)), "PReLU with 3 slopes"),
        "Tanh": (nn.Sequential(conv(), nn.BatchNorm2d(4), nn.Tanh()), "Tanh has no fused kernel"),
        "LayerNorm": (nn.Sequential(conv(), nn.LayerNorm(5), nn.ReLU()), "LayerNorm"),
        "3-D norm": (nn.Sequential(nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4), nn.ReLU()), "not a 2-D norm"),
        "InstanceNorm with running stats": (nn.Sequential(conv(), nn.InstanceNorm2d(4, track_running_stats=True),
                                                          nn.ReLU()), "track_running_stats=True"),
        "GroupNorm of unknown rank": (nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU()), "assume_2d=True"),
        "instance-level forward": (nn.Sequential(conv(), patched, nn.ReLU()), "instance-level forward"),
        "parametrized norm": (nn.Sequential(conv(), parametrized, nn.ReLU()), "parametrized"),
        "untraceable non-Sequential block": (nn.Sequential(DataDependentBlock(4)), "cannot be traced by torch.fx"),
    }


@pytest.mark.parametrize("case", sorted(_unsafe_cases()))
def test_unsafe_patterns_are_left_with_the_reason(case):
    model, reason = _unsafe_cases()[case]
    modules_before = [(n, m) for n, m in model.named_modules()]
    converted, report = convert(model)
    assert converted is model and not report.changed, str(report)
    assert [(n, m) for n, m in model.named_modules()] == modules_before  # same objects, same places
    assert any(reason in r for r in left_reasons(report)), str(report)
    assert "nothing to convert" in str(report)


def test_assume_2d_lets_group_norm_without_conv_fuse():
    model = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU())
    converted, report = convert_copy(model, assume_2d=True)
    assert report.counts() == {"sequential:norm-act": 1}
    assert_same_behaviour(model, converted, [torch.randn(2, 4, 3, 3)])


def test_options_select_and_exclude():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4), nn.GELU()))
    _, report = convert_copy(model, norms=("group",))
    assert [r.path for r in report.replaced] == ["3.1"]
    assert any("batch norms are not selected" in r for r in left_reasons(report))
    _, report = convert_copy(model, activations=("relu",))
    assert [r.path for r in report.replaced] == ["1"]
    _, report = convert_copy(model, exclude=["3"])
    assert [r.path for r in report.replaced] == ["1"]
    assert any("excluded" in r for r in left_reasons(report))
    with pytest.raises(ValueError, match="norms"):
        convert(model, norms=("layer",))
    with pytest.raises(ValueError, match="activations"):
        convert(model, activations=("tanh",))
    with pytest.raises(TypeError, match="nn.Module"):
        convert("not a model")


# ============================================================================================
# Odd input: nothing to do, already converted, meta device, half precision, in place or not
# ============================================================================================
def test_nothing_to_convert():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 1, 1))
    converted, report = convert(model)
    assert converted is model and not report.changed and not report.left
    assert "nothing to convert" in str(report)


def test_convert_is_idempotent_and_in_place():
    model = DnCNN(in_nc=1, out_nc=1, nc=4, nb=4)
    converted, first = convert(model)
    assert converted is model and first.counts() == {"sequential:conv-norm-act": 2}
    params = {n: p for n, p in model.named_parameters()}
    again, second = convert(model)
    assert again is model and not second.changed and len(second.already_fused) == 4  # 2 fused + 2 identities
    assert "idempotent" in str(second)
    assert {n: p for n, p in model.named_parameters()} == params


def test_not_in_place_leaves_the_original_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    converted, report = convert(model, inplace=False)
    assert converted is not model and report.changed
    assert type(model[1]) is nn.BatchNorm2d and type(converted[1]) is BatchNormAct2d


def test_parameters_are_the_same_objects():
    """An optimizer built before converting keeps training the converted model."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    model.register_forward_hook(lambda m, i, o: None)  # hooks on a container are fine
    weight, running_mean = model[1].weight, model[1].running_mean
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, report = convert(model)
    assert report.changed and model[1].weight is weight and model[1].running_mean is running_mean
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    before = weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model[1].weight, before)


def test_meta_device_and_half_precision():
    with torch.device("meta"):
        meta = MilesialUNet(1, 2, width=2)
    converted, report = convert(meta)
    assert report.counts() == {"sequential:conv-norm-act": 18}
    assert all(t.device.type == "meta" for t in converted.state_dict().values())
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).to(torch.bfloat16)
    converted, report = convert_copy(model)
    assert report.changed and {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    x = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16)
    model.eval()
    converted.eval()
    torch.testing.assert_close(converted(x).float(), model(x).float(), atol=3e-2, rtol=3e-2)
    half = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).half()
    converted, _ = convert(half)
    assert {t.dtype for t in converted[1].state_dict().values()} == {torch.float16, torch.int64}


def test_report_is_readable():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4), nn.PReLU(2), DataDependentBlock(4))
    _, report = convert(model)
    text = str(report)
    assert text.startswith("fusedskip.convert: 1 replaced, 2 left")
    assert "coverage: 1/3 norm layers fused (33.3 %), 2 left" in text, text
    assert "1: BatchNorm2d(4) + ReLU() -> BatchNormAct2d(4, act=relu)" in text, text
    assert "PReLU with 2 slopes for 4 channels" in text and "at 4" in text
    assert "DataDependentBlock's forward cannot be traced by torch.fx" in text and "at 6.bn1" in text
    assert report.counts() == {"sequential:conv-norm-act": 1}
    assert (report.norms_total, report.norms_fused, len(report.norms_left)) == (3, 1, 2)


# ============================================================================================
# unconvert and checkpoints
# ============================================================================================
def test_unconvert_restores_plain_modules():
    model = DnCNN(in_nc=1, out_nc=1, nc=4, nb=4, act_mode="BR")
    types_before = [type(m) for m in model.modules()]
    converted, _ = convert_copy(model)
    restored, report = unconvert(copy.deepcopy(converted))
    assert report.counts() == {"unconvert:norm": 2, "unconvert:activation": 2}
    assert [type(m) for m in restored.modules()] == types_before
    assert restored.model[4].inplace and restored.model[3].momentum == 0.9 and restored.model[3].eps == 1e-4
    assert_same_behaviour(model, restored, [torch.randn(2, 1, 6, 6)])
    again, report = unconvert(restored)
    assert not report.changed and "nothing to unconvert" in str(report)


def test_unconvert_fused_modules_it_did_not_create():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), GroupNormAct(1, 2, act="identity"), GroupNormAct(1, 2, act="relu"))
    restored, report = unconvert(model)
    assert type(restored[1]) is nn.GroupNorm and type(restored[2]) is GroupNormAct
    assert any("not created by fusedskip.convert" in e.reason for e in report.left)


# ============================================================================================
# The U-Nets people already have
# ============================================================================================
def test_milesial_unet():
    model = MilesialUNet(n_channels=3, n_classes=2, bilinear=False, width=4)
    converted, report = convert_copy(model)
    assert report.counts() == {"sequential:conv-norm-act": 18} and not report.left
    assert fused_types(converted) == ["BatchNormAct2d", "FusedIdentity"]
    assert_same_behaviour(model, converted, [torch.randn(2, 3, 16, 16)])
    assert_state_dicts_cross_load(model, converted)


def test_kair_dncnn_momentum_and_eps():
    model = DnCNN(in_nc=1, out_nc=1, nc=8, nb=5)  # head CR, 3 x CBR, tail C; BN momentum 0.9, eps 1e-4
    converted, report = convert_copy(model)
    assert report.counts() == {"sequential:conv-norm-act": 3} and not report.left
    for m in converted.modules():
        if isinstance(m, BatchNormAct2d):
            assert m.momentum == 0.9 and m.eps == 1e-4
    assert_same_behaviour(model, converted, [torch.randn(3, 1, 8, 8)])
    for _ in range(2):  # running statistics keep tracking through several training steps
        assert_same_behaviour(model, converted, [torch.randn(3, 1, 8, 8)], modes=(True,))
    assert_state_dicts_cross_load(model, converted)


def test_smp_unet():
    smp = need("segmentation_models_pytorch")
    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8), classes=2)
    converted, report = convert_copy(model)
    rules_apply = expect_counts(report, {"smp:resnet-encoder-stem": 1, "torchvision:basic-block": 16,
                                         "sequential:conv-norm": 3, "sequential:conv-norm-act": 6},
                                "smp.ResNetEncoder", "torchvision.BasicBlock")
    skips = [e for e in report.left if e.kind == "skip"]
    assert [e.path for e in skips] == ["decoder.blocks.0", "decoder.blocks.1", "decoder.blocks.2"]
    assert all("cat([up, skip])" in e.reason and "AddUNet" in e.reason for e in skips)
    if rules_apply:
        assert report.norms_fused == report.norms_total and not left_reasons(report, "BatchNorm2d"), str(report)
        assert all(b._fusedskip_residual for b in converted.modules() if type(b).__name__ == "FusedBasicBlock")
        assert type(converted.encoder.layer1[0]).__name__ == "FusedBasicBlock"
        assert isinstance(converted.encoder.relu, FusedIdentity)
    assert_same_behaviour(model, converted, [torch.randn(2, 3, 32, 32)])
    assert_state_dicts_cross_load(model, converted)
    restored, _ = unconvert(converted)
    assert [type(m) for m in restored.modules()] == [type(m) for m in model.modules()]


def test_monai_basic_unet():
    nets = need("monai.networks.nets")
    model = nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 8, 4))
    converted, report = convert_copy(model)
    assert report.counts() == {"sequential:conv-norm-act": 18}  # Convolution -> ADN(N, D(p=0), A)
    assert fused_types(converted) == ["FusedIdentity", "InstanceNormAct2d"]
    skips = [e for e in report.left if e.kind == "skip"]
    assert len(skips) == 4 and all("cat([skip, up])" in e.reason and "concat_to_add" in e.reason for e in skips)
    assert_same_behaviour(model, converted, [torch.randn(2, 1, 32, 32)])
    assert_state_dicts_cross_load(model, converted)


def test_monai_basic_unet_concat_to_add_is_explicit_and_changes_the_architecture():
    nets = need("monai.networks.nets")
    # the default features (32, 32, 64, 128, 256, 32) scaled down: skip and upsampled widths match
    model = nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(2, 2, 4, 8, 16, 2))
    keys = set(model.state_dict())
    converted, report = convert(copy.deepcopy(model), concat_to_add=True)
    if not verified("monai.UpCat"):
        assert not any(r.rule == "monai:upcat-concat-to-add" for r in report.replaced)
        assert any("not the version fusedskip verified" in e.reason for e in report.left if e.kind == "skip")
        return
    assert report.counts()["monai:upcat-concat-to-add"] == 4
    assert any("not checkpoint compatible" in a for r in report.replaced for a in r.also)
    assert any("concat_to_add changed the architecture" in n for n in report.notes)
    new_keys = set(converted.state_dict())
    assert {k for k in new_keys - keys} == {f"upcat_{i}.skip_gate.beta" for i in (1, 2, 3, 4)}
    assert converted.upcat_4.convs.conv_0.conv.weight.shape[1] == model.upcat_4.convs.conv_0.conv.weight.shape[1] // 2
    with pytest.raises(RuntimeError):
        converted.load_state_dict(model.state_dict())
    out = converted(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 2, 32, 32) and torch.isfinite(out).all()
    _, back = unconvert(converted)
    assert [e.module for e in back.left] == ["GatedAddUpCat"] * 4


def test_monai_unet():
    nets = need("monai.networks.nets")
    default = nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 8), strides=(2, 2),
                        num_res_units=1)
    converted, report = convert_copy(default)  # PReLU throughout: the slopes stay in their slots
    assert report.norms_fused == report.norms_total == 6, str(report)
    assert sum(e.kind == "skip" for e in report.left) == 2
    slots = [m for m in converted.modules() if type(m).__name__ == "FusedPReLUSlot"]
    assert len(slots) == 6 and all(isinstance(s.original, nn.PReLU) for s in slots)
    assert_same_behaviour(default, converted, [torch.randn(2, 1, 16, 16)])  # incl. the PReLU weights' grads
    assert_state_dicts_cross_load(default, converted)
    restored, _ = unconvert(converted)
    assert [type(m) for m in restored.modules()] == [type(m) for m in default.modules()]
    assert_same_behaviour(default, restored, [torch.randn(2, 1, 16, 16)], modes=(False,))
    model = nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 8), strides=(2, 2),
                      num_res_units=1, act="relu", norm="batch")
    converted, report = convert_copy(model)
    assert report.counts() == {"sequential:conv-norm-act": 6}
    assert_same_behaviour(model, converted, [torch.randn(2, 1, 16, 16)])
    # MONAI's own Swish (alpha = 1) is SiLU; dropout between norm and SiLU only when p = 0
    model = nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                      num_res_units=0, act="swish", norm=("group", {"num_groups": 2}), dropout=0.0)
    converted, report = convert_copy(model)
    assert report.counts() == {"sequential:conv-norm-act": 2}
    assert_same_behaviour(model, converted, [torch.randn(2, 1, 8, 8)])


def _tiny_unet2d():
    diffusers = need("diffusers")
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(4, 8), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=2,
                                 attention_head_dim=4)


def test_diffusers_unet2d():
    model = _tiny_unet2d()
    converted, report = convert_copy(model)
    if expect_counts(report, {"diffusers:resnet-block": 16, "diffusers:unet2d-out": 1},
                     "diffusers.ResnetBlock2D", "diffusers.UNet2DModel"):
        assert all(type(b).__name__ == "FusedResnetBlock2D" for b in converted.modules()
                   if "ResnetBlock" in type(b).__name__)
    assert sum("attention projections" in r for r in left_reasons(report, "GroupNorm")) == 4
    assert sum(e.kind == "skip" and "cat([hidden, skip])" in e.reason for e in report.left) == 2
    inputs = [torch.randn(2, 1, 8, 8), torch.tensor([3, 500])]
    assert_same_behaviour(model, converted, inputs)
    assert_state_dicts_cross_load(model, converted)
    restored, _ = unconvert(converted)
    assert [type(m) for m in restored.modules()] == [type(m) for m in model.modules()]


def test_diffusers_resnet_block_scale_shift_and_unknown_versions(monkeypatch):
    resnet = need("diffusers.models.resnet")
    block = resnet.ResnetBlock2D(in_channels=4, out_channels=8, temb_channels=6, groups=2,
                                 time_embedding_norm="scale_shift", dropout=0.1)
    converted, report = convert_copy(block)
    if verified("diffusers.ResnetBlock2D"):
        assert [r.path for r in report.replaced] == ["norm1", "norm2"] and not report.norms_left
        assert "scale/shift" in str(report) and converted._fusedskip_norm2_act
    inputs = [torch.randn(2, 4, 5, 5), torch.randn(2, 6)]
    assert_same_behaviour(block, converted, inputs)
    restored, _ = unconvert(copy.deepcopy(converted))
    assert type(restored) is type(block) and type(restored.norm2) is nn.GroupNorm
    # A diffusers version whose forward fusedskip has not verified: left, with the reason
    monkeypatch.setitem(conv_libraries.KNOWN, "diffusers.ResnetBlock2D", {"forward": {"0000000000000000"}})
    _, report = convert_copy(block)
    assert not report.changed and any("not the version fusedskip verified" in r for r in left_reasons(report))


def test_timm_norm_act_modules():
    layers = need("timm.layers")
    model = nn.Sequential(
        layers.ConvNormAct(3, 8, 3, act_layer="relu"),
        layers.ConvNormAct(8, 8, 3, norm_layer="groupnorm", act_layer="silu", norm_kwargs=dict(num_groups=2)),
        layers.ConvNormAct(8, 8, 3, act_layer="gelu"),
        layers.ConvNormAct(8, 8, 1, act_layer="relu", apply_act=False),
        layers.ConvNormAct(8, 8, 1, act_layer="hard_swish"),
        layers.ConvNormAct(8, 8, 1, act_layer="tanh"),
    )
    converted, report = convert_copy(model)
    assert report.counts() == {"timm:norm-act": 5}
    assert any("Tanh has no fused kernel" in r for r in left_reasons(report, "BatchNormAct2d"))
    assert type(converted[0].bn) is BatchNormAct2d and type(converted[1].bn) is GroupNormAct
    assert_same_behaviour(model, converted, [torch.randn(2, 3, 6, 6)])
    restored, _ = unconvert(converted)
    assert [type(m) for m in restored.modules()] == [type(m) for m in model.modules()]
    # a lone timm module as the root is replaced too (the returned model is the new root)
    root, report = convert(layers.BatchNormAct2d(4, act_layer=nn.SiLU))
    assert type(root) is BatchNormAct2d and report.replaced[0].path == ""


def test_torchvision_resnet_blocks():
    resnet = need("torchvision.models.resnet")
    model = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=3)
    converted, report = convert_copy(model)
    if expect_counts(report, {"torchvision:resnet-stem": 1, "torchvision:basic-block": 8, "sequential:conv-norm": 3},
                     "torchvision.ResNet", "torchvision.BasicBlock"):
        assert report.norms_fused == report.norms_total == 12 and "residual add" in str(report)
    assert_same_behaviour(model, converted, [torch.randn(2, 3, 32, 32)])
    assert_state_dicts_cross_load(model, converted)
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    block = resnet.Bottleneck(8, 4, downsample=downsample)
    converted, report = convert_copy(block)
    if expect_counts(report, {"torchvision:bottleneck": 3, "sequential:conv-norm": 1}, "torchvision.Bottleneck"):
        assert converted._fusedskip_residual and not report.norms_left
    assert_same_behaviour(block, converted, [torch.randn(2, 8, 5, 5)])
    restored, _ = unconvert(converted)
    assert type(restored) is resnet.Bottleneck and "_fusedskip_residual" not in vars(restored)


# ============================================================================================
# SyncBatchNorm, torch.compile, Triton kernels
# ============================================================================================
def test_sync_batchnorm_either_order():
    distributed = pytest.importorskip("fusedskip.distributed", reason="fusedskip.distributed is not available")
    model = MilesialUNet(1, 2, width=2)
    reference = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    # fuse, then synchronise with fusedskip's converter
    fused, _ = convert_copy(model)
    fused = distributed.convert_sync_batchnorm(fused)
    assert all(m.sync for m in fused.modules() if isinstance(m, BatchNormAct2d))
    assert_same_behaviour(reference, fused, [torch.randn(2, 1, 16, 16)])
    # synchronise with torch first, then fuse: SyncBatchNorm becomes BatchNormAct2d(sync=True)
    synced_then_fused, report = convert_copy(reference)
    assert report.counts() == {"sequential:conv-norm-act": 18}
    assert all(m.sync for m in synced_then_fused.modules() if isinstance(m, BatchNormAct2d))
    assert_same_behaviour(reference, synced_then_fused, [torch.randn(2, 1, 16, 16)])
    restored, _ = unconvert(synced_then_fused)
    assert [type(m) for m in restored.modules()] == [type(m) for m in reference.modules()]
    restored, _ = unconvert(copy.deepcopy(fused))  # fused, then synchronised: back to SyncBatchNorm
    assert [type(m) for m in restored.modules()] == [type(m) for m in reference.modules()]
    # torch's converter run after fusing (Lightning's sync_batchnorm=True) leaves fused modules intact
    again = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    assert fused_types(again) == fused_types(fused)


def test_torch_compile_matches_eager():
    resnet = need("torchvision.models.resnet")
    # a swapped block class, a FusedIdentity slot and a fused GroupNorm + SiLU
    model = nn.Sequential(resnet.BasicBlock(4, 4), nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU())
    converted, report = convert_copy(model)
    expect_counts(report, {"torchvision:basic-block": 2, "sequential:conv-norm-act": 1}, "torchvision.BasicBlock")
    torch._dynamo.reset()
    compiled = torch.compile(converted, backend="aot_eager")
    assert_same_behaviour(model, compiled, [torch.randn(2, 4, 6, 6)])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_small_model(triton_backend):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.SiLU(),
                          nn.Conv2d(4, 2, 1))
    converted, report = convert_copy(model)
    assert report.counts() == {"sequential:conv-norm-act": 2}
    assert fusedskip.get_backend() == "triton"
    assert_same_behaviour(model, converted, [torch.randn(2, 3, 4, 4)], atol=1e-4)


def test_top_level_export():
    if not hasattr(fusedskip, "unconvert"):
        pytest.skip("fusedskip/__init__.py does not export convert/unconvert yet")
    assert fusedskip.convert is convert and fusedskip.unconvert is unconvert


def test_converted_model_pickles_and_deep_copies():
    import io

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    converted, _ = convert(model)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded[1]) is BatchNormAct2d and isinstance(loaded[2], FusedIdentity)
    restored, _ = unconvert(copy.deepcopy(loaded))
    assert [type(m) for m in restored] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(track_running_stats=False), dict(affine=False),
                                    dict(momentum=0.9, eps=1e-4)], ids=str)
def test_batch_norm_settings_are_honoured(kwargs):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, **kwargs), nn.LeakyReLU(0.1))
    converted, report = convert_copy(model)
    assert report.counts() == {"sequential:conv-norm-act": 1}
    for _ in range(2):
        assert_same_behaviour(model, converted, [torch.randn(3, 2, 5, 5)])
    frozen = copy.deepcopy(model).train()
    frozen[1].eval()  # a "frozen BN" set-up: the model trains, the norm stays in eval mode
    frozen_converted, _ = convert_copy(frozen)
    assert frozen_converted.training and not frozen_converted[1].training
    x = torch.randn(3, 2, 5, 5)
    torch.testing.assert_close(frozen_converted(x), frozen(x), atol=2e-5, rtol=1e-4)
