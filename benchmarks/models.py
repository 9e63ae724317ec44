"""Whole-model cases: AddUNet (training step and inference) and third-party U-Nets converted
with ``fusedskip.convert``; a converted model whose library is not installed is skipped with
that reason.

Passes: ``train`` = forward + scalar loss (mean of squares of every float output) + backward to
every parameter (``torch.autograd.grad``, no optimizer step, nothing accumulated into ``.grad``);
``infer`` = ``model.eval()`` forward under ``torch.no_grad``.

Providers: ``fusedskip`` / ``reference`` = the fusedskip model (AddUNet, or the converted model)
on the Triton / reference backend; ``eager`` = the plain-PyTorch model (the third-party original,
or for AddUNet a copy whose fusedskip modules are swapped for the torch modules they fuse,
verified against the reference path); ``compile*`` =
torch.compile of the eager model. A model's FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matmuls only) on the eager or
reference provider; models have no byte model.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

from .cases import MODEL_PASSES, MODEL_SHAPES, Case, Impl, always, import_attr, model_input, place, register


def build_addunet(in_ch: int, width: int) -> nn.Module:
    """AddUNet with ``in_ch`` input and output channels and feature width ``width``."""
    from fusedskip import AddUNet
    return AddUNet(in_channels=in_ch, out_channels=in_ch, width=width)


def convert(model: nn.Module) -> nn.Module:
    """``fusedskip.convert(model)``: the converted model (its conversion report is dropped)."""
    from fusedskip import convert as fused_convert
    converted, _ = fused_convert(model)
    return converted


# --------------------------------------------------------------------------------------------
# AddUNet's eager baseline: a copy whose fusedskip modules are replaced by the plain torch
# modules they fuse (sharing the same parameters), checked against the original.
# --------------------------------------------------------------------------------------------
class EagerGate(nn.Module):
    """GatedSkip as plain torch ops: ``up + a·skip`` with ``a`` = softplus(β) / sigmoid(β) / fixed."""

    def __init__(self, gated_skip: nn.Module):
        super().__init__()
        self.kind = gated_skip.kind
        self.fixed_value = getattr(gated_skip, "fixed_value", None)
        self.beta = gated_skip.beta

    def forward(self, up, skip):
        if self.kind == "fixed":
            return up + self.fixed_value * skip
        a = torch.sigmoid(self.beta) if self.kind == "sigmoid_channel" else nn.functional.softplus(self.beta)
        return up + a.reshape(1, -1, 1, 1) * skip


class EagerGateNorm(nn.Module):
    def __init__(self, gate: nn.Module, norm: nn.Module):
        super().__init__()
        self.gate, self.norm = gate, norm

    def forward(self, up, skip):
        return self.norm(self.gate(up, skip))


def _plain(module: nn.Module) -> Optional[nn.Module]:
    """The plain-torch equivalent of one fusedskip op module (sharing its tensors), or None."""
    from fusedskip.activations import activation_module
    name = type(module).__name__
    if not type(module).__module__.startswith("fusedskip.ops"):
        return None
    if name == "GatedSkip":
        return EagerGate(module)
    if name == "SkipNormAct":
        norm = _plain(module.norm)
        return EagerGateNorm(EagerGate(module.skip), norm) if norm is not None else None
    if name == "ConvNormAct":
        norm = _plain(module.norm) if type(module.norm).__module__.startswith("fusedskip.ops") else module.norm
        return nn.Sequential(module.conv, norm) if norm is not None else None
    if name == "BatchNormAct2d":
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(bn, attr, getattr(module, attr))
        return nn.Sequential(bn, activation_module(module.act_name, module.negative_slope))
    if name in ("GroupNormAct", "InstanceNormAct2d"):
        gn = nn.GroupNorm(module.num_groups, module.num_channels, module.eps, module.affine)
        gn.weight, gn.bias = module.weight, module.bias
        return nn.Sequential(gn, activation_module(module.act, module.negative_slope))
    return None


def plain_torch_copy(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` with every fusedskip op module replaced by plain torch modules,
    checked to give the reference path's outputs on ``example`` (train and eval mode);
    raises ValueError when it cannot (an op module it does not know, or different outputs)."""
    import fusedskip
    plain = copy.deepcopy(model)

    def swap(parent: nn.Module) -> None:
        for child_name, child in list(parent.named_children()):
            new = _plain(child)
            if new is not None:
                setattr(parent, child_name, new)
            else:
                swap(child)
    swap(plain)
    left = sorted({type(m).__name__ for m in plain.modules() if type(m).__module__.startswith("fusedskip.ops")})
    if left:
        raise ValueError(f"no plain-torch equivalent for {', '.join(left)}")
    reference = copy.deepcopy(model)
    check = copy.deepcopy(plain)  # running statistics move in train mode: compare on copies
    with torch.no_grad(), fusedskip.use_backend("reference"):
        for train in (True, False):
            a = scalar_loss(reference.train(train)(example))
            b = scalar_loss(check.train(train)(example))
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-6):
                raise ValueError(f"plain-torch copy differs from the reference path ({'train' if train else 'eval'} "
                                 f"mode loss {b.item():.6g} vs {a.item():.6g})")
    return plain


class OutputOnly(nn.Module):
    """Adapts a model whose forward needs extra arguments or returns a structure."""

    def __init__(self, model: nn.Module, call: Callable):
        super().__init__()
        self.model, self.call = model, call

    def forward(self, x):
        return self.call(self.model, x)


