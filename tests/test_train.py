"""Training loop, checkpoints and resume, the command line (errors included), the demo.
(DistributedDataParallel: tests/test_train_ddp.py.)"""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import run_cli

from fusedskip import cli
from fusedskip.data import load_dataset
from fusedskip.train import Interrupted, UsageError, load_checkpoint, run_training, save_checkpoint

TINY = {"dataset": "digits", "limit": 96, "batch_size": 16, "epochs": 3, "lr": 3e-3,
        "model": {"width": 8, "depth": 2}, "eval_sigmas": [25.0], "progress": False, "figures": False,
        "quiet": True, "threads": 1}


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", limit=96)
    data.val = data.val.subset(range(40))
    data.test = data.test.subset(range(40))
    return data


def tiny(out, **kw):
    cfg = dict(TINY, out=str(out))
    model = dict(TINY["model"], **kw.pop("model", {}))
    cfg.update(kw, model=model)
    return cfg


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("run")
    result = run_training(tiny(out, method="fixed", lambda_cls=0.5), data=digits)
    return out, result


def strip_seconds(history):
    epochs = [{k: v for k, v in e.items() if k != "seconds"} for e in history["epochs"]]
    return dict(history, epochs=epochs)


# ----------------------------------------------------------------------------------------------
def test_training_reduces_loss_and_writes_outputs(trained_run):
    out, result = trained_run
    steps = result["history"]["steps"]
    assert len(steps) == 3 * (96 // 16)
    first = sum(s[1] for s in steps[:3]) / 3
    last = sum(s[1] for s in steps[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    epochs = result["history"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert epochs[-1]["train_den_loss"] < epochs[0]["train_den_loss"]
    assert epochs[-1]["train_cls_loss"] < epochs[0]["train_cls_loss"]
    assert len(epochs[0]["gates"]) == 2 and epochs[0]["mtl_weights"] == pytest.approx([1.0, 0.5])
    for name in ("last.pt", "best.pt", "metrics.json"):  # figures: tests/test_study.py::test_demo_end_to_end_tiny
        assert (out / name).is_file(), name
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]["sigma_25"]) >= {"psnr", "ssim", "accuracy", "input_psnr"}
    # checkpoints load with weights_only=True and carry plain JSON-able config
    ckpt = torch.load(out / "last.pt", weights_only=True)
    json.dumps(ckpt["config"]), json.dumps(ckpt["model_config"]), json.dumps(ckpt["history"])
    assert ckpt["epoch"] == 3 and ckpt["step_in_epoch"] == 0


@pytest.mark.parametrize("method", ["dwa", "uncertainty"])
def test_resume_after_interruption_equals_uninterrupted(tmp_path, digits, method):
    """Interrupted mid-epoch (the signal handler's path), resumed: the same model, optimizer
    state, MTL state and history as an uninterrupted run, bit for bit."""
    full = run_training(tiny(tmp_path / "full", method=method), data=digits)
    cfg = tiny(tmp_path / "cut", method=method)
    with pytest.raises(Interrupted):
        run_training(cfg, data=digits, interrupt_after_steps=8)  # epoch 2, step 2 of 6
    ckpt = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 2, 8)
    with pytest.raises(UsageError, match="--resume"):
        run_training(cfg, data=digits)  # refuses to overwrite a run silently
    resumed = run_training(dict(cfg, resume=True), data=digits)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for s1, s2 in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert strip_seconds(a["history"]) == strip_seconds(b["history"])
    assert json.dumps(a["mtl"], default=str) == json.dumps(b["mtl"], default=str)
    assert resumed["test"] == full["test"]


def test_gradient_method_and_hierarchical_variant(tmp_path, digits):
    result = run_training(tiny(tmp_path, epochs=1, method="pcgrad",
                               model={"variant": "hierarchical", "norm": "group", "num_groups": 4}), data=digits)
    assert len(result["history"]["steps"]) == 6 and result["test"]["sigma_25"]["accuracy"] >= 0
    single = run_training(tiny(tmp_path / "st", epochs=1, task="denoise", model={"residual": True}), data=digits)
    assert single["num_classes"] == 0 and "accuracy" not in single["test"]["sigma_25"]


def test_atomic_checkpoint_write(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model_config": {}, "model": {"w": torch.ones(2)}}, str(path))

    def broken_save(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.zeros(2)}}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(2))
    assert os.listdir(tmp_path) == ["last.pt"]


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


FAST = ["--limit", "32", "--batch-size", "16", "--epochs", "1", "--width", "4", "--depth", "2", "--no-progress",
        "--no-figures", "--quiet", "--eval-sigmas", "25", "--threads", "1"]


def assert_usage_error(code, err, pattern):
    assert code == 2, err
    assert "error:" in err and pattern in err, err
    assert "Traceback" not in err


