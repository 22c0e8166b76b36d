"""Backend selection for the functional ops: ``"triton"``, ``"torch"`` (the plain-PyTorch reference) or ``"auto"``.

``auto`` runs the Triton kernels on CUDA tensors and the reference elsewhere. Under ``TRITON_INTERPRET=1`` the Triton
path also accepts CPU tensors (that is how CI tests the kernels). The default comes from ``MEDMAP_FAST_BACKEND``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_ENV_VAR = "MEDMAP_FAST_BACKEND"


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


_current: contextvars.ContextVar[str] = contextvars.ContextVar(
    "medmap_fast_backend",
    default=_checked(os.environ.get(_ENV_VAR, "auto"), _ENV_VAR),  # noqa: B039 (a str)
)


# The three queries below are constants to torch.compile (it calls them once while tracing): a compiled graph keeps
# the backend in force when it was traced.
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """True when the ``triton`` package is importable."""
    return importlib.util.find_spec("triton") is not None


@torch.compiler.assume_constant_result
def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def get_backend() -> str:
    """The backend in force: the innermost :func:`backend` context, else ``MEDMAP_FAST_BACKEND``, else ``auto``."""
    return _current.get()


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Context manager selecting the backend of every op called inside it.

    >>> with medmap_fast.backend("torch"):
    ...     out = encoder(volumes, modality_ids)
    """
    token = _current.set(_checked(name, "medmap_fast.backend"))
    try:
        yield name
    finally:
        _current.reset(token)


def use_triton(x: torch.Tensor, op: str) -> bool:
    """Decide whether ``op`` runs its Triton kernel for an input living on ``x.device``."""
    name = get_backend()
    if name == "torch":
        return False
    runnable = triton_available() and (x.is_cuda or (interpreting() and x.device.type == "cpu"))
    if name == "auto":
        return x.is_cuda and triton_available()
    if not runnable:
        raise RuntimeError(
            f"{op}: backend 'triton' was requested for a tensor on {x.device}, but "
            + (
                "the 'triton' package is not installed"
                if not triton_available()
                else "Triton needs a CUDA tensor (or TRITON_INTERPRET=1 set before medmap_fast is imported)"
            )
        )
    return True
