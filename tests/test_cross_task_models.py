"""Cross-task modules inside VMSANet and AddUNet: shapes, gradients, config round trips through
the trainer's problems, shared-parameter listing for the MTL methods, off-by-default and errors."""
import pytest
import torch

from fusedskip.data import load_dataset
from fusedskip.dense_data import load_multimnist
from fusedskip.models import AddUNet, build_model
from fusedskip.models.vmsanet import VMSANet
from fusedskip.mtl import make_mtl_method
from fusedskip.train import UsageError
from fusedskip.training.config import make_config
from fusedskip.training.problems import DenoiseClassifyProblem, DenseProblem

KINDS = ("kem", "stable_kem", "cross_attention")
TASKS = ["seg", "cls_left", "denoise"]


def _options(kind):
    return {"num_slots": 4, "topk": 8} if "kem" in kind else {}


@pytest.fixture(autouse=True)
def _reference_backend():
    import fusedskip

    with fusedskip.use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def dense_data():
    return load_multimnist(counts=(8, 4, 4))


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", size=16, seed=0, limit=64)


def _dense_model(data, seed=0, **model):
    cfg = make_config({"dataset": "multimnist", "tasks": TASKS, "backend": "reference",
                       "model": {"name": "vmsanet", "width": 2, "use_cacm": False, "use_vmsm": False, **model}})
    torch.manual_seed(seed)
    return DenseProblem(cfg, data).build_model(cfg)


def _ids(params):
    return {id(p) for p in params}


@pytest.mark.parametrize("kind", KINDS)
def test_vmsanet_cross_task_forward_backward_round_trip(kind, dense_data):
    """Built through DenseProblem from the config keys the CLI writes: same output shapes as the
    plain network, gradients reach the module, the rest of the network starts from the same
    weights, the module's parameters are shared (not any task's), and VMSANet.from_config
    rebuilds it from the recorded config (strict state_dict load, identical outputs)."""
    plain = _dense_model(dense_data)
    model = _dense_model(dense_data, cross_task=kind, cross_task_options=_options(kind), cross_task_stage=2)
    assert model.config["cross_task"] == kind and model.config["cross_task_stage"] == 2
    assert model.config["cross_task_options"] == _options(kind)
    cross = list(model.cross_task.parameters())
    assert cross and model.cross_task.module.dim == VMSANet.decoder_channels(2, model.filters) == 4
    for name, p in plain.state_dict().items():  # built last: the rest starts identical
        torch.testing.assert_close(model.state_dict()[name], p, rtol=0, atol=0)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters()) + \
        sum(p.numel() for p in cross)
    x = torch.rand(2, 1, 32, 32)
    out, ref = model(x), plain(x)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in ref.items()}
    sum(v.float().pow(2).mean() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cross)
    assert any(p.grad.abs().sum() > 0 for p in cross)
    assert _ids(cross) <= _ids(model.shared_parameters())
    assert not _ids(cross) & set().union(*(_ids(ps) for ps in model.task_parameters()))
    rebuilt = VMSANet.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        for k, v in model(x).items():
            torch.testing.assert_close(rebuilt(x)[k], v, rtol=0, atol=0)
    assert rebuilt.config == model.config


def test_vmsanet_cross_task_off_by_default(dense_data):
    """No key, None or "none": no module, the same parameters and the same config as before."""
    default = _dense_model(dense_data)
    none = _dense_model(dense_data, cross_task="none")
    assert default.cross_task is None and none.cross_task is None
    assert default.config == none.config and default.config["cross_task"] is None
    assert "cross_task_options" not in default.config
    assert sum(p.numel() for p in default.parameters()) == sum(p.numel() for p in none.parameters())
    direct = VMSANet({t: 1 for t in TASKS}, 1, [2, 4, 8, 16, 16], use_cacm=False, use_vmsm=False)
    assert direct.cross_task is None and len(direct.shared_parameters()) > 0


