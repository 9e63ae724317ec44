"""segmentation_models_pytorch's native EfficientNet (``efficientnet-b*`` encoders) with the
norm -> Swish pairs fused.

``self._swish`` is one SiLU module called several times (after ``_bn0``, after ``_bn1``, inside
the squeeze-excitation; in the encoder after the stem and after the head), so its slot cannot
become a FusedIdentity: the classes are swapped for subclasses whose methods are smp's own
(0.6.0, verified by source digest before swapping) minus the Swish calls the fused norms absorb.
Which norms absorbed their Swish is recorded per instance (``_fusedskip_bn0_act``,
``_fusedskip_bn1_act``), so a block whose ``_bn0`` could not be fused still applies its Swish.
``_bn2`` of a block with the identity skip takes the residual add (``_fusedskip_bn2_residual``)
whenever drop connect is off (eval, or a rate of None/0); with drop connect on in training it
runs as a fused norm alone and the original drop connect + add follow.
Every argument keeps its meaning: ``drop_connect_rate`` (None, 0 or > 0, train or eval) runs
the very code of the original forward.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from segmentation_models_pytorch.encoders._efficientnet import MBConvBlock, drop_connect
from segmentation_models_pytorch.encoders.efficientnet import EfficientNetEncoder
from torch.nn import functional as F


class FusedMBConvBlock(MBConvBlock):
    """MBConvBlock whose ``_bn0`` / ``_bn1`` apply the Swish (when their flag is set)."""

    _fusedskip_restores_to = MBConvBlock
    _fusedskip_bn0_act = False
    _fusedskip_bn1_act = False
    _fusedskip_bn2_residual = False

    def forward(self, inputs: torch.Tensor, drop_connect_rate: Optional[float] = None):
        x = inputs
        if self._has_expansion:
            x = self._expand_conv(inputs)
            x = self._bn0(x)  # BatchNormAct2d: _bn0 + Swish when fused
            if not self._fusedskip_bn0_act:
                x = self._swish(x)

        x = self._depthwise_conv(x)
        x = self._bn1(x)  # BatchNormAct2d: _bn1 + Swish when fused
        if not self._fusedskip_bn1_act:
            x = self._swish(x)

        if self._has_se:
            x_squeezed = F.adaptive_avg_pool2d(x, 1)
            x_squeezed = self._se_reduce(x_squeezed)
            x_squeezed = self._swish(x_squeezed)
            x_squeezed = self._se_expand(x_squeezed)
            x = torch.sigmoid(x_squeezed) * x

        x = self._project_conv(x)
        if self._fusedskip_bn2_residual and not (drop_connect_rate is not None and drop_connect_rate > 0
                                                 and self.training):
            return self._bn2(x, residual=inputs)  # _bn2 + the residual add in one op (no drop connect here)
        x = self._bn2(x)

        if self._has_drop_connect:
            if drop_connect_rate is not None and drop_connect_rate > 0:
                x = drop_connect(x, p=drop_connect_rate, training=self.training)
            x = x + inputs
        return x


class FusedEfficientNetEncoder(EfficientNetEncoder):
    """EfficientNetEncoder whose stem ``_bn0`` (and head ``_bn1``, used by ``extract_features``
    only) apply the Swish when their flag is set."""

    _fusedskip_restores_to = EfficientNetEncoder
    _fusedskip_bn0_act = False
    _fusedskip_bn1_act = False

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self._bn0(self._conv_stem(x))
        return x if self._fusedskip_bn0_act else self._swish(x)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        features = [x]

        if self._depth >= 1:
            x = self._stem(x)
            features.append(x)

        depth = 1
        for i, block in enumerate(self._blocks):
            drop_connect_prob = self._drop_connect_rate * i / len(self._blocks)
            x = block(x, drop_connect_prob)

            if i in self._out_indexes:
                features.append(x)
                depth += 1

            if not torch.jit.is_scripting() and depth > self._depth:
                break

        features = features[: self._depth + 1]

        return features

    def extract_features(self, inputs):
        x = self._stem(inputs)

        for idx, block in enumerate(self._blocks):
            drop_connect_rate = self._global_params.drop_connect_rate
            if drop_connect_rate:
                drop_connect_rate *= float(idx) / len(self._blocks)
            x = block(x, drop_connect_rate=drop_connect_rate)

        x = self._bn1(self._conv_head(x))
        return x if self._fusedskip_bn1_act else self._swish(x)
