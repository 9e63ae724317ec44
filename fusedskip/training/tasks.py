"""The task abstraction: a task = name, kind, target, head size, loss, metrics and, per metric,
whether higher is better. The trainer, checkpoints, metrics JSON and figures work from a list of
tasks; the multi-task gain Δm% compares a run with single-task baselines.

Kinds (:data:`TASK_KINDS`):

=============  ===================  =============================================  =====================
kind           target               loss                                           metrics (↑ / ↓)
=============  ===================  =============================================  =====================
``denoise``    the clean image      MSE (or L1) of the output vs the clean image   psnr ↑ (per image)
``classify``   int64 ``[N]``        cross-entropy                                  accuracy ↑
``segment``    int64 ``[N, H, W]``  cross-entropy, label −1 ignored                miou ↑, pixel_acc ↑
``depth``      float ``[N,1,H,W]``  L1 over pixels with ground truth ≠ 0           abs_err ↓, rel_err ↓
=============  ===================  =============================================  =====================

Metrics are accumulated as sums in one float64 vector per task (:class:`TaskMeter`), so an
evaluation sharded over processes all-reduces them and reads the same numbers as one process.
mIoU averages the IoU of the classes present in prediction or ground truth over the whole split
(confusion matrix, as MTAN's code); depth errors are averaged over all valid pixels of the split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

TASK_KINDS = ("denoise", "classify", "segment", "depth")
IGNORE_INDEX = -1
_METRICS = {"denoise": ("psnr",), "classify": ("accuracy",), "segment": ("miou", "pixel_acc"),
            "depth": ("abs_err", "rel_err")}
_HIGHER = {"psnr": True, "accuracy": True, "miou": True, "pixel_acc": True, "abs_err": False, "rel_err": False}


@dataclass(frozen=True)
class Task:
    """One task. ``target``: key of the dataset's targets (``None`` for denoise: the clean image);
    ``out_channels``: classes (classify, segment), image channels (denoise) or 1 (depth)."""

    name: str
    kind: str
    out_channels: int
    target: Optional[str] = None
    loss_name: str = "default"
    metrics: Tuple[str, ...] = field(default=())
    higher_is_better: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {TASK_KINDS}, got {self.kind!r}")
        if not self.metrics:
            object.__setattr__(self, "metrics", _METRICS[self.kind])
        if not self.higher_is_better:
            object.__setattr__(self, "higher_is_better", {m: _HIGHER[m] for m in self.metrics})
        if self.loss_name not in ("default", "mse", "l1"):
            raise ValueError(f"task {self.name!r}: unknown loss {self.loss_name!r}")

    @property
    def primary(self) -> str:
        return self.metrics[0]

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.kind == "denoise":
            return F.l1_loss(pred, target) if self.loss_name == "l1" else F.mse_loss(pred, target)
        if self.kind == "classify":
            return F.cross_entropy(pred, target)
        if self.kind == "segment":
            return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX)
        valid = (target != 0).to(pred.dtype)  # depth: L1 on pixels with ground truth
        return ((pred - target).abs() * valid).sum() / valid.sum().clamp_min(1.0)

    def meter(self) -> "TaskMeter":
        return TaskMeter(self)


class TaskMeter:
    """Sums of one task's metrics over an evaluation (see the module docstring)."""

    def __init__(self, task: Task):
        self.task = task
        k = task.out_channels
        self.sums = torch.zeros(k * k if task.kind == "segment" else 3, dtype=torch.float64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        pred, target = pred.detach().float().cpu(), target.detach().cpu()
        kind = self.task.kind
        if kind == "denoise":
            mse = (pred.clamp(0, 1) - target.float()).pow(2).flatten(1).mean(1).double()
            self.sums += torch.tensor([float((10 * torch.log10(1.0 / mse.clamp_min(1e-12))).sum()), len(mse), 0.0],
                                      dtype=torch.float64)
        elif kind == "classify":
            self.sums += torch.tensor([float((pred.argmax(1) == target).sum()), len(target), 0.0], dtype=torch.float64)
        elif kind == "segment":
            k = self.task.out_channels
            valid = target != IGNORE_INDEX
            idx = target[valid] * k + pred.argmax(1)[valid]
            self.sums += torch.bincount(idx, minlength=k * k).double()
        else:
            valid = target != 0
            err = (pred - target).abs()[valid].double()
            self.sums += torch.stack([err.sum(), (err / target[valid].double().abs()).sum(),
                                      torch.tensor(float(valid.sum()), dtype=torch.float64)])

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)

    def compute(self) -> Dict[str, float]:
        s, kind = self.sums, self.task.kind
        if kind in ("denoise", "classify"):
            return {self.task.primary: float(s[0] / s[1]) if s[1] else math.nan}
        if kind == "segment":
            k = self.task.out_channels
            cm = s.view(k, k)
            inter, union = cm.diag(), cm.sum(0) + cm.sum(1) - cm.diag()
            present = union > 0
            miou = float((inter[present] / union[present]).mean()) if present.any() else math.nan
            total = float(cm.sum())
            return {"miou": miou, "pixel_acc": float(inter.sum()) / total if total else math.nan}
        n = float(s[2])
        return {"abs_err": float(s[0]) / n if n else math.nan, "rel_err": float(s[1]) / n if n else math.nan}


def task_head(task: Task, channels: int) -> nn.Module:
    """A head for ``task`` on a full-resolution task feature ``[B, channels, H, W]``: the released
    dense head (Conv3×3 → Conv1×1) for dense kinds; for classification Conv3×3-ReLU → 4×4
    adaptive average pool (keeps where a digit is) → linear."""
    if task.kind == "classify":
        return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                             nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * channels, task.out_channels))
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, task.out_channels, 1))


def delta_m(results: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]],
            tasks: Sequence[Task]) -> Optional[float]:
    """Multi-task gain Δm% (Maninis, Radosavovic, Kokkinos, CVPR 2019): the mean over the tasks'
    metrics of ``(−1)^l (M_mt − M_st) / M_st · 100``, ``l`` = 1 where lower is better (with one
    metric per task exactly the paper's mean over tasks; with several, the usual mean over all
    metrics). ``None`` when a baseline value is missing or zero."""
    terms: List[float] = []
    for task in tasks:
        for metric in task.metrics:
            base = (baselines.get(task.name) or {}).get(metric)
            value = (results.get(task.name) or {}).get(metric)
            if base is None or value is None or base == 0 or not math.isfinite(base) or not math.isfinite(value):
                return None
            sign = 1.0 if task.higher_is_better[metric] else -1.0
            terms.append(sign * (value - base) / abs(base) * 100.0)
    return sum(terms) / len(terms) if terms else None
