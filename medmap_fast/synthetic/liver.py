"""Liver studies of the synthetic demo: the abdominal phantom in six sequences plus one liver class per study.

Appearance per sequence (T2WI, T1 in-phase, T1 opposed-phase, arterial, portal venous, delayed):

- ``hepatocellular_carcinoma``: mildly T2-bright, T1-dark mass with arterial phase hyperenhancement, washout and an
  enhancing capsule in the portal venous / delayed phases (LI-RADS 5); some contain fat (opposed-phase drop).
- ``hepatic_cyst``: sharply marginated, very T2-bright, T1-dark, never enhancing.
- ``hepatic_haemangioma``: very T2-bright; peripheral discontinuous nodular enhancement in the arterial phase with
  centripetal fill-in on the portal venous and delayed phases.
- ``hepatic_steatosis``: diffuse fat: liver signal drops on opposed-phase relative to in-phase (fat fraction 12-40 %).
- ``hepatic_iron_overload``: T2 and T2* shortening: dark liver on T2WI, darker on in-phase (longer echo) than on
  opposed-phase; the spleen too in transfusional (reticuloendothelial) overload.
- ``cirrhosis``: nodular surface, atrophic right lobe with caudate/left lobe hypertrophy, reticular fibrosis (T2
  bright, delayed enhancing), splenomegaly and sometimes ascites.
- ``normal_liver``: none of the above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .abdomen import TISSUES, Abdomen, AbdomenParams, row, to_contrasts
from .geometry import Box, Grid, NoiseField, blob, random_rotation, soft
from .render import Scene

LIVER_CLASSES = (
    "normal_liver",
    "hepatocellular_carcinoma",
    "hepatic_cyst",
    "hepatic_haemangioma",
    "hepatic_steatosis",
    "hepatic_iron_overload",
    "cirrhosis",
)

HCC = row(0.45, 0.45, 0.00, 0.95, 0.45, 0.38)  # arterial hyperenhancement, portal venous / delayed washout
FATTY_HCC = row(0.45, 0.30, 0.18, 0.95, 0.45, 0.38)
CAPSULE = row(0.35, 0.42, 0.00, 0.30, 0.75, 0.82)
CYST = row(1.00, 0.08, 0.00, 0.05, 0.05, 0.05)
HAEMANGIOMA_NODULES = row(0.88, 0.28, 0.00, 0.95, 0.85, 0.70)  # peripheral nodules: enhance first
HAEMANGIOMA_RIM = row(0.88, 0.28, 0.00, 0.12, 0.72, 0.70)  # filled by the portal venous phase
HAEMANGIOMA_CORE = row(0.92, 0.25, 0.00, 0.10, 0.30, 0.65)  # filled by the delayed phase


@dataclass
class LiverFinding:
    attributes: dict[str, Any]
    params: AbdomenParams = field(default_factory=AbdomenParams)
    draw: Callable[[Scene, Grid, Abdomen, NoiseField, np.random.Generator], None] | None = None


def render_liver(label: str, rng: np.random.Generator, grid: Grid) -> tuple[torch.Tensor, dict[str, Any]]:
    """Images [6, D, H, W] in :data:`~medmap_fast.synthetic.abdomen.LIVER_CONTRASTS` order and the finding's
    attributes."""
    # The anatomy has its own generator, drawn first, so a given study has the same body whatever its class.
    anatomy_rng = np.random.default_rng(int(rng.integers(2**63)))
    finding = _FINDINGS[label](rng)
    abdomen = Abdomen(anatomy_rng, finding.params)
    scene = abdomen.scene(grid)
    if finding.draw is not None:
        noise = NoiseField(rng, 2, 8.0, (0.0, 0.0, 0.0), 400.0)
        finding.draw(scene, grid, abdomen, noise, rng)
    return to_contrasts(scene.render()), finding.attributes


def liver_segment(point: np.ndarray, abdomen: Abdomen) -> str:
    """Couinaud segment (I-VIII) of a point, from coarse landmarks relative to the liver's position."""
    x, y, z = np.asarray(point) - abdomen.liver_shift
    if abs(x - 18) < 18 and -35 < y < -5 and 20 < z < 60:
        return "I"
    if x < -15:
        return "II" if z > 45 else "III"
    if x < 25:
        return "IVa" if z > 40 else "IVb"
    if y > -5:
        return "VIII" if z > 35 else "V"
    return "VII" if z > 35 else "VI"


