"""Training: ``fusedskip train`` = ``python -m fusedskip.train`` (also under
``torchrun --nproc_per_node=N -m fusedskip.train ...``, DistributedDataParallel).

The implementation is the :mod:`fusedskip.training` package (a generic loop over a problem and its
tasks: AddUNet's joint denoising + classification, VMSANet's dense multi-task learning) and the
argument parsing is in :mod:`fusedskip.cli`; this module re-exports both, so
``fusedskip.train.run_training(cfg, data=..., log=...)``, ``spawn_training``, ``make_config``,
``DEFAULTS`` and ``main`` keep working.

One step: a global batch of clean images (a seeded permutation per epoch), Gaussian noise drawn
for the whole global batch from a generator every process shares (each process takes its slice,
so N processes see exactly the images and noise one process would), forward, one loss per task
(AddUNet: ``[L_den, L_cls]``, MSE and cross-entropy), the multi-task method's backward (default:
fixed weights, ``L_den + λ·L_cls``; equal weights for VMSANet's tasks), optimizer step.

Checkpoints (``OUT/last.pt``, ``OUT/best.pt``) are written atomically (temporary file +
``os.replace``) and hold only tensors and plain Python types (``torch.load(weights_only=True)``):
model, optimizer, scheduler, MTL method state, RNG states (torch, CUDA, NumPy, Python, noise
generator), epoch and position in it, metrics history, config as JSON-able dicts. SIGINT/SIGTERM
stop at the next step boundary and save a mid-epoch checkpoint; ``--resume`` continues exactly
where the run stopped. ``OUT/metrics.json`` holds the config, per-step and per-epoch history
(losses per task, validation metrics, gates, MTL weights, learning rate) and final test metrics
(VMSANet: per task, and Δm% against single-task baselines); PNG figures are drawn at the end.
"""
from __future__ import annotations

import sys

from .cli import add_data_arguments, build_train_parser, config_from_args
from .cli import train_main as main
from .training import *  # noqa: F401,F403 - the public training API, re-exported
from .training import __all__ as _training_all

__all__ = list(_training_all) + ["main", "build_train_parser", "config_from_args", "add_data_arguments"]

if __name__ == "__main__":
    sys.exit(main(prog="python -m fusedskip.train"))
