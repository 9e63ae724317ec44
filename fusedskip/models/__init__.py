"""Models built from fusedskip modules: AddUNet (paper and hierarchical forms) and the
concatenative U-Net baseline."""
from .addunet import FUSIONS, MODELS, VARIANTS, AddUNet, ConcatUNet, build_model, pad_to_multiple
from .blocks import ConvBlock

__all__ = ["AddUNet", "ConcatUNet", "build_model", "pad_to_multiple", "MODELS", "VARIANTS", "FUSIONS", "ConvBlock"]
