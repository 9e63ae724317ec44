"""``fusedskip train`` speed flags (--amp, --channels-last, --compile) and the cross-task model flags
(--cross-task, --cross-task-stage, --cross-task-option): tiny digits runs on the reference backend."""
import copy
import json
import shutil

import pytest
import torch
from helpers import run_cli
from torch import nn

from fusedskip import cli
from fusedskip.data import load_dataset
from fusedskip.models import build_model
from fusedskip.mtl import available_methods
from fusedskip.train import Interrupted, UsageError, load_checkpoint, run_training
from fusedskip.training.config import MODEL_DEFAULTS, make_method

TINY = {"dataset": "digits", "limit": 32, "batch_size": 16, "epochs": 1, "lr": 1e-3, "backend": "reference",
        "model": {"width": 4, "depth": 2}, "eval_sigmas": [25.0], "progress": False, "figures": False,
        "quiet": True, "threads": 1}
FAST = ["--limit", "32", "--batch-size", "16", "--epochs", "1", "--width", "4", "--depth", "2", "--no-progress",
        "--no-figures", "--quiet", "--eval-sigmas", "25", "--threads", "1", "--backend", "reference"]


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", limit=32)
    data.val = data.val.subset(range(16))
    data.test = data.test.subset(range(16))
    return data


def tiny(out, **kw):
    return dict(TINY, out=str(out), **kw)




class ConvSpy:
    """Records the dtype and memory format of every Conv2d input/output during a run."""

    def __init__(self):
        self.out_dtypes, self.in_channels_last = set(), set()

    def __enter__(self):
        def hook(module, inputs, output):
            if isinstance(module, nn.Conv2d) and module.training:
                x = inputs[0]
                if x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1:  # else both layouts are contiguous
                    self.in_channels_last.add(x.is_contiguous(memory_format=torch.channels_last))
                self.out_dtypes.add(output.dtype)

        self.handle = nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, digits):
    with ConvSpy() as spy:
        result = run_training(tiny(tmp_path_factory.mktemp("fp32")), data=digits)
    return result, spy


