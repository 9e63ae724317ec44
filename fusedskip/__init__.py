"""fusedskip: fused Triton kernels for U-Net building blocks.

Public API: the backend switch (:func:`set_backend`, :func:`get_backend`, :func:`use_backend`),
functional ops and their modules. Every op has a reference PyTorch path that the tests and the
benchmarks check the kernels against.
"""
from __future__ import annotations

import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _bind_source_kernels() -> None:
    """Make ``fusedskip.kernels`` importable from a source checkout on ``PYTHONPATH``.

    The kernels live in the top-level ``kernels/`` folder; an install maps it to
    ``fusedskip.kernels`` (setup.py's package_dir). Without an install, load it from beside
    this package under the same name.
    """
    if "fusedskip.kernels" in _sys.modules or _importlib_util.find_spec("fusedskip.kernels") is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    spec = _importlib_util.spec_from_file_location(
        "fusedskip.kernels", _os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
    if spec is None or spec.loader is None:
        raise ImportError("fusedskip.kernels not found: install fusedskip with `pip install -e .`")
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["fusedskip.kernels"] = module
    spec.loader.exec_module(module)


_bind_source_kernels()

from . import mtl  # noqa: E402
from .backend import get_backend, set_backend, use_backend  # noqa: E402
from .conversion import ConversionReport, FusedIdentity, convert, unconvert  # noqa: E402
from .distributed import convert_sync_batchnorm, revert_sync_batchnorm, sync_batch_norm_act  # noqa: E402
from .models import AddUNet, ConcatUNet, build_model  # noqa: E402
from .mtl import available_methods, make_mtl_method  # noqa: E402
from .ops.batch_norm_act import BatchNormAct2d, BatchNormActFunction, batch_norm_act, batch_norm_act_reference  # noqa: E402
from .ops.conv_norm_act import ConvNormAct  # noqa: E402
from .ops.gated_skip import GatedSkip, GatedSkipAddFunction, gated_skip_add, gated_skip_add_reference  # noqa: E402
from .ops.group_norm_act import (  # noqa: E402
    GroupNormAct,
    GroupNormActFunction,
    InstanceNormAct2d,
    group_norm_act,
    group_norm_act_reference,
)
from .ops.skip_norm_act import SkipNormAct  # noqa: E402

__all__ = [
    "GatedSkip", "GatedSkipAddFunction", "gated_skip_add", "gated_skip_add_reference",
    "GroupNormAct", "GroupNormActFunction", "InstanceNormAct2d", "group_norm_act", "group_norm_act_reference",
    "BatchNormAct2d", "BatchNormActFunction", "batch_norm_act", "batch_norm_act_reference",
    "ConvNormAct", "convert_sync_batchnorm", "revert_sync_batchnorm", "sync_batch_norm_act",
    "SkipNormAct", "AddUNet", "ConcatUNet", "build_model", "mtl",
    "convert", "unconvert", "ConversionReport", "FusedIdentity", "available_methods", "make_mtl_method",
    "get_backend", "set_backend", "use_backend",
]
