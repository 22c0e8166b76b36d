"""Augmentation of one cached study ``[M, X, Y, Z]``: crop or pad to a fixed size, flips, axial rot90, intensity.

The parameters are drawn on the host (:func:`sample_params`) and applied either here (:func:`apply`, the torch
loader) or by the DALI pipeline (:mod:`medmap_fast.data.dali`), which takes the same :class:`AugmentParams`: the two
loaders give the same batches. Every spatial transform acts on the whole study array, so all its modalities get the
same crop, flips and rotation; the intensity transform is drawn per modality (per volume).

Order: crop/pad (pad value 0 = background of the z-scored cache), flips, rot90 in the axial (X, Y) plane, then
``x * scale[m] + shift[m]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medmap_fast.validation import fail

Size = tuple[int, int, int]


@dataclass(frozen=True)
class AugmentConfig:
    """How studies are cropped and augmented.

    size: output (X, Y, Z) in voxels. random_crop: a uniformly random crop (or, for a side smaller than ``size``, a
    random offset of the study inside the padded volume); False = centred. flip: probability of flipping along X, Y,
    Z. rot90: rotate by k * 90 degrees in the axial (X, Y) plane, k uniform in 0..3 (needs size X == Y).
    scale / shift: per-volume intensity ``x * (1 + a) + b`` with a ~ U(-scale, scale), b ~ U(-shift, shift) (the
    cache is z-scored, so these are in standard deviations).
    """

    size: Size = (96, 96, 96)
    random_crop: bool = True
    flip: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rot90: bool = False
    scale: float = 0.1
    shift: float = 0.1

    def __post_init__(self) -> None:
        size = tuple(self.size)
        if len(size) != 3 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in size):
            fail("augment.size", "3 ints >= 1 (X, Y, Z)", repr(self.size))
        object.__setattr__(self, "size", tuple(int(s) for s in size))
        flip = tuple(self.flip)
        if len(flip) != 3 or not all(isinstance(p, (int, float)) and 0.0 <= p <= 1.0 for p in flip):
            fail("augment.flip", "3 probabilities in [0, 1] (X, Y, Z)", repr(self.flip))
        object.__setattr__(self, "flip", tuple(float(p) for p in flip))
        if self.rot90 and self.size[0] != self.size[1]:
            fail("augment.rot90", "size X == Y for an axial rot90 (the plane must be square)", f"size {self.size}")
        for name in ("scale", "shift"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < (1.0 if name == "scale" else float("inf")):
                fail(f"augment.{name}", "a float in [0, 1)" if name == "scale" else "a float >= 0", repr(value))

    @classmethod
    def eval(cls, size: Size = (96, 96, 96)) -> AugmentConfig:
        """Evaluation preset: centre crop/pad to ``size``, no augmentation (deterministic)."""
        return cls(size=size, random_crop=False, flip=(0.0, 0.0, 0.0), rot90=False, scale=0.0, shift=0.0)


@dataclass(frozen=True, eq=False)
class AugmentParams:
    """The augmentation of one study with M modalities.

    start: crop start per axis (X, Y, Z) in voxels of the study; negative = that many voxels of padding before the
    study. flip: flip along X, Y, Z. k: quarter turns in the (X, Y) plane (``torch.rot90(x, k, dims=(X, Y))``).
    scale, shift: float32 [M], the factor ``1 + a`` and the offset ``b`` of each modality.
    """

    start: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    k: int
    scale: np.ndarray
    shift: np.ndarray


def crop_starts(shape: Sequence[int], size: Size, rng: np.random.Generator | None) -> tuple[int, int, int]:
    """Start of the crop per axis: uniform over every placement (rng given) or centred (rng None).

    A side longer than ``size`` gives a start in [0, side - size] (the crop lies inside); a shorter side gives one in
    [side - size, 0] (the study lies inside the padded volume).
    """

    def start(side: int, out: int) -> int:
        d = side - out
        return int(rng.integers(min(d, 0), max(d, 0), endpoint=True)) if rng is not None else d // 2

    x, y, z = shape
    return start(x, size[0]), start(y, size[1]), start(z, size[2])


def sample_params(
    rng: np.random.Generator, shape: Sequence[int], num_modalities: int, config: AugmentConfig
) -> AugmentParams:
    """Draw the augmentation of a study whose array is [num_modalities, *shape] (shape = X, Y, Z)."""
    start = crop_starts(shape, config.size, rng if config.random_crop else None)
    fx, fy, fz = (bool(rng.random() < p) if p > 0 else False for p in config.flip)
    k = int(rng.integers(0, 4)) if config.rot90 else 0
    a = rng.uniform(-config.scale, config.scale, num_modalities) if config.scale else np.zeros(num_modalities)
    b = rng.uniform(-config.shift, config.shift, num_modalities) if config.shift else np.zeros(num_modalities)
    return AugmentParams(start, (fx, fy, fz), k, (1.0 + a).astype(np.float32), b.astype(np.float32))


def study_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The RNG of study ``index`` in ``epoch``: the same whatever the worker, rank or resume point."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def crop_reads_most(shape: Sequence[int], size: Size) -> bool:
    """Does a ``size`` crop of a study of spatial ``shape`` (X, Y, Z) read at least half of its voxels? Then one read
    of the whole file beats a memory map, which only pays when the crop leaves most of the array unread."""
    return 2 * math.prod(min(side, out) for side, out in zip(shape, size, strict=True)) >= math.prod(shape)


def crop_windows(shape: Sequence[int], start: Sequence[int], size: Size) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(source, destination) slices over (X, Y, Z): ``out[dst] = study[src]``, the rest of ``out`` is padding."""
    src, dst = [], []
    for side, s, out in zip(shape, start, size, strict=True):
        lo, hi = max(s, 0), min(s + out, side)
        n = max(hi - lo, 0)
        src.append(slice(lo, lo + n))
        dst.append(slice(lo - s, lo - s + n))
    return tuple(src), tuple(dst)


