"""Functional ops of medmap-fast, one interface for every backend (installed as ``medmap_fast.kernels``).

Each op validates its arguments, then runs its Triton kernel (a registered torch op, ``torch.ops.medmap_fast.<op>``)
or its plain-PyTorch path, as chosen by :func:`backend` / ``MEDMAP_FAST_BACKEND`` (``auto``: Triton for CUDA tensors,
PyTorch otherwise). The modules ``patch_embed``, ``window_attn`` (+ ``window_attn_cpu``) and ``gated_attn`` hold each
op's reference and kernels; ``ops`` the registrations; ``interface`` the public functions.
"""

import sys

if __name__ != "medmap_fast.kernels":
    # From a checkout (the repository root on sys.path, as under `python -m pytest`) this folder is also importable as
    # a top-level `kernels`, a name transformers probes with importlib.import_module. A second copy would register the
    # torch ops again, which frees the first copy's op entries under its live handles (segfaults in later op calls):
    # that name gets the installed package instead.
    import importlib

    sys.modules[__name__] = importlib.import_module("medmap_fast.kernels")
else:
    from ._backend import BACKENDS, backend, get_backend, interpreting, triton_available, use_triton
    from .gated_attn import gated_attention_reference
    from .interface import gated_attention, patch_embed_3d, window_attention
    from .patch_embed import patch_embed_3d_reference
    from .window_attn import window_attention_reference

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