def steps(result):
    return torch.tensor([row[1:] for row in result["history"]["steps"]], dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_trains_close_to_fp32(tmp_path, digits, fp32_run, amp, dtype):
    """bf16 and fp16 (GradScaler, also on the CPU) autocast: the convolutions run in the low
    precision, the losses stay close to fp32's, the weights stay fp32, and the gradients the
    optimizer saw (left in .grad by the last step) are unscaled: close to fp32's."""
    fp32, fp32_spy = fp32_run
    with ConvSpy() as spy:
        result = run_training(tiny(tmp_path, amp=amp), data=digits)
    assert fp32_spy.out_dtypes == {torch.float32}
    assert spy.out_dtypes == {dtype}  # the convolutions ran under autocast
    got, ref = steps(result), steps(fp32)
    assert got.shape == ref.shape == (2, 2) and torch.isfinite(got).all()
    assert torch.allclose(got, ref, rtol=2e-2), (got, ref)  # bf16: ~3 significant digits
    assert not torch.equal(got[0], ref[0])
    params = list(result["_model"].parameters())
    assert all(p.dtype == torch.float32 for p in params)  # autocast keeps fp32 weights
    norm = torch.stack([p.grad.norm() for p in params]).norm()
    ref_norm = torch.stack([p.grad.norm() for p in fp32["_model"].parameters()]).norm()
    assert abs(norm / ref_norm - 1) < 0.1, (norm, ref_norm)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert (saved["config"]["amp"], saved["config"]["channels_last"], saved["config"]["compile"]) == (amp, False,
                                                                                                       False)
    assert ("grad_scale" in saved["history"]["epochs"][0]) == (amp == "fp16")


def test_channels_last_matches_nchw(tmp_path, digits, fp32_run):
    fp32, fp32_spy = fp32_run
    with ConvSpy() as spy:
        result = run_training(tiny(tmp_path, channels_last=True), data=digits)
    assert fp32_spy.in_channels_last == {False} and spy.in_channels_last == {True}
    weights = [m.weight for m in result["_model"].modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert torch.allclose(steps(result), steps(fp32), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["channels_last"] is True


def test_fp16_gradscaler_resume_is_exact(tmp_path, digits):
    """fp16 (GradScaler on the CPU) with PCGrad: interrupted and resumed = uninterrupted, and the
    scaler's state travels in the checkpoint."""
    cfg = dict(method="pcgrad", amp="fp16", epochs=2)
    full = run_training(tiny(tmp_path / "full", **cfg), data=digits)
    assert torch.isfinite(steps(full)).all()
    assert full["history"]["epochs"][-1]["amp_skipped_steps"] == 0
    with pytest.raises(Interrupted):
        run_training(tiny(tmp_path / "cut", **cfg), data=digits, interrupt_after_steps=3)
    ckpt = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert ckpt["scaler"]["scale"] == 2.0 ** 16 and ckpt["step_in_epoch"] == 1
    shutil.copytree(tmp_path / "cut", tmp_path / "rescaled")
    resumed = run_training(tiny(tmp_path / "cut", resume=True, **cfg), data=digits)
    assert resumed["history"]["steps"] == full["history"]["steps"]
    full_sd, resumed_sd = full["_model"].state_dict(), resumed["_model"].state_dict()
    assert all(torch.equal(full_sd[k], resumed_sd[k]) for k in full_sd)
    # a scale saved in the checkpoint is the one the resumed run continues from
    ckpt = torch.load(tmp_path / "rescaled" / "last.pt", weights_only=True)
    ckpt["scaler"]["scale"] = 2.0 ** 9
    torch.save(ckpt, tmp_path / "rescaled" / "last.pt")
    run_training(tiny(tmp_path / "rescaled", resume=True, **cfg), data=digits)
    assert load_checkpoint(str(tmp_path / "rescaled" / "last.pt"))["scaler"]["scale"] == 2.0 ** 9


@pytest.mark.parametrize("name", available_methods())
def test_methods_exact_under_grad_scaling(name):
    """What fp16 training relies on: every multi-task method's gradients, given a GradScaler, are
    the unscaled ones times the scale (two steps, so the stateful methods' state is included)."""
    torch.manual_seed(0)
    base = build_model(dict(MODEL_DEFAULTS, width=4, depth=2, num_classes=10))
    x, y = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))

    def grads(scaler):
        model = copy.deepcopy(base)
        method = make_method(name, model, 0.5, {}, num_tasks=2)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            out, logits = model(x)
            losses = [nn.functional.mse_loss(out, x), nn.functional.cross_entropy(logits, y)]
            method.backward(losses, scaler=scaler)
        return [p.grad for p in model.parameters()]

    scaler = torch.amp.GradScaler("cpu", init_scale=3.0 * 2 ** 10)  # not a power of 2: rounding differs
    plain, scaled = grads(None), grads(scaler)
    assert len(plain) == len(scaled) and all(g is not None for g in plain)
    for g, s in zip(plain, scaled):  # relative to the gradient's norm: single elements can cancel
        assert ((s / scaler.get_scale() - g).norm() / g.norm()).item() < 1e-5


def test_compile_option_reaches_torch_compile(tmp_path, capsys, monkeypatch):
    """--compile hands the training model to torch.compile (faked here: inductor's first CPU compile
    takes ~50 s); the checkpoint holds the raw model's weights, not the wrapper's."""
    calls = []

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, x):
            calls.append(x.shape)
            return self._orig_mod(x)

    def fake_compile(module, backend="inductor", **kw):
        calls.append(backend)
        return Wrapper(module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path), "--compile", *FAST)
    assert code == 0, err
    assert calls[0] == "inductor" and len(calls) == 3  # compiled once, then two training steps through it
    ckpt = load_checkpoint(str(tmp_path / "last.pt"))
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert ckpt["config"]["compile"] == "inductor"


