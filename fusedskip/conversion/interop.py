"""How fused modules behave under the tools people run on converted models.

Called from the fused modules' ``forward`` / ``__prepare_scriptable__`` (fusedskip.ops); torch
only, no import of the ops, so the ops can import it.

* **torch.fx** (``symbolic_trace``, torchvision ``create_feature_extractor``, FX conv-BN
  folding): a fused module records itself as *one* ``call_module`` node, as torch's own norm
  layers do (torch's tracer treats only ``torch.nn`` classes as leaves; tracing into a fused
  module would bake its ``training`` flag into the graph and hand a Proxy to input checks).
* **TorchScript**: refused with an error that names the module and says what to do (the ops
  launch Triton kernels through ``torch.library`` and take ``Optional``/union arguments that
  TorchScript cannot compile). ``torch.compile`` and ``torch.jit.trace`` are the routes.
* **Distributed**: a fused BatchNorm training in a process group of world size > 1 without
  synchronisation (torch's, timm's or Lightning's SyncBatchNorm converters leave it alone) warns
  once per process.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

_WARNED_UNSYNCED = False


def fx_leaf_call(module: nn.Module, *args: Any, **kwargs: Any) -> Optional[Any]:
    """Under torch.fx symbolic tracing (an argument is a Proxy) record ``module(*args, **kwargs)``
    as a single ``call_module`` node and return its Proxy; otherwise None."""
    proxy = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.fx.Proxy)), None)
    if proxy is None:
        return None
    args = list(args)
    while args and args[-1] is None:  # defaults stay out of the node: module(x), as torch's norms
        args.pop()
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    tracer = proxy.tracer
    return tracer.create_proxy("call_module", tracer.path_of_module(module), tuple(args), kwargs)


def refuse_script(module: nn.Module) -> None:
    """Raise TorchScript's refusal for a fused module (from ``__prepare_scriptable__``)."""
    where = module.__dict__.get("_fusedskip_path")
    at = f" at {where!r}" if where else ""
    raise RuntimeError(
        f"fusedskip's {type(module).__name__}{at} cannot be compiled by torch.jit.script: it launches "
        "Triton kernels through torch.library ops and takes arguments TorchScript cannot type. Use "
        "torch.compile or torch.jit.trace, or script the plain model: fusedskip.unconvert(model) "
        "restores the torch modules (same state_dict).")


def warn_if_unsynchronised(module: nn.Module) -> None:
    """Warn once per process when a fused BatchNorm computes batch statistics locally although
    a process group of world size > 1 is initialised (its ``sync`` flag is off)."""
    global _WARNED_UNSYNCED
    if _WARNED_UNSYNCED or getattr(module, "sync", False) or not module.training:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return
    _WARNED_UNSYNCED = True
    where = module.__dict__.get("_fusedskip_path")
    warnings.warn(
        f"fusedskip {type(module).__name__}{f' at {where!r}' if where else ''} is training with local batch "
        f"statistics in a process group of world size {dist.get_world_size()}: torch's, timm's and "
        "Lightning's SyncBatchNorm converters do not synchronise fused modules. Call "
        "fusedskip.convert_sync_batchnorm(model) if statistics should be synchronised (this warning "
        "is shown once).", RuntimeWarning, stacklevel=3)
