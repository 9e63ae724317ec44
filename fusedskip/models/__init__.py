"""Models built from fusedskip modules: AddUNet (paper and hierarchical forms) and the
concatenative U-Net baseline, and the DnCNN denoising baseline."""
from .addunet import FUSIONS, MODELS, VARIANTS, AddUNet, ConcatUNet, build_model, pad_to_multiple
from .blocks import ConvBlock
from .dncnn import DnCNN
from .vmsanet import CACM, VMSM, VMSANet

__all__ = ["AddUNet", "ConcatUNet", "DnCNN", "build_model", "pad_to_multiple", "MODELS", "VARIANTS", "FUSIONS",
           "ConvBlock", "VMSANet", "CACM", "VMSM"]
