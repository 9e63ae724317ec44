"""Process set-up: torch.distributed under torchrun, devices, threads, BatchNorm sync, local spawn."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..data import ImageData
from ..distributed import convert_sync_batchnorm
from .common import UsageError
from .config import make_config


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



def _spawn_worker(rank: int, world: int, port: int, cfg: Dict[str, Any], threads: int,
                  data: Optional[ImageData]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    from .loop import run_training

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