def _lesions(rng: np.random.Generator, count: int, r_lo: float, r_hi: float) -> list[tuple[float, np.ndarray]]:
    radii = sorted((float(rng.uniform(r_lo, r_hi)) for _ in range(count)), reverse=True)
    return [(r, r * rng.uniform(0.85, 1.15, size=3)) for r in radii]


def _placed(rng: np.random.Generator, abdomen: Abdomen, lesions: list[tuple[float, np.ndarray]]) -> list[np.ndarray]:
    return [abdomen.sample_liver_points(rng, 1, margin_mm=0.6 * r)[0].astype(np.float64) for r, _ in lesions]


def _describe(centers: list[np.ndarray], lesions: list[tuple[float, np.ndarray]], abdomen: Abdomen) -> dict[str, Any]:
    return {
        "count": len(lesions),
        "segments": [liver_segment(c, abdomen) for c in centers],
        "diameters_mm": [int(round(2 * r)) for r, _ in lesions],
        "centers_mm": [[round(float(v), 1) for v in c] for c in centers],
    }


def _normal(rng: np.random.Generator) -> LiverFinding:
    return LiverFinding({"finding": "normal_liver"})


Occupancy = Callable[[float], torch.Tensor]
Painter = Callable[[Scene, Box, Occupancy, float, torch.Tensor], None]


def _focal(
    attributes: dict[str, Any],
    lesions: list[tuple[float, np.ndarray]],
    paint: Painter,
    roughness: float = 0.0,
    grow_mm: float = 0.0,
) -> LiverFinding:
    """A finding of focal lesions, placed in the liver once the abdomen exists.

    ``paint(scene, box, occupancy, radius, noise)`` draws one lesion over ``box``: ``occupancy(d)`` is the lesion
    shrunk by ``d`` mm (grown when negative, up to ``grow_mm``), kept within the liver; ``noise`` a smooth field.
    """
    finding = LiverFinding(attributes)

    def draw(scene: Scene, grid: Grid, abdomen: Abdomen, noise: NoiseField, g: np.random.Generator) -> None:
        centers = _placed(g, abdomen, lesions)
        finding.attributes.update(_describe(centers, lesions, abdomen))
        for center, (r, radii) in zip(centers, lesions, strict=True):
            rough = (noise, 0, roughness * r) if roughness else None
            shape = blob(grid, center, radii, random_rotation(g, 180), rough, grow_mm=grow_mm)
            if shape is None:
                continue
            box, sdf = shape
            coords = grid.coords(box)
            inside = soft(abdomen.liver_sdf(coords), grid.spacing)

            def occupancy(d: float, sdf: torch.Tensor = sdf, inside: torch.Tensor = inside) -> torch.Tensor:
                return soft(sdf + d, grid.spacing) * inside

            paint(scene, box, occupancy, r, noise(coords)[1])

    finding.draw = draw
    return finding


def _hcc(rng: np.random.Generator) -> LiverFinding:
    lesions = _lesions(rng, 1 if rng.uniform() < 0.8 else 2, 10, 30)
    fatty = bool(rng.uniform() < 0.3)

    def paint(scene: Scene, box: Box, occupancy: Occupancy, r: float, noise: torch.Tensor) -> None:
        scene.add("capsule", occupancy(-2.5), CAPSULE, box)
        scene.add("hcc", occupancy(0.0), FATTY_HCC if fatty else HCC, box)

    attributes = {"finding": "hepatocellular_carcinoma", "intralesional_fat": fatty, "lirads": "LR-5"}
    return _focal(attributes, lesions, paint, roughness=0.08, grow_mm=2.5)


def _cyst(rng: np.random.Generator) -> LiverFinding:
    def paint(scene: Scene, box: Box, occupancy: Occupancy, r: float, noise: torch.Tensor) -> None:
        scene.add("cyst", occupancy(0.0), CYST, box)

    return _focal({"finding": "hepatic_cyst"}, _lesions(rng, int(rng.integers(1, 5)), 7, 25), paint)