def test_compile_aot_eager_with_pcgrad_matches_eager(tmp_path, digits):
    """A real torch.compile (aot_eager: AOTAutograd without code generation) with PCGrad's per-task
    torch.autograd.grad through the compiled graph and channels_last: the eager run's losses."""
    cfg = dict(method="pcgrad", channels_last=True)
    eager = run_training(tiny(tmp_path / "eager", **cfg), data=digits)
    compiled = run_training(tiny(tmp_path / "compiled", compile="aot_eager", **cfg), data=digits)
    assert torch.allclose(steps(compiled), steps(eager), rtol=1e-5, atol=1e-6)
    assert compiled["_model"].state_dict().keys() == eager["_model"].state_dict().keys()


def test_bad_speed_options_exit_2(tmp_path, capsys, monkeypatch, digits):
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "a"), "--amp", "fp8", *FAST)
    assert code == 2 and "--amp" in err and "invalid choice" in err, err
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "b"), "--compile", "no_such_backend", *FAST)
    assert code == 2 and "--compile" in err and "no_such_backend" in err, err
    monkeypatch.setattr("fusedskip.training.config.shutil.which", lambda name: None)
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "c"), "--compile", "--device", "cpu", *FAST)
    assert code == 2 and "--compile" in err and "C++ compiler" in err, err
    assert not (tmp_path / "c" / "last.pt").exists()
    with pytest.raises(UsageError, match="--amp"):
        run_training(tiny(tmp_path / "d", amp="float16"), data=digits)


# ----------------------------------------------------------------------------------------------
def model_config(*argv):
    parser = cli.build_train_parser()
    return cli.config_from_args(parser.parse_args(list(argv)), parser)["model"]


def test_cross_task_flags_build_the_model_config():
    plain = model_config()
    assert not any(k.startswith("cross_task") for k in plain)
    assert model_config("--cross-task", "none") == plain
    add = model_config("--cross-task", "kem", "--cross-task-option", "topk=16", "--cross-task-option", "tau=0.5",
                       "--cross-task-option", "mode=soft")
    assert add == dict(plain, cross_task="kem", cross_task_options={"topk": 16, "tau": 0.5, "mode": "soft"})
    assert model_config("--model", "concat-unet", "--cross-task", "cross_attention")["cross_task_options"] == {}
    vms = model_config("--model", "vmsanet", "--cross-task", "stable_kem", "--cross-task-stage", "2",
                       "--cross-task-option", "heads=[1, 2]")
    assert (vms["cross_task"], vms["cross_task_stage"], vms["cross_task_options"]) == ("stable_kem", 2,
                                                                                       {"heads": [1, 2]})
    assert model_config("--model", "vmsanet", "--cross-task", "kem")["cross_task_stage"] == 4
    assert not any(k.startswith("cross_task") for k in model_config("--model", "vmsanet"))


@pytest.mark.parametrize("argv, flag", [
    (["--cross-task", "kem", "--cross-task-stage", "2"], "--cross-task-stage"),
    (["--cross-task-option", "topk=4"], "--cross-task-option"),
    (["--model", "vmsanet", "--cross-task-stage", "3"], "--cross-task-stage"),
    (["--model", "vmsanet", "--cross-task", "kem", "--cross-task-stage", "5"], "--cross-task-stage"),
    (["--cross-task", "sgw"], "--cross-task"),
    (["--cross-task", "kem", "--cross-task-option", "topk"], "--cross-task-option"),
])
def test_cross_task_flag_errors(capsys, argv, flag):
    parser = cli.build_train_parser()
    with pytest.raises(SystemExit) as exc:
        cli.config_from_args(parser.parse_args(argv), parser)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and flag in err and "error:" in err, err
