"""DistributedDataParallel training: 2 processes on gloo (CPU) against one process on the same
global batch (own file: spawning two interpreters takes a while)."""
import json
import os

import pytest
import torch

from fusedskip.data import load_dataset
from fusedskip.train import run_training, spawn_training

TINY = {"dataset": "digits", "limit": 64, "batch_size": 16, "epochs": 2, "lr": 3e-3,
        "model": {"width": 8, "depth": 2}, "eval_sigmas": [25.0], "progress": False, "figures": False,
        "quiet": True, "threads": 1}


def test_ddp_two_processes_match_one(tmp_path):
    """Same global batch: 2 DDP processes (synchronised fused BatchNorm, PCGrad on globally averaged
    per-task gradients under no_sync) give the losses, gates and MTL weights of one."""
    cfg = dict(TINY, method="pcgrad")
    data = load_dataset("digits", limit=64)
    data.val, data.test = data.val.subset(range(32)), data.test.subset(range(48))
    one = run_training(dict(cfg, out=str(tmp_path / "one")), data=data)
    spawn_training(dict(cfg, out=str(tmp_path / "two")), nprocs=2, threads=1, data=data)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2
    a = torch.tensor(one["history"]["steps"])
    b = torch.tensor(two["history"]["steps"])
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)
    for e1, e2 in zip(one["history"]["epochs"], two["history"]["epochs"]):
        assert e2["gates"] == pytest.approx(e1["gates"], rel=1e-4)
        assert e2["mtl_weights"] == pytest.approx(e1["mtl_weights"], rel=1e-4)
    assert two["test"]["sigma_25"]["psnr"] == pytest.approx(one["test"]["sigma_25"]["psnr"], abs=1e-3)
    assert sorted(os.listdir(tmp_path / "two")) == ["best.pt", "last.pt", "metrics.json"]
