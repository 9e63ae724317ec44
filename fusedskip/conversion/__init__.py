"""Swap fused modules into existing U-Nets: :func:`convert` and its inverse :func:`unconvert`.

    model, report = fusedskip.convert(model)     # in place; report says what and where
    print(report)
    model, report = fusedskip.unconvert(model)   # back to plain torch modules

**What is replaced.** A normalisation layer and the activation that runs right after it become
one fused module (``BatchNormAct2d``, ``GroupNormAct``, ``InstanceNormAct2d`` from
``fusedskip.ops``; the Triton kernels on a GPU, the reference PyTorch path elsewhere):

* adjacent children of an ``nn.Sequential`` (any subclass that keeps Sequential's forward):
  ``conv -> norm -> act`` and norm-first ``norm -> act``, with ``nn.Dropout``/``nn.Dropout2d``
  between norm and act allowed when p = 0 or the act is ReLU/LeakyReLU (they commute);
  ``conv -> norm`` with no activation too (``norm_without_act=True``). This covers
  torchvision ``Conv2dNormActivation``, smp ``Conv2dReLU``, MONAI ``Convolution``/``ADN``
  (BasicUNet, UNet), milesial-style ``DoubleConv``, KAIR's flat DnCNN and plain user models;
* timm ``BatchNormAct2d`` / ``GroupNormAct`` / ``GroupNorm1Act`` (whole module, its act inside);
* blocks that call norms and activations by attribute, per class, after checking that the
  class's forward is the source fusedskip was written against (see :mod:`.libraries`):
  torchvision/smp ResNet stem and BasicBlock/Bottleneck, diffusers ``ResnetBlock2D`` (norm1,
  and norm2 unless ``time_embedding_norm="scale_shift"``) and ``UNet2DModel``'s output norm.

Norms: exact ``nn.BatchNorm2d``, ``nn.GroupNorm``, ``nn.InstanceNorm2d`` (no running stats)
with a bias when affine. Activations: exact ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.SiLU``,
``nn.GELU`` (and timm's GELU/GELUTanh). Everything else is left, and listed with the reason:
subclasses (``SyncBatchNorm``, deepinv's ``BFBatchNorm2d``, ...), PReLU, LayerNorm, 1-D/3-D
norms, act-before-norm orders, modules with hooks, parametrizations or an instance-level
forward, modules held in two places, blocks whose forward differs from the verified one, and
GroupNorm where nothing shows the input is 4-D (``assume_2d=True`` to allow).

**State is untouched.** The fused module sits in the norm's own slot and takes over the norm's
Parameter and buffer objects; the activation's slot gets a :class:`FusedIdentity` (no state).
So ``state_dict`` keys and values are identical before and after, checkpoints load both ways,
and an optimizer built before converting keeps working. Convolutions stay plain ``nn.Conv2d``
(fusing them would need a module holding conv and norm as children, renaming keys
``0.weight`` -> ``0.conv.weight``). Device and dtype are kept; meta-device models convert.
Activations' ``inplace`` flags are dropped: the norm's output they modified in place has no
other reader in the patterns accepted (hooks, which could see it, are refused).

**Skips are not changed.** Concatenative skips (smp ``[up, skip]``, MONAI ``[skip, up]`` and
``[x, sub(x)]``, diffusers ``[hidden, skip]``) are listed in the report and kept. Changing them
to additive ones changes the architecture; it is offered only where the block makes it well
defined, MONAI BasicUNet's ``UpCat`` (equal skip and upsampled channels), with
``concat_to_add=True``: ``convs(cat([skip, up]))`` becomes ``convs(up + softplus(β)·skip)``
(a new ``skip_gate.beta`` per UpCat, the first conv re-initialised with half the input
channels): the model must be trained again, old checkpoints no longer load, and unconvert
cannot undo it.

**Distributed.** Convert before SyncBatchNorm conversion, then use
``fusedskip.convert_sync_batchnorm`` (torch's converter knows nothing of the fused modules:
with them as BatchNorm subclasses it would drop the activation, otherwise it leaves them
computing local statistics). Lightning's ``sync_batchnorm=True`` runs torch's converter.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import nn

from .core import ACTIVATIONS, NORM_FAMILIES, FusedIdentity, convert_model, unconvert_model
from .report import ConversionReport, Left, Replaced

__all__ = ["convert", "unconvert", "ConversionReport", "Replaced", "Left", "FusedIdentity",
           "NORM_FAMILIES", "ACTIVATIONS"]


def convert(model: nn.Module, *, norms: Sequence[str] = NORM_FAMILIES, activations: Optional[Sequence[str]] = None,
            norm_without_act: bool = True, assume_2d: bool = False, concat_to_add: bool = False,
            exclude: Sequence[str] = (), libraries: bool = True, graph: bool = True,
            inplace: bool = True) -> Tuple[nn.Module, ConversionReport]:
    """Put fused modules in place of the norm + activation patterns fusedskip recognises.

    Args:
        model: any ``nn.Module`` (on any device, any dtype, or the meta device).
        norms: norm families to fuse, drawn from ``("batch", "group", "instance")``.
        activations: activations to fuse, drawn from ``("relu", "leaky_relu", "silu", "gelu",
            "gelu_tanh")``; None = all.
        norm_without_act: also fuse ``conv -> norm`` with no activation after it (identity act).
        assume_2d: treat every GroupNorm as taking ``[N, C, H, W]`` even with no adjacent Conv2d
            to show it (GroupNorm accepts any rank; the fused kernels are 2-D).
        concat_to_add: replace MONAI BasicUNet's concatenative UpCat skips by gated additive ones
            (changes the architecture; off by default; see the module docs).
        exclude: module paths (or fnmatch patterns) whose subtrees are left alone, e.g.
            ``["encoder"]``.
        libraries: apply the per-library block rules (torchvision, smp, MONAI, diffusers).
        graph: trace the forward of other blocks that hold norms (torch.fx, one level) and fuse the
            norm -> activation chains found there (attribute and functional style; see
            :mod:`fusedskip.conversion.graph`).
        inplace: modify ``model`` itself (default, like ``convert_sync_batchnorm``) or a deep copy.

    Returns:
        ``(model, report)``: the converted model (``model`` itself when ``inplace``; a new object
        only if the root itself was replaced) and a :class:`ConversionReport` listing each
        replacement and each norm layer or skip left, with the reason. Idempotent: converting a
        converted model replaces nothing.
    """
    return convert_model(model, norms=norms, activations=activations, norm_without_act=norm_without_act,
                         assume_2d=assume_2d, concat_to_add=concat_to_add, exclude=exclude,
                         libraries=libraries, inplace=inplace, graph=graph)


def unconvert(model: nn.Module, *, inplace: bool = True) -> Tuple[nn.Module, ConversionReport]:
    """Undo :func:`convert`: plain torch (or timm) modules back in every slot, same tensors.

    Fused norms go back to the module they replaced (its class and settings, with the current
    parameters and buffers), FusedIdentity slots to the activation module, swapped block classes
    to the library's class. Fused modules that convert did not create are turned back into plain
    norms only where that needs no new slot (identity act, or the act's slot is known); others,
    and ``concat_to_add`` blocks, are listed as left. Returns ``(model, report)``.
    """
    return unconvert_model(model, inplace=inplace)