def apply(array: np.ndarray | torch.Tensor, params: AugmentParams, size: Size) -> torch.Tensor:
    """Augment one study: ``array`` [M, X, Y, Z] (a float16 array, a memmap of which only the crop is read, or a
    tensor) -> float32 tensor [M, *size]."""
    if array.ndim != 4 or len(params.scale) != array.shape[0] or len(params.shift) != array.shape[0]:
        fail(
            "array",
            f"[M, X, Y, Z] with M = {len(params.scale)} (the params' modalities)",
            f"shape {tuple(array.shape)}",
        )
    if params.k % 2 and size[0] != size[1]:
        fail("params.k", "an even number of quarter turns for a non-square (X, Y) size", f"k={params.k}, size {size}")
    src, dst = crop_windows(array.shape[1:], params.start, size)
    region = array[(slice(None), *src)]
    # The one read of the memmap (or a copy of the tensor): a new float32 tensor, ours to change in place.
    crop = (
        region.to(torch.float32, copy=True)
        if isinstance(region, torch.Tensor)
        else torch.from_numpy(np.array(region, dtype=np.float32))
    )
    if tuple(crop.shape[1:]) == tuple(size):
        out = crop  # the crop fills the output: nothing to pad
    else:
        out = torch.zeros((array.shape[0], *size), dtype=torch.float32)
        out[(slice(None), *dst)] = crop
    dims = [axis + 1 for axis, f in enumerate(params.flip) if f]
    if dims:
        out = out.flip(dims)
    if params.k % 4:
        out = torch.rot90(out, params.k, dims=(1, 2))
    view = (-1, 1, 1, 1)
    return out.mul_(torch.from_numpy(params.scale).view(view)).add_(torch.from_numpy(params.shift).view(view))
