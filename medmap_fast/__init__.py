"""medmap-fast: modality-aware 3D MRI vision-language pre-training (MedMAP) with Triton kernels."""

from medmap_fast import kernels
from medmap_fast.kernels import backend
from medmap_fast.losses import AsymmetricContrastiveLoss, FocalLoss, LabelPromptAlignmentLoss
from medmap_fast.models.text import TextEncoder

__version__ = "0.1.0"
__all__ = [
    "AsymmetricContrastiveLoss",
    "FocalLoss",
    "LabelPromptAlignmentLoss",
    "TextEncoder",
    "backend",
    "kernels",
]
