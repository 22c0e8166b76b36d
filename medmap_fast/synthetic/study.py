"""The generator's in-memory study record.

A :class:`Study` is one generated examination: the co-registered volumes of the sequences that were acquired (any
subset of the modality registry), the report and the label. :mod:`medmap_fast.synthetic.export` writes studies as
NIfTI files and a manifest; from there they take the path of any user's data (prepare, cache, loaders).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from medmap_fast.validation import describe, fail


@dataclass
class Study:
    """One study: ``volume`` float32 [M_present, D, H, W], one channel per name in ``modalities`` (same order).

    ``spacing`` is the voxel size in mm along (D, H, W); ``label`` a class index (the demo's classes are
    :data:`medmap_fast.synthetic.demo.CLASSES`); ``attributes`` free JSON-serialisable metadata (findings, acquisition).
    """

    study_id: str
    organ: str
    modalities: tuple[str, ...]
    volume: torch.Tensor
    spacing: tuple[float, float, float]
    report: str
    label: int
    attributes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        name = f"Study {self.study_id!r}"
        v = self.volume
        if not isinstance(v, torch.Tensor) or v.ndim != 4 or not v.is_floating_point():
            got = describe(v) if isinstance(v, torch.Tensor) else type(v).__name__
            fail(f"{name}.volume", "a float tensor [M_present, D, H, W]", got)
        if len(self.modalities) == 0 or v.shape[0] != len(self.modalities):
            fail(f"{name}.volume", f"one channel per modality ({len(self.modalities)}: {self.modalities})", describe(v))
        if len(set(self.modalities)) != len(self.modalities):
            fail(f"{name}.modalities", "distinct modality names", str(self.modalities))
        if len(self.spacing) != 3 or any(s <= 0 for s in self.spacing):
            fail(f"{name}.spacing", "three positive voxel sizes in mm", str(self.spacing))
        x, y, z = self.spacing
        self.spacing = (float(x), float(y), float(z))

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape (D, H, W)."""
        _, d, h, w = self.volume.shape
        return d, h, w
