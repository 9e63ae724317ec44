"""Training problems: what the generic loop (:mod:`fusedskip.training.loop`) trains.

A problem owns the data, the task list (:class:`~fusedskip.training.tasks.Task`), the model
construction, how a batch becomes model inputs and targets, the losses, the validation and test
metrics and the figures. The loop owns everything else (seeding, DDP, the MTL method, optimizer,
scheduler, checkpoints, resume, signals, metrics.json). Two problems exist:

* :class:`DenoiseClassifyProblem`: AddUNet / concat U-Net, tasks ``den`` (+ ``cls`` when the
  dataset has labels): the original joint denoising + classification setting, bit for bit.
* :class:`DenseProblem`: VMSANet on a dense multi-task dataset (:mod:`fusedskip.dense_data`)
  for any subset of its tasks, with Δm% against single-task baselines.

Contract of a problem (what the loop calls; ``values`` = per-task loss floats in ``loss_keys``
order, ``info`` = :class:`~fusedskip.training.distributed.DistInfo`)::

    tasks, loss_keys, select_key, select_higher, data
    build_model(cfg) -> nn.Module (seeded by the loop; exposes shared_parameters(),
                                   task_parameters(), config)
    describe(model, method_name, device, info, label) -> str
    init_history(history, model)
    train_batch(local_indices, global_count, rank_slice, noise_generator, device) -> (inputs, targets)
    losses(outputs, targets, device) -> list of scalar tensors (one per task)
    loss_values(losses) -> values;  step_row(global_step, values) -> list;  postfix(values) -> dict
    epoch_average(sums) -> list (per task, for method.epoch_end);  epoch_record(epoch, avg, model, method, lr)
    validate(model, info, batch_size, device) -> flat dict merged into the epoch record
    epoch_text(record, avg) -> str;  test(model, info, batch_size, device) -> dict
    final_extras(model, method, test) -> dict;  report_test(test, say, label)
    figures(model, history, out_dir, label, device) -> list of file names
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..data import DataError, Noise, eval_batches, load_dataset
from ..dense_data import DENSE_DATASETS, DenseData, load_dense_dataset
from ..models import build_model
from .common import UsageError
from .config import VMSANET_DEFAULTS, method_weights
from .distributed import DistInfo
from .evaluation import evaluate, sample_images
from .figures import _fmt_gates, save_curves_figure, save_gates_figure, save_samples_figure
from .tasks import Task, delta_m, task_head


def make_noises(cfg: Dict[str, Any]):
    """(training noise, test noises, validation noise) from the config (UsageError on bad σ)."""
    if not cfg["eval_sigmas"]:
        raise UsageError("--eval-sigmas needs at least one noise level")
    try:
        noise = Noise(cfg["sigma"], clip=cfg["clip_noisy"])
        eval_noises = [Noise(s) for s in cfg["eval_sigmas"]]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return noise, eval_noises, noise if not noise.blind else Noise(25.0)


def make_problem(cfg: Dict[str, Any], data=None):
    """The problem ``cfg`` asks for (VMSANet or a dense dataset → :class:`DenseProblem`)."""
    dense_name = str(cfg["dataset"]).lower().replace("_", "-") in DENSE_DATASETS
    if cfg["model"].get("name") == "vmsanet" or isinstance(data, DenseData) or (data is None and dense_name):
        if cfg["model"].get("name") != "vmsanet":
            name = data.name if isinstance(data, DenseData) else cfg["dataset"]
            raise UsageError(f"dataset {name!r} is a dense multi-task set: train it with --model vmsanet")
        return DenseProblem(cfg, data)
    if cfg.get("tasks"):
        raise UsageError("--tasks selects the tasks of --model vmsanet; AddUNet's tasks are set by --task")
    return DenoiseClassifyProblem(cfg, data)


def _cross_task_keys(model_cfg: Dict[str, Any]):
    """(kind or None, options dict or None) from the model config's ``cross_task`` and
    ``cross_task_options`` (UsageError for a bad kind or options that are not a mapping)."""
    from ..mtl.kem import CROSS_TASK_KINDS

    kind, options = model_cfg.get("cross_task"), model_cfg.get("cross_task_options")
    kind = None if kind in (None, False, "none") else kind
    if kind is not None and kind not in CROSS_TASK_KINDS:
        raise UsageError(f"--cross-task must be one of {', '.join(CROSS_TASK_KINDS)}, got {kind!r}")
    if options is not None and not isinstance(options, dict):
        raise UsageError(f"--cross-task-options must be a mapping of keyword options, got {options!r}")
    if kind is None and options:
        raise UsageError(f"--cross-task-options {sorted(options)} given without --cross-task (a kind other than none)")
    return kind, (dict(options or {}) if kind is not None else None)


def _check_cross_task(model, image_size) -> None:
    """The model's cross-task module run once at the training images' size (UsageError)."""
    check = getattr(model, "check_cross_task", None)  # models without the option (DnCNN) have none
    try:
        if check is not None:
            check(image_size)
    except ValueError as exc:
        raise UsageError(f"model: {exc}") from None


def _model_size_check(size, multiple: int, what: str, hint: str) -> None:
    if size[0] % multiple or size[1] % multiple:
        raise UsageError(f"{what} images are {size[0]}×{size[1]}; {hint} needs sizes divisible by {multiple}")


# ----------------------------------------------------------------------------------------------
# AddUNet: joint denoising + classification
# ----------------------------------------------------------------------------------------------
class DenoiseClassifyProblem:
    """AddUNet's setting: tasks ``den`` (MSE/L1 vs the clean image) and, when the dataset has
    labels, ``cls`` (cross-entropy); metrics PSNR/SSIM at σ in ``eval_sigmas`` and accuracy."""

    loss_keys = ["den", "cls"]
    select_key, select_higher = "val_psnr", True

    def __init__(self, cfg: Dict[str, Any], data=None):
        self.cfg = cfg
        if cfg["den_loss"] not in ("mse", "l1"):
            raise UsageError(f"unknown denoising loss {cfg['den_loss']!r} (mse, l1)")
        self.den_loss = F.mse_loss if cfg["den_loss"] == "mse" else F.l1_loss
        self.noise, self.eval_noises, self.val_noise = make_noises(cfg)
        if data is None:
            try:
                data = load_dataset(cfg["dataset"], cfg["root"], cfg["download"], cfg["size"], cfg["channels"],
                                    seed=cfg["seed"], limit=cfg["limit"])
            except DataError as exc:
                raise UsageError(str(exc)) from None
        if not data.train.uniform:
            raise UsageError(f"dataset {data.name!r}: training images must share one size")
        task = cfg["task"]
        if task not in ("auto", "denoise", "joint"):
            raise UsageError(f"unknown task {task!r} (auto, denoise, joint)")
        if task == "joint" and data.num_classes == 0:
            raise UsageError(f"dataset {data.name!r} has no labels: joint denoising + classification needs classes")
        self.data = data
        self.num_classes = data.num_classes if task in ("auto", "joint") else 0
        self.tasks = [Task("den", "denoise", data.channels, loss_name=cfg["den_loss"])]
        if self.num_classes:
            self.tasks.append(Task("cls", "classify", self.num_classes, target="labels"))

    def build_model(self, cfg: Dict[str, Any]) -> nn.Module:
        """The model of ``cfg["model"]``; ``cross_task`` / ``cross_task_options`` put a cross-task
        module between the denoising and classification branches (AddUNet docstring)."""
        model_cfg = dict(cfg["model"])
        model_cfg.update(in_channels=self.data.channels, num_classes=self.num_classes)
        kind, options = _cross_task_keys(model_cfg)
        if model_cfg.pop("cross_task_stage", None) is not None and kind is not None:
            raise UsageError("--cross-task-stage applies to VMSANet: AddUNet's cross-task module always sits "
                             "between its first decoder step and the classifier's deep features")
        if kind is not None:
            if not self.num_classes:
                raise UsageError(f"--cross-task {kind} exchanges features between the denoising and classification "
                                 "branches: it needs joint training (--task joint / auto on a labelled dataset)")
            model_cfg.update(cross_task=kind, cross_task_options=options)
        try:
            model = build_model(model_cfg)
        except ValueError as exc:
            raise UsageError(f"model: {exc}") from None
        _model_size_check(self.data.train.image_size, model.size_multiple, self.data.name,
                          f"the {model.variant} model of depth {model.depth} (change --size or --depth)")
        _check_cross_task(model, self.data.train.image_size)
        return model

    def describe(self, model, method, device, info, label: str) -> str:
        name = getattr(method, "name", self.cfg["method"]) if self.num_classes else "single-task"
        return (f"{label + ': ' if label else ''}{self.data.describe()}; noise {self.noise.describe()}; "
                f"model {model.config['name']} {model.variant} fusion={model.fusion} widths={model.widths} "
                f"({sum(p.numel() for p in model.parameters()):,} parameters); method {name}; device {device}"
                f"{f' × {info.world} processes' if info.active else ''}")

    def init_history(self, history: Dict[str, Any], model) -> None:
        history["initial_gates"] = model.gates(learned=True)

    def train_batch(self, local, global_count: int, sl: slice, gen: torch.Generator, device):
        clean, labels = self.data.train.get(local)
        full_noise = self.noise.sample((global_count, *clean.shape[1:]), gen)
        noisy = self.noise.apply(clean, full_noise[sl])
        clean, noisy = clean.to(device, non_blocking=True), noisy.to(device, non_blocking=True)
        return noisy, {"clean": clean, "labels": labels}

    def losses(self, outputs, targets, device) -> List[torch.Tensor]:
        denoised, logits = outputs
        losses = [self.den_loss(denoised, targets["clean"])]
        if self.num_classes:
            losses.append(F.cross_entropy(logits, targets["labels"].to(device)))
        return losses

    def loss_values(self, losses) -> List[float]:
        return [losses[0].item(), losses[1].item() if self.num_classes else 0.0]

    def step_row(self, global_step: int, values: List[float]) -> list:
        return [global_step, *values] if self.num_classes else [global_step, values[0]]

    def postfix(self, values: List[float]) -> Dict[str, str]:
        return dict(den=f"{values[0]:.4g}", **({"cls": f"{values[1]:.3g}"} if self.num_classes else {}))

    def epoch_average(self, sums: Dict[str, float]) -> List[float]:
        steps = max(sums["steps"], 1)
        return [sums["den"] / steps] + ([sums["cls"] / steps] if self.num_classes else [])

    def epoch_record(self, epoch: int, avg: List[float], model, method, lr: float) -> Dict[str, Any]:
        return {"epoch": epoch + 1, "train_den_loss": avg[0], "train_cls_loss": avg[1] if self.num_classes else None,
                "gates": model.gates(learned=True), "mtl_weights": method_weights(method), "lr": lr, "seconds": None}

    def validate(self, model, info, batch_size: int, device) -> Dict[str, Any]:
        cfg = self.cfg
        val = evaluate(model, self.data.val, self.val_noise, seed=cfg["eval_seed"], batch_size=batch_size,
                       device=device, ssim_impl=cfg["ssim_impl"], quantize=cfg["quantize"], info=info)
        return dict(val_psnr=val["psnr"], val_ssim=val.get("ssim"), val_accuracy=val.get("accuracy"),
                    val_input_psnr=val["input_psnr"])

    def epoch_text(self, record: Dict[str, Any], avg: List[float]) -> str:
        acc = f" acc {record['val_accuracy']:.4f}" if record.get("val_accuracy") is not None else ""
        val_txt = (f"  val PSNR {record['val_psnr']:.2f} dB SSIM {record['val_ssim']:.4f}{acc}"
                   if record.get("val_psnr") is not None else "")
        loss_txt = f"den {avg[0]:.5f}" + (f" cls {avg[1]:.4f}" if self.num_classes else "")
        w = record["mtl_weights"]
        w_txt = f"  w [{' '.join(f'{x:.3g}' for x in w)}]" if self.num_classes and w else ""
        return f"{loss_txt}{val_txt}  gates {_fmt_gates(record['gates'])}{w_txt}"

    def test(self, model, info, batch_size: int, device) -> Dict[str, Any]:
        cfg = self.cfg
        return {f"sigma_{ev.describe().split('=')[-1]}": evaluate(
            model, self.data.test, ev, seed=cfg["eval_seed"], batch_size=batch_size, device=device,
            ssim_impl=cfg["ssim_impl"], quantize=cfg["quantize"], info=info) for ev in self.eval_noises}

    def final_extras(self, model, method, test) -> Dict[str, Any]:
        return dict(final_gates=model.gates(learned=True), final_mtl_weights=method_weights(method),
                    num_classes=self.num_classes, parameters=sum(p.numel() for p in model.parameters()))

    def report_test(self, test: Dict[str, Any], say, label: str) -> None:
        for key, m in test.items():
            acc = f"  accuracy {m['accuracy']:.4f}" if "accuracy" in m else ""
            say(f"{label + ' ' if label else ''}test {key.replace('sigma_', 'σ=')}: PSNR {m['psnr']:.2f} dB "
                f"(noisy input {m['input_psnr']:.2f})  SSIM {m.get('ssim', math.nan):.4f}{acc}  "
                f"[{m['n_images']} images]")

    def figures(self, model, history, out_dir: str, label: str, device) -> List[str]:
        rows = sample_images(model, self.data.test, self.val_noise, self.cfg["eval_seed"], device)
        name = label or "model"
        save_samples_figure(os.path.join(out_dir, "samples.png"), {name: rows},
                            f"{self.data.name}, {self.val_noise.describe()}")
        save_gates_figure(os.path.join(out_dir, "gates.png"),
                          {name: [history.get("initial_gates", [])] + [e["gates"] for e in history["epochs"]]})
        save_curves_figure(os.path.join(out_dir, "curves.png"), {name: history})
        return ["samples.png", "gates.png", "curves.png"]


# ----------------------------------------------------------------------------------------------
# VMSANet: any tasks of a dense multi-task dataset
# ----------------------------------------------------------------------------------------------
def load_baselines(spec) -> Dict[str, Dict[str, float]]:
    """Single-task test metrics ``{task: {metric: value}}`` from a mapping, or from metrics.json
    files / run folders of single-task runs (their ``test`` entries, merged)."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return {str(k): dict(v) for k, v in spec.items()}
    merged: Dict[str, Dict[str, float]] = {}
    for path in ([spec] if isinstance(spec, str) else list(spec)):
        file = os.path.join(path, "metrics.json") if os.path.isdir(path) else path
        try:
            with open(file) as f:
                test = json.load(f)["test"]
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"--baselines: cannot read single-task test metrics from {file!r} "
                             f"({type(exc).__name__}: {exc})") from None
        for task, metrics in test.items():
            if isinstance(metrics, dict) and task != "delta_m":
                merged[task] = dict(metrics)
    return merged


