"""medmap-fast: modality-aware 3D MRI vision-language pre-training (MedMAP) with Triton kernels."""

from medmap_fast import kernels
from medmap_fast.kernels import backend

__version__ = "0.1.0"
__all__ = ["backend", "kernels"]
