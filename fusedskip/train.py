"""Training and evaluation of AddUNet for joint denoising + classification.

``python -m fusedskip.train [options]`` (= ``fusedskip train``), also under
``torchrun --nproc_per_node=N -m fusedskip.train ...`` (DistributedDataParallel).

One step: a global batch of clean images (a seeded permutation per epoch), Gaussian noise drawn
for the whole global batch from a generator every process shares (each process takes its slice,
so N processes see exactly the images and noise one process would), forward, task losses
``[L_den, L_cls]`` (MSE, cross-entropy), the multi-task method's backward (default: fixed
weights, ``L_den + λ·L_cls``), optimizer step.

Checkpoints (``OUT/last.pt``, ``OUT/best.pt``) are written atomically (temporary file +
``os.replace``) and hold only tensors and plain Python types (``torch.load(weights_only=True)``):
model, optimizer, scheduler, MTL method state, RNG states (torch, CUDA, NumPy, Python, noise
generator), epoch and position in it, metrics history, config as JSON-able dicts. SIGINT/SIGTERM
stop at the next step boundary and save a mid-epoch checkpoint; ``--resume`` continues exactly
where the run stopped. ``OUT/metrics.json`` holds the config, per-epoch history (losses,
validation PSNR/SSIM/accuracy, gates, MTL weights, learning rate) and final test metrics; PNG
figures (``samples.png``, ``gates.png``, ``curves.png``) are drawn at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from . import backend as _backend
from .data import (
    DATASETS,
    DataError,
    ImageData,
    ImageSet,
    Noise,
    eval_batches,
    global_batches,
    load_dataset,
    rank_slice,
)
from .distributed import convert_sync_batchnorm
from .metrics import SSIM_IMPLEMENTATIONS, MetricSums
from .models import AddUNet, build_model, pad_to_multiple
from .mtl import FixedWeighting, available_methods, make_mtl_method
from .mtl.methods import _ALIASES

CHECKPOINT_FORMAT = "fusedskip-train-v1"
EXIT_INTERRUPTED = 130

MODEL_DEFAULTS: Dict[str, Any] = {
    "name": "addunet", "variant": "paper", "fusion": "gated", "width": 32, "depth": 4, "kernel_size": 3,
    "convs_per_block": 2, "norm": "batch", "num_groups": 32, "act": "relu", "last_act": True, "stem_act": "relu",
    "gate": "softplus", "gate_init": None, "residual": False, "classifier_hidden": 0, "width_mult": 2,
    "max_width": None, "down": "maxpool", "up": "bilinear",
}

DEFAULTS: Dict[str, Any] = {
    "dataset": "digits", "root": None, "download": False, "size": None, "channels": None, "limit": None,
    "task": "auto", "model": dict(MODEL_DEFAULTS),
    "method": "fixed", "lambda_cls": 1.0, "method_options": {},
    "den_loss": "mse", "sigma": 25.0, "clip_noisy": False, "eval_sigmas": [15.0, 25.0, 50.0], "eval_seed": 1234,
    "epochs": 10, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0, "scheduler": "cosine", "grad_clip": 0.0,
    "seed": 0, "device": "auto", "backend": "auto", "ssim_impl": "skimage", "quantize": False,
    "out": "runs/train", "resume": False, "overwrite": False, "init_from": None, "checkpoint_every": 0,
    "eval_every": 1, "progress": True, "figures": True, "deterministic": False, "quiet": False, "threads": None,
}


class UsageError(Exception):
    """Bad input found after argument parsing: reported as ``prog: error: message``, exit 2."""


class Interrupted(Exception):
    """Training stopped by a signal (or the test hook) after saving a mid-epoch checkpoint."""


# ----------------------------------------------------------------------------------------------
# Small utilities
# ----------------------------------------------------------------------------------------------
def jsonable(value):
    """Plain JSON-able copy (tuples → lists, tensors → lists, numpy scalars → Python)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def atomic_write_bytes(path: str, write: Callable[[Any], None]) -> None:
    """Write via a temporary file in the same folder, fsync, then ``os.replace``: a reader (or a
    crash) never sees a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(obj: Dict[str, Any], path: str) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def write_json(obj: Any, path: str) -> None:
    data = json.dumps(jsonable(obj), indent=2, allow_nan=True).encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def ensure_writable_dir(path: str) -> str:
    """Create ``path`` if needed and check a file can be written there (UsageError otherwise)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {path!r}: {exc.strerror or exc}") from None
    if not os.path.isdir(path):
        raise UsageError(f"output path {path!r} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"output directory {path!r} is not writable: {exc.strerror or exc}") from None
    return path


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Load a fusedskip checkpoint with ``weights_only=True`` (UsageError with a clear reason)."""
    if os.path.isdir(path):
        for name in ("best.pt", "last.pt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise UsageError(f"no checkpoint (best.pt or last.pt) in directory {path!r}")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot read checkpoint {path!r}: {first[:300]}") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise UsageError(f"{path!r} is not a fusedskip training checkpoint (no model_config/model entries)")
    ckpt["_path"] = path
    return ckpt


def model_from_checkpoint(ckpt: Dict[str, Any]) -> AddUNet:
    try:
        model = build_model(ckpt["model_config"])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"checkpoint {ckpt.get('_path', '')!r} describes a model this version cannot build: {exc}") from None
    load_weights(model, ckpt["model"], ckpt.get("_path", "checkpoint"))
    return model


def load_weights(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with a readable error for another architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:2])})")
        raise UsageError(f"{source} holds weights of another architecture: {', '.join(parts)}")
    model.load_state_dict(state)


def config_differences(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if jsonable(a.get(k)) != jsonable(b.get(k))]


# ----------------------------------------------------------------------------------------------
# Distributed set-up
# ----------------------------------------------------------------------------------------------
class DistInfo:
    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, owns_group: bool = False):
        self.rank, self.world, self.local_rank, self.owns_group = rank, world, local_rank, owns_group

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> DistInfo:
    """Initialise torch.distributed under torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if device_kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def configure_threads(threads: Optional[int] = None) -> int:
    """Set torch's CPU thread count: ``threads`` if given; else, unless OMP_NUM_THREADS is set,
    no more threads than idle cores (by the 1-minute load average). On a busy machine OpenMP
    threads that wait for a core make small convolutions many times slower than one thread."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
        return threads
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    current = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        idle = int(cores - os.getloadavg()[0] + 0.5)
    except (AttributeError, OSError):
        return current
    n = max(1, min(current, idle))
    if n != current:
        torch.set_num_threads(n)
    return n


def resolve_device(name: str, info: Optional[DistInfo] = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda asked for but no CUDA GPU is available")
        if name == "cuda" and info is not None and info.active:
            return torch.device("cuda", info.local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None


def convert_batchnorm_for_ddp(model: nn.Module, device: torch.device, log: Callable[[str], None]) -> nn.Module:
    """Synchronise BatchNorm statistics across processes: fusedskip.distributed's converter for
    the fused BatchNormAct2d (keeps them fused; works on gloo/CPU too), then torch's
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` for any plain BatchNorm left (GPU only)."""
    model = convert_sync_batchnorm(model)
    plain = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and not isinstance(m, nn.SyncBatchNorm)]
    if plain:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log(f"warning: {len(plain)} plain BatchNorm layer(s) keep per-process statistics (torch's SyncBatchNorm "
                "needs GPUs); use --norm group or instance for results independent of the process count")
    return model


# ----------------------------------------------------------------------------------------------
# Multi-task methods
# ----------------------------------------------------------------------------------------------
def mtl_method_names(aliases: bool = False) -> List[str]:
    """Method names fusedskip.mtl offers (with its aliases if asked)."""
    names = list(available_methods())
    if aliases:
        names += list(_ALIASES)
    return names


def check_method_name(name: str) -> bool:
    key = str(name).strip().lower().replace("-", "_")
    return key in mtl_method_names(aliases=True)


def make_method(name: str, model: AddUNet, lambda_cls: float, options: Dict[str, Any]):
    """The multi-task method: fusedskip.mtl's ``make_mtl_method`` (shared = encoder, task
    parameters = decoder/gates/head and classifier). Denoising only (``num_classes=0``): fixed
    weight ``[1]``, i.e. ``L_den.backward()``, whatever ``name`` and ``options`` say."""
    if model.num_classes == 0:
        return FixedWeighting(model.shared_parameters(), weights=[1.0])
    options = dict(options)
    key = str(name).strip().lower().replace("-", "_")
    if key == "fixed" and "weights" not in options:
        options.setdefault("lam", lambda_cls)
    try:
        return make_mtl_method(name, model.shared_parameters(), task_parameters=model.task_parameters(),
                               **options)
    except (KeyError, ValueError, TypeError) as exc:
        raise UsageError(f"--method {name!r}: {exc}") from None


def method_state(method) -> Dict[str, Any]:
    fn = getattr(method, "state_dict", None)
    return fn() if callable(fn) else {}


def load_method_state(method, state: Dict[str, Any]) -> None:
    fn = getattr(method, "load_state_dict", None)
    if callable(fn) and state:
        fn(state)


def method_weights(method) -> Optional[List[float]]:
    w = getattr(method, "last_weights", None)
    if w is None:
        return None
    if isinstance(w, torch.Tensor):
        w = w.detach().cpu().tolist()
    return [float(x) for x in w]


# ----------------------------------------------------------------------------------------------
# RNG state (plain types only, for weights_only checkpoints)
# ----------------------------------------------------------------------------------------------
def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> AddUNet:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


@torch.no_grad()
def denoise(model: AddUNet, noisy: torch.Tensor):
    """Forward in eval mode, padding H, W to the model's multiple (reflect) and cropping back."""
    padded, (h, w) = pad_to_multiple(noisy, model.size_multiple)
    out, logits = model(padded)
    return out[..., :h, :w], logits


@torch.no_grad()
def evaluate(model: nn.Module, images: ImageSet, noise: Noise, *, seed: int = 1234, batch_size: int = 64,
             device: torch.device = torch.device("cpu"), ssim_impl: str = "skimage", quantize: bool = False,
             info: Optional[DistInfo] = None, limit: Optional[int] = None, with_ssim: bool = True) -> Dict[str, float]:
    """PSNR/SSIM per image averaged, input PSNR, accuracy — with seeded noise (same noisy
    images at every evaluation); shards images over processes and all-reduces the sums."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    info = info or DistInfo()
    n = len(images) if limit is None else min(limit, len(images))
    sums = MetricSums(ssim_impl=ssim_impl, quantize=quantize, with_ssim=with_ssim)
    try:
        for idx in eval_batches(n, batch_size, info.rank, info.world, images.uniform):
            clean, labels = images.get(idx)
            noisy = noise.eval_noisy(clean, idx.tolist(), seed)
            out, logits = denoise(net, noisy.to(device))
            sums.update(out.float().cpu(), clean, noisy, None if logits is None else logits.float().cpu(), labels)
        sums.all_reduce()
    finally:
        net.train(was_training)
    return sums.compute()


@torch.no_grad()
def sample_images(model: nn.Module, images: ImageSet, noise: Noise, seed: int, device: torch.device, n: int = 8):
    """(noisy, denoised, clean, labels, predictions) of the first ``n`` images, for figures."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    rows = []
    try:
        for i in range(min(n, len(images))):
            clean, labels = images.get([i])
            noisy = noise.eval_noisy(clean, [i], seed)
            out, logits = denoise(net, noisy.to(device))
            rows.append((noisy[0], out[0].float().cpu().clamp(0, 1), clean[0],
                         None if labels is None else int(labels[0]),
                         None if logits is None else int(logits.argmax(1)[0])))
    finally:
        net.train(was_training)
    return rows


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _show(ax, img: torch.Tensor):
    img = img.detach().float().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def save_samples_figure(path: str, rows_by_model: Dict[str, list], title: str = "") -> None:
    """Grid: noisy, then each model's denoised output, then clean, for a few images."""
    plt = _pyplot()
    labels = list(rows_by_model)
    first = rows_by_model[labels[0]]
    n = len(first)
    lines = ["noisy"] + [f"denoised: {m}" for m in labels] + ["clean"]
    fig, axes = plt.subplots(len(lines), n, figsize=(1.3 * n + 1.6, 1.35 * len(lines)), squeeze=False)
    for c in range(n):
        _show(axes[0][c], first[c][0])
        for r, m in enumerate(labels, start=1):
            noisy, out, clean, label, pred = rows_by_model[m][c]
            _show(axes[r][c], out)
            if pred is not None:
                axes[r][c].set_xlabel(f"pred {pred}", fontsize=7, color="green" if pred == label else "red", labelpad=1)
        _show(axes[-1][c], first[c][2])
        if first[c][3] is not None:
            axes[-1][c].set_xlabel(f"label {first[c][3]}", fontsize=7, labelpad=1)
    for r, name in enumerate(lines):
        axes[r][0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_gates_figure(path: str, gate_histories: Dict[str, List[List[Any]]], title: str = "") -> None:
    """Gate of each skip (shallowest = skip 1) over training; one panel per run, shared y-axis.

    ``gate_histories[run]`` = per-epoch lists of gate values (entry 0 = initial gates);
    per-channel gates are shown as their mean.
    """
    plt = _pyplot()
    runs = [r for r in gate_histories if gate_histories[r]]
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(4.4 * len(runs), 3.3), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        hist = gate_histories[run]
        L = len(hist[0])
        cmap = plt.get_cmap("viridis")
        for k in range(L):
            ys = [_gate_scalar(h[k]) for h in hist]
            ax.plot(range(len(hist)), ys, marker="o", ms=3, color=cmap(k / max(L - 1, 1)),
                    label=f"skip {k + 1}" + (" (shallowest)" if k == 0 else " (deepest)" if k == L - 1 else ""))
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gate a = softplus(β)")
    axes[0][-1].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _gate_scalar(value) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (list, tuple)):
        return float(np.mean(value))
    return float(value)


def save_curves_figure(path: str, histories: Dict[str, Dict[str, Any]]) -> None:
    """Training losses and validation PSNR (and accuracy) per epoch, one line per run."""
    plt = _pyplot()
    keys = [("train_den_loss", "denoising loss (train)"), ("val_psnr", "validation PSNR (dB)"),
            ("val_accuracy", "validation accuracy")]
    keys = [k for k in keys if any(any(e.get(k[0]) is not None for e in h["epochs"]) for h in histories.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    colours = {run: f"C{i}" for i, run in enumerate(histories)}  # one colour per run in every panel
    for ax, (key, label) in zip(axes[0], keys):
        for run, h in histories.items():
            xs = [e["epoch"] for e in h["epochs"] if e.get(key) is not None]
            ys = [e[key] for e in h["epochs"] if e.get(key) is not None]
            if xs:
                ax.plot(xs, ys, marker="o", ms=3, label=run, color=colours[run])
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if key == "train_den_loss":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
class StopFlag:
    """Set by SIGINT/SIGTERM; checked at step boundaries (a second SIGINT aborts at once)."""

    def __init__(self):
        self.requested = False
        self._previous: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def make_config(overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS)
    for k, v in (overrides or {}).items():
        if k == "model":
            cfg["model"].update(v or {})
        elif k not in cfg:
            raise ValueError(f"unknown training option {k!r}")
        else:
            cfg[k] = v
    return cfg


def _scheduler(optimizer, cfg: Dict[str, Any]):
    name = cfg["scheduler"]
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg["epochs"], 1), eta_min=cfg["lr"] * 0.01)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(cfg["epochs"] // 3, 1), gamma=0.5)
    if name == "none":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise UsageError(f"unknown scheduler {name!r} (cosine, step, none)")


def _den_loss(name: str):
    if name == "mse":
        return F.mse_loss
    if name == "l1":
        return F.l1_loss
    raise UsageError(f"unknown denoising loss {name!r} (mse, l1)")


def _fmt_gates(gates: List[Any]) -> str:
    return "[" + " ".join("—" if g is None else f"{_gate_scalar(g):.3f}" for g in gates) + "]"


def run_training(cfg: Dict[str, Any], *, log: Optional[Callable[[str], None]] = None,
                 interrupt_after_steps: Optional[int] = None, data: Optional[ImageData] = None,
                 label: str = "") -> Dict[str, Any]:
    """Train as ``cfg`` says (see :data:`DEFAULTS`); returns the metrics dict also written to
    ``OUT/metrics.json``. Raises UsageError on bad input, Interrupted after saving a mid-epoch
    checkpoint when stopped by a signal (or after ``interrupt_after_steps`` steps, the tests'
    stand-in for one)."""
    cfg = make_config(cfg)
    device_kind = "cuda" if (cfg["device"] == "auto" and torch.cuda.is_available()) or str(cfg["device"]).startswith("cuda") else "cpu"
    out_dir = ensure_writable_dir(cfg["out"])
    info = setup_distributed(device_kind)
    try:
        return _train(cfg, info, out_dir, log, interrupt_after_steps, data, label)
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, info: DistInfo, out_dir: str, log, interrupt_after_steps, data, label) -> Dict[str, Any]:
    quiet = cfg["quiet"] or not info.is_main

    def say(msg: str) -> None:
        if quiet:
            return
        if log is not None:
            log(msg)
        else:
            from tqdm.auto import tqdm

            tqdm.write(msg)

    try:
        _backend.set_backend(cfg["backend"])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    device = resolve_device(cfg["device"], info)
    if device.type == "cpu":
        configure_threads(cfg["threads"])
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True)
    if cfg["ssim_impl"] not in SSIM_IMPLEMENTATIONS:
        raise UsageError(f"unknown SSIM implementation {cfg['ssim_impl']!r} ({', '.join(SSIM_IMPLEMENTATIONS)})")
    if cfg["batch_size"] < 1 or cfg["batch_size"] % info.world:
        raise UsageError(f"--batch-size {cfg['batch_size']} (global) must be a positive multiple of the "
                         f"process count {info.world}")
    den_loss = _den_loss(cfg["den_loss"])
    if not cfg["eval_sigmas"]:
        raise UsageError("--eval-sigmas needs at least one noise level")
    try:
        noise = Noise(cfg["sigma"], clip=cfg["clip_noisy"])
        eval_noises = [Noise(s) for s in cfg["eval_sigmas"]]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    val_noise = noise if not noise.blind else Noise(25.0)

    last_path, best_path = os.path.join(out_dir, "last.pt"), os.path.join(out_dir, "best.pt")
    resume = None
    if cfg["resume"] and os.path.isfile(last_path):
        resume = load_checkpoint(last_path)
        if resume.get("format") != CHECKPOINT_FORMAT:
            raise UsageError(f"{last_path!r} is not a resumable fusedskip training checkpoint")
    elif os.path.isfile(last_path) and not cfg["overwrite"] and not cfg["resume"]:
        raise UsageError(f"{out_dir!r} already holds a run (last.pt): pass --resume to continue it, "
                         "--overwrite to start over, or choose another --out")

    # ---- data ---------------------------------------------------------------------------------
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
    num_classes = data.num_classes if task in ("auto", "joint") else 0
    if len(data.train) < cfg["batch_size"]:
        raise UsageError(f"the training set ({len(data.train)} images) is smaller than one batch ({cfg['batch_size']})")

    # ---- model ----------------------------------------------------------------------------------
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"] % 2 ** 32)
    random.seed(cfg["seed"])
    model_cfg = dict(cfg["model"])
    model_cfg.update(in_channels=data.channels, num_classes=num_classes)
    try:
        model = build_model(model_cfg)
    except ValueError as exc:
        raise UsageError(f"model: {exc}") from None
    size = data.train.image_size
    if size[0] % model.size_multiple or size[1] % model.size_multiple:
        raise UsageError(f"{data.name} images are {size[0]}×{size[1]}; the {model.variant} model of depth "
                         f"{model.depth} needs sizes divisible by {model.size_multiple} (change --size or --depth)")
    if resume is not None:
        diffs = config_differences(resume["model_config"], model.config)
        if diffs:
            raise UsageError(f"--resume: {last_path!r} was written for another architecture ({'; '.join(diffs[:4])}); "
                             "use the same model options or another --out")
        load_weights(model, resume["model"], last_path)
        ignore = {"resume", "overwrite", "out", "progress", "quiet", "threads", "device", "figures", "backend"}
        changed = [d for d in config_differences({k: v for k, v in (resume.get("config") or {}).items() if k not in ignore},
                                                 {k: v for k, v in cfg.items() if k not in ignore}) if d]
        if changed:
            say("note: resuming with options that differ from the checkpoint's (the optimizer, scheduler and "
                f"MTL state come from the checkpoint): {'; '.join(changed[:6])}")
    elif cfg["init_from"]:
        init = load_checkpoint(cfg["init_from"])
        load_weights(model, init["model"], f"--init-from {init['_path']!r}")
    model.to(device)
    train_model: nn.Module = model
    if info.active:
        train_model = convert_batchnorm_for_ddp(model, device, say)
        model = train_model
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_model = nn.parallel.DistributedDataParallel(model, **ddp_kwargs)

    method = make_method(cfg["method"], model, cfg["lambda_cls"], cfg["method_options"])
    params = list(model.parameters()) + list(method.extra_parameters())
    optimizer = torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = _scheduler(optimizer, cfg)

    history: Dict[str, Any] = {"epochs": [], "steps": []}
    start_epoch, start_step, global_step = 0, 0, 0
    epoch_sums = {"den": 0.0, "cls": 0.0, "steps": 0}
    noise_gen = torch.Generator()
    best = {"val_psnr": -math.inf, "epoch": None}
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        load_method_state(method, resume.get("mtl") or {})
        history = resume["history"]
        start_epoch, start_step = int(resume["epoch"]), int(resume["step_in_epoch"])
        global_step = int(resume["global_step"])
        epoch_sums = dict(resume["epoch_sums"])
        best = dict(resume.get("best") or best)
        set_rng_state(resume["rng"])
        noise_gen.set_state(resume["noise_rng"])
        say(f"resumed {last_path} at epoch {start_epoch + 1}, step {start_step}")
    if info.is_main and not quiet:
        say(f"{label + ': ' if label else ''}{data.describe()}; noise {noise.describe()}; "
            f"model {model.config['name']} {model.variant} fusion={model.fusion} widths={model.widths} "
            f"({sum(p.numel() for p in model.parameters()):,} parameters); "
            f"method {getattr(method, 'name', cfg['method']) if num_classes else 'single-task'}; device {device}"
            f"{f' × {info.world} processes' if info.active else ''}; backend {_backend.get_backend()}")

    if not history["epochs"] and resume is None:
        history["initial_gates"] = model.gates(learned=True)
    n_train = len(data.train)
    per_rank = cfg["batch_size"] // info.world
    metrics_path = os.path.join(out_dir, "metrics.json")
    result: Dict[str, Any] = {"config": jsonable(cfg), "model_config": model.config, "dataset": data.describe(),
                              "dataset_notes": data.notes, "world_size": info.world, "history": history}

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        if not info.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT, "config": jsonable(cfg), "model_config": model.config,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "mtl": method_state(method), "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "epoch_sums": dict(epoch_sums), "noise_rng": noise_gen.get_state(), "rng": rng_state(),
            "history": history, "best": best, "fusedskip_version": _version(),
        }
        save_checkpoint(state, last_path)

    from tqdm.auto import tqdm

    stop = StopFlag()
    with stop:
        for epoch in range(start_epoch, cfg["epochs"]):
            t0 = time.time()
            batches = global_batches(n_train, cfg["batch_size"], cfg["seed"], epoch, drop_last=True)
            if start_step == 0 or epoch != start_epoch:
                noise_gen.manual_seed(cfg["seed"] * 7_919 + epoch + 1)
                epoch_sums = {"den": 0.0, "cls": 0.0, "steps": 0}
                first = 0
            else:
                first = start_step
            train_model.train()
            bar = tqdm(total=len(batches), initial=first, desc=f"{label + ' ' if label else ''}epoch {epoch + 1}/{cfg['epochs']}",
                       disable=True if (quiet or not cfg["progress"]) else None, leave=False, dynamic_ncols=True)
            for step in range(first, len(batches)):
                gbatch = batches[step]
                local = gbatch[rank_slice(gbatch, info.rank, info.world)]
                clean, labels = data.train.get(local)
                full_noise = noise.sample((len(gbatch), *clean.shape[1:]), noise_gen)
                noisy = noise.apply(clean, full_noise[rank_slice(gbatch, info.rank, info.world)])
                clean, noisy = clean.to(device, non_blocking=True), noisy.to(device, non_blocking=True)
                # Gradient MTL methods average per-task gradients themselves: no DDP sync then.
                ddp_ctx = method.ddp_context(train_model) if hasattr(method, "ddp_context") else contextlib.nullcontext()
                with ddp_ctx:
                    denoised, logits = train_model(noisy)
                    losses = [den_loss(denoised, clean)]
                    if num_classes:
                        losses.append(F.cross_entropy(logits, labels.to(device)))
                    optimizer.zero_grad(set_to_none=True)
                    method.backward(losses)
                if cfg["grad_clip"]:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                optimizer.step()
                global_step += 1
                stop_now = stop.requested or (interrupt_after_steps is not None and global_step >= interrupt_after_steps)
                vals = torch.tensor([losses[0].item(), losses[1].item() if num_classes else 0.0, float(stop_now)],
                                    dtype=torch.float64)
                if info.active:
                    if dist.get_backend() == "nccl":
                        vals = vals.to(device)
                    dist.all_reduce(vals)
                    vals = vals.cpu()
                    vals[:2] /= info.world
                den_v, cls_v, stop_v = vals.tolist()
                epoch_sums["den"] += den_v
                epoch_sums["cls"] += cls_v
                epoch_sums["steps"] += 1
                history["steps"].append([global_step, den_v, cls_v] if num_classes else [global_step, den_v])
                bar.set_postfix(den=f"{den_v:.4g}", **({"cls": f"{cls_v:.3g}"} if num_classes else {}))
                bar.update(1)
                if stop_v > 0:
                    bar.close()
                    checkpoint(epoch, step + 1)
                    if info.active:
                        dist.barrier()
                    say(f"interrupted at epoch {epoch + 1}, step {step + 1}/{len(batches)}: saved {last_path}; "
                        "continue with --resume")
                    raise Interrupted(last_path)
                if cfg["checkpoint_every"] and global_step % cfg["checkpoint_every"] == 0 and step + 1 < len(batches):
                    checkpoint(epoch, step + 1)
            bar.close()
            steps = max(epoch_sums["steps"], 1)
            avg = [epoch_sums["den"] / steps] + ([epoch_sums["cls"] / steps] if num_classes else [])
            method.epoch_end(avg)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            record: Dict[str, Any] = {"epoch": epoch + 1, "train_den_loss": avg[0],
                                      "train_cls_loss": avg[1] if num_classes else None,
                                      "gates": model.gates(learned=True), "mtl_weights": method_weights(method),
                                      "lr": lr, "seconds": None}
            if info.active:  # evaluate and checkpoint with rank 0's BatchNorm running statistics
                for buf in model.buffers():
                    dist.broadcast(buf, 0)
            if cfg["eval_every"] and ((epoch + 1) % cfg["eval_every"] == 0 or epoch + 1 == cfg["epochs"]):
                val = evaluate(model, data.val, val_noise, seed=cfg["eval_seed"], batch_size=max(per_rank, 64),
                               device=device, ssim_impl=cfg["ssim_impl"], quantize=cfg["quantize"], info=info)
                record.update(val_psnr=val["psnr"], val_ssim=val.get("ssim"), val_accuracy=val.get("accuracy"),
                              val_input_psnr=val["input_psnr"])
            record["seconds"] = time.time() - t0
            history["epochs"].append(record)
            if record.get("val_psnr") is not None and record["val_psnr"] > best["val_psnr"]:
                best = {"val_psnr": record["val_psnr"], "epoch": epoch + 1}
                if info.is_main:
                    save_checkpoint({"format": CHECKPOINT_FORMAT + "-weights", "model_config": model.config,
                                     "model": model.state_dict(), "config": jsonable(cfg), "epoch": epoch + 1,
                                     "val_psnr": record["val_psnr"]}, best_path)
            checkpoint(epoch + 1, 0)
            start_step = 0
            if info.is_main:
                write_json(result, metrics_path)
            acc = f" acc {record['val_accuracy']:.4f}" if record.get("val_accuracy") is not None else ""
            val_txt = (f"  val PSNR {record['val_psnr']:.2f} dB SSIM {record['val_ssim']:.4f}{acc}"
                       if record.get("val_psnr") is not None else "")
            loss_txt = f"den {avg[0]:.5f}" + (f" cls {avg[1]:.4f}" if num_classes else "")
            w = record["mtl_weights"]
            w_txt = f"  w [{' '.join(f'{x:.3g}' for x in w)}]" if num_classes and w else ""
            say(f"{label + ' ' if label else ''}epoch {epoch + 1}/{cfg['epochs']}  {loss_txt}{val_txt}  "
                f"gates {_fmt_gates(record['gates'])}{w_txt}  lr {lr:.2e}  {record['seconds']:.1f}s")

    # ---- final test evaluation ------------------------------------------------------------------
    test: Dict[str, Any] = {}
    for ev in eval_noises:
        test[f"sigma_{ev.describe().split('=')[-1]}"] = evaluate(
            model, data.test, ev, seed=cfg["eval_seed"], batch_size=max(per_rank, 64), device=device,
            ssim_impl=cfg["ssim_impl"], quantize=cfg["quantize"], info=info)
    result.update(test=test, best=best, final_gates=model.gates(learned=True),
                  final_mtl_weights=method_weights(method), num_classes=num_classes,
                  parameters=sum(p.numel() for p in model.parameters()))
    if info.is_main:
        for key, m in test.items():
            acc = f"  accuracy {m['accuracy']:.4f}" if "accuracy" in m else ""
            say(f"{label + ' ' if label else ''}test {key.replace('sigma_', 'σ=')}: PSNR {m['psnr']:.2f} dB "
                f"(noisy input {m['input_psnr']:.2f})  SSIM {m.get('ssim', math.nan):.4f}{acc}  [{m['n_images']} images]")
        if cfg["figures"]:
            try:
                rows = sample_images(model, data.test, val_noise, cfg["eval_seed"], device)
                name = label or "model"
                save_samples_figure(os.path.join(out_dir, "samples.png"), {name: rows},
                                    f"{data.name}, {val_noise.describe()}")
                save_gates_figure(os.path.join(out_dir, "gates.png"),
                                  {name: [history.get("initial_gates", [])] + [e["gates"] for e in history["epochs"]]})
                save_curves_figure(os.path.join(out_dir, "curves.png"), {name: history})
                result["figures"] = ["samples.png", "gates.png", "curves.png"]
            except Exception as exc:  # figures are a convenience: never lose a finished run to them
                say(f"warning: could not draw figures ({type(exc).__name__}: {exc})")
        write_json(result, metrics_path)
    result["_model"] = model
    return result


def _spawn_worker(rank: int, world: int, port: int, cfg: Dict[str, Any], threads: int,
                  data: Optional[ImageData]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    run_training(dict(cfg, threads=threads), data=data)


def spawn_training(cfg: Dict[str, Any], nprocs: int = 2, threads: int = 1, port: Optional[int] = None,
                   data: Optional[ImageData] = None) -> None:
    """Run :func:`run_training` in ``nprocs`` local processes (DDP on gloo/CPU, or one GPU each):
    what ``torchrun --nproc_per_node=N -m fusedskip.train`` does, from Python (tests, notebooks).
    Rank 0 writes ``cfg["out"]``; ``data`` (an already loaded ImageData) is pickled to the
    workers instead of being loaded by each."""
    import socket

    import torch.multiprocessing as mp

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    mp.spawn(_spawn_worker, args=(nprocs, port, make_config(cfg), threads, data), nprocs=nprocs, join=True)


def _version() -> str:
    try:
        import fusedskip

        return fusedskip.__version__
    except Exception:  # pragma: no cover
        return "unknown"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def _sigma_list(text: str) -> List[float]:
    return [float(x) for x in text.replace(",", " ").split()]


def _parse_option(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def add_data_arguments(p: argparse.ArgumentParser, train: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits" if train else None,
                   help=f"one of {', '.join(DATASETS)} (default: digits for train; the checkpoint's for eval)")
    g.add_argument("--root", help="folder holding a torchvision dataset, or the images for --dataset folder")
    g.add_argument("--download", action="store_true", help="allow torchvision datasets to download (network)")
    g.add_argument("--size", type=int, help="image size (digits 16, skimage patches 32, folder 64; torchvision: pad/resize)")
    g.add_argument("--channels", type=int, choices=(1, 3), help="convert images to 1 (gray) or 3 (RGB) channels")
    g.add_argument("--limit", type=int, help="use only the first N training images")


def build_train_parser(prog: str = "fusedskip train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train AddUNet (denoising, or joint denoising + classification).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_arguments(p)
    g = p.add_argument_group("task and noise")
    g.add_argument("--task", default="auto", choices=("auto", "denoise", "joint"),
                   help="auto: joint when the dataset has labels")
    g.add_argument("--sigma", type=float, nargs="+", default=[25.0], metavar="S",
                   help="noise σ on the 0-255 scale; two values = blind range [min, max]")
    g.add_argument("--clip-noisy", action="store_true", help="clip noisy images to [0, 1] (default: not clipped)")
    g.add_argument("--eval-sigmas", type=_sigma_list, default=[15.0, 25.0, 50.0], metavar="'15 25 50'",
                   help="σ values of the final test evaluation")
    g.add_argument("--den-loss", default="mse", choices=("mse", "l1"))
    g = p.add_argument_group("model")
    g.add_argument("--model", default="addunet", choices=("addunet", "concat-unet"))
    g.add_argument("--variant", default="paper", choices=("paper", "hierarchical"))
    g.add_argument("--fusion", default="gated", choices=("gated", "gated_norm_act"),
                   help="skip fusion of AddUNet (concat-unet always concatenates)")
    g.add_argument("--fusion-norm", choices=("group", "batch", "instance"),
                   help="norm of --fusion gated_norm_act (default: --norm)")
    g.add_argument("--width", type=int, default=32)
    g.add_argument("--depth", type=int, default=4)
    g.add_argument("--kernel-size", type=int, nargs="+", default=[3], help="one value or one per level")
    g.add_argument("--convs-per-block", type=int, default=2)
    g.add_argument("--norm", default="batch", choices=("batch", "group", "instance", "none"))
    g.add_argument("--num-groups", type=int, default=32)
    g.add_argument("--act", default="relu", help="relu, leaky_relu, silu, gelu, gelu_tanh, identity")
    g.add_argument("--no-last-act", action="store_true", help="blocks end conv-norm (no final activation)")
    g.add_argument("--gate", default="softplus", help="softplus, softplus_channel, sigmoid_channel, or a fixed float")
    g.add_argument("--gate-init", type=float)
    g.add_argument("--residual", action="store_true", help="predict the noise: output = noisy − net(noisy)")
    g.add_argument("--classifier-hidden", type=int, default=0, help="hidden width of the classifier MLP (0: linear)")
    g.add_argument("--width-mult", type=int, default=2, help="hierarchical: width multiplier per level")
    g.add_argument("--max-width", type=int)
    g.add_argument("--down", default="maxpool", choices=("maxpool", "avgpool", "conv"))
    g.add_argument("--up", default="bilinear", choices=("bilinear", "nearest", "transpose"))
    g = p.add_argument_group("multi-task")
    g.add_argument("--method", default="fixed", help=f"multi-task method ({', '.join(mtl_method_names())}); "
                                                     "fixed = L_den + λ·L_cls")
    g.add_argument("--lambda-cls", type=float, default=1.0, help="λ of the fixed weighting")
    g.add_argument("--method-option", type=_parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="extra option of the method (JSON value), repeatable")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=32, help="global batch (split over processes)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--scheduler", default="cosine", choices=("cosine", "step", "none"))
    g.add_argument("--grad-clip", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="output directory (checkpoints, metrics.json, figures)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    g.add_argument("--overwrite", action="store_true", help="start over even if --out holds a run")
    g.add_argument("--init-from", help="initialise the weights from a checkpoint of the same architecture")
    g.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps (0: epoch ends)")
    g.add_argument("--eval-every", type=int, default=1, help="validate every N epochs")
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, help="CPU threads (default: the idle cores, by load average)")
    g.add_argument("--backend", default="auto", choices=_backend.BACKENDS,
                   help="fusedskip ops: auto (Triton on GPU), triton, reference")
    g.add_argument("--ssim-impl", default="skimage", choices=SSIM_IMPLEMENTATIONS)
    g.add_argument("--quantize", action="store_true", help="round outputs to 8 bits before the metrics (KAIR protocol)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-figures", action="store_true")
    g.add_argument("--quiet", action="store_true")
    return p


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    if args.dataset is not None and args.dataset.lower().replace("_", "-") not in DATASETS + ("fashionmnist", "cifar-10"):
        parser.error(f"unknown dataset {args.dataset!r}; choose from {', '.join(DATASETS)}")
    if len(args.sigma) not in (1, 2):
        parser.error("--sigma takes one value or a range MIN MAX")
    if not check_method_name(args.method):
        parser.error(f"unknown method {args.method!r}; choose from {', '.join(mtl_method_names())}")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    try:
        gate = float(args.gate)
    except ValueError:
        gate = args.gate
    model = dict(MODEL_DEFAULTS)
    model.update(name=args.model, variant=args.variant, fusion="concat" if args.model == "concat-unet" else args.fusion,
                 width=args.width, depth=args.depth,
                 kernel_size=args.kernel_size[0] if len(args.kernel_size) == 1 else args.kernel_size,
                 convs_per_block=args.convs_per_block, norm=None if args.norm == "none" else args.norm,
                 num_groups=args.num_groups, act=args.act, last_act=not args.no_last_act, gate=gate,
                 gate_init=args.gate_init, residual=args.residual, classifier_hidden=args.classifier_hidden,
                 width_mult=args.width_mult, max_width=args.max_width, down=args.down, up=args.up)
    if args.fusion_norm:
        model["fusion_norm"] = args.fusion_norm
    if args.model == "concat-unet":
        model.pop("fusion")
    return make_config({
        "dataset": args.dataset, "root": args.root, "download": args.download, "size": args.size,
        "channels": args.channels, "limit": args.limit, "task": args.task, "model": model,
        "method": args.method, "lambda_cls": args.lambda_cls, "method_options": dict(args.method_option),
        "den_loss": args.den_loss, "sigma": args.sigma[0] if len(args.sigma) == 1 else list(args.sigma),
        "clip_noisy": args.clip_noisy, "eval_sigmas": args.eval_sigmas, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay, "scheduler": args.scheduler,
        "grad_clip": args.grad_clip, "seed": args.seed, "device": args.device, "backend": args.backend,
        "ssim_impl": args.ssim_impl, "quantize": args.quantize, "out": args.out, "resume": args.resume,
        "overwrite": args.overwrite, "init_from": args.init_from, "checkpoint_every": args.checkpoint_every,
        "eval_every": args.eval_every, "progress": not args.no_progress, "figures": not args.no_figures,
        "deterministic": args.deterministic, "quiet": args.quiet, "threads": args.threads,
    })


def main(argv: Optional[Sequence[str]] = None, prog: str = "fusedskip train") -> int:
    parser = build_train_parser(prog)
    args = parser.parse_args(argv)
    cfg = config_from_args(args, parser)
    try:
        result = run_training(cfg)
    except UsageError as exc:
        parser.exit(2, f"{prog}: error: {exc}\n")
    except Interrupted:
        return EXIT_INTERRUPTED
    if not cfg["quiet"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {os.path.join(cfg['out'], 'metrics.json')}, last.pt, best.pt"
              + (", samples.png, gates.png, curves.png" if result.get("figures") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m fusedskip.train"))
