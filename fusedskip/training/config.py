"""Training configuration (:data:`DEFAULTS`), scheduler and multi-task method construction."""
from __future__ import annotations

import copy
import os
import shutil
from typing import Any, Dict, List, Optional

import torch

from ..mtl import FixedWeighting, available_methods, make_mtl_method
from ..mtl.methods import _ALIASES
from .common import UsageError

MODEL_DEFAULTS: Dict[str, Any] = {
    "name": "addunet", "variant": "paper", "fusion": "gated", "width": 32, "depth": 4, "kernel_size": 3,
    "convs_per_block": 2, "norm": "batch", "num_groups": 32, "act": "relu", "last_act": True, "stem_act": "relu",
    "gate": "softplus", "gate_init": None, "residual": False, "classifier_hidden": 0, "width_mult": 2,
    "max_width": None, "down": "maxpool", "up": "bilinear",
}

# VMSANet model keys (``cfg["model"]`` with ``name="vmsanet"``); ``filters`` None = width × (1, 2, 4, 8, 8).
VMSANET_DEFAULTS: Dict[str, Any] = {
    "filters": None, "use_cacm": True, "use_vmsm": True, "vmsm_fusion": "released", "cacm_reduction": 16,
    "residual_denoise": True,  # a denoise task's head predicts the noise: output = noisy input − head
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
    # any-task training (dense models): task names (None: the dataset's tasks), single-task baselines for Δm
    "tasks": None, "baselines": None, "num_classes": None,
    # speed: autocast ("none", "bf16", "fp16": fp16 with a GradScaler), channels_last model and batches,
    # torch.compile of the training model (False, or a torch.compile backend name; True = "inductor")
    "amp": "none", "channels_last": False, "compile": False,
}

AMP_DTYPES: Dict[str, Optional[torch.dtype]] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def amp_dtype(name) -> Optional[torch.dtype]:
    """The autocast dtype of ``cfg["amp"]`` (None: full precision); UsageError for another name."""
    key = "none" if name in (None, False) else str(name).lower()
    if key not in AMP_DTYPES:
        raise UsageError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {name!r}")
    return AMP_DTYPES[key]


def compile_backend(value, device_type: str = "cpu") -> Optional[str]:
    """The torch.compile backend of ``cfg["compile"]``: None (off) for False/None/"none", "inductor"
    for True, else the backend name, checked against ``torch.compiler.list_backends``. Inductor on
    the CPU compiles C++: UsageError up front when no C++ compiler is on the PATH."""
    if value in (None, False) or (isinstance(value, str) and value.lower() in ("", "none", "false", "off")):
        return None
    name = "inductor" if value is True or (isinstance(value, str) and value.lower() == "true") else str(value)
    known = torch.compiler.list_backends(exclude_tags=())
    if name not in known:
        raise UsageError(f"--compile: unknown torch.compile backend {name!r} (one of {', '.join(sorted(known))})")
    if name == "inductor" and device_type == "cpu":
        candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in candidates):
            raise UsageError("--compile: torch.compile's inductor backend needs a C++ compiler on the CPU and none "
                             "was found ($CXX, g++, c++, clang++); install one or pass --compile aot_eager")
    return name


def make_scheduler(optimizer, cfg: Dict[str, Any]):
    name = cfg["scheduler"]
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg["epochs"], 1),
                                                          eta_min=cfg["lr"] * 0.01)
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(cfg["epochs"] // 3, 1), gamma=0.5)
    if name == "none":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise UsageError(f"unknown scheduler {name!r} (cosine, step, none)")


def mtl_method_names(aliases: bool = False) -> List[str]:
    """Method names fusedskip.mtl offers (with its aliases if asked)."""
    names = list(available_methods())
    if aliases:
        names += list(_ALIASES)
    return names


def check_method_name(name: str) -> bool:
    key = str(name).strip().lower().replace("-", "_")
    return key in mtl_method_names(aliases=True)


def make_method(name: str, model, lambda_cls: float, options: Dict[str, Any], num_tasks: int = 2):
    """The multi-task method: fusedskip.mtl's ``make_mtl_method`` over the model's
    ``shared_parameters()`` and ``task_parameters()`` (AddUNet: encoder vs decoder/gates/head and
    classifier). One task (AddUNet denoising only): fixed weight ``[1]``, i.e. ``L.backward()``,
    whatever ``name`` and ``options`` say. ``fixed`` without weights: ``[1, λ, ..., λ]``."""
    if num_tasks == 1:
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

