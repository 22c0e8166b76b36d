"""The embedded demo dataset: synthetic multi-organ, multi-sequence MRI studies with reports and labels.

Brains are rendered from the real MNI152 anatomy shipped with nilearn (:mod:`.anatomy`, :mod:`.brain`), livers from an
analytic abdominal phantom (:mod:`.abdomen`, :mod:`.liver`); each study has one class of :data:`CLASSES`, a random
subset of its organ's sequences (at least one), a small random pose, a smooth coil bias field per sequence, Rician
noise, and a report written from the finding (:mod:`.reports`). Nothing is downloaded.

Labels: one index into :data:`CLASSES` per study. Normal studies are labelled per organ: ``normal_brain`` (0) and
``normal_liver`` (6); a per-organ task uses ``ORGAN_CLASSES[organ].index(CLASSES[label])`` (the liver task then has the
paper's seven classes). Study ``i`` of seed ``s`` depends only on (s, i, config): the same arguments give identical
arrays and text on any machine, and the anatomy and lesions of a study are the same at every output size.

Intensities are on a common relative scale (the brightest normal tissue of a sequence is about 1) with the noise
floor of magnitude images in the background; per-sequence normalisation is left to the loader, as for real data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from .abdomen import ABDOMEN_CENTER_MM, ABDOMEN_FOV_MM, LIVER_CONTRASTS
from .anatomy import BRAIN_CONTRASTS, BRAIN_FOV_MM, brain_atlas
from .brain import BRAIN_CLASSES, render_brain
from .geometry import Grid, Size3, as_size3, random_rotation
from .liver import LIVER_CLASSES, render_liver
from .render import polynomial_bias, rician
from .reports import write_report
from .study import Study

CLASSES = BRAIN_CLASSES + LIVER_CLASSES
ORGAN_CLASSES = {"brain": BRAIN_CLASSES, "liver": LIVER_CLASSES}
ORGAN_MODALITIES = {"brain": BRAIN_CONTRASTS, "liver": LIVER_CONTRASTS}
_NOISIER = {"DWI": 1.6, "ADC": 1.6}  # echo-planar diffusion imaging has lower SNR


@dataclass(frozen=True)
class DemoConfig:
    """How demo studies are drawn.

    size: output grid, an int (cube) or (D, H, W); voxels are isotropic (brain field of view 200 mm, abdomen 380 mm).
    classes: the classes to draw from, uniformly (default: every class of ``organs``).
    organs: organs whose classes are drawn when ``classes`` is None.
    p_modality: probability that each sequence of the organ was acquired (at least one always is).
    noise: Rician noise standard deviation relative to the brightest tissue (diffusion 1.6x that).
    bias: standard deviation of the log coil-bias field over the field of view.
    max_rotation_deg, max_shift_mm, max_scale: the random pose (rotation about a random axis, shift, isotropic scale).
    """

    size: int | tuple[int, int, int] = 32
    classes: tuple[str, ...] | None = None
    organs: tuple[str, ...] = ("brain", "liver")
    p_modality: float = 0.75
    noise: float = 0.03
    bias: float = 0.15
    max_rotation_deg: float = 5.0
    max_shift_mm: float = 6.0
    max_scale: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", as_size3(self.size))
        unknown = [o for o in self.organs if o not in ORGAN_CLASSES]
        if unknown or not self.organs:
            raise ValueError(f"organs: expected a non-empty subset of {tuple(ORGAN_CLASSES)}, got {self.organs}")
        if self.classes is not None:
            bad = [c for c in self.classes if c not in CLASSES]
            if bad or not self.classes:
                raise ValueError(f"classes: expected a non-empty subset of {CLASSES}, got {self.classes}")
        if not 0.0 < self.p_modality <= 1.0:
            raise ValueError(f"p_modality: expected a probability in (0, 1], got {self.p_modality}")
        if self.noise < 0 or self.bias < 0:
            raise ValueError(f"noise, bias: expected non-negative values, got {self.noise}, {self.bias}")

    @property
    def class_pool(self) -> tuple[str, ...]:
        return self.classes or tuple(c for o in self.organs for c in ORGAN_CLASSES[o])


def organ_of(label: str) -> str:
    """The organ of a class name."""
    return "brain" if label in BRAIN_CLASSES else "liver"


def _draw_label(rng: np.random.Generator, config: DemoConfig) -> str:
    """The study's class: the first draw of its generator, so labels are known without rendering."""
    pool = config.class_pool
    return pool[int(rng.integers(len(pool)))]


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread: the generator's tensors are small, and on a busy 2-core machine
    OpenMP threads waiting for each other made generation 5-10x slower. DataLoader workers already use one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def generate_study(index: int, seed: int = 0, config: DemoConfig | None = None) -> Study:
    """Study ``index`` of the demo dataset of ``seed`` (deterministic)."""
    with _single_thread():
        return _generate(index, seed, config or DemoConfig())


