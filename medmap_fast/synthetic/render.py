"""Image formation for the synthetic demo: tissue compartments -> contrasts -> bias field and Rician noise.

A :class:`Scene` holds partial-volume fractions of tissue compartments and, per compartment, one intensity for each
rendering channel (an MRI contrast). Adding a compartment *replaces* what was there (a lesion displaces tissue);
multiplicative modifiers change the signal of the tissue underneath (e.g. an infarct raises DWI of the grey and white
matter it covers while keeping their contrast). Rendering sums intensity x visible fraction over compartments.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .geometry import Box


class Scene:
    """Compartments on a grid of shape ``[D, H, W]`` rendered into ``len(channels)`` contrasts.

    Each compartment and modifier may cover only an index ``box`` of the grid (its fraction then has the box's
    shape), so that small structures cost in proportion to their size.
    """

    def __init__(self, shape: Sequence[int], channels: Sequence[str]) -> None:
        self.shape = tuple(shape)
        self.channels = tuple(channels)
        self.names: list[str] = []
        self._layers: list[tuple[Box, torch.Tensor, torch.Tensor, bool]] = []
        self._modifiers: list[tuple[Box, torch.Tensor, torch.Tensor]] = []
        d, h, w = self.shape
        self._full: Box = (slice(0, d), slice(0, h), slice(0, w))

    def add(
        self,
        name: str,
        fraction: torch.Tensor,
        intensities: Sequence[float],
        box: Box | None = None,
        cover: bool = True,
    ) -> None:
        """Put compartment ``name`` (fraction in [0, 1] over ``box``) on top: what lies below is scaled by 1 - fraction.

        ``cover=False`` mixes it in without covering what lies below (for partial-volume tissue maps that already
        sum to one, such as grey matter, white matter and CSF); later layers still cover it.
        """
        if len(intensities) != len(self.channels):
            raise ValueError(f"{name}: expected {len(self.channels)} intensities, got {len(intensities)}")
        self._layers.append((box or self._full, fraction, torch.tensor(intensities, dtype=torch.float32), cover))
        self.names.append(name)

    def modulate(self, mask: torch.Tensor, factors: Sequence[float], box: Box | None = None) -> None:
        """Multiply the rendered signal of channel c by ``1 + mask * (factors[c] - 1)`` over ``box``."""
        self._modifiers.append((box or self._full, mask, torch.tensor(factors, dtype=torch.float32)))

    def visible(self) -> list[torch.Tensor]:
        """Visible fraction of each compartment (over its box): its fraction times 1 - everything added after it."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(self._layers)
        uncovered = torch.ones(self.shape)
        for k in range(len(self._layers) - 1, -1, -1):
            box, fraction, _, cover = self._layers[k]
            out[k] = fraction * uncovered[box]
            if cover:
                uncovered[box] *= 1.0 - fraction
        return out

    def fraction(self, name: str) -> torch.Tensor:
        """Total visible fraction [D, H, W] of every compartment called ``name``."""
        total = torch.zeros(self.shape)
        for (box, *_), vis, n in zip(self._layers, self.visible(), self.names, strict=True):
            if n == name:
                total[box] += vis
        return total

    def render(self, channels: Sequence[str] | None = None) -> torch.Tensor:
        """Signal [C, D, H, W] of the named channels (all by default)."""
        idx = torch.tensor([self.channels.index(c) for c in (channels or self.channels)])
        image = torch.zeros(len(idx), *self.shape)
        for (box, _, row, _), vis in zip(self._layers, self.visible(), strict=True):
            image[(slice(None), *box)] += row[idx].view(-1, 1, 1, 1) * vis
        for box, mask, factors in self._modifiers:
            image[(slice(None), *box)] *= 1.0 + mask * (factors[idx] - 1.0).view(-1, 1, 1, 1)
        return image


def polynomial_bias(
    rng: np.random.Generator, coords: torch.Tensor, count: int, strength: float, fov_mm: float
) -> torch.Tensor:
    """Smooth multiplicative receive-coil bias fields [count, D, H, W]: exp of a random quadratic in space.

    ``strength`` is the standard deviation of the log-field across the field of view (0.15 = about +-15 %).
    """
    p = (coords - coords.mean(dim=(0, 1, 2))) / (fov_mm / 2)
    x, y, z = p.unbind(-1)
    basis = torch.stack([x, y, z, x * y, x * z, y * z, x * x - 1 / 3, y * y - 1 / 3, z * z - 1 / 3])  # [9, D, H, W]
    coeffs = torch.from_numpy(rng.normal(scale=strength / 1.2, size=(count, 9)).astype(np.float32))
    return torch.exp(torch.einsum("mk,kdhw->mdhw", coeffs, basis).clamp(-1.0, 1.0))


def rician(rng: np.random.Generator, image: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Magnitude of the signal plus complex Gaussian noise of std ``sigma`` [C] per channel: ``|s + n_re + i n_im|``."""
    noise = torch.from_numpy(rng.standard_normal((2, *image.shape), dtype=np.float32))
    s = sigma.view(-1, *([1] * (image.ndim - 1)))
    return torch.sqrt((image + s * noise[0]) ** 2 + (s * noise[1]) ** 2)
