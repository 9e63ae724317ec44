"""torchvision ResNet blocks with their norms fused: bn1 (+ bn2 in Bottleneck) with the ReLU that
follows, and the last norm (bn2 / bn3) with the residual add and the ReLU after it, as
``relu(bn(x) + identity)`` in one op (``residual=``).

``self.relu`` is one module called twice in these blocks (after bn1, and after the residual
add), so its slot cannot become a FusedIdentity: the class is swapped for a subclass whose
forward skips the calls the fused norms absorb. Same attributes, same state. Whether the last
norm took the residual is recorded per instance (``_fusedskip_residual``): a block whose last
norm could not be fused runs torchvision's own add and ReLU.
"""
from __future__ import annotations

from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck


class FusedBasicBlock(BasicBlock):
    """torchvision BasicBlock whose ``bn1`` is a fused BatchNorm + ReLU and whose ``bn2`` (when
    ``_fusedskip_residual``) computes ``relu(bn2(x) + identity)``."""

    _fusedskip_restores_to = BasicBlock
    _fusedskip_residual = False

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)  # BatchNormAct2d: bn1 + ReLU
        out = self.conv2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        if self._fusedskip_residual:
            return self.bn2(out, residual=identity)  # bn2 + residual add + ReLU
        out = self.bn2(out)
        out += identity
        out = self.relu(out)
        return out


class FusedBottleneck(Bottleneck):
    """torchvision Bottleneck whose ``bn1`` and ``bn2`` are fused BatchNorm + ReLU and whose
    ``bn3`` (when ``_fusedskip_residual``) computes ``relu(bn3(x) + identity)``."""

    _fusedskip_restores_to = Bottleneck
    _fusedskip_residual = False

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)  # bn1 + ReLU
        out = self.conv2(out)
        out = self.bn2(out)  # bn2 + ReLU
        out = self.conv3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        if self._fusedskip_residual:
            return self.bn3(out, residual=identity)  # bn3 + residual add + ReLU
        out = self.bn3(out)
        out += identity
        out = self.relu(out)
        return out
