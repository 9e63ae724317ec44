"""Synchronised BatchNormAct2d: the converter, and 2 ranks on gloo (CPU) against BatchNorm2d +
activation on the concatenated batch (which is what nn.SyncBatchNorm + activation computes)."""
import copy
import datetime
import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import fusedskip
from fusedskip.distributed import convert_sync_batchnorm, merge_stats, revert_sync_batchnorm
from fusedskip.ops.batch_norm_act import BatchNormAct2d
from fusedskip.ops.conv_norm_act import ConvNormAct


def test_converter_keeps_activation_and_survives_torchs_converter():
    model = nn.Sequential(ConvNormAct(3, 4, norm="batch", act="silu"), nn.BatchNorm2d(4),
                          BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2))
    fused = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    assert len(fused) == 2
    group = object()  # stands in for a process group: conversion needs no initialised backend
    assert convert_sync_batchnorm(model, process_group=group) is model
    assert convert_sync_batchnorm(model, process_group=group) is model  # idempotent
    # Torch's converter (Lightning's sync_batchnorm=True runs it after the user's code) converts
    # the plain BatchNorm and leaves the fused modules, activation included, as they are.
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is nn.SyncBatchNorm
    assert model[0].norm is fused[0] and model[2] is fused[1]
    assert [(m.act_name, m.sync, m.process_group) for m in fused] == [("silu", True, group),
                                                                       ("leaky_relu", True, group)]
    assert fused[1].negative_slope == 0.2 and "sync=True" in repr(fused[1])
    revert_sync_batchnorm(model)
    assert not any(m.sync for m in fused)


class _OwnForwardBN(nn.BatchNorm2d):
    """Stands in for timm's BatchNormAct2d: a _BatchNorm subclass whose forward adds something."""

    def forward(self, x):
        return F.relu(super().forward(x))


def _plain_model():
    return nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormAct2d(4, act="relu"), nn.BatchNorm2d(4), _OwnForwardBN(4),
                         nn.Flatten(2), nn.BatchNorm1d(4), nn.Unflatten(2, (3, 3)),
                         nn.Sequential(nn.Unflatten(2, (1, 3)), nn.BatchNorm3d(4), nn.Flatten(2, 3)))


