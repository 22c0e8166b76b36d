"""Brain studies of the synthetic demo: MNI152 anatomy in six contrasts plus one abnormality class per study.

Appearance per contrast (T1, T1c, T2, FLAIR, DWI, ADC), following textbook MRI signal behaviour:

- ``brain_tumour``: high grade (ring-enhancing rim on T1c, T2-bright necrotic centre, FLAIR/T2-bright vasogenic
  oedema tracking the white matter, mass effect) or low grade (non-enhancing T2/FLAIR-bright solid mass).
- ``ischaemic_infarct``: a cortical-subcortical wedge in the middle cerebral artery territory; DWI bright, ADC dark;
  FLAIR/T2 normal when hyperacute (DWI-FLAIR mismatch), bright when acute; gyral enhancement when subacute.
- ``intracranial_haemorrhage``: a deep (basal ganglia / thalamus) or lobar haematoma whose signal follows its age
  (hyperacute oxy-, acute deoxy-, early subacute intracellular and late subacute extracellular methaemoglobin), with
  a rim of oedema and mass effect when large.
- ``demyelination``: ovoid periventricular plaques with their long axis perpendicular to the ventricles (Dawson's
  fingers) plus juxtacortical ones; FLAIR/T2 bright, some T1 "black holes", active plaques enhance.
- ``cerebral_atrophy``: cortical thinning with widened sulci and ex vacuo ventricular enlargement (tissue turns into
  CSF; nothing is displaced).
- ``normal_brain``: none of the above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .anatomy import BRAIN_CONTRASTS, BRAIN_TISSUES, BrainAtlas, brain_atlas, brain_region, sample_brain, scalp_layers
from .geometry import Grid, NoiseField, blob, radial_expand, random_rotation, rotation_to, soft
from .render import Scene

BRAIN_CLASSES = (
    "normal_brain",
    "brain_tumour",
    "ischaemic_infarct",
    "intracranial_haemorrhage",
    "demyelination",
    "cerebral_atrophy",
)

# Lesion intensities over (T1, T1c, T2, FLAIR, DWI, ADC), on the scale of BRAIN_TISSUES.
OEDEMA = (0.50, 0.50, 0.85, 0.90, 0.58, 0.50)
ENHANCING_TUMOUR = (0.45, 1.20, 0.65, 0.75, 0.80, 0.22)  # cellular rim: enhances, restricts diffusion
NON_ENHANCING_TUMOUR = (0.42, 0.44, 0.82, 0.85, 0.55, 0.42)
NECROSIS = (0.22, 0.22, 0.95, 0.55, 0.15, 0.85)
HAEMATOMA = {  # by age: the blood product changes T1 and T2 (and susceptibility darkens DWI)
    "hyperacute": (0.50, 0.50, 0.85, 0.80, 0.75, 0.35),
    "acute": (0.52, 0.52, 0.15, 0.25, 0.12, 0.20),
    "early subacute": (1.00, 1.00, 0.18, 0.35, 0.15, 0.25),
    "late subacute": (1.00, 1.00, 0.95, 0.90, 0.80, 0.45),
}
INFARCT_FACTORS = {  # multiplies the underlying grey/white matter signal
    "hyperacute": (0.97, 0.97, 1.08, 1.03, 2.00, 0.50),
    "acute": (0.88, 0.88, 1.45, 1.60, 2.20, 0.50),
    "subacute": (0.82, 1.35, 1.60, 1.70, 1.50, 0.85),
}
PLAQUE = (0.55, 0.55, 0.88, 0.95, 0.62, 0.45)
BLACK_HOLE = (0.30, 0.30, 0.92, 0.85, 0.55, 0.55)
ATROPHY = {"mild": (0.30, 0.25), "moderate": (0.50, 0.35), "severe": (0.70, 0.45)}  # cortical loss, ventricular gain


@dataclass
class BrainContext:
    """What a finding draws with: the grid, the (warped) tissue maps [6, D, H, W] and a roughness noise field."""

    grid: Grid
    maps: torch.Tensor
    noise: NoiseField

    def tissue(self, box: tuple[slice, ...]) -> torch.Tensor:
        """Brain tissue fraction (GM + WM) over ``box``."""
        m = self.maps[(slice(None), *box)]
        return (m[0] + m[1]).clamp(0, 1)


@dataclass
class BrainFinding:
    attributes: dict[str, Any]
    draw: Callable[[Scene, BrainContext], None] | None = None
    warps: list[tuple[np.ndarray, float, float]] = field(default_factory=list)  # (centre, strength, sigma_mm)
    cortical_loss: float = 0.0  # atrophy: fraction of juxta-sulcal grey matter turned into CSF
    ventricular_gain: float = 0.0  # atrophy: magnification strength of the ventricles


def render_brain(label: str, rng: np.random.Generator, grid: Grid) -> tuple[torch.Tensor, dict[str, Any]]:
    """Images [6, D, H, W] in :data:`~medmap_fast.synthetic.anatomy.BRAIN_CONTRASTS` order and the finding's
    attributes."""
    atlas = brain_atlas()
    finding = _FINDINGS[label](rng, atlas)
    noise = NoiseField(rng, 4, 8.0, atlas.center, 280.0)
    coords = grid.coords()
    for center, strength, sigma in finding.warps:
        coords = radial_expand(coords, center, strength, sigma)
    maps = sample_brain(coords, grid.spacing)
    if finding.cortical_loss:
        _atrophy_maps(maps, finding, atlas, grid, coords)
    scene = Scene(grid.shape, BRAIN_CONTRASTS)
    for i, name in enumerate(("gm", "wm", "csf")):
        scene.add(name, maps[i], BRAIN_TISSUES[name], cover=False)
    for tissue, fraction in scalp_layers(maps[3], grid.spacing).items():
        scene.add(tissue, fraction, BRAIN_TISSUES[tissue])
    if finding.draw is not None:
        finding.draw(scene, BrainContext(grid, maps, noise))
    return scene.render(), finding.attributes


def _atrophy_maps(
    maps: torch.Tensor, finding: BrainFinding, atlas: BrainAtlas, grid: Grid, coords: torch.Tensor
) -> None:
    """Ex vacuo change in place: tissue next to sulci turns into CSF, and the ventricles (magnified about their
    centre) take over the periventricular tissue they now cover; the rest of the brain does not move."""
    lost = torch.stack([maps[0], 0.3 * maps[1]]) * (finding.cortical_loss * maps[4])
    magnified = radial_expand(coords, atlas.ventricle_center, finding.ventricular_gain, 30.0)
    enlarged = sample_brain(magnified, grid.spacing)[5]
    tissue = (maps[0] + maps[1]).clamp_min(1e-6)
    taken = (enlarged - maps[5]).clamp(min=0).minimum(tissue) * torch.stack([maps[0], maps[1]]) / tissue
    lost = torch.maximum(lost, taken)
    maps[:2] -= lost
    maps[2] += lost.sum(0)


def _pick(rng: np.random.Generator, points: np.ndarray) -> np.ndarray:
    return points[rng.integers(len(points))].astype(np.float64) + rng.uniform(-1, 1, size=3)


def _where(point: np.ndarray) -> dict[str, Any]:
    side, region = brain_region(point)
    return {"side": side, "region": region, "center_mm": [round(float(v), 1) for v in point]}


def _midline_shift(center: np.ndarray, strength: float, sigma: float) -> int:
    """Approximate displacement (mm) of the midline by the radial expansion around ``center``."""
    d = abs(float(center[0]))
    return int(round(d * strength * np.exp(-d * d / (2 * sigma * sigma))))


def _normal(rng: np.random.Generator, atlas: BrainAtlas) -> BrainFinding:
    return BrainFinding({"finding": "normal_brain"})


def _tumour(rng: np.random.Generator, atlas: BrainAtlas) -> BrainFinding:
    center = _pick(rng, atlas.candidates["deep_wm" if rng.uniform() < 0.6 else "lobar"])
    high = bool(rng.uniform() < 0.7)
    r = rng.uniform(10, 22)
    radii = r * rng.uniform(0.85, 1.15, size=3)
    rot = random_rotation(rng, 180)
    necrosis = r * rng.uniform(0.35, 0.6) if high else 0.0
    oedema = rng.uniform(8, 25) if high else rng.uniform(0, 6)
    strength, sigma = min(0.45, 0.1 + r / 60), r + oedema / 2

    def draw(scene: Scene, ctx: BrainContext) -> None:
        shape = blob(ctx.grid, center, radii, rot, (ctx.noise, 0, 0.15 * r), grow_mm=oedema)
        if shape is None:
            return
        box, sdf = shape
        vox = ctx.grid.spacing
        if oedema > 1:  # vasogenic oedema spreads along the white matter
            m = ctx.maps[(slice(None), *box)]
            scene.add("oedema", soft(sdf - oedema, vox) * (m[1] + 0.25 * m[0]).clamp(0, 1), OEDEMA, box)
        scene.add("tumour", soft(sdf, vox), ENHANCING_TUMOUR if high else NON_ENHANCING_TUMOUR, box)
        if necrosis:
            scene.add("necrosis", soft(sdf + (r - necrosis), vox), NECROSIS, box)

    attributes = {
        "finding": "brain_tumour",
        **_where(center),
        "grade": "high" if high else "low",
        "diameter_mm": int(round(2 * r)),
        "necrosis": high,
        "enhancement": "ring" if high else "none",
        "oedema_mm": int(round(oedema)),
        "midline_shift_mm": _midline_shift(center, strength, sigma),
    }
    return BrainFinding(attributes, draw, warps=[(center, strength, sigma)])


def _infarct(rng: np.random.Generator, atlas: BrainAtlas) -> BrainFinding:
    surface = _pick(rng, atlas.candidates["cortex"])
    inward = atlas.center - surface
    inward /= np.linalg.norm(inward)
    length = rng.uniform(15, 30)
    radii = (rng.uniform(8, 16), rng.uniform(8, 16), length)
    center = surface + inward * length * 0.6  # a wedge from the cortex inwards
    stage = str(rng.choice(list(INFARCT_FACTORS)))

    def draw(scene: Scene, ctx: BrainContext) -> None:
        shape = blob(ctx.grid, center, radii, rotation_to(inward), (ctx.noise, 1, 3.0))
        if shape is not None:
            box, sdf = shape
            scene.modulate(soft(sdf, ctx.grid.spacing) * ctx.tissue(box), INFARCT_FACTORS[stage], box)

    branch = "superior" if surface[2] > 20 else "inferior"
    attributes = {
        "finding": "ischaemic_infarct",
        **_where(surface),
        "stage": stage,
        "territory": f"{branch} division of the {'right' if surface[0] >= 0 else 'left'} middle cerebral artery",
        "diameter_mm": int(round(2 * length)),
    }
    return BrainFinding(attributes, draw)


def _haemorrhage(rng: np.random.Generator, atlas: BrainAtlas) -> BrainFinding:
    deep = bool(rng.uniform() < 0.6)
    center = _pick(rng, atlas.candidates["deep_gm" if deep else "lobar"])
    r = rng.uniform(7, 20)
    radii = r * rng.uniform(0.8, 1.2, size=3)
    rot = random_rotation(rng, 180)
    stage = str(rng.choice(list(HAEMATOMA)))
    rim = rng.uniform(2, 7)
    strength, sigma = max(0.0, (r - 8) / 50), r * 1.2

    def draw(scene: Scene, ctx: BrainContext) -> None:
        shape = blob(ctx.grid, center, radii, rot, (ctx.noise, 2, 0.1 * r), grow_mm=rim)
        if shape is not None:
            box, sdf = shape
            scene.add("oedema", soft(sdf - rim, ctx.grid.spacing) * ctx.tissue(box), OEDEMA, box)
            scene.add("haematoma", soft(sdf, ctx.grid.spacing), HAEMATOMA[stage], box)

    attributes = {
        "finding": "intracranial_haemorrhage",
        **_where(center),
        "stage": stage,
        "deep": deep,
        "diameter_mm": int(round(2 * r)),
        "midline_shift_mm": _midline_shift(center, strength, sigma),
    }
    return BrainFinding(attributes, draw, warps=[(center, strength, sigma)] if strength > 0 else [])


def _demyelination(rng: np.random.Generator, atlas: BrainAtlas) -> BrainFinding:
    plaques = []
    for region, count in (("periventricular", rng.integers(5, 13)), ("juxtacortical", rng.integers(0, 4))):
        for _ in range(int(count)):
            center = _pick(rng, atlas.candidates[region])
            radii = (rng.uniform(3.5, 5.5), rng.uniform(3.5, 5.5), rng.uniform(6, 11))
            plaques.append((center, radii, bool(rng.uniform() < 0.25), bool(rng.uniform() < 0.3), region))

    def draw(scene: Scene, ctx: BrainContext) -> None:
        for center, radii, active, black_hole, _ in plaques:
            # Dawson's fingers: the long axis points away from the ventricles.
            shape = blob(ctx.grid, center, radii, rotation_to(center - atlas.ventricle_center))
            if shape is None:
                continue
            box, sdf = shape
            tissue = list(BLACK_HOLE if black_hole else PLAQUE)
            if active:
                tissue[1] = 1.05
            scene.add("plaque", soft(sdf, ctx.grid.spacing) * ctx.tissue(box), tissue, box)

    attributes = {
        "finding": "demyelination",
        "count": len(plaques),
        "juxtacortical": any(p[4] == "juxtacortical" for p in plaques),
        "active_count": sum(p[2] for p in plaques),
        "black_holes": sum(p[3] for p in plaques),
        "largest_mm": int(round(2 * max(max(p[1]) for p in plaques))),
    }
    return BrainFinding(attributes, draw)


def _atrophy(rng: np.random.Generator, atlas: BrainAtlas) -> BrainFinding:
    severity = str(rng.choice(list(ATROPHY)))
    cortical, ventricular = ATROPHY[severity]
    return BrainFinding(
        {"finding": "cerebral_atrophy", "severity": severity},
        cortical_loss=cortical * rng.uniform(0.8, 1.2),
        ventricular_gain=ventricular * rng.uniform(0.8, 1.2),
    )


_FINDINGS: dict[str, Callable[[np.random.Generator, BrainAtlas], BrainFinding]] = dict(
    zip(BRAIN_CLASSES, (_normal, _tumour, _infarct, _haemorrhage, _demyelination, _atrophy), strict=True)
)
