"""The task abstraction: losses, metric meters against hand computations, Δm%."""
import math

import pytest
import torch
from torch.nn import functional as F

from fusedskip.training.tasks import Task, delta_m, task_head


def test_task_defaults_and_losses():
    seg = Task("seg", "segment", 3, target="seg")
    assert seg.metrics == ("miou", "pixel_acc") and seg.higher_is_better == {"miou": True, "pixel_acc": True}
    depth = Task("depth", "depth", 1, target="depth")
    assert depth.higher_is_better == {"abs_err": False, "rel_err": False}
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0] = -1
    assert torch.allclose(seg.loss(logits, target), F.cross_entropy(logits, target, ignore_index=-1))
    pred, gt = torch.randn(2, 1, 4, 5), torch.rand(2, 1, 4, 5) + 0.5
    gt[:, :, :2] = 0
    expected = (pred - gt).abs()[gt != 0].mean()
    assert torch.allclose(depth.loss(pred, gt), expected)
    den = Task("den", "denoise", 1, loss_name="l1")
    assert torch.allclose(den.loss(pred, gt), F.l1_loss(pred, gt))
    with pytest.raises(ValueError, match="kind"):
        Task("x", "regress", 1)
    with pytest.raises(ValueError, match="loss"):
        Task("x", "denoise", 1, loss_name="huber")


def test_meters_match_hand_computation():
    torch.manual_seed(0)
    seg = Task("seg", "segment", 3, target="seg")
    m = seg.meter()
    logits = torch.randn(4, 3, 6, 6)
    target = torch.randint(-1, 3, (4, 6, 6))
    m.update(logits[:2], target[:2])
    m.update(logits[2:], target[2:])
    pred, valid = logits.argmax(1), target != -1
    ious = []
    for c in range(3):
        inter = ((pred == c) & (target == c) & valid).sum()
        union = (((pred == c) | (target == c)) & valid).sum()
        if union:
            ious.append(float(inter) / float(union))
    out = m.compute()
    assert out["miou"] == pytest.approx(sum(ious) / len(ious))
    assert out["pixel_acc"] == pytest.approx(float((pred == target)[valid].float().mean()))

    cls = Task("c", "classify", 5, target="c").meter()
    cls.update(torch.eye(5)[[0, 1, 2, 3]], torch.tensor([0, 1, 0, 0]))
    assert cls.compute() == {"accuracy": 0.5}

    den = Task("d", "denoise", 1).meter()
    clean = torch.rand(3, 1, 8, 8)
    noisy = clean + 0.1 * torch.randn_like(clean)
    den.update(noisy, clean)
    mse = (noisy.clamp(0, 1) - clean).pow(2).flatten(1).mean(1)
    assert den.compute()["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-6)

    dep = Task("z", "depth", 1).meter()
    gt = torch.rand(2, 1, 3, 3) + 1
    gt[0, 0, 0] = 0
    pr = gt + 0.5
    dep.update(pr, gt)
    assert dep.compute()["abs_err"] == pytest.approx(0.5)
    assert dep.compute()["rel_err"] == pytest.approx(float((0.5 / gt[gt != 0]).mean()))


def test_delta_m():
    tasks = [Task("seg", "segment", 3), Task("depth", "depth", 1)]
    base = {"seg": {"miou": 0.5, "pixel_acc": 0.8}, "depth": {"abs_err": 0.2, "rel_err": 0.4}}
    same = delta_m(base, base, tasks)
    assert same == 0.0
    better = {"seg": {"miou": 0.55, "pixel_acc": 0.8}, "depth": {"abs_err": 0.18, "rel_err": 0.4}}
    # +10% mIoU, 0, −10% error counts as +10%, 0 → mean +5%
    assert delta_m(better, base, tasks) == pytest.approx(5.0)
    assert delta_m(better, {"seg": base["seg"]}, tasks) is None  # a missing baseline
    assert math.isfinite(delta_m(better, base, tasks[:1]))


def test_task_heads():
    cls = task_head(Task("c", "classify", 10), 4)
    assert cls(torch.randn(2, 4, 32, 32)).shape == (2, 10)
    seg = task_head(Task("s", "segment", 3), 4)
    assert seg(torch.randn(2, 4, 32, 32)).shape == (2, 3, 32, 32)
