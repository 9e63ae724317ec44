"""torchvision ResNet blocks with bn1 (+ bn2 in Bottleneck) fused with the ReLU that follows.

``self.relu`` is one module called twice in these blocks (after bn1, and after the residual
add), so its slot cannot become a FusedIdentity: the class is swapped for a subclass whose
forward skips the first call (the fused norm applies the ReLU). Same attributes, same state.
"""
from __future__ import annotations

from torch import Tensor
from torchvision.models.resnet import BasicBlock, Bottleneck


class FusedBasicBlock(BasicBlock):
    """torchvision BasicBlock whose ``bn1`` is a fused BatchNorm + ReLU."""

    _fusedskip_restores_to = BasicBlock

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)  # BatchNormAct2d: bn1 + ReLU
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class FusedBottleneck(Bottleneck):
    """torchvision Bottleneck whose ``bn1`` and ``bn2`` are fused BatchNorm + ReLU."""

    _fusedskip_restores_to = Bottleneck

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)  # bn1 + ReLU
        out = self.conv2(out)
        out = self.bn2(out)  # bn2 + ReLU
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out
