"""The one place that decides which implementation an op runs.

Backends:
  ``auto``      Triton kernels for CUDA tensors, the reference PyTorch path for everything else.
  ``triton``    Triton kernels always. On CPU tensors this needs ``TRITON_INTERPRET=1`` (Triton's
                interpreter runs the real kernels on the CPU; that is how the tests check them).
  ``reference`` the plain PyTorch reference path always.

Set with :func:`set_backend` (or the :func:`use_backend` context manager) or the environment
variable ``FUSEDSKIP_BACKEND``; the function wins over the variable.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

BACKENDS = ("auto", "triton", "reference")
_ENV_VAR = "FUSEDSKIP_BACKEND"
_override: Optional[str] = None


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{source}: backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def set_backend(name: Optional[str]) -> None:
    """Select the backend for every fusedskip op (``None`` goes back to ``FUSEDSKIP_BACKEND``)."""
    global _override
    _override = None if name is None else _check_name(name, "set_backend")


def get_backend() -> str:
    """The backend in force: set_backend's choice, else ``$FUSEDSKIP_BACKEND``, else ``auto``."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get(_ENV_VAR, "auto"), f"${_ENV_VAR}")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block under another backend, restoring the previous choice afterwards."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def interpreter_active() -> bool:
    """True when Triton's CPU interpreter is on (read at import time by triton.jit too)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# triton.jit reads TRITON_INTERPRET when the kernels are defined, i.e. when fusedskip is imported
# (this module is imported before any kernel module): setting it later changes nothing.
_INTERPRETER_AT_IMPORT = interpreter_active()


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether an op whose main input is ``tensor`` runs the Triton kernels.

    Raises instead of silently falling back when ``triton`` is forced on a tensor no kernel can
    run on, so a user who asked for kernels never gets the reference path unknowingly.
    """
    backend = get_backend()
    if backend == "reference":
        return False
    on_gpu = tensor.device.type == "cuda"
    if backend == "auto":
        return on_gpu
    if on_gpu:
        return True
    if tensor.device.type == "cpu" and interpreter_active():
        if _INTERPRETER_AT_IMPORT or os.environ.get("TRITON_INTERPRET") != "1":
            return True
        raise RuntimeError(
            "fusedskip backend 'triton' on a cpu tensor: TRITON_INTERPRET=1 was set after fusedskip was "
            "imported, but Triton reads it when the kernels are defined. Set it before the first "
            "`import fusedskip` (in the shell, or at the very top of the script), or use the 'auto' or "
            "'reference' backend on the CPU"
        )
    raise RuntimeError(
        f"fusedskip backend 'triton' cannot run on a {tensor.device.type} tensor: use a CUDA "
        "tensor, set TRITON_INTERPRET=1 before importing fusedskip to interpret the kernels on the CPU, or choose the "
        "'auto' or 'reference' backend"
    )