def test_gradient_method_updates_cross_task_as_shared(dense_data):
    """A gradient method writes gradients only to listed parameters: the cross-task module gets
    the combined gradient because it is in shared_parameters()."""
    model = _dense_model(dense_data, cross_task="kem", cross_task_options=_options("kem"), cross_task_stage=2)
    method = make_mtl_method("pcgrad", model.shared_parameters(), task_parameters=model.task_parameters())
    out = model(torch.rand(2, 1, 32, 32))
    method.backward([v.float().pow(2).mean() for v in out.values()])
    grads = [p.grad for p in model.cross_task.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("variant", ["paper", "hierarchical"])
@pytest.mark.parametrize("kind", KINDS)
def test_addunet_cross_task(kind, variant):
    """Between the first decoder step and the classifier's deep features: same output shapes,
    gradients reach the module, shared (not denoise's), rebuilt by build_model(config), the rest
    of the model starts from the same weights as without it."""
    kw = dict(in_channels=1, width=4, depth=2, num_classes=10, variant=variant)
    torch.manual_seed(0)
    plain = AddUNet(**kw)
    torch.manual_seed(0)
    model = AddUNet(**kw, cross_task=kind, cross_task_options=_options(kind))
    for name, p in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p, rtol=0, atol=0)
    x = torch.rand(2, 1, 16, 16)
    model.check_cross_task((16, 16))
    (den, logits), (den0, logits0) = model(x), plain(x)
    assert den.shape == den0.shape == x.shape and logits.shape == logits0.shape == (2, 10)
    (den.pow(2).mean() + logits.logsumexp(1).mean()).backward()
    cross = list(model.cross_task.parameters())
    assert all(p.grad is not None for p in cross) and any(p.grad.abs().sum() > 0 for p in cross)
    assert _ids(cross) <= _ids(model.shared_parameters())
    tasks = model.task_parameters()
    assert not _ids(cross) & (_ids(tasks["denoise"]) | _ids(tasks["classify"]))
    assert _ids(model.parameters()) == _ids(model.shared_parameters()) | _ids(tasks["denoise"]) | \
        _ids(tasks["classify"])
    rebuilt = build_model(model.config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[1], model(x)[1], rtol=0, atol=0)
    assert rebuilt.config == model.config and model.config["cross_task"] == kind


def test_addunet_problem_builds_cross_task_and_off_is_unchanged(digits):
    """DenoiseClassifyProblem passes the CLI's keys; off (absent or "none") leaves the config and
    the parameter count exactly as they were."""
    def build(**model):
        cfg = make_config({"dataset": "digits", "task": "joint", "model": {"width": 4, "depth": 2, **model}})
        return DenoiseClassifyProblem(cfg, digits).build_model(cfg)

    off, none = build(), build(cross_task="none")
    assert "cross_task" not in off.config and off.config == none.config
    assert sum(p.numel() for p in off.parameters()) == sum(p.numel() for p in none.parameters())
    on = build(cross_task="kem", cross_task_options={"num_slots": 4, "topk": 8})
    assert on.config["cross_task"] == "kem" and on.cross_task.module.topk == 8
    assert sum(p.numel() for p in on.parameters()) > sum(p.numel() for p in off.parameters())


def test_cross_task_errors(dense_data, digits):
    """Bad kinds, options, stages and sizes are errors that name the argument, before training."""
    with pytest.raises(UsageError, match="--cross-task must be one of"):
        _dense_model(dense_data, cross_task="sgw")
    with pytest.raises(UsageError, match="cross_task_options for 'kem'.*num_slot"):
        _dense_model(dense_data, cross_task="kem", cross_task_options={"num_slot": 4})
    with pytest.raises(UsageError, match=r"topk \(200\).*T·N = 48"):  # 3 tasks × 4×4 tokens at stage 1
        _dense_model(dense_data, cross_task="kem", cross_task_options={"topk": 200}, cross_task_stage=1)
    with pytest.raises(UsageError, match="--cross-task-stage must be a decoder step 0..4"):
        _dense_model(dense_data, cross_task="kem", cross_task_stage=5)
    with pytest.raises(UsageError, match="without --cross-task"):
        _dense_model(dense_data, cross_task_options={"topk": 4})
    with pytest.raises(UsageError, match="mapping"):
        _dense_model(dense_data, cross_task="kem", cross_task_options="topk=4")
    with pytest.raises(UsageError, match="etf_dim.*K - 1 = 7"):  # stable KEM: 8 slots need C >= 7, stage 4 has 2
        _dense_model(dense_data, cross_task="stable_kem")
    with pytest.raises(ValueError, match="cross_task_stage must be a decoder step"):
        VMSANet({"a": 1}, 1, [2, 4, 8, 8, 8], cross_task="kem", cross_task_stage="4")
    with pytest.raises(ValueError, match="needs a classifier"):
        AddUNet(1, width=4, depth=2, num_classes=0, cross_task="kem")
    with pytest.raises(ValueError, match="cross_task must be None or one of"):
        AddUNet(1, width=4, depth=2, num_classes=10, cross_task="KEM")
    cfg = make_config({"dataset": "digits", "task": "denoise", "model": {"width": 4, "depth": 2,
                                                                         "cross_task": "kem"}})
    with pytest.raises(UsageError, match="needs joint training"):
        DenoiseClassifyProblem(cfg, digits).build_model(cfg)
    cfg = make_config({"dataset": "digits", "task": "joint", "model": {"width": 4, "depth": 2, "cross_task": "kem",
                                                                       "cross_task_stage": 2}})
    with pytest.raises(UsageError, match="--cross-task-stage applies to VMSANet"):
        DenoiseClassifyProblem(cfg, digits).build_model(cfg)
    cfg = make_config({"dataset": "digits", "task": "joint", "model": {"width": 4, "depth": 2, "cross_task": "kem",
                                                                       "cross_task_options": {"topk": 1000}}})
    with pytest.raises(UsageError, match=r"16×16 images .*256 \+ 256.*topk \(1000\)"):
        DenoiseClassifyProblem(cfg, digits).build_model(cfg)
