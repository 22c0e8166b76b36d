"""Real brain anatomy for the synthetic demo: the MNI152 2009a template shipped inside the ``nilearn`` wheel.

The grey- and white-matter probability maps and the (skull-stripped) T1 template are read by path with nibabel (no
network, nilearn itself is not imported). Once per process they are reduced to a 2 mm atlas of six channels:

    gm, wm, csf        tissue probabilities; csf = intracranial mask - gm - wm
    outside_mm         distance outside the intracranial mask (the skull and scalp layers are drawn from it)
    sulci              smoothed cortical CSF (where atrophy widens sulci), in [0, 1]
    ventricles         lateral and third ventricles, in [0, 1]

plus lists of lesion-centre candidates (world mm) per region. :func:`sample_brain` resamples the atlas at any voxel
coordinates (area-averaged first when the target is coarser, so partial volumes stay right).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ATLAS_SPACING_MM = 2.0
BRAIN_FOV_MM = 200.0
CHANNELS = ("gm", "wm", "csf", "outside_mm", "sulci", "ventricles")
_MNI_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
_PAD = 10  # atlas voxels of margin around the MNI box, room for the skull and scalp

# Intensity of each brain tissue per contrast (T1, T1c, T2, FLAIR, DWI b=1000, ADC), relative, textbook ordering:
# T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR GM > WM > CSF (CSF nulled); DWI GM >~ WM >> CSF; ADC CSF >> GM > WM.
BRAIN_CONTRASTS = ("T1", "T1c", "T2", "FLAIR", "DWI", "ADC")
BRAIN_TISSUES: dict[str, tuple[float, ...]] = {
    "gm": (0.55, 0.55, 0.58, 0.62, 0.60, 0.30),
    "wm": (0.80, 0.80, 0.40, 0.46, 0.50, 0.25),
    "csf": (0.12, 0.12, 1.00, 0.06, 0.08, 1.00),
    "bone": (0.03, 0.03, 0.03, 0.03, 0.03, 0.03),
    "marrow": (0.85, 0.85, 0.50, 0.55, 0.06, 0.05),  # diploe: fatty marrow, suppressed on DWI
    "skin": (0.40, 0.45, 0.30, 0.35, 0.12, 0.12),  # galea, muscle and skin
    "fat": (1.00, 1.00, 0.78, 0.75, 0.05, 0.03),  # subcutaneous scalp fat
}
# Layers outside the intracranial mask: (tissue, from mm, to mm) of distance from it.
SCALP_LAYERS = (
    ("bone", 0.0, 2.5),
    ("marrow", 2.5, 5.0),
    ("bone", 5.0, 7.0),
    ("skin", 7.0, 9.0),
    ("fat", 9.0, 14.0),
    ("skin", 14.0, 16.0),
)


def mni_paths() -> dict[str, Path]:
    """Paths of the MNI152 T1 / GM / WM maps inside the installed nilearn package (``medmap-fast[demo]``)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the demo data renders brains from the MNI152 maps shipped with nilearn; install it with "
            "`pip install 'medmap-fast[demo]'` (or `pip install nilearn`)"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = {name: data / file for name, file in _MNI_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"MNI152 maps missing from the nilearn installation: {missing}")
    return paths


@dataclass(frozen=True)
class BrainAtlas:
    """The 2 mm brain atlas: ``maps`` [6, X, Y, Z] (see :data:`CHANNELS`), voxel 0 centred at ``origin`` (mm)."""

    maps: torch.Tensor
    origin: np.ndarray
    center: np.ndarray  # centroid of the intracranial mask (mm); the field of view is centred here
    ventricle_center: np.ndarray
    depth_mm: np.ndarray  # [X, Y, Z] distance inside the intracranial mask
    candidates: dict[str, np.ndarray]  # region -> [n, 3] world mm