# --------------------------------------------------------------------------------------------
# A plain PyTorch U-Net of conv-BN-ReLU blocks with additive skips (KAIR / DRUNet style): the
# third-party model that needs no third-party library.
# --------------------------------------------------------------------------------------------
def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PlainUNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = 64, depth: int = 4):
        super().__init__()
        chans = [width * 2 ** i for i in range(depth)]
        self.head = conv_bn_relu(in_channels, chans[0])
        self.enc = nn.ModuleList(nn.Sequential(conv_bn_relu(c, c), conv_bn_relu(c, c)) for c in chans)
        self.down = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 2, stride=2, bias=False) for i in range(depth - 1))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2, bias=False)
                                for i in range(depth - 1))
        self.dec = nn.ModuleList(nn.Sequential(conv_bn_relu(c, c), conv_bn_relu(c, c)) for c in chans[:-1])
        self.tail = nn.Conv2d(chans[0], out_channels, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        skips = []
        for i, block in enumerate(self.enc):
            h = block(h)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)
        for i in reversed(range(len(self.up))):
            h = self.dec[i](self.up[i](h) + skips[i])
        return self.tail(h)


def _diffusers_unet(in_ch: int, width: int) -> nn.Module:
    UNet2DModel = import_attr("diffusers", "UNet2DModel")
    w = width
    model = UNet2DModel(in_channels=in_ch, out_channels=in_ch, layers_per_block=2,
                        block_out_channels=(w, 2 * w, 4 * w, 4 * w),
                        down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4,
                        norm_num_groups=min(32, w))
    return OutputOnly(model, lambda m, x: m(x, 10).sample)


def _smp_unet(in_ch: int, width: int) -> nn.Module:
    smp = import_attr("segmentation_models_pytorch")
    return smp.Unet("resnet18", encoder_weights=None, in_channels=in_ch, classes=in_ch,
                    decoder_channels=tuple(max(4, width * 4 // 2 ** i) for i in range(5)))


def _monai_unet(in_ch: int, width: int) -> nn.Module:
    BasicUNet = import_attr("monai.networks.nets", "BasicUNet")
    w = width
    return BasicUNet(spatial_dims=2, in_channels=in_ch, out_channels=in_ch,
                     features=(w, w, 2 * w, 4 * w, 8 * w, w), norm="batch", act="relu")


# --------------------------------------------------------------------------------------------
def _addunet_fused(shape, dtype, layout, device) -> Impl:
    model = place(build_addunet(shape[1], shape[4]), dtype, layout, device)
    return Impl(model, [p for p in model.parameters() if p.requires_grad], model)


def _addunet_eager(shape, dtype, layout, device) -> Impl:
    model = build_addunet(shape[1], shape[4])
    try:
        torch.manual_seed(1)
        model = plain_torch_copy(model, torch.randn(2, shape[1], 32, 32))
        note, backend = "eager = AddUNet with nn.Conv2d/BatchNorm2d/GroupNorm/activation modules and up + a*skip " \
                        "(same parameters, checked against the reference path)", None
    except ValueError as exc:
        note, backend = f"eager = AddUNet on fusedskip's reference path ({exc})", "reference"
    model = place(model, dtype, layout, device)
    return Impl(model, [p for p in model.parameters() if p.requires_grad], model, backend=backend, note=note)


register(Case(
    "addunet", "model", "AddUNet: training step (fwd + loss + bwd) and inference", MODEL_PASSES,
    always, model_input, _addunet_fused, _addunet_eager,
    shapes=MODEL_SHAPES, rotate_inputs=False))


def _converted_case(name: str, title: str, factory: Callable[[int, int], nn.Module], library: Optional[str]):
    def needs() -> None:
        if library is not None:
            import_attr(library)

    def fused(shape, dtype, layout, device) -> Impl:
        torch.manual_seed(0)
        model = place(convert(factory(shape[1], shape[4])), dtype, layout, device)
        return Impl(model, [p for p in model.parameters() if p.requires_grad], model, note="fusedskip.convert(model)")

    def eager(shape, dtype, layout, device) -> Impl:
        torch.manual_seed(0)
        model = place(factory(shape[1], shape[4]), dtype, layout, device)
        return Impl(model, [p for p in model.parameters() if p.requires_grad], model)

    register(Case(name, "model", title, MODEL_PASSES, needs, model_input, fused, eager,
                  shapes=MODEL_SHAPES, rotate_inputs=False))


_converted_case("convert_plain_unet", "conv-BN-ReLU U-Net with additive skips (plain PyTorch), converted",
                lambda i, w: PlainUNet(i, i, w), None)
_converted_case("convert_diffusers_unet", "diffusers UNet2DModel (GN+SiLU ResNet blocks), converted",
                _diffusers_unet, "diffusers")
_converted_case("convert_smp_unet", "segmentation_models_pytorch Unet(resnet18), converted",
                _smp_unet, "segmentation_models_pytorch")
_converted_case("convert_monai_unet", "MONAI BasicUNet (batch norm, ReLU), converted",
                _monai_unet, "monai.networks.nets")


def scalar_loss(out) -> torch.Tensor:
    """Mean of squares of every floating-point tensor in a model's output (tensor, tuple, dict,
    dataclass-like ``ModelOutput``)."""
    tensors = []

    def walk(o):
        if isinstance(o, torch.Tensor):
            if o.is_floating_point():
                tensors.append(o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        elif hasattr(o, "to_tuple"):
            walk(o.to_tuple())
    walk(out)
    if not tensors:
        raise TypeError(f"model output {type(out).__name__} holds no floating-point tensor")
    return sum(t.float().pow(2).mean() for t in tensors)