def test_converter_synchronises_plain_batchnorms_and_names_what_it_leaves():
    model = _plain_model()
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    group = object()
    with pytest.warns(RuntimeWarning, match=r"left 1 BatchNorm layer\(s\).*3 \(_OwnForwardBN has its own forward"):
        out = convert_sync_batchnorm(model, process_group=group)
    assert out is model and model[1].sync and model[1].process_group is group
    # no process group yet (the usual order): torch's SyncBatchNorm, on the very same tensors
    assert [type(m) for m in (model[2], model[5], model[7][1])] == [nn.SyncBatchNorm] * 3
    assert model[2].process_group is group and type(model[3]) is _OwnForwardBN
    assert all(v is tensors[k] for k, v in model.state_dict(keep_vars=True).items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert convert_sync_batchnorm(model, process_group=group) is model  # idempotent
    assert type(model[2]) is nn.SyncBatchNorm
    root = convert_sync_batchnorm(nn.BatchNorm2d(3))  # a lone BatchNorm: the replacement is returned
    assert type(root) is nn.SyncBatchNorm
    with pytest.raises(ValueError, match="plain must be one of"):
        convert_sync_batchnorm(model, plain="all")


def test_converter_plain_modes_fused_and_keep():
    fusedskip.set_backend("reference")
    model = _plain_model()
    original = copy.deepcopy(model)
    weight, running_var = model[2].weight, model[2].running_var
    with pytest.warns(RuntimeWarning, match="_OwnForwardBN"):
        convert_sync_batchnorm(model, plain="fused")
    bn = model[2]
    assert type(bn) is BatchNormAct2d and bn.act_name == "identity" and bn.sync
    assert bn.weight is weight and bn.running_var is running_var  # the very tensors (optimizers, checkpoints)
    assert type(model[5]) is nn.SyncBatchNorm  # 1-D: torch's
    x = torch.randn(2, 3, 3, 3) + 1
    original.train()
    model.train()
    torch.testing.assert_close(model[:3](x), original[:3](x))  # local statistics without a process group
    torch.testing.assert_close(bn.running_var, original[2].running_var)
    restored, _ = fusedskip.unconvert(model)
    assert type(restored[2]) is nn.SyncBatchNorm and type(restored[1]) is BatchNormAct2d  # the hand-built one stays
    kept = _plain_model()
    with pytest.warns(RuntimeWarning, match=r"left 4 BatchNorm.*plain='keep'"):
        convert_sync_batchnorm(kept, plain="keep")
    assert type(kept[2]) is nn.BatchNorm2d and kept[1].sync


def test_converter_on_cpu_in_a_process_group_uses_the_fused_module(monkeypatch):
    """Inside an initialised process group on the CPU torch's SyncBatchNorm cannot train: exact
    BatchNorm2d becomes a synchronised BatchNormAct2d(identity), the rest is named in a warning,
    and the trainer's converter (which calls this one first) keeps working."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    model = _plain_model()
    with pytest.warns(RuntimeWarning, match=r"left 3 BatchNorm.*torch's SyncBatchNorm cannot train"):
        convert_sync_batchnorm(model)
    assert type(model[2]) is BatchNormAct2d and model[2].sync and model[2].act_name == "identity"
    assert type(model[5]) is nn.BatchNorm1d and type(model[7][1]) is nn.BatchNorm3d
    training = pytest.importorskip("fusedskip.training.distributed")
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = training.convert_batchnorm_for_ddp(_plain_model(), torch.device("cpu"), said.append)
    assert type(out[2]) is BatchNormAct2d and out[2].sync and said and "3 plain BatchNorm" in said[0]


def test_converted_module_without_distributed_is_local():
    """Without an initialised process group a converted module computes local statistics."""
    fusedskip.set_backend("reference")
    m = convert_sync_batchnorm(BatchNormAct2d(3, act="relu"))
    ref = nn.BatchNorm2d(3)
    x = torch.randn(2, 3, 4, 5) * 2 + 1
    torch.testing.assert_close(m(x), F.relu(ref(x)))
    torch.testing.assert_close(m.running_var, ref.running_var)


def test_merge_stats_equals_full_statistics():
    x = torch.randn(7, 3, 4, 5, dtype=torch.float64) * 0.1 + 3
    parts = [x[:3], x[3:3], x[3:]]  # an empty rank included
    counts = torch.tensor([p.shape[0] * 20 for p in parts], dtype=torch.float64)
    means = torch.stack([p.mean(dim=(0, 2, 3)) if p.numel() else torch.zeros(3, dtype=torch.float64) for p in parts])
    m2s = torch.stack([p.var(dim=(0, 2, 3), unbiased=False) * p.shape[0] * 20 if p.numel()
                       else torch.zeros(3, dtype=torch.float64) for p in parts])
    mean, m2, total = merge_stats(counts, means, m2s)
    assert total.item() == 140
    torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(m2 / 140, x.var(dim=(0, 2, 3), unbiased=False))


# --------------------------------------------------------------------------------------------
# Two ranks on gloo
# --------------------------------------------------------------------------------------------
C = 3
# Per step: batch size of each rank (uneven, then one rank empty), momentum of the module.
STEPS = [(3, 2), (2, 2), (4, 0)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check(name, actual, expected, atol=3e-5, rtol=3e-5):
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def _run_rank(rank: int, backend_name: str, momentum):
    """Train a synchronised BatchNormAct2d (+ fused skip on one step) and compare with nn.BatchNorm2d
    + SiLU on the whole batch, all ranks' gradients summed."""
    fusedskip.set_backend(backend_name)
    torch.manual_seed(1234)  # identical data and parameters on every rank
    ours = convert_sync_batchnorm(BatchNormAct2d(C, act="silu", momentum=momentum))
    ref = nn.BatchNorm2d(C, momentum=momentum).double()
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    gate = torch.tensor([0.5, 1.0, 1.5], requires_grad=True)
    for step, sizes in enumerate(STEPS):
        full = sum(sizes)
        x = torch.randn(full, C, 4, 5) * 0.1 + 3.0
        skip = torch.randn(full, C, 4, 5)
        g = torch.randn(full, C, 4, 5)
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        use_skip = step == 1
        xl = x[lo:hi].clone().contiguous(memory_format=torch.channels_last).requires_grad_()
        sl = skip[lo:hi].clone().requires_grad_()
        y = ours(xl, sl, gate) if use_skip else ours(xl)
        y.backward(g[lo:hi])
        xr = x.double().requires_grad_()
        sr = skip.double().requires_grad_()
        gate_r = gate.detach().double().requires_grad_()
        inp = xr + gate_r.reshape(1, -1, 1, 1) * sr if use_skip else xr
        yr = F.silu(ref(inp))
        yr.backward(g.double())
        _check(f"step {step} output", y, yr[lo:hi])
        _check(f"step {step} d_x", xl.grad, xr.grad[lo:hi])
        if use_skip:
            _check(f"step {step} d_skip", sl.grad, sr.grad[lo:hi])
            dist.all_reduce(gate.grad)  # DDP would all-reduce parameter gradients
            _check(f"step {step} d_gate", gate.grad, gate_r.grad, atol=1e-4)
            gate.grad = None
        for p, pr in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
            dist.all_reduce(p.grad)
            _check(f"step {step} parameter gradient", p.grad, pr.grad, atol=1e-4)
            p.grad = pr.grad = None
        _check(f"step {step} running_mean", ours.running_mean, ref.running_mean)
        _check(f"step {step} running_var", ours.running_var, ref.running_var)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1
    ours.eval()
    ref.eval()
    x = torch.randn(2, C, 4, 5) + 3.0
    _check("eval output", ours(x), F.silu(ref(x.double())))


def _run_plain_rank(rank: int):
    """A plain nn.BatchNorm2d converted inside the gloo group (CPU): synchronised like the fused ones."""
    fusedskip.set_backend("reference")
    torch.manual_seed(4321)
    plain = nn.BatchNorm2d(C)
    ref = copy.deepcopy(plain).double()
    synced = convert_sync_batchnorm(nn.Sequential(plain))[0]
    assert type(synced) is BatchNormAct2d and synced.sync
    x = torch.randn(5, C, 3, 4) * 0.5 + 2.0
    lo, hi = (0, 3) if rank == 0 else (3, 5)
    _check("plain BatchNorm2d output", synced(x[lo:hi]), ref(x.double())[lo:hi])
    _check("plain BatchNorm2d running_var", synced.running_var, ref.running_var)


def _worker(rank: int, world: int, port: int):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for backend_name, momentum in (("reference", 0.1), ("triton", None)):
            _run_rank(rank, backend_name, momentum)
        _run_plain_rank(rank)
    finally:
        dist.destroy_process_group()


def test_two_ranks_gloo_match_batchnorm_on_the_whole_batch():
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    ctx = mp.spawn(_worker, args=(2, _free_port()), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):  # raises with the rank's traceback if one failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two ranks did not finish in 300 s")
