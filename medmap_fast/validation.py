"""Argument checks shared by the public entry points.

Every failure is a ``ValueError`` that names the argument, what was received and what was expected, e.g.
``volumes: expected a float tensor [V, 1, D, H, W], got shape (2, 96, 96, 96) dtype torch.float32``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

import torch


def describe(x: torch.Tensor) -> str:
    """Short description of a tensor for error messages."""
    return f"shape {tuple(x.shape)} dtype {x.dtype}"


def fail(name: str, expected: str, got: str) -> NoReturn:
    """Raise the package's standard ValueError."""
    raise ValueError(f"{name}: expected {expected}, got {got}")


def check_float_tensor(x: object, name: str, expected_shape: str, ndim: int) -> torch.Tensor:
    """A floating-point tensor with ``ndim`` dimensions and only finite values."""
    if not isinstance(x, torch.Tensor):
        fail(name, f"a float tensor {expected_shape}", type(x).__name__)
    if x.ndim != ndim or not x.is_floating_point():
        fail(name, f"a float tensor {expected_shape}", describe(x))
    check_finite(x, name)
    return x


def check_finite(x: torch.Tensor, name: str) -> None:
    """No NaN or Inf anywhere in ``x`` (one reduction; reports how many bad values). Skipped while torch.compile
    traces: a value check syncs with the host, which would break the graph."""
    if torch.compiler.is_compiling():
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        fail(name, "finite values only", f"{int(bad.sum())} NaN/Inf values in a tensor of {describe(x)}")


def check_volumes(
    volumes: object, name: str = "volumes", in_chans: int = 1, min_size: Sequence[int] = (1, 1, 1)
) -> torch.Tensor:
    """A float batch of volumes [V, in_chans, D, H, W], finite, each side at least ``min_size`` (2 entries: images
    [V, in_chans, H, W])."""
    sides = "D, H, W"[3 * (3 - len(min_size)) :]
    expected = f"[V, {in_chans}, {sides}] with {sides} >= {tuple(min_size)}"
    x = check_float_tensor(volumes, name, expected, 2 + len(min_size))
    if x.shape[1] != in_chans or any(s < m for s, m in zip(x.shape[2:], min_size, strict=True)) or x.shape[0] == 0:
        fail(name, f"a float tensor {expected}", describe(x))
    return x


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """An integer dtype other than bool (a bool mask is not a list of ids)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_index(
    ids: object,
    name: str,
    length: int,
    upper: int,
    length_of: str = "volumes",
    what: str = "ids",
    *,
    values: bool = True,
) -> torch.Tensor:
    """A 1-D integer tensor of ``length`` entries, each in ``[0, upper)``. The range check (one host sync) runs only
    with ``values`` and never while torch.compile traces; the shape and dtype checks always run."""
    expected = f"a 1-D integer tensor [{length}] (one per {length_of}) with {what} in [0, {upper})"
    if not isinstance(ids, torch.Tensor):
        fail(name, expected, type(ids).__name__)
    if ids.ndim != 1 or ids.shape[0] != length or not is_integer_dtype(ids.dtype):
        fail(name, expected, describe(ids))
    if length and values and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())  # one host sync for both bounds
        if lo < 0 or hi >= upper:
            fail(name, expected, f"values in [{lo}, {hi}]")
    return ids.long()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true/false are not numbers


_JSON_KINDS: dict[str, Callable[[object], bool]] = {
    "int": _is_int,
    "number": lambda v: _is_int(v) or isinstance(v, float),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "int list": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
}


def check_json_fields(path: object, values: Mapping[str, object], kinds: Mapping[str, str]) -> None:
    """Every key of ``values`` listed in ``kinds`` holds a JSON value of that kind ("int", "number", "bool", "str",
    "int list", or alternatives joined by " or "); else ValueError naming the file, the key and the value."""
    for key, kind in kinds.items():
        if key in values and not any(_JSON_KINDS[k](values[key]) for k in kind.split(" or ")):
            raise ValueError(f"{path}: expected {key!r} to be {kind}, got {values[key]!r}")
