"""Training package: any list of tasks, one generic loop.

Modules: :mod:`~.loop` (``run_training``, the loop), :mod:`~.problems` (AddUNet's denoise +
classify setting and VMSANet's dense multi-task setting), :mod:`~.tasks` (the task abstraction,
metrics, Δm%), :mod:`~.config` (``DEFAULTS``, ``make_config``, schedulers, MTL methods),
:mod:`~.common` (errors, checkpoints, JSON, RNG state), :mod:`~.distributed` (torchrun / DDP
set-up, ``spawn_training``), :mod:`~.evaluation` and :mod:`~.figures` (AddUNet evaluation and
figures), :mod:`~.dense_figures`. The command line lives in :mod:`fusedskip.cli`;
:mod:`fusedskip.train` re-exports this package and is the ``python -m fusedskip.train`` entry.
"""
from .common import (
    CHECKPOINT_FORMAT,
    EXIT_INTERRUPTED,
    Interrupted,
    StopFlag,
    UsageError,
    atomic_write_bytes,
    config_differences,
    ensure_writable_dir,
    jsonable,
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json,
)
from .config import (
    DEFAULTS,
    MODEL_DEFAULTS,
    VMSANET_DEFAULTS,
    check_method_name,
    load_method_state,
    make_config,
    make_method,
    make_scheduler,
    method_state,
    method_weights,
    mtl_method_names,
)
from .distributed import (
    DistInfo,
    configure_threads,
    convert_batchnorm_for_ddp,
    resolve_device,
    setup_distributed,
    spawn_training,
)
from .evaluation import denoise, evaluate, sample_images, unwrap
from .figures import save_curves_figure, save_gates_figure, save_samples_figure
from .loop import Run, run_training
from .problems import DenoiseClassifyProblem, DenseProblem, load_baselines, make_problem
from .tasks import TASK_KINDS, Task, TaskMeter, delta_m, task_head

__all__ = [
    "CHECKPOINT_FORMAT", "EXIT_INTERRUPTED", "Interrupted", "StopFlag", "UsageError", "atomic_write_bytes",
    "config_differences", "ensure_writable_dir", "jsonable", "load_checkpoint", "load_weights",
    "model_from_checkpoint", "rng_state", "save_checkpoint", "set_rng_state", "write_json",
    "DEFAULTS", "MODEL_DEFAULTS", "VMSANET_DEFAULTS", "check_method_name", "load_method_state", "make_config",
    "make_method", "make_scheduler", "method_state", "method_weights", "mtl_method_names",
    "DistInfo", "configure_threads", "convert_batchnorm_for_ddp", "resolve_device", "setup_distributed",
    "spawn_training", "denoise", "evaluate", "sample_images", "unwrap", "save_curves_figure", "save_gates_figure",
    "save_samples_figure", "Run", "run_training", "DenoiseClassifyProblem", "DenseProblem", "load_baselines",
    "make_problem", "TASK_KINDS", "Task", "TaskMeter", "delta_m", "task_head",
]