def test_cli_errors(tmp_path, capsys, trained_run):
    run_dir, _ = trained_run
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "train", "--method", "magic", "--out", str(out))
    assert_usage_error(code, err, "unknown method 'magic'")
    code, _, err = run_cli(capsys, "train", "--dataset", "imagenet", "--out", str(out))
    assert_usage_error(code, err, "unknown dataset 'imagenet'")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"garbage")
    code, _, err = run_cli(capsys, "train", "--dataset", "folder", "--root", str(empty), "--out", str(out), *FAST)
    assert_usage_error(code, err, "no readable images")
    code, _, err = run_cli(capsys, "train", "--dataset", "mnist", "--out", str(out), *FAST)
    assert_usage_error(code, err, "--download")
    # a non-writable output directory (a path under a regular file; chmod when not root)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(capsys, "train", "--out", str(blocker / "sub"), *FAST)
    assert_usage_error(code, err, "cannot create output directory")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run_cli(capsys, "train", "--out", str(locked), *FAST)
        assert_usage_error(code, err, "not writable")
    # mismatched channels: a 1-channel model on 3-channel images
    code, _, err = run_cli(capsys, "eval", str(run_dir), "--channels", "3", "--sigma", "25")
    assert_usage_error(code, err, "takes 1-channel images")
    # a checkpoint from another architecture: resume with other model options, --init-from, eval
    arch = tmp_path / "arch"
    arch.mkdir()
    ckpt = torch.load(run_dir / "last.pt", weights_only=True)
    save_checkpoint(ckpt, str(arch / "last.pt"))
    code, _, err = run_cli(capsys, "train", "--resume", "--out", str(arch), *FAST)
    assert_usage_error(code, err, "another architecture")
    code, _, err = run_cli(capsys, "train", "--init-from", str(run_dir / "best.pt"), "--out", str(tmp_path / "i"),
                           *FAST)
    assert_usage_error(code, err, "another architecture")
    tampered = dict(ckpt, model={k: v for k, v in ckpt["model"].items() if not k.startswith("head")})
    save_checkpoint(tampered, str(tmp_path / "tampered.pt"))
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "tampered.pt"))
    assert_usage_error(code, err, "another architecture")
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.pt")
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "foreign.pt"))
    assert_usage_error(code, err, "not a fusedskip training checkpoint")
    (tmp_path / "junk.pt").write_bytes(b"\x00junk")
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "junk.pt"))
    assert_usage_error(code, err, "cannot read checkpoint")
    code, _, err = run_cli(capsys, "eval", str(run_dir), "--gate-value", "1 2 3")
    assert_usage_error(code, err, "one per skip")
    # no checkpoint (half-written or otherwise) was left by any failure
    written = [f for d in (out, arch, tmp_path / "i") if d.exists() for f in os.listdir(d)]
    assert [f for f in written if f.endswith(".tmp")] == [] and "best.pt" not in written
    assert not out.exists() or not os.listdir(out)


def test_cli_error_end_to_end_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fusedskip.cli", "train", "--method", "nope", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown method 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_eval_with_gate_overrides(tmp_path, capsys, trained_run):
    run_dir, _ = trained_run
    code, out, err = run_cli(capsys, "eval", str(run_dir), "--sigma", "25", "--max-images", "24", "--json",
                             str(tmp_path / "e.json"), "--ablate-skips", "--threads", "1")
    assert code == 0, err
    base = json.loads((tmp_path / "e.json").read_text())
    assert base["metrics"]["sigma_25"]["n_images"] == 24 and len(base["ablation"]["per_skip"]) == 2
    code, out, err = run_cli(capsys, "eval", str(run_dir / "last.pt"), "--sigma", "25", "--max-images", "24",
                             "--gate-value", "0", "--json", str(tmp_path / "z.json"), "--threads", "1")
    assert code == 0, err
    zeroed = json.loads((tmp_path / "z.json").read_text())
    assert zeroed["metrics"]["sigma_25"]["psnr"] != base["metrics"]["sigma_25"]["psnr"]
    # the seeded noise: the same numbers on a second evaluation
    code, _, _ = run_cli(capsys, "eval", str(run_dir), "--sigma", "25", "--max-images", "24", "--json",
                         str(tmp_path / "e2.json"), "--threads", "1")
    again = json.loads((tmp_path / "e2.json").read_text())
    assert again["metrics"] == base["metrics"]


def test_cli_help_and_bench(capsys, tmp_path, monkeypatch):
    assert run_cli(capsys, "--help")[0] == 0
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err
    monkeypatch.setattr(cli, "source_root", lambda: None)  # an installed package: no benchmarks/
    code, _, err = run_cli(capsys, "bench")
    assert code == 2 and "source checkout" in err and "Traceback" not in err
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__main__.py").write_text("import sys; print('bench args', sys.argv[1:])")
    monkeypatch.setattr(cli, "source_root", lambda: str(tmp_path))
    code = cli.main(["bench", "--quick"])
    assert code == 0
