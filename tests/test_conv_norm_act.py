"""ConvNormAct vs conv → norm → act built from torch modules, bias absorption, BN folding and a
short convergence run (fused kernels vs the reference path)."""
import copy

import pytest
import torch
from helpers import make_input
from torch import nn
from torch.nn import functional as F

import fusedskip
from fusedskip.ops.conv_norm_act import ConvNormAct


def _torch_twin(block: ConvNormAct, norm: nn.Module, act: nn.Module) -> nn.Sequential:
    """nn.Sequential(conv, norm, act) of torch modules holding block's parameters."""
    c = block.conv
    conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                     bias=c.bias is not None)
    twin = nn.Sequential(conv, norm, act)
    state = {k.replace("conv.", "0.").replace("norm.", "1."): v for k, v in block.state_dict().items()}
    twin.load_state_dict(state)
    return twin


def _randomise(module: nn.Module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_()
    return module


def _step_and_compare(ours, twin, x, tol=2e-4):
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), twin(xb)
    torch.testing.assert_close(ya, yb, atol=tol, rtol=tol)
    if ours.training:
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(ours.conv.weight.grad, twin[0].weight.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(ours.norm.weight.grad, twin[1].weight.grad, atol=tol, rtol=tol)
        ours.zero_grad()
        twin.zero_grad()
    return ya


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("bias", [None, True])
def test_batch_matches_torch_modules_train_eval_fold(backend_name, bias):
    """conv(bias) → BN → act: training (batch stats, running stats incl. the absorbed bias), eval,
    then eval with the BatchNorm folded into the conv."""
    fusedskip.set_backend(backend_name)
    ours = _randomise(ConvNormAct(3, 5, 3, bias=bias, act="leaky_relu", negative_slope=0.1, momentum=0.3))
    assert ours.bias_absorbed == bool(bias)
    twin = _torch_twin(ours, nn.BatchNorm2d(5, momentum=0.3), nn.LeakyReLU(0.1))
    for step in range(2):
        _step_and_compare(ours, twin, make_input((2, 3, 5, 7), mean=1.0 + step, scale=2.0))
    torch.testing.assert_close(ours.norm.running_mean, twin[1].running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.norm.running_var, twin[1].running_var, atol=1e-5, rtol=1e-5)
    if bias:
        assert ours.conv.bias.grad is None  # frozen: its gradient is exactly zero
    ours.eval()
    twin.eval()
    x = make_input((2, 3, 5, 7), layout="channels_last", mean=1.5, scale=2.0)
    y_eval = _step_and_compare(ours, twin, x)
    ours.fold_bn()
    assert list(ours.state_dict()) == ["conv.weight", "conv.bias"] and ours.folded
    torch.testing.assert_close(ours(x), y_eval, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already folded"):
        ours.fold_bn()


def test_checkpoints_move_between_torch_and_ours():
    """A torch conv(bias) → BN checkpoint evaluates identically in ConvNormAct(bias=True)."""
    fusedskip.set_backend("reference")
    twin = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU())
    _randomise(twin)
    with torch.no_grad():
        twin[1].running_mean.add_(twin[0].bias)  # running mean of a model trained with its bias
    ours = ConvNormAct(3, 4, bias=True)
    ours.load_state_dict({k.replace("0.", "conv.").replace("1.", "norm."): v for k, v in twin.state_dict().items()})
    ours.eval()
    twin.eval()
    x = make_input((2, 3, 6, 6))
    torch.testing.assert_close(ours(x), twin(x))


def test_no_norm_and_state_dict_keys():
    block = ConvNormAct(3, 4, 3, norm=None, act="silu")
    assert block.conv.bias is not None and not block.bias_absorbed
    assert list(block.state_dict()) == ["conv.weight", "conv.bias"]
    x = make_input((2, 3, 5, 5))
    torch.testing.assert_close(block(x), F.silu(block.conv(x)))
    keys = list(ConvNormAct(3, 4).state_dict())
    assert keys == ["conv.weight", "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var",
                    "norm.num_batches_tracked"]


@pytest.mark.parametrize("kernel_size,dilation", [(3, 1), (5, 1), (3, 2)])
def test_default_padding_keeps_size(kernel_size, dilation):
    block = ConvNormAct(2, 3, kernel_size, dilation=dilation, norm=None)
    assert block(torch.randn(1, 2, 7, 9)).shape == (1, 3, 7, 9)
    assert ConvNormAct(2, 3, 3, stride=2, norm=None)(torch.randn(1, 2, 8, 8)).shape == (1, 3, 4, 4)


@pytest.mark.parametrize("num_groups,absorbed", [(2, False), (4, True)])
def test_group_norm_bias_absorption(num_groups, absorbed):
    """GN absorbs a per-channel conv bias only with one channel per group; with two channels per
    group the bias changes the output and must be applied."""
    fusedskip.set_backend("reference")
    block = _randomise(ConvNormAct(3, 4, bias=True, norm="group", num_groups=num_groups, act="relu"))
    assert block.bias_absorbed is absorbed
    assert block.conv.bias.requires_grad is not absorbed
    twin = _torch_twin(block, nn.GroupNorm(num_groups, 4), nn.ReLU())
    _step_and_compare(block, twin, make_input((2, 3, 5, 5), scale=2.0))
    no_bias = copy.deepcopy(twin)
    with torch.no_grad():
        no_bias[0].bias.zero_()
    x = make_input((2, 3, 5, 5), scale=2.0)
    assert torch.allclose(twin(x), no_bias(x), atol=1e-5) is absorbed


def test_instance_norm_matches_torch():
    fusedskip.set_backend("reference")
    block = _randomise(ConvNormAct(3, 4, norm="instance", act="gelu", bias=True))
    assert block.bias_absorbed and list(block.state_dict()) == ["conv.weight", "conv.bias", "norm.weight", "norm.bias"]
    twin = _torch_twin(block, nn.InstanceNorm2d(4, affine=True), nn.GELU())
    _step_and_compare(block, twin, make_input((2, 3, 5, 5), scale=2.0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm"):
        ConvNormAct(3, 4, norm="layer")
    with pytest.raises(ValueError, match="num_groups"):
        ConvNormAct(3, 6, norm="group", num_groups=4)
    block = ConvNormAct(3, 4)
    with pytest.raises(RuntimeError, match="eval"):
        block.fold_bn()
    with pytest.raises(ValueError, match="BatchNorm"):
        ConvNormAct(3, 4, norm=None).eval().fold_bn()
    with pytest.raises(ValueError, match="act"):
        ConvNormAct(3, 4, act="tanhh")


def _network(with_group: bool) -> nn.Sequential:
    layers = [ConvNormAct(3, 8, 3, norm="batch", act="relu", momentum=None)]
    if with_group:
        layers.append(ConvNormAct(8, 8, 3, norm="group", num_groups=2, act="silu"))
    layers.append(nn.Conv2d(8, 1, 1))
    return nn.Sequential(*layers)


@pytest.mark.parametrize("with_group", [False, True], ids=["batch", "batch+group"])
def test_convergence_tracks_reference(with_group):
    """30 SGD steps of a small conv-norm-act network: the fused kernels track the reference path
    (same initialisation, same data). channels_last keeps the interpreter's program count low."""
    torch.manual_seed(0)
    fused = _network(with_group)
    reference = copy.deepcopy(fused)
    # Batch 1 for the GroupNorm network: the interpreter runs one GroupNorm program per (n, group).
    x = make_input((1, 3, 6, 6) if with_group else (2, 3, 5, 5), layout="channels_last", mean=0.5, scale=1.0)
    target = torch.tanh(x[:, :1] * 2 - x[:, 1:2]).detach()
    losses = {}
    for name, model in (("triton", fused), ("reference", reference)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
        losses[name] = []
        with fusedskip.use_backend(name):
            for _ in range(30):
                loss = F.mse_loss(model(x), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[name].append(loss.item())
    a, b = torch.tensor(losses["triton"]), torch.tensor(losses["reference"])
    assert b[-1] < 0.5 * b[0], "the reference network did not learn: the test says nothing"
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(fused[0].norm.running_var, reference[0].norm.running_var, rtol=1e-3, atol=1e-5)