def _haemangioma(rng: np.random.Generator) -> LiverFinding:
    def paint(scene: Scene, box: Box, occupancy: Occupancy, r: float, noise: torch.Tensor) -> None:
        nodules = torch.sigmoid(noise * 4)  # discontinuous peripheral nodules enhance first
        scene.add("haemangioma", occupancy(0.0), HAEMANGIOMA_RIM, box)
        scene.add("haemangioma_nodules", (occupancy(0.0) - occupancy(0.3 * r)) * nodules, HAEMANGIOMA_NODULES, box)
        scene.add("haemangioma_core", occupancy(0.45 * r), HAEMANGIOMA_CORE, box)

    lesions = _lesions(rng, 1 if rng.uniform() < 0.7 else 2, 10, 28)
    return _focal({"finding": "hepatic_haemangioma"}, lesions, paint, roughness=0.1)


def _steatosis(rng: np.random.Generator) -> LiverFinding:
    ff = float(rng.uniform(0.12, 0.40))
    grade = "mild" if ff < 0.18 else "moderate" if ff < 0.28 else "severe"
    t2, water, _, _, _, art, portal, delayed = TISSUES["liver"]
    suppressed = 1 - 0.4 * ff  # fat-suppressed phases lose the fat's share of the signal
    liver = row(t2 + 0.15 * ff, water * (1 - ff), water * ff, *(x * suppressed for x in (art, portal, delayed)))
    attributes = {"finding": "hepatic_steatosis", "fat_fraction_percent": int(round(100 * ff)), "grade": grade}
    return LiverFinding(attributes, AbdomenParams(liver=liver))


def _iron(rng: np.random.Generator) -> LiverFinding:
    r2s = float(rng.uniform(0.15, 0.35))  # 1/ms; echo times 4.6 ms (in-phase) and 2.3 ms (opposed-phase) at 1.5 T
    spleen_involved = bool(rng.uniform() < 0.5)

    def overloaded(tissue: tuple[float, ...]) -> tuple[float, ...]:
        t2, water, fat, _, _, art, portal, delayed = tissue
        ip, op = math.exp(-4.6 * r2s), math.exp(-2.3 * r2s)
        return row(t2 * 0.3, water, fat, art * 0.7, portal * 0.7, delayed * 0.7, ip, op)

    params = AbdomenParams(liver=overloaded(TISSUES["liver"]))
    if spleen_involved:
        params.spleen = overloaded(TISSUES["spleen"])
    attributes = {
        "finding": "hepatic_iron_overload",
        "r2star_per_s": int(round(1000 * r2s)),
        "spleen_involved": spleen_involved,
        "pattern": "reticuloendothelial (transfusional)" if spleen_involved else "parenchymal (haemochromatosis)",
    }
    return LiverFinding(attributes, params)


def _cirrhosis(rng: np.random.Generator) -> LiverFinding:
    ascites = float(rng.uniform(6, 15)) if rng.uniform() < 0.5 else 0.0
    params = AbdomenParams(
        liver_roughness_mm=float(rng.uniform(4, 7)),
        right_lobe_scale=float(rng.uniform(0.75, 0.85)),
        left_lobe_scale=float(rng.uniform(1.15, 1.3)),
        spleen_scale=float(rng.uniform(1.45, 1.75)),
        ascites_mm=ascites,
        fibrosis=float(rng.uniform(0.06, 0.14)),
    )
    finding = LiverFinding({"finding": "cirrhosis", "ascites": ascites > 0}, params)

    def draw(scene: Scene, grid: Grid, abdomen: Abdomen, noise: NoiseField, g: np.random.Generator) -> None:
        finding.attributes["spleen_length_mm"] = int(round(2 * abdomen.spleen()[1][2]))

    finding.draw = draw
    return finding


_FINDINGS: dict[str, Callable[[np.random.Generator], LiverFinding]] = dict(
    zip(LIVER_CLASSES, (_normal, _hcc, _cyst, _haemangioma, _steatosis, _iron, _cirrhosis), strict=True)
)