def organ_frame(organ: str) -> tuple[float, tuple[float, float, float]]:
    """(field of view in mm, centre in anatomy mm) of the demo's ``organ`` studies."""
    return (BRAIN_FOV_MM, tuple(brain_atlas().center)) if organ == "brain" else (ABDOMEN_FOV_MM, ABDOMEN_CENTER_MM)


def scanner_grid(organ: str, size: int | Size3) -> Grid:
    """The unposed grid of a demo study of ``organ``: the scanner frame its images are written in (the random pose
    of :func:`generate_study` moves the anatomy inside it, which an image header does not know)."""
    return Grid.centered(as_size3(size), *organ_frame(organ))


def _generate(index: int, seed: int, config: DemoConfig) -> Study:
    rng = np.random.default_rng([seed, index])
    label = _draw_label(rng, config)
    organ = organ_of(label)
    names = ORGAN_MODALITIES[organ]
    present = rng.uniform(size=len(names)) < config.p_modality
    if not present.any():
        present[rng.integers(len(names))] = True

    fov, center = organ_frame(organ)
    rotation = random_rotation(rng, config.max_rotation_deg)
    scale = 1.0 + rng.uniform(-config.max_scale, config.max_scale)
    shift = rng.uniform(-config.max_shift_mm, config.max_shift_mm, size=3)
    grid = scanner_grid(organ, config.size).posed(rotation * scale, center, shift)

    render = render_brain if organ == "brain" else render_liver
    images, attributes = render(label, rng, grid)
    modalities = tuple(n for n, p in zip(names, present, strict=True) if p)
    images = images[torch.from_numpy(np.flatnonzero(present))]
    # The report is drawn before the noise, whose number of draws depends on the output size.
    report = write_report(label, attributes, modalities, rng)
    images = images * polynomial_bias(rng, grid.coords(), len(modalities), config.bias, fov)
    sigma = config.noise * rng.uniform(0.7, 1.3, size=len(modalities)) * [_NOISIER.get(m, 1.0) for m in modalities]
    images = rician(rng, images, torch.tensor(sigma, dtype=torch.float32))
    attributes.update(
        organ=organ,
        label=label,
        missing_modalities=[n for n, p in zip(names, present, strict=True) if not p],
        pose={
            "rotation_deg": round(float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))), 2),
            "scale": round(float(scale), 4),
            "shift_mm": [round(float(v), 2) for v in shift],
        },
    )
    return Study(
        study_id=f"demo-s{seed}-{index:06d}",
        organ=organ,
        modalities=modalities,
        volume=images.contiguous(),
        spacing=(grid.spacing,) * 3,
        report=report,
        label=CLASSES.index(label),
        attributes=attributes,
    )


def generate_studies(count: int, seed: int = 0, config: DemoConfig | None = None, start: int = 0) -> list[Study]:
    """Studies ``start .. start + count - 1`` of the demo dataset of ``seed``."""
    return [generate_study(i, seed, config) for i in range(start, start + count)]


class DemoDataset(Dataset):
    """A map-style dataset of ``length`` demo studies, generated on access.

    ``DataLoader(DemoDataset(512), batch_size=None, num_workers=2)`` generates them in parallel; item ``i`` is always
    the same study, whatever the worker or epoch.
    """

    def __init__(self, length: int, seed: int = 0, config: DemoConfig | None = None) -> None:
        if length < 1:
            raise ValueError(f"length: expected a positive number of studies, got {length}")
        self.length, self.seed, self.config = length, seed, config or DemoConfig()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Study:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} studies")
        return generate_study(index % self.length, self.seed, self.config)

    def labels(self) -> Sequence[int]:
        """Every study's class index without rendering (for stratified sampling and class weights)."""
        rngs = (np.random.default_rng([self.seed, i]) for i in range(self.length))
        return [CLASSES.index(_draw_label(rng, self.config)) for rng in rngs]
