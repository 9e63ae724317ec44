"""The training loop, generic over a problem (:mod:`fusedskip.training.problems`) and its tasks.

One step: a global batch (a seeded permutation per epoch), the problem turns each process's slice
into inputs and targets (noise drawn for the whole global batch from a generator every process
shares, so N processes see exactly what one would), forward, one loss per task, the multi-task
method's backward (default: fixed weights), optimizer step. Checkpoints, resume, signals, the
metrics JSON and DDP are as described in :mod:`fusedskip.train`.

Speed options: ``amp`` autocasts the forward and the losses (bf16, or fp16 with a GradScaler whose
scale is handed to the multi-task method's ``backward``: the gradient methods' weights do not
depend on a common scale of the task gradients; gradients are unscaled before ``grad_clip``; the
scaler's state is checkpointed). ``channels_last`` converts the model and the input batches;
``compile`` runs the (DDP-wrapped) model through ``torch.compile``; the raw model is what is
evaluated and checkpointed. Evaluation runs in full precision.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import backend as _backend
from ..data import global_batches, rank_slice
from ..metrics import SSIM_IMPLEMENTATIONS
from .common import (
    CHECKPOINT_FORMAT,
    Interrupted,
    StopFlag,
    UsageError,
    _version,
    config_differences,
    ensure_writable_dir,
    jsonable,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json,
)
from .config import (
    amp_dtype,
    compile_backend,
    load_method_state,
    make_config,
    make_method,
    make_scheduler,
    method_state,
)
from .distributed import DistInfo, configure_threads, convert_batchnorm_for_ddp, resolve_device, setup_distributed
from .problems import make_problem

# Options a resumed run may change without a note (they change speed or output, not the run's numbers).
RESUME_IGNORED = {"resume", "overwrite", "out", "progress", "quiet", "threads", "device", "figures", "backend",
                  "compile", "channels_last"}


def run_training(cfg: Dict[str, Any], *, log: Optional[Callable[[str], None]] = None,
                 interrupt_after_steps: Optional[int] = None, data=None, label: str = "") -> Dict[str, Any]:
    """Train as ``cfg`` says (see :data:`~fusedskip.training.config.DEFAULTS`); returns the
    metrics dict also written to ``OUT/metrics.json`` (plus ``_model``). Raises UsageError on
    bad input, Interrupted after saving a mid-epoch checkpoint when stopped by a signal (or after
    ``interrupt_after_steps`` steps, the tests' stand-in for one). ``data``: an already loaded
    ImageData (AddUNet) or DenseData (VMSANet)."""
    cfg = make_config(cfg)
    device = str(cfg["device"])
    device_kind = "cuda" if (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda") else "cpu"
    out_dir = ensure_writable_dir(cfg["out"])
    info = setup_distributed(device_kind)
    try:
        run = Run(cfg, info, out_dir, log, label)
        run.prepare(data)
        return run.train(interrupt_after_steps)
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class Run:
    """One training run: set-up (:meth:`prepare`), epochs (:meth:`train`), final test."""

    def __init__(self, cfg: Dict[str, Any], info: DistInfo, out_dir: str, log, label: str):
        self.cfg, self.info, self.out_dir, self.log, self.label = cfg, info, out_dir, log, label
        self.quiet = cfg["quiet"] or not info.is_main
        self.last_path, self.best_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
        self.metrics_path = os.path.join(out_dir, "metrics.json")

    def say(self, msg: str) -> None:
        if self.quiet:
            return
        if self.log is not None:
            self.log(msg)
        else:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    # ---- set-up ----------------------------------------------------------------------------------
    def prepare(self, data) -> None:
        cfg, info = self.cfg, self.info
        try:
            _backend.set_backend(cfg["backend"])
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.device = resolve_device(cfg["device"], info)
        if self.device.type == "cpu":
            configure_threads(cfg["threads"])
        self._speed_options()
        if cfg["deterministic"]:
            torch.use_deterministic_algorithms(True)
        if cfg["ssim_impl"] not in SSIM_IMPLEMENTATIONS:
            raise UsageError(f"unknown SSIM implementation {cfg['ssim_impl']!r} ({', '.join(SSIM_IMPLEMENTATIONS)})")
        if cfg["batch_size"] < 1 or cfg["batch_size"] % info.world:
            raise UsageError(f"--batch-size {cfg['batch_size']} (global) must be a positive multiple of the "
                             f"process count {info.world}")
        self.resume = self._find_resume()
        self.problem = make_problem(cfg, data)
        if len(self.problem.data.train) < cfg["batch_size"]:
            raise UsageError(f"the training set ({len(self.problem.data.train)} images) is smaller than one batch "
                             f"({cfg['batch_size']})")
        self._build_model()
        self._build_optimisation()
        self._restore_or_start()

    def _speed_options(self) -> None:
        """Check --amp and --compile against the device (UsageError naming the flag, before any work)."""
        cfg, kind = self.cfg, self.device.type
        self.amp_dtype = amp_dtype(cfg["amp"])
        if self.amp_dtype is not None:
            if not torch.amp.is_autocast_available(kind):
                raise UsageError(f"--amp {cfg['amp']}: torch has no autocast for device type {kind!r}")
            if self.amp_dtype is torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
                raise UsageError("--amp bf16: this GPU does not support bfloat16; use --amp fp16")
        self.compile_backend = compile_backend(cfg["compile"], kind)
        self.channels_last = bool(cfg["channels_last"])

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_format(self, x):
        """Input batches in channels_last (4-D tensors, also inside tuples/lists) when asked."""
        if not self.channels_last:
            return x
        if isinstance(x, torch.Tensor):
            return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
        if isinstance(x, (list, tuple)):
            return type(x)(self._to_format(v) for v in x)
        return x

    def _find_resume(self) -> Optional[Dict[str, Any]]:
        cfg, last_path = self.cfg, self.last_path
        if cfg["resume"] and os.path.isfile(last_path):
            resume = load_checkpoint(last_path)
            if resume.get("format") != CHECKPOINT_FORMAT:
                raise UsageError(f"{last_path!r} is not a resumable fusedskip training checkpoint")
            return resume
        if os.path.isfile(last_path) and not cfg["overwrite"] and not cfg["resume"]:
            raise UsageError(f"{self.out_dir!r} already holds a run (last.pt): pass --resume to continue it, "
                             "--overwrite to start over, or choose another --out")
        return None

    def _build_model(self) -> None:
        cfg, resume = self.cfg, self.resume
        torch.manual_seed(cfg["seed"])
        np.random.seed(cfg["seed"] % 2 ** 32)
        random.seed(cfg["seed"])
        model = self.problem.build_model(cfg)
        if resume is not None:
            diffs = config_differences(resume["model_config"], model.config)
            if diffs:
                raise UsageError(f"--resume: {self.last_path!r} was written for another architecture "
                                 f"({'; '.join(diffs[:4])}); use the same model options or another --out")
            load_weights(model, resume["model"], self.last_path)
            changed = [d for d in config_differences(
                {k: v for k, v in (resume.get("config") or {}).items() if k not in RESUME_IGNORED},
                {k: v for k, v in cfg.items() if k not in RESUME_IGNORED}) if d]
            if changed:
                self.say("note: resuming with options that differ from the checkpoint's (the optimizer, scheduler "
                         f"and MTL state come from the checkpoint): {'; '.join(changed[:6])}")
        elif cfg["init_from"]:
            init = load_checkpoint(cfg["init_from"])
            load_weights(model, init["model"], f"--init-from {init['_path']!r}")
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.ddp_model: nn.Module = model  # what the method's ddp_context sees (DDP, never the compiled wrapper)
        if self.info.active:
            model = convert_batchnorm_for_ddp(model, self.device, self.say)
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.ddp_model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        self.train_model: nn.Module = self.ddp_model
        if self.compile_backend is not None:
            self.train_model = torch.compile(self.ddp_model, backend=self.compile_backend)
        self.model = model

    def _build_optimisation(self) -> None:
        cfg = self.cfg
        self.method = make_method(cfg["method"], self.model, cfg["lambda_cls"], cfg["method_options"],
                                  num_tasks=len(self.problem.tasks))
        params = list(self.model.parameters()) + list(self.method.extra_parameters())
        self.optimizer = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        self.scheduler = make_scheduler(self.optimizer, cfg)
        self.scaler = None
        if self.amp_dtype is torch.float16:
            try:
                self.scaler = torch.amp.GradScaler(self.device.type)
            except (RuntimeError, ValueError) as exc:
                raise UsageError(f"--amp fp16: no GradScaler for device type {self.device.type!r} ({exc})") from None
        self.amp_skipped = 0  # optimizer steps the GradScaler skipped (inf/NaN gradients) this epoch

    def _fresh_sums(self) -> Dict[str, float]:
        return {**{k: 0.0 for k in self.problem.loss_keys}, "steps": 0}

    def _restore_or_start(self) -> None:
        problem, resume = self.problem, self.resume
        self.history: Dict[str, Any] = {"epochs": [], "steps": []}
        self.start_epoch, self.start_step, self.global_step = 0, 0, 0
        self.epoch_sums = self._fresh_sums()
        self.noise_gen = torch.Generator()
        self.best = {problem.select_key: -math.inf if problem.select_higher else math.inf, "epoch": None}
        if resume is not None:
            self.optimizer.load_state_dict(resume["optimizer"])
            self.scheduler.load_state_dict(resume["scheduler"])
            load_method_state(self.method, resume.get("mtl") or {})
            if self.scaler is not None and resume.get("scaler"):
                self.scaler.load_state_dict(resume["scaler"])
            self.amp_skipped = int(resume.get("amp_skipped", 0))
            self.history = resume["history"]
            self.start_epoch, self.start_step = int(resume["epoch"]), int(resume["step_in_epoch"])
            self.global_step = int(resume["global_step"])
            self.epoch_sums = dict(resume["epoch_sums"])
            self.best = dict(resume.get("best") or self.best)
            set_rng_state(resume["rng"])
            self.noise_gen.set_state(resume["noise_rng"])
            self.say(f"resumed {self.last_path} at epoch {self.start_epoch + 1}, step {self.start_step}")
        if self.info.is_main and not self.quiet:
            self.say(problem.describe(self.model, self.method, self.device, self.info, self.label)
                     + f"; backend {_backend.get_backend()}" + self._speed_text())
        if not self.history["epochs"] and resume is None:
            problem.init_history(self.history, self.model)
        self.result: Dict[str, Any] = {
            "config": jsonable(self.cfg), "model_config": self.model.config, "dataset": problem.data.describe(),
            "dataset_notes": problem.data.notes, "world_size": self.info.world, "history": self.history}

    def _speed_text(self) -> str:
        parts = [f"amp {self.cfg['amp']}" + (" + GradScaler" if self.scaler is not None else "")
                 if self.amp_dtype is not None else "",
                 "channels_last" if self.channels_last else "",
                 f"torch.compile ({self.compile_backend})" if self.compile_backend else ""]
        return "".join(f"; {p}" for p in parts if p)

    # ---- checkpoints -----------------------------------------------------------------------------
    def checkpoint(self, epoch: int, step_in_epoch: int) -> None:
        if not self.info.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "config": jsonable(self.cfg), "model_config": self.model.config,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "mtl": method_state(self.method), "epoch": epoch,
            "step_in_epoch": step_in_epoch, "global_step": self.global_step, "epoch_sums": dict(self.epoch_sums),
            "noise_rng": self.noise_gen.get_state(), "rng": rng_state(), "history": self.history, "best": self.best,
            "fusedskip_version": _version(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "amp_skipped": self.amp_skipped,
        }
        save_checkpoint(state, self.last_path)

    def _save_best(self, record: Dict[str, Any], epoch: int) -> None:
        key, value = self.problem.select_key, record.get(self.problem.select_key)
        if value is None or not (value > self.best[key] if self.problem.select_higher else value < self.best[key]):
            return
        self.best = {key: value, "epoch": epoch + 1}
        if self.info.is_main:
            save_checkpoint({"format": CHECKPOINT_FORMAT + "-weights", "model_config": self.model.config,
                             "model": self.model.state_dict(), "config": jsonable(self.cfg), "epoch": epoch + 1,
                             key: value}, self.best_path)

    # ---- training --------------------------------------------------------------------------------
    def train(self, interrupt_after_steps: Optional[int]) -> Dict[str, Any]:
        self.interrupt_after_steps = interrupt_after_steps
        with StopFlag() as stop:
            for epoch in range(self.start_epoch, self.cfg["epochs"]):
                t0 = time.time()
                self._train_epoch(epoch, stop)
                self._end_epoch(epoch, t0)
        return self._finish()

    def _train_epoch(self, epoch: int, stop: StopFlag) -> None:
        from tqdm.auto import tqdm

        cfg, info, label = self.cfg, self.info, self.label
        batches = global_batches(len(self.problem.data.train), cfg["batch_size"], cfg["seed"], epoch, drop_last=True)
        if self.start_step == 0 or epoch != self.start_epoch:
            self.noise_gen.manual_seed(cfg["seed"] * 7_919 + epoch + 1)
            self.epoch_sums = self._fresh_sums()
            first = 0
        else:
            first = self.start_step
        self.train_model.train()
        bar = tqdm(total=len(batches), initial=first,
                   desc=f"{label + ' ' if label else ''}epoch {epoch + 1}/{cfg['epochs']}",
                   disable=True if (self.quiet or not cfg["progress"]) else None, leave=False, dynamic_ncols=True)
        for step in range(first, len(batches)):
            values, stop_now = self._step(batches[step], stop)
            bar.set_postfix(**self.problem.postfix(values))
            bar.update(1)
            if stop_now:
                bar.close()
                self.checkpoint(epoch, step + 1)
                if info.active:
                    dist.barrier()
                self.say(f"interrupted at epoch {epoch + 1}, step {step + 1}/{len(batches)}: saved {self.last_path}; "
                         "continue with --resume")
                raise Interrupted(self.last_path)
            if cfg["checkpoint_every"] and self.global_step % cfg["checkpoint_every"] == 0 and step + 1 < len(batches):
                self.checkpoint(epoch, step + 1)
        bar.close()

    def _step(self, gbatch: torch.Tensor, stop: StopFlag):
        """One optimizer step on a global batch; returns (rank-averaged loss values, stop?)."""
        info, problem, device = self.info, self.problem, self.device
        sl = rank_slice(gbatch, info.rank, info.world)
        inputs, targets = problem.train_batch(gbatch[sl], len(gbatch), sl, self.noise_gen, device)
        # Gradient MTL methods average per-task gradients themselves: no DDP sync then.
        method = self.method
        ddp_ctx = method.ddp_context(self.ddp_model) if hasattr(method, "ddp_context") else contextlib.nullcontext()
        with ddp_ctx:
            with self._autocast():
                outputs = self.train_model(self._to_format(inputs))
                losses = [loss.float() for loss in problem.losses(outputs, targets, device)]
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                method.backward(losses)
            else:
                method.backward(losses, scaler=self.scaler)
        self._optimizer_step()
        self.global_step += 1
        stop_now = stop.requested or (self.interrupt_after_steps is not None
                                      and self.global_step >= self.interrupt_after_steps)
        vals = torch.tensor([*problem.loss_values(losses), float(stop_now)], dtype=torch.float64)
        if info.active:
            if dist.get_backend() == "nccl":
                vals = vals.to(device)
            dist.all_reduce(vals)
            vals = vals.cpu()
            vals[:-1] /= info.world
        *values, stop_v = vals.tolist()
        for k, v in zip(problem.loss_keys, values):
            self.epoch_sums[k] += v
        self.epoch_sums["steps"] += 1
        self.history["steps"].append(problem.step_row(self.global_step, values))
        return values, stop_v > 0

    def _optimizer_step(self) -> None:
        """Clip (after unscaling) and step; with a GradScaler, a step with inf/NaN gradients is
        skipped (and counted) and the scale backs off."""
        scaler, clip = self.scaler, self.cfg["grad_clip"]
        if scaler is None:
            if clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
            return
        if clip:
            scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        before = scaler.get_scale()
        scaler.step(self.optimizer)
        scaler.update()
        if scaler.get_scale() < before:
            self.amp_skipped += 1

    def _eval_batch(self) -> int:
        return max(self.cfg["batch_size"] // self.info.world, 64)

    def _end_epoch(self, epoch: int, t0: float) -> None:
        cfg, info, problem = self.cfg, self.info, self.problem
        avg = problem.epoch_average(self.epoch_sums)
        self.method.epoch_end(avg)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        record = problem.epoch_record(epoch, avg, self.model, self.method, lr)
        if self.scaler is not None:
            record.update(amp_skipped_steps=self.amp_skipped, grad_scale=self.scaler.get_scale())
            self.amp_skipped = 0
        if info.active:  # evaluate and checkpoint with rank 0's BatchNorm running statistics
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)
        if cfg["eval_every"] and ((epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]):
            record.update(problem.validate(self.model, info, self._eval_batch(), self.device))
        record["seconds"] = time.time() - t0
        self.history["epochs"].append(record)
        self._save_best(record, epoch)
        self.checkpoint(epoch + 1, 0)
        self.start_step = 0
        if info.is_main:
            write_json(self.result, self.metrics_path)
        self.say(f"{self.label + ' ' if self.label else ''}epoch {epoch + 1}/{cfg['epochs']}  "
                 f"{problem.epoch_text(record, avg)}  lr {lr:.2e}  {record['seconds']:.1f}s")

    def _finish(self) -> Dict[str, Any]:
        problem, result = self.problem, self.result
        test = problem.test(self.model, self.info, self._eval_batch(), self.device)
        result.update(test=test, best=self.best, **problem.final_extras(self.model, self.method, test))
        if self.info.is_main:
            problem.report_test(test, self.say, self.label)
            if self.cfg["figures"]:
                try:
                    result["figures"] = problem.figures(self.model, self.history, self.out_dir, self.label,
                                                        self.device)
                except Exception as exc:  # figures are a convenience: never lose a finished run to them
                    self.say(f"warning: could not draw figures ({type(exc).__name__}: {exc})")
            write_json(result, self.metrics_path)
        result["_model"] = self.model
        return result
