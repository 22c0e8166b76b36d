"""An analytic upper-abdomen phantom for the liver sequences of the synthetic demo.

Body wall (skin fat, muscle), visceral fat, lung bases and heart above a domed diaphragm, spine (vertebral bodies with
marrow and discs, canal, posterior elements, paraspinal muscles), aorta and IVC, kidneys (cortex, medulla, sinus fat),
spleen, stomach with an air cap, bowel loops, and a two-lobed liver with portal and hepatic veins and a gallbladder.
Shapes are signed-distance functions in RAS+ mm (the liver on the patient's right, +x); every study varies body
habitus, organ size and position, and the class-driven changes of :class:`AbdomenParams`.

Rendering channels: T2WI, the water and fat signals of the in-phase and opposed-phase T1 gradient echoes, and the three
fat-suppressed post-gadolinium phases. In-phase = water + fat, opposed-phase = |water - fat|, so fatty liver, marrow and
fat-water boundaries ("India ink") darken on opposed-phase by construction; iron shortens T2* and darkens the longer
echo (in-phase) more than the shorter one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from .geometry import Grid, NoiseField, Vec3, capsule_sdf, ellipsoid_sdf, smooth_union, soft
from .render import Scene

ABDOMEN_FOV_MM = 380.0
ABDOMEN_CENTER_MM = (0.0, -10.0, 10.0)
LIVER_CONTRASTS = ("T2WI", "T1_in_phase", "T1_opposed_phase", "arterial", "portal_venous", "delayed")
ShapeFn = Callable[..., None]
CHANNELS = ("T2WI", "IP_water", "IP_fat", "OP_water", "OP_fat", "arterial", "portal_venous", "delayed")


def row(
    t2: float,
    water: float,
    fat: float,
    arterial: float,
    portal: float,
    delayed: float,
    in_phase_decay: float = 1.0,
    opposed_decay: float = 1.0,
) -> tuple[float, ...]:
    """Intensities of one compartment over :data:`CHANNELS`; the decays are T2* losses at the two echo times."""
    return (
        t2,
        water * in_phase_decay,
        fat * in_phase_decay,
        water * opposed_decay,
        fat * opposed_decay,
        arterial,
        portal,
        delayed,
    )


# Relative intensities (T2WI, T1 water, T1 fat, arterial, portal venous, delayed). The dynamic phases are
# fat-suppressed: aorta peaks in the arterial phase, portal/hepatic veins and liver in the portal venous phase.
TISSUES: dict[str, tuple[float, ...]] = {
    "fat": row(0.75, 0.06, 0.90, 0.06, 0.07, 0.07),
    "muscle": row(0.18, 0.40, 0.02, 0.22, 0.33, 0.33),
    "liver": row(0.28, 0.62, 0.00, 0.33, 0.68, 0.58),
    "spleen": row(0.55, 0.45, 0.00, 0.50, 0.66, 0.55),
    "kidney_cortex": row(0.55, 0.50, 0.00, 0.95, 0.82, 0.60),
    "kidney_medulla": row(0.72, 0.35, 0.00, 0.30, 0.80, 0.72),
    "aorta": row(0.05, 0.20, 0.00, 1.05, 0.62, 0.45),
    "portal_vein": row(0.06, 0.20, 0.00, 0.45, 0.88, 0.52),
    "hepatic_vein": row(0.06, 0.20, 0.00, 0.12, 0.80, 0.52),
    "marrow": row(0.45, 0.30, 0.38, 0.22, 0.32, 0.32),
    "bone": row(0.03, 0.04, 0.00, 0.03, 0.03, 0.03),
    "disc": row(0.80, 0.30, 0.00, 0.15, 0.25, 0.35),
    "fluid": row(1.00, 0.10, 0.00, 0.06, 0.06, 0.06),  # bile, CSF, ascites
    "bowel": row(0.40, 0.30, 0.02, 0.35, 0.52, 0.45),
    "heart": row(0.20, 0.35, 0.00, 0.85, 0.60, 0.45),
    "air": row(0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
}


@dataclass
class AbdomenParams:
    """Class-driven changes to the phantom (defaults: a normal abdomen)."""

    liver: tuple[float, ...] = TISSUES["liver"]
    spleen: tuple[float, ...] = TISSUES["spleen"]
    liver_roughness_mm: float = 1.5  # surface irregularity (cirrhosis: nodular contour)
    right_lobe_scale: float = 1.0
    left_lobe_scale: float = 1.0
    spleen_scale: float = 1.0
    ascites_mm: float = 0.0  # thickness of free fluid around the liver and spleen
    fibrosis: float = 0.0  # width of the reticular fibrotic network in the liver (about 0.05-0.15; 0 = none)


def to_contrasts(channels: torch.Tensor, names: Sequence[str] = LIVER_CONTRASTS) -> torch.Tensor:
    """Rendered :data:`CHANNELS` [8, ...] -> the named liver contrasts [len(names), ...]."""
    c = dict(zip(CHANNELS, channels, strict=True))
    derived = {
        "T1_in_phase": c["IP_water"] + c["IP_fat"],
        "T1_opposed_phase": (c["OP_water"] - c["OP_fat"]).abs(),
    }
    return torch.stack([derived[n] if n in derived else c[n] for n in names])


class Abdomen:
    """One random abdomen: anatomy parameters drawn from ``rng``; the liver SDF is available for lesion placement."""

    def __init__(self, rng: np.random.Generator, params: AbdomenParams) -> None:
        self.params = params
        u = rng.uniform
        self.fat_mm, self.muscle_mm = u(8, 25), u(8, 12)
        wall = self.fat_mm + self.muscle_mm
        # Semi-axes (lateral, anterior, posterior) of the skin outline, sized so the organs fit inside the wall.
        self.body = (140 + wall + u(0, 12), 82 + wall + u(0, 22), 118 + wall + u(-4, 4))
        ls, shift = u(0.92, 1.05), rng.normal(0, 5, size=3)
        right_radii = ls * np.array([78.0 * params.right_lobe_scale, 78, 76])
        self.right_lobe = (tuple(np.array([55.0, -8, 30]) + shift), tuple(right_radii))
        left_radii = ls * np.array([52.0, 30, 32]) * params.left_lobe_scale
        self.left_lobe = (tuple(np.array([-30.0, 30, 50]) + shift), tuple(left_radii))
        self.liver_shift = shift
        self.dome_mm = 112 + shift[2]
        self.spleen_scale = params.spleen_scale * u(0.85, 1.1)
        self.kidney_z = (u(-55, -35), u(-45, -25))  # right, left (the left kidney sits higher)
        colon = [
            ((95.0, 5, -175), (92.0, 10, -30), 20.0, True),
            ((-95.0, 0, -175), (-98.0, -5, -25), 18.0, True),
            ((92.0, 20, -30), (-98.0, 40, -25), 19.0, True),
        ]
        loops = []
        for _ in range(int(rng.integers(30, 45))):
            center = np.array([u(-75, 75), u(-30, 70), u(-175, -40)])
            d = rng.normal(size=3)
            d *= u(10, 35) / np.linalg.norm(d)
            loops.append((center - d, center + d, u(9, 15), bool(u() < 0.25)))
        self.bowel = colon + loops  # (end, end, radius, has gas)
        self._noise_seeds = rng.integers(2**31, size=2)

    def diaphragm(self, coords: torch.Tensor) -> torch.Tensor:
        """Height (mm) of the diaphragm dome above each (x, y); the right dome (over the liver) is higher."""
        x, y = coords[..., 0], coords[..., 1]
        return self.dome_mm - 0.002 * (x.abs() - 55) ** 2 - 0.0015 * (y + 10) ** 2 - 8 * (x < 0)

    def liver_sdf(self, coords: torch.Tensor) -> torch.Tensor:
        """Signed distance (mm) to the liver, without the surface noise (for lesion placement)."""
        right = ellipsoid_sdf(coords, *self.right_lobe)
        left = ellipsoid_sdf(coords, *self.left_lobe)
        liver = smooth_union(right, left, 25.0)
        return torch.maximum(liver, coords[..., 2] - self.diaphragm(coords) + 4)

    def sample_liver_points(self, rng: np.random.Generator, count: int, margin_mm: float) -> np.ndarray:
        """``count`` random points [count, 3] at least ``margin_mm`` inside the liver, by rejection."""
        found: list[np.ndarray] = []
        lo, hi = np.array([-90.0, -90, -50]), np.array([150.0, 90, 120])
        while sum(len(f) for f in found) < count:
            cand = rng.uniform(lo, hi, size=(256, 3)).astype(np.float32)
            found.append(cand[self.liver_sdf(torch.from_numpy(cand)).numpy() < -margin_mm])
        return np.concatenate(found)[:count]

    def scene(self, grid: Grid) -> Scene:
        """The phantom's compartments on ``grid`` (anatomy coordinates, mm)."""
        p, t, vox = self.params, TISSUES, grid.spacing
        sc = Scene(grid.shape, CHANNELS)
        coords = grid.coords()
        a, b_ant, b_post = self.body
        flat = coords * torch.tensor([1.0, 1.0, 0.0])
        flat[..., 1] = torch.where(flat[..., 1] < 0, flat[..., 1] * (b_ant / b_post), flat[..., 1])
        body = ellipsoid_sdf(flat, (0, 0, 0), (a, b_ant, 1.0))
        visceral = soft(body + self.fat_mm + self.muscle_mm, vox)
        sc.add("fat", soft(body, vox), t["fat"])
        sc.add("muscle", soft(body + self.fat_mm, vox), t["muscle"])
        sc.add("visceral_fat", visceral, t["fat"])
        inf = float("inf")

        def shape(
            name: str,
            sdf: Callable[[torch.Tensor], torch.Tensor],
            lo: Vec3,
            hi: Vec3,
            tissue: Sequence[float],
            clip: torch.Tensor | None = None,
        ) -> None:
            box = grid.box(lo, hi)
            if box is not None:
                fraction = soft(sdf(grid.coords(box)), vox)
                sc.add(name, fraction if clip is None else fraction * clip[box], tissue, box)

        above = self.dome_mm - 60
        shape("lung", lambda c: self.diaphragm(c) - c[..., 2], (-inf, -inf, above), (inf, inf, inf), t["air"], visceral)
        heart = ((-20, 30, self.dome_mm + 55), (70, 50, 55))
        shape("heart", lambda c: ellipsoid_sdf(c, *heart), *_bounds(*heart), t["heart"], visceral)
        if p.ascites_mm > 0:
            spleen = self.spleen()
            reach = p.ascites_mm + 30

            def ascites(c: torch.Tensor) -> torch.Tensor:
                around = smooth_union(self.liver_sdf(c), ellipsoid_sdf(c, *spleen), 20.0) - p.ascites_mm
                return torch.minimum(around, ellipsoid_sdf(c, (0, 10, -170), (120, 70, 50)))

            shape("ascites", ascites, (-inf, -inf, -inf), (inf, inf, self.dome_mm + reach), t["fluid"], visceral)

        muscle_wall = soft(body + self.fat_mm, vox)
        for side in (1, -1):
            para = (40.0 * side, -86)
            lo, hi = np.array([para[0] - 25, -104, -inf]), np.array([para[0] + 25, -68, inf])
            shape(
                "paraspinal",
                partial(_tube, center_xy=para, radius=1.0, stretch=(25, 18)),
                lo,
                hi,
                t["muscle"],
                muscle_wall,
            )
        self._spine(shape)
        for side, zc in zip((1, -1), self.kidney_z, strict=True):
            self._kidney(shape, np.array([66.0 * side, -50, zc]), side)
        shape("aorta", lambda c: _tube(c, (-18, -38), 11), (-30, -50, -inf), (-6, -26, inf), t["aorta"])
        spleen = self.spleen()
        spleen_noise = self._noise(1, channels=1)
        spleen_sdf = lambda c: ellipsoid_sdf(c, *spleen) + 1.5 * spleen_noise(c)[0]  # noqa: E731
        shape("spleen", spleen_sdf, *_bounds(spleen[0], spleen[1], 5), p.spleen)
        self._stomach(shape)
        for start, end, radius, gas in self.bowel:
            lo, hi = np.minimum(start, end) - radius, np.maximum(start, end) + radius
            shape("bowel", partial(capsule_sdf, a=start, b=end, radius=radius), lo, hi, t["bowel"], visceral)
            if gas:  # gas rises to the anterior (non-dependent) side of the lumen
                level = (start[1] + end[1]) / 2 + radius * 0.2
                gas_sdf = partial(_gas_sdf, start=start, end=end, radius=radius - 3, level=level)
                shape("bowel_gas", gas_sdf, lo, hi, t["air"], visceral)
        self._liver(sc, grid, visceral)
        return sc

    def _liver(self, sc: Scene, grid: Grid, visceral: torch.Tensor) -> None:
        p, vox = self.params, grid.spacing
        lobes = [_bounds(c, r, p.liver_roughness_mm * 3 + 5) for c, r in (self.right_lobe, self.left_lobe)]
        box = grid.box(np.minimum(lobes[0][0], lobes[1][0]), np.maximum(lobes[0][1], lobes[1][1]))
        if box is None:
            return
        coords = grid.coords(box)
        noise = self._noise(0, channels=2)(coords)
        liver = soft(self.liver_sdf(coords) + p.liver_roughness_mm * noise[0], vox) * visceral[box]
        sc.add("liver", liver, p.liver, box)
        if p.fibrosis > 0:
            bands = torch.sigmoid((p.fibrosis - noise[1].abs()) * 12) * liver  # near zero-crossings: a network
            sc.add("fibrosis", bands, row(0.50, 0.45, 0.0, 0.30, 0.60, 0.78), box)
        s = self.liver_shift
        hilum, ivc_top = np.array([28.0, -5, 8]) + s, np.array([20.0, -22, 95]) + s
        portal = [
            ((18, -22, -45) + s, hilum, 7.5),
            (hilum, (88, -2, 22) + s, 5.5),
            (hilum, (-25, 25, 35) + s, 4.5),
            ((70, -2, 20) + s, (95, 25, 5) + s, 3.5),
            ((70, -2, 20) + s, (90, -35, 35) + s, 3.5),
        ]
        hepatic = [
            (ivc_top, (95, -10, 50) + s, 4.5),
            (ivc_top, (45, 35, 40) + s, 4.0),
            (ivc_top, (-25, 30, 65) + s, 4.0),
        ]
        ivc = capsule_sdf(coords, (22, -28, -300), ivc_top, 12)
        ivc_full = grid.box((8, -42, -math.inf), (36, -14, ivc_top[2] + 14))
        if ivc_full is not None:
            ivc_sdf = capsule_sdf(grid.coords(ivc_full), (22, -28, -300), ivc_top, 12)
            sc.add("ivc", soft(ivc_sdf, vox), TISSUES["hepatic_vein"], ivc_full)
        for name, segments in (("portal_vein", portal), ("hepatic_vein", hepatic)):
            sdf = torch.stack([capsule_sdf(coords, a, b, r) for a, b, r in segments]).amin(0)
            inside = liver if name == "hepatic_vein" else torch.maximum(liver, soft(ivc - 40, vox))
            sc.add(name, soft(sdf, vox) * inside, TISSUES[name], box)
        gb = ((45 + s[0], 55 + s[1], -15 + s[2]), (16, 20, 34))
        gb_box = grid.box(*_bounds(*gb))
        if gb_box is not None:
            sc.add("gallbladder", soft(ellipsoid_sdf(grid.coords(gb_box), *gb), vox), TISSUES["fluid"], gb_box)

    def _noise(self, which: int, channels: int) -> NoiseField:
        """The study's smooth surface-noise field ``which`` (0: liver, 1: spleen), 12 mm correlation length."""
        rng = np.random.default_rng(self._noise_seeds[which])
        return NoiseField(rng, channels, 12.0, ABDOMEN_CENTER_MM, ABDOMEN_FOV_MM)

    def spleen(self) -> tuple[tuple[float, float, float], tuple[float, ...], np.ndarray]:
        """(centre, radii, rotation) of the spleen ellipsoid; radii[2] is half its craniocaudal length."""
        s = self.spleen_scale
        angle = math.radians(35)
        rot = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
        return (-95.0 - 15 * (s - 1), -45.0, 45.0), (25 * s, 55 * s, 50 * s), rot

    def _stomach(self, shape: ShapeFn) -> None:
        center, radii = (-55, 35, 40), (50, 35, 42)

        def wall(c: torch.Tensor) -> torch.Tensor:
            return torch.maximum(ellipsoid_sdf(c, center, radii), c[..., 2] - self.diaphragm(c) + 5)

        lo, hi = _bounds(center, radii)
        shape("stomach", wall, lo, hi, TISSUES["bowel"])
        shape("gastric_air", lambda c: torch.maximum(wall(c), 45 - c[..., 1]), lo, hi, TISSUES["air"])

    def _spine(self, shape: ShapeFn) -> None:
        t, inf = TISSUES, float("inf")
        lo, hi = (-22, -84, -inf), (22, -40, inf)
        shape("vertebral_cortex", lambda c: _tube(c, (0, -62), 20), lo, hi, t["bone"])
        shape("marrow", lambda c: _tube(c, (0, -62), 17.5), lo, hi, t["marrow"])
        # An 8 mm disc every 36 mm along z.
        period = lambda c: (torch.cos(2 * math.pi * c[..., 2] / 36.0) - math.cos(math.pi * 8 / 36)) * -20  # noqa: E731
        shape("disc", lambda c: torch.maximum(_tube(c, (0, -62), 19), period(c)), lo, hi, t["disc"])
        posterior = lambda c: _tube(c, (0, -104), 14, (1.0, 1.3))  # noqa: E731
        shape("posterior_elements", posterior, (-16, -118, -inf), (16, -88, inf), t["bone"])
        shape("canal", lambda c: _tube(c, (0, -90), 8), (-10, -100, -inf), (10, -80, inf), t["fluid"])

    def _kidney(self, shape: ShapeFn, center: np.ndarray, side: int) -> None:
        tilt = math.radians(15 * side)
        rot = np.array([[math.cos(tilt), 0, math.sin(tilt)], [0, 1, 0], [-math.sin(tilt), 0, math.cos(tilt)]])
        radii = np.array([28.0, 26, 52])
        lo, hi = _bounds(center, radii)
        shape("kidney_cortex", lambda c: ellipsoid_sdf(c, center, radii, rot), lo, hi, TISSUES["kidney_cortex"])
        medulla = lambda c: ellipsoid_sdf(c, center, radii * 0.68, rot)  # noqa: E731
        shape("kidney_medulla", medulla, lo, hi, TISSUES["kidney_medulla"])
        sinus = center - np.array([10.0 * side, 0, 0])
        shape("renal_sinus", lambda c: ellipsoid_sdf(c, sinus, radii * [0.35, 0.35, 0.5], rot), lo, hi, TISSUES["fat"])


def _bounds(center: Vec3, radii: Vec3, margin: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box of a (possibly rotated) ellipsoid: the sphere of its largest radius, plus ``margin``."""
    r = max(radii) + margin
    return np.asarray(center, dtype=float) - r, np.asarray(center, dtype=float) + r


def _gas_sdf(coords: torch.Tensor, start: Vec3, end: Vec3, radius: float, level: float) -> torch.Tensor:
    """Signed distance (mm) to the gas of a bowel loop: its lumen (the capsule start-end of ``radius``) above y =
    ``level``."""
    return torch.maximum(capsule_sdf(coords, start, end, radius), level - coords[..., 1])


def _tube(
    coords: torch.Tensor, center_xy: Sequence[float], radius: float, stretch: Sequence[float] = (1.0, 1.0)
) -> torch.Tensor:
    """Signed distance (mm) to an infinite cylinder along z with an elliptic (``radius * stretch``) section."""
    d = (coords[..., :2] - torch.tensor(center_xy, dtype=coords.dtype)) / torch.tensor(stretch, dtype=coords.dtype)
    return torch.linalg.vector_norm(d, dim=-1) - radius