class DenseProblem:
    """VMSANet on a dense multi-task dataset for the tasks ``cfg["tasks"]`` (default: all the
    dataset offers). With a ``denoise`` task the network sees noisy images (training noise as in
    AddUNet's setting, seeded evaluation noise at ``sigma``); otherwise clean ones."""

    def __init__(self, cfg: Dict[str, Any], data=None):
        self.cfg = cfg
        self.noise, _, self.val_noise = make_noises(cfg)
        if data is None:
            try:
                data = load_dense_dataset(cfg["dataset"], cfg["root"], cfg["size"], cfg["seed"],
                                          num_classes=cfg.get("num_classes"), limit=cfg["limit"],
                                          channels=cfg["channels"])
            except DataError as exc:
                raise UsageError(str(exc)) from None
        if not isinstance(data, DenseData):
            raise UsageError(f"--model vmsanet trains dense multi-task datasets ({', '.join(DENSE_DATASETS)}); "
                             f"{getattr(data, 'name', data)!r} is not one")
        self.data = data
        self.tasks = self._resolve_tasks(cfg.get("tasks"), data, cfg["den_loss"])
        self.loss_keys = [t.name for t in self.tasks]
        self.select_key = f"val_{self.tasks[0].name}_{self.tasks[0].primary}"
        self.select_higher = self.tasks[0].higher_is_better[self.tasks[0].primary]
        self.noisy_input = any(t.kind == "denoise" for t in self.tasks)
        self.baselines = load_baselines(cfg.get("baselines"))

    @staticmethod
    def _resolve_tasks(names, data: DenseData, den_loss: str) -> List[Task]:
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        names = list(names) if names else list(data.tasks)
        if len(set(names)) != len(names):
            raise UsageError(f"--tasks lists a task twice: {', '.join(names)}")
        tasks = []
        for name in names:
            if name not in data.tasks:
                raise UsageError(f"unknown task {name!r} for dataset {data.name!r}; it offers "
                                 f"{', '.join(data.tasks)}")
            kind, channels = data.tasks[name]
            tasks.append(Task(name, kind, channels, target=None if kind == "denoise" else name,
                              loss_name=den_loss if kind == "denoise" else "default"))
        return tasks

    def build_model(self, cfg: Dict[str, Any]) -> nn.Module:
        from ..models.vmsanet import VMSANet

        opts = {k: cfg["model"].get(k, v) for k, v in VMSANET_DEFAULTS.items()}
        width = int(cfg["model"].get("width") or 64)
        filters = opts["filters"] or [width, 2 * width, 4 * width, 8 * width, 8 * width]
        kind, options = _cross_task_keys(cfg["model"])
        stage = cfg["model"].get("cross_task_stage")
        stage = 4 if stage is None else stage
        if not isinstance(stage, int) or isinstance(stage, bool) or not 0 <= stage <= 4:
            raise UsageError(f"--cross-task-stage must be a decoder step 0..4 (0 deepest, 4 full resolution), "
                             f"got {stage!r}")
        try:
            model = VMSANet({t.name: task_head(t, int(filters[0])) for t in self.tasks}, self.data.channels,
                            filters, use_cacm=bool(opts["use_cacm"]), use_vmsm=bool(opts["use_vmsm"]),
                            vmsm_fusion=opts["vmsm_fusion"], cacm_reduction=int(opts["cacm_reduction"]),
                            cross_task=kind, cross_task_options=options, cross_task_stage=stage,
                            residual_tasks=[t.name for t in self.tasks if t.kind == "denoise"]
                            if opts["residual_denoise"] else ())
        except ValueError as exc:
            raise UsageError(f"model: {exc}") from None
        model.config["task_kinds"] = {t.name: [t.kind, t.out_channels] for t in self.tasks}
        _model_size_check(self.data.train.image_size, model.size_multiple, self.data.name, "VMSANet (5 poolings)")
        _check_cross_task(model, self.data.train.image_size)
        return model

    def describe(self, model, method, device, info, label: str) -> str:
        c = model.config
        return (f"{label + ': ' if label else ''}{self.data.describe()}; tasks {', '.join(self.loss_keys)}"
                f"{f'; input noise {self.noise.describe()}' if self.noisy_input else ''}; model vmsanet "
                f"filters={c['filters']} cacm={c['use_cacm']} vmsm={c['use_vmsm']}"
                f"{'(' + c['vmsm_fusion'] + ')' if c['use_vmsm'] else ''} "
                f"({sum(p.numel() for p in model.parameters()):,} parameters); "
                f"method {getattr(method, 'name', self.cfg['method'])}; device {device}"
                f"{f' × {info.world} processes' if info.active else ''}")

    def init_history(self, history: Dict[str, Any], model) -> None:
        history["tasks"] = [{"name": t.name, "kind": t.kind, "metrics": list(t.metrics),
                             "higher_is_better": dict(t.higher_is_better)} for t in self.tasks]

    def _inputs(self, clean: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        return self.noise.apply(clean, noise) if noise is not None else clean

    def train_batch(self, local, global_count: int, sl: slice, gen: torch.Generator, device):
        clean, targets = self.data.train.get(local)
        inputs = clean
        if self.noisy_input:
            full_noise = self.noise.sample((global_count, *clean.shape[1:]), gen)
            inputs = self._inputs(clean, full_noise[sl])
        targets = dict(targets, clean=clean)
        return inputs.to(device, non_blocking=True), targets

    def _target(self, task: Task, targets, device) -> torch.Tensor:
        return targets["clean" if task.kind == "denoise" else task.target].to(device, non_blocking=True)

    def losses(self, outputs, targets, device) -> List[torch.Tensor]:
        return [t.loss(outputs[t.name], self._target(t, targets, device)) for t in self.tasks]

    def loss_values(self, losses) -> List[float]:
        return [float(v.item()) for v in losses]

    def step_row(self, global_step: int, values: List[float]) -> list:
        return [global_step, *values]

    def postfix(self, values: List[float]) -> Dict[str, str]:
        return {k: f"{v:.4g}" for k, v in zip(self.loss_keys, values)}

    def epoch_average(self, sums: Dict[str, float]) -> List[float]:
        steps = max(sums["steps"], 1)
        return [sums[k] / steps for k in self.loss_keys]

    def epoch_record(self, epoch: int, avg: List[float], model, method, lr: float) -> Dict[str, Any]:
        record: Dict[str, Any] = {"epoch": epoch + 1}
        record.update({f"train_{k}_loss": v for k, v in zip(self.loss_keys, avg)})
        record.update(mtl_weights=method_weights(method), lr=lr, seconds=None)
        return record

    @torch.no_grad()
    def _measure(self, model, split, info, batch_size: int, device, noise: Optional[Noise] = None,
                 seed: Optional[int] = None, limit: Optional[int] = None) -> Dict[str, Dict[str, float]]:
        """Every task's metrics on ``split`` (its first ``limit`` samples), inputs noised with
        ``noise`` (default: the validation noise) seeded per image by ``seed`` (default: the
        config's eval_seed) when a task denoises."""
        from .evaluation import unwrap

        net = unwrap(model)
        was_training = net.training
        net.eval()
        meters = [t.meter() for t in self.tasks]
        noise = noise or self.val_noise
        seed = self.cfg["eval_seed"] if seed is None else seed
        count = len(split) if limit is None else min(limit, len(split))
        try:
            for idx in eval_batches(count, batch_size, info.rank, info.world):
                clean, targets = split.get(idx)
                inputs = noise.eval_noisy(clean, idx.tolist(), seed) if self.noisy_input else clean
                outputs = net(inputs.to(device))
                targets = dict(targets, clean=clean)
                for t, m in zip(self.tasks, meters):
                    m.update(outputs[t.name], self._target(t, targets, "cpu"))
            for m in meters:
                m.all_reduce()
        finally:
            net.train(was_training)
        return {t.name: m.compute() for t, m in zip(self.tasks, meters)}

    def validate(self, model, info, batch_size: int, device) -> Dict[str, Any]:
        res = self._measure(model, self.data.val, info, batch_size, device)
        return {f"val_{task}_{metric}": v for task, ms in res.items() for metric, v in ms.items()}

    def epoch_text(self, record: Dict[str, Any], avg: List[float]) -> str:
        loss_txt = " ".join(f"{k} {v:.4g}" for k, v in zip(self.loss_keys, avg))
        val = "  ".join(f"{t.name} {t.primary} {record[f'val_{t.name}_{t.primary}']:.4f}" for t in self.tasks
                        if record.get(f"val_{t.name}_{t.primary}") is not None)
        w = record["mtl_weights"]
        w_txt = f"  w [{' '.join(f'{x:.3g}' for x in w)}]" if w and len(self.tasks) > 1 else ""
        return f"loss {loss_txt}{'  val ' + val if val else ''}{w_txt}"

    def test(self, model, info, batch_size: int, device) -> Dict[str, Any]:
        return self._measure(model, self.data.test, info, batch_size, device)

    def evaluate(self, model, split: str, batch_size: int, device, noise: Optional[Noise] = None,
                 seed: Optional[int] = None, limit: Optional[int] = None) -> Dict[str, Dict[str, float]]:
        """``fusedskip eval``: every task's metrics on the named split in this process."""
        return self._measure(model, getattr(self.data, split), DistInfo(), batch_size, device, noise, seed, limit)

    def final_extras(self, model, method, test) -> Dict[str, Any]:
        dm = delta_m(test, self.baselines, self.tasks) if len(self.tasks) > 1 and self.baselines else None
        return dict(tasks=self.loss_keys, final_mtl_weights=method_weights(method), delta_m=dm,
                    baselines=self.baselines or None, parameters=sum(p.numel() for p in model.parameters()))

    def report_test(self, test: Dict[str, Any], say, label: str) -> None:
        for task, ms in test.items():
            say(f"{label + ' ' if label else ''}test {task}: " + "  ".join(f"{k} {v:.4f}" for k, v in ms.items()))
        if len(self.tasks) > 1:
            dm = delta_m(test, self.baselines, self.tasks) if self.baselines else None
            say(f"{label + ' ' if label else ''}Δm% vs single-task baselines: "
                + (f"{dm:+.2f}" if dm is not None else "not computed (give --baselines: single-task runs' folders)"))

    def figures(self, model, history, out_dir: str, label: str, device) -> List[str]:
        from .dense_figures import save_dense_curves, save_dense_samples

        save_dense_curves(os.path.join(out_dir, "curves.png"), history, self.tasks, label or "model")
        save_dense_samples(os.path.join(out_dir, "samples.png"), self, model, device)
        return ["samples.png", "curves.png"]
