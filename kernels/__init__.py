"""Functional ops of medmap-fast, one interface for every backend (installed as ``medmap_fast.kernels``).

Each op validates its arguments, then runs its Triton kernel or its plain-PyTorch reference, as chosen by
:func:`backend` / ``MEDMAP_FAST_BACKEND`` (``auto``: Triton for CUDA tensors, the reference otherwise).
"""

from ._backend import BACKENDS, backend, get_backend, interpreting, triton_available, use_triton
from .gated_attention import gated_attention_reference
from .interface import gated_attention, patch_embed_3d, window_attention
from .patch_embed_3d import patch_embed_3d_reference
from .window_attention import window_attention_reference

__all__ = [
    "BACKENDS",
    "backend",
    "get_backend",
    "interpreting",
    "triton_available",
    "use_triton",
    "gated_attention",
    "gated_attention_reference",
    "patch_embed_3d",
    "patch_embed_3d_reference",
    "window_attention",
    "window_attention_reference",
]
