"""medmap-fast: modality-aware 3D MRI vision-language pre-training (MedMAP) with Triton kernels."""

from medmap_fast import kernels
from medmap_fast.kernels import backend
from medmap_fast.losses import AsymmetricContrastiveLoss, FocalLoss, LabelPromptAlignmentLoss
from medmap_fast.modalities import DEFAULT_MODALITIES, DEFAULT_MODALITY_NAMES, ModalityRegistry
from medmap_fast.models.encoder import EncoderOutput, MedMAPEncoder
from medmap_fast.models.medmap import MedMAPClassifier, MedMAPPretrainModel
from medmap_fast.models.monai_patch import patch_monai
from medmap_fast.models.swin3d import SwinViT3D
from medmap_fast.models.text import TextEncoder

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_MODALITIES",
    "DEFAULT_MODALITY_NAMES",
    "EncoderOutput",
    "MedMAPClassifier",
    "MedMAPEncoder",
    "MedMAPPretrainModel",
    "ModalityRegistry",
    "SwinViT3D",
    "AsymmetricContrastiveLoss",
    "FocalLoss",
    "LabelPromptAlignmentLoss",
    "TextEncoder",
    "backend",
    "kernels",
    "patch_monai",
]
