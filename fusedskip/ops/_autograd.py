"""Second-order support shared by the fused ops' autograd Functions.

The kernels' backward passes are not differentiable again. Under ``create_graph=True`` (grad
mode is on inside ``backward``) each Function instead returns the gradients of its reference
computation, built from differentiable torch ops on the saved inputs: a gradient penalty or
``torch.autograd.gradgradcheck`` then sees exact second derivatives instead of a silently
detached first one. The ordinary backward (``create_graph=False``) keeps the kernels.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch


def create_graph_requested() -> bool:
    """Whether the running backward must build a graph (``create_graph=True``)."""
    return torch.is_grad_enabled()


def differentiable_grads(grad: torch.Tensor, inputs: Sequence[Optional[torch.Tensor]], needs: Sequence[bool],
                         recompute: Callable[[], torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of ``recompute()`` (the op's reference forward on the saved ``inputs``) with
    respect to the inputs flagged in ``needs``, weighted by ``grad``, as a differentiable graph
    (in the inputs and in ``grad``); None for the others."""
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    got = iter(())
    if wanted:
        with torch.enable_grad():
            out = recompute()
        got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    grads = []
    for t, need in zip(inputs, needs):
        g = next(got) if need and t is not None else None
        grads.append(torch.zeros_like(t) if g is None and need and t is not None else g)
    return tuple(grads)


def activation_name(act_id: int) -> str:
    """The activation name of a kernel id (:data:`fusedskip.activations.ACTIVATION_IDS`)."""
    from ..activations import ACTIVATION_IDS
    for name, value in ACTIVATION_IDS.items():
        if value == act_id:
            return name
    raise ValueError(f"unknown activation id {act_id}")
