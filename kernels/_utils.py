"""Pieces every op module shares: the optional Triton import, the launch device, ``padded_size`` and the
flash-attention accuracy rule the GPU tests and benchmarks apply."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is an optional extra: without it only the PyTorch paths run (see _backend.use_triton)
    triton = tl = None


class Kernel(Protocol):
    """A ``@triton.jit`` function: launched as ``kernel[grid](*args, **meta)``, or called from another kernel."""

    def __getitem__(self, grid: Any) -> Callable[..., Any]: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def jit(fn: Callable[..., Any]) -> Kernel:
    """``triton.jit`` when Triton is installed; otherwise the function stays plain Python and is never launched
    (the backend chooses the PyTorch paths without Triton), so it is typed as the kernel it would be."""
    return cast(Kernel, fn) if triton is None else triton.jit(fn)


def constexpr_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``triton.constexpr_function``: a plain function of ints that kernels call at compile time on their constexprs
    (and the host calls as is); without Triton the function itself."""
    return fn if triton is None else triton.constexpr_function(fn)


def on_device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on x's GPU (Triton uses the current CUDA device); nothing to do for the interpreter's CPU tensors."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): the unit the launchers size their grids in."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def padded_size(size: int, patch: int) -> int:
    """Smallest multiple of ``patch`` that is >= ``size`` (MONAI pads at the end)."""
    return -(-size // patch) * patch


@dataclasses.dataclass(frozen=True)
class FlashError:
    """One tensor under the flash-attention rule: max |kernel - fp64|, max |same-dtype eager - fp64|, max |fp64|."""

    name: str
    err: float
    ref_err: float
    scale: float
    finite: bool

    @property
    def ok(self) -> bool:
        """Finite, and at most twice the eager error plus 1e-5 of the scale and 1e-6 (for errors that are exactly
        zero, e.g. the gradient of a bias no window sees): CONTRIBUTING's tolerance rule."""
        return self.finite and self.err <= 2 * self.ref_err + 1e-5 * self.scale + 1e-6

    def __str__(self) -> str:
        return f"{self.name}: kernel error {self.err:.3g}, eager {self.ref_err:.3g}, values up to {self.scale:.3g}"


def flash_errors(
    names: Sequence[str], got: Sequence[torch.Tensor], eager: Sequence[torch.Tensor], exact: Sequence[torch.Tensor]
) -> list[FlashError]:
    """The flash-attention rule per tensor: ``got`` (the kernel's) and ``eager`` (the PyTorch reference in the same
    dtype) against ``exact`` (the reference in fp64), matched by position with ``names``."""
    if not len(names) == len(got) == len(eager) == len(exact):
        raise ValueError(
            f"flash_errors: {len(names)} names, {len(got)} kernel, {len(eager)} eager and {len(exact)} exact tensors"
        )
    results = []
    for name, a, e, w in zip(names, got, eager, exact, strict=True):
        w = w.double()
        results.append(
            FlashError(
                name,
                (a.double() - w).abs().max().item(),
                (e.double() - w).abs().max().item(),
                w.abs().max().item(),
                bool(torch.isfinite(a).all()),
            )
        )
    return results
