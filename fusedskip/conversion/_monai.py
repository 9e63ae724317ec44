"""MONAI BasicUNet's UpCat with its concatenative skip replaced by a gated additive one.

Only built by ``fusedskip.convert(..., concat_to_add=True)``; it changes the architecture:
``convs(cat([x_e, x_0]))`` (2C channels into the first conv) becomes
``convs(x_0 + softplus(β)·x_e)`` (C channels), with a new gate parameter ``skip_gate.beta``
and a re-initialised first conv of half the input channels.
"""
from __future__ import annotations

import torch
from monai.networks.nets.basic_unet import UpCat

from ..ops.gated_skip import GatedSkip


class GatedAddUpCat(UpCat):
    """UpCat merging the encoder feature additively: ``convs(up + a ⊙ skip)`` (GatedSkip)."""

    _fusedskip_irreversible = True
    _fusedskip_irreversible_reason = ("concat_to_add replaced this concatenative skip by a gated additive "
                                      "one (new parameters, conv of half the input channels): the "
                                      "original weights no longer exist, so it cannot be undone")

    def forward(self, x: torch.Tensor, x_e: torch.Tensor | None):
        x_0 = self.upsample(x)
        if x_e is not None and torch.jit.isinstance(x_e, torch.Tensor):
            if self.is_pad:
                dimensions = len(x.shape) - 2
                sp = [0] * (dimensions * 2)
                for i in range(dimensions):
                    if x_e.shape[-i - 1] != x_0.shape[-i - 1]:
                        sp[i * 2 + 1] = 1
                x_0 = torch.nn.functional.pad(x_0, sp, "replicate")
            x = self.convs(self.skip_gate(x_0, x_e))  # was convs(cat([x_e, x_0]))
        else:
            x = self.convs(x_0)
        return x


def make_gate(channels: int, like: torch.Tensor) -> GatedSkip:
    return GatedSkip(channels).to(device=like.device, dtype=like.dtype)