def _load_1mm() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The MNI152 maps at 1 mm, in [0, 1], and the affine of their shared grid (the T1's)."""
    import nibabel as nib

    images = {name: nib.as_closest_canonical(nib.load(path)) for name, path in mni_paths().items()}
    affine = images["t1"].affine
    if affine is None:
        raise ValueError(f"{mni_paths()['t1']}: expected a NIfTI image with an affine")
    return {name: np.asarray(img.dataobj, dtype=np.float32) / 255.0 for name, img in images.items()}, affine


def _pool2(a: np.ndarray) -> np.ndarray:
    """2x2x2 mean (odd sizes padded with zeros), then ``_PAD`` voxels of zeros on every side."""
    a = np.pad(a, [(0, s % 2) for s in a.shape])
    a = a.reshape(a.shape[0] // 2, 2, a.shape[1] // 2, 2, a.shape[2] // 2, 2).mean(axis=(1, 3, 5))
    return np.pad(a, _PAD)


@functools.lru_cache(maxsize=1)
def brain_atlas() -> BrainAtlas:
    """Build (once per process, about a second) the 2 mm atlas from the MNI152 maps."""
    from scipy import ndimage

    arrays, affine = _load_1mm()
    if not np.allclose(affine[:3, :3], np.eye(3)):
        raise ValueError(f"expected the 1 mm RAS MNI152 grid, got affine {affine.tolist()}")
    gm, wm, t1 = (_pool2(arrays[k]) for k in ("gm", "wm", "t1"))
    origin = affine[:3, 3] + 0.5 - _PAD * ATLAS_SPACING_MM  # centre of atlas voxel 0 (mean of two 1 mm voxels)
    icm = ndimage.binary_fill_holes(t1 > 0.02)
    csf = np.clip(icm - gm - wm, 0.0, 1.0)
    depth = ndimage.distance_transform_edt(icm) * ATLAS_SPACING_MM
    outside = ndimage.distance_transform_edt(~icm) * ATLAS_SPACING_MM

    axes = [origin[i] + ATLAS_SPACING_MM * np.arange(n) for i, n in enumerate(gm.shape)]
    world = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
    x, y, z = world[..., 0], world[..., 1], world[..., 2]
    ventricles = (csf > 0.5) & (depth > 15) & (np.abs(x) < 28) & (y > -45) & (y < 30) & (z > -10) & (z < 35)
    vent_dist = ndimage.distance_transform_edt(~ventricles) * ATLAS_SPACING_MM
    sulci = ndimage.gaussian_filter(csf * (vent_dist > 6) * (depth < 25), 1.0)
    sulci /= sulci.max()
    maps = np.stack([gm, wm, csf, outside, sulci, ndimage.gaussian_filter(ventricles.astype(np.float32), 0.5)])

    supratentorial = (z > -20) & ~((z < -10) & (y < -40))
    regions = {
        "deep_wm": (wm > 0.8) & (depth > 15) & supratentorial,
        "lobar": (gm + wm > 0.8) & (depth > 8) & (depth < 25) & supratentorial,
        "cortex": (gm > 0.5) & (depth < 10) & (np.abs(x) > 25) & (y > -60) & (y < 40) & (z > -15) & (z < 55),
        "deep_gm": (gm > 0.6) & (depth > 25) & (np.abs(x) < 30) & (z > -15) & (z < 20),
        "periventricular": (wm > 0.5) & (vent_dist > 2) & (vent_dist < 10),
        "juxtacortical": (wm > 0.5) & (depth > 6) & (depth < 14) & supratentorial,
    }
    return BrainAtlas(
        maps=torch.from_numpy(maps.astype(np.float32)),
        origin=origin,
        center=world[icm].mean(0),
        ventricle_center=world[ventricles].mean(0),
        depth_mm=depth.astype(np.float32),
        candidates={k: world[m].astype(np.float32) for k, m in regions.items()},
    )


@functools.lru_cache(maxsize=4)
def _atlas_level(shape: tuple[int, int, int]) -> torch.Tensor:
    """Atlas maps area-averaged to ``shape`` (same world extent), [1, 6, *shape]."""
    maps = brain_atlas().maps[None]
    return maps if shape == tuple(maps.shape[2:]) else F.interpolate(maps, size=shape, mode="area")


def sample_brain(coords: torch.Tensor, spacing_mm: float) -> torch.Tensor:
    """Atlas channels [6, D, H, W] at world coordinates [D, H, W, 3] of a grid with ``spacing_mm`` voxels."""
    atlas = brain_atlas()
    base = atlas.maps.shape[1:]
    factor = max(spacing_mm / ATLAS_SPACING_MM, 1.0)
    level = _atlas_level(tuple(max(1, round(n / factor)) for n in base))
    lo = torch.tensor(atlas.origin - ATLAS_SPACING_MM / 2, dtype=torch.float32)
    extent = torch.tensor(base, dtype=torch.float32) * ATLAS_SPACING_MM
    norm = (coords - lo) / extent * 2 - 1
    out = F.grid_sample(level, norm.flip(-1)[None], mode="bilinear", padding_mode="border", align_corners=False)
    return out[0]


def scalp_layers(outside_mm: torch.Tensor, voxel_mm: float) -> dict[str, torch.Tensor]:
    """Fractions of bone, marrow, skin and fat from the distance outside the intracranial mask (soft band edges)."""
    width = max(voxel_mm, ATLAS_SPACING_MM) / 3

    def inside(d: float) -> torch.Tensor:
        return torch.sigmoid((outside_mm - d) / width)

    layers: dict[str, torch.Tensor] = {}
    for tissue, lo, hi in SCALP_LAYERS:
        # The innermost layer starts at the mask edge, where the atlas distance ramps 0 -> 2 mm over one voxel.
        start = inside(lo) if lo > 0 else (outside_mm / ATLAS_SPACING_MM).clamp(0, 1)
        band = start - inside(hi)
        layers[tissue] = layers.get(tissue, 0) + band
    return layers


def brain_region(point_mm: np.ndarray) -> tuple[str, str]:
    """(side, region) of an MNI point, e.g. ("left", "frontal lobe"); coarse landmarks, good enough for reports."""
    x, y, z = (float(v) for v in point_mm)
    side = "right" if x >= 0 else "left"
    if z < -10 and y < -40:
        return side, "cerebellar hemisphere"
    if abs(x) < 30 and -15 < z < 20 and brain_depth(point_mm) > 25:
        return side, "basal ganglia" if y > -12 else "thalamus"
    if y < -70:
        return side, "occipital lobe"
    if z < 5 and abs(x) > 30 and y < 25:
        return side, "temporal lobe"
    return side, "frontal lobe" if y > -15 else "parietal lobe"


def brain_depth(point_mm: np.ndarray) -> float:
    """Distance (mm) of a point from the surface of the intracranial mask (0 outside), from the atlas."""
    atlas = brain_atlas()
    idx = np.round((np.asarray(point_mm) - atlas.origin) / ATLAS_SPACING_MM).astype(int)
    idx = np.clip(idx, 0, np.array(atlas.maps.shape[1:]) - 1)
    return float(atlas.depth_mm[tuple(idx)])
