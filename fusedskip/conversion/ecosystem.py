"""Helpers for code that finds norm layers by type, and for torch.ao quantization, on converted models.

**isinstance: drop-in helpers, not subclasses.** The fused modules deliberately do not subclass
torch's norm classes. A ``BatchNormAct2d(nn.BatchNorm2d)`` would be found by every
``isinstance(m, nn.BatchNorm2d)`` loop, but also by torch's and timm's
``convert_sync_batchnorm``, which replace every ``_BatchNorm`` by a bare ``SyncBatchNorm`` and
silently drop the activation (huggingface/pytorch-image-models#1254); and code that calls
``F.batch_norm`` with the module's attributes, or reads ``m.forward`` semantics, would be wrong
for a module that also applies an activation. A miss is visible (a layer not frozen, a weight
decayed); a silently dropped activation is not. So isinstance-based utilities get the types to
use instead:

* :data:`BATCH_NORM_TYPES`, :data:`GROUP_NORM_TYPES`, :data:`INSTANCE_NORM_TYPES`,
  :data:`NORM_TYPES`: tuples holding torch's classes *and* the fused ones, for
  ``isinstance(m, fusedskip.conversion.BATCH_NORM_TYPES)``;
* :func:`split_normalization_params`: torchvision's weight-decay grouping, fused norms included;
* :func:`freeze_batch_norm`: the "BN to eval, parameters frozen" loop (timm's
  ``freeze_batch_norm_2d`` without replacing modules), fused norms included.

**torch.ao quantization.** :func:`register_quantization_fusers` (called by ``convert``) adds
fuser methods for ``(Conv2d, BatchNormAct2d, FusedIdentity)``, ``(Conv2d, BatchNormAct2d)`` and
``(BatchNormAct2d, FusedIdentity)`` to torch's table, so
``torch.ao.quantization.fuse_modules(model, [["conv1", "bn1", "relu"]])`` works on a converted
model: each fused norm is turned back into its plain BatchNorm2d + activation first and torch's
own fuser method runs (``ConvReLU2d`` etc.). The plain route works too: ``fusedskip.unconvert``
then quantize.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from torch import nn

from ..ops.batch_norm_act import BatchNormAct2d
from ..ops.group_norm_act import GroupNormAct, InstanceNormAct2d
from .core import FusedIdentity, _plain_from_fused, refill_shell

BATCH_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, BatchNormAct2d)
GROUP_NORM_TYPES = (nn.GroupNorm, GroupNormAct)
INSTANCE_NORM_TYPES = (nn.modules.instancenorm._InstanceNorm, InstanceNormAct2d)
NORM_TYPES = BATCH_NORM_TYPES + GROUP_NORM_TYPES + INSTANCE_NORM_TYPES + (nn.LayerNorm, nn.LocalResponseNorm)


def split_normalization_params(model: nn.Module, norm_classes=None) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """``(norm_params, other_params)`` as torchvision's ``split_normalization_params``, with the
    fused norms counted as norms (default ``norm_classes``: :data:`NORM_TYPES`)."""
    classes = tuple(norm_classes) if norm_classes is not None else NORM_TYPES
    norm_params: List[nn.Parameter] = []
    other_params: List[nn.Parameter] = []
    for module in model.modules():
        if next(module.children(), None) is not None:
            other_params.extend(p for p in module.parameters(recurse=False) if p.requires_grad)
        elif isinstance(module, classes):
            norm_params.extend(p for p in module.parameters() if p.requires_grad)
        else:
            other_params.extend(p for p in module.parameters() if p.requires_grad)
    return norm_params, other_params


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Every BatchNorm (plain, Sync, fused) to eval mode with ``requires_grad=False`` parameters;
    the other modules keep their mode. Returns ``model``. Call it again after ``model.train()``."""
    for module in model.modules():
        if isinstance(module, BATCH_NORM_TYPES):
            module.eval()
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------
# torch.ao.quantization.fuse_modules
# --------------------------------------------------------------------------------------------
def _plain(fused: nn.Module) -> nn.Module:
    """A plain BatchNorm2d holding ``fused``'s tensors (unconvert's result for this module)."""
    shell = fused.__dict__.get("_fusedskip_original")
    plain = refill_shell(shell, fused) if shell is not None and type(shell) is nn.BatchNorm2d else None
    plain = plain if plain is not None else _plain_from_fused(fused)
    if type(plain) is not nn.BatchNorm2d:
        raise AssertionError(f"fusedskip: cannot turn {fused!r} into an nn.BatchNorm2d for quantization; "
                             "run fusedskip.unconvert(model) first")
    return plain


def _act_of(fused: BatchNormAct2d, identity=None) -> nn.Module:
    from ..activations import activation_module

    if identity is not None and identity.original is not None:
        return identity.original
    return activation_module(fused.act_name, fused.negative_slope, getattr(fused, "prelu_weight", None))


def _fuse_conv_bn_act(is_qat, conv, bn, identity=None):
    from torch.ao.quantization.fuser_method_mappings import fuse_conv_bn, fuse_conv_bn_relu

    act = _act_of(bn, identity)
    if type(act) is nn.ReLU:
        return fuse_conv_bn_relu(is_qat, conv, _plain(bn), act)
    fused = fuse_conv_bn(is_qat, conv, _plain(bn))
    return fused if type(act) is nn.Identity else nn.Sequential(fused, act)


def _fuse_bn_act(is_qat, bn, identity):
    from torch.ao.quantization.fuser_method_mappings import fuse_bn_relu  # noqa: F401 (exists in torch)

    act = _act_of(bn, identity)
    if type(act) is nn.ReLU:
        from torch.ao.nn.intrinsic import BNReLU2d
        return BNReLU2d(_plain(bn), act)
    return nn.Sequential(_plain(bn), act)


def quantization_fuser_mapping() -> Dict[tuple, object]:
    """Fuser methods for converted patterns, for ``fuse_custom_config_dict=
    {"additional_fuser_method_mapping": quantization_fuser_mapping()}`` (or registered globally
    by :func:`register_quantization_fusers`)."""
    return {
        (nn.Conv2d, BatchNormAct2d, FusedIdentity): _fuse_conv_bn_act,
        (nn.Conv2d, BatchNormAct2d): _fuse_conv_bn_act,
        (BatchNormAct2d, FusedIdentity): _fuse_bn_act,
    }


def register_quantization_fusers() -> bool:
    """Add :func:`quantization_fuser_mapping` to torch's default fuser table (idempotent).
    Returns False when this torch has no such table (then use the mapping or unconvert)."""
    try:
        from torch.ao.quantization import fuser_method_mappings as mappings
    except ImportError:  # pragma: no cover - torch without ao
        return False
    table = getattr(mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if not isinstance(table, dict):
        return False
    for key, method in quantization_fuser_mapping().items():
        table.setdefault(key, method)
    return True


__all__ = ["BATCH_NORM_TYPES", "GROUP_NORM_TYPES", "INSTANCE_NORM_TYPES", "NORM_TYPES", "split_normalization_params",
           "freeze_batch_norm", "quantization_fuser_mapping", "register_quantization_fusers"]
