"""World-space geometry for the synthetic demo: voxel grids, random poses, smooth random fields and soft shapes.

Every shape is defined in RAS+ millimetres (x: left -> right, y: posterior -> anterior, z: inferior -> superior) and
evaluated at the world coordinates of the output voxels, so the same seed gives the same anatomy and lesions at any
output size; only the sampling changes. Volumes are indexed ``[D, H, W] = [x, y, z]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Size3 = tuple[int, int, int]
Vec3 = Sequence[float] | np.ndarray  # a point, offset or set of radii in mm: 3 floats, or a float array [3]


def as_size3(size: int | Sequence[int]) -> Size3:
    """``32`` -> ``(32, 32, 32)``; a 3-sequence of positive ints is returned as a tuple."""
    sizes = (size,) * 3 if isinstance(size, int) else tuple(size)
    if len(sizes) != 3 or not all(isinstance(s, int) and s >= 4 for s in sizes):
        raise ValueError(f"size: expected an int >= 4 or three of them, got {size!r}")
    return sizes


Box = tuple[slice, slice, slice]


class Grid:
    """An output voxel grid: ``shape``, isotropic ``spacing`` (mm) and a 4x4 affine from voxel index to anatomy mm.

    The affine may include a random pose (small rotation, scale and shift); shapes are evaluated only inside the
    index box that covers their world bounding box (:meth:`box`), which keeps small lesions and vessels cheap.
    """

    def __init__(self, shape: Size3, spacing: float, affine: np.ndarray) -> None:
        self.shape, self.spacing, self.affine = shape, float(spacing), np.asarray(affine, dtype=np.float64)
        self._affine32 = torch.from_numpy(self.affine.astype(np.float32))
        self._inverse = np.linalg.inv(self.affine[:3, :3])

    @classmethod
    def centered(cls, size: Size3, fov_mm: float, center_mm: Vec3) -> Grid:
        """An axis-aligned grid whose longest axis spans ``fov_mm``, centred on ``center_mm``."""
        spacing = fov_mm / max(size)
        affine = np.diag([spacing, spacing, spacing, 1.0])
        affine[:3, 3] = np.asarray(center_mm, dtype=np.float64) - spacing * (np.asarray(size) - 1) / 2
        return cls(size, spacing, affine)

    def posed(self, matrix: np.ndarray, center: Vec3, shift: Vec3) -> Grid:
        """The grid seeing anatomy moved by ``p -> center + matrix @ (p - center) + shift``."""
        pose = np.eye(4)
        pose[:3, :3] = matrix
        pose[:3, 3] = np.asarray(center) - matrix @ np.asarray(center) + np.asarray(shift)
        return Grid(self.shape, self.spacing, pose @ self.affine)

    def coords(self, box: Box | None = None) -> torch.Tensor:
        """Anatomy coordinates (mm) [d, h, w, 3] of the voxels in ``box`` (the whole grid by default)."""
        slices = box or tuple(slice(0, n) for n in self.shape)
        a = self._affine32
        # origin + i * column_0 + j * column_1 + k * column_2, as three broadcast adds (no [N, 3] @ [3, 3] matmul).
        i, j, k = (torch.arange(b.start, b.stop, dtype=torch.float32)[:, None] * a[:3, n] for n, b in enumerate(slices))
        return (a[:3, 3] + i)[:, None, None] + j[None, :, None] + k[None, None, :]

    def box(self, lo_mm: Vec3, hi_mm: Vec3, margin_vox: int = 2) -> Box | None:
        """Index box covering the world box [lo, hi] (infinite bounds allowed), or None when it misses the grid."""
        lo = np.clip(np.asarray(lo_mm, dtype=np.float64), -1e5, 1e5)
        hi = np.clip(np.asarray(hi_mm, dtype=np.float64), -1e5, 1e5)
        corners = np.stack(np.meshgrid(*zip(lo, hi, strict=True), indexing="ij"), -1).reshape(-1, 3)
        index = (corners - self.affine[:3, 3]) @ self._inverse.T
        start = np.maximum(np.floor(index.min(0)).astype(int) - margin_vox, 0)
        stop = np.minimum(np.ceil(index.max(0)).astype(int) + 1 + margin_vox, self.shape)
        if np.any(stop <= start):
            return None
        x, y, z = (slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
        return x, y, z


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation [3, 3] about a uniformly random axis by an angle uniform in [-max_deg, max_deg]."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def radial_expand(coords: torch.Tensor, center: Vec3, strength: float, sigma_mm: float) -> torch.Tensor:
    """Coordinates to sample anatomy at so that it looks pushed away from ``center`` (mass effect, dilated ventricles).

    A point p samples ``c + (p - c) * (1 - strength * exp(-|p - c|^2 / (2 sigma^2)))``: content near ``c`` is
    magnified by up to ``1 / (1 - strength)``, far content is untouched; any ``strength`` in [0, 1) keeps it one-to-one.
    """
    c = torch.tensor(center, dtype=coords.dtype)
    d = coords - c
    shrink = 1.0 - strength * torch.exp(-(d * d).sum(-1, keepdim=True) / (2 * sigma_mm**2))
    return c + d * shrink


class NoiseField:
    """Smooth Gaussian random fields with correlation length about ``scale_mm`` over a fixed world box.

    Unit-variance values on a lattice of spacing ``scale_mm`` (drawn once, so the field does not depend on the output
    size or on which part of the grid is evaluated), interpolated trilinearly and rescaled to unit std.
    """

    def __init__(self, rng: np.random.Generator, channels: int, scale_mm: float, center: Vec3, box_mm: float) -> None:
        n = math.ceil(box_mm / scale_mm) + 3
        self.lattice = torch.from_numpy(rng.standard_normal((1, channels, n, n, n), dtype=np.float32))
        self.center = torch.tensor(center, dtype=torch.float32)
        self.half = (n - 1) * scale_mm / 2

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        """Field values [channels, *coords.shape[:-1]] at coordinates [..., 3] (mm)."""
        lead = coords.shape[:-1]
        norm = ((coords - self.center) / self.half).reshape(1, -1, 1, 1, 3)
        # grid_sample wants (x, y, z) = (W, H, D) index order, i.e. our axes reversed.
        field = F.grid_sample(self.lattice, norm.flip(-1), mode="bilinear", padding_mode="border", align_corners=True)
        # Trilinear interpolation of white noise has variance between 8/27 and 1; 0.6 is its mean.
        return field.reshape(-1, *lead) / math.sqrt(0.6)


def soft(sdf_mm: torch.Tensor, voxel_mm: float) -> torch.Tensor:
    """Partial-volume occupancy in [0, 1] of a signed distance (negative inside): a ramp about one voxel wide."""
    return torch.sigmoid(sdf_mm * (-2.5 / voxel_mm))


def ellipsoid_sdf(coords: torch.Tensor, center: Vec3, radii: Vec3, rotation: np.ndarray | None = None) -> torch.Tensor:
    """Approximate signed distance (mm, negative inside) to an ellipsoid; ``rotation`` maps local axes to world."""
    q = coords - torch.tensor(center, dtype=coords.dtype)
    if rotation is not None:
        q = q @ torch.as_tensor(rotation, dtype=coords.dtype)
    u = q / torch.tensor(radii, dtype=coords.dtype)
    k = torch.linalg.vector_norm(u, dim=-1)
    grad = torch.linalg.vector_norm(u / torch.tensor(radii, dtype=coords.dtype), dim=-1).clamp_min(1e-6)
    # First-order distance estimate (k - 1) / |grad k|; exact on spheres, good near the surface of ellipsoids.
    return torch.where(k > 1e-6, (k - 1) * k / grad, -float(min(radii)))


def capsule_sdf(coords: torch.Tensor, a: Vec3, b: Vec3, radius: float) -> torch.Tensor:
    """Signed distance (mm) to the capsule of ``radius`` around the segment a-b (vessels, bowel loops)."""
    pa = coords - torch.tensor(a, dtype=coords.dtype)
    ba = torch.tensor(b, dtype=coords.dtype) - torch.tensor(a, dtype=coords.dtype)
    t = ((pa @ ba) / (ba @ ba)).clamp(0, 1)
    return torch.linalg.vector_norm(pa - t[..., None] * ba, dim=-1) - radius


def smooth_union(a: torch.Tensor, b: torch.Tensor, k_mm: float) -> torch.Tensor:
    """Polynomial smooth minimum of two signed distances (a blended union without a crease)."""
    h = (0.5 + 0.5 * (b - a) / k_mm).clamp(0, 1)
    return b + (a - b) * h - k_mm * h * (1 - h)


def rotation_to(direction: Vec3) -> np.ndarray:
    """A rotation [3, 3] whose third column (the local z axis, the long axis of an ellipsoid) is ``direction``."""
    z = np.asarray(direction, dtype=np.float64)
    z = z / np.linalg.norm(z)
    helper = np.array([1.0, 0, 0]) if abs(z[0]) < 0.9 else np.array([0, 1.0, 0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z], axis=1)


def blob(
    grid: Grid,
    center: Vec3,
    radii: Vec3,
    rotation: np.ndarray | None = None,
    rough: tuple[NoiseField, int, float] | None = None,
    grow_mm: float = 0.0,
) -> tuple[Box, torch.Tensor] | None:
    """Signed distance (mm) to an irregular ellipsoid over the grid box that covers it grown by ``grow_mm``.

    ``rough = (field, channel, amplitude_mm)`` perturbs the surface by a smooth random field (a lobulated lesion).
    Returns (box, sdf) or None when the shape misses the grid; callers take ``soft(sdf - offset)`` for shells.
    """
    amplitude = rough[2] if rough else 0.0
    reach = max(radii) + grow_mm + 2 * amplitude
    box = grid.box(np.asarray(center) - reach, np.asarray(center) + reach)
    if box is None:
        return None
    coords = grid.coords(box)
    sdf = ellipsoid_sdf(coords, center, radii, rotation)
    if rough:
        field, channel, amplitude = rough
        sdf = sdf + amplitude * field(coords)[channel]
    return box, sdf
